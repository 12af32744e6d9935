"""Speech recognition for prepare_codes.py: transcripts for clips without text, and a check of the
text of those that have one.

--asr_model names a local transformers speech-recognition folder (a Whisper download, say). It is
loaded with transformers' own pipeline("automatic-speech-recognition"), the way the model card
shows, on prepare_codes' --device; clips are handed over as arrays at the model's own sample rate.

The check compares texts by character error rate (edit distance over the reference's length) after
normalise(): case, punctuation and spacing are not what a transcript mismatch is about.
"""

import json
import unicodedata
from pathlib import Path

from qwen3_tts_sft import audio
from qwen3_tts_sft.quiet import quiet_transformers

BATCH_SIZE = 16


class Transcriber:
    def __init__(self, model_path: str, device: str):
        from transformers import pipeline

        folder = Path(model_path)
        problem = model_problem(folder)
        if problem:
            raise SystemExit(f"error: --asr_model {model_path}: {problem}")
        with quiet_transformers():
            self.pipeline = pipeline("automatic-speech-recognition", model=str(folder), device=device)
        self.sample_rate = self.pipeline.feature_extractor.sampling_rate

    def __call__(self, clips: list, sample_rate: int) -> list:
        """The transcript of each clip (float32 mono at `sample_rate`), blank-trimmed; for a clip the
        recogniser fails on, why (an exception's type and message) in place of its text, as a Failure."""
        if not clips:
            return []
        inputs = [dict(raw=audio.resample(clip, sample_rate, self.sample_rate), sampling_rate=self.sample_rate)
                  for clip in clips]
        try:
            with quiet_transformers():
                return [printable(result["text"]) for result in self.pipeline(inputs, batch_size=BATCH_SIZE)]
        except Exception:  # one clip's failure must not stop the run: each alone, to find which
            return [self.one(clip) for clip in inputs]

    def one(self, clip: dict):
        try:
            with quiet_transformers():
                return printable(self.pipeline(clip)["text"])
        except Exception as error:
            return Failure(f"{type(error).__name__}: {error}")


def model_problem(model_path) -> str:
    """Why `model_path` is not a folder transformers' speech-recognition pipeline loads, or None. The
    commands check it before any work: the pipeline itself says so late, in a traceback about AutoModel
    classes (the Qwen3-TTS model folder, say, has a config.json and a preprocessor_config.json too)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CTC_MAPPING_NAMES, MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES

    folder = Path(model_path)
    if not folder.is_dir():
        return "no such folder" if not folder.exists() else "a file, not the model's folder"
    needed = [name for name in ("config.json", "preprocessor_config.json") if not (folder / name).is_file()]
    if needed:
        return (f"not a transformers speech-recognition folder: no {' or '.join(needed)} there (it needs "
                f"config.json, preprocessor_config.json and the weights, as a Whisper download has)")
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        return f"its config.json does not read as a model's ({type(error).__name__}: {error})"
    known = {**MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES, **MODEL_FOR_CTC_MAPPING_NAMES}
    if model_type not in known:
        return (f"a {model_type!r} model, not a speech-recognition one (transformers transcribes with whisper, "
                f"wav2vec2, hubert and {len(known) - 3} other types): pass a Whisper download")
    return None


class Failure(str):
    """Why speech recognition failed on a clip, where its transcript would be."""


def printable(text: str) -> str:
    """The text without control characters, its spacing collapsed (a recogniser can emit both)."""
    text = "".join(" " if unicodedata.category(char).startswith("C") else char for char in text)
    return " ".join(text.replace("\ufffd", " ").split())


def normalise(text: str) -> str:
    """Lower-case letters and digits with their marks, single-spaced: what the character error rate compares."""
    characters = []
    for character in unicodedata.normalize("NFKC", text).lower():
        if audio.optional_mark(character):
            continue
        mark = unicodedata.category(character).startswith("M")
        # A combining mark is part of its word (a Hindi vowel sign, a Thai tone mark); punctuation is not.
        characters.append(character if character.isalnum() or character.isspace() or mark else " ")
    return " ".join("".join(characters).split())


def character_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance between the normalised texts, spacing aside (Chinese, Japanese and Thai
    are written without spaces, a recogniser may add some: "你好，世界" heard as "你好世界" is right), over
    the reference's length. The one CER of prepare_codes --asr_check, infer_test and the evaluations."""
    reference, hypothesis = (normalise(text).replace(" ", "") for text in (reference, hypothesis))
    if not reference:
        return 0.0 if not hypothesis else 1.0
    previous = list(range(len(hypothesis) + 1))
    for row, expected in enumerate(reference, start=1):
        current = [row]
        for column, heard in enumerate(hypothesis, start=1):
            current.append(min(previous[column] + 1, current[column - 1] + 1,
                               previous[column - 1] + (expected != heard)))
        previous = current
    return previous[-1] / len(reference)
