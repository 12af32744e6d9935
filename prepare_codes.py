"""Turn recordings into 12 Hz speech codes: the training JSONL for sft_12hz_chatterbox.py.

    python prepare_codes.py --tokenizer_model_path Qwen3-TTS-12Hz-1.7B-Base/speech_tokenizer \\
        --input raw.jsonl --output_jsonl train_with_codes.jsonl

--input is a raw JSONL ({"audio", "text", "ref_audio", "speaker", "language", "segments"} a line),
an LJSpeech folder (metadata.csv + wavs/), or a folder of audio files with same-named .txt or .lab
transcripts (dataset_layouts.py); several may be given. Audio in any format soundfile reads is
downmixed and resampled (soxr) to the tokenizer's rate, its silent edges trimmed and its loudness
evened out; takes too long to keep whole are cut at their pauses (with a transcript per segment,
or --asr_model). Bad rows never stop the run: each is rejected with its reason.

Each output row is the input row with absolute paths, `source` (the input "file:line", or the audio
file in a folder; "#k" for the k-th piece of a long take), `segment` (a piece's span of its take),
`audio_codes` (frames x 16 ints), `quality` (what was measured and done), `flags` when something
looks wrong, `clipped_fraction` when clipped, and `text_from: "asr"` for recognised text.
Rows are in input order. Beside OUTPUT:
    OUTPUT.partial         progress, flushed batch by batch; after a crash or kill, the same command
                           carries on from it (a half-written last line is cut off)
    OUTPUT.encoded         the finished progress, kept: after rows are fixed or added, the same
                           command encodes only those (delete it to save disk; then it encodes all)
    OUTPUT.rejects.jsonl   one line per rejected row: source, reason, field, problem, input line
    OUTPUT.summary.json    clips, hours, speakers, durations, characters per second, rejects, speed
    OUTPUT.report.json     per speaker and per clip: durations, rates, loudness, flags, references;
    OUTPUT.report.png      with a plot of the durations and speaking rates
    OUTPUT.references/     reference clips as encoded, where a chosen one is a piece of a take or
                           lost more than a second of edge silence
    OUTPUT.lock            the process writing OUTPUT: a second run on it stops (the file stays;
                           its lock ends with its process)
    OUTPUT                 written last, under a temporary name and then renamed: it exists only
                           when complete (and when it holds at least one clip)

--validate_only writes the rejects, summary and report without loading the tokenizer.

Shards: --shard_index i --num_shards N on each of N GPUs writes OUTPUT with `.shard-i-of-N` before
its extension; then --merge_shards --num_shards N writes OUTPUT. Under `accelerate launch` the
launcher's ranks are the shards and process 0 merges when all are done. The checks across clips
(speaking rate against the speaker's median, duplicates, the choice of references) run at the merge.
"""

import argparse
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from qwen3_tts_sft import audio, data_report, output_lock
from qwen3_tts_sft.audio import FRAMES_PER_SECOND, SpeakingRates
from qwen3_tts_sft.data_report import NO_SPEAKER, ClipInfo, DatasetChecks
from qwen3_tts_sft.languages import language_problem, languages_of_tokenizer_folder
from qwen3_tts_sft.dataset_layouts import (FLAGS, REJECT_REASONS, AudioChecks, Limits, Processing,
                                           InputRow, Reject, RowChecker, detect_layout, input_order, line_to_feed_again,
                                           files_below, read_input, transcript_problem)

