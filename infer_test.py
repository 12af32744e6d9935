"""Speak test sentences with a fine-tuned checkpoint, measure them, and exit non-zero when a check fails.

    python infer_test.py --model_path output/checkpoint-epoch-0 --speaker my_speaker

Per sentence: duration, real-time factor, whether codec_eos came before the frame cap, DC offset,
loudness and silence (with the DC offset removed), clipping. Per speaker: speaking rate against
the training data's, speaker similarity (cosine between the x-vector of the generated audio and
the speaker's vector in the checkpoint), and, with --asr_model, the character error rate. Wavs,
report.json and a table go to --out_dir. The measures live in qwen3_tts_sft/listening.py.
With --compare instead of --model_path: several checkpoints (each checked so) or a training run's
scores.jsonl, one row each, side by side.
Exit status: 0 when every check passes, 1 when one fails (report.json says which and by how
much), 2 when the check could not run (bad arguments, missing files, or an error).
README_CHATTERBOX_STYLE.md explains the report.
"""

import argparse
import json
import re
import sys
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile as sf

from qwen3_tts_sft import listening
from qwen3_tts_sft.audio import CLIP_LEVEL, SYLLABIC, SpeakingRates, describe_group, group_script, rate_group
from qwen3_tts_sft.languages import AUTO_LANGUAGE, language_problem, model_languages
from qwen3_tts_sft.listening import ALL_SPEAKERS, SILENT_WINDOW_DBFS, SpeakSettings, Thresholds

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



