"""Synthetic recordings for the data-preparation tests, and a tiny random Whisper folder.

speech(): a formant-synthesised voice (a glottal pulse train through three vowel resonances, with
noise-burst consonants, in words and short gaps). The voice-activity detector hears it as speech
for as long as it lasts; tiny_model.synthetic_voice, a steady harmonic tone, it stops hearing
after a second or two, as it should.
"""

import json
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import lfilter

# (F1, F2, F3) of a few vowels, Hz
VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410)]


def resonance(signal: np.ndarray, frequency: float, bandwidth: float, rate: int) -> np.ndarray:
    radius = np.exp(-np.pi * bandwidth / rate)
    angle = 2 * np.pi * frequency / rate
    return lfilter([1 - radius], [1, -2 * radius * np.cos(angle), radius * radius], signal)


def syllable(rate: int, pitch: float, rng: np.random.Generator) -> np.ndarray:
    length = int(rng.uniform(0.12, 0.3) * rate)
    contour = pitch * (1 + 0.15 * np.linspace(rng.uniform(-1, 1), rng.uniform(-1, 1), length))
    contour *= 1 + 0.05 * rng.standard_normal(length).cumsum() / np.sqrt(np.arange(1, length + 1))  # jitter
    pulses = np.diff(np.floor(np.cumsum(contour / rate)), prepend=0.0)  # one pulse per period
    source = lfilter([1], [1, -0.97], pulses) + 0.2 * rng.standard_normal(length)  # breath
    vowel = sum(gain * resonance(source, frequency, bandwidth, rate) for frequency, bandwidth, gain
                in zip(VOWELS[rng.integers(len(VOWELS))], (80, 100, 150), (1.0, 0.6, 0.3)))
    vowel *= np.sqrt(np.hanning(length))
    vowel *= rng.uniform(0.5, 1.0) / (np.max(np.abs(vowel)) + 1e-9)  # stressed and unstressed
    if rng.random() < 0.6:  # a consonant: a burst of filtered noise before or after
        burst_length = int(rng.uniform(0.04, 0.1) * rate)
        burst = resonance(rng.standard_normal(burst_length), rng.uniform(2500, 6000), 1500, rate)
        burst *= 0.3 * np.hanning(burst_length) / (np.max(np.abs(burst)) + 1e-9)
        return np.concatenate([burst, vowel] if rng.random() < 0.5 else [vowel, burst])
    return vowel


def speech(seconds: float, rate: int = 24000, pitch: float = 140.0, seed: int = 0, level: float = 0.3) -> np.ndarray:
    """`seconds` of speech-like audio, float32 at `rate`, peaks near `level`."""
    rng = np.random.default_rng(seed)
    parts, total = [], 0
    while total < seconds * rate:
        word = np.concatenate([syllable(rate, pitch, rng) for _ in range(rng.integers(1, 4))])
        gap = np.zeros(int(rng.uniform(0.01, 0.08) * rate))
        parts += [word, gap]
        total += len(word) + len(gap)
    signal = np.concatenate(parts)[:int(seconds * rate)]
    return (level * signal + 0.002 * rng.standard_normal(len(signal))).astype(np.float32)


def room_tone(seconds: float, rate: int = 24000, seed: int = 0) -> np.ndarray:
    """Silence as a microphone records it: faint noise."""
    return (0.001 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)


def write(path, samples, rate=24000, **options) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, rate, **options)
    return path


def cut_short(path, keep_fraction: float) -> Path:
    """Keep only the first part of a file's bytes, as an interrupted copy or download does."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:int(len(data) * keep_fraction)])
    return Path(path)


WHISPER_SPECIAL_TOKENS = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>",
                          "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]


def write_tiny_whisper(folder) -> Path:
    """A random WhisperForConditionalGeneration with its processor, saved as a download is: what
    --asr_model loads. English-only, at most 24 tokens a transcript."""
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor, WhisperTokenizer)

    from qwen3_tts_sft.tiny_model import train_byte_level_bpe

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = train_byte_level_bpe()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = WhisperTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token="<|endoftext|>",
                                 bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens(WHISPER_SPECIAL_TOKENS, special_tokens=True)
    end, start = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>"])
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_source_positions=1500, max_target_positions=32,
                           pad_token_id=end, bos_token_id=end, eos_token_id=end, decoder_start_token_id=start)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start, eos_token_id=end, pad_token_id=end, max_length=24, is_multilingual=False,
        no_timestamps_token_id=tokenizer.convert_tokens_to_ids("<|notimestamps|>"), begin_suppress_tokens=[end])
    model.save_pretrained(folder)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(folder)
    return folder