# Testing hook, not for users (so not in --help or the README): with this set to N, the process
# SIGKILLs itself right after its Nth batch is written, a crash at a known point for the tests.
KILL_HOOK = "PREPARE_CODES_TEST_KILL_AFTER_BATCHES"
DURATION_BUCKETS = (1, 2, 3, 5, 10, 15, 20, 30)  # upper edges, in seconds, of the summary's histogram (inclusive)
SHOWN_REJECTS = 20                                # printed per run; the rejects file holds them all
TOKENIZER_MODEL_TYPE = "qwen3_tts_tokenizer_12hz"  # model_type in the speech tokenizer's config.json


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--input", "--input_jsonl", dest="input", nargs="+", action="extend",
                      help="raw JSONL, LJSpeech folder (or its metadata.csv), or folder of audio + .txt/.lab; "
                           "several may follow one --input, or --input may be repeated (default: none, required)")
    data.add_argument("--output_jsonl", required=True,
                      help="training JSONL to write; .partial, .rejects.jsonl, .summary.json and .report.json "
                           "go beside it (default: none, required)")
    data.add_argument("--ref_audio", default=None,
                      help="reference clip for rows without one (default: none: each speaker's cleanest few "
                           "clips of 3-10 s, chosen by the report, so the trainer's speaker vector is their mean)")
    data.add_argument("--speaker", default=None, help="speaker for rows without one (default: none; the "
                                                      "trainer's --speaker_name then applies)")
    data.add_argument("--language", default=None, help="language for rows without one (default: none, read as auto)")
    data.add_argument("--speaker_from_folder", action="store_true",
                      help="a folder --input holds a folder per speaker (VCTK, LibriTTS): each clip's speaker is the "
                           "name of the folder directly below --input that holds it (default: off: one voice, "
                           "whatever the subfolders)")
    data.add_argument("--validate_only", action="store_true",
                      help="decode and check everything and write the rejects, summary and report, but load no "
                           "tokenizer and encode nothing (default: off)")

    filters = parser.add_argument_group("filters (a rejected row goes to OUTPUT.rejects.jsonl with its reason)")
    filters.add_argument("--min_seconds", type=float, default=audio.MIN_CLIP_SECONDS,
                         help="shorter clips are mostly breaths, clicks or single syllables, and their "
                              "transcripts are the least reliable (default: %(default)s)")
    filters.add_argument("--max_seconds", type=float, default=30.0,
                         help="the trainer drops longer clips by default (--max_audio_seconds 30), and long "
                              "clips take the most GPU memory there; a longer take is cut at its pauses when it "
                              "has a transcript per segment or --asr_model is given (default: %(default)s)")
    filters.add_argument("--silence_dbfs", type=float, default=audio.SILENCE_DBFS,
                         help="clips whose overall RMS level is below this are silent; speech recorded at any "
                              "usable gain sits well above it, a take of room noise below (default: %(default)s)")
    filters.add_argument("--clipped_fraction", type=float, default=0.001,
                         help="a clip with more than this share of samples at full scale counts as clipped: "
                              "flagged in its row and counted in the summary (default: %(default)s)")
    filters.add_argument("--reject_clipped", action="store_true",
                         help="reject clipped clips too (default: off: mild clipping still teaches the voice)")
    filters.add_argument("--max_clipped_fraction", type=float, default=audio.HEAVILY_CLIPPED_FRACTION,
                         help="a clip with more than this share of samples at full scale is rejected: distorted "
                              "throughout, it would teach the distortion; 1 keeps them all (default: %(default)s)")
    filters.add_argument("--flag_rate_ratio", type=float, default=1.5,
                         help="flag a clip whose characters per second are more than this many times above or "
                              "below the median of its speaker's clips of the same language (else script): its text may "
                              "not match its audio (default: %(default)s)")
    filters.add_argument("--reject_rate_ratio", type=float, default=2.5,
                         help="reject such a clip beyond this ratio: read speech varies by well under 2x, a wrong "
                              "or cut transcript by more (default: %(default)s)")

    processing = parser.add_argument_group("audio processing (before encoding; the files are not changed)")
    processing.add_argument("--no_trim", dest="trim", action="store_false",
                            help="keep silence at the edges (default: trimmed to --trim_padding_seconds with a "
                                 "voice-activity detector: a model learns the silences it is shown, and long "
                                 "leading silence delays its speech)")
    processing.add_argument("--trim_padding_seconds", type=float, default=0.2,
                            help="silence kept before and after the speech; speech onsets are soft, and a little "
                                 "silence makes a natural start and end (default: %(default)s)")
    processing.add_argument("--loudness_lufs", type=float, default=-23.0,
                            help="normalise each clip's loudness (ITU-R BS.1770) to this, lowering the gain where a "
                                 "peak would pass -1 dBFS: clips recorded at different gains then teach one "
                                 "level; -23 is EBU R128's target, with headroom for speech peaks (default: %(default)s)")
    processing.add_argument("--no_loudness_normalisation", dest="normalise_loudness", action="store_false",
                            help="encode clips at their recorded level (default: normalised)")
    processing.add_argument("--max_segment_seconds", type=float, default=15.0,
                            help="a long take is cut at its pauses into pieces no longer than this, sentence-sized "
                                 "clips as training expects (default: %(default)s)")
    processing.add_argument("--min_pause_seconds", type=float, default=0.4,
                            help="cuts fall at pauses at least this long: between sentences rather than at commas "
                                 "(default: %(default)s)")

    recognition = parser.add_argument_group("speech recognition")
    recognition.add_argument("--asr_model", default=None,
                             help="a local transformers speech-recognition folder (a Whisper download, say): "
                                  "transcribes clips without text and the pieces of long takes (default: none)")
    recognition.add_argument("--asr_check", action="store_true",
                             help="also transcribe clips that have text, to flag mismatches; the character error "
                                  "rate of each is in the report (default: off; needs --asr_model)")
    recognition.add_argument("--max_cer", type=float, default=0.3,
                             help="with --asr_check, flag clips whose character error rate is above this "
                                  "(default: %(default)s)")

    encoding = parser.add_argument_group("encoding")
    encoding.add_argument("--tokenizer_model_path",
                          help="the speech tokenizer folder (speech_tokenizer/ inside a model download, "
                               "or Qwen3-TTS-Tokenizer-12Hz; a model folder is taken as its speech_tokenizer/) "
                               "(default: none, required unless --validate_only or --merge_shards)")
    encoding.add_argument("--batch_size", type=int, default=32,
                          help="clips encoded together; batches go longest first, so a size too large for "
                               "GPU memory fails in the first minute, and a rerun with a smaller one resumes "
                               "(default: %(default)s)")
    encoding.add_argument("--device", default=None,
                          help="cuda, cuda:1, cpu, for the tokenizer and speech recognition (default: cuda if available)")
    encoding.add_argument("--num_workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                          help="processes decoding, trimming and measuring audio while the tokenizer encodes "
                               "(default: the CPU cores less one, at most 8, here %(default)s: one decodes "
                               "several hundred seconds of audio a second)")
    encoding.add_argument("--references_per_speaker", type=int, default=4,
                          help="reference clips chosen per speaker for rows without ref_audio (default: %(default)s)")

    shards = parser.add_argument_group("shards (several GPUs)")
    shards.add_argument("--shard_index", type=int, default=None, help="this process's shard, 0..N-1 (default: 0)")
    shards.add_argument("--num_shards", type=int, default=None,
                        help="N (default: 1, or the launcher's WORLD_SIZE under accelerate launch / torchrun)")
    shards.add_argument("--merge_shards", action="store_true",
                        help="merge the N complete shard outputs into --output_jsonl; nothing is encoded (default: off)")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_shards(args)
    if not args.merge_shards and not args.input:
        parser.error("--input is required (unless --merge_shards)")
    if not (args.merge_shards or args.validate_only or args.tokenizer_model_path):
        parser.error("--tokenizer_model_path is required (unless --validate_only or --merge_shards)")
    if args.asr_check and not args.asr_model:
        parser.error("--asr_check needs --asr_model")
    if args.max_cer != parser.get_default("max_cer") and not args.asr_check:  # else no clip is held to it
        parser.error("--max_cer is the limit of --asr_check, which compares your transcripts with what speech "
                     "recognition hears: pass --asr_check (and --asr_model) too")
    if args.max_cer < 0:
        parser.error("--max_cer is a character error rate: 0 or more")
    if args.asr_model:  # before any row is read, not once the recordings are decoded
        from qwen3_tts_sft.transcription import model_problem

        problem = model_problem(args.asr_model)
        if problem:
            parser.error(f"--asr_model {args.asr_model}: {problem}")
    if not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard_index {args.shard_index} is not in 0..{args.num_shards - 1}")
    if args.batch_size < 1 or args.num_workers < 0 or args.min_seconds > args.max_seconds:
        parser.error("need --batch_size >= 1, --num_workers >= 0 and --min_seconds <= --max_seconds")
    if not args.min_seconds <= args.max_segment_seconds <= args.max_seconds:
        parser.error("need --min_seconds <= --max_segment_seconds <= --max_seconds")
    if not 1 <= args.flag_rate_ratio <= args.reject_rate_ratio or args.references_per_speaker < 1:
        parser.error("need 1 <= --flag_rate_ratio <= --reject_rate_ratio and --references_per_speaker >= 1")
    if (args.trim_padding_seconds < 0 or args.min_pause_seconds <= 0 or not 0 <= args.clipped_fraction <= 1
            or not 0 <= args.max_clipped_fraction <= 1):
        parser.error("need --trim_padding_seconds >= 0, --min_pause_seconds > 0, and --clipped_fraction and "
                     "--max_clipped_fraction in [0, 1]")
    if args.loudness_lufs >= 0 or args.silence_dbfs >= 0:
        parser.error("--loudness_lufs and --silence_dbfs are levels below full scale: negative numbers")
    if args.validate_only and args.num_shards > 1:
        parser.error("--validate_only checks the whole dataset at once (duplicates and speaking rates are checks "
                     "across clips, which shards would skip): run it without shards; --num_workers spreads the "
                     "decoding over the CPU cores")
    return args


def resolve_shards(args):
    """Shards from the flags, else from the launcher (accelerate launch and torchrun set RANK, WORLD_SIZE)."""
    args.merge_when_done = False
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.num_shards is None and world_size > 1 and not args.merge_shards:
        args.num_shards, args.shard_index = world_size, int(os.environ["RANK"])
        args.merge_when_done = args.shard_index == 0
        if args.device is None:
            import torch

            if torch.cuda.is_available():
                args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    args.num_shards = args.num_shards or 1
    args.shard_index = args.shard_index or 0