def stop(message: str):
    """The check cannot run: say why, exit 2 (1 is kept for failed checks)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------
# The training data: its speaking rate, and the languages its speakers were trained in
# ---------------------------------------------------------------------------------------------

def training_data(jsonl_path: Path, model_path: Path, default_speaker: str = None) -> tuple:
    """(rates, languages) of a codes JSONL: speaking rates {rate group: {speaker: rate, ALL_SPEAKERS: rate
    of all its rows}} (see SpeakingRates), and {speaker: the set of languages its rows name}. Read as the trainer
    reads it (training_data.read_clips), so that the rows it skipped are left out here too; but not
    its reference clips, which the machine that listens may not have."""
    from qwen3_tts_sft.quiet import import_qwen_tts
    from qwen3_tts_sft.sequence_layout import SpecialIds
    from qwen3_tts_sft.training_data import DataError, read_clips

    import_qwen_tts()
    from qwen_tts.core.models import Qwen3TTSConfig

    config = Qwen3TTSConfig(**json.loads((model_path / "config.json").read_text(encoding="utf-8")))
    skipped = []
    try:
        clips = read_clips(jsonl_path, SpecialIds.from_config(config), default_speaker, max_bad_fraction=1.0,
                           log=skipped.append, references=False)
    except DataError as error:
        stop(f"the training data cannot give speaking rates: {error}")
    if skipped:  # the report's last line counts them; the trainer printed the rest
        print(f"note: {skipped[0].splitlines()[-1]}, as the trainer did: they count for no rate")
    rates, languages = SpeakingRates(), {}
    for clip in clips:
        rates.add(clip.text, clip.num_frames, clip.speaker, clip.language)
        languages.setdefault(clip.speaker, set()).add(clip.language)
    return rates.rates(), languages


def summary_rate(path: Path) -> dict:
    """Rates from a prepare_codes summary JSON, as training_data gives them: the top-level
    `characters_per_second` and `characters_per_second_by_group`, and each speaker's there are
    (`speakers.NAME.characters_per_second`...). A summary written before rate groups has none: its
    rates hold for every group (listening.rate_of)."""
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
    speakers = {str(name).lower(): entry for name, entry in speakers.items() if isinstance(entry, dict)}

    def by_group(entry) -> dict:
        groups = entry.get("characters_per_second_by_group")
        groups = groups if isinstance(groups, dict) else {}
        return {group: float(value) for group, value in groups.items() if positive(value)}

    rates = {ALL_SPEAKERS: dict({name: float(entry["characters_per_second"]) for name, entry in speakers.items()
                                 if positive(entry.get("characters_per_second"))}, **{ALL_SPEAKERS: float(rate)})}
    for group, value in by_group(summary).items():
        rates[group] = {ALL_SPEAKERS: value}
    for name, entry in speakers.items():
        for group, value in by_group(entry).items():
            rates.setdefault(group, {})[name] = value
    return rates


# ---------------------------------------------------------------------------------------------
# The model folder
# ---------------------------------------------------------------------------------------------

def checkpoints_in(folder: Path) -> list:
    """[(checkpoint folder, its step or None)] of a training output folder, oldest first."""
    from qwen3_tts_sft import checkpoint

    found = []
    for candidate in folder.glob("checkpoint-*"):
        if (candidate / "config.json").is_file():
            has_state = checkpoint.has_trainer_state(candidate)
            step = checkpoint.read_trainer_state(candidate).progress.step if has_state else None
            found.append((-1 if step is None else step, candidate.stat().st_mtime, candidate, step))
    return [(candidate, step) for _, _, candidate, step in sorted(found)]


def require_model_folder(path: Path, flag: str = "--model_path") -> None:
    """Stop unless `path` holds a model; a training output folder gets the list of its checkpoints.

    The newest checkpoint is named but not picked: the newest is not always the one to keep
    (an eval-loss best, or an earlier epoch that sounded better), and the report should say
    which checkpoint it judged."""
    if (path / "config.json").is_file():
        return
    if not path.exists():
        stop(f"{flag} {path}: not found")
    checkpoints = checkpoints_in(path)
    if not checkpoints:
        stop(f"{path} is not a model folder (no config.json) and holds no checkpoint-* folders")
    listed = "\n".join(f"  {folder}" + ("" if step is None else f"  (step {step})") for folder, step in checkpoints)
    stop(f"{path} is a training output folder, not a checkpoint. Its checkpoints, oldest first:\n{listed}\n"
         f"pass one to --model_path; the newest: --model_path {checkpoints[-1][0]}")


def require_whole(path: Path, flag: str = "--model_path") -> None:
    """Stop when a model folder lacks its weights or its speech tokenizer: a copy that did not finish."""
    weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    missing = [name for name, there in (("model.safetensors", weights),
                                        ("speech_tokenizer/", (path / "speech_tokenizer" / "config.json").is_file()))
               if not there]
    if missing:
        stop(f"{flag} {path}: an incomplete model folder: no {' and no '.join(missing)} (an interrupted copy?)")
    from safetensors import SafetensorError, safe_open

    for weights_file in sorted([*path.glob("*.safetensors"), *(path / "speech_tokenizer").glob("*.safetensors")]):
        try:  # reads the header only, and checks that the file holds every byte it lists
            with safe_open(str(weights_file), framework="numpy"):
                pass
        except (SafetensorError, OSError) as error:
            stop(f"{flag} {path}: {weights_file} is incomplete or damaged ({error}): an interrupted copy or "
                 f"save? Copy it again, or check another checkpoint")


def require_speakers(path: Path) -> dict:
    """The model's config; stop when the model has no speakers to test: a Base model (or another kind)
    has no spk_id rows."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        stop(f"{path / 'config.json'} is not valid JSON ({error}): not a model folder as a download or the "
             f"trainer writes it")
    model_type = config.get("tts_model_type")
    if model_type is None:
        stop(f"{path} is not a Qwen3-TTS model folder (its config.json names no tts_model_type); pass a checkpoint "
             f"folder written by sft_12hz_chatterbox.py")
    if model_type == "custom_voice" and (config.get("talker_config") or {}).get("spk_id"):
        return config
    kind = "a Base model" if model_type == "base" else f"a {model_type} model (tts_model_type)"
    stop(f"{path} is {kind}: it has no fine-tuned speakers, and infer_test.py speaks with a fine-tuned "
         f"speaker. Fine-tune it first (python sft_12hz_chatterbox.py --init_model_path {path} --train_jsonl "
         f"train_with_codes.jsonl ...), then pass a checkpoint it writes: --model_path output/checkpoint-epoch-0")


