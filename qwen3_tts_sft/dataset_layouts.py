"""Reading a dataset of recordings, in any layout prepare_codes.py accepts, into checked clips.

Layouts, picked from what --input names:
    jsonl     a .jsonl file, one {"audio", "text", "ref_audio", "speaker", "language", "segments"}
              object a line (all but audio optional; relative paths are taken from the JSONL's folder).
              "segments" aligns a long take's transcript: [{"start": s, "end": s, "text": "..."}, ...],
              seconds into the file, in order; each becomes a clip of its own
    ljspeech  a folder holding metadata.csv (`id|text` or `id|text|normalized text`) and the clips in
              wavs/ or, when there is no wavs/, beside metadata.csv; or that metadata.csv itself. The
              normalized column is used when present: it spells numbers and abbreviations out as they
              were spoken, so text and audio agree
    folder    any other folder: every audio file below it, with a same-named .txt or .lab transcript

Every row has a `source`: "file:line", or the audio file's path in the folder layout; a piece of a
long take adds "#k" (k = 1, 2, ...). It names the row in messages and in the rejects file,
identifies the row when a run resumes, and gives the output order.

Checks come in two steps. RowChecker needs only file headers, so a two-hour take without a
transcript per segment, or a missing clip, is rejected before any decoding. AudioChecks.process
runs on the decoded audio, in the decoding worker processes: corrupt, truncated and silent files
are rejected; long takes are cut at their pauses; silence at the edges is trimmed; loudness is
evened out; what the report needs is measured. A row that fails becomes a Reject with its reason;
nothing here stops the run.
"""

import csv
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen3_tts_sft import audio
from qwen3_tts_sft.languages import PUBLISHED_LANGUAGE_IDS, language_problem, model_languages

# Files the folder and LJSpeech layouts take as audio (any case): what soundfile (libsndfile 1.1+)
# decodes. Audio it cannot decode is rejected by name rather than passed over in silence.
AUDIO_EXTENSIONS = (".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".caf",
                    ".w64", ".rf64", ".au", ".snd")
UNDECODED_AUDIO_EXTENSIONS = (".m4a", ".aac", ".mp4", ".wma", ".webm", ".amr", ".ape", ".wv", ".mka", ".ac3")
TRANSCRIPT_EXTENSIONS = (".txt", ".lab")

# The fields of a JSONL input row that prepare_codes reads; "segments" aligns a long take's transcript.
JSONL_ROW_FIELDS = ("audio", "text", "ref_audio", "speaker", "language", "segments")

# Why a row is rejected; the summary counts each one, zero counts included.
REJECT_REASONS = (
    "bad_row",             # not a JSON object, not UTF-8, a field of the wrong type, markup in a transcript
    "missing_transcript",  # no text field, no text column, no .txt/.lab beside the audio (and no --asr_model)
    "empty_transcript",    # the text is blank or has no letter or digit (or speech recognition heard nothing)
    "missing_audio",       # no audio field, or the file does not exist
    "unreadable_audio",    # soundfile cannot read it (corrupt, empty file, NaN samples)
    "truncated_audio",     # decodes shorter than its header says: cut short when copied or downloaded
    "empty_audio",         # the file holds no samples
    "too_short",           # shorter than --min_seconds (after trimming)
    "too_long",            # longer than --max_seconds, with no way to split it
    "cut_in_speech",       # a piece of a long take cut inside speech: no pause or quiet moment to cut at
                           # within --max_segment_seconds (voice_activity.speech_pieces)
    "silent",              # quieter than --silence_dbfs
    "channels_cancel",     # its channels cancel when mixed to mono (one the other inverted): audio.CANCELLED_MIX_DB
    "clipped",             # more than --max_clipped_fraction at full scale (audio.HEAVILY_CLIPPED_FRACTION),
                           # or more than --clipped_fraction with --reject_clipped
    "bad_ref_audio",       # the reference clip is missing, unreadable, silent, of a low rate or out of bounds
    "speaking_rate",       # characters per second beyond --reject_rate_ratio of the speaker's median,
                           # or beyond data_report.MAX_CHARACTERS_PER_SECOND (any speaker)
    "duplicate_audio",     # the same samples as an earlier clip
)

