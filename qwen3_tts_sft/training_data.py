"""Training data: reading and checking the codes JSONL, the dataset, and the order of batches.

A row of the JSONL (the output of prepare_codes.py, or of the reference prepare_data.py):
    {"text": "...", "audio_codes": [[16 ints], ...], "ref_audio": "ref.wav",
     "audio": "clip.wav" (optional), "speaker": "name" (optional), "language": "auto" (optional)}

Every problem is reported as `file:line: field: problem`. Bad rows are skipped and summarised,
unless more than `max_bad_fraction` of the rows are bad, or `strict` is set: then reading stops
with the report, before any GPU work.
"""

import hashlib
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwen3_tts_sft import audio
from qwen3_tts_sft.audio import FRAMES_PER_SECOND
from qwen3_tts_sft.data_report import MAX_CHARACTERS_PER_SECOND
from qwen3_tts_sft.dataset_layouts import (input_file_problem, json_problem, markup_problem, not_a_name,
                                           transcript_problem)
from qwen3_tts_sft.languages import language_problem
from qwen3_tts_sft.sequence_layout import (AUTO_LANGUAGE, NON_STREAMING, BatchShapes, SpecialIds, build_example,
                                           check_prompt_ids, example_length, num_targets, padded_cost, padded_sizes,
                                           prompt_ids)

@dataclass
class Clip:
    """One usable training row."""

    source: str           # "file:line", for messages
    text: str
    codes: np.ndarray     # [frames, groups] int16
    ref_audio: Path
    speaker: str          # lower-cased: generation looks speakers up lower-cased
    language: str         # lower-cased
    prompt: list = None   # token ids of the prompt, when read with a prompter

    @property
    def num_frames(self) -> int:
        return len(self.codes)


class DataError(Exception):
    """The data cannot be trained on; the message lists every problem found."""


# The fields of a codes JSONL row the trainer reads, and those prepare_codes.py adds for people and
# its report. Any other field is named once per file: "lang" or "speaker_name" would be ignored unsaid.
READ_FIELDS = ("text", "audio_codes", "ref_audio", "audio", "speaker", "language")
PREPARE_CODES_FIELDS = ("source", "flags", "quality", "segment", "text_from")

# A row with "audio" and no "audio_codes": a recordings list given where prepare_codes.py's output
# belongs. Such rows are summed up in one message that gives the command, not listed one by one.
NOT_ENCODED = "missing: the row has its audio but no codes yet"


def resolve_path(value: str, jsonl_dir: Path) -> Path:
    """A path from the JSONL: relative to the JSONL's folder; if nothing is there, relative to the
    working directory (the reference script's rows are written that way). The JSONL's folder comes
    first, so that the same command run from another folder reads the same recordings."""
    path = Path(value).expanduser()
    if path.is_absolute() or (jsonl_dir / path).exists() or not path.exists():
        return jsonl_dir / path
    return path


def make_prompter(processor, config):
    """text -> prompt ids, tokenized exactly as generate_custom_voice does; ValueError when unusable."""
    def prompter(text: str) -> list:
        ids = prompt_ids(processor, text)
        check_prompt_ids(ids, config.im_start_token_id, config.im_end_token_id)
        return ids
    return prompter


