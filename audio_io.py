"""Reading audio files: any format soundfile reads, downmixed to mono, resampled with soxr."""

import numpy as np
import soundfile as sf
import soxr


def load_mono(path, sample_rate: int) -> np.ndarray:
    """The file's audio as float32 mono at `sample_rate`. Raises on unreadable or empty files."""
    audio, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    if audio.shape[0] == 0:
        raise ValueError("the file holds no samples")
    audio = audio.mean(axis=1)
    if file_rate != sample_rate:
        audio = soxr.resample(audio, file_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(audio, dtype=np.float32)


def duration_seconds(path) -> float:
    """Length of an audio file from its header, without decoding it."""
    info = sf.info(str(path))
    return info.frames / info.samplerate