def speakers_to_test(requested: list, state, spk_id: dict) -> list:
    """The speakers checked, lower-cased: --speaker, else those the checkpoint was trained on (`state`,
    its TrainerState, or None), else every one the model has (`spk_id`)."""
    trained = [speaker["name"] for speaker in state.speakers] if state else []
    return list(dict.fromkeys(name.lower() for name in requested or trained or spk_id or {}))


def checkpoint_speaker_vectors(tts, requested: list, state, model_path: Path) -> dict:
    """{speaker: its vector (the talker's codec embedding row, where generation reads it)}; `state` is
    the checkpoint's TrainerState, or None."""
    spk_id = {name.lower(): codec_id for name, codec_id in (tts.model.config.talker_config.spk_id or {}).items()}
    names = speakers_to_test(requested, state, spk_id)
    unknown = [name for name in names if name not in spk_id]
    if unknown:
        stop(f"speaker {', '.join(unknown)} is not in {model_path}; it has: {', '.join(sorted(spk_id))}")
    rows = tts.model.talker.get_input_embeddings().weight
    return {name: rows[spk_id[name]].detach().float().cpu() for name in dict.fromkeys(names)}


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def load_model(model_path, device):
    import torch

    from qwen3_tts_sft.quiet import import_qwen_tts
    Qwen3TTSModel = import_qwen_tts().Qwen3TTSModel

    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return Qwen3TTSModel.from_pretrained(str(model_path), dtype=dtype, device_map=device)


def load_speaker_encoder(config, model_path: Path, base_path, device):
    """The speaker encoder (fp32) from the checkpoint's speaker_encoder.safetensors, else from the
    base model's weights. Returns (encoder, where its weights came from)."""
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSSpeakerEncoder

    from qwen3_tts_sft import checkpoint
    try:
        weights, files = checkpoint.speaker_encoder_weights(model_path, base_path)
    except FileNotFoundError as error:
        stop(f"{error}; pass --base_model_path" if not base_path else str(error))
    encoder = Qwen3TTSSpeakerEncoder(config.speaker_encoder_config)
    encoder.load_state_dict(weights)
    return encoder.to(device).eval(), str(files[0].parent if len(files) > 1 else files[0])