# Why a kept clip is flagged: in its row's "flags" ({name: what}) and counted in the report.
FLAGS = (
    "low_sample_rate",     # recorded below audio.LOW_SAMPLE_RATE
    "dc_offset",           # a mean sample beyond audio.MAX_DC_OFFSET: removed before encoding
    "clipped",             # more than --clipped_fraction of its samples at full scale
    "no_speech_found",     # the voice-activity detector heard no speech: not trimmed
    "speech_missed",       # a long take's pieces leave out much sound as loud as speech (audio.MISSED_SPEECH)
    "speaking_rate",       # characters per second beyond --flag_rate_ratio of the speaker's median
    "duplicate_text",      # the same text as an earlier clip
    "transcript_mismatch", # speech recognition disagrees with its text (--asr_check, above --max_cer)
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
    row: dict                      # the output row's fields so far: audio, text, and whatever the input gave
    input: str
    missing_text: str = "missing"  # what to say when it has no text
    layout: str = "jsonl"


@dataclass
class PlannedClip:
    """A row whose header checks passed: it will be decoded (and cut, when it is a long take)."""
    source: str
    row: dict             # without "text" when speech recognition is to write it
    input: str
    seconds: float        # from the header
    segments: list = None # the aligned transcript of a long take: [{"start", "end", "text"}]


def input_order(source: str) -> tuple:
    """Sort key that puts rows back in input order: (file, line, piece), or (audio path, 0, piece) in a
    folder; piece 0 for a clip kept whole."""
    whole, _, piece = source.rpartition("#")
    if not (whole and piece.isdigit()):
        whole, piece = source, "0"
    path, _, line = whole.rpartition(":")
    return (path, int(line), int(piece)) if path and line.isdigit() else (whole, 0, int(piece))


def detect_layout(path: Path) -> tuple:
    """(layout name, the file or folder to read). Raises SystemExit when the input cannot be used."""
    if path.is_dir():
        if (path / "metadata.csv").is_file():
            return "ljspeech", path / "metadata.csv"
        return "folder", path
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file or folder")
    problem = input_file_problem(path)
    if problem:
        raise SystemExit(f"error: --input {path} {problem}. --input takes a JSONL (one JSON object a line), an "
                         f"LJSpeech metadata.csv, or a folder of recordings")
    if path.suffix.lower() == ".csv":
        return "ljspeech", path
    return "jsonl", path


def input_file_problem(path: Path):
    """Why a file given as --input is none of the layouts, or None: audio, a JSON array, UTF-16 text."""
    with open_input(path) as handle:
        start = handle.read(64)
    suffix = path.suffix.lower()
    if suffix in AUDIO_EXTENSIONS + UNDECODED_AUDIO_EXTENSIONS or start[:4] in (b"RIFF", b"fLaC", b"OggS", b"FORM"):
        return "is an audio file, not a list of clips"
    if start.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "is UTF-16 text: save it as UTF-8"
    if start.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return ("is one JSON array, not a JSON object a line: convert it with "
                f"jq -c '.[]' '{path.name}' > '{path.stem}.jsonl'")
    return None


def open_input(path: Path):
    """An input file opened for reading, or SystemExit naming why it cannot be."""
    try:
        return open(path, "rb")
    except OSError as error:
        raise SystemExit(f"error: {path}: cannot be read ({error.strerror})") from None


def read_input(layout: str, path: Path, speaker_from_folder: bool = False):
    """InputRow or Reject per input row, in input order. `speaker_from_folder`: in the folder layout,
    a clip's speaker is the name of the folder directly below `path` that holds it."""
    if layout == "folder":
        return folder_rows(path, speaker_from_folder)
    return jsonl_rows(path) if layout == "jsonl" else ljspeech_rows(path)


def numbered_lines(path: Path):
    """("file:line", line, None) for each line that is not blank, or ("file:line", line as far as it
    decodes, problem) for a line that is not UTF-8. Lines end at \\n only, so the numbers are an
    editor's; a byte-order mark is skipped."""
    with open_input(path) as lines:
        for line_number, raw in enumerate(lines, start=1):
            if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            raw = raw.rstrip(b"\r\n")
            try:
                line, problem = raw.decode("utf-8"), None
            except UnicodeDecodeError as error:
                line = raw.decode("utf-8", errors="replace")
                problem = f"is not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
            if line.strip():
                yield f"{path}:{line_number}", line, problem


def jsonl_rows(path: Path):
    # Imported here: training_data imports torch, and prepare_codes --help must not wait for it.
    from qwen3_tts_sft.training_data import resolve_path

    for source, line, problem in numbered_lines(path):
        if problem:
            yield Reject(source, "bad_row", "(encoding)", problem, line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            yield Reject(source, "bad_row", "(json)", json_problem(error, line), line)
            continue
        if not isinstance(row, dict):
            yield Reject(source, "bad_row", "(row)", "is not a JSON object", line)
            continue
        for field_name in ("audio", "ref_audio"):
            if isinstance(row.get(field_name), str) and row[field_name].strip():
                row[field_name] = str(resolve_path(row[field_name], path.parent).resolve())
        yield InputRow(source, row, line)


def json_problem(error: json.JSONDecodeError, line: str) -> str:
    """What is wrong with a line that is not JSON, where, and whether it looks cut short."""
    where = " " if error.msg.endswith(" at") else " at "  # "Unterminated string starting at"
    cut_short = error.pos >= len(line.rstrip()) or error.msg.startswith("Unterminated string")
    return (f"not valid JSON ({error.msg}{where}column {error.colno})"
            + ("; the line ends inside the JSON (cut short?)" if cut_short else ""))


def ljspeech_rows(metadata: Path, speaker: str = None):
    """The rows of an LJSpeech metadata.csv; `speaker`, when given, is every row's."""
    # The LJSpeech layout keeps its clips in wavs/; a metadata.csv among its clips is common too.
    clips = metadata.parent / "wavs" if (metadata.parent / "wavs").is_dir() else metadata.parent
    lines = [(source, line, problem, None if problem else metadata_columns(line))
             for source, line, problem in numbered_lines(metadata)]
    # In a file of mostly id|text lines, a line of three columns is more likely a "|" in its text.
    column_counts = [len(columns) for *_, columns in lines if columns is not None]
    two_column_file = column_counts.count(2) > column_counts.count(3)
    audio_files = AudioFiles((clips, metadata.parent))
    for source, line, problem, columns in lines:
        if problem:
            yield Reject(source, "bad_row", "(encoding)", problem, line)
            continue
        clip_id, *texts = columns
        if not texts:
            separated = ("; it looks tab-separated: LJSpeech separates its columns with |" if "\t" in line else
                         "; it looks comma-separated (a Hugging Face audiofolder metadata.csv?): give it as a JSONL "
                         "instead" if "," in line else "")
            yield Reject(source, "missing_transcript", "text", f"the line has no text column (id|text){separated}",
                         line)
            continue
        # Which column is the text is anyone's guess: keep no wrong transcript.
        if len(texts) > 2 or len(texts) == 2 and two_column_file:
            usual = "LJSpeech has 2 or 3" if len(texts) > 2 else "the file's other lines have 2"
            yield Reject(source, "bad_row", "text", f"the line has {len(texts) + 1} columns where {usual} "
                         f"(id|text|normalized text): is there a \"|\" inside the text?", line)
            continue
        text = texts[1] if len(texts) > 1 and texts[1] else texts[0]
        row = dict(audio=str(audio_files.find(clip_id).resolve()), text=text)
        if speaker is not None:
            row["speaker"] = speaker
        yield InputRow(source, row, line, layout="ljspeech")


def metadata_columns(line: str) -> list:
    """A metadata.csv line's columns, split on "|" only: LJSpeech texts hold quotes that a CSV reader
    would eat. A file written by a CSV writer (pandas, Python's csv) quotes a field that holds a "|"
    or a quote, doubling the quote inside: such a line is read as CSV, when it parses as CSV throughout."""
    columns = [column.strip() for column in line.split("|")]
    if any(column.startswith('"') for column in columns[1:]):
        try:
            [quoted] = csv.reader([line], delimiter="|", quotechar='"', strict=True)
            return [column.strip() for column in quoted]
        except (csv.Error, ValueError):  # quotes that are the text's own: "Hello," he said.
            pass
    return columns


class AudioFiles:
    """Finds a clip's file by its id in folders, in any case of the name (LJ001-0001 and lj001-0001.WAV)."""

    def __init__(self, folders: tuple):
        self.folders = folders
        self.by_name = {}  # folder -> {lower-case name: path}, listed when first needed

    def find(self, clip_id: str) -> Path:
        """The first file named clip_id, or clip_id.<ext> (wav first), in the folders in turn (wavs/,
        then metadata.csv's own folder, where an id like wavs/0001.wav is relative to); the first .wav
        path when none exists."""
        candidates = [folder / name for folder in self.folders
                      for name in [clip_id] + [clip_id + extension for extension in AUDIO_EXTENSIONS]]
        for candidate in candidates:
            found = self.listing(candidate.parent).get(candidate.name.lower())
            if found is not None:
                return found
        return candidates[1]

    def listing(self, folder: Path) -> dict:
        if folder not in self.by_name:
            try:
                self.by_name[folder] = {path.name.lower(): path for path in folder.iterdir() if path.is_file()}
            except OSError:  # no such folder (an id with a path in it), or one that cannot be listed
                self.by_name[folder] = {}
        return self.by_name[folder]


def files_below(folder: Path, unreadable: list = None) -> list:
    """Every file below `folder`, sorted, links to files and folders followed (each folder once, so a
    link back up ends there); a link to nowhere is listed too, to be rejected as missing. Folders
    that cannot be listed are appended to `unreadable` as (folder, why)."""
    def note(error: OSError):
        if unreadable is not None:
            unreadable.append((error.filename, error.strerror))

    files, seen = [], set()
    for root, folders, names in os.walk(folder, followlinks=True, onerror=note):
        real = os.path.realpath(root)
        if real in seen:
            folders.clear()
            continue
        seen.add(real)
        files += [Path(root) / name for name in names]
    return sorted(files)


def folder_rows(folder: Path, speaker_from_folder: bool = False):
    """Every audio file below the folder, with the transcript beside it as listed: a symbolic link's
    transcript is the one beside the link, and its source the link's path. A folder below holding a
    metadata.csv is an LJSpeech folder: its rows come from its metadata, not from transcript files."""
    folder = folder.resolve()
    unreadable = []
    files = [path for path in files_below(folder, unreadable)
             if not path.name.startswith("._")]  # ._name: macOS metadata, not audio
    for path, why in unreadable:
        yield Reject(str(path), "unreadable_audio", "audio", f"the folder cannot be read ({why}): the recordings "
                     f"in it are left out")

    def speaker_of(path: Path):
        inner = path.relative_to(folder).parts
        # NFC: the name as typed. macOS file systems store "ü" decomposed, and generate_custom_voice
        # looks a speaker up by the very string given.
        return unicodedata.normalize("NFC", inner[0]) if speaker_from_folder and len(inner) > 1 else None

    metadata_folders = sorted({path.parent for path in files if path.name == "metadata.csv"})
    for metadata_folder in metadata_folders:
        yield from ljspeech_rows(metadata_folder / "metadata.csv", speaker_of(metadata_folder / "metadata.csv"))
    files = [path for path in files if not any(inner in path.parents for inner in metadata_folders)]
    by_name = {}  # (folder, lower-case name) -> files: take.txt, take.TXT and take.Txt alike
    for path in files:
        by_name.setdefault((path.parent, path.name.lower()), []).append(path)
    for path in files:
        audio_file = str(path)
        if path.suffix.lower() in UNDECODED_AUDIO_EXTENSIONS:
            yield Reject(audio_file, "unreadable_audio", "audio", f"{path.suffix} audio is not a format soundfile "
                         f"decodes; convert it (e.g. ffmpeg -i '{path.name}' '{path.stem}.flac')")
            continue
        if path.suffix.lower() not in AUDIO_EXTENSIONS:
            continue
        row = dict(audio=audio_file)
        if speaker_of(path) is not None:
            row["speaker"] = speaker_of(path)
        # take.txt, take.lab, and take.wav.txt as some tools write it.
        names = [path.stem + extension for extension in TRANSCRIPT_EXTENSIONS]
        names += [path.name + extension for extension in TRANSCRIPT_EXTENSIONS]
        transcripts = [found for name in names for found in by_name.get((path.parent, name.lower()), [])]
        if not transcripts:
            yield InputRow(audio_file, row, None, layout="folder",
                           missing_text=f"no {path.stem}.txt or {path.stem}.lab beside the audio")
            continue
        texts, problem = {}, None
        for transcript in transcripts:
            text, problem = read_transcript(transcript)
            if problem:
                break
            texts.setdefault(text, transcript)
        if problem:
            yield Reject(audio_file, "bad_row", "text", problem)
        elif len(texts) > 1:  # which one is right is not ours to guess
            differing = " and ".join(map(str, texts.values()))
            yield Reject(audio_file, "bad_row", "text", f"its transcripts differ: {differing}; keep the right one")
        else:
            [text] = texts
            yield InputRow(audio_file, dict(row, text=text), text, layout="folder")


def read_transcript(path: Path) -> tuple:
    """(the text of a .txt/.lab file with its white space evened out, None), or (None, why it cannot
    be read). UTF-8, with or without a byte-order mark; UTF-16 with its mark (Windows Notepad's
    "Unicode") is read too."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        return None, f"{path} cannot be read ({error.strerror})"
    encoding = "utf-16" if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig"
    try:
        return " ".join(raw.decode(encoding).split()), None
    except UnicodeDecodeError as error:
        return None, f"{path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start})"


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

    `transcribe`: speech recognition is on, so a row without text, or a take too long to keep whole,
    is planned (to be transcribed, and cut at its pauses) rather than rejected.
    """

    def __init__(self, limits: Limits, ref_audio: str = None, speaker: str = None, language: str = None,
                 languages: list = None, transcribe: bool = False):
        self.limits = limits
        self.defaults = dict(speaker=speaker, language=language)
        self.languages = languages or model_languages(PUBLISHED_LANGUAGE_IDS)  # what a row's language may be
        self.ref_audio = ref_audio
        self.transcribe = transcribe
        self.probes = {}  # path -> probe(path); one reference clip serves many rows
        self.own_values = dict.fromkeys(self.defaults, 0)  # rows that name another speaker/language than the flag

    def check(self, item):
        if isinstance(item, Reject):
            return item
        row, source = dict(item.row), item.source

        def reject(reason, field_name, problem):
            return Reject(source, reason, field_name, problem, item.input)

        # Fields prepare_codes does not read ("wav", "transcript"), named where a field is missing.
        unknown = sorted(set(row) - set(JSONL_ROW_FIELDS))
        unread = f" (this row's {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a field read here: " \
                 f"the fields are {', '.join(JSONL_ROW_FIELDS)})" if unknown else ""
        segments = row.pop("segments", None)
        if segments is not None:
            segments, problem = checked_segments(segments, text_needed=not self.transcribe)
            if problem:
                return reject("bad_row", "segments", problem)
        text = row.pop("text", None)
        if segments is None:
            if text is None and not self.transcribe:
                return reject("missing_transcript", "text",
                              f"{item.missing_text}{unread} (or pass --asr_model to transcribe it)")
            if text is not None and not isinstance(text, str):
                return reject("bad_row", "text", "is not a string")
            problem = transcript_problem(text) if text is not None else None
            if problem:
                return reject("empty_transcript", "text", problem)
            problem = markup_problem(text) if text is not None else None
            if problem:
                return reject("bad_row", "text", problem)
        if isinstance(text, str) and text.strip():
            row["text"] = text.strip()
        for field_name, default in self.defaults.items():
            if default is not None and row.get(field_name) not in (None, default):
                self.own_values[field_name] += 1
            value = default if row.get(field_name) is None else row[field_name]
            if value is None:
                row.pop(field_name, None)
                continue
            if not isinstance(value, str) or not value.strip():
                return reject("bad_row", field_name, "is not a name")
            if field_name == "language":
                problem = language_problem(value, self.languages)
                if problem:
                    return reject("bad_row", "language", problem)
                value = value.strip().lower()
            row[field_name] = value

        audio_file = row.get("audio")
        if audio_file is not None and not isinstance(audio_file, str):
            return reject("bad_row", "audio", f"is not a string (a path to the recording): {audio_file!r}")
        if audio_file is None or not audio_file.strip():
            return reject("missing_audio", "audio", f"missing{unread}")
        seconds, problem = self.probe(audio_file)
        problem = problem or self.limits.problem(seconds)
        if problem and problem[0] == "too_long":
            if segments is None and not self.transcribe:
                where = "give its transcript per segment" if item.layout == "jsonl" else \
                    "list it in a JSONL input with its transcript per segment"
                return reject("too_long", "audio", f"{audio_file}: {problem[1]}; to cut it into clips, {where} "
                              f"(\"segments\": [{{\"start\", \"end\", \"text\"}}]) or pass --asr_model to cut it at "
                              f"its pauses and transcribe the pieces")
            problem = None
        if segments and segments[-1]["end"] > seconds + 0.01:
            return reject("bad_row", "segments", f"the last segment ends at {segments[-1]['end']:g} s, "
                                                 f"after the audio's end ({seconds:.2f} s)")
        if problem:
            return reject(problem[0], "audio", f"{audio_file}: {problem[1]}")

        ref_audio = row.get("ref_audio") or self.ref_audio
        if ref_audio is not None:
            if not isinstance(ref_audio, str):
                return reject("bad_row", "ref_audio", "is not a path")
            _, problem = self.probe(ref_audio)
            if problem:
                return reject("bad_ref_audio", "ref_audio", f"{ref_audio}: {problem[1]}")
            row["ref_audio"] = ref_audio
        return PlannedClip(source, row, item.input, seconds, segments)

    def probe(self, path: str) -> tuple:
        if path not in self.probes:
            self.probes[path] = audio.probe(path)
        return self.probes[path]


def transcript_problem(text: str):
    """Why a transcript says nothing to train on, or None: it is blank, or it holds no letter or digit
    of any script (only punctuation, symbols or emoji)."""
    if not text.strip():
        return "is empty"
    if not any(character.isalnum() for character in text):
        return f"{text.strip()!r} has no letters or digits: there are no words in it to speak"
    return None


# A tag of SSML or HTML (<speak>, <break time="1s"/>, </p>): markup for a synthesiser, not words spoken.
MARKUP_TAG = re.compile(r"</?[A-Za-z][\w:-]*(\s[^<>]*)?/?>")


def markup_problem(text: str):
    """Why a transcript is not the words spoken, or None: it holds SSML or HTML tags, which would be
    trained as text the voice reads out (and <sub alias> or <say-as> say what to speak instead)."""
    tags = [match.group(0) for match in MARKUP_TAG.finditer(text)]
    if tags:
        return f"holds markup ({', '.join(dict.fromkeys(tags[:3]))}): write the words as spoken, without tags"
    return None


def checked_segments(segments, text_needed: bool = True) -> tuple:
    """(segments as [{"start", "end", "text"}], None) or (None, what is wrong with them). Without
    `text_needed` (speech recognition is on) a segment may leave its text out, to be transcribed:
    times from a diarization or voice-activity tool."""
    if not isinstance(segments, list) or not segments:
        return None, "is not a list of {\"start\", \"end\", \"text\"} objects"
    checked, previous_end = [], 0.0
    for number, segment in enumerate(segments, start=1):
        if not isinstance(segment, dict):
            return None, f"segment {number} is not an object"
        start, end, text = segment.get("start"), segment.get("end"), segment.get("text")
        if not all(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                   for value in (start, end)):
            return None, f"segment {number}: start and end must be numbers of seconds"
        if not 0 <= start < end or start < previous_end:
            return None, f"segment {number}: {start}..{end} s is not after the previous one, or ends before it starts"
        if text is not None or text_needed:  # else speech recognition writes it
            if not isinstance(text, str):
                return None, f"segment {number}: text is missing (or pass --asr_model to transcribe it)"
            problem = transcript_problem(text) or markup_problem(text)
            if problem:
                return None, f"segment {number}: text {problem}"
            text = text.strip()
        checked.append(dict(start=float(start), end=float(end), text=text))
        previous_end = end
    return checked, None


# ---------------------------------------------------------------------------------------------
# Decoded audio: checks, cutting, trimming, loudness (in the decoding worker processes)
# ---------------------------------------------------------------------------------------------

@dataclass
class Decoded:
    """One clip of the output, kept or rejected: a whole planned clip, or a piece of a long take."""
    clip: PlannedClip
    source: str
    row: dict = None                 # the output row so far; "text" is missing when recognition is to write it
    samples: object = None           # float32 mono at the tokenizer's rate, zero-padded to whole frames
    seconds: float = 0.0             # kept length, before the padding
    clipped_fraction: float = None   # set when the clip counts as clipped
    quality: dict = field(default_factory=dict)
    flags: dict = field(default_factory=dict)
    reject: Reject = None

    def rejected(self, reason: str, field_name: str, problem: str) -> "Decoded":
        # A piece with its text is fed again as its own segment: the take's line would make every piece again.
        is_piece = self.row is not None and "segment" in self.row and "text" in self.row
        self.reject = Reject(self.source, reason, field_name, problem,
                             line_to_feed_again(self.row) if is_piece else self.clip.input)
        self.samples = None
        return self


def line_to_feed_again(row: dict) -> str:
    """An output row as a JSONL input line that makes it again: its own fields, and a piece of a long
    take as that take with the one segment."""
    fields = {name: value for name, value in row.items() if name in JSONL_ROW_FIELDS}
    if "segment" in row:
        fields["segments"] = [dict(row["segment"], text=row["text"])]
        del fields["text"]
    return json.dumps(fields, ensure_ascii=False)


@dataclass
class Processing:
    """What is done to the audio before it is encoded."""
    trim: bool                       # cut silence at the edges down to `padding_seconds`
    padding_seconds: float
    max_piece_seconds: float         # a long take is cut into pieces no longer than this
    min_pause_seconds: float         # ... at pauses at least this long
    loudness_lufs: float = None      # the target of loudness normalisation; None: off


def speech_missed(samples: np.ndarray, sample_rate: int, spans: list):
    """What a long take's pieces (cut by the voice-activity detector) leave out, when that is much
    sound as loud as speech: said on every piece, so a take the detector mostly missed is not lost
    without a word. None otherwise."""
    total = len(samples) / sample_rate
    missed = audio.loud_seconds_outside(samples, sample_rate, spans)
    if missed <= max(audio.MISSED_SPEECH["seconds"], audio.MISSED_SPEECH["fraction"] * total):
        return None
    kept = sum(end - start for start, end in spans) / sample_rate
    return (f"the voice-activity detector cut {len(spans)} piece(s), {kept:.1f} s of this {total:.1f} s take; "
            f"{missed:.1f} s of sound as loud as speech lies outside them and was left out. If it is speech, "
            f"give the take's sentences as \"segments\" (start, end, text) to keep it")


@dataclass
class AudioChecks:
    """The checks and processing that need the decoded audio. They run in the decoding worker processes."""
    limits: Limits
    silence_dbfs: float
    clipped_fraction: float
    reject_clipped: bool
    processing: Processing
    max_clipped_fraction: float = audio.HEAVILY_CLIPPED_FRACTION
    references: dict = field(default_factory=dict, repr=False)  # path -> problem or None, per process

    def process(self, clips: list, sample_rate: int, frame_samples: int) -> list:
        """Per planned clip, the list of its output clips (Decoded, kept or rejected), in order."""
        takes = [self.decode_take(clip, sample_rate) for clip in clips]
        pieces = [piece for take in takes for piece in take if piece.reject is None]
        to_trim = [piece for piece in pieces if piece.quality.pop("trim")]
        if to_trim:
            from qwen3_tts_sft import voice_activity  # imports torch: only when trimming

            for piece, bounds in zip(to_trim, voice_activity.speech_bounds([p.samples for p in to_trim], sample_rate)):
                self.trim(piece, bounds, sample_rate)
        for piece in pieces:
            self.finish(piece, sample_rate, frame_samples)
        return takes

    def decode_take(self, clip: PlannedClip, sample_rate: int) -> list:
        """The clip decoded and checked as a whole, then cut into its pieces (one for a short clip)."""
        path = clip.row["audio"]
        take = Decoded(clip, clip.source)

        def rejected(reason, problem):
            return [take.rejected(reason, "audio", f"{path}: {problem}")]

        try:
            native, file_rate = audio.read_native(path)
            floats = audio.stores_floats(path)
            samples = audio.to_mono(native, file_rate, sample_rate)
            truncated = audio.truncation(path, len(native), file_rate)
        except Exception as error:  # a header can be fine and the data behind it corrupt
            return rejected("unreadable_audio", audio.unreadable(path, error))
        if truncated:
            return rejected("truncated_audio", truncated)
        if not np.isfinite(samples).all():
            return rejected("unreadable_audio", "holds NaN or infinite samples")
        cancelled = audio.cancelled_channels(native)
        if cancelled:  # what is left of the voice may be loud enough to pass for a clip: rejected at any level
            return rejected("channels_cancel", cancelled)
        dc_offset = float(samples.mean()) if len(samples) else 0.0
        has_dc_offset = abs(dc_offset) > audio.MAX_DC_OFFSET
        if has_dc_offset:  # no sound in it; the silence checks and the codes would see it
            samples = audio.remove_dc_offset(samples, sample_rate)
        level = audio.rms_dbfs(samples)
        if level < self.silence_dbfs:
            return rejected("silent", audio.silence_problem(samples, sample_rate, self.silence_dbfs))
        ref_audio = clip.row.get("ref_audio")
        if ref_audio:
            if ref_audio not in self.references:  # one reference clip usually serves many rows
                self.references[ref_audio] = self.reference_problem(ref_audio, sample_rate)
            if self.references[ref_audio]:
                return [take.rejected("bad_ref_audio", "ref_audio", f"{ref_audio}: {self.references[ref_audio]}")]

        pieces = self.pieces_of(clip, samples, native, file_rate, sample_rate, floats)
        if has_dc_offset:
            for piece in pieces:
                piece.flags["dc_offset"] = (f"the recording's mean sample was {dc_offset:+.3f} of full scale "
                                            f"(beyond ±{audio.MAX_DC_OFFSET}): removed before encoding")
        return pieces or rejected("silent", "the voice-activity detector heard no speech to cut")

    def pieces_of(self, clip: PlannedClip, samples: np.ndarray, native: np.ndarray, file_rate: int,
                  sample_rate: int, floats: bool = False) -> list:
        """A decoded take's output clips: one for a clip kept whole, else its segments or pieces.
        `native`: the file's own samples [frames, channels], where clipping is measured; `floats`: the
        file stores them as floats (audio.clipped_fraction)."""
        spans, texts, trim, missed, cuts_in_speech = self.spans(clip, samples, sample_rate)
        pieces = []
        for number, ((start, end), text) in enumerate(zip(spans, texts), start=1):
            whole = clip.segments is None and spans == [(0, len(samples))]  # else a piece: named #n, its span kept
            source = clip.source if whole else f"{clip.source}#{number}"
            row = dict(clip.row) if whole else dict(clip.row, segment=dict(start=round(start / sample_rate, 3),
                                                                           end=round(end / sample_rate, 3)))
            row.pop("text", None)
            if text is not None:
                row["text"] = text
            piece = Decoded(clip, source, row, samples[start:end])
            scale = file_rate / sample_rate  # the span in the file's own samples, where clipping is measured
            piece.clipped_fraction = audio.clipped_fraction(native[int(start * scale):int(end * scale)], floats)
            piece.quality = dict(file_sample_rate=file_rate, start=start / sample_rate, trim=trim)
            if missed:
                piece.flags["speech_missed"] = missed
            cuts = [f"{'starts' if at == start else 'ends'} at {at / sample_rate:.2f} s" for at in (start, end)
                    if at in cuts_in_speech]
            if cuts:
                piece.rejected("cut_in_speech", "audio", (
                    f"{clip.row['audio']} from {start / sample_rate:.2f} s: it {' and '.join(cuts)}, inside speech: "
                    f"the take has no pause there, nor any sound quieter than its speech, within --max_segment_seconds "
                    f"{self.processing.max_piece_seconds:g}, so it was cut mid-word. Give the take's \"segments\" "
                    f"(start, end, text), or a longer --max_segment_seconds"))
            pieces.append(piece)
        return pieces

    def spans(self, clip: PlannedClip, samples: np.ndarray, sample_rate: int) -> tuple:
        """([(start, end) samples], [text or None per span], whether to trim each span's edges, what
        the voice-activity detector's pieces left out (speech_missed) or None, the samples where it
        had to cut inside speech)."""
        settings = self.processing
        if clip.segments is not None:
            spans = [(round(s["start"] * sample_rate), min(len(samples), round(s["end"] * sample_rate)))
                     for s in clip.segments]
            return spans, [s["text"] for s in clip.segments], settings.trim, None, []
        seconds = len(samples) / sample_rate
        # Cut: a take too long to keep whole (only planned when recognition is on), or a long clip
        # that recognition transcribes anyway, which may as well come out in sentence-sized pieces.
        if seconds > self.limits.max_seconds or ("text" not in clip.row and seconds > settings.max_piece_seconds):
            from qwen3_tts_sft import voice_activity

            spans, cuts_in_speech = voice_activity.speech_pieces(
                samples, sample_rate, settings.max_piece_seconds, settings.min_pause_seconds, settings.padding_seconds)
            # The pieces already end at speech, plus padding: not trimmed again.
            return spans, [None] * len(spans), False, speech_missed(samples, sample_rate, spans), cuts_in_speech
        return [(0, len(samples))], [clip.row.get("text")], settings.trim, None, []

    def trim(self, piece: Decoded, bounds, sample_rate: int):
        """Cut the silence before and after the speech down to the padding. Silence is what the
        detector hears as no speech and is also quiet: loud sound it does not take for speech (an
        unusual voice, singing) stays."""
        if bounds is None:
            piece.flags["no_speech_found"] = "the voice-activity detector heard no speech, so it was not trimmed"
            return
        loud = audio.loud_bounds(piece.samples, sample_rate) or bounds
        bounds = min(bounds[0], loud[0]), max(bounds[1], loud[1])
        padding = round(self.processing.padding_seconds * sample_rate)
        start, end = max(0, bounds[0] - padding), min(len(piece.samples), bounds[1] + padding)
        piece.quality["trimmed_seconds"] = round((len(piece.samples) - (end - start)) / sample_rate, 3)
        piece.quality["start"] += start / sample_rate
        piece.samples = piece.samples[start:end]

    def finish(self, piece: Decoded, sample_rate: int, frame_samples: int):
        """Length limits, clipping, loudness, the measurements; then the padding to whole frames."""
        seconds = len(piece.samples) / sample_rate
        where = piece.clip.row["audio"]
        if piece.source != piece.clip.source:
            where += f" from {piece.quality['start']:.2f} s"
        problem = self.limits.problem(seconds)
        if problem:
            piece.rejected(problem[0], "audio", f"{where}: {problem[1]}")
            return
        # The take as a whole passed this check; one of its pieces (a segment over a pause) may not.
        if audio.rms_dbfs(piece.samples) < self.silence_dbfs:
            piece.rejected("silent", "audio",
                           f"{where}: {audio.silence_problem(piece.samples, sample_rate, self.silence_dbfs)}")
            return
        clipped = piece.clipped_fraction > self.clipped_fraction
        distorted = piece.clipped_fraction > self.max_clipped_fraction
        if distorted or (clipped and self.reject_clipped):
            limit = (f"--max_clipped_fraction {self.max_clipped_fraction:g}: distorted throughout, it would teach "
                     f"the distortion" if distorted else f"--clipped_fraction {self.clipped_fraction:g}, --reject_clipped")
            piece.rejected("clipped", "audio", f"{where}: {piece.clipped_fraction:.2%} of its samples are at full "
                                               f"scale ({limit})")
            return
        if clipped:
            piece.flags["clipped"] = f"{piece.clipped_fraction:.2%} of its samples are at full scale"
        piece.clipped_fraction = piece.clipped_fraction if clipped else None
        file_rate = piece.quality["file_sample_rate"]
        if file_rate < audio.LOW_SAMPLE_RATE:
            piece.flags["low_sample_rate"] = (f"recorded at {file_rate} Hz: it lacks the sound above {file_rate // 2} "
                                              f"Hz, and upsampling does not bring it back")
        loudness = audio.integrated_loudness(piece.samples, sample_rate)
        gain_db = 0.0
        if self.processing.loudness_lufs is not None:
            gain_db = audio.loudness_gain_db(loudness, audio.peak_dbfs(piece.samples), self.processing.loudness_lufs)
        quality = piece.quality
        quality.update(start=round(quality["start"], 3), end=round(quality["start"] + seconds, 3),
                       seconds=round(seconds, 3), loudness_lufs=round(loudness, 2) if math.isfinite(loudness) else None,
                       gain_db=round(gain_db, 2), snr_db=round(audio.speech_to_noise_db(piece.samples, sample_rate), 1),
                       sha1=audio.content_hash(piece.samples))
        samples = piece.samples * np.float32(10 ** (gain_db / 20)) if gain_db else piece.samples
        # Zeros up to a whole frame (under 80 ms): the last frame then sees the same zeros whatever pads
        # the batch, so a clip's codes do not depend on its batch (resume and shards rely on that).
        piece.samples = np.pad(samples, (0, -len(samples) % frame_samples))
        piece.seconds = seconds
        quality["frames"] = len(piece.samples) // frame_samples

    def reference_problem(self, path: str, sample_rate: int):
        """Why a file cannot be a reference clip, or None: the checks of a training clip, and its
        rate must not be low (the speaker vector comes from it alone)."""
        def length_problem(seconds):
            reason_and_problem = self.limits.problem(seconds)
            return reason_and_problem[1] if reason_and_problem else None
        return audio.reference_problem(path, sample_rate, length_problem, self.silence_dbfs)
