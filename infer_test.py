"""Speak test sentences with a fine-tuned checkpoint, measure them, and exit non-zero when a check fails.

    python infer_test.py --model_path output/checkpoint-epoch-0 --speaker my_speaker

Per sentence: duration, real-time factor, whether codec_eos came before the frame cap, loudness,
silence and clipping. Per speaker: speaking rate against the training data's, speaker similarity
(cosine between the x-vector of the generated audio and the speaker's vector in the checkpoint),
and, with --asr_model, the character error rate. Wavs, report.json and a table go to --out_dir.
Exit status: 0 when every check passes, 1 when one fails (report.json says which and by how
much), 2 when the check could not run (bad arguments, missing files, or an error).
README_CHATTERBOX_STYLE.md explains the report.
"""

import argparse
import json
import math
import re
import sys
import time
import traceback
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from qwen3_tts_sft import checkpoint
from qwen3_tts_sft.speakers import MEL_SETTINGS, speaker_vectors, waveform_mel
from qwen3_tts_sft import audio
from qwen3_tts_sft.audio import CLIP_LEVEL, FRAMES_PER_SECOND, SpeakingRates

# Built-in test sentences: a statement, a pangram-like line, a short question and a long request.
SENTENCES = {
    "english": ["Hello, this is a short test of my fine-tuned voice.",
                "The quick brown fox jumps over the lazy dog.",
                "How are you today?",
                "Please call me back before six o'clock, and bring the blue folder with you."],
    "chinese": ["你好，这是对我微调后声音的一个简短测试。", "今天天气很好，我们一起去公园散步吧。",
                "你今天过得怎么样？", "请在六点之前给我回电话，并把那个蓝色的文件夹带来。"],
    "german": ["Hallo, dies ist ein kurzer Test meiner angepassten Stimme.",
               "Der schnelle braune Fuchs springt über den faulen Hund.", "Wie geht es dir heute?",
               "Bitte ruf mich vor sechs Uhr zurück und bring die blaue Mappe mit."],
    "spanish": ["Hola, esta es una prueba corta de mi voz ajustada.",
                "El veloz zorro marrón salta sobre el perro perezoso.", "¿Cómo estás hoy?",
                "Por favor, llámame antes de las seis y trae la carpeta azul."],
    "french": ["Bonjour, ceci est un court essai de ma voix personnalisée.",
               "Le renard brun rapide saute par-dessus le chien paresseux.", "Comment allez-vous aujourd'hui ?",
               "Rappelle-moi avant six heures, s'il te plaît, et apporte le dossier bleu."],
    "italian": ["Ciao, questa è una breve prova della mia voce personalizzata.",
                "La volpe marrone veloce salta sopra il cane pigro.", "Come stai oggi?",
                "Per favore, richiamami prima delle sei e porta la cartella blu."],
    "portuguese": ["Olá, este é um pequeno teste da minha voz ajustada.",
                   "A rápida raposa marrom pula sobre o cão preguiçoso.", "Como você está hoje?",
                   "Por favor, me ligue antes das seis e traga a pasta azul."],
    "japanese": ["こんにちは、これは調整した私の声の短いテストです。",
                 "今日はとても良い天気なので、公園を散歩しましょう。", "今日の調子はどうですか？",
                 "六時までに折り返し電話をして、青いファイルを持ってきてください。"],
    "korean": ["안녕하세요, 이것은 제 목소리를 조정한 짧은 테스트입니다.",
               "오늘은 날씨가 좋아서 공원을 산책하고 싶어요.", "오늘 기분이 어떠세요?",
               "여섯 시 전에 다시 전화해 주시고 파란 폴더를 가져와 주세요."],
    "russian": ["Привет, это короткая проверка моего настроенного голоса.",
                "Быстрая коричневая лиса прыгает через ленивую собаку.", "Как у тебя дела сегодня?",
                "Пожалуйста, перезвони мне до шести часов и принеси синюю папку."],
}
SENTENCES["auto"] = SENTENCES["english"]

SILENT_WINDOW_SECONDS = 0.05
SILENT_WINDOW_DBFS = -50.0   # a 50 ms window quieter than this is silence (pauses, not soft consonants)
DBFS_FLOOR = -120.0          # reported for digital silence instead of -inf
ALL_SPEAKERS = SpeakingRates.ALL  # key of the whole training set's rate