def load_asr(path, device):
    """A transcriber (wav, sample_rate) -> text from a local transformers speech-recognition model."""
    return listening.speech_recognizer(path, device)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each option's default after its help, unless the help
    already says what happens without it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default:" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model_path",
                        help="a checkpoint folder written by sft_12hz_chatterbox.py (output/checkpoint-*)")
    parser.add_argument("--compare", nargs="+", metavar="PATH",
                        help="instead of --model_path: several checkpoint folders, each checked as --model_path "
                             "would be (wavs in each one's infer_test/, or --out_dir/NAME), or a training output "
                             "folder's scores.jsonl (or the folder), printed side by side, one row each")
    parser.add_argument("--speaker", action="append",
                        help="speaker to test (repeatable); default: every speaker the checkpoint's run trained; "
                             "the voices it kept from its starting model are named as not checked")
    parser.add_argument("--language", help="passed to generation; picks the built-in sentences (default: the "
                                           "language the checked speakers' training rows name, when it is one "
                                           "with built-in sentences, else auto)")
    parser.add_argument("--text", action="append", help="sentence to speak (repeatable); default: built-in set")
    parser.add_argument("--text_file", help="UTF-8 file of sentences, one a line (with or instead of --text)")
    parser.add_argument("--out_dir", help="where wavs and report.json go (default: MODEL_PATH/infer_test)")
    parser.add_argument("--batch_size", type=int, default=4, help="sentences generated together")
    parser.add_argument("--text_layout", default="non_streaming", choices=["non_streaming", "streaming"],
                        help="the text layout, named as the trainer's flag: non_streaming is generate_custom_voice's "
                             "default (non_streaming_mode=True, all the text before the first frame); streaming "
                             "feeds it along with the frames (non_streaming_mode=False)")
    parser.add_argument("--greedy", action="store_true", help="no sampling: the same codes every run")
    parser.add_argument("--max_new_tokens", type=int, default=0,
                        help="frame cap (12.5 a second); 0: 5 s + 0.5 s a character of the batch's longest text")
    parser.add_argument("--device", help="cuda, cpu (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling (without --greedy)")
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
                        help="each sentence's RMS level (DC offset removed) at least this (speech is about "
                             "-30 to -15 dBFS)")
    limits.add_argument("--max_silent_fraction", type=float, default=Thresholds.max_silent_fraction,
                        help=f"at most this fraction of a sentence's 50 ms windows below {SILENT_WINDOW_DBFS:.0f} dBFS")
    limits.add_argument("--max_clipped_fraction", type=float, default=Thresholds.max_clipped_fraction,
                        help=f"at most this fraction of a sentence's samples at |x| >= {CLIP_LEVEL}")
    limits.add_argument("--max_dc_offset", type=float, default=Thresholds.max_dc_offset,
                        help="each sentence's mean sample within this of 0, either way")
    limits.add_argument("--max_rate_ratio", type=float, default=Thresholds.max_rate_ratio,
                        help="a speaker's chars/s within this factor of the training rate, either way")
    limits.add_argument("--max_sentence_rate_ratio", type=float, default=Thresholds.max_sentence_rate_ratio,
                        help="each sentence's chars/s within this factor of the training rate (catches cut-off "
                             "and drawn-out sentences; wider, as one sentence's rate is noisy)")
    limits.add_argument("--min_speaker_similarity", type=float, default=Thresholds.min_speaker_similarity,
                        help="a speaker's mean x-vector cosine to its checkpoint vector at least this")
    limits.add_argument("--max_cer", type=float, default=Thresholds.max_cer,
                        help="a speaker's mean character error rate (with --asr_model) at most this")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.model_path) == bool(args.compare):
        parser.error("give --model_path (one checkpoint) or --compare (several, or a scores.jsonl)")
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if any(not text.strip() for text in args.text or []):
        parser.error("--text must hold a sentence: an empty one has nothing to speak or to measure")
    if args.max_new_tokens and args.max_new_tokens < 3:
        parser.error("--max_new_tokens must be at least 3: generation makes at least 2 frames")
    if min(args.max_rate_ratio, args.max_sentence_rate_ratio) < 1:
        parser.error("--max_rate_ratio and --max_sentence_rate_ratio are factors either way: at least 1")
    return args


def read_sentences(args, language: str) -> list:
    sentences = list(args.text or [])
    if args.text_file:
        try:
            sentences += listening.sentences_in_file(args.text_file)
        except ValueError as problem:
            stop(f"--text_file {args.text_file}: {problem}")
    if sentences:
        return sentences
    if language not in SENTENCES:
        stop(f"no built-in sentences for language {language!r} (there are {', '.join(sorted(SENTENCES))}); "
             f"pass --text or --text_file")
    return SENTENCES[language]


def find_training_data(args, model_path: Path, flags: dict, want_languages: bool) -> tuple:
    """(rates, where they came from, {speaker: languages}, the codes JSONL read). Rates: (None, why
    there are none) without training data. Languages: None when no codes JSONL was read; with
    --data_summary (the rates' source) the checkpoint's is read for them only when `want_languages`."""
    summary = summary_rate(args.data_summary) if args.data_summary else None
    if args.train_jsonl and not Path(args.train_jsonl).is_file():
        stop(f"--train_jsonl {args.train_jsonl}: file not found")
    path = args.train_jsonl or flags.get("train_jsonl")
    if not path or not Path(path).is_file() or (summary and not want_languages):
        path = None
    rates, languages = training_data(Path(path), model_path, flags.get("speaker_name")) if path else (None, None)
    if summary:
        return summary, args.data_summary, languages, path
    if rates is None:
        return None, "no training data found: pass --train_jsonl or --data_summary", None, None
    return rates, str(path), languages, path


