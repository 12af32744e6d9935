"""The dataset as a whole, once every clip is decoded: checks across clips, the choice of reference
clips, and the quality report (OUTPUT.report.json and its plot, OUTPUT.report.png).

First, per clip: a clip faster than MAX_CHARACTERS_PER_SECOND is rejected whatever its speaker (no
language is spoken that fast: the text is not what the clip says). Then across clips, per speaker:
    speaking rate   characters per second against the median of the speaker's clips of its rate
                    group (audio.rate_group: its language, else its script; a bilingual speaker's
                    Chinese and English differ 3x), over at least MIN_CLIPS_FOR_MEDIAN clips
                    of the group: beyond --flag_rate_ratio (either way) the clip is
                    flagged, beyond --reject_rate_ratio rejected. A transcript that belongs to another
                    clip, or a clip cut short, is far off its speaker's rate; natural variation is not
    duplicates      the same samples as a kept clip: rejected (it would count twice), the first
                    copy whose text fits the rate being the one kept; the same text over other
                    audio: flagged, naming a kept clip (a retake is fine, a copied transcript is not)
References, for rows without a ref_audio: a speaker's references are its `references_per_speaker`
cleanest clips: no flags (so not clipped, not of a low rate), REFERENCE_SECONDS long where it can,
little silence at the edges, the best signal to noise first. A clip kept whole is its own file; a
piece of a long take is written, as encoded, beside the output (the trainer reads reference clips
from files), under a name of its speaker's own (reference_name).
"""

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen3_tts_sft import audio
from qwen3_tts_sft.transcription import normalise

MIN_CLIPS_FOR_MEDIAN = 5
# Faster than anyone has been measured speaking: the record talkers manage about 10 words a second,
# some 60 characters of English (spaces counted), the language fastest in characters. Read speech runs
# at 12-20 (English, Spanish), Chinese and Japanese, about a syllable a character, at 5-10. A clip given
# the transcript of a much longer one lands far beyond; closer misses are the relative check's.
MAX_CHARACTERS_PER_SECOND = 60.0
REFERENCE_SECONDS = (3.0, 10.0)  # README: a clean 3-10 s clip makes a good reference
MAX_REFERENCE_SILENCE = 1.0      # seconds of edge silence in a file that a reference had better not have
NO_SPEAKER = "(no speaker field)"


@dataclass
class ClipInfo:
    """What the checks across clips need of a kept row (the row itself stays on disk)."""
    position: tuple      # (file, byte offset, index in the line's rows or None): where publish finds it
    order: tuple         # input_order of its source
    source: str
    speaker: str         # lower-cased, as the trainer groups speakers
    text: str
    seconds: float       # frames / 12.5: what training sees
    row_audio: str
    segment: dict        # the span of a long take, or None for a clip kept whole
    ref_audio: str       # given in the row, or None (chosen here)
    quality: dict
    flags: dict
    language: str = None  # as the row names it; None: auto

    @property
    def rate(self) -> float:
        return audio.spoken_characters(self.text) / self.seconds if self.seconds else 0.0

    @property
    def rate_key(self) -> tuple:
        """(speaker, rate group): the clips whose rates are compared with each other."""
        return self.speaker, audio.rate_group(self.text, self.language)

    @staticmethod
    def of(row: dict, position: tuple, order: tuple) -> "ClipInfo":
        frames = len(row["audio_codes"]) if "audio_codes" in row else row["quality"]["frames"]
        speaker = row["speaker"].strip().lower() if row.get("speaker") else NO_SPEAKER
        return ClipInfo(position, order, row["source"], speaker, row["text"], frames / audio.FRAMES_PER_SECOND,
                        row["audio"], row.get("segment"), row.get("ref_audio"), row.get("quality", {}),
                        dict(row.get("flags", {})), row.get("language"))