@dataclass
class Thresholds:
    """Defaults are loose on purpose: each one flags a defect a listener hears, not a style."""

    min_rms_dbfs: float = -40.0            # speech sits near -30..-15 dBFS; 10 dB under quiet speech is broken
    max_silent_fraction: float = 0.5       # read speech pauses for well under half of a sentence
    max_clipped_fraction: float = 0.001    # 24 clipped samples a second at 24 kHz are already audible crackle
    max_rate_ratio: float = 1.5            # sessions differ by 20-30% in rate; 2x is the "too fast/slow" complaint
    max_sentence_rate_ratio: float = 3.0   # one sentence is noisier (pauses, length); 3x is cut off or drawn out
    min_speaker_similarity: float = 0.5    # the usual same/different-speaker boundary for ECAPA x-vectors
    max_cer: float = 0.2                   # ASR of clean TTS speech is usually well under 10% CER


@dataclass
class Failure:
    check: str
    speaker: str
    sentence: int       # index in the sentence list; None for a check of all the speaker's sentences
    value: float
    limit: float
    message: str


def stop(message: str):
    """The check cannot run: say why, exit 2 (1 is kept for failed checks)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------
# Measurements on arrays
# ---------------------------------------------------------------------------------------------

def dbfs(samples: np.ndarray) -> float:
    """audio.rms_dbfs, with DBFS_FLOOR for silence (a report holds no -inf)."""
    return max(DBFS_FLOOR, audio.rms_dbfs(samples))


def measure_audio(wav: np.ndarray, sample_rate: int) -> dict:
    """Duration, finiteness, RMS level, silent fraction (of 50 ms windows) and clipped fraction."""
    finite = bool(np.isfinite(wav).all())
    samples = np.nan_to_num(np.asarray(wav, dtype=np.float64), nan=0.0, posinf=1.0, neginf=-1.0)
    window = max(1, int(SILENT_WINDOW_SECONDS * sample_rate))
    count = len(samples) // window
    window_rms = np.sqrt((samples[:count * window].reshape(count, window) ** 2).mean(axis=1))
    silent = list(20 * np.log10(np.maximum(window_rms, 1e-12)) < SILENT_WINDOW_DBFS)
    return dict(
        seconds=len(samples) / sample_rate,
        finite=finite,
        rms_dbfs=dbfs(samples),
        silent_fraction=float(np.mean(silent)) if silent else 1.0,
        clipped_fraction=audio.clipped_fraction(samples),
    )


def stopped_before_cap(frames: int, max_new_tokens: int) -> bool:
    """Whether codec_eos came. qwen_tts expands a generated token into its 16 codes only when the
    token is fed back, so a run that never stops returns max_new_tokens - 1 frames."""
    return frames < max_new_tokens - 1


def auto_frame_cap(texts: list) -> int:
    """Default max_new_tokens: 5 s plus 0.5 s a character, several times any natural reading."""
    return math.ceil(FRAMES_PER_SECOND * (5 + max(len(text) for text in texts) / 2))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def normalize_for_cer(text: str) -> str:
    """Lower case, no punctuation or symbols, single spaces: ASR punctuation is not an error."""
    return " ".join("".join(c for c in text.lower() if unicodedata.category(c)[0] not in "PS").split())


def character_error_rate(reference: str, hypothesis: str) -> float:
    """Edit distance (insertions, deletions, substitutions) over the reference length, normalized."""
    reference, hypothesis = normalize_for_cer(reference), normalize_for_cer(hypothesis)
    previous = list(range(len(hypothesis) + 1))
    for i, ref_char in enumerate(reference, start=1):
        current = [i]
        for j, hyp_char in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_char != hyp_char)))
        previous = current
    return previous[-1] / max(1, len(reference))


def finite_at_rate(wav: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """float32 samples at `target_rate`, NaN and infinities zeroed (the model needs finite input)."""
    samples = np.nan_to_num(np.asarray(wav, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return audio.resample(samples, sample_rate, target_rate)


def speaker_similarity(encoder, encoder_rate: int, wav: np.ndarray, sample_rate: int, vector: torch.Tensor):
    """Cosine between the speaker encoder's x-vector of `wav` and `vector`; None when the audio is
    too short for one mel frame."""
    samples = finite_at_rate(wav, sample_rate, encoder_rate)
    if len(samples) < MEL_SETTINGS["n_fft"]:
        return None
    with torch.inference_mode():
        xvector = speaker_vectors(encoder, [[waveform_mel(samples, encoder_rate)]])[0]
    return cosine(xvector.cpu(), vector)


# ---------------------------------------------------------------------------------------------
# The training data's speaking rate
# ---------------------------------------------------------------------------------------------

def training_rates(jsonl_path: Path, default_speaker: str = None) -> dict:
    """Speaking rates of a codes JSONL: {speaker: rate, ALL_SPEAKERS: rate of all rows} (see SpeakingRates)."""
    rates = SpeakingRates()
    with open(jsonl_path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rates.add(row["text"], len(row["audio_codes"]), row.get("speaker") or default_speaker)
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                stop(f"{jsonl_path}:{line_number}: not a codes row with text and audio_codes ({error})")
    result = rates.rates()
    if ALL_SPEAKERS not in result:
        stop(f"{jsonl_path}: no rows with audio")
    return result


def summary_rate(path: Path) -> dict:
    """Rates from a prepare_codes summary JSON: the top-level `characters_per_second`, and each
    `speakers.NAME.characters_per_second` there is."""
    try:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        stop(f"--data_summary {path}: {error}")

    def positive(value):
        return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0

    rate = summary.get("characters_per_second") if isinstance(summary, dict) else None
    if not positive(rate):
        stop(f"--data_summary {path}: needs a positive number under characters_per_second, found {rate!r}")
    speakers = summary.get("speakers") if isinstance(summary.get("speakers"), dict) else {}
    rates = {str(name).lower(): float(entry["characters_per_second"]) for name, entry in speakers.items()
             if isinstance(entry, dict) and positive(entry.get("characters_per_second"))}
    return dict(rates, **{ALL_SPEAKERS: float(rate)})


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

def sentence_failures(sentence: dict, limits: Thresholds) -> list:
    """Checks of one sentence: each is a defect a listener hears in that sentence alone."""
    def fail(check, value, limit, message):
        failures.append(Failure(check, sentence["speaker"], sentence["index"], value, limit, message))

    failures = []
    if not sentence["finite"]:
        fail("finite", False, True, "the audio holds NaN or infinite samples")
    if not sentence["stopped"]:
        fail("stop", sentence["frames"], sentence["max_new_tokens"],
             f"no codec_eos within max_new_tokens {sentence['max_new_tokens']}: generation ran to the cap "
             f"({sentence['frames']} frames, {sentence['seconds']:.1f} s)")
    if sentence["rms_dbfs"] < limits.min_rms_dbfs:
        fail("rms", sentence["rms_dbfs"], limits.min_rms_dbfs,
             f"RMS {sentence['rms_dbfs']:.1f} dBFS is {limits.min_rms_dbfs - sentence['rms_dbfs']:.1f} dB "
             f"below the {limits.min_rms_dbfs:.1f} dBFS minimum")
    if sentence["silent_fraction"] > limits.max_silent_fraction:
        fail("silence", sentence["silent_fraction"], limits.max_silent_fraction,
             f"{sentence['silent_fraction']:.0%} of the audio is silent (limit {limits.max_silent_fraction:.0%})")
    if sentence["clipped_fraction"] > limits.max_clipped_fraction:
        fail("clipping", sentence["clipped_fraction"], limits.max_clipped_fraction,
             f"{sentence['clipped_fraction']:.2%} of samples are clipped (limit {limits.max_clipped_fraction:.2%})")
    ratio = sentence["rate_ratio"]
    if ratio is not None and not 1 / limits.max_sentence_rate_ratio <= ratio <= limits.max_sentence_rate_ratio:
        fail("sentence_rate", ratio, limits.max_sentence_rate_ratio,
             f"this sentence runs at {ratio:.2f}x the training rate (allowed {1 / limits.max_sentence_rate_ratio:.2f}x "
             f"to {limits.max_sentence_rate_ratio:.2f}x): cut short or drawn out")
    return failures


def speaker_failures(summary: dict, limits: Thresholds) -> list:
    """Checks of a speaker's sentences together: rate, similarity and CER are noisy per sentence."""
    def fail(check, value, limit, message):
        failures.append(Failure(check, summary["speaker"], None, value, limit, message))

    failures = []
    ratio = summary["rate_ratio"]
    if ratio is not None and not 1 / limits.max_rate_ratio <= ratio <= limits.max_rate_ratio:
        fail("rate", ratio, limits.max_rate_ratio,
             f"speaks {ratio:.2f}x the training rate ({summary['characters_per_second']:.1f} vs "
             f"{summary['training_characters_per_second']:.1f} chars/s; allowed "
             f"{1 / limits.max_rate_ratio:.2f}x to {limits.max_rate_ratio:.2f}x)")
    similarity = summary["speaker_similarity"]
    if similarity is None or not similarity >= limits.min_speaker_similarity:
        shown = "could not be measured" if similarity is None else f"{similarity:.3f}"
        fail("speaker_similarity", similarity, limits.min_speaker_similarity,
             f"speaker similarity {shown} is below the {limits.min_speaker_similarity:.2f} minimum")
    if summary["cer"] is not None and summary["cer"] > limits.max_cer:
        fail("cer", summary["cer"], limits.max_cer,
             f"character error rate {summary['cer']:.1%} is above the {limits.max_cer:.0%} limit")
    return failures


