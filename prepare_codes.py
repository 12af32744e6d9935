"""Turn recordings into 12 Hz speech codes: the training JSONL for sft_12hz_chatterbox.py.

    python prepare_codes.py --tokenizer_model_path Qwen3-TTS-12Hz-1.7B-Base/speech_tokenizer \\
        --input raw.jsonl --output_jsonl train_with_codes.jsonl

--input is a raw JSONL ({"audio", "text", "ref_audio", "speaker", "language"} a line), an LJSpeech
folder (metadata.csv + wavs/), or a folder of audio files with same-named .txt or .lab transcripts
(dataset_layouts.py). Audio in any format soundfile reads is downmixed and resampled (soxr) to the
tokenizer's rate. Bad rows never stop the run: each is rejected with its reason.

Each output row is the input row with absolute paths, `source` (the input "file:line", or the audio
file in a folder), `audio_codes` (frames x 16 ints), and `clipped_fraction` when the clip is clipped.
Rows are in input order. Beside OUTPUT:
    OUTPUT.partial         progress, flushed batch by batch; after a crash or kill, the same command
                           carries on from it (a half-written last line is cut off)
    OUTPUT.rejects.jsonl   one line per rejected row: source, reason, field, problem, input line
    OUTPUT.summary.json    clips, hours, speakers, durations, characters per second, rejects, speed
    OUTPUT                 written last, under a temporary name and then renamed: it exists only
                           when complete

Shards: --shard_index i --num_shards N on each of N GPUs writes OUTPUT with `.shard-i-of-N` before
its extension; then --merge_shards --num_shards N writes OUTPUT. Under `accelerate launch` the
launcher's ranks are the shards and process 0 merges when all are done.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from qwen3_tts_sft.dataset_layouts import (REJECT_REASONS, AudioChecks, Limits, Reject, RowChecker, detect_layout, input_order,
                             read_input)
from qwen3_tts_sft.audio import FRAMES_PER_SECOND, SpeakingRates

# Testing hook, not for users (so not in --help or the README): with this set to N, the process
# SIGKILLs itself right after its Nth batch is written, a crash at a known point for the tests.
KILL_HOOK = "PREPARE_CODES_TEST_KILL_AFTER_BATCHES"
DURATION_BUCKETS = (1, 2, 3, 5, 10, 15, 20, 30)  # upper edges, in seconds, of the summary's histogram
SHOWN_REJECTS = 20                                # printed per run; the rejects file holds them all
NO_SPEAKER = "(no speaker field)"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--input", "--input_jsonl", dest="input",
                      help="raw JSONL, LJSpeech folder (or its metadata.csv), or folder of audio + .txt/.lab")
    data.add_argument("--output_jsonl", required=True,
                      help="training JSONL to write; .partial, .rejects.jsonl and .summary.json go beside it")
    data.add_argument("--ref_audio", default=None,
                      help="reference clip for rows without one (default: such a row's own clip, so the "
                           "trainer's speaker vector is the mean over the speaker's first clips)")
    data.add_argument("--speaker", default=None, help="speaker for rows without one (default: none; the "
                                                      "trainer's --speaker_name then applies)")
    data.add_argument("--language", default=None, help="language for rows without one (default: none, read as auto)")

    filters = parser.add_argument_group("filters (a rejected row goes to OUTPUT.rejects.jsonl with its reason)")
    filters.add_argument("--min_seconds", type=float, default=0.5,
                         help="shorter clips are mostly breaths, clicks or single syllables, and their "
                              "transcripts are the least reliable (default: %(default)s)")
    filters.add_argument("--max_seconds", type=float, default=30.0,
                         help="the trainer drops longer clips by default (--max_audio_seconds 30), and long "
                              "clips take the most GPU memory there (default: %(default)s)")
    filters.add_argument("--silence_dbfs", type=float, default=-50.0,
                         help="clips whose overall RMS level is below this are silent; speech recorded at any "
                              "usable gain sits well above it, a take of room noise below (default: %(default)s)")
    filters.add_argument("--clipped_fraction", type=float, default=0.001,
                         help="a clip with more than this share of samples at full scale counts as clipped: "
                              "marked in its row and counted in the summary (default: %(default)s)")
    filters.add_argument("--reject_clipped", action="store_true",
                         help="reject clipped clips too (off: mild clipping still teaches the voice)")

    encoding = parser.add_argument_group("encoding")
    encoding.add_argument("--tokenizer_model_path",
                          help="the speech tokenizer folder (speech_tokenizer/ inside a model download, "
                               "or Qwen3-TTS-Tokenizer-12Hz)")
    encoding.add_argument("--batch_size", type=int, default=32,
                          help="clips encoded together; batches go longest first, so a size too large for "
                               "GPU memory fails in the first minute, and a rerun with a smaller one resumes "
                               "(default: %(default)s)")
    encoding.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    encoding.add_argument("--num_workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                          help="processes decoding and resampling audio while the tokenizer encodes "
                               "(default: the CPU cores less one, at most 8: one decodes ~1000 s of audio a second)")

    shards = parser.add_argument_group("shards (several GPUs)")
    shards.add_argument("--shard_index", type=int, default=None, help="this process's shard, 0..N-1")
    shards.add_argument("--num_shards", type=int, default=None,
                        help="N (default: 1, or the launcher's WORLD_SIZE under accelerate launch / torchrun)")
    shards.add_argument("--merge_shards", action="store_true",
                        help="merge the N complete shard outputs into --output_jsonl; nothing is encoded")
    args = parser.parse_args(argv)
    resolve_shards(args)
    if not args.merge_shards and not (args.input and args.tokenizer_model_path):
        parser.error("--input and --tokenizer_model_path are required (unless --merge_shards)")
    if not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard_index {args.shard_index} is not in 0..{args.num_shards - 1}")
    if args.batch_size < 1 or args.num_workers < 0 or args.min_seconds > args.max_seconds:
        parser.error("need --batch_size >= 1, --num_workers >= 0 and --min_seconds <= --max_seconds")
    return args


def resolve_shards(args):
    """Shards from the flags, else from the launcher (accelerate launch and torchrun set RANK, WORLD_SIZE)."""
    args.merge_when_done = False
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.num_shards is None and world_size > 1 and not args.merge_shards:
        args.num_shards, args.shard_index = world_size, int(os.environ["RANK"])
        args.merge_when_done = args.shard_index == 0
        if args.device is None and torch.cuda.is_available():
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    args.num_shards = args.num_shards or 1
    args.shard_index = args.shard_index or 0


def shard_output(output: Path, index: int, count: int) -> Path:
    return output if count == 1 else output.with_name(f"{output.stem}.shard-{index}-of-{count}{output.suffix}")


def beside(output: Path, suffix: str) -> Path:
    return output.with_name(output.name + suffix)


def run_settings(args, layout: str, input_path: Path) -> dict:
    """What decides the rows and their codes: a resumed run, or a shard being merged, must match."""
    tokenizer = Path(args.tokenizer_model_path).expanduser()
    return dict(input=str(input_path), layout=layout,
                tokenizer_model_path=str(tokenizer.resolve()) if tokenizer.exists() else args.tokenizer_model_path,
                ref_audio=str(Path(args.ref_audio).expanduser().resolve()) if args.ref_audio else None,
                speaker=args.speaker, language=args.language, min_seconds=args.min_seconds,
                max_seconds=args.max_seconds, silence_dbfs=args.silence_dbfs,
                clipped_fraction=args.clipped_fraction, reject_clipped=args.reject_clipped,
                shard_index=args.shard_index, num_shards=args.num_shards)


def settings_differences(earlier: dict, now: dict) -> list:
    return [f"--{key} {earlier.get(key)} (now {now.get(key)})" for key in now if earlier.get(key) != now.get(key)]


# ---------------------------------------------------------------------------------------------
# The run: read and check rows, encode what is not done yet, publish
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    output = Path(args.output_jsonl).expanduser().resolve()
    if args.merge_shards:
        return merge_shards(output, args.num_shards)
    layout, input_path = detect_layout(Path(args.input).expanduser().resolve())
    settings = run_settings(args, layout, input_path)
    own_output = shard_output(output, args.shard_index, args.num_shards)
    try:
        if own_output.exists() and not beside(own_output, ".partial").exists():
            summary = already_complete(own_output, settings)
        else:
            summary = prepare(args, layout, input_path, own_output, settings)
    except KeyboardInterrupt:
        partial = beside(own_output, ".partial")
        raise SystemExit(f"interrupted; run the same command again to carry on from {partial}") from None
    if args.merge_when_done:
        wait_for_shards(output, args.num_shards)
        return merge_shards(output, args.num_shards)
    return summary


def already_complete(output: Path, settings: dict):
    summary_path = beside(output, ".summary.json")
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    differences = settings_differences(summary["settings"], settings) if summary else []
    if differences:
        raise SystemExit(f"error: {output} is complete, but was written with other settings: {', '.join(differences)}. "
                         f"Delete it, or choose another --output_jsonl.")
    print(f"{output} is already complete; nothing to do (delete it to encode again)")
    return summary


def prepare(args, layout: str, input_path: Path, output: Path, settings: dict) -> dict:
    checker = RowChecker(Limits(args.min_seconds, args.max_seconds), settings["ref_audio"], args.speaker, args.language)
    planned, rejects = [], []
    for item in tqdm(read_input(layout, input_path), desc=f"checking {layout} rows", unit="row"):
        checked = checker.check(item)
        (rejects if isinstance(checked, Reject) else planned).append(checked)
    if not planned and not rejects:
        raise SystemExit(f"error: {input_path}: no rows found (read as the {layout} layout)")
    # Clip k of the longest-first order goes to shard k % N: every shard gets the same mix of lengths.
    # Longest first also puts the most memory-hungry batches at the start.
    clips = sorted(planned, key=lambda clip: (-clip.seconds, input_order(clip.source)))
    clips = clips[args.shard_index::args.num_shards]
    rejects = rejects if args.shard_index == 0 else []  # shard 0 reports rows rejected before decoding
    show_reject = RejectPrinter()
    for reject in rejects:
        show_reject(reject)

    progress = ProgressFile(beside(output, ".partial"), settings)
    todo = progress.todo(clips)
    throughput = new_throughput()
    if todo:
        print(f"{len(clips)} clips in this run ({len(clips) - len(todo)} already done), "
              f"{len(rejects)} rows rejected before decoding")
        checks = AudioChecks(Limits(args.min_seconds, args.max_seconds), args.silence_dbfs,
                             args.clipped_fraction, args.reject_clipped)
        done_seconds = sum(clip.seconds for clip in clips) - sum(clip.seconds for clip in todo)
        throughput = encode(todo, args, checks, progress, show_reject, done_seconds, len(clips))
    progress.close()

    positions, decode_rejects = [], []
    for offset, entry in read_lines(progress.path):
        if "kept" in entry:
            positions.append((input_order(entry["kept"]["source"]), progress.path, offset))
        elif "rejected" in entry:
            decode_rejects.append(entry["rejected"])
    summary = publish(output, positions, [asdict(reject) for reject in rejects] + decode_rejects, settings, throughput)
    progress.path.unlink()
    return summary


# ---------------------------------------------------------------------------------------------
# Decoding (worker processes) and encoding
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


class DecodedBatches(torch.utils.data.Dataset):
    """Item i: batch i's clips through AudioChecks.decode, done in a worker process while the tokenizer encodes."""

    def __init__(self, batches: list, checks: AudioChecks, sample_rate: int, frame_samples: int):
        self.batches, self.checks = batches, checks
        self.sample_rate, self.frame_samples = sample_rate, frame_samples

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return [self.checks.decode(clip, self.sample_rate, self.frame_samples) for clip in self.batches[index]]


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