@dataclass
class DatasetChecks:
    flag_rate_ratio: float
    reject_rate_ratio: float
    references_per_speaker: int

    def run(self, clips: list) -> tuple:
        """(rejects {source: (reason, problem)}, median rate {ClipInfo.rate_key: chars/s}); flags are added
        to the clips."""
        rejects = {}
        for clip in clips:  # first: a clip that no speaker could say must not count as anyone's audio or rate
            if clip.rate > MAX_CHARACTERS_PER_SECOND:
                rejects[clip.source] = ("speaking_rate", impossible_rate(clip))
        copies = {}  # the audio's sha1 -> its clips in input order: a recording listed more than once
        for clip in clips:
            if clip.source not in rejects:
                copies.setdefault(clip.quality.get("sha1") or clip.source, []).append(clip)
        medians = {key: float(np.median([clip.rate for clip in group]))
                   for key, group in by_rate_key(group[0] for group in copies.values()).items()
                   if len(group) >= MIN_CLIPS_FOR_MEDIAN}
        for group in copies.values():
            # The first copy whose text fits the speaker's rate is kept, the others are its duplicates: a
            # recording listed twice, once with a wrong transcript, keeps the right one.
            kept = None
            for clip in group:
                if kept is not None:
                    rejects[clip.source] = ("duplicate_audio", duplicate_problem(clip, kept))
                    continue
                verdict, what = self.rate_check(clip, medians.get(clip.rate_key))
                if verdict == "reject":
                    rejects[clip.source] = ("speaking_rate", what)
                    continue
                if verdict == "flag":
                    clip.flags["speaking_rate"] = what
                kept = clip
        # Last, among the clips kept: a flag must name a clip that is in the dataset.
        first_text = {}
        for clip in clips:
            if clip.source in rejects:
                continue
            text = (clip.speaker, normalise(clip.text))  # speakers of one corpus often read one script
            if text in first_text:
                clip.flags["duplicate_text"] = f"the same text as {first_text[text]}"
            first_text.setdefault(text, clip.source)
        return rejects, medians

    def rate_check(self, clip: ClipInfo, median: float) -> tuple:
        """("reject" or "flag", why) when the clip's rate is far off the median of its speaker's clips of its
        rate group, else (None, None)."""
        if median is None:  # too few clips for a median
            return None, None
        ratio = clip.rate / median
        off = max(ratio, 1 / ratio) if ratio > 0 else math.inf
        what = (f"{clip.rate:.1f} characters/s, {ratio:.2f}x the speaker's median {median:.1f} (of its "
                f"{clip.rate_key[1]} clips): "
                f"the text may not be what is said, or the audio is cut")
        if off > self.reject_rate_ratio:
            return "reject", f"{what} (--reject_rate_ratio {self.reject_rate_ratio:g})"
        return ("flag", what) if off > self.flag_rate_ratio else (None, None)

    def references(self, clips: list) -> dict:
        """{speaker: [the chosen clips]} for the speakers with rows that have no ref_audio."""
        wanted = {clip.speaker for clip in clips if clip.ref_audio is None}
        chosen = {}
        for speaker, group in by_speaker(clips).items():
            if speaker in wanted:
                chosen[speaker] = sorted(group, key=reference_rank)[:self.references_per_speaker]
        return chosen


def duplicate_problem(clip: ClipInfo, kept: ClipInfo) -> str:
    other_text = (f", which keeps its own text {kept.text!r} and not this row's {clip.text!r}"
                  if normalise(kept.text) != normalise(clip.text) else "")
    return f"the same audio as {kept.source}{other_text}"


def impossible_rate(clip: ClipInfo) -> str:
    where = clip.row_audio + (f" from {clip.quality['start']:.2f} s" if clip.segment else "")
    return (f"{where}: {audio.spoken_characters(clip.text)} characters in {clip.seconds:.2f} s is {clip.rate:.1f} characters/s, beyond "
            f"the {MAX_CHARACTERS_PER_SECOND:g} that any language is spoken at: the text is not what this clip says, "
            f"or the audio is cut")