def mean_of(values) -> float:
    values = [value for value in values if value is not None]
    return float(np.mean(values)) if values else None


def training_rate_for(rates: dict, name: str):
    """The speaker's own training rate, else the whole training set's, else None."""
    return (rates or {}).get(name, (rates or {}).get(ALL_SPEAKERS))


def summarize_speaker(name: str, sentences: list, rates: dict) -> dict:
    characters = sum(len(s["text"]) for s in sentences)
    seconds = sum(s["seconds"] for s in sentences)
    rate = characters / seconds if seconds > 0 else None
    training_rate = training_rate_for(rates, name)
    similarity = mean_of(s["speaker_similarity"] for s in sentences)
    base_similarity = mean_of(s.get("base_speaker_similarity") for s in sentences)
    return dict(
        speaker=name, sentences=len(sentences), seconds=seconds, characters_per_second=rate,
        training_characters_per_second=training_rate,
        rate_ratio=rate / training_rate if rate and training_rate else None,
        speaker_similarity=similarity, base_speaker_similarity=base_similarity,
        similarity_gain=similarity - base_similarity if None not in (similarity, base_similarity) else None,
        cer=mean_of(s.get("cer") for s in sentences),
    )


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def load_model(model_path, device):
    from qwen_tts import Qwen3TTSModel

    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return Qwen3TTSModel.from_pretrained(str(model_path), dtype=dtype, device_map=device)