def encode(todo: list, args, checks: AudioChecks, progress, show_reject, done_seconds: float, total: int) -> dict:
    """Decode and encode `todo`, appending each batch's rows and rejects to the progress file."""
    from qwen_tts import Qwen3TTSTokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = Qwen3TTSTokenizer.from_pretrained(args.tokenizer_model_path, device_map=device)
    sample_rate = tokenizer.get_input_sample_rate()
    batches = [todo[start:start + args.batch_size] for start in range(0, len(todo), args.batch_size)]
    loader = torch.utils.data.DataLoader(
        DecodedBatches(batches, checks, sample_rate, tokenizer.get_encode_downsample_rate()), batch_size=None,
        collate_fn=as_is, num_workers=args.num_workers, prefetch_factor=4 if args.num_workers else None,
        worker_init_fn=die_with_parent)
    kill_after = int(os.environ.get(KILL_HOOK, "0"))
    stats = new_throughput()
    bar = tqdm(total=total, initial=total - len(todo), unit="clip", desc="encoding", dynamic_ncols=True)
    started = time.perf_counter()
    for batch_number, decoded in enumerate(loader, start=1):
        good = [item for item in decoded if item.reject is None]
        encode_started = time.perf_counter()
        codes = tokenizer.encode([item.samples for item in good], sr=sample_rate).audio_codes if good else []
        codes = [frames.cpu().tolist() for frames in codes]  # waits for the GPU: the timing is honest
        stats["tokenizer_seconds"] += time.perf_counter() - encode_started
        entries = [{"rejected": asdict(item.reject)} for item in decoded if item.reject is not None]
        entries += [{"kept": output_row(item, frames)} for item, frames in zip(good, codes, strict=True)]
        progress.append(entries)
        for item in decoded:
            if item.reject is not None:
                show_reject(item.reject)
        stats["encoded_clips"] += len(good)
        stats["encoded_audio_seconds"] += sum(item.seconds for item in good)
        stats["wall_seconds"] = time.perf_counter() - started
        bar.update(len(decoded))
        bar.set_postfix_str(f"{(done_seconds + stats['encoded_audio_seconds']) / 3600:.2f} h audio done, "
                            f"{stats['encoded_audio_seconds'] / stats['wall_seconds']:.0f}x real time")
        if batch_number == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    return stats


