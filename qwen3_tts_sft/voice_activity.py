"""Where the speech is in a recording: silero-vad, whose model ships inside its pip package.

Two uses in prepare_codes.py:
    speech_bounds   the first and last speech of each clip, to trim silence at its edges. The
                    detector runs only on each clip's first and last EDGE_SECONDS, all the clips of a
                    batch at once, which keeps it off the encoding's critical path (a clip whose
                    edge window holds no speech is searched whole).
    speech_pieces   a long take cut at its pauses into pieces of at most a given length.

The detector runs at 16 kHz, on one thread: its speech probabilities are then the same whichever
process runs it, so a resumed or sharded run trims every clip exactly as one run does.
"""

import contextlib
import warnings

import numpy as np

from qwen3_tts_sft import audio

VAD_SAMPLE_RATE = 16000
WINDOW = 512                  # samples per speech probability at 16 kHz (32 ms): silero's frame
EDGE_SECONDS = 3.0            # searched at each end of a clip for its first and last speech
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
    when the detector hears none. Searches the clips' edges first, then whole clips where needed."""
    at_vad_rate = [audio.resample(clip, sample_rate, VAD_SAMPLE_RATE) for clip in clips]
    edge = int(EDGE_SECONDS * VAD_SAMPLE_RATE)
    # A clip up to two edges long is searched whole; a longer one at its head and its tail.
    short = [len(samples) <= 2 * edge for samples in at_vad_rate]
    windows = [samples if whole else samples[:edge] for samples, whole in zip(at_vad_rate, short)]
    tail_starts = [len(samples) - edge // WINDOW * WINDOW for samples in at_vad_rate]
    windows += [samples[start:] for samples, start, whole in zip(at_vad_rate, tail_starts, short) if not whole]
    probabilities = iter(speech_probabilities(windows))
    heads = [next(probabilities) for _ in at_vad_rate]
    bounds, whole = [None] * len(clips), []
    for index, head_runs in enumerate(map(speech_runs, heads)):
        tail_runs = head_runs if short[index] else speech_runs(next(probabilities))
        if not head_runs or not tail_runs:
            whole.append(index)  # maybe speech beyond the edge windows, or none at all
            continue
        tail_start = 0 if short[index] else tail_starts[index]
        bounds[index] = (head_runs[0][0] * WINDOW, tail_start + tail_runs[-1][1] * WINDOW)
    searched = speech_probabilities([at_vad_rate[index] for index in whole if not short[index]])
    for index, runs in zip([index for index in whole if not short[index]], map(speech_runs, searched)):
        if runs:
            bounds[index] = (runs[0][0] * WINDOW, runs[-1][1] * WINDOW)
    scale = sample_rate / VAD_SAMPLE_RATE
    return [None if found is None else (int(found[0] * scale), min(len(clip), int(found[1] * scale)))
            for clip, found in zip(clips, bounds)]


def speech_pieces(samples: np.ndarray, sample_rate: int, max_seconds: float, min_pause_seconds: float,
                  padding_seconds: float) -> list:
    """A long take's speech as (start, end) samples: cut at every pause of at least
    `min_pause_seconds`, pieces longer than `max_seconds` cut again at their longest inner pause,
    each padded by `padding_seconds` (less where the pause between two is shorter)."""
    module, _ = silero()
    at_vad_rate = audio.resample(samples, sample_rate, VAD_SAMPLE_RATE)
    probabilities = speech_probabilities([at_vad_rate])[0]
    pieces = module.get_speech_timestamps_from_probs(
        probabilities.tolist(), sampling_rate=VAD_SAMPLE_RATE, threshold=SPEECH_THRESHOLD,
        min_speech_duration_ms=PIECE_MIN_SPEECH_MS, max_speech_duration_s=max_seconds,
        min_silence_duration_ms=int(min_pause_seconds * 1000), speech_pad_ms=int(padding_seconds * 1000),
        audio_length_samples=len(at_vad_rate))
    scale = sample_rate / VAD_SAMPLE_RATE
    return [(int(piece["start"] * scale), min(len(samples), int(piece["end"] * scale))) for piece in pieces]
