"""The audio facts every command shares, and reading audio files.

Facts: the codec's frame and sample rates, what counts as clipped, decibels below full scale,
loudness (ITU-R BS.1770, with pyloudnorm), the speaking rate, what counts as a low sample rate.
Files: any format soundfile reads, downmixed to mono, resampled with soxr, and checked for
truncation (a file that decodes shorter than its header says). Light on purpose (numpy,
soundfile, soxr; pyloudnorm when loudness is asked for): prepare_codes.py and infer_test.py
import it without the model code.
"""

import hashlib
import math
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from qwen3_tts_sft import quiet
from qwen3_tts_sft.languages import AUTO_LANGUAGE

FRAMES_PER_SECOND = 12.5  # the 12 Hz codec: one frame of 16 codes every 80 ms
# A sample at or beyond this magnitude counts as clipped: 16-bit full scale reads as 0.99997,
# and the speech decoder's output is clamped to [-1, 1].
CLIP_LEVEL = 0.999
# A clip with more than this share of its samples at full scale is distorted throughout (every loud
# syllable flattened, ~10 ms of crackle a second): the model would learn the distortion, so
# prepare_codes.py rejects it whatever --reject_clipped says (its --max_clipped_fraction).
HEAVILY_CLIPPED_FRACTION = 0.01
# Files that store float samples (soundfile's subtypes): these may go past full scale unharmed, to be
# scaled down later, so a sample beyond CLIP_LEVEL is clipped only where it sits on a flat top.
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")
# What the 12 Hz speech tokenizer takes (its get_input_sample_rate and get_encode_downsample_rate):
# prepare_codes --validate_only measures clips at this rate without loading the tokenizer.
TOKENIZER_SAMPLE_RATE = 24000
SAMPLES_PER_FRAME = 1920
# Recordings below this rate lack the upper half of the speech band (fricatives, sibilants);
# upsampling does not bring it back.
LOW_SAMPLE_RATE = 16000
# A mean sample beyond this (a fraction of full scale) is a DC offset that clicks where the sound
# starts and stops: infer_test.py fails speech with one, and prepare_codes.py removes it from a
# recording (the model would learn it otherwise).
MAX_DC_OFFSET = 0.05
# Loudness normalisation lowers its gain rather than push a peak above this: clear of clipping,
# with a margin for the overshoot of later resampling.
PEAK_CEILING_DBFS = -1.0
# Trimming cuts only audio this far below a clip's loud frames (and heard as no speech): a voice
# the detector misses is never cut. Weak consonants sit 20-30 dB below the vowels.
QUIET_BELOW_LOUDEST_DB = 35.0
# Nor is sound within this of the recording's noise floor (its quietest tenth of 10 ms frames) loud:
# a home recording's room noise can sit within 35 dB of its speech, and would then never be trimmed.
ABOVE_NOISE_FLOOR_DB = 6.0
# Sound within this of a recording's loud frames is as loud as its speech: a long take's pieces
# that leave much of it out missed speech the detector did not hear (or loud noise between sentences).
SPEECH_BELOW_LOUDEST_DB = 20.0
# A long take whose pieces leave out more than this much speech-loud sound (seconds, and share of
# the take) is flagged speech_missed.
MISSED_SPEECH = dict(seconds=2.0, fraction=0.2)
LOUDNESS_FRAMES_PER_SECOND = 100  # loudness is measured in 10 ms frames
# A file that decodes this much shorter than its header says is truncated (MP3 headers and
# encoder padding are a few frames off; a cut file is off by much more).
TRUNCATION_TOLERANCE = dict(fraction=0.01, seconds=0.05)

# Clips shorter than this are mostly breaths, clicks or single syllables, with the least reliable
# transcripts (prepare_codes.py --min_seconds); nor do they make a reference clip (the trainer).
MIN_CLIP_SECONDS = 0.5

