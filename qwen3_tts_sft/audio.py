"""The audio facts every command shares, and reading audio files.

Facts: the codec's frame rate, what counts as clipped, decibels below full scale, the speaking
rate. Files: any format soundfile reads, downmixed to mono, resampled with soxr. Light on purpose
(numpy, soundfile, soxr): prepare_codes.py and infer_test.py import it without the model code.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

FRAMES_PER_SECOND = 12.5  # the 12 Hz codec: one frame of 16 codes every 80 ms
# A sample at or beyond this magnitude counts as clipped: 16-bit full scale reads as 0.99997,
# and the speech decoder's output is clamped to [-1, 1].
CLIP_LEVEL = 0.999


def rms_dbfs(samples: np.ndarray) -> float:
    """RMS level in dB relative to full scale; -inf for digital silence or no samples."""
    rms = math.sqrt(float(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def clipped_fraction(samples: np.ndarray) -> float:
    """Share of the samples (any shape) at or beyond CLIP_LEVEL."""
    return float(np.count_nonzero(np.abs(samples) >= CLIP_LEVEL)) / samples.size if samples.size else 0.0


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """float32 samples at `to_rate` (soxr's high quality)."""
    if from_rate != to_rate:
        samples = soxr.resample(samples, from_rate, to_rate, quality="HQ")
    return np.ascontiguousarray(samples, dtype=np.float32)


class SpeakingRates:
    """Characters of text (as written: spaces and punctuation count) per second of audio, per speaker
    and over all clips. prepare_codes reports it; infer_test compares generated speech against it."""

    ALL = "*"  # key of the rate over every clip

    def __init__(self):
        self.totals = {}  # key -> [characters, seconds]

    def add(self, text: str, frames: int, speaker: str = None) -> None:
        for key in {self.ALL, speaker.strip().lower() if speaker else self.ALL}:
            total = self.totals.setdefault(key, [0, 0.0])
            total[0] += len(text)
            total[1] += frames / FRAMES_PER_SECOND

    def rates(self) -> dict:
        return {key: characters / seconds for key, (characters, seconds) in self.totals.items() if seconds > 0}


@dataclass
class DecodedAudio:
    samples: np.ndarray        # float32 mono at the requested rate
    clipped_fraction: float    # share of the file's samples (all channels) at full scale
    level_dbfs: float          # RMS level of `samples`, in dB below full scale (-inf for digital silence)

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.samples).all())


def read_native(path) -> tuple:
    """(samples [frames, channels] float32, the file's rate). Raises on unreadable or empty files."""
    audio, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    if audio.shape[0] == 0:
        raise ValueError("the file holds no samples")
    return audio, file_rate


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
    return DecodedAudio(samples, clipped_fraction(audio), rms_dbfs(samples))


def duration_seconds(path) -> float:
    """Length of an audio file from its header, without decoding it."""
    info = sf.info(str(path))
    return info.frames / info.samplerate


def probe(path) -> tuple:
    """(seconds, None) for a file whose header shows audio, else (None, (reason, problem))."""
    path = Path(path)
    if not path.is_file():
        return None, ("missing_audio", "file not found")
    try:
        seconds = duration_seconds(path)
    except Exception as error:  # soundfile raises several types for unreadable files
        return None, ("unreadable_audio", f"unreadable ({error})")
    return (seconds, None) if seconds > 0 else (None, ("empty_audio", "holds no samples"))
