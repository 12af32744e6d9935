"""Reading audio files: any format soundfile reads, downmixed to mono, resampled with soxr."""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

# A sample at or beyond this magnitude counts as clipped: 16-bit full scale reads as 0.99997.
FULL_SCALE = 0.999


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
    audio = audio.mean(axis=1)
    if file_rate != sample_rate:
        audio = soxr.resample(audio, file_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(audio, dtype=np.float32)


def load_mono(path, sample_rate: int) -> np.ndarray:
    """The file's audio as float32 mono at `sample_rate`. Raises on unreadable or empty files."""
    return to_mono(*read_native(path), sample_rate)


def decode(path, sample_rate: int) -> DecodedAudio:
    """load_mono, plus what a data check needs: how much of the file is clipped, and how loud it is.

    Clipping is measured on the file's own samples: downmixing and resampling smooth clipped peaks.
    """
    audio, file_rate = read_native(path)
    clipped = float(np.count_nonzero(np.abs(audio) >= FULL_SCALE)) / audio.size
    samples = to_mono(audio, file_rate, sample_rate)
    rms = math.sqrt(float(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0
    level = 20 * math.log10(rms) if rms > 0 else -math.inf
    return DecodedAudio(samples, clipped, level)


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