class ClipReader:
    """Checks rows one by one; remembers which reference files were already found readable.

    With a `prompter` (see make_prompter) the text is tokenized too, and a clip longer than
    `max_positions` (the talker's position limit) is a problem of its row. `check_audio`: read each
    reference clip's header (else only see that it exists); `references=False`: leave `ref_audio` alone
    (infer_test.py reads a checkpoint's training rows where their recordings may not be).
    """

    def __init__(self, ids: SpecialIds, default_speaker: str = None, prompter=None, max_positions: int = None,
                 check_audio: bool = True, references: bool = True):
        self.ids = ids
        self.default_speaker = default_speaker
        self.prompter = prompter
        self.max_positions = max_positions
        self.check_audio = check_audio
        self.references = references
        self.languages = ids.supported_languages()
        self.readable = {}

    def row_problems(self, row, jsonl_dir: Path) -> tuple:
        """(Clip or None, [(field, problem)])."""
        if not isinstance(row, dict):
            return None, [("(row)", "is not a JSON object")]
        problems = []
        # A field left out may be there under another name ("codes", "transcript"): name what the row has.
        missing = f"missing (the row has {', '.join(map(repr, row))})" if row else "missing (the row is {})"
        text = row.get("text")
        if not isinstance(text, str):
            problems.append(("text", missing if text is None else "is not a string"))
        elif problem := transcript_problem(text) or markup_problem(text):
            problems.append(("text", problem))

        # A recordings list, not codes under another name ("codes": a list of frames).
        codes_elsewhere = any(isinstance(value, list) for key, value in row.items() if key != "segments")
        if row.get("audio_codes") is None and isinstance(row.get("audio"), str) and not codes_elsewhere:
            problems.append(("audio_codes", NOT_ENCODED))
            codes = None
        else:
            codes = self.codes_array(row.get("audio_codes"), problems, missing)

        ref_audio, ref_path = row.get("ref_audio"), None
        if self.references:
            if not isinstance(ref_audio, str) or not ref_audio:
                problems.append(("ref_audio", f"{missing}: a clean 3-10 s clip of the speaker; prepare_codes.py "
                                              f"writes each speaker's cleanest clips, or --ref_audio's"
                                 if ref_audio is None else "is not a path"))
            else:
                ref_path = resolve_path(ref_audio, jsonl_dir)
                problem = self.audio_problem(ref_path)
                if problem == "file not found" and ref_path.is_absolute() and not ref_path.parent.exists():
                    problem += (f", nor its folder {ref_path.parent}: was the JSONL written on another machine? "
                                f"Paths relative to the JSONL's folder move with it")
                if problem:
                    problems.append(("ref_audio", f"{ref_audio}: {problem}"))

        # A null field is an absent one (pandas writes missing values as null), as prepare_codes reads it.
        language = AUTO_LANGUAGE if row.get("language") is None else row["language"]
        problem = language_problem(language, self.languages)
        if problem:
            problems.append(("language", problem))

        speaker = self.default_speaker if row.get("speaker") is None else row["speaker"]
        if speaker is None:
            problems.append(("speaker", "missing, and no --speaker_name was given (pass --speaker_name NAME, "
                                        "or give the row a \"speaker\")"))
        elif not isinstance(speaker, str) or not speaker.strip():
            problems.append(("speaker", not_a_name(speaker)))

        characters = audio.spoken_characters(text) if not problems else None
        if characters and characters / (len(codes) / FRAMES_PER_SECOND) > MAX_CHARACTERS_PER_SECOND:
            rate = characters / (len(codes) / FRAMES_PER_SECOND)
            problems.append(("text", f"{characters} characters in {len(codes) / FRAMES_PER_SECOND:.2f} s of "
                                     f"audio is {rate:.0f} characters/s, faster than anyone speaks "
                                     f"({MAX_CHARACTERS_PER_SECOND:g}): is it this clip's text?"))
        if problems:
            return None, problems
        clip = Clip(source="", text=text, codes=codes, ref_audio=ref_path,
                    speaker=speaker_name(speaker), language=language.strip().lower())
        if self.prompter is not None:
            try:
                clip.prompt = self.prompter(text)
            except ValueError as error:
                return None, [("text", str(error))]
            positions = example_length(self.ids, len(clip.prompt), clip.num_frames, clip.language)
            if self.max_positions and positions > self.max_positions:
                return None, [("text", f"text and audio need {positions} positions; the model takes "
                                       f"{self.max_positions}")]
        return clip, []

    def codes_array(self, codes, problems: list, missing: str = "missing"):
        if codes is None:
            problems.append(("audio_codes", missing))
            return None
        if isinstance(codes, str):
            problems.append(("audio_codes", "is a string: it must be a JSON list of frames, each a list of "
                                            f"{self.ids.num_code_groups} integers, not text"))
            return None
        try:
            array = np.asarray(codes)
        except ValueError:
            problems.append(("audio_codes", "frames have different numbers of codes"))
            return None
        groups = self.ids.num_code_groups
        if array.ndim != 2 or array.shape[1] != groups:
            problems.append(("audio_codes", f"must be a list of frames of {groups} codes, got shape {array.shape}"))
        elif array.shape[0] == 0:
            problems.append(("audio_codes", "has no frames"))
        elif not np.issubdtype(array.dtype, np.integer):
            problems.append(("audio_codes", "codes must be integers"))
        elif array.min() < 0 or array.max() >= self.ids.codebook_size:
            problems.append(("audio_codes", f"codes must lie in [0, {self.ids.codebook_size}), "
                                            f"found {array.min()}..{array.max()}"))
        else:
            return array.astype(np.int16)
        return None

    def audio_problem(self, path: Path):
        if path not in self.readable:
            if not self.check_audio:
                self.readable[path] = None if path.exists() else "file not found"
            else:
                _, problem = audio.probe(path)
                self.readable[path] = problem[1] if problem else None
        return self.readable[path]


