"""Rehearsal of the starting model's own speakers: a replay set of its own speech, mixed into training.

Training on new voices moves weights that every speaker shares, so the starting model's speakers
drift even though their codec embedding rows are restored at export (voices.py). With
--replay_speakers, the starting model, before any training, speaks a set of sentences for each of
those speakers: greedily, as generate_custom_voice does with do_sample=False (non-streaming
layout, the model's own repetition penalty). Those codes become training clips of that speaker,
and --replay_ratio of each epoch's clips are drawn from them. The same clips measure the drift:
their teacher-forced loss at the start and at the end of the run (voices.report).

A sentence whose speech runs past --replay_max_seconds is dropped: speech that does not stop is
not a voice worth keeping, and training on it would teach codec_eos in the wrong place. So is one
that ends before any speech (codec_eos first): there is nothing to rehearse.

Generating the set takes minutes for a real model, so it is cached in --output_model_path/replay/
with the settings that made it (the model's files, speakers, languages, sentences, frame cap,
generation options, precision, device type, qwen_tts version) and reused when they are the same.
"""

import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from qwen3_tts_sft.audio import FRAMES_PER_SECOND
from qwen3_tts_sft.languages import model_languages
from qwen3_tts_sft.quiet import quiet_transformers
from qwen3_tts_sft.sequence_layout import prefix_language
from qwen3_tts_sft.training_data import Clip

REPLAY_DIR = "replay"   # under --output_model_path
ALL = "all"
# The flags that decide the replay clips and how many of them each epoch trains on.
REPLAY_FLAGS = ("replay_speakers", "replay_ratio", "replay_languages", "replay_max_seconds")
# Why a generated sentence is left out of the replay set, at the end of its `dropped` entry.
RAN_PAST = "ran past --replay_max_seconds"
NO_SPEECH = "no speech: it ended at once"


def sentences() -> dict:
    """{language: sentences}: infer_test.py's built-in test sentences, one set per language the
    models speak ("auto" reads the English ones)."""
    from infer_test import SENTENCES  # the one list of test sentences

    return SENTENCES


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------

def named_speakers(args) -> list:
    """The names --replay_speakers lists (lower-cased); [] for 'all' and when it is not given."""
    if not args.replay_speakers or args.replay_speakers.strip().lower() == ALL:
        return []
    return [name.strip().lower() for name in args.replay_speakers.split(",") if name.strip()]


def languages(args, codec_language_id: dict) -> list:
    """The languages each rehearsed speaker speaks: --replay_languages, or with 'all' every one of
    the model's languages that has sentences."""
    if args.replay_languages.strip().lower() == ALL:
        return [language for language in model_languages(codec_language_id) if language in sentences()]
    return [name.strip().lower() for name in args.replay_languages.split(",") if name.strip()]


def language_problems(args, codec_language_id: dict) -> list:
    known = model_languages(codec_language_id)
    chosen = languages(args, codec_language_id)
    problems = [f"--replay_languages {name}: the model has no such language ({', '.join(known)})"
                for name in chosen if name not in known]
    problems += [f"--replay_languages {name}: no built-in sentences for it (infer_test.SENTENCES)"
                 for name in chosen if name in known and name not in sentences()]
    if not chosen:
        problems.append("--replay_languages names no language")
    return problems


def settings_of(flags: dict) -> dict:
    """The replay flags of a run (its vars(args), or a checkpoint's saved flags); {} when replay is off."""
    if not flags.get("replay_speakers"):
        return {}
    return {name: flags.get(name) for name in REPLAY_FLAGS}


def rehearsed(args, table: list) -> list:
    """The kept speakers of the table that --replay_speakers names (all of them with 'all')."""
    kept = [speaker for speaker in table if speaker.kept]
    if not args.replay_speakers:
        return []
    if not named_speakers(args):
        return kept
    by_name = {speaker.name: speaker for speaker in kept}
    replaced = [name for name in named_speakers(args) if name not in by_name]
    if replaced:
        raise SystemExit(f"error: --replay_speakers {', '.join(replaced)}: this run replaces that voice "
                         f"(--overwrite_speaker), so there is no old voice to rehearse")
    return [by_name[name] for name in named_speakers(args)]


# ---------------------------------------------------------------------------------------------
# The replay set
# ---------------------------------------------------------------------------------------------

@dataclass
class ReplaySet:
    speakers: list   # the rehearsed speakers.Speaker
    clips: list      # training_data.Clip per speaker, language and sentence that stopped in time
    dropped: list    # "speaker, language: sentence (why)" of those left out: past the frame cap, or no speech
    path: Path       # the cache file
    reused: bool     # read from the cache rather than generated

    def clips_of(self, name: str) -> list:
        return [clip for clip in self.clips if clip.speaker == name]


def build(tts, table: list, args, accelerator, prompter) -> ReplaySet:
    """The replay set of the speakers --replay_speakers names (None when it is not given): read from
    the cache when it was made with the same settings, else generated by the main process (the
    others wait, then read it)."""
    speakers = rehearsed(args, table)
    if not speakers:
        return None
    chosen = languages(args, tts.model.config.talker_config.codec_language_id)
    max_frames = math.ceil(args.replay_max_seconds * FRAMES_PER_SECOND)
    options = generation_options(tts, max_frames)
    settings = dict(
        model=model_fingerprint(args.init_model_path),
        speakers=[dict(name=s.name, codec_id=s.codec_id, dialect=s.dialect) for s in speakers],
        sentences={language: sentences()[language] for language in chosen},
        max_frames=max_frames,
        generation={key: value for key, value in options.items() if key != "max_new_tokens"},
        mixed_precision=accelerator.mixed_precision,
        device=accelerator.device.type,
        qwen_tts=version("qwen-tts"),
    )
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(args.output_model_path) / REPLAY_DIR / f"replay-{key}.json"
    with accelerator.main_process_first():
        cached = read_cache(path, settings)
        if cached is None:
            rows, dropped = generate(tts, speakers, chosen, max_frames, options, prompter, accelerator)
            write_cache(path, settings, rows, dropped)
        else:
            rows, dropped = cached
    by_name = {speaker.name: speaker for speaker in speakers}
    clips = [replay_clip(row, by_name[row["speaker"]], prompter, f"{path}: {row['speaker']}, {row['language']} "
                                                                  f"#{row['index']}") for row in rows]
    return ReplaySet(speakers, clips, dropped, path, reused=cached is not None)