def by_speaker(clips) -> dict:
    groups = {}
    for clip in clips:
        groups.setdefault(clip.speaker, []).append(clip)
    return groups


def by_rate_key(clips) -> dict:
    groups = {}
    for clip in clips:
        groups.setdefault(clip.rate_key, []).append(clip)
    return groups


def is_clean(clip: ClipInfo) -> bool:
    return not clip.flags


def reference_rank(clip: ClipInfo) -> tuple:
    """Sorts the best reference first: clean, of a suitable length, with little silence cut (its own
    file serves, see reference_file), least noisy, then input order."""
    low, high = REFERENCE_SECONDS
    outside = max(low - clip.seconds, clip.seconds - high, 0.0)
    much_silence = clip.segment is None and (clip.quality.get("trimmed_seconds") or 0.0) > MAX_REFERENCE_SILENCE
    return (not is_clean(clip), outside, much_silence, -clip.quality.get("snr_db", 0.0), clip.order)


def reference_file(clip: ClipInfo, folder: Path, number: int) -> str:
    """The file a chosen reference clip is read from: its own, or for a piece of a long take or a clip
    trimmed of more than MAX_REFERENCE_SILENCE, the audio as it was encoded (cut, loudness-normalised),
    written into `folder`: the trainer reads a reference file whole, silence and all."""
    if clip.segment is None and (clip.quality.get("trimmed_seconds") or 0.0) <= MAX_REFERENCE_SILENCE:
        return clip.row_audio
    rate = audio.TOKENIZER_SAMPLE_RATE
    quality = clip.quality
    samples = audio.load_mono(clip.row_audio, rate)[round(quality["start"] * rate):round(quality["end"] * rate)]
    samples = samples * np.float32(10 ** (quality.get("gain_db", 0.0) / 20))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{reference_name(clip.speaker)}-{number}.wav"
    import soundfile

    soundfile.write(path, samples, rate, subtype="PCM_16")
    return str(path)


def reference_name(speaker: str) -> str:
    """The speaker's name as a file name, one per speaker and the same on every run: a name that is
    not a safe file name as it is gets cleaned up and a short hash of the exact name added, so that
    "x y" and "x_y" do not write (and read) each other's reference files."""
    name = re.sub(r"[^\w.-]+", "_", speaker).strip("._") or "speaker"
    if name != speaker:
        name += "-" + hashlib.sha1(speaker.encode()).hexdigest()[:8]
    return name


def spread(values) -> dict:
    values = [value for value in values if value is not None and math.isfinite(value)]
    if not values:
        return None
    low, p10, median, p90, high = np.percentile(values, [0, 10, 50, 90, 100])
    return dict(min=round(float(low), 2), p10=round(float(p10), 2), median=round(float(median), 2),
                p90=round(float(p90), 2), max=round(float(high), 2))


def clip_entry(clip: ClipInfo, medians: dict, text_from: str = None) -> dict:
    median = medians.get(clip.rate_key)
    quality = clip.quality
    return dict(source=clip.source, speaker=clip.speaker, seconds=round(clip.seconds, 3),
                characters_per_second=round(clip.rate, 2), rate_group=clip.rate_key[1],
                rate_ratio=round(clip.rate / median, 3) if median else None,
                loudness_lufs=quality.get("loudness_lufs"), gain_db=quality.get("gain_db"),
                snr_db=quality.get("snr_db"), file_sample_rate=quality.get("file_sample_rate"),
                trimmed_seconds=quality.get("trimmed_seconds"), text_from=text_from, cer=quality.get("cer"),
                flags=clip.flags)