def speaker_name(name: str) -> str:
    """A speaker's name as the run knows it: lower-cased, as generate() looks it up, and in Unicode's
    composed form (NFC), as it is typed: a name taken from a macOS folder comes decomposed ("zoe" and
    a combining diaeresis), and would otherwise be another voice than the "zoë" a user asks for."""
    return unicodedata.normalize("NFC", name.strip()).lower()


def read_clips(jsonl_path, ids: SpecialIds, default_speaker: str = None, strict: bool = False,
               max_bad_fraction: float = 0.01, log=print, prompter=None, max_positions: int = None,
               tokenizer_path="MODEL/speech_tokenizer", references: bool = True) -> list:
    """Read and check a codes JSONL. Returns the good clips; raises DataError when it must stop.
    `tokenizer_path` goes into the prepare_codes.py command suggested for rows not encoded yet;
    `references`: see ClipReader."""
    jsonl_path = Path(jsonl_path)
    if not jsonl_path.is_file():
        raise DataError(f"{jsonl_path}: file not found")
    problem = input_file_problem(jsonl_path)
    if problem:
        raise DataError(f"{jsonl_path} {problem}: the training data is a JSONL, one JSON object a line, as "
                        f"prepare_codes.py writes it")
    reader = ClipReader(ids, default_speaker, prompter, max_positions, references=references)
    clips, problems, rows = [], [], 0  # problems: (line number, "field: problem")
    unread = {}  # a field the trainer does not read -> rows that have it
    with open(jsonl_path, "rb") as lines:  # decoded line by line: bytes that are not UTF-8 spoil one row only
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            rows += 1
            source = f"{jsonl_path}:{line_number}"
            row, row_problems = parse_line(line, line_number)
            for field_name in row if isinstance(row, dict) else ():
                if field_name not in READ_FIELDS + PREPARE_CODES_FIELDS:
                    unread[field_name] = unread.get(field_name, 0) + 1
            if not row_problems:
                clip, row_problems = reader.row_problems(row, jsonl_path.parent)
            if ("audio_codes", NOT_ENCODED) in row_problems:  # its other fields are prepare_codes.py's to check
                row_problems = [("audio_codes", NOT_ENCODED)]
            if row_problems:
                problems += [(line_number, f"{field}: {problem}") for field, problem in row_problems]
                if strict:
                    raise DataError(problem_report(problems, jsonl_path, tokenizer_path)
                                    + "\n(stopped at the first bad row: --strict)")
                continue
            clip.source = source
            clips.append(clip)
    if rows == 0:
        raise DataError(f"{jsonl_path}: no rows")
    if unread:
        counted = ", ".join(f"{name!r} ({count} rows)" for name, count in unread.items())
        log(f"note: {jsonl_path}: fields the trainer does not read, left as they are: {counted}; the fields it "
            f"reads are {', '.join(READ_FIELDS)}")
    bad_rows = rows - len(clips)
    if bad_rows:
        report = problem_report(problems, jsonl_path, tokenizer_path)
        if not clips or bad_rows / rows > max_bad_fraction:
            if bad_rows == sum(map(is_not_encoded, problems)):  # the encoding command says what to do
                raise DataError(report)
            if not clips:
                raise DataError(f"{report}\nnone of the {rows} rows in {jsonl_path} can be trained on")
            raise DataError(
                f"{report}\n{bad_rows} of {rows} rows in {jsonl_path} are bad, more than the "
                f"{max_bad_fraction:.1%} allowed (--max_bad_fraction). Fix them or raise the limit."
            )
        log(f"{report}\nskipping {bad_rows} bad rows of {rows} in {jsonl_path}")
    return clips