# RMS level below which a clip holds no voice: speech recorded at any usable gain sits well above it,
# a take of room noise below (prepare_codes.py --silence_dbfs).
SILENCE_DBFS = -50.0
# A clip below --silence_dbfs whose loud frames stand this far above its quiet ones (speech_to_noise_db) is
# speech recorded at low gain, not room noise: noise alone scores a few dB, speech even in a noisy room about
# 20. Its rejection says so, with the --silence_dbfs that keeps it.
LOW_GAIN_SPEECH_DB = 20.0
# Channels that do not cancel mix to mono at least as loud as their loudest channel alone would (its level less
# 20*log10(channels): 6 dB for stereo, the other channel silent). A mix this far below even that has lost the
# voice: one channel is the other inverted (a miswired balanced cable, a channel flipped in editing), and what
# is left is their difference, mostly noise, at whatever level. Such a file is rejected.
CANCELLED_MIX_DB = 10.0


def rms_dbfs(samples: np.ndarray) -> float:
    """RMS level in dB relative to full scale; -inf for digital silence or no samples."""
    rms = math.sqrt(float(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def peak_dbfs(samples: np.ndarray) -> float:
    peak = float(np.max(np.abs(samples))) if len(samples) else 0.0
    return 20 * math.log10(peak) if peak > 0 else -math.inf


def clipped_fraction(samples: np.ndarray, floats: bool = False) -> float:
    """Share of the samples ([frames] or [frames, channels]) at or beyond CLIP_LEVEL. With `floats`
    (samples as a float file stores them), only those on a flat top count: equal to the sample before
    or after in their channel, as a ceiling leaves them; a waveform that merely peaks past full scale
    is not clipped."""
    if not samples.size:
        return 0.0
    clipped = np.abs(samples) >= CLIP_LEVEL
    if floats:
        same_as_next = samples[1:] == samples[:-1]
        flat = np.zeros_like(clipped)
        flat[1:] |= same_as_next
        flat[:-1] |= same_as_next
        clipped &= flat
    return float(np.count_nonzero(clipped)) / samples.size


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """float32 samples at `to_rate` (soxr's high quality)."""
    if from_rate != to_rate:
        samples = soxr.resample(samples, from_rate, to_rate, quality="HQ")
    return np.ascontiguousarray(samples, dtype=np.float32)


def integrated_loudness(samples: np.ndarray, sample_rate: int) -> float:
    """ITU-R BS.1770 integrated loudness in LUFS; -inf for silence or under one 400 ms block."""
    import pyloudnorm  # imported here: only prepare_codes measures loudness

    if len(samples) < 0.4 * sample_rate:
        return -math.inf
    return float(pyloudnorm.Meter(sample_rate).integrated_loudness(samples.astype(np.float64)))


def loudness_gain_db(loudness_lufs: float, peak: float, target_lufs: float) -> float:
    """The gain that brings a clip to `target_lufs`, lowered so its peak stays at PEAK_CEILING_DBFS."""
    if not math.isfinite(loudness_lufs) or not math.isfinite(peak):
        return 0.0
    return min(target_lufs - loudness_lufs, PEAK_CEILING_DBFS - peak)


def speech_to_noise_db(samples: np.ndarray, sample_rate: int) -> float:
    """A rough signal-to-noise ratio: the loud (90th percentile) against the quiet (10th percentile)
    20 ms frames, in dB. Clean studio speech scores 50 or more, a noisy room 20 or less."""
    frame = sample_rate // 50
    frames = len(samples) // frame
    if frames < 10:
        return 0.0
    power = np.mean(np.square(samples[:frames * frame].reshape(frames, frame), dtype=np.float64), axis=1)
    quiet, loud = np.percentile(power, [10, 90])
    return 10 * math.log10(max(loud, 1e-20) / max(quiet, 1e-20))


def loud_frames(samples: np.ndarray, sample_rate: int, below_loudest_db: float) -> np.ndarray:
    """Per 10 ms frame (LOUDNESS_FRAMES_PER_SECOND), whether it is within `below_loudest_db` of the
    recording's loud frames (their 95th percentile) and ABOVE_NOISE_FLOOR_DB above its noise floor.
    All False for digital silence."""
    frame = sample_rate // LOUDNESS_FRAMES_PER_SECOND
    frames = -(-len(samples) // frame)
    padded = np.pad(samples, (0, frames * frame - len(samples)))
    power = np.mean(np.square(padded.reshape(frames, frame), dtype=np.float64), axis=1)
    if not power.any():
        return np.zeros(frames, dtype=bool)
    loudest, floor = np.percentile(power, [95, 10])
    threshold = max(loudest * 10 ** (-below_loudest_db / 10), floor * 10 ** (ABOVE_NOISE_FLOOR_DB / 10))
    return power >= threshold


def loud_bounds(samples: np.ndarray, sample_rate: int, below_loudest_db: float = QUIET_BELOW_LOUDEST_DB):
    """(first, last + 1) sample of the loud frames (loud_frames), or None for silence. What lies
    outside is quiet."""
    loud = np.flatnonzero(loud_frames(samples, sample_rate, below_loudest_db))
    if not len(loud):
        return None
    frame = sample_rate // LOUDNESS_FRAMES_PER_SECOND
    return int(loud[0] * frame), min(len(samples), int((loud[-1] + 1) * frame))


def loud_seconds_outside(samples: np.ndarray, sample_rate: int, spans: list,
                         below_loudest_db: float = SPEECH_BELOW_LOUDEST_DB) -> float:
    """Seconds of the recording as loud as its speech (within `below_loudest_db` of its loud
    frames) that lie outside every (start, end) span."""
    loud = loud_frames(samples, sample_rate, below_loudest_db)
    frame = sample_rate // LOUDNESS_FRAMES_PER_SECOND
    for start, end in spans:
        loud[start // frame:-(-end // frame)] = False
    return np.count_nonzero(loud) / LOUDNESS_FRAMES_PER_SECOND


def silence_problem(samples: np.ndarray, sample_rate: int, silence_dbfs: float) -> str:
    """Why a clip quieter than --silence_dbfs (`silence_dbfs`) is rejected; where its loud parts stand well
    above its own noise floor (LOW_GAIN_SPEECH_DB), that it looks like speech recorded at low gain, and
    the --silence_dbfs that keeps it."""
    level = rms_dbfs(samples)
    problem = f"level {level:.1f} dBFS is below --silence_dbfs {silence_dbfs:g}"
    above_noise = speech_to_noise_db(samples, sample_rate)
    if math.isfinite(level) and above_noise >= LOW_GAIN_SPEECH_DB:
        keeps = 10 * math.floor((level - 5) / 10)  # at least 5 dB below its level, in tens
        problem += (f", but its loud parts stand {above_noise:.0f} dB above its noise floor: it looks like speech "
                    f"recorded at low gain, not room noise. Lower --silence_dbfs (e.g. {keeps}) to keep it")
    return problem


def mix_loss_db(audio: np.ndarray) -> float:
    """How far (dB) the mono mix of a file's channels ([frames, channels]) falls below what its loudest
    channel alone would give it: 0 or less for channels that do not cancel (one channel: 0), inf for a
    mix of digital silence from channels that are not silent."""
    channels = audio.shape[1]
    if channels < 2:
        return 0.0
    # The channels' products summed (a matrix product per block, in float64 across blocks): the mix's power
    # is their total over channels squared. Ten times faster than forming the mix, and no copy of a long take.
    products = np.zeros((channels, channels))
    for start in range(0, len(audio), 1 << 16):
        block = audio[start:start + (1 << 16)]
        products += block.T @ block
    alone = products.diagonal().max() / channels ** 2  # the mix's power were the loudest channel the only one
    mix = products.sum() / channels ** 2
    if alone == 0:
        return 0.0
    return 10 * math.log10(alone / mix) if mix > 0 else math.inf


def cancelled_channels(audio: np.ndarray):
    """Why a file ([frames, channels]) cannot be mixed to mono, or None: its channels cancel (CANCELLED_MIX_DB)."""
    loss = mix_loss_db(audio)
    if loss < CANCELLED_MIX_DB:
        return None
    below_loudest = loss + 20 * math.log10(audio.shape[1])
    mix = "digital silence" if math.isinf(loss) else f"{below_loudest:.0f} dB quieter than its loudest channel"
    return (f"its channels cancel when mixed to mono (one is the other inverted): the mix is {mix}. Re-save it with "
            f"one channel")


def content_hash(samples: np.ndarray) -> str:
    """Names a clip's samples: the same audio in two files (or twice in one dataset) hashes the same."""
    return hashlib.sha1(np.ascontiguousarray(samples, dtype=np.float32).tobytes()).hexdigest()


# A Chinese character, a kana or a hangul block is about a syllable (read at 5-10 a second), a letter a
# fraction of one (English is read at 12-20 characters a second): rates of the two kinds of text differ
# about 3x, so a clip's rate is only compared with clips of its own language, or, where a row names none
# (auto), of its own kind of script.
SYLLABIC_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "HALFWIDTH KATAKANA", "HANGUL")
SYLLABIC_LANGUAGES = {"chinese", "japanese", "korean"}
SYLLABIC, ALPHABETIC = "cjk", "other"  # the scripts text_script tells apart


# Letters of an alphabet read in the time of one syllable: a Latin word inside Chinese text
# ("iPhone") takes far fewer syllables than letters.
LETTERS_PER_SYLLABLE = 3


def optional_mark(character: str) -> bool:
    """An Arabic or Hebrew vowel point (a combining mark of U+0590-U+06FF): optional in writing, so text
    with it says what text without it says, and a recogniser seldom writes it."""
    return "\u0590" <= character <= "\u06ff" and unicodedata.category(character).startswith("M")


def spoken_characters(text: str) -> int:
    """The characters of a transcript that speaking rates count: of its NFC form, as the tokenizer reads
    it (text typed decomposed, as macOS writes it, holds a Vietnamese letter and its accents apart and a
    hangul syllable as 2-3 jamo: twice the code points for the same speech), less invisible format
    characters (zero-width spaces and joiners, direction marks), optional vowel points and white space
    at its ends."""
    text = unicodedata.normalize("NFC", text).strip()
    return sum(unicodedata.category(character) != "Cf" and not optional_mark(character) for character in text)


def text_script(text: str) -> str:
    """SYLLABIC when most of the text's speaking time is Chinese characters, kana or hangul (each a
    syllable, against LETTERS_PER_SYLLABLE letters of an alphabet), else ALPHABETIC: "今天发布了iPhone"
    is Chinese text with a brand name in it."""
    letters = [character for character in text if character.isalpha()]
    syllabic = sum(unicodedata.name(character, "").startswith(SYLLABIC_SCRIPTS) for character in letters)
    return SYLLABIC if letters and LETTERS_PER_SYLLABLE * syllabic > len(letters) - syllabic else ALPHABETIC


def rate_group(text: str, language: str = None) -> str:
    """The group a clip's speaking rate is compared within (per speaker): its language, lower-cased, or
    for a row that names none (auto), or a language of another script than the text's, its script:
    "auto/cjk" or "auto/other". The one owner of this key:
    prepare_codes' checks and summary, the trainer's listening evaluations and infer_test all use it."""
    name = (language or "").strip().lower()
    script = text_script(text)
    # A language whose script the text is not in (Chinese text spoken with --language english) says
    # nothing of its rate: the text's script does.
    return name if name and name != AUTO_LANGUAGE and group_script(name) == script else f"{AUTO_LANGUAGE}/{script}"


def group_script(group: str) -> str:
    """The script (SYLLABIC or ALPHABETIC) of a rate_group's text."""
    syllabic = group in SYLLABIC_LANGUAGES or group == f"{AUTO_LANGUAGE}/{SYLLABIC}"
    return SYLLABIC if syllabic else ALPHABETIC


def describe_group(group: str) -> str:
    """A rate group in words, for messages."""
    if group.startswith(f"{AUTO_LANGUAGE}/"):
        script = "Chinese, Japanese or Korean script" if group_script(group) == SYLLABIC else "alphabetic script"
        return f"{script} text (language auto)"
    return f"{group} text"


class SpeakingRates:
    """Characters of text (as written: spaces and punctuation count) per second of audio, per rate group
    (rate_group: the language, else the script) and speaker, and over all clips. prepare_codes reports
    it; infer_test and the trainer's evaluations compare generated speech against its own group's."""

    ALL = "*"  # key of the rate over every clip (of every group, of every speaker)

    def __init__(self):
        self.totals = {}  # group -> key -> [characters, seconds]

    def add(self, text: str, frames: int, speaker: str = None, language: str = None) -> None:
        for group in (self.ALL, rate_group(text, language)):
            for key in {self.ALL, speaker.strip().lower() if speaker else self.ALL}:
                total = self.totals.setdefault(group, {}).setdefault(key, [0, 0.0])
                total[0] += spoken_characters(text)
                total[1] += frames / FRAMES_PER_SECOND

    def rates(self) -> dict:
        """{group: {speaker: chars/s, ALL: chars/s}}; group ALL holds the rates over every group."""
        return {group: {key: characters / seconds for key, (characters, seconds) in totals.items() if seconds > 0}
                for group, totals in self.totals.items()}


@dataclass
class DecodedAudio:
    samples: np.ndarray        # float32 mono at the requested rate
    clipped_fraction: float    # share of the file's samples (all channels) clipped (clipped_fraction)
    level_dbfs: float          # RMS level of `samples`, in dB below full scale (-inf for digital silence)
    file_rate: int = None      # the file's own sample rate
    truncated: str = None      # why the file counts as truncated, when it does
    cancelled: str = None      # why its channels cannot be mixed to mono, when they cancel (cancelled_channels)

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.samples).all())


# What libmpg123 writes straight to the process's stderr when an MP3's size disagrees with its Xing
# header: cut short, or MP3s joined end to end (then only the first one's length decodes). The
# truncation check names both; the notice itself would break the progress bar.
MPG123_SIZE_NOTICE = "Xing stream size off by more than"


def libsndfile(path):
    """Around each soundfile call on `path`: without libmpg123's size notice, which lands in the list
    the block yields. Around every file, whatever its name: an MP3 named .wav is decoded as the MP3 it
    is, and libmpg123 speaks as it opens the file, before soundfile can tell its format."""
    return quiet.shell_stderr_without(MPG123_SIZE_NOTICE)


def stores_floats(path) -> bool:
    """Whether the file stores float samples (a 32- or 64-bit float WAV, say): see clipped_fraction."""
    with libsndfile(path):
        return sf.info(str(path)).subtype in FLOAT_SUBTYPES


def read_native(path) -> tuple:
    """(samples [frames, channels] float32, the file's rate). Raises on unreadable or empty files."""
    with libsndfile(path):
        audio, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    if audio.shape[0] == 0:
        raise ValueError("the file holds no samples")
    return audio, file_rate


def remove_dc_offset(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """The samples without their DC offset: the mean taken out, then a first-order high-pass at
    about 20 Hz, below any voice, for an offset that drifts or sits under the speech only."""
    from scipy.signal import lfilter, lfilter_zi

    pole = math.exp(-2 * math.pi * 20.0 / sample_rate)
    b, a = [1.0, -1.0], [1.0, -pole]
    centred = samples - samples.mean()
    # Started as if the first sample had always been there: no step (a click) at the start.
    filtered, _ = lfilter(b, a, centred, zi=lfilter_zi(b, a) * centred[0])
    return filtered.astype(np.float32)


def to_mono(audio: np.ndarray, file_rate: int, sample_rate: int) -> np.ndarray:
    return resample(audio.mean(axis=1), file_rate, sample_rate)


def load_mono(path, sample_rate: int) -> np.ndarray:
    """The file's audio as float32 mono at `sample_rate`. Raises on unreadable or empty files."""
    return to_mono(*read_native(path), sample_rate)


def decode(path, sample_rate: int) -> DecodedAudio:
    """load_mono, plus what a data check needs: how much of the file is clipped, and how loud it is.

    Clipping is measured on the file's own samples: downmixing and resampling smooth clipped peaks.
    """
    audio, file_rate = read_native(path)
    samples = to_mono(audio, file_rate, sample_rate)
    return DecodedAudio(samples, clipped_fraction(audio, stores_floats(path)), rms_dbfs(samples), file_rate,
                        truncation(path, len(audio), file_rate), cancelled_channels(audio))


def truncation(path, decoded_frames: int, file_rate: int):
    """Why a file counts as cut short, or None. libsndfile reads what is there and says nothing:
    it takes a WAV's (an AIFF's, an AU's) length from the file's size, not from its header, and a cut
    Ogg simply ends; so the data size those headers declare, and the Ogg pages, are read here."""
    data, joined_mp3s = wav_data(path), False
    if data is None:  # FLAC and MP3 headers give the full frame count
        with libsndfile(path) as size_notices:
            info = sf.info(str(path))
        # The format libsndfile found, not the file's name: MP3s joined and named .wav are MP3s all the same.
        joined_mp3s = info.format == "MP3" and bool(size_notices)
        declared, found, per_second, found_is = info.frames, decoded_frames, file_rate, "only {:.2f} s can be decoded"
    elif data.declared_bytes is not None:
        # Bytes, not frames: right for compressed WAVs (ADPCM) too, whose frames are packed in blocks.
        declared, found, per_second = data.declared_bytes, data.present_bytes, data.bytes_per_second or 1
        found_is = "the file holds only {:.2f} s"
    else:  # a WAV whose recorder left the size open: nothing to compare with
        return None
    tolerance = max(TRUNCATION_TOLERANCE["fraction"] * declared, TRUNCATION_TOLERANCE["seconds"] * per_second)
    if declared - found > tolerance:
        return f"truncated: the header says {declared / per_second:.2f} s, " + found_is.format(found / per_second)
    if joined_mp3s:
        return (f"the MP3 holds more than its header (Xing frame) counts, and only {found / per_second:.2f} s of "
                f"it decode: MP3s joined end to end? Re-encode the whole (e.g. ffmpeg -i in.mp3 out.flac)")
    if data is not None:  # a WAV-family header gives the data's size: only an AU file may hold more
        joined = "AU files" if data.au and data.present_bytes - data.declared_bytes > tolerance else None
    else:  # Ogg and FLAC streams chained one after another
        joined = joined_streams(path)
    if joined:
        return (f"the file holds more than its first part, and only its {decoded_frames / file_rate:.2f} s decode: "
                f"{joined} joined end to end? Keep the parts as files of their own, or join them by decoding "
                f"(sox part1.flac part2.flac whole.flac)")
    return ogg_truncation(path)


def joined_streams(path):
    """Which kind of stream a file holds several of, one after another (`cat a.ogg b.ogg`), or None:
    libsndfile decodes the first and says nothing of the rest. An Ogg stream that begins after one
    has ended (a chained Ogg), or a second FLAC stream header (fLaC, then a STREAMINFO block)."""
    import mmap

    with open(path, "rb") as handle:
        if handle.seek(0, 2) == 0:
            return None
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] == b"OggS":
                ended, at = False, 0
                while data[at:at + 4] == b"OggS" and at + 27 <= len(data):  # page by page, by their headers
                    flags, segments = data[at + 5], data[at + 26]
                    if flags & 0x02 and ended:  # a beginning of stream after an end of stream
                        return "Ogg files"
                    ended = ended or bool(flags & 0x04)
                    at += 27 + segments + sum(data[at + 27:at + 27 + segments])
                return None
            start = data.find(b"fLaC", 0, 1 << 16)  # after an ID3 tag, if any
            if start >= 0 and any(data[found + 4] & 0x7F == 0 and data[found + 5:found + 8] == b"\0\0\x22"
                                  for found in occurrences(data, b"fLaC", start + 4)):
                return "FLAC files"
    return None


def occurrences(data, pattern: bytes, start: int):
    """Where `pattern` occurs in `data` from `start` on (each followed by at least 4 bytes)."""
    while (found := data.find(pattern, start)) >= 0 and found + 8 <= len(data):
        yield found
        start = found + 1


@dataclass
class WavData:
    """The data chunk of a WAV-family file, as its header declares it and as the file holds it."""
    declared_bytes: int     # None: unknown (a recorder streaming the audio left the size open)
    present_bytes: int      # the bytes from the chunk's start to the end of the file
    bytes_per_second: int   # the format chunk's average byte rate (0 if there was none before the data)
    au: bool = False        # an AU file, whose data runs to the end: more bytes than declared were joined on


def wav_data(path):
    """WavData of a RIFF WAV, an RF64 or BW64 (WAVs over 4 GB: 64-bit sizes in a ds64 chunk), a
    Sony Wave64, an AIFF or AIFF-C, or an AU file; None for other files (or an unusual one)."""
    with open(path, "rb") as handle:
        head = handle.read(40)
        file_size = handle.seek(0, 2)
        if head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
            return riff_data(handle, file_size, 12, id_size=4, size_bytes=4, align=2)
        if head[:4] == b"riff" and head[24:28] == b"wave":  # Wave64: 16-byte ids, 64-bit sizes counting the header
            return riff_data(handle, file_size, 40, id_size=16, size_bytes=8, align=8)
        if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
            return aiff_data(handle, file_size)
        if head[:4] == b".snd" and len(head) >= 24:
            return au_data(head, file_size)
    return None


def aiff_data(handle, file_size: int):
    """An AIFF's sound data (SSND chunk), big-endian chunks padded to even sizes; its byte rate from the
    COMM chunk's frame count and rate (right for AIFF-C's compressed data too)."""
    declared = present = seconds = None
    handle.seek(12)
    while len(header := handle.read(8)) == 8:
        chunk, size = header[:4], int.from_bytes(header[4:], "big")
        start = handle.tell()
        if chunk == b"COMM":
            body = handle.read(min(size, 22))  # AIFF-C adds the compression type
            if len(body) >= 18:
                exponent, mantissa = int.from_bytes(body[8:10], "big") & 0x7FFF, int.from_bytes(body[10:18], "big")
                rate = mantissa * 2.0 ** (exponent - 16383 - 63)  # an 80-bit extended float
                frames = int.from_bytes(body[2:6], "big") * (64 if body[18:22] == b"ima4" else 1)  # ima4: packets
                seconds = frames / rate if rate > 0 else None
        elif chunk == b"SSND":
            offset = int.from_bytes(handle.read(4), "big")
            declared, present = size - 8 - offset, file_size - (start + 8 + offset)
        handle.seek(start + size + size % 2)
        if declared is not None and seconds is not None:
            break
    if declared is None:
        return None
    return WavData(declared, present, round(declared / seconds) if seconds else 0)


# Bytes a sample of each AU encoding takes (mu-law, 8/16/24/32-bit linear, float, double, A-law).
AU_SAMPLE_BYTES = {1: 1, 2: 1, 3: 2, 4: 3, 5: 4, 6: 4, 7: 8, 27: 1}


def au_data(head: bytes, file_size: int):
    """An AU (.au, .snd) file's data: big-endian offset, size (all ones: unknown), encoding, rate,
    channels. None for an encoding whose byte rate is not fixed here."""
    offset, size, encoding, rate, channels = (int.from_bytes(head[at:at + 4], "big") for at in range(4, 24, 4))
    if encoding not in AU_SAMPLE_BYTES:
        return None
    return WavData(None if size == 0xFFFFFFFF else size, file_size - offset, AU_SAMPLE_BYTES[encoding] * rate * channels,
                   au=True)


def riff_data(handle, file_size: int, offset: int, id_size: int, size_bytes: int, align: int):
    """Walk the chunks from `offset` to the data chunk. Chunk ids are told apart by their first 4 bytes."""
    header_size = id_size + size_bytes
    size_of_data, bytes_per_second = None, 0  # an RF64's ds64 chunk holds the real data size
    handle.seek(offset)
    while len(header := handle.read(header_size)) == header_size:
        chunk, size = header[:4], int.from_bytes(header[id_size:], "little")
        body = size - header_size if id_size == 16 else size  # Wave64 sizes count the chunk's header
        if chunk == b"ds64":
            size_of_data = int.from_bytes(handle.read(16)[8:16], "little")
            handle.seek(body - 16, 1)
        elif chunk == b"fmt ":
            bytes_per_second = struct.unpack("<I", handle.read(12)[8:12])[0]
            handle.seek(body - 12, 1)
        elif chunk == b"data":
            present = file_size - handle.tell()
            if size_bytes == 4 and size == 0xFFFFFFFF:  # RF64's placeholder, or a stream of unknown length
                body = size_of_data
            return WavData(body, present, bytes_per_second)
        else:
            handle.seek(body, 1)
        handle.seek(-handle.tell() % align, 1)
    return None


def ogg_truncation(path):
    """Why an Ogg file (Vorbis, Opus, FLAC in Ogg) is cut short, or None: its last page must be
    whole and carry the end-of-stream mark."""
    with open(path, "rb") as handle:
        if handle.read(4) != b"OggS":
            return None
        size = handle.seek(0, 2)
        handle.seek(max(0, size - 65536))  # a page is at most 65,307 bytes
        tail = handle.read()
    page = tail.rfind(b"OggS\0")  # the capture pattern and stream structure version 0
    header = tail[page:page + 27]
    table = tail[page + 27:page + 27 + header[26]] if len(header) == 27 else b""
    if page < 0 or len(header) < 27 or len(table) < header[26] or page + 27 + len(table) + sum(table) > len(tail):
        return "truncated: the file ends inside an Ogg page (cut short when copied or downloaded)"
    if not header[5] & 0x04:
        return "truncated: the Ogg stream stops before its last page (no end-of-stream mark)"
    return None


def unreadable(path, error: Exception) -> str:
    """What to say of a file that fails to decode; where its header was read, that it cannot be read
    whole (libsndfile gives up on a cut FLAC: "lost sync")."""
    try:
        seconds = duration_seconds(path)
    except Exception:  # soundfile raises several types for unreadable files
        return f"unreadable ({error})"
    return f"cannot be decoded whole ({error}); its header says {seconds:.2f} s: the file is cut short or damaged"


def duration_seconds(path) -> float:
    """Length of an audio file from its header, without decoding it."""
    with libsndfile(path):
        info = sf.info(str(path))
    return info.frames / info.samplerate


def probe(path) -> tuple:
    """(seconds, None) for a file whose header shows audio, else (None, (reason, problem))."""
    path = Path(path)
    if path.is_dir():
        return None, ("missing_audio", "is a folder, not an audio file")
    if not path.is_file():
        return None, ("missing_audio", "file not found")
    if path.stat().st_size == 0:
        return None, ("empty_audio", "the file is empty (0 bytes)")
    try:
        seconds = duration_seconds(path)
    except Exception as error:  # soundfile raises several types for unreadable files
        return None, ("unreadable_audio", f"unreadable ({error})")
    if seconds > 0:
        return seconds, None
    data = wav_data(path)
    # A recorder that streams the audio fills the size in last.
    if data is not None and data.declared_bytes == 0 and data.present_bytes > 0:
        return None, ("unreadable_audio", f"its header says it holds no samples, but {data.present_bytes} bytes of "
                                          f"audio follow: its recorder never finished writing it. Re-save it with the "
                                          f"length fixed (sox --ignore-length IN.wav OUT.wav)")
    return None, ("empty_audio", "holds no samples")


def reference_problem(path, sample_rate: int, length_problem=lambda seconds: None,
                      silence_dbfs: float = SILENCE_DBFS):
    """Why the file at `path` cannot be a reference clip, or None. A speaker's vector comes from its
    reference clips alone, so each must be readable, whole, finite, hold a voice, be recorded at a
    rate that keeps the upper half of the voice, and pass `length_problem` (seconds -> why not, or
    None: the caller's bounds)."""
    try:
        decoded = decode(path, sample_rate)
    except Exception as error:  # soundfile raises several types for unreadable files
        return unreadable(path, error)
    if decoded.truncated:
        return decoded.truncated
    if not decoded.finite:
        return "holds NaN or infinite samples"
    if decoded.cancelled:
        return decoded.cancelled
    if decoded.level_dbfs < silence_dbfs:
        return f"silent: level {decoded.level_dbfs:.1f} dBFS is below {silence_dbfs:g} dBFS"
    if decoded.file_rate < LOW_SAMPLE_RATE:
        return (f"recorded at {decoded.file_rate} Hz, below {LOW_SAMPLE_RATE} Hz: a speaker vector "
                f"from it misses the upper half of the voice")
    return length_problem(len(decoded.samples) / sample_rate)
