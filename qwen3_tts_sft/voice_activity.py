"""Where the speech is in a recording: silero-vad, whose model ships inside its pip package.

Two uses in prepare_codes.py:
    speech_bounds   the first and last speech of each clip, to trim silence at its edges. The
                    detector runs only on each clip's first and last EDGE_SECONDS, all the clips of a
                    batch at once, which keeps it off the encoding's critical path (a clip whose
                    edge window holds no speech is searched whole).
    speech_pieces   a long take cut at its pauses into pieces of at most a given length; a stretch
                    of speech with no such pause is cut at its longest quiet moment (quiet_run), and
                    where it has none, in speech: those cuts are returned, for their pieces to be
                    rejected rather than kept with a word cut in half.

The detector runs at 16 kHz, on one thread: its speech probabilities are then the same whichever
process runs it, so a resumed or sharded run trims every clip exactly as one run does.
"""

import contextlib
import warnings

import numpy as np

from qwen3_tts_sft import audio

VAD_SAMPLE_RATE = 16000
WINDOW = 512                  # samples per speech probability at 16 kHz (32 ms): silero's frame
EDGE_SECONDS = 1.5            # heard at each end of a clip for its first and last speech
SPEECH_THRESHOLD = 0.5        # silero's own defaults: speech starts above this,
SILENCE_THRESHOLD = 0.35      # and lasts until it falls below this
MIN_SPEECH_SECONDS = 0.1      # shorter bursts are clicks; a short last word is longer

PIECE_MIN_SPEECH_MS = 250     # silero's default: a long take's shorter bursts are not pieces of their own

_loaded = {}  # the silero_vad module and its model, loaded once per process