def parse_line(line: bytes, line_number: int) -> tuple:
    """(the JSON value of one line of a JSONL file, []), or (None, [(field, problem)])."""
    try:
        # utf-8-sig on the first line: a byte-order mark (some Windows editors write one) is no part of the row.
        text = line.decode("utf-8-sig" if line_number == 1 else "utf-8")
    except UnicodeDecodeError as error:
        return None, [("(encoding)", f"byte {error.start + 1} of the line (0x{line[error.start]:02x}) is not UTF-8 "
                                     f"text; save the file as UTF-8")]
    text = text.rstrip("\r\n")  # given its newline, the parser would place an error at the end on the next line
    try:
        return json.loads(text), []
    except json.JSONDecodeError as error:
        return None, [("(json)", json_problem(error, text))]


def is_not_encoded(problem: tuple) -> bool:
    return problem[1] == f"audio_codes: {NOT_ENCODED}"


def problem_report(problems: list, jsonl_path: Path, tokenizer_path) -> str:
    """The problems ((line, "field: problem") pairs) as `file:line: field: problem` lines; rows not
    encoded yet as one message with the command that encodes them."""
    uncoded = [problem for problem in problems if is_not_encoded(problem)]
    others = [problem for problem in problems if not is_not_encoded(problem)]
    lines = [format_problems(others, jsonl_path)] if others else []
    if uncoded:
        first_line = f"{jsonl_path}:{uncoded[0][0]}"
        output = jsonl_path.with_name(jsonl_path.stem + "_with_codes.jsonl")
        lines.append(
            f"{jsonl_path}: {len(uncoded)} rows (the first at {first_line}) have \"audio\" but no \"audio_codes\": "
            f"the recordings are not encoded yet. prepare_codes.py turns them into 12 Hz codes; train on the file "
            f"it writes:\n  python prepare_codes.py --tokenizer_model_path {tokenizer_path} --input {jsonl_path} "
            f"--output_jsonl {output}")
    return "\n".join(lines)


def format_problems(problems: list, jsonl_path: Path, limit: int = 50) -> str:
    """`file:line: field: problem` lines. A problem that many rows share (a flag not given, one wrong
    language everywhere) is one line that counts them, so the rest stay in view."""
    by_problem = {}  # "field: problem" -> its lines, in order
    for line, what in problems:
        by_problem.setdefault(what, []).append(line)
    shown = []
    for line, what in problems:
        lines = by_problem[what]
        if len(lines) <= 3:
            shown.append(f"{jsonl_path}:{line}: {what}")
        elif line == lines[0]:
            shown.append(f"{jsonl_path}: {len(lines)} rows (lines {lines[0]}, {lines[1]}, ... {lines[-1]}): {what}")
    more = f"\n... and {len(shown) - limit} more problems" if len(shown) > limit else ""
    return "\n".join(shown[:limit]) + more


def apply_length_limits(clips: list, max_audio_seconds: float = None, max_text_tokens: int = None,
                        log=print) -> list:
    """Drop clips longer than the limits, saying how many, which (the first few) and why."""
    too_long_audio, too_long_text, kept = [], [], []
    for clip in clips:
        if max_audio_seconds and clip.num_frames > max_audio_seconds * FRAMES_PER_SECOND:
            too_long_audio.append(f"{clip.source} ({clip.num_frames / FRAMES_PER_SECOND:.1f} s)")
        elif max_text_tokens and len(clip.prompt) > max_text_tokens:
            too_long_text.append(f"{clip.source} ({len(clip.prompt)} tokens)")
        else:
            kept.append(clip)
    for dropped, why in ((too_long_audio, f"longer than {max_audio_seconds} s (--max_audio_seconds)"),
                         (too_long_text, f"whose prompt exceeds {max_text_tokens} tokens (--max_text_tokens)")):
        if dropped:
            more = f" and {len(dropped) - 5} more" if len(dropped) > 5 else ""
            log(f"dropped {len(dropped)} clips {why}: {', '.join(dropped[:5])}{more}")
    if not kept:
        raise DataError("no clips left after the length limits")
    return kept