def load_speaker_encoder(config, model_path: Path, base_path, device):
    """The speaker encoder (fp32) from the checkpoint's speaker_encoder.safetensors, else from the
    base model's weights. Returns (encoder, where its weights came from)."""
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSSpeakerEncoder

    try:
        weights, files = checkpoint.speaker_encoder_weights(model_path, base_path)
    except FileNotFoundError as error:
        stop(f"{error}; pass --base_model_path" if not base_path else str(error))
    encoder = Qwen3TTSSpeakerEncoder(config.speaker_encoder_config)
    encoder.load_state_dict(weights)
    return encoder.to(device).eval(), str(files[0].parent if len(files) > 1 else files[0])


def speak(tts, generate):
    """Run `generate()` (a generate_* call of `tts`); also return each sample's frame count, as
    handed to the speech decoder (generate() cuts each sample at codec_eos), and the seconds taken."""
    handed = []
    decoder = tts.model.speech_tokenizer
    decode = decoder.decode
    decoder.decode = lambda encoded: handed.extend(encoded) or decode(encoded)
    started = time.perf_counter()
    try:
        wavs, sample_rate = generate()
    finally:
        decoder.decode = decode
    return wavs, sample_rate, [len(item["audio_codes"]) for item in handed], time.perf_counter() - started