def default_language(names: list, trained_in: dict, data_path) -> str:
    """Without --language: the one language the checked speakers' training rows name, when it has
    built-in sentences (a German voice is checked in German, not in English); else auto, as before.
    `trained_in` is {speaker: languages} of the training data (None when none was read)."""
    # A speaker without rows (one the starting model had) counts as unknown: no single language then.
    spoken = set().union(*(trained_in.get(name, {None}) for name in names)) if trained_in and names else {None}
    if len(spoken) != 1 or not spoken <= SENTENCES.keys() or spoken == {AUTO_LANGUAGE}:
        return AUTO_LANGUAGE
    language = spoken.pop()
    print(f"--language not given: speaking {language}, the language {', '.join(names)} "
          f"{'was' if len(names) == 1 else 'were'} trained in (the rows of {data_path})")
    return language


def wav_stems(speakers: list) -> dict:
    """{speaker: the start of its wav files' names}: the name with the characters a file name cannot
    hold replaced, and a number added where two names come out the same ("a b", "a_b")."""
    stems = {}
    for speaker in speakers:
        stem = base = re.sub(r"[^\w.-]", "_", speaker)
        number = 1
        while stem.lower() in (taken.lower() for taken in stems.values()):  # case-insensitive file systems
            number += 1
            stem = f"{base}-{number}"
        stems[speaker] = stem
    return stems


def main(argv=None):
    args = parse_args(argv)
    import torch  # the model code loads only now, so reading the command line (and --help) is instant

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        stop(f"--device {args.device}: not a device (cuda, cuda:N or cpu)")
    if device.type == "cuda" and not torch.cuda.is_available():
        stop(f"--device {args.device}: no CUDA GPU is visible here; pass --device cpu")
    elif device.type not in ("cuda", "cpu"):
        stop(f"--device {args.device}: infer_test.py runs on cuda or cpu")
    if args.compare:
        compare(args)
        return
    model_path = Path(args.model_path)
    out_dir = Path(args.out_dir or model_path / "infer_test")
    report = check(args, model_path, out_dir)
    print_table(report, out_dir)
    if report["failures"] and not args.report_only:
        raise SystemExit(1)