def split_off_eval(clips: list, fraction: float, seed: int) -> tuple:
    """(train, eval): a seeded random `fraction` of the clips (at least one) held out for eval."""
    order = np.random.default_rng(seed).permutation(len(clips))
    count = max(1, round(fraction * len(clips)))
    if count >= len(clips):
        raise DataError(f"--eval_split {fraction} of {len(clips)} clips holds out {count}, leaving none to train on: "
                        f"lower it, or give held-out clips as --eval_jsonl")
    held_out = set(order[:count].tolist())
    return ([clip for i, clip in enumerate(clips) if i not in held_out],
            [clip for i, clip in enumerate(clips) if i in held_out])


def file_fingerprint(path) -> tuple:
    """(line count, sha256 prefix) of a file, for the run log."""
    digest, lines, last = hashlib.sha256(), 0, b"\n"
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n"), digest.hexdigest()[:16]  # a last line without its newline counts too


class TalkerDataset(torch.utils.data.Dataset):
    """Clips laid out for the talker. With several layouts, every clip appears once in each:
    index i is clip i % len(clips) in layout i // len(clips)."""

    def __init__(self, clips: list, ids: SpecialIds, speaker_index: dict, layouts=(NON_STREAMING,)):
        self.clips = clips
        self.ids = ids
        self.speaker_index = speaker_index
        self.layouts = tuple(layouts)

    def __len__(self):
        return len(self.clips) * len(self.layouts)

    def clip_and_layout(self, index) -> tuple:
        return self.clips[index % len(self.clips)], self.layouts[index // len(self.clips)]

    def __getitem__(self, index):
        clip, layout = self.clip_and_layout(index)
        return build_example(self.ids, clip.prompt, clip.codes.astype(np.int64), clip.language,
                             self.speaker_index[clip.speaker], layout)

    def length(self, index) -> int:
        clip, layout = self.clip_and_layout(index)
        return example_length(self.ids, len(clip.prompt), clip.num_frames, clip.language, layout)

    def num_frames(self, index) -> int:
        return self.clip_and_layout(index)[0].num_frames

    def targets(self, indices) -> "StepTargets":
        """What one optimizer step over these examples (all processes' share) predicts."""
        counts = [num_targets(self.clip_and_layout(i)[0].num_frames, self.ids.num_code_groups) for i in indices]
        return StepTargets(sum(c[0] for c in counts), sum(c[1] for c in counts), len(indices))


@dataclass(frozen=True)
class StepTargets:
    codec0: int        # group-0 targets: every frame and each clip's codec_eos
    code_predictor: int  # code-predictor targets: groups 1.. of every frame
    clips: int


@dataclass
class EpochPlan:
    """Which clips go into which micro-batch, for every optimizer step of one epoch.

    Each step's clips (batch x accumulation x processes of them) are fixed before they are split
    into micro-batches, so 8x1, 4x2 and 2x4 see the same clips in each step.
    """

    steps: list             # per step: the list of all its clip indices, across processes
    micro_batches: list     # per step: this process's micro-batches (lists of clip indices)
    dropped: int            # clips left out because they could not fill a step on every process
    shapes: BatchShapes     # the sizes this process's micro-batches are padded to (the same every epoch)


def plan_epoch(dataset: TalkerDataset, batch_size: int, accumulation: int, num_processes: int,
               process_index: int, seed: int, epoch: int, group_by_length: bool = True) -> EpochPlan:
    """The epoch's steps and micro-batches, and the batch shapes chosen from the first epoch's."""
    def split(epoch):
        return split_into_steps(dataset, batch_size, accumulation, num_processes, process_index, seed, epoch,
                                group_by_length)

    steps, micro_batches, dropped = split(epoch)
    # One table for every epoch: the CUDA graphs recorded for its shapes serve the whole run.
    first_epoch = micro_batches if epoch == 0 else split(0)[1]
    needs = [(max(map(dataset.length, batch)), sum(map(dataset.num_frames, batch)))
             for step in first_epoch for batch in step if len(batch) == batch_size]
    return EpochPlan(steps, micro_batches, dropped, choose_batch_shapes(needs, batch_size))


def split_into_steps(dataset, batch_size: int, accumulation: int, num_processes: int, process_index: int,
                     seed: int, epoch: int, group_by_length: bool) -> tuple:
    """(steps, this process's micro-batches per step, clips dropped) of one epoch."""
    clips_per_step = batch_size * accumulation * num_processes
    order = np.random.default_rng([seed, epoch]).permutation(len(dataset)).tolist()
    if group_by_length:
        # Sort within large random chunks so micro-batches hold clips of similar length (little
        # padding), then shuffle the steps so the order stays random.
        chunk = clips_per_step * 64
        order = [i for start in range(0, len(order), chunk)
                 for i in sorted(order[start:start + chunk], key=dataset.length, reverse=True)]
    steps = [order[start:start + clips_per_step] for start in range(0, len(order), clips_per_step)]
    dropped = 0
    if num_processes > 1 and len(steps[-1]) < batch_size * num_processes:
        dropped = len(steps.pop())  # too few to give every process a micro-batch
    if group_by_length:
        steps = [steps[i] for i in np.random.default_rng([seed, epoch, 1]).permutation(len(steps))]
    micro_batches = []
    for step in steps:
        batches = [step[start:start + batch_size] for start in range(0, len(step), batch_size)]
        micro_batches.append(batches[process_index::num_processes])
    return steps, micro_batches, dropped


# A batch shape costs a first (eager) run and a recording (cuda_graphs.py): about as much time as
# this many replayed micro-batches. A shape joins the table only where it saves more padding.
RECORDING_COST_IN_MICRO_BATCHES = 8
MAX_BATCH_SHAPES = 16


def choose_batch_shapes(needs: list, rows: int) -> BatchShapes:
    """The table of sizes for micro-batches of `rows` clips, each needing (longest length, frames):
    the fewest sizes for the least padding, counting each size as RECORDING_COST_IN_MICRO_BATCHES
    micro-batches of work.

    Each need is first padded to multiples (8 positions, 32 frames) and the distinct ones sorted by
    cost; a size of the table serves a run of consecutive needs (it is their largest length and
    largest frame count), and dynamic programming picks the runs that pad least for every table size.
    """
    if not needs:
        return BatchShapes(rows, ())
    counts = {}
    for longest, frames in needs:
        size = padded_sizes(rows, longest, frames)
        counts[size] = counts.get(size, 0) + 1
    sizes = sorted(counts, key=lambda size: (padded_cost(rows, *size), size))
    positions = np.array([size[0] for size in sizes])
    frames = np.array([size[1] for size in sizes])
    micro_batches = np.concatenate([[0], np.cumsum([counts[size] for size in sizes])])
    n = len(sizes)
    # padded[k, j]: the least padded cost of the first j sizes served by k table sizes; start[k, j]:
    # where the run of the last of them starts.
    padded = np.full((min(MAX_BATCH_SHAPES, n) + 1, n + 1), np.inf)
    start = np.zeros(padded.shape, dtype=int)
    padded[0, 0] = 0
    for end in range(1, n + 1):
        # A run sizes[i:end] is padded to its largest length and largest frame count.
        run_positions = np.maximum.accumulate(positions[:end][::-1])[::-1]
        run_frames = np.maximum.accumulate(frames[:end][::-1])[::-1]
        run_cost = (micro_batches[end] - micro_batches[:end]) * (rows * run_positions + run_frames)
        for count in range(1, padded.shape[0]):
            total = padded[count - 1, :end] + run_cost
            start[count, end] = int(np.argmin(total))
            padded[count, end] = total[start[count, end]]
    mean_cost = padded[-1, n] / micro_batches[-1]
    count = int(np.argmin(padded[1:, n] + np.arange(1, padded.shape[0]) * RECORDING_COST_IN_MICRO_BATCHES * mean_cost)) + 1
    table, end = [], n
    while end > 0:
        begin = start[count, end]
        table.append((int(positions[begin:end].max()), int(frames[begin:end].max())))
        end, count = begin, count - 1
    return BatchShapes(rows, tuple(sorted(table, key=lambda size: padded_cost(rows, *size))))