@contextlib.contextmanager
def one_thread():
    """torch on one thread for the detector (same results everywhere), restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        yield torch
    finally:
        torch.set_num_threads(threads)


def silero():
    """(the silero_vad module, its model). `import silero_vad` sets torch to one thread for the
    whole process, so it is imported inside one_thread, which puts the setting back."""
    if not _loaded:
        with one_thread(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*")  # torch's deprecation, not ours to act on
            import silero_vad

            _loaded.update(module=silero_vad, model=silero_vad.load_silero_vad())  # the TorchScript file it ships
    return _loaded["module"], _loaded["model"]


def speech_probabilities(windows: list) -> list:
    """Per window (float32 mono at VAD_SAMPLE_RATE), the speech probability of each WINDOW of it."""
    if not windows:
        return []
    _, detector = silero()
    longest = max(len(window) for window in windows)
    batch = np.zeros((len(windows), longest + -longest % WINDOW), dtype=np.float32)
    for row, window in enumerate(windows):
        batch[row, :len(window)] = window
    with one_thread() as torch:
        probabilities = detector.audio_forward(torch.from_numpy(batch), VAD_SAMPLE_RATE).numpy()
    return [probabilities[row, :-(-len(window) // WINDOW)] for row, window in enumerate(windows)]


def speech_runs(probabilities: np.ndarray) -> list:
    """(first, last + 1) window of each run of speech: windows above SILENCE_THRESHOLD around at
    least one above SPEECH_THRESHOLD (silero's own hysteresis), MIN_SPEECH_SECONDS long or touching
    an end of the windows (it may go on beyond them). Edges are where speech is softest: a trim
    had better leave a breath than cut a word."""
    shortest = round(MIN_SPEECH_SECONDS * VAD_SAMPLE_RATE / WINDOW)
    voiced = np.concatenate([[False], probabilities >= SILENCE_THRESHOLD, [False]])
    edges = np.flatnonzero(voiced[1:] != voiced[:-1])
    return [(int(start), int(end)) for start, end in zip(edges[::2], edges[1::2])
            if probabilities[start:end].max() >= SPEECH_THRESHOLD
            and (end - start >= shortest or start == 0 or end == len(probabilities))]


def speech_bounds(clips: list, sample_rate: int) -> list:
    """For each clip (float32 mono at `sample_rate`): (start, end) sample of its speech, or None
    when the detector hears none. Hears each clip's first and last EDGE_SECONDS, all clips in one
    batch; a clip whose edge window holds no speech (a long silence, or none at all) is heard whole."""
    edge = int(EDGE_SECONDS * sample_rate)
    tail_starts = [max(0, len(clip) - edge) for clip in clips]
    longer = [index for index, clip in enumerate(clips) if len(clip) > edge]  # else the head is all of it
    windows = [clip[:edge] for clip in clips] + [clips[index][tail_starts[index]:] for index in longer]
    heard = speech_probabilities([audio.resample(window, sample_rate, VAD_SAMPLE_RATE) for window in windows])
    head_runs = [speech_runs(probabilities) for probabilities in heard[:len(clips)]]
    tail_runs = dict(zip(longer, map(speech_runs, heard[len(clips):])))
    to_samples = WINDOW * sample_rate / VAD_SAMPLE_RATE  # one window, in samples at `sample_rate`
    bounds, again = [None] * len(clips), []
    for index, clip in enumerate(clips):
        head, tail = head_runs[index], tail_runs.get(index, head_runs[index])
        if head and tail:
            bounds[index] = (int(head[0][0] * to_samples), min(len(clip), tail_starts[index] + int(tail[-1][1] * to_samples)))
        elif index in tail_runs:
            again.append(index)  # maybe speech beyond the edge windows, or none at all
    heard = speech_probabilities([audio.resample(clips[index], sample_rate, VAD_SAMPLE_RATE) for index in again])
    for index, runs in zip(again, map(speech_runs, heard)):
        if runs:
            bounds[index] = (int(runs[0][0] * to_samples), min(len(clips[index]), int(runs[-1][1] * to_samples)))
    return bounds


def speech_pieces(samples: np.ndarray, sample_rate: int, max_seconds: float, min_pause_seconds: float,
                  padding_seconds: float) -> tuple:
    """A long take's speech as (start, end) samples, and the samples where a cut falls inside speech.

    silero cuts the take at every pause of at least `min_pause_seconds` and pads each stretch of speech
    by `padding_seconds` (less where the pause between two is shorter). A stretch longer than
    `max_seconds` is cut here, not by silero's max_speech_duration_s: finding no pause of 98 ms or more
    in it, that cuts at the limit, mid-word, and says nothing. Here each cut falls in the second half
    of the longest piece allowed, so that pieces stay sentence-sized, and leaves MIN_CLIP_SECONDS of
    speech (and the padding) after it; within that, in the middle of the longest run of 10 ms frames
    quieter than the take's speech (audio.SPEECH_BELOW_LOUDEST_DB below its loud frames, or at its
    noise floor): a breath or a pause shorter than `min_pause_seconds`, else the gap between two
    words. That is the quietest point the take offers, and the longest quiet run is the likeliest to
    be a pause rather than a consonant's closure, so a piece ending there ends on a whole word.
    Where every frame is as loud as speech (no gap at all, or loud noise under the voice) the cut
    falls at the limit and is returned: a piece that starts or ends mid-word would teach the model
    to, and is better rejected, saying where, than kept.
    """
    module, _ = silero()
    at_vad_rate = audio.resample(samples, sample_rate, VAD_SAMPLE_RATE)
    probabilities = speech_probabilities([at_vad_rate])[0]
    stretches = module.get_speech_timestamps_from_probs(
        probabilities.tolist(), sampling_rate=VAD_SAMPLE_RATE, threshold=SPEECH_THRESHOLD,
        min_speech_duration_ms=PIECE_MIN_SPEECH_MS, min_silence_duration_ms=int(min_pause_seconds * 1000),
        speech_pad_ms=int(padding_seconds * 1000), audio_length_samples=len(at_vad_rate))
    scale = sample_rate / VAD_SAMPLE_RATE
    stretches = [(int(stretch["start"] * scale), min(len(samples), int(stretch["end"] * scale)))
                 for stretch in stretches]
    longest, padding = int(max_seconds * sample_rate), int(padding_seconds * sample_rate)
    must_cut = any(end - start > longest for start, end in stretches)
    quiet = ~audio.loud_frames(samples, sample_rate, audio.SPEECH_BELOW_LOUDEST_DB) if must_cut else None
    frame = sample_rate // audio.LOUDNESS_FRAMES_PER_SECOND
    tail = int((audio.MIN_CLIP_SECONDS + padding_seconds) * sample_rate)
    pieces, cuts_in_speech = [], []
    for start, end in stretches:
        while end - start > longest:
            earliest, latest = start + longest // 2, min(start + longest, end - tail)
            if latest <= earliest:  # a limit too short to leave that much after the cut
                latest = start + longest
            pause = quiet_run(quiet, -(-earliest // frame), latest // frame)
            if pause is None:
                cuts_in_speech.append(start + longest)
                pieces.append((start, start + longest))
                start += longest
                continue
            pause_start, pause_end = pause[0] * frame, pause[1] * frame
            cut = (pause_start + pause_end) // 2  # each side keeps up to `padding` of the pause
            pieces.append((start, min(cut, pause_start + padding)))
            start = max(cut, pause_end - padding)
        pieces.append((start, end))
    return pieces, cuts_in_speech


def quiet_run(quiet: np.ndarray, first: int, last: int):
    """(first, last + 1) frame of the longest run of quiet frames among frames first..last - 1 (the
    latest of equals: the longer piece before it), or None when none of them is quiet."""
    window = np.concatenate([[False], quiet[first:last], [False]])
    edges = np.flatnonzero(window[1:] != window[:-1])
    if not len(edges):
        return None
    starts, ends = edges[::2], edges[1::2]
    longest = np.flatnonzero(ends - starts == (ends - starts).max())[-1]
    return first + int(starts[longest]), first + int(ends[longest])