def new_throughput() -> dict:
    """Speed of this run's encoding: audio seconds per wall second is what the summary reports."""
    return dict(encoded_clips=0, encoded_audio_seconds=0.0, wall_seconds=0.0, tokenizer_seconds=0.0)


def output_row(item, codes: list) -> dict:
    clipped = {} if item.clipped_fraction is None else dict(clipped_fraction=round(item.clipped_fraction, 6))
    return dict(item.clip.row, source=item.clip.source, **clipped, audio_codes=codes)


# ---------------------------------------------------------------------------------------------
# Progress file, and publishing the finished dataset
# ---------------------------------------------------------------------------------------------

class ProgressFile:
    """OUTPUT.partial: a settings line, then a line per finished clip, {"kept": row} or {"rejected": reject}.

    Appended and flushed batch by batch, so a crash loses at most the batch being written.
    """

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.done = {}  # source -> (audio, text) of a kept row, or None for a rejected one
        cut = cut_partial_last_line(path) if path.exists() else 0
        if cut:
            print(f"{path}: cut off a half-written last line ({cut} bytes) left by an interrupted run")
        if path.exists() and path.stat().st_size:
            lines = read_lines(path)
            _, first = next(lines)
            differences = settings_differences(first.get("settings", {}), settings)
            if differences:
                raise SystemExit(f"error: {path} holds a run started with other settings: {', '.join(differences)}. "
                                 f"Run with the earlier settings to carry on, or delete it to start over.")
            for _, entry in lines:
                kept = entry.get("kept")
                self.done[(kept or entry["rejected"])["source"]] = (kept["audio"], kept["text"]) if kept else None
            print(f"resuming from {path}: {len(self.done)} clips already done")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(dict(settings=settings)) + "\n")
        self.handle = open(path, "a", encoding="utf-8")

    def todo(self, clips: list) -> list:
        """The clips not done yet. Stops when the done rows are not this input's rows (the input changed)."""
        planned = {clip.source: clip for clip in clips}
        for source, done in self.done.items():
            clip = planned.get(source)
            if clip is None or (done is not None and done != (clip.row["audio"], clip.row["text"])):
                raise SystemExit(f"error: {self.path}: the row {source} done by the earlier run is not that row "
                                 f"of this input: the input changed. Delete {self.path} to start over.")
        return [clip for clip in clips if clip.source not in self.done]

    def append(self, entries: list):
        self.handle.write("".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries))
        self.handle.flush()

    def close(self):
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


