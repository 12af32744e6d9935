"""Reading a dataset of recordings, in any layout prepare_codes.py accepts, into checked rows.

Layouts, picked from what --input names:
    jsonl     a .jsonl file, one {"audio", "text", "ref_audio", "speaker", "language"} object a line
              (ref_audio, speaker, language optional; relative paths are taken from the JSONL's folder)
    ljspeech  a folder holding metadata.csv (`id|text` or `id|text|normalized text`) and wavs/, or that
              metadata.csv itself. The normalized column is used when present: it spells numbers and
              abbreviations out as they were spoken, so text and audio agree
    folder    any other folder: every audio file below it with a same-named .txt or .lab transcript

Every row has a `source`: "file:line", or the audio file's path in the folder layout. It names the row
in messages and in the rejects file, identifies the row when a run resumes, and gives the output order.

Checks come in two steps. RowChecker needs only file headers, so a 2-hour file or a missing clip is
rejected before any decoding; AudioChecks runs on the decoded audio (corrupt data, silence, clipping).
A row that fails becomes a Reject with its reason; nothing here stops the run.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen3_tts_sft import audio
from qwen3_tts_sft.training_data import resolve_path

# Files the folder and LJSpeech layouts take as audio: what soundfile (libsndfile 1.1+) decodes.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif")
TRANSCRIPT_EXTENSIONS = (".txt", ".lab")

# Why a row is rejected; the summary counts each one, zero counts included.
REJECT_REASONS = (
    "bad_row",             # not a JSON object, or a field of the wrong type
    "missing_transcript",  # no text field, no text column, no .txt/.lab beside the audio
    "empty_transcript",    # the text is blank
    "missing_audio",       # no audio field, or the file does not exist
    "unreadable_audio",    # soundfile cannot read it (corrupt, empty file, NaN samples)
    "empty_audio",         # the file holds no samples
    "too_short",           # shorter than --min_seconds
    "too_long",            # longer than --max_seconds
    "silent",              # quieter than --silence_dbfs
    "clipped",             # more than --clipped_fraction at full scale, with --reject_clipped
    "bad_ref_audio",       # the reference clip is missing or unreadable
)


@dataclass
class Reject:
    source: str
    reason: str           # one of REJECT_REASONS
    field: str            # the field at fault: text, audio, ref_audio, ...
    problem: str
    input: str = None     # the input line (or transcript) as read, to fix and feed again

    def message(self) -> str:
        return f"{self.source}: {self.field}: {self.problem}"


@dataclass
class InputRow:
    source: str
    row: dict             # the output row's fields so far: audio, text, and whatever the input gave
    input: str


@dataclass
class PlannedClip:
    """A row whose header checks passed: it will be decoded and encoded."""
    source: str
    row: dict
    input: str
    seconds: float        # from the header


def input_order(source: str) -> tuple:
    """Sort key that puts rows back in input order: (file, line), or (audio path, 0) in a folder."""
    path, _, line = source.rpartition(":")
    return (path, int(line)) if path and line.isdigit() else (source, 0)


def detect_layout(path: Path) -> tuple:
    """(layout name, the file or folder to read). Raises SystemExit when the input cannot be used."""
    if path.is_dir():
        if (path / "metadata.csv").is_file():
            return "ljspeech", path / "metadata.csv"
        return "folder", path
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file or folder")
    if path.suffix.lower() == ".csv":
        return "ljspeech", path
    return "jsonl", path


def read_input(layout: str, path: Path):
    """InputRow or Reject per input row, in input order."""
    readers = dict(jsonl=jsonl_rows, ljspeech=ljspeech_rows, folder=folder_rows)
    return readers[layout](path)


def numbered_lines(path: Path):
    """("file:line", line) for each line that is not blank; a byte-order mark is skipped."""
    with open(path, encoding="utf-8-sig") as lines:
        for line_number, line in enumerate(lines, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield f"{path}:{line_number}", line


def jsonl_rows(path: Path):
    for source, line in numbered_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            yield Reject(source, "bad_row", "(json)", f"not valid JSON ({error.msg} at column {error.colno})", line)
            continue
        if not isinstance(row, dict):
            yield Reject(source, "bad_row", "(row)", "is not a JSON object", line)
            continue
        for field in ("audio", "ref_audio"):
            if isinstance(row.get(field), str) and row[field].strip():
                row[field] = str(resolve_path(row[field], path.parent).resolve())
        yield InputRow(source, row, line)


def ljspeech_rows(metadata: Path):
    wavs = metadata.parent / "wavs"
    for source, line in numbered_lines(metadata):
        # Split on "|" only: LJSpeech texts hold quotes that a CSV reader would eat.
        clip_id, *texts = [column.strip() for column in line.split("|")]
        if not texts:
            yield Reject(source, "missing_transcript", "text", "the line has no text column (id|text)", line)
            continue
        text = texts[1] if len(texts) > 1 and texts[1] else texts[0]
        yield InputRow(source, dict(audio=str(find_audio(wavs, clip_id).resolve()), text=text), line)


def find_audio(folder: Path, clip_id: str) -> Path:
    """folder/clip_id if it names a file, else folder/clip_id.<ext> (wav first); the .wav path when none exists."""
    candidates = [folder / clip_id] + [folder / (clip_id + extension) for extension in AUDIO_EXTENSIONS]
    return next((path for path in candidates if path.is_file()), candidates[1])


def folder_rows(folder: Path):
    audio_files = sorted((str(path.resolve()) for path in folder.rglob("*")
                          if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file()))
    for audio in audio_files:
        transcript = next((path for path in (Path(audio).with_suffix(ext) for ext in TRANSCRIPT_EXTENSIONS)
                           if path.is_file()), None)
        if transcript is None:
            stem = Path(audio).stem
            yield Reject(audio, "missing_transcript", "text", f"no {stem}.txt or {stem}.lab beside the audio")
            continue
        text = " ".join(transcript.read_text(encoding="utf-8", errors="replace").split())
        yield InputRow(audio, dict(audio=audio, text=text), text)


@dataclass
class Limits:
    min_seconds: float
    max_seconds: float

    def problem(self, seconds: float):
        """(reason, problem) when a clip of this length is out of bounds, else None."""
        if seconds < self.min_seconds:
            return "too_short", f"{seconds:.2f} s is shorter than --min_seconds {self.min_seconds:g}"
        if seconds > self.max_seconds:
            return "too_long", f"{seconds:.2f} s is longer than --max_seconds {self.max_seconds:g}"
        return None


class RowChecker:
    """Fills in the defaults and checks a row as far as headers allow: PlannedClip or Reject.

    A row without ref_audio takes --ref_audio, or else its own clip: the trainer averages the
    x-vectors of each speaker's first 16 reference clips, so a speaker's own clips make a good one.
    """

    def __init__(self, limits: Limits, ref_audio: str = None, speaker: str = None, language: str = None):
        self.limits = limits
        self.defaults = dict(speaker=speaker, language=language)
        self.ref_audio = str(Path(ref_audio).expanduser().resolve()) if ref_audio else None
        self.probes = {}  # path -> probe(path); one reference clip serves many rows
        if self.ref_audio and self.probe(self.ref_audio)[1]:
            raise SystemExit(f"error: --ref_audio {ref_audio}: {self.probe(self.ref_audio)[1][1]}")

    def check(self, item):
        if isinstance(item, Reject):
            return item
        row, source = dict(item.row), item.source

        def reject(reason, field, problem):
            return Reject(source, reason, field, problem, item.input)

        text = row.get("text")
        if text is None:
            return reject("missing_transcript", "text", "missing")
        if not isinstance(text, str):
            return reject("bad_row", "text", "is not a string")
        if not text.strip():
            return reject("empty_transcript", "text", "is empty")
        row["text"] = text.strip()
        for field, default in self.defaults.items():
            value = default if row.get(field) is None else row[field]
            if value is None:
                row.pop(field, None)
                continue
            if not isinstance(value, str) or not value.strip():
                return reject("bad_row", field, "is not a name")
            row[field] = value

        audio = row.get("audio")
        if not isinstance(audio, str) or not audio.strip():
            return reject("missing_audio", "audio", "missing")
        seconds, problem = self.probe(audio)
        problem = problem or self.limits.problem(seconds)
        if problem:
            return reject(problem[0], "audio", f"{audio}: {problem[1]}")

        ref_audio = row.get("ref_audio") or self.ref_audio or audio
        if not isinstance(ref_audio, str):
            return reject("bad_row", "ref_audio", "is not a path")
        _, problem = self.probe(ref_audio)
        if problem:
            return reject("bad_ref_audio", "ref_audio", f"{ref_audio}: {problem[1]}")
        row["ref_audio"] = ref_audio
        return PlannedClip(source, row, item.input, seconds)

    def probe(self, path: str) -> tuple:
        if path not in self.probes:
            self.probes[path] = audio.probe(path)
        return self.probes[path]


@dataclass
class Decoded:
    """A planned clip after decoding: its samples ready to encode, or why it was rejected."""
    clip: PlannedClip
    samples: object = None           # float32 mono at the tokenizer's rate, zero-padded to whole frames
    seconds: float = 0.0             # decoded length, before the padding
    clipped_fraction: float = None   # set when the clip counts as clipped
    reject: Reject = None


@dataclass
class AudioChecks:
    """The checks that need the decoded audio. They run in the decoding worker processes."""
    limits: Limits
    silence_dbfs: float
    clipped_fraction: float
    reject_clipped: bool

    def decode(self, clip: PlannedClip, sample_rate: int, frame_samples: int) -> Decoded:
        path = clip.row["audio"]

        def reject(reason, problem):
            return Decoded(clip, reject=Reject(clip.source, reason, "audio", f"{path}: {problem}", clip.input))

        try:
            decoded = audio.decode(path, sample_rate)
        except Exception as error:  # a header can be fine and the data behind it corrupt
            return reject("unreadable_audio", f"unreadable ({error})")
        if not decoded.finite:
            return reject("unreadable_audio", "holds NaN or infinite samples")
        seconds = len(decoded.samples) / sample_rate
        problem = self.limits.problem(seconds)
        if problem:
            return reject(*problem)
        if decoded.level_dbfs < self.silence_dbfs:
            return reject("silent", f"level {decoded.level_dbfs:.1f} dBFS is below --silence_dbfs {self.silence_dbfs:g}")
        clipped = decoded.clipped_fraction > self.clipped_fraction
        if clipped and self.reject_clipped:
            return reject("clipped", f"{decoded.clipped_fraction:.2%} of its samples are at full scale "
                                     f"(--clipped_fraction {self.clipped_fraction:g}, --reject_clipped)")
        # Zeros up to a whole frame (under 80 ms): the last frame then sees the same zeros whatever pads
        # the batch, so a clip's codes do not depend on its batch (resume and shards rely on that).
        samples = np.pad(decoded.samples, (0, -len(decoded.samples) % frame_samples))
        return Decoded(clip, samples, seconds, decoded.clipped_fraction if clipped else None)