def speak_in_batches(tts, items: list, args, call):
    """Yield (item, wav, sample_rate, frames, max_new_tokens, rtf) for each (speaker, index, text) item;
    `call(texts, speakers, options)` generates one batch."""
    torch.manual_seed(args.seed)
    for start in range(0, len(items), args.batch_size):
        batch = items[start:start + args.batch_size]
        cap = args.max_new_tokens or auto_frame_cap([text for _, _, text in batch])
        options = dict(language=args.language, non_streaming_mode=args.non_streaming_mode == "true",
                       max_new_tokens=cap)
        if args.greedy:
            options.update(do_sample=False, subtalker_dosample=False)
        texts, names = [text for _, _, text in batch], [name for name, _, _ in batch]
        wavs, sample_rate, frames, seconds = speak(tts, lambda: call(texts, names, options))
        rtf = seconds / max(sum(len(wav) for wav in wavs) / sample_rate, 1e-9)
        for item, wav, count in zip(batch, wavs, frames):
            yield item, wav, sample_rate, count, cap, rtf


def load_asr(path, device):
    """A transcriber (wav, sample_rate) -> text from a local transformers speech-recognition model."""
    from transformers import pipeline

    recognizer = pipeline("automatic-speech-recognition", model=str(path), device=device)
    rate = recognizer.feature_extractor.sampling_rate

    def transcribe(wav, sample_rate):
        return recognizer({"raw": finite_at_rate(wav, sample_rate, rate), "sampling_rate": rate})["text"].strip()
    return transcribe


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="a checkpoint folder written by sft_12hz_chatterbox.py")
    parser.add_argument("--speaker", action="append",
                        help="speaker to test (repeatable); default: every speaker the checkpoint was trained on")
    parser.add_argument("--language", default="auto", help="passed to generation; picks the built-in sentences")
    parser.add_argument("--text", action="append", help="sentence to speak (repeatable); default: built-in set")
    parser.add_argument("--text_file", help="UTF-8 file of sentences, one a line (with or instead of --text)")
    parser.add_argument("--out_dir", help="where wavs and report.json go (default: MODEL_PATH/infer_test)")
    parser.add_argument("--batch_size", type=int, default=4, help="sentences generated together")
    parser.add_argument("--non_streaming_mode", default="true", choices=["true", "false"],
                        help="generate_custom_voice's text layout: true (its default) gives the talker all "
                             "the text before the first frame; false feeds it along with the frames")
    parser.add_argument("--greedy", action="store_true", help="no sampling: the same codes every run")
    parser.add_argument("--max_new_tokens", type=int, default=0,
                        help="frame cap (12.5 a second); 0: 5 s + 0.5 s a character of the batch's longest text")
    parser.add_argument("--device", help="cuda, cpu (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0)
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--train_jsonl", help="codes JSONL whose speaking rate is the target "
                                            "(default: the checkpoint's training data, if the file is still there)")
    rate.add_argument("--data_summary", help="prepare_codes OUTPUT.summary.json: its characters_per_second "
                                             "(overall and per speaker) is the target")
    parser.add_argument("--base_model_path", help="base model: the speaker encoder when the checkpoint has none, "
                                                  "and --compare_base (default: the trainer's --init_model_path)")
    parser.add_argument("--compare_base", action="store_true",
                        help="also speak with the base model given the same speaker vector, to show the gain")
    parser.add_argument("--asr_model", help="local transformers speech-recognition model folder: adds a CER check")
    parser.add_argument("--report_only", action="store_true", help="exit 0 even when checks fail")
    limits = parser.add_argument_group("thresholds")
    limits.add_argument("--min_rms_dbfs", type=float, default=Thresholds.min_rms_dbfs,
                        help="each sentence's RMS level at least this (speech is about -30 to -15 dBFS)")
    limits.add_argument("--max_silent_fraction", type=float, default=Thresholds.max_silent_fraction,
                        help=f"at most this fraction of a sentence's 50 ms windows below {SILENT_WINDOW_DBFS:.0f} dBFS")
    limits.add_argument("--max_clipped_fraction", type=float, default=Thresholds.max_clipped_fraction,
                        help=f"at most this fraction of a sentence's samples at |x| >= {CLIP_LEVEL}")
    limits.add_argument("--max_rate_ratio", type=float, default=Thresholds.max_rate_ratio,
                        help="a speaker's chars/s within this factor of the training rate, either way")
    limits.add_argument("--max_sentence_rate_ratio", type=float, default=Thresholds.max_sentence_rate_ratio,
                        help="each sentence's chars/s within this factor of the training rate (catches cut-off "
                             "and drawn-out sentences; wider, as one sentence's rate is noisy)")
    limits.add_argument("--min_speaker_similarity", type=float, default=Thresholds.min_speaker_similarity,
                        help="a speaker's mean x-vector cosine to its checkpoint vector at least this")
    limits.add_argument("--max_cer", type=float, default=Thresholds.max_cer,
                        help="a speaker's mean character error rate (with --asr_model) at most this")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.max_new_tokens and args.max_new_tokens < 3:
        parser.error("--max_new_tokens must be at least 3: generation makes at least 2 frames")
    if min(args.max_rate_ratio, args.max_sentence_rate_ratio) < 1:
        parser.error("--max_rate_ratio and --max_sentence_rate_ratio are factors either way: at least 1")
    return args