def speech_tokenizer_folder(value: str) -> str:
    """The speech tokenizer folder that --tokenizer_model_path names: the folder itself, or the
    speech_tokenizer/ inside a model folder. Anything else stops the run before it writes a file."""
    path = Path(value).expanduser().resolve()

    def model_type(folder: Path):
        try:
            return json.loads((folder / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            return None

    if not path.is_dir():
        from qwen3_tts_sft.checkpoint import hub_download_hint  # imports torch: only on this mistake

        raise SystemExit(f"error: --tokenizer_model_path {value}: no such folder" + hub_download_hint(value))
    if model_type(path) == TOKENIZER_MODEL_TYPE:
        return str(path)
    inner = path / "speech_tokenizer"
    if model_type(inner) == TOKENIZER_MODEL_TYPE:
        print(f"--tokenizer_model_path {value} is a model folder: using its speech tokenizer, {inner}")
        return str(inner)
    found = f"its config.json is of a {model_type(path)!r} model" if model_type(path) else "it has no readable config.json"
    raise SystemExit(f"error: --tokenizer_model_path {value} is not a speech tokenizer folder ({found}, and it holds "
                     f"no speech_tokenizer/ folder). Pass the speech_tokenizer/ folder of a Qwen3-TTS download "
                     f"(Qwen3-TTS-12Hz-1.7B-Base/speech_tokenizer) or a Qwen3-TTS-Tokenizer-12Hz download.")


def shard_output(output: Path, index: int, count: int) -> Path:
    return output if count == 1 else output.with_name(f"{output.stem}.shard-{index}-of-{count}{output.suffix}")


def beside(output: Path, suffix: str) -> Path:
    return output.with_name(output.name + suffix)


def absolute(value):
    return str(Path(value).expanduser().resolve()) if value else None


def run_settings(args, inputs: list) -> dict:
    """What decides the rows and their codes: a resumed run, or a shard being merged, must match."""
    return dict(input=[str(path) for _, path in inputs], layout=[layout for layout, _ in inputs],
                tokenizer_model_path=None if args.validate_only else args.tokenizer_model_path,
                ref_audio=absolute(args.ref_audio), speaker=args.speaker, language=args.language,
                speaker_from_folder=args.speaker_from_folder,
                min_seconds=args.min_seconds, max_seconds=args.max_seconds, silence_dbfs=args.silence_dbfs,
                clipped_fraction=args.clipped_fraction, reject_clipped=args.reject_clipped,
                max_clipped_fraction=args.max_clipped_fraction,
                flag_rate_ratio=args.flag_rate_ratio, reject_rate_ratio=args.reject_rate_ratio,
                trim=args.trim, trim_padding_seconds=args.trim_padding_seconds,
                loudness_lufs=args.loudness_lufs if args.normalise_loudness else None,
                max_segment_seconds=args.max_segment_seconds, min_pause_seconds=args.min_pause_seconds,
                asr_model=absolute(args.asr_model), asr_check=args.asr_check, max_cer=args.max_cer,
                references_per_speaker=args.references_per_speaker,
                shard_index=args.shard_index, num_shards=args.num_shards,
                input_fingerprint=input_fingerprint(inputs, absolute(args.ref_audio)))


def settings_differences(earlier: dict, now: dict, where: tuple = None) -> list:
    """The flags that differ, as "--flag EARLIER (now NOW)", or with `where` (what earlier is, what now
    is) as "--flag EARLIER there, NOW in x". The input's contents are not a flag: a resumed run checks
    them row by row (ProgressFile.todo), a finished one encodes again (already_complete)."""
    keys = [key for key in now if key != "input_fingerprint" and earlier.get(key) != now.get(key)]
    if where is None:
        return [f"--{key} {earlier.get(key)} (now {now.get(key)})" for key in keys]
    return [f"--{key} {earlier.get(key)} {where[0]}, {now.get(key)} {where[1]}" for key in keys]


def input_fingerprint(inputs: list, ref_audio: str = None) -> str:
    """sha256 of the inputs as they are now: a file's bytes; a folder's file names, sizes and times;
    and the size and time of every recording a JSONL or metadata.csv names (and of --ref_audio), so
    that a recording fixed or replaced since is encoded again."""
    digest = hashlib.sha256()

    def add_file_state(file: Path, name: str):
        state = recording_state(file)
        digest.update(f"{name}\0{state[0]}\0{state[1]}\n".encode() if state else f"{name}\0-\n".encode())

    for layout, path in inputs:
        if path.is_dir():
            for file in files_below(path):
                add_file_state(file, str(file.relative_to(path)))
            continue
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        for item in read_input(layout, path):
            for name in ("audio", "ref_audio") if isinstance(item, InputRow) else ():
                if isinstance(item.row.get(name), str):
                    add_file_state(Path(item.row[name]), item.row[name])
    if ref_audio:
        add_file_state(Path(ref_audio), ref_audio)
    return digest.hexdigest()


def recording_state(file) -> list:
    """[size, modification time in ns] of a file as it is now, None if it is not a file: a recording
    replaced since an earlier run has another."""
    file = Path(file)
    if not file.is_file():
        return None
    stat = file.stat()
    return [stat.st_size, stat.st_mtime_ns]


def input_state(clip) -> dict:
    """What a progress line records of its input row, to tell on a resume whether the row was fixed (its
    text, speaker, language, reference or segments) or its recording replaced since it was encoded."""
    row = json.dumps(dict(row=clip.row, segments=clip.segments, line=clip.input), sort_keys=True, ensure_ascii=False)
    return dict(row_sha256=hashlib.sha256(row.encode()).hexdigest(), recording=recording_state(clip.row["audio"]))


def check_inputs(inputs: list, output: Path):
    """Refuse, before any work, inputs whose rows would be read twice, and an output whose own files
    a folder input would read back as recordings next time."""
    for index, (_, path) in enumerate(inputs):
        for _, earlier in inputs[:index]:
            if os.path.samefile(path, earlier):
                raise SystemExit(f"error: --input {path} is given twice (also as {earlier}): its rows would be "
                                 f"read twice")
    for layout, folder in inputs:
        if layout != "folder":  # a folder input reads every audio file below it
            continue
        for inner_layout, inner in inputs:
            if inner_layout != "jsonl" and folder in inner.parents:
                raise SystemExit(f"error: --input {inner} lies inside the --input folder {folder}: its recordings "
                                 f"would be read twice. Give one of the two.")
        if folder in output.parents:
            raise SystemExit(f"error: --output_jsonl {output} lies inside the --input folder {folder}: the next run "
                             f"would read the files written beside it (the chosen references) as recordings. Choose "
                             f"an --output_jsonl outside {folder}.")


# ---------------------------------------------------------------------------------------------
# The run: read and check rows, decode and encode what is not done yet, publish
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    output = Path(args.output_jsonl).expanduser().resolve()
    if output.is_dir():
        raise SystemExit(f"error: --output_jsonl {args.output_jsonl} is a folder: give the file to write, e.g. "
                         f"{Path(args.output_jsonl) / 'train.jsonl'}")
    if args.merge_shards:
        with lock_output(output):
            return merge_shards(output, args.num_shards)
    if not args.validate_only:
        args.tokenizer_model_path = speech_tokenizer_folder(args.tokenizer_model_path)
    languages = languages_of_tokenizer_folder(args.tokenizer_model_path)
    if args.language is not None:
        problem = language_problem(args.language, languages)
        if problem:
            raise SystemExit(f"error: --language {problem}")
        args.language = args.language.strip().lower()
    inputs = [detect_layout(Path(value).expanduser().resolve()) for value in args.input]
    if output in [path for _, path in inputs]:
        raise SystemExit(f"error: --output_jsonl {args.output_jsonl} is also an --input: it would be overwritten. "
                         f"Choose another --output_jsonl.")
    check_inputs(inputs, output)
    settings = run_settings(args, inputs)
    own_output = shard_output(output, args.shard_index, args.num_shards)
    with lock_output(own_output):
        summary = prepare_or_resume(args, inputs, own_output, settings, languages)
    if args.merge_when_done:
        wait_for_shards(output, args.num_shards, settings["input_fingerprint"])
        return merge_shards(output, args.num_shards)
    return summary


def prepare_or_resume(args, inputs: list, own_output: Path, settings: dict, languages: list) -> dict:
    """This process's output: already complete, carried on from its progress file, or prepared anew."""
    if args.validate_only and own_output.exists():
        raise SystemExit(f"error: {own_output} exists: --validate_only would overwrite its rejects, summary and "
                         f"report. Choose another --output_jsonl to check the data.")
    try:
        summary = None
        if not args.validate_only and own_output.exists() and not beside(own_output, ".partial").exists():
            summary = already_complete(own_output, settings)
            if summary is None and beside(own_output, ".encoded").exists():  # it said so: only what changed
                os.replace(beside(own_output, ".encoded"), beside(own_output, ".partial"))
        return summary or prepare(args, inputs, own_output, settings, languages)
    except KeyboardInterrupt:
        partial = progress_path(own_output, args.validate_only)
        raise SystemExit(f"interrupted; run the same command again to carry on from {partial}") from None


def lock_output(output: Path):
    """Create OUTPUT's folder and hold OUTPUT.lock (the open file; its `with` releases it). Two runs writing
    one output would interleave their lines in its progress file; the second is stopped here instead,
    and a folder this user cannot write to is named before any work is done."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        handle, holder = output_lock.hold(beside(output, ".lock"))
    except OSError as error:
        raise SystemExit(f"error: --output_jsonl {output}: cannot write in {error.filename or output.parent} "
                         f"({error.strerror}); choose a folder you can write to") from None
    if holder:
        raise SystemExit(f"error: another prepare_codes.py run ({holder}) is writing {output}; wait for it to end, "
                         f"or give another --output_jsonl")
    return handle


def progress_path(output: Path, validate_only: bool) -> Path:
    return beside(output, ".validate.partial" if validate_only else ".partial")


def already_complete(output: Path, settings: dict):
    """The summary of an OUTPUT this command has already written from this input, or None where the
    input has changed since (rows added or fixed): then it is encoded again."""
    summary_path = beside(output, ".summary.json")
    if not summary_path.exists():
        raise SystemExit(f"error: {output} exists, but not as prepare_codes.py's output (no {summary_path.name} "
                         f"beside it). Choose another --output_jsonl, or delete it.")
    summary = json.loads(summary_path.read_text())
    differences = settings_differences(summary["settings"], settings)
    if differences:
        raise SystemExit(f"error: {output} is complete, but was written with other settings: {', '.join(differences)}. "
                         f"Delete it, or choose another --output_jsonl.")
    if summary["settings"].get("input_fingerprint") != settings["input_fingerprint"]:
        print(f"the input has changed since {output} was written: encoding it again"
              + (" where it changed" if beside(output, ".encoded").exists() else ""))
        return None
    print(f"{output} is already complete and the input (its rows and the recordings they name) is unchanged; "
          f"nothing to do (delete it to encode again)")
    return summary


def prepare(args, inputs: list, output: Path, settings: dict, languages: list) -> dict:
    """Check, decode and encode what is not done yet, then publish; `languages`: what a row may name."""
    limits = Limits(args.min_seconds, args.max_seconds)
    checks = AudioChecks(limits, args.silence_dbfs, args.clipped_fraction, args.reject_clipped,
                         Processing(args.trim, args.trim_padding_seconds, args.max_segment_seconds,
                                    args.min_pause_seconds, settings["loudness_lufs"]),
                         max_clipped_fraction=args.max_clipped_fraction)
    if args.ref_audio:
        problem = audio.probe(settings["ref_audio"])[1]
        problem = problem[1] if problem else checks.reference_problem(settings["ref_audio"], audio.TOKENIZER_SAMPLE_RATE)
        if problem:
            raise SystemExit(f"error: --ref_audio {args.ref_audio}: {problem}")
    checker = RowChecker(limits, settings["ref_audio"], args.speaker, args.language, languages,
                         transcribe=bool(args.asr_model))
    planned, rejects = [], []
    for layout, input_path in inputs:
        found = len(planned) + len(rejects)
        for item in tqdm(read_input(layout, input_path, args.speaker_from_folder), desc=f"checking {layout} rows",
                         unit="row"):
            checked = checker.check(item)
            (rejects if isinstance(checked, Reject) else planned).append(checked)
        if len(planned) + len(rejects) == found:
            raise SystemExit(f"error: {input_path}: no rows found (read as the {layout} layout)")
        if layout == "folder" and args.shard_index == 0:
            if args.speaker_from_folder:
                say_if_folders_share_a_speaker(planned[found:])
                loose = sum("speaker" not in clip.row for clip in planned[found:])
                if loose:  # the trainer refuses rows without a speaker unless --speaker_name names one
                    print(f"note: {loose} clips lie directly in {input_path}, in no speaker's folder, and have no "
                          f"speaker: pass --speaker NAME for them, or the trainer's --speaker_name applies")
            else:
                say_if_speakers_may_be_folders(input_path, planned[found:] + rejects)
    for field_name, count in checker.own_values.items():
        if count and args.shard_index == 0:  # the flag is a default: a row's own value wins
            print(f"note: {count} rows name their own {field_name}, which --{field_name} "
                  f"{checker.defaults[field_name]} does not replace (it fills in rows without one)")
    cut_with_text = [clip.source for clip in planned
                     if clip.segments is None and "text" in clip.row and clip.seconds > args.max_seconds]
    if cut_with_text and args.shard_index == 0:
        print(f"note: {len(cut_with_text)} takes too long to keep whole have a text of their own (e.g. "
              f"{cut_with_text[0]}), which cannot be placed on the pieces they are cut into: speech recognition "
              f"writes each piece's text. Give their \"segments\" to keep your words.")
    # Clip k of the longest-first order goes to shard k % N: every shard gets the same mix of lengths.
    # Longest first also puts the most memory-hungry batches at the start.
    clips = sorted(planned, key=lambda clip: (-clip.seconds, input_order(clip.source)))
    clips = clips[args.shard_index::args.num_shards]
    rejects = rejects if args.shard_index == 0 else []  # shard 0 reports rows rejected before decoding
    show_reject = RejectPrinter()
    for reject in rejects:
        show_reject(reject)

    progress = ProgressFile(progress_path(output, args.validate_only), settings)
    todo = progress.todo(clips)
    throughput = new_throughput()
    if todo:
        print(f"{len(todo)} of {len(clips)} recordings to decode in this run ({len(clips) - len(todo)} already done), "
              f"{len(rejects)} rows rejected before decoding")
        done_seconds = sum(clip.seconds for clip in clips) - sum(clip.seconds for clip in todo)
        throughput = decode_and_encode(todo, args, checks, progress, show_reject, done_seconds, len(clips))
    progress.close()

    latest, planned_sources = {}, {clip.source for clip in clips}  # a row encoded again replaces its earlier line
    for offset, entry in read_lines(progress.path) if progress.path.exists() else []:
        if entry.get("source") in planned_sources:
            latest[entry["source"]] = offset, entry
    kept, decode_rejects = [], []
    for offset, entry in latest.values():
        kept += [ClipInfo.of(row, (progress.path, offset, index), input_order(row["source"]))
                 for index, row in enumerate(entry["kept"])]
        decode_rejects += entry["rejected"]
    summary = publish(output, kept, [asdict(reject) for reject in rejects] + decode_rejects, settings, throughput,
                      write_rows=not args.validate_only, check_dataset=args.num_shards == 1, show_reject=show_reject)
    if progress.path.exists() and not args.validate_only:  # kept for a rerun after rows are fixed
        os.replace(progress.path, beside(output, ".encoded"))
    elif progress.path.exists():
        progress.path.unlink()
    if not summary["clips"] and args.num_shards == 1:
        raise SystemExit(f"error: no usable clips: all {summary['rejected']} rows were rejected "
                         f"(reasons in {beside(output, '.rejects.jsonl')})")
    return summary


def say_if_speakers_may_be_folders(folder: Path, rows: list):
    """A folder input's recordings in several folders directly below it are one voice unless
    --speaker_from_folder says otherwise: say so, naming the folders, since a folder per speaker
    (VCTK, LibriTTS) read as one voice trains a blend of them all."""
    inner = [Path(row.source).relative_to(folder).parts for row in rows if Path(row.source).is_relative_to(folder)]
    names = sorted({parts[0] for parts in inner if len(parts) > 1})
    if len(names) > 1:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        print(f"note: the recordings lie in {len(names)} folders below {folder} ({shown}), read as one voice: if "
              f"each folder is a speaker, run again with --speaker_from_folder")


def say_if_folders_share_a_speaker(clips: list):
    """Speaker folders whose names differ only in case or spaces ("Anna", "anna") are one speaker: the
    trainer and generation look names up lower-cased. Say so, naming them."""
    folders = {}  # the speaker as the trainer reads it -> the folder names that give it
    for clip in clips:
        if clip.row.get("speaker"):
            folders.setdefault(clip.row["speaker"].strip().lower(), set()).add(clip.row["speaker"])
    for speaker, names in sorted(folders.items()):
        if len(names) > 1:
            print(f"note: the folders {' and '.join(map(repr, sorted(names)))} are one speaker, {speaker!r}: "
                  f"speaker names are compared lower-cased. Rename one to keep them apart")


# ---------------------------------------------------------------------------------------------
# Decoding (worker processes), speech recognition and encoding
# ---------------------------------------------------------------------------------------------

class RejectPrinter:
    def __init__(self):
        self.count = 0

    def __call__(self, reject: Reject):
        self.count += 1
        if self.count <= SHOWN_REJECTS:
            tqdm.write(f"rejected: {reject.message()}", file=sys.stderr)
        elif self.count == SHOWN_REJECTS + 1:
            tqdm.write("rejected: ... (more in the rejects file)", file=sys.stderr)


class DecodedBatches:
    """Item i: batch i's clips through AudioChecks.process, done in a worker process while the
    tokenizer encodes (a map-style dataset for torch's DataLoader)."""

    def __init__(self, batches: list, checks: AudioChecks, sample_rate: int, frame_samples: int):
        self.batches, self.checks = batches, checks
        self.sample_rate, self.frame_samples = sample_rate, frame_samples

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.checks.process(self.batches[index], self.sample_rate, self.frame_samples)


def as_is(item):
    return item  # the loader's default collate would turn the arrays into tensors


def die_with_parent(_worker_id):
    """A killed run must not leave its decoding workers behind: an orphaned worker blocks for ever
    writing to a queue nobody reads. Linux only; elsewhere workers notice only when idle."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def load_tokenizer(path, device):
    from qwen3_tts_sft.quiet import import_qwen_tts  # without its flash-attn and SoX notices

    return import_qwen_tts().Qwen3TTSTokenizer.from_pretrained(path, device_map=device)


def decode_and_encode(todo: list, args, checks: AudioChecks, progress, show_reject, done_seconds: float,
                      total: int) -> dict:
    """Decode `todo` (and transcribe, and encode unless --validate_only), appending each input row's
    output clips and rejects to the progress file, batch by batch."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, sample_rate, frame_samples = None, audio.TOKENIZER_SAMPLE_RATE, audio.SAMPLES_PER_FRAME
    if not args.validate_only:
        tokenizer = load_tokenizer(args.tokenizer_model_path, device)
        sample_rate, frame_samples = tokenizer.get_input_sample_rate(), tokenizer.get_encode_downsample_rate()
    transcriber = None
    if args.asr_model:
        from qwen3_tts_sft.transcription import Transcriber

        transcriber = Transcriber(absolute(args.asr_model), device)
    batches = [todo[start:start + args.batch_size] for start in range(0, len(todo), args.batch_size)]
    loader = torch.utils.data.DataLoader(
        DecodedBatches(batches, checks, sample_rate, frame_samples), batch_size=None,
        collate_fn=as_is, num_workers=args.num_workers, prefetch_factor=4 if args.num_workers else None,
        worker_init_fn=die_with_parent)
    kill_after = int(os.environ.get(KILL_HOOK, "0"))
    stats = new_throughput()
    bar = tqdm(total=total, initial=total - len(todo), unit="clip", desc="checking" if tokenizer is None else "encoding",
               dynamic_ncols=True)
    started, done_now = time.perf_counter(), 0.0
    for batch_number, takes in enumerate(loader, start=1):
        pieces = [piece for take in takes for piece in take if piece.reject is None]
        if transcriber is not None:
            transcribe(pieces, transcriber, sample_rate, args.asr_check, args.max_cer)
        good = [piece for piece in pieces if piece.reject is None]
        codes = {}
        if tokenizer is not None:
            encode_started = time.perf_counter()
            for start in range(0, len(good), args.batch_size):  # a long take's pieces can outnumber a batch
                chunk = good[start:start + args.batch_size]
                encoded = tokenizer.encode([piece.samples for piece in chunk], sr=sample_rate).audio_codes
                # .tolist() waits for the GPU: the timing is honest
                codes.update({id(piece): frames.cpu().tolist() for piece, frames in zip(chunk, encoded, strict=True)})
            stats["tokenizer_seconds"] += time.perf_counter() - encode_started
        progress.append([take_entry(take, codes) for take in takes])
        for take in takes:
            for piece in take:
                if piece.reject is not None:
                    show_reject(piece.reject)
        stats["encoded_clips"] += len(codes)
        stats["encoded_audio_seconds"] += sum(piece.seconds for piece in good if id(piece) in codes)
        stats["wall_seconds"] = time.perf_counter() - started
        # --validate_only encodes nothing: its bar counts the audio checked.
        done_now += sum(piece.seconds for piece in good if tokenizer is None or id(piece) in codes)
        bar.update(len(takes))
        bar.set_postfix_str(f"{(done_seconds + done_now) / 3600:.2f} h audio done, "
                            f"{done_now / stats['wall_seconds']:.0f}x real time")
        if batch_number == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    return stats


def transcribe(pieces: list, transcriber, sample_rate: int, check: bool, max_cer: float):
    """Text for the pieces without it; with `check`, the error rate of the others' text."""
    from qwen3_tts_sft.transcription import Failure, character_error_rate

    heard = [piece for piece in pieces if "text" not in piece.row or check]
    for piece, text in zip(heard, transcriber([piece.samples for piece in heard], sample_rate)):
        if isinstance(text, Failure) and "text" not in piece.row:
            piece.rejected("missing_transcript", "text", f"speech recognition failed on it ({text})")
            continue
        if isinstance(text, Failure):  # its own text stays, unchecked
            piece.quality["asr_error"] = str(text)
            continue
        if "text" not in piece.row:
            if transcript_problem(text):  # nothing, or only punctuation ("...")
                piece.rejected("empty_transcript", "text", "speech recognition heard no words")
                continue
            piece.row.update(text=text, text_from="asr")
            continue
        cer = character_error_rate(piece.row["text"], text)
        piece.quality.update(asr_text=text, cer=round(cer, 3))
        if cer > max_cer:
            piece.flags["transcript_mismatch"] = (f"speech recognition heard {text!r}: character error rate "
                                                  f"{cer:.2f} (--max_cer {max_cer:g})")


def new_throughput() -> dict:
    """Speed of this run's encoding: audio seconds per wall second is what the summary reports."""
    return dict(encoded_clips=0, encoded_audio_seconds=0.0, wall_seconds=0.0, tokenizer_seconds=0.0, shards=1)


def take_entry(take: list, codes: dict) -> dict:
    """The progress line of one input row: its kept output rows and its rejects."""
    clip = take[0].clip
    kept = [output_row(piece, codes.get(id(piece))) for piece in take if piece.reject is None]
    return dict(source=clip.source, audio=clip.row["audio"], **input_state(clip), kept=kept,
                rejected=[asdict(piece.reject) for piece in take if piece.reject is not None])


def output_row(piece, codes) -> dict:
    row = dict(piece.row, source=piece.source)
    if piece.clipped_fraction is not None:
        row["clipped_fraction"] = round(piece.clipped_fraction, 6)
    if piece.flags:
        row["flags"] = piece.flags
    row["quality"] = piece.quality
    if codes is not None:
        row["audio_codes"] = codes
    return row


# ---------------------------------------------------------------------------------------------
# Progress file, and publishing the finished dataset
# ---------------------------------------------------------------------------------------------

class ProgressFile:
    """OUTPUT.partial: a settings line, then a line per finished input row:
    {"source", "audio", "row_sha256", "recording", "kept": [output rows], "rejected": [rejects]}.

    Appended and flushed batch by batch, so a crash loses at most the batch being written. The file
    is created with the first batch: a run that fails before it (a wrong tokenizer path) leaves nothing.
    """

    def __init__(self, path: Path, settings: dict):
        self.path, self.settings, self.handle = path, settings, None
        self.done = {}  # source -> input_state of the row when it was encoded
        cut = cut_partial_last_line(path) if path.exists() else 0
        if cut:
            print(f"{path}: cut off a half-written last line ({cut} bytes) left by an interrupted run")
        damaged = drop_damaged_lines(path) if path.exists() else []
        if damaged:
            print(f"{path}: left out {len(damaged)} damaged lines (line {', '.join(map(str, damaged[:5]))}"
                  f"{', ...' if len(damaged) > 5 else ''}); their rows are encoded again")
        if path.exists() and path.stat().st_size:
            lines = read_lines(path)
            _, first = next(lines)
            differences = settings_differences(first.get("settings", {}), settings)
            if differences:
                raise SystemExit(f"error: {path} holds a run started with other settings: {', '.join(differences)}. "
                                 f"Run with the earlier settings to carry on, or delete it to start over.")
            for _, entry in lines:  # a row encoded again has a later line
                self.done[entry["source"]] = {key: entry.get(key) for key in ("row_sha256", "recording")}
            print(f"resuming from {path}: {len(self.done)} clips already done")
            self.handle = open(path, "a", encoding="utf-8")

    def todo(self, clips: list) -> list:
        """The clips to encode: those not done yet, and those whose row or recording changed since the
        interrupted run encoded them (a line written before this was recorded counts as changed)."""
        changed = {clip.source for clip in clips if clip.source in self.done
                   and self.done[clip.source] != input_state(clip)}
        gone = set(self.done) - {clip.source for clip in clips}
        if changed:
            print(f"{len(changed)} rows or their recordings changed since the earlier run encoded them: "
                  f"encoding them again (e.g. {min(changed)})")
        if gone:
            print(f"{len(gone)} rows the earlier run encoded are no longer in the input: left out "
                  f"(e.g. {min(gone)})")
        return [clip for clip in clips if clip.source not in self.done or clip.source in changed]

    def append(self, entries: list):
        if self.handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "w", encoding="utf-8")
            self.handle.write(json.dumps(dict(settings=self.settings)) + "\n")
        self.handle.write("".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries))
        self.handle.flush()

    def close(self):
        if self.handle is not None:
            self.handle.close()


def cut_partial_last_line(path: Path) -> int:
    """Truncate the file after its last newline; returns the bytes cut (a line a kill interrupted)."""
    with open(path, "rb+") as handle:
        size = position = handle.seek(0, os.SEEK_END)
        keep = 0
        while position > 0:
            start = max(0, position - (1 << 16))
            handle.seek(start)
            newline = handle.read(position - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            position = start
        handle.truncate(keep)
    return size - keep


def drop_damaged_lines(path: Path) -> list:
    """Rewrite a progress file without its lines that are not JSON (a disk fault, or a writer that
    was not this script); returns their line numbers. Only the rows on them are lost, and encoded
    again. A damaged first line, the settings, leaves nothing to check a resume against."""
    kept, damaged = [], []
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            try:
                json.loads(line)
                kept.append(line)
            except ValueError:
                damaged.append(line_number)
    if 1 in damaged:
        raise SystemExit(f"error: {path}:1, the run's settings, is damaged: delete {path} to start over")
    if damaged:
        rewritten = beside(path, ".rewrite")
        rewritten.write_bytes(b"".join(kept))
        os.replace(rewritten, path)
    return damaged


def read_lines(path: Path):
    """(byte offset, parsed JSON) for each line of a file this script wrote."""
    with open(path, "rb") as handle:
        offset = 0
        for line_number, line in enumerate(handle, start=1):
            try:
                entry = json.loads(line)
            except ValueError as error:
                raise SystemExit(f"error: {path}:{line_number}: not valid JSON ({error}); "
                                 f"the file is damaged") from None
            yield offset, entry
            offset += len(line)


class RowFiles:
    """Reads a row back from where ClipInfo.position says: a line of an output (index None), or the
    index-th kept row of a progress line. Keeps the files open, and the last line parsed."""

    def __init__(self):
        self.handles, self.line = {}, (None, None)

    def row(self, position: tuple) -> dict:
        path, offset, index = position
        if self.line[0] != (path, offset):
            handle = self.handles.setdefault(path, open(path, "rb"))
            handle.seek(offset)
            self.line = ((path, offset), json.loads(handle.readline()))
        entry = self.line[1]
        return dict(entry if index is None else entry["kept"][index])

    def close(self):
        for handle in self.handles.values():
            handle.close()


def publish(output: Path, clips: list, rejects: list, settings: dict, throughput: dict, write_rows: bool = True,
            check_dataset: bool = True, show_reject=None) -> dict:
    """Write OUTPUT (rows in input order), its rejects, summary and report. OUTPUT comes last, by a rename.

    clips: ClipInfo of every kept row. check_dataset: run the checks across clips and choose the
    references (off in a shard: they need every shard's clips, and run at the merge).
    """
    clips = sorted(clips, key=lambda clip: clip.order)
    for before, after in zip(clips, clips[1:]):
        if before.order == after.order:
            raise SystemExit(f"error: the row {after.source} is written twice ({before.position[0]}, {after.position[0]})")
    checks = DatasetChecks(settings["flag_rate_ratio"], settings["reject_rate_ratio"], settings["references_per_speaker"])
    dataset_rejects, medians = checks.run(clips) if check_dataset else ({}, {})
    kept = [clip for clip in clips if clip.source not in dataset_rejects]
    rows = RowFiles()
    show_reject = show_reject or RejectPrinter()
    for clip in clips:
        if clip.source in dataset_rejects:
            reason, problem = dataset_rejects[clip.source]
            row = rows.row(clip.position)
            if row.get("text_from") == "asr":
                problem += f"; the text was heard by speech recognition: {row['text']!r}"
            reject = Reject(clip.source, reason, "audio" if reason == "duplicate_audio" else "text", problem,
                            input=line_to_feed_again(row))
            show_reject(reject)
            rejects.append(asdict(reject))
    references = {}
    if check_dataset:
        folder = beside(output, ".references")
        for speaker, chosen in checks.references(kept).items():
            references[speaker] = [(clip, data_report.reference_file(clip, folder, number) if write_rows
                                    else clip.row_audio if clip.segment is None else None)
                                   for number, clip in enumerate(chosen, start=1)]
    summary = DatasetSummary()
    temporary = beside(output, ".tmp")
    uses = {}  # speaker -> rows given a chosen reference so far: they take turns
    with open(temporary, "w", encoding="utf-8") as out:
        for clip in kept:
            row = rows.row(clip.position)
            codes = row.pop("audio_codes", None)
            if clip.flags:
                row["flags"] = clip.flags
            if not row.get("ref_audio") and clip.speaker in references:
                chosen = references[clip.speaker]
                row["ref_audio"] = chosen[uses.get(clip.speaker, 0) % len(chosen)][1]
                uses[clip.speaker] = uses.get(clip.speaker, 0) + 1
            if codes is not None:
                row["audio_codes"] = codes
            summary.add(clip, row)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())
    rows.close()
    rejects = sorted(rejects, key=lambda reject: input_order(reject["source"]))
    write_atomically(beside(output, ".rejects.jsonl"),
                     "".join(json.dumps(reject, ensure_ascii=False) + "\n" for reject in rejects))
    # An empty dataset is not published (a rerun would take it as done), except as a shard: the merge needs it.
    complete = write_rows and bool(kept or not check_dataset)
    report = summary.report(output, rejects, settings, throughput, complete)
    quality = dict(report, speakers=data_report.speaker_entries(kept, medians, references),
                   clips_report=[data_report.clip_entry(clip, medians, summary.text_from.get(clip.source))
                                 for clip in kept], plot=str(beside(output, ".report.png")))
    data_report.plot(beside(output, ".report.png"),
                     kept, [clip for clip in clips if dataset_rejects.get(clip.source, ("",))[0] == "speaking_rate"])
    write_atomically(beside(output, ".report.json"), json.dumps(quality, indent=2, ensure_ascii=False) + "\n")
    write_atomically(beside(output, ".summary.json"), json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if complete:
        os.replace(temporary, output)
    else:
        temporary.unlink()
    print_summary(report)
    return report


def write_atomically(path: Path, text: str):
    temporary = beside(path, ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------
# Summary, and merging shards
# ---------------------------------------------------------------------------------------------

class DatasetSummary:
    """What the training set holds, from its rows. A clip's length is its frames / 12.5, what training sees;
    the duration histogram alone counts each clip by its own length, before the padding to whole frames
    (up to 80 ms, which would move a 2.0 s clip into "2-3 s").

    characters_per_second is the speaking rate: characters of text (spaces and punctuation included)
    per second of clip, over all clips; a generated clip of N characters should last about N / rate.
    characters_per_second_by_group has it per rate group (audio.rate_group: the language, else the
    script), where it is comparable: Chinese text is read at a third of English's characters a second.
    """

    def __init__(self):
        self.seconds, self.characters, self.speakers, self.clipped = [], [], [], 0
        self.own_seconds = []  # each clip's length before the padding: where the histogram puts it
        self.flags = dict.fromkeys(FLAGS, 0)
        self.text_from = {}  # source -> "asr", for the clips whose text speech recognition wrote
        self.rates = SpeakingRates()

    def add(self, clip: ClipInfo, row: dict):
        self.seconds.append(clip.seconds)
        self.own_seconds.append(clip.quality.get("seconds", clip.seconds))
        self.characters.append(audio.spoken_characters(clip.text))
        self.speakers.append(clip.speaker)
        self.rates.add(clip.text, round(clip.seconds * FRAMES_PER_SECOND), row.get("speaker") or NO_SPEAKER,
                       clip.language)
        self.clipped += "clipped_fraction" in row
        for name in clip.flags:
            self.flags[name] += 1
        if row.get("text_from"):
            self.text_from[clip.source] = row["text_from"]

    def report(self, output: Path, rejects: list, settings: dict, throughput: dict, complete: bool) -> dict:
        seconds, characters = np.array(self.seconds), np.array(self.characters)
        speakers = np.array(self.speakers, dtype=object)
        edges = (0,) + DURATION_BUCKETS + (math.inf,)
        # A bucket holds the clips up to its upper edge: a clip of 2.0 s is a "1-2 s" one.
        counts = np.bincount(np.searchsorted(DURATION_BUCKETS, self.own_seconds, side="left"),
                             minlength=len(DURATION_BUCKETS) + 1)
        labels = [f"{low}-{high} s" for low, high in zip(edges, edges[1:-1])] + [f"{edges[-2]}+ s"]
        rates = characters / seconds if len(seconds) else np.zeros(0)
        speaking_rates = self.rates.rates()
        overall = speaking_rates.get(SpeakingRates.ALL, {})
        groups = {group: rates for group, rates in sorted(speaking_rates.items()) if group != SpeakingRates.ALL}
        return dict(
            complete=complete,
            output=str(output),
            clips=len(seconds),
            hours=round(float(seconds.sum()) / 3600, 4),
            characters_per_second=round(overall[SpeakingRates.ALL], 3) if len(seconds) else None,
            characters_per_second_by_group={group: round(rates[SpeakingRates.ALL], 3)
                                            for group, rates in groups.items()},
            characters_per_second_percentiles={f"p{p}": round(float(np.percentile(rates, p)), 3)
                                               for p in (10, 50, 90)} if len(rates) else None,
            speakers={name: dict(clips=int((speakers == name).sum()),
                                 hours=round(float(seconds[speakers == name].sum()) / 3600, 4),
                                 characters_per_second=round(overall[name.lower()], 3),
                                 characters_per_second_by_group={group: round(rates[name.lower()], 3)
                                                                 for group, rates in groups.items()
                                                                 if name.lower() in rates})
                      for name in sorted(set(self.speakers))},
            duration_histogram=dict(zip(labels, (int(count) for count in counts))),
            clipped_clips=self.clipped,
            flagged_clips=self.flags,
            transcribed_clips=len(self.text_from),
            rejected=len(rejects),
            rejects_by_reason={reason: sum(reject["reason"] == reason for reject in rejects)
                               for reason in REJECT_REASONS},
            throughput=dict({key: round(value, 3) for key, value in throughput.items()}, audio_seconds_per_wall_second=
                            round(throughput["encoded_audio_seconds"] / max(throughput["wall_seconds"], 1e-9), 1)),
            report=str(beside(output, ".report.json")),
            settings=settings,
        )


def print_summary(report: dict):
    speed = report["throughput"]
    written = (f"written to {report['output']}" if report["complete"] else
               "checked (--validate_only: nothing encoded)" if report["settings"]["tokenizer_model_path"] is None
               else "usable: nothing written")
    print(f"\n{report['clips']} clips, {report['hours']:.2f} h of audio {written}")
    if report["clips"]:
        print(f"  speaking rate {report['characters_per_second']} characters/s; "
              f"clipped clips kept: {report['clipped_clips']}; transcribed: {report['transcribed_clips']}")
    for name, speaker in report["speakers"].items():
        by_group = speaker["characters_per_second_by_group"]
        groups = f" ({', '.join(f'{group} {rate}' for group, rate in by_group.items())})" if len(by_group) > 1 else ""
        print(f"  speaker {name}: {speaker['clips']} clips, {speaker['hours']:.2f} h, "
              f"{speaker['characters_per_second']} characters/s{groups}")
    print("  durations: " + ", ".join(f"{label} {count}" for label, count in report["duration_histogram"].items()))
    flags = ", ".join(f"{flag} {count}" for flag, count in report["flagged_clips"].items() if count)
    print(f"  flagged (kept): {flags or 'none'}; per clip in {report['report']}")
    reasons = ", ".join(f"{reason} {count}" for reason, count in report["rejects_by_reason"].items() if count)
    where = f": {reasons} (see {report['output']}.rejects.jsonl)" if reasons else ""
    print(f"  rejected {report['rejected']} (rows, and pieces of long takes){where}")
    if speed["encoded_clips"]:
        shards = speed.get("shards", 1)
        busy = speed["tokenizer_seconds"] / max(speed["wall_seconds"] * shards, 1e-9)  # the shards ran side by side
        print(f"  encoded {speed['encoded_audio_seconds'] / 3600:.3f} h of audio in {speed['wall_seconds']:.1f} s: "
              f"{speed['audio_seconds_per_wall_second']:.0f} audio seconds per wall second, the tokenizer"
              f"{'s (one a shard)' if shards > 1 else ''} busy {busy:.0%} of the time")


def wait_for_shards(output: Path, count: int, fingerprint: str):
    """Under a launcher, process 0 waits for the other shards' outputs of this input (the launcher stops
    all if one fails): a shard's output from an earlier run, before the input was fixed, is not one."""
    missing, shown = [shard_output(output, index, count) for index in range(count)], None
    while missing := [path for path in missing if shard_fingerprint(path) != fingerprint]:
        if missing != shown:
            print(f"waiting for {len(missing)} shard(s) to finish: {', '.join(path.name for path in missing)}",
                  flush=True)
            shown = missing
        time.sleep(2)


def shard_fingerprint(path: Path):
    """The input fingerprint a complete shard output was made from, None while there is none (its summary
    is written before the output is renamed into place)."""
    if not path.exists():
        return None
    try:
        return json.loads(beside(path, ".summary.json").read_text())["settings"].get("input_fingerprint")
    except (OSError, ValueError, KeyError):
        return None


def stale_shards(shards: list, settings: list) -> list:
    """The indices of the shards not made from the input as it is now (all agree: none); where the input
    cannot be read any more, those that differ from the newest shard."""
    fingerprints = [shard["input_fingerprint"] for shard in settings]
    if len(set(fingerprints)) == 1:
        return []
    inputs = [(layout, Path(path)) for layout, path in zip(settings[0]["layout"], settings[0]["input"])]
    try:
        now = input_fingerprint(inputs, settings[0]["ref_audio"])
    except OSError:
        now = fingerprints[max(range(len(shards)), key=lambda index: shards[index].stat().st_mtime)]
    return [index for index, fingerprint in enumerate(fingerprints) if fingerprint != now]


def missing_shards(output: Path, count: int, missing: list) -> str:
    """What became of each missing shard, what to run, and shards of another --num_shards lying beside
    them (jobs started with different counts share out the rows differently: none of them merge)."""
    states = []
    for path in [shard_output(output, index, count) for index in missing]:
        partial = beside(path, ".partial")
        states.append(f"{path} (" + (f"stopped before it finished; its run carries on from {partial.name}"
                                     if partial.exists() else "not made") + ")")
    text = (f"missing {'; '.join(states)}. Run the same command with --shard_index "
            f"{' / '.join(map(str, missing))} --num_shards {count}, then merge")
    pattern = re.compile(re.escape(output.stem) + r"\.shard-\d+-of-(\d+)" + re.escape(output.suffix) + "$")
    others = sorted({int(found.group(1)) for path in output.parent.glob(f"{output.stem}.shard-*")
                     if (found := pattern.match(path.name)) and int(found.group(1)) != count})
    if others:
        text += (f". {output.parent} also holds shards made with --num_shards {', '.join(map(str, others))}: every "
                 f"shard job of one dataset needs the same --num_shards (and the merge too)")
    return text


def merge_shards(output: Path, count: int) -> dict:
    """Merge complete shard outputs into OUTPUT, in input order, with their rejects and a summary of the whole."""
    if count < 2:
        raise SystemExit("error: --merge_shards needs --num_shards, the count the shards were made with (>= 2)")
    shards = [shard_output(output, index, count) for index in range(count)]
    missing = [index for index, path in enumerate(shards) if not path.exists()]
    if missing:
        raise SystemExit("error: every shard must be complete to merge; " + missing_shards(output, count, missing))
    reports = [json.loads(beside(path, ".summary.json").read_text()) for path in shards]
    settings = dict(reports[0]["settings"], shard_index=None)
    for path, report in zip(shards, reports):
        differences = settings_differences(dict(report["settings"], shard_index=None), settings,
                                           ("there", f"in {shards[0].name}"))
        if differences:
            # A shard's rows would be cut, trimmed or filtered unlike the rest: one dataset, one set of flags.
            raise SystemExit(f"error: {path} was written with other settings than {shards[0]}: "
                             f"{', '.join(differences)}. Every shard needs the same flags: delete the one made with "
                             f"the flags you did not mean (its .jsonl, .jsonl.partial and .jsonl.encoded), run it "
                             f"again, then merge")
    stale = stale_shards(shards, [report["settings"] for report in reports])
    if stale:
        raise SystemExit(f"error: shards {', '.join(map(str, stale))} were made from the input as it was before it "
                         f"changed (rows fixed or added, recordings replaced): a row would be lost, or written twice. "
                         f"Run {'them' if len(stale) > 1 else 'it'} again (the same command, --shard_index "
                         f"{' / '.join(map(str, stale))}), then merge")
    clips = [ClipInfo.of(row, (path, offset, None), input_order(row["source"]))
             for path in shards for offset, row in read_lines(path)]
    rejects = [reject for path in shards for _, reject in read_lines(beside(path, ".rejects.jsonl"))]
    speeds = [report["throughput"] for report in reports]
    throughput = {key: sum(speed[key] for speed in speeds) for key in ("encoded_clips", "encoded_audio_seconds",
                                                                        "tokenizer_seconds")}
    throughput["wall_seconds"] = max(speed["wall_seconds"] for speed in speeds)  # the shards ran side by side
    throughput["shards"] = count
    summary = publish(output, clips, rejects, settings, throughput)
    if not summary["clips"]:
        raise SystemExit(f"error: no usable clips in any shard (reasons in {beside(output, '.rejects.jsonl')})")
    return summary


if __name__ == "__main__":
    main()