def speaker_entries(kept: list, medians: dict, references: dict) -> dict:
    entries = {}
    for speaker, group in sorted(by_speaker(kept).items()):
        flags = {}
        for clip in group:
            for name in clip.flags:
                flags[name] = flags.get(name, 0) + 1
        given = sorted({clip.ref_audio for clip in group if clip.ref_audio})
        entries[speaker] = dict(
            clips=len(group), hours=round(sum(clip.seconds for clip in group) / 3600, 4),
            seconds=spread(clip.seconds for clip in group),
            characters_per_second=spread(clip.rate for clip in group),
            # Per rate group (a language, else a script) where the speaker's clips fall in several.
            characters_per_second_by_group={key[1]: spread(clip.rate for clip in clips)
                                            for key, clips in sorted(by_rate_key(group).items())}
            if len({clip.rate_key for clip in group}) > 1 else None,
            median_rate_checked=sorted(key[1] for key in medians if key[0] == speaker),
            loudness_lufs=spread(clip.quality.get("loudness_lufs") for clip in group),
            snr_db=spread(clip.quality.get("snr_db") for clip in group), flags=flags,
            references=[dict(source=clip.source, audio=path, seconds=round(clip.seconds, 2),
                             snr_db=clip.quality.get("snr_db"), clean=is_clean(clip))
                        for clip, path in references.get(speaker, [])],
            given_references=given)
    return entries


def plot(path: Path, kept: list, rate_rejected: list):
    """Durations and speaking rates per speaker: a histogram and a scatter, flagged clips marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = by_speaker(kept)
    speakers = sorted(groups)
    families, labels = fonts_and_labels(speakers)
    with plt.rc_context({"font.family": families}):
        draw(path, plt, groups, dict(zip(speakers, labels)), kept, rate_rejected)


def draw(path: Path, plt, groups: dict, labels: dict, kept: list, rate_rejected: list):
    figure, (durations, rates) = plt.subplots(1, 2, figsize=(12, 4.5))
    bins = np.linspace(0, max([clip.seconds for clip in kept] + [1.0]), 30)
    for speaker, group in sorted(groups.items()):
        durations.hist([clip.seconds for clip in group], bins=bins, alpha=0.6, label=labels[speaker])
        clean = [clip for clip in group if not clip.flags]
        flagged = [clip for clip in group if clip.flags]
        dots = rates.scatter([c.seconds for c in clean], [c.rate for c in clean], s=12, label=labels[speaker])
        rates.scatter([c.seconds for c in flagged], [c.rate for c in flagged], s=30, marker="x",
                      color=dots.get_facecolor()[0])
    if rate_rejected:
        rates.scatter([c.seconds for c in rate_rejected], [c.rate for c in rate_rejected], s=40, marker="x",
                      color="red", label="rejected: speaking rate")
    durations.set(xlabel="seconds", ylabel="clips", title="clip durations")
    rates.set(xlabel="seconds", ylabel="characters per second", title="speaking rate (x: flagged)")
    for axes in (durations, rates):
        if groups:
            axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def fonts_and_labels(names: list) -> tuple:
    """The font families the plot asks for, and each name's legend label.

    matplotlib's default font draws Latin, Greek and Cyrillic but not Chinese, Japanese or Korean,
    and warns once per missing character. Fonts installed here that draw a name's other characters
    follow the default (matplotlib falls back glyph by glyph); a name that no font here draws whole
    is labelled by its place among the speakers ("speaker 2"), the order of report.json's "speakers".
    """
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    default_file = font_manager.findfont(font_manager.FontProperties())
    drawn = set(FT2Font(default_file).get_charmap())
    families = [font_manager.FontProperties(fname=default_file).get_name()]
    missing = {ord(character) for name in names for character in str(name) if not character.isspace()} - drawn
    for font in font_manager.fontManager.ttflist if missing else []:
        if font.name.startswith("Last Resort"):  # matplotlib's own: a box for every character, not a glyph
            continue
        try:
            characters = set(FT2Font(font.fname).get_charmap())
        except (OSError, RuntimeError):  # a font file matplotlib listed but cannot open
            continue
        if missing & characters:
            families.append(font.name)
            drawn |= characters
            missing -= characters
        if not missing:
            break
    labels = [str(name) if all(ord(c) in drawn or c.isspace() for c in str(name)) else f"speaker {place}"
              for place, name in enumerate(names, 1)]
    return families, labels