def publish(output: Path, positions: list, rejects: list, settings: dict, throughput: dict) -> dict:
    """Write OUTPUT (rows in input order), its rejects and summary. OUTPUT comes last, by a rename.

    positions: (input order, file, byte offset) of each row's line; a line is a row or {"kept": row}.
    """
    positions.sort(key=lambda position: position[0])
    for before, after in zip(positions, positions[1:]):
        if before[0] == after[0]:
            raise SystemExit(f"error: the row {after[0]} is written twice ({before[1]}, {after[1]})")
    summary = DatasetSummary()
    temporary = beside(output, ".tmp")
    handles = {}
    with open(temporary, "w", encoding="utf-8") as out:
        for _, path, offset in positions:
            handle = handles.setdefault(path, open(path, "rb"))
            handle.seek(offset)
            entry = json.loads(handle.readline())
            row = entry.get("kept", entry)
            summary.add(row)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())
    for handle in handles.values():
        handle.close()
    rejects = sorted(rejects, key=lambda reject: input_order(reject["source"]))
    write_atomically(beside(output, ".rejects.jsonl"),
                     "".join(json.dumps(reject, ensure_ascii=False) + "\n" for reject in rejects))
    report = summary.report(output, rejects, settings, throughput)
    write_atomically(beside(output, ".summary.json"), json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    os.replace(temporary, output)
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
    """What the training set holds, from its rows. A clip's length is its frames / 12.5, what training sees.

    characters_per_second is the speaking rate: characters of text (spaces and punctuation included)
    per second of clip, over all clips; a generated clip of N characters should last about N / rate.
    """

    def __init__(self):
        self.seconds, self.characters, self.speakers, self.clipped = [], [], [], 0
        self.rates = SpeakingRates()

    def add(self, row: dict):
        self.seconds.append(len(row["audio_codes"]) / FRAMES_PER_SECOND)
        self.characters.append(len(row["text"]))
        # lower-cased, as the trainer groups speakers (and infer_test reports them)
        self.speakers.append(row["speaker"].strip().lower() if row.get("speaker") else NO_SPEAKER)
        self.rates.add(row["text"], len(row["audio_codes"]), row.get("speaker") or NO_SPEAKER)
        self.clipped += "clipped_fraction" in row

    def report(self, output: Path, rejects: list, settings: dict, throughput: dict) -> dict:
        seconds, characters = np.array(self.seconds), np.array(self.characters)
        speakers = np.array(self.speakers, dtype=object)
        edges = (0,) + DURATION_BUCKETS + (math.inf,)
        counts = np.histogram(seconds, bins=edges)[0] if len(seconds) else np.zeros(len(edges) - 1, dtype=int)
        labels = [f"{low}-{high} s" for low, high in zip(edges, edges[1:-1])] + [f"{edges[-2]}+ s"]
        rates = characters / seconds if len(seconds) else np.zeros(0)
        speaking_rates = self.rates.rates()
        return dict(
            complete=True,
            output=str(output),
            clips=len(seconds),
            hours=round(float(seconds.sum()) / 3600, 4),
            characters_per_second=round(speaking_rates[SpeakingRates.ALL], 3) if len(seconds) else None,
            characters_per_second_percentiles={f"p{p}": round(float(np.percentile(rates, p)), 3)
                                               for p in (10, 50, 90)} if len(rates) else None,
            speakers={name: dict(clips=int((speakers == name).sum()),
                                 hours=round(float(seconds[speakers == name].sum()) / 3600, 4),
                                 characters_per_second=round(speaking_rates[name.lower()], 3))
                      for name in sorted(set(self.speakers))},
            duration_histogram=dict(zip(labels, (int(count) for count in counts))),
            clipped_clips=self.clipped,
            rejected=len(rejects),
            rejects_by_reason={reason: sum(reject["reason"] == reason for reject in rejects)
                               for reason in REJECT_REASONS},
            throughput=dict({key: round(value, 3) for key, value in throughput.items()}, audio_seconds_per_wall_second=
                            round(throughput["encoded_audio_seconds"] / max(throughput["wall_seconds"], 1e-9), 1)),
            settings=settings,
        )


def print_summary(report: dict):
    speed = report["throughput"]
    print(f"\nwrote {report['clips']} clips, {report['hours']:.2f} h of audio, to {report['output']}")
    print(f"  speaking rate {report['characters_per_second']} characters/s; "
          f"clipped clips kept: {report['clipped_clips']}")
    for name, speaker in report["speakers"].items():
        print(f"  speaker {name}: {speaker['clips']} clips, {speaker['hours']:.2f} h, "
              f"{speaker['characters_per_second']} characters/s")
    print("  durations: " + ", ".join(f"{label} {count}" for label, count in report["duration_histogram"].items()))
    reasons = ", ".join(f"{reason} {count}" for reason, count in report["rejects_by_reason"].items() if count)
    where = f": {reasons} (see {report['output']}.rejects.jsonl)" if reasons else ""
    print(f"  rejected {report['rejected']} rows{where}")
    if speed["encoded_clips"]:
        print(f"  encoded {speed['encoded_audio_seconds'] / 3600:.3f} h of audio in {speed['wall_seconds']:.1f} s: "
              f"{speed['audio_seconds_per_wall_second']:.0f} audio seconds per wall second, the tokenizer busy "
              f"{speed['tokenizer_seconds'] / max(speed['wall_seconds'], 1e-9):.0%} of the time")


def wait_for_shards(output: Path, count: int):
    """Under a launcher, process 0 waits for the other shards' outputs (the launcher stops all if one fails)."""
    missing, shown = [shard_output(output, index, count) for index in range(count)], None
    while missing := [path for path in missing if not path.exists()]:
        if missing != shown:
            print(f"waiting for {len(missing)} shard(s) to finish: {', '.join(path.name for path in missing)}",
                  flush=True)
            shown = missing
        time.sleep(2)


def merge_shards(output: Path, count: int) -> dict:
    """Merge complete shard outputs into OUTPUT, in input order, with their rejects and a summary of the whole."""
    shards = [shard_output(output, index, count) for index in range(count)]
    missing = [str(path) for path in shards if not path.exists()]
    if count < 2 or missing:
        raise SystemExit(f"error: need --num_shards >= 2 and every shard complete; missing: {', '.join(missing)}")
    reports = [json.loads(beside(path, ".summary.json").read_text()) for path in shards]
    settings = dict(reports[0]["settings"], shard_index=None)
    for path, report in zip(shards, reports):
        differences = settings_differences(dict(report["settings"], shard_index=None), settings)
        if differences:
            raise SystemExit(f"error: {path} was written with other settings than {shards[0]}: "
                             f"{', '.join(differences)}")
    positions = [(input_order(row["source"]), path, offset) for path in shards for offset, row in read_lines(path)]
    rejects = [reject for path in shards for _, reject in read_lines(beside(path, ".rejects.jsonl"))]
    speeds = [report["throughput"] for report in reports]
    throughput = {key: sum(speed[key] for speed in speeds) for key in ("encoded_clips", "encoded_audio_seconds",
                                                                        "tokenizer_seconds")}
    throughput["wall_seconds"] = max(speed["wall_seconds"] for speed in speeds)  # the shards ran side by side
    return publish(output, positions, rejects, settings, throughput)


if __name__ == "__main__":
    main()