def check(args, model_path: Path, out_dir: Path, flag: str = "--model_path") -> dict:
    """Speak, measure and judge one checkpoint; write its wavs and report.json to `out_dir`; return the report."""
    from qwen3_tts_sft import checkpoint

    limits = Thresholds(**{name: getattr(args, name) for name in Thresholds.__dataclass_fields__})
    device = args.device
    require_model_folder(model_path, flag)
    talker_config = require_speakers(model_path)["talker_config"]
    require_whole(model_path, flag)
    if args.asr_model:  # before anything is spoken
        from qwen3_tts_sft.transcription import model_problem

        problem = model_problem(args.asr_model)
        if problem:
            stop(f"--asr_model {args.asr_model}: {problem}")
    state = checkpoint.read_trainer_state(model_path) if checkpoint.has_trainer_state(model_path) else None
    flags = state.flags if state else {}
    base_path = args.base_model_path or flags.get("init_model_path")
    if args.compare_base and not base_path:
        stop("--compare_base needs the base model: pass --base_model_path")
    if args.compare_base and not (Path(base_path) / "config.json").is_file():
        given = "--base_model_path" if args.base_model_path else "the base model (the trainer's --init_model_path)"
        stop(f"--compare_base: {given} {base_path}: no model folder there" + checkpoint.hub_download_hint(base_path))
    if args.language is not None:  # before the training data is read: a typo answers at once
        problem = language_problem(args.language, model_languages(talker_config.get("codec_language_id")))
        if problem:
            stop(f"--language {problem}")
    rates, rate_source, trained_in, data_path = find_training_data(args, model_path, flags,
                                                                   want_languages=args.language is None)
    # Not written back to args: --compare checks each checkpoint with the flags as given.
    names = speakers_to_test(args.speaker, state, talker_config["spk_id"])
    # By default only the run's own voices speak: after voices were added, the ones kept are named, or a
    # user checking that every voice still speaks would take silence about them for a pass.
    unchecked = [] if args.speaker else [name for name in talker_config["spk_id"] if name.lower() not in names]
    if unchecked:
        print(f"note: checking {', '.join(names)}, the voices this checkpoint's run trained; not checked: "
              f"{', '.join(unchecked)}, kept from the model it started from: add --speaker NAME for each to hear them")
    language = (args.language.strip().lower() if args.language is not None else
                default_language(names, trained_in, data_path))
    texts = read_sentences(args, language)
    own_text = bool(args.text or args.text_file)
    note = other_script_note(rates, names, texts, language, own_text) or unknown_language_note(
        names, trained_in, language, own_text, data_path)
    if note:
        print(f"note: {note}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # it, or a folder above it, is a file
        stop(f"--out_dir {out_dir}: cannot make that folder ({error.strerror})")
    settings = SpeakSettings(language=language, non_streaming_mode=args.text_layout == "non_streaming",
                             greedy=args.greedy, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                             seed=args.seed)

    tts = load_model(model_path, device)
    vectors = checkpoint_speaker_vectors(tts, args.speaker, state, model_path)
    encoder, encoder_source = load_speaker_encoder(tts.model.config, model_path, base_path, device)
    items = [(name, index, text) for name in vectors for index, text in enumerate(texts)]
    sentences, wavs = listening.speak_and_measure(tts, items, vectors, encoder, rates, settings)
    stems = wav_stems(list(vectors))
    remove_earlier_wavs(out_dir, stems.values())
    for sentence, (wav, sample_rate) in zip(sentences, wavs):
        sentence["wav"] = str(out_dir / f"{stems[sentence['speaker']]}_{sentence['index']:02d}.wav")
        save(out_dir, sentence["wav"], lambda: sf.write(sentence["wav"], np.nan_to_num(wav), sample_rate))
    encoder_rate = tts.model.config.speaker_encoder_config.sample_rate
    del tts

    if args.compare_base:
        compare_with_base(base_path, device, items, settings, vectors, sentences, (encoder, encoder_rate), out_dir)
    if args.asr_model:
        listening.add_transcripts(sentences, wavs, load_asr(args.asr_model, device))

    heard = listening.assess(sentences, rates, limits)
    # Without rates, where they came from says why there are none; with them, assess says why not (the group).
    why_skipped = dict(heard.skipped, cer="no --asr_model given",
                       **({} if rates else dict(sentence_rate=rate_source, rate=rate_source)))
    audio_seconds = sum(s["seconds"] for s in sentences)
    generation_seconds = sum(s["rtf"] * s["seconds"] for s in sentences)
    report = dict(
        passed=heard.passed, score=heard.score, checks=heard.check_results(),
        failures=[asdict(f) for f in heard.failures], skipped={check: why_skipped[check] for check in heard.skipped},
        model_path=str(model_path), step=state.progress.step if state else None, device=device,
        language=language, non_streaming_mode=settings.non_streaming_mode, greedy=args.greedy, seed=args.seed,
        thresholds=asdict(limits), training_rate=dict(source=rate_source if rates else None, characters_per_second=rates),
        speaker_encoder=encoder_source, base_model_path=base_path if args.compare_base else None,
        asr_model=args.asr_model,
        overall=dict(sentences=len(sentences), seconds=audio_seconds, generation_seconds=generation_seconds,
                     rtf=generation_seconds / audio_seconds if audio_seconds else None),
        speakers=heard.speakers, sentences=sentences,
    )
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    save(out_dir, out_dir / "report.json", lambda: (out_dir / "report.json").write_text(text, encoding="utf-8"))
    return report


def other_script_note(rates: dict, names: list, texts: list, language: str, own_text: bool) -> str:
    """What to say when no sentence can be held to a training rate: the training text is of other rate
    groups (another language, or another script: Chinese is read at a third of English's characters a
    second), so the rate checks are skipped; None when some sentence can be."""
    groups = {rate_group(text, language) for text in texts}
    if not rates or any(listening.training_rate_for(rates, name, group) for name in names for group in groups):
        return None
    trained = sorted(group for group in rates if group != ALL_SPEAKERS)
    meant = [group for group in trained if group in SENTENCES] or (
        ["chinese", "japanese", "korean"] if any(group_script(group) == SYLLABIC for group in trained) else [])
    sentences = "the sentences given" if own_text else f"the built-in {language} sentences"
    return (f"the model was trained on {' and '.join(describe_group(group) for group in trained)}, and "
            f"{sentences} are {' and '.join(describe_group(group) for group in sorted(groups))}: their speaking rate "
            f"cannot be compared with the training rate, so the rate checks are skipped. Pass "
            + (f"--language {' or '.join(meant)} for built-in sentences of it, or " if meant else "")
            + "--text in the language the model was trained on")


def unknown_language_note(names: list, trained_in: dict, language: str, own_text: bool, data_path) -> str:
    """What to say when the built-in sentences stand in for a language the training rows never named
    (a language the model does not have trains as auto): they are English, the voice may be another."""
    if own_text or language != AUTO_LANGUAGE or not trained_in or not names:
        return None
    if any(trained_in.get(name) != {AUTO_LANGUAGE} for name in names):
        return None
    return (f"the rows of {data_path} name no language for {', '.join(names)} (auto), so the built-in sentences "
            f"spoken are English; a voice of another language is checked in it with --text_file FILE (a sentence "
            f"a line)")


def remove_earlier_wavs(out_dir: Path, stems) -> None:
    """Remove the wavs an earlier run wrote for these speakers (STEM_NN.wav, in out_dir and its base/),
    so that what the folder holds, and the report points at, is this run's: a run with fewer sentences
    would leave the last ones of the one before. Only files named as this script names them."""
    written = re.compile("|".join(rf"{re.escape(stem)}_\d{{2,}}\.wav" for stem in stems))
    removed = [path for folder in (out_dir, out_dir / "base") for path in sorted(folder.glob("*.wav"))
               if written.fullmatch(path.name)]
    for path in removed:
        save(out_dir, path, path.unlink)
    if removed:  # said, since a file of the user's own could bear such a name
        print(f"removed {len(removed)} wavs an earlier run wrote in {out_dir} ({', '.join(p.name for p in removed[:3])}"
              f"{', ...' if len(removed) > 3 else ''})")


def save(out_dir: Path, path, write) -> None:
    """Run write() (of `path` under out_dir); stop with what happened when it cannot be done: most
    often, out_dir was a checkpoint's and the trainer deleted that checkpoint meanwhile."""
    try:
        write()
    except (OSError, sf.SoundFileError) as error:
        if not out_dir.is_dir():
            stop(f"{out_dir} was removed while checking: cannot write {path}. A checkpoint in a running training "
                 f"is deleted when newer ones come (the trainer's --save_total_limit): copy the checkpoint "
                 f"elsewhere and check the copy, or pass --out_dir elsewhere")
        stop(f"cannot write {path} ({error}): pass --out_dir a folder that can be written")


def compare(args) -> None:
    """--compare: one row per checkpoint (checked here, as --model_path) or per evaluation of a
    scores.jsonl, side by side, the best listening score starred (scoring.table_rows)."""
    from qwen3_tts_sft import scoring

    entries, labels = [], []
    for path in map(Path, args.compare):
        scores = path / scoring.SCORES_FILE if path.is_dir() and not (path / "config.json").is_file() else path
        if scores.is_file():
            try:
                evaluations = scoring.read_scores(scores)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                stop(f"--compare {scores}: not a scores.jsonl ({error})")
            entries += evaluations
            labels += [f"{scores.parent.name}/" + (scoring.checkpoint_label(scores.parent, entry.get("checkpoint"))
                                                    or f"step {entry['step']}") for entry in evaluations]
            continue
        checkpoints = [] if (path / "config.json").is_file() or not path.is_dir() else checkpoints_in(path)
        if checkpoints:
            folders = " ".join(str(folder) for folder, _ in checkpoints)
            stop(f"--compare {path}: this training output holds no {scoring.SCORES_FILE}: the run made no "
                 f"evaluations (it needs eval data, --eval_jsonl or --eval_split, or --eval_generate_steps). "
                 f"Its checkpoints can be checked and compared here instead: --compare {folders}")
        out_dir = Path(args.out_dir) / path.name if args.out_dir else path / "infer_test"
        report = check(args, path, out_dir, flag="--compare")
        entries.append(report_entry(report, "non_streaming" if report["non_streaming_mode"] else "streaming"))
        labels.append(str(path))
    listened = [entry for entry in entries if entry.get("listening_score") is not None]
    best = scoring.choose_best(listened, "listening_score")
    print("\n".join(scoring.table_rows(entries, labels, winner=best)))
    if best is not None:
        print(f"* the best: {labels[entries.index(best)]}, {scoring.why_best(best, 'listening_score')}")


def report_entry(report: dict, layout: str) -> dict:
    """A report.json as a scores.jsonl entry (scoring.entry_of's fields that a table shows)."""
    similarities = [s["speaker_similarity"] for s in report["speakers"]]
    return dict(step=report["step"], eval_loss=None, listening_score=report["score"],
                speaker_similarity=None if None in similarities else min(similarities),
                floors_passed=not any(f["check"] in listening.FLOOR_CHECKS for f in report["failures"]),
                stopped=sum(s["stopped"] for s in report["sentences"]), sentences=len(report["sentences"]),
                listen_seconds=report["overall"]["generation_seconds"],
                layouts={layout: dict(speakers=report["speakers"])})


def compare_with_base(base_path, device, items, settings, vectors, sentences, encoder_and_rate, out_dir):
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
    save(out_dir, out_dir / "base", lambda: (out_dir / "base").mkdir(exist_ok=True))
    for sentence, (_, wav, sample_rate, _, _, _) in zip(sentences, listening.speak_in_batches(base, items, settings, clone)):
        path = out_dir / "base" / Path(sentence["wav"]).name
        save(out_dir, path, lambda: sf.write(path, np.nan_to_num(wav), sample_rate))
        sentence["base_speaker_similarity"] = listening.speaker_similarity(*encoder_and_rate, wav, sample_rate,
                                                                           vectors[sentence["speaker"]])


TABLE = [("speaker", "<14", "speaker", ".13"), ("#", ">4", "index", ""), ("sec", ">7", "seconds", ".2f"),
         ("stop", ">6", "stop", ""), ("rms dB", ">8", "rms_dbfs", ".1f"), ("silent", ">8", "silent_fraction", ".0%"),
         ("clip", ">7", "clipped_fraction", ".1%"), ("chars/s", ">9", "characters_per_second", ".1f"),
         ("x train", ">9", "rate_ratio", ".2f"), ("similar", ">9", "speaker_similarity", ".3f"),
         ("base", ">7", "base_speaker_similarity", ".3f"), ("cer", ">6", "cer", ".0%")]


def print_table(report: dict, out_dir: Path):
    """One line a sentence, one a speaker (#: all) with every check its sentences failed, then
    details, what passed, and where to listen (every speaker)."""
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
    unrated = {}  # why -> the sentences not held to a training rate, where others were
    for sentence in report["sentences"] if "rate" not in report["skipped"] else []:
        if sentence.get("rate_not_checked"):
            unrated.setdefault(sentence["rate_not_checked"], []).append(f"{sentence['speaker']} #{sentence['index']}")
    for why, where in unrated.items():
        print(f"rate not checked for {', '.join(where)}: {why}")
    for failure in report["failures"]:
        where = failure["speaker"] + ("" if failure["sentence"] is None else f" #{failure['sentence']}")
        print(f"FAIL {failure['check']} ({where}): {failure['message']}")
    passed = [check for check, result in report["checks"].items() if result == "passed"]
    print(f"checks passed: {', '.join(passed) or 'none'}; score {report['score']:.3f}")
    speakers = [summary["speaker"] for summary in report["speakers"]]
    wavs = {sentence["speaker"]: sentence["wav"] for sentence in report["sentences"]}  # one per speaker
    listen = ", ".join(wavs[name].rsplit("_", 1)[0] + "_*.wav" for name in speakers)
    if report["base_model_path"]:
        listen += f" (the base model's: {out_dir / 'base'})"
    print(f"{'PASSED' if report['passed'] else 'FAILED'} for {', '.join(speakers)}: report.json in {out_dir}; "
          f"listen to {listen}")


if __name__ == "__main__":
    try:
        main()
    except Exception:  # a crash is "could not check" (2), never to be read as "checks failed" (1)
        traceback.print_exc()
        raise SystemExit(2)