def read_sentences(args) -> list:
    sentences = list(args.text or [])
    if args.text_file:
        try:
            lines = Path(args.text_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            stop(f"--text_file {args.text_file}: {error}")
        sentences += [line.strip() for line in lines if line.strip()]
        if not sentences:
            stop(f"--text_file {args.text_file} holds no sentences")
    if sentences:
        return sentences
    if args.language.lower() not in SENTENCES:
        stop(f"no built-in sentences for language {args.language!r} (there are {', '.join(sorted(SENTENCES))}); "
             f"pass --text or --text_file")
    return SENTENCES[args.language.lower()]


def find_training_rates(args, flags: dict):
    """(rates, where they came from), or (None, why there are none)."""
    if args.data_summary:
        return summary_rate(args.data_summary), args.data_summary
    if args.train_jsonl and not Path(args.train_jsonl).is_file():
        stop(f"--train_jsonl {args.train_jsonl}: file not found")
    path = args.train_jsonl or flags.get("train_jsonl")
    if not path or not Path(path).is_file():
        return None, "no training data found: pass --train_jsonl or --data_summary"
    return training_rates(Path(path), flags.get("speaker_name")), str(path)


def checkpoint_speaker_vectors(tts, requested: list, state, model_path: Path) -> dict:
    """{speaker: its vector (the talker's codec embedding row, where generation reads it)}."""
    spk_id = {name.lower(): codec_id for name, codec_id in (tts.model.config.talker_config.spk_id or {}).items()}
    trained = [s["name"] for s in state.speakers] if state else []
    names = [name.lower() for name in requested or trained or spk_id]
    unknown = [name for name in names if name not in spk_id]
    if not names or unknown:
        stop(f"speaker {', '.join(unknown) or '(none)'} is not in {model_path}; it has: {', '.join(sorted(spk_id))}")
    rows = tts.model.talker.get_input_embeddings().weight
    return {name: rows[spk_id[name]].detach().float().cpu() for name in dict.fromkeys(names)}


def describe_sentence(item, wav, sample_rate, frames, cap, rtf, training_rate) -> dict:
    name, index, text = item
    audio = measure_audio(wav, sample_rate)
    rate = len(text) / audio["seconds"] if audio["seconds"] else None
    return dict(speaker=name, index=index, text=text, frames=frames, max_new_tokens=cap,
                stopped=stopped_before_cap(frames, cap), **audio, rtf=rtf, characters_per_second=rate,
                rate_ratio=rate / training_rate if rate and training_rate else None)


def speak_and_measure(tts, items, args, rates, vectors, encoder_and_rate, out_dir):
    """Speak every (speaker, index, text) item with the checkpoint, write its wav and measure it.
    Returns (sentence dicts, [(wav, sample_rate)])."""
    def custom_voice(texts, names, options):
        return tts.generate_custom_voice(texts, speaker=names, **options)

    sentences, wavs = [], []
    for item, wav, sample_rate, frames, cap, rtf in speak_in_batches(tts, items, args, custom_voice):
        name, index, _ = item
        sentence = describe_sentence(item, wav, sample_rate, frames, cap, rtf, training_rate_for(rates, name))
        file_stem = re.sub(r"[^\w.-]", "_", name)  # a speaker name may hold characters a file name cannot
        sentence["wav"] = str(out_dir / f"{file_stem}_{index:02d}.wav")
        sf.write(sentence["wav"], np.nan_to_num(wav), sample_rate)
        sentence["speaker_similarity"] = speaker_similarity(*encoder_and_rate, wav, sample_rate, vectors[name])
        sentences.append(sentence)
        wavs.append((wav, sample_rate))
    return sentences, wavs


def main(argv=None):
    args = parse_args(argv)
    limits = Thresholds(**{name: getattr(args, name) for name in Thresholds.__dataclass_fields__})
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_path = Path(args.model_path)
    if not (model_path / "config.json").is_file():
        stop(f"{model_path} is not a model folder (no config.json)")
    if args.asr_model and not Path(args.asr_model).exists():
        stop(f"--asr_model {args.asr_model}: not found")
    state = checkpoint.read_trainer_state(model_path) if checkpoint.has_trainer_state(model_path) else None
    flags = state.flags if state else {}
    base_path = args.base_model_path or flags.get("init_model_path")
    if args.compare_base and not base_path:
        stop("--compare_base needs the base model: pass --base_model_path")
    texts = read_sentences(args)
    rates, rate_source = find_training_rates(args, flags)
    out_dir = Path(args.out_dir or model_path / "infer_test")
    out_dir.mkdir(parents=True, exist_ok=True)

    tts = load_model(model_path, device)
    languages = tts.get_supported_languages()
    if languages is not None and args.language.lower() not in languages:
        stop(f"--language {args.language} is not one of the model's: {', '.join(languages)}")
    vectors = checkpoint_speaker_vectors(tts, args.speaker, state, model_path)
    encoder, encoder_source = load_speaker_encoder(tts.model.config, model_path, base_path, device)
    encoder_rate = tts.model.config.speaker_encoder_config.sample_rate
    items = [(name, index, text) for name in vectors for index, text in enumerate(texts)]
    sentences, wavs = speak_and_measure(tts, items, args, rates, vectors, (encoder, encoder_rate), out_dir)
    del tts

    if args.compare_base:
        compare_with_base(base_path, device, items, args, vectors, sentences, (encoder, encoder_rate), out_dir)
    if args.asr_model:
        transcribe = load_asr(args.asr_model, device)
        for sentence, (wav, sample_rate) in zip(sentences, wavs):
            sentence["transcript"] = transcribe(wav, sample_rate)
            sentence["cer"] = character_error_rate(sentence["text"], sentence["transcript"])

    summaries = [summarize_speaker(name, [s for s in sentences if s["speaker"] == name], rates)
                 for name in vectors]
    failures = [f for s in sentences for f in sentence_failures(s, limits)]
    failures += [f for summary in summaries for f in speaker_failures(summary, limits)]
    skipped = dict.fromkeys(["sentence_rate", "rate"], rate_source) if rates is None else {}
    if not args.asr_model:
        skipped["cer"] = "no --asr_model given"
    failed_checks = {f.check for f in failures}
    audio_seconds = sum(s["seconds"] for s in sentences)
    generation_seconds = sum(s["rtf"] * s["seconds"] for s in sentences)
    report = dict(
        passed=not failures,
        checks={check: "skipped" if check in skipped else "failed" if check in failed_checks else "passed"
                for check in CHECKS},
        failures=[asdict(f) for f in failures], skipped=skipped,
        model_path=str(model_path), device=device, language=args.language,
        non_streaming_mode=args.non_streaming_mode == "true", greedy=args.greedy, seed=args.seed,
        thresholds=asdict(limits), training_rate=dict(source=rate_source if rates else None, characters_per_second=rates),
        speaker_encoder=encoder_source, base_model_path=base_path if args.compare_base else None,
        asr_model=args.asr_model,
        overall=dict(sentences=len(sentences), seconds=audio_seconds, generation_seconds=generation_seconds,
                     rtf=generation_seconds / audio_seconds if audio_seconds else None),
        speakers=summaries, sentences=sentences,
    )
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print_table(report, out_dir)
    if failures and not args.report_only:
        raise SystemExit(1)


def compare_with_base(base_path, device, items, args, vectors, sentences, encoder_and_rate, out_dir):
    """Speak the same items with the base model given the same speaker vector (x-vector-only voice
    clone): what the speaker vector alone achieved before fine-tuning."""
    from qwen_tts.inference.qwen3_tts_model import VoiceClonePromptItem

    base = load_model(base_path, device)
    if base.model.tts_model_type != "base":
        stop(f"--compare_base: {base_path} is a {base.model.tts_model_type} model, not a Base model")

    def clone(texts, names, options):
        prompts = [VoiceClonePromptItem(ref_code=None, ref_spk_embedding=vectors[name], x_vector_only_mode=True,
                                        icl_mode=False) for name in names]
        return base.generate_voice_clone(texts, voice_clone_prompt=prompts, **options)
    (out_dir / "base").mkdir(exist_ok=True)
    for sentence, (_, wav, sample_rate, _, _, _) in zip(sentences, speak_in_batches(base, items, args, clone)):
        sf.write(out_dir / "base" / Path(sentence["wav"]).name, np.nan_to_num(wav), sample_rate)
        sentence["base_speaker_similarity"] = speaker_similarity(*encoder_and_rate, wav, sample_rate,
                                                                 vectors[sentence["speaker"]])


CHECKS = ["finite", "stop", "rms", "silence", "clipping", "sentence_rate", "rate", "speaker_similarity", "cer"]
TABLE = [("speaker", "<14", "speaker", ".13"), ("#", ">4", "index", ""), ("sec", ">7", "seconds", ".2f"),
         ("stop", ">6", "stop", ""), ("rms dB", ">8", "rms_dbfs", ".1f"), ("silent", ">8", "silent_fraction", ".0%"),
         ("clip", ">7", "clipped_fraction", ".1%"), ("chars/s", ">9", "characters_per_second", ".1f"),
         ("x train", ">9", "rate_ratio", ".2f"), ("similar", ">9", "speaker_similarity", ".3f"),
         ("base", ">7", "base_speaker_similarity", ".3f"), ("cer", ">6", "cer", ".0%")]


def print_table(report: dict, out_dir: Path):
    """One line a sentence, one a speaker (#: all) with every check its sentences failed, then details."""
    failed = {}
    for failure in report["failures"]:
        for key in {(failure["speaker"], failure["sentence"]), (failure["speaker"], "all")}:
            failed.setdefault(key, []).append(failure["check"])
    print("".join(format(title, align) for title, align, _, _ in TABLE) + "  result")
    rows = [dict(s, stop="yes" if s["stopped"] else "NO") for s in report["sentences"]]
    for row in rows + [dict(s, index="all") for s in report["speakers"]]:
        cells = ["-" if row.get(key) is None else format(row[key], form) for _, _, key, form in TABLE]
        checks = failed.get((row["speaker"], row["index"]))
        result = "FAIL " + ",".join(dict.fromkeys(checks)) if checks else "ok"
        print("".join(format(cell, align) for cell, (_, align, _, _) in zip(cells, TABLE)) + "  " + result)
    overall = report["overall"]
    print(f"\n{overall['sentences']} sentences, {overall['seconds']:.1f} s of audio generated in "
          f"{overall['generation_seconds']:.1f} s (real-time factor {overall['rtf'] or 0:.2f})")
    for check, why in report["skipped"].items():
        print(f"skipped {check}: {why}")
    for failure in report["failures"]:
        where = failure["speaker"] + ("" if failure["sentence"] is None else f" #{failure['sentence']}")
        print(f"FAIL {failure['check']} ({where}): {failure['message']}")
    print(f"{'PASSED' if report['passed'] else 'FAILED'}: wavs and report.json in {out_dir}")


if __name__ == "__main__":
    try:
        main()
    except Exception:  # a crash is "could not check" (2), never to be read as "checks failed" (1)
        traceback.print_exc()
        raise SystemExit(2)