def replay_clip(row: dict, speaker, prompter, source: str) -> Clip:
    """A training clip of a replay row, laid out as generate() laid out the speech: a dialect
    speaker's chinese and auto rows carry its dialect in the prefix."""
    return Clip(source=source, text=row["text"], codes=np.asarray(row["audio_codes"], dtype=np.int16),
                ref_audio=None, speaker=speaker.name, language=prefix_language(row["language"], speaker.dialect),
                prompt=prompter(row["text"]))


def generation_options(tts, max_frames: int) -> dict:
    """generate_custom_voice's options with do_sample=False: greedy, with the model's own repetition
    penalty (generation_config.json). Two tokens more than the cap: speech that runs away comes
    back longer than max_frames, speech that stops comes back at its own length."""
    # The same merge generate_custom_voice makes (qwen_tts 0.1.1), so greedy here is greedy there.
    # Temperature 1 changes nothing without sampling; the model's own (0.9) makes transformers say so.
    return tts._merge_generate_kwargs(do_sample=False, subtalker_dosample=False, temperature=1.0,
                                      subtalker_temperature=1.0, max_new_tokens=max_frames + 2)


def generate(tts, speakers: list, chosen: list, max_frames: int, options: dict, prompter, accelerator) -> tuple:
    """(rows, dropped): each speaker's greedy codes for every sentence of every chosen language."""
    model, device = tts.model, accelerator.device
    model.to(device).eval()
    rows, dropped = [], []
    pairs = [(speaker, language) for speaker in speakers for language in chosen]
    for speaker, language in tqdm(pairs, desc="replay set", unit="language", dynamic_ncols=True):
        texts = sentences()[language]
        input_ids = [torch.tensor([prompter(text)], device=device) for text in texts]
        with torch.no_grad(), accelerator.autocast(), quiet_transformers():
            codes, _ = model.generate(input_ids=input_ids, languages=[language] * len(texts),
                                      speakers=[speaker.name] * len(texts), non_streaming_mode=True, **options)
        for index, (text, frames) in enumerate(zip(texts, codes)):
            if not 0 < len(frames) <= max_frames:
                why = RAN_PAST if len(frames) else NO_SPEECH
                dropped.append(f"{speaker.name}, {language}: {text} ({why})")
                continue
            rows.append(dict(speaker=speaker.name, language=language, index=index, text=text,
                             audio_codes=frames.cpu().tolist()))
    model.train()
    if dropped:
        tqdm.write(f"replay set: {dropped_count(dropped)} left out")
    return rows, dropped



def dropped_count(dropped: list) -> str:
    """'3 sentences (2 ran past --replay_max_seconds, 1 no speech: it ended at once)'."""
    # A cache written before the reasons were recorded dropped only speech that ran past the cap.
    reasons = Counter(next((why for why in (RAN_PAST, NO_SPEECH) if entry.endswith(f"({why})")), RAN_PAST)
                      for entry in dropped)
    return f"{len(dropped)} sentences ({', '.join(f'{count} {why}' for why, count in reasons.items())})"


def model_fingerprint(folder) -> dict:
    """What identifies the model that speaks: its config, and the size and time of each weight file."""
    folder = Path(folder).resolve()
    files = {path.name: [path.stat().st_size, path.stat().st_mtime_ns]
             for path in sorted(folder.glob("*.safetensors")) if path.name != "speaker_encoder.safetensors"}
    config = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    return dict(folder=str(folder), config_sha256=config, weights=files)


def read_cache(path: Path, settings: dict):
    """(rows, dropped) from the cache file when it was made with these settings, else None."""
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # a damaged cache is made again
    if cached.get("settings") != json.loads(json.dumps(settings)):
        return None
    return cached["clips"], cached["dropped"]


def write_cache(path: Path, settings: dict, rows: list, dropped: list) -> None:
    """Written under a temporary name and renamed: an interrupted write leaves no cache to trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(dict(settings=settings, clips=rows, dropped=dropped), ensure_ascii=False) + "\n",
                       encoding="utf-8")
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------------
# Mixing
# ---------------------------------------------------------------------------------------------

def mixed_clips(replay_set: ReplaySet, new_clips: int, ratio: float, seed: int) -> list:
    """The replay clips added to the training set, so that they are `ratio` of each epoch's clips:
    the whole set as many times as it fits, the rest a seeded sample of it."""
    if replay_set is None or not replay_set.clips or ratio <= 0:
        return []
    wanted = max(1, round(new_clips * ratio / (1 - ratio)))
    repeats, rest = divmod(wanted, len(replay_set.clips))
    sample = np.random.default_rng([seed, 21]).permutation(len(replay_set.clips))[:rest]
    return replay_set.clips * repeats + [replay_set.clips[i] for i in sorted(sample)]
