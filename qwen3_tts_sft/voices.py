"""The voices of a run: the new ones it adds, and the starting model's own, which it keeps.

A run may start from a Base model (no speakers) or from a CustomVoice model: a download, or a
checkpoint of this trainer. A CustomVoice model's speakers are names in talker_config.spk_id,
each naming a row of the talker's codec embedding that holds its speaker vector, and, for a
dialect speaker, a dialect in spk_is_dialect. A run keeps every one of them ("kept speakers"):
same name, codec id and dialect, and the very row it had. That row needs restoring: the codec
embedding trains as one matrix, and although no training sequence reads a speaker's row (the
speaker slot is filled from the speaker table), AdamW's weight decay shrinks it at every step.
So the speaker table lists each kept speaker with its row as loaded, and the export writes it
back. New speakers get free codec ids (speakers.assign_speakers); a new speaker with a kept
speaker's name is refused unless --overwrite_speaker.

qwen_tts builds a speaker encoder for tts_model_type "base" only, so a CustomVoice model loads
without one. The new voices' vectors then come from a Base model's encoder: the folder named by
--speaker_encoder_from (a Base model, or a checkpoint folder holding speaker_encoder.safetensors),
or the speaker_encoder.safetensors this trainer keeps in its checkpoints, so a run that starts
from an earlier run's checkpoint needs no flag.
"""

import json
import math
from pathlib import Path

from qwen3_tts_sft import checkpoint, replay
from qwen3_tts_sft.speakers import Speaker, assign_speakers, existing_speaker_ids, reference_problem

BASE, CUSTOM_VOICE = "base", "custom_voice"  # the tts_model_type values a run can start from
NO_ENCODER_HINT = ("pass --speaker_encoder_from with the Base model of the same size (Qwen3-TTS-12Hz-1.7B-Base "
                   "for a 1.7B model), or with a checkpoint folder of this trainer (it keeps "
                   "speaker_encoder.safetensors)")


def read_config(folder) -> dict:
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Checks before any model loads
# ---------------------------------------------------------------------------------------------

def flag_problems(args, resume_state=None) -> list:
    """Why the voice flags cannot work with this starting model (read from its config.json), and,
    on a resume, which of them differ from the checkpoint's."""
    config = read_config(args.init_model_path)
    model_type = config.get("tts_model_type")
    if model_type is None:
        parent = Path(args.init_model_path).resolve().parent
        inside = (parent / "config.json").is_file() and read_config(parent).get("tts_model_type") in (BASE, CUSTOM_VOICE)
        return [f"--init_model_path {args.init_model_path} is not a Qwen3-TTS model (its config.json has no "
                f"tts_model_type; model_type {config.get('model_type')!r})" +
                (f": it is a part of the model in {parent}; pass that folder" if inside else "")]
    if model_type not in (BASE, CUSTOM_VOICE):
        return [f"--init_model_path {args.init_model_path} is a {model_type!r} model; start from a Base or a "
                f"CustomVoice model"]
    problems = []
    if model_type == BASE and args.speaker_encoder_from:
        problems.append(f"--speaker_encoder_from: {args.init_model_path} is a Base model and has its own speaker "
                        f"encoder; the flag is for starting from a CustomVoice model")
    if model_type == CUSTOM_VOICE:
        _, problem = find_encoder(args)
        if problem:
            problems.append(problem)
    existing = existing_speaker_ids(config["talker_config"].get("spk_id"))
    if args.replay_speakers and not existing:
        problems.append(f"--replay_speakers: {args.init_model_path} has no speakers of its own to rehearse")
    else:
        unknown = [name for name in replay.named_speakers(args) if name not in existing]
        if unknown:
            problems.append(f"--replay_speakers {', '.join(unknown)}: not a speaker of {args.init_model_path} "
                            f"(it has {', '.join(existing)})")
    if args.replay_speakers:
        problems += replay.language_problems(args, config["talker_config"].get("codec_language_id"))
    if resume_state is not None and replay.settings_of(resume_state.flags) != replay.settings_of(vars(args)):
        problems.append(f"cannot resume this checkpoint: it was made with the replay flags "
                        f"{replay.settings_of(resume_state.flags) or 'off'}, these are "
                        f"{replay.settings_of(vars(args)) or 'off'} (they decide which clips each step trains on)")
    return problems


# ---------------------------------------------------------------------------------------------
# The speaker encoder of a CustomVoice start
# ---------------------------------------------------------------------------------------------

def find_encoder(args) -> tuple:
    """(folder, None): the folder whose speaker encoder makes the new voices' vectors, for a start from
    a CustomVoice model: --speaker_encoder_from, else the starting folder itself (a checkpoint of
    this trainer). (None, why not) when there is none, or it does not fit the model."""
    folder = Path(args.speaker_encoder_from or args.init_model_path)
    try:
        checkpoint.speaker_encoder_weights(folder, base_dir=folder)
    except FileNotFoundError as error:
        if not args.speaker_encoder_from:
            return None, (f"{args.init_model_path} has no speaker encoder (tts_model_type custom_voice), and the "
                          f"new voices' vectors need one: {NO_ENCODER_HINT}")
        return None, f"--speaker_encoder_from {folder}: no speaker encoder there ({error}); {NO_ENCODER_HINT}"
    if not (folder / "config.json").is_file():
        return None, (f"--speaker_encoder_from {folder}: no config.json there (its speaker_encoder_config says "
                      f"how the encoder is built)")
    width = read_config(folder).get("speaker_encoder_config", {}).get("enc_dim")
    hidden = read_config(args.init_model_path)["talker_config"]["hidden_size"]
    if width != hidden:
        return None, (f"the speaker encoder in {folder} makes {width}-wide vectors but the talker of "
                      f"{args.init_model_path} takes {hidden}: use the Base model of the same size")
    return folder, None


def encoder_source(args) -> Path:
    """find_encoder's folder; SystemExit, naming --speaker_encoder_from, when there is none."""
    folder, problem = find_encoder(args)
    if problem:
        raise SystemExit(f"error: {problem}")
    return folder


def borrowed_encoder_config(args):
    """The speaker_encoder_config of the folder the encoder comes from, when it is not the starting
    model's own (the export writes it into the checkpoint's config.json); None otherwise."""
    if read_config(args.init_model_path).get("tts_model_type") == BASE:
        return None
    return read_config(encoder_source(args))["speaker_encoder_config"]


def attach_speaker_encoder(model, args) -> Path:
    """Give a CustomVoice model (loaded without a speaker encoder) the encoder of encoder_source(args),
    in the model's dtype, so the run computes (or trains) the new voices' vectors as from a Base
    model. Returns the folder it came from."""
    from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSSpeakerEncoderConfig
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSSpeakerEncoder

    folder = encoder_source(args)
    weights, _ = checkpoint.speaker_encoder_weights(folder, base_dir=folder)
    config = Qwen3TTSSpeakerEncoderConfig(**read_config(folder)["speaker_encoder_config"])
    encoder = Qwen3TTSSpeakerEncoder(config)
    encoder.load_state_dict(weights)
    parameter = next(model.parameters())
    model.speaker_encoder = encoder.to(parameter.device, parameter.dtype)
    model.config.speaker_encoder_config = config
    model.speaker_encoder_sample_rate = config.sample_rate
    return folder


# ---------------------------------------------------------------------------------------------
# The speaker table
# ---------------------------------------------------------------------------------------------

def speaker_table(clips: list, model, overwrite_existing: bool, max_audio_seconds: float = 0.0, log=print) -> list:
    """The new speakers of `clips` (in order of first appearance), then every speaker of the starting
    model that they do not replace, each kept with its codec id and dialect. Reference clips that
    cannot give a voice's vector (silent, cut short, too long, low rate) are left out, each named.
    Raises SystemExit when a clip names a speaker the model has and overwriting was not asked for,
    or a new speaker has no usable reference clip."""
    talker_config = model.config.talker_config
    try:
        new = assign_speakers(clips, talker_config, overwrite_existing,
                              reference_problem=lambda path: reference_problem(path, max_audio_seconds))
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    for speaker in new:
        for source, path, why in speaker.unusable_references:
            log(f"{source}: ref_audio: {path}: {why}; left out of {speaker.name}'s voice vector")
    existing = existing_speaker_ids(talker_config.spk_id)
    replaced = {speaker.name for speaker in new}
    if overwrite_existing and not replaced & existing.keys():  # else the voice meant to go would stay, unsaid
        raise SystemExit(f"error: --overwrite_speaker: no speaker of this run is one the starting model has, so none "
                         f"is replaced (this run trains {', '.join(sorted(replaced))}; the model has "
                         f"{', '.join(existing) or 'none'}): name the rows' speaker as the voice to replace, or "
                         f"leave the flag out to add them as new voices")
    dialects = {name.lower(): dialect for name, dialect in (talker_config.spk_is_dialect or {}).items()}
    kept = [Speaker(name, codec_id, dialect=dialects.get(name, False), kept=True)
            for name, codec_id in existing.items() if name not in replaced]
    return new + kept


def kept_vectors(model, table: list):
    """[kept speakers, hidden]: the kept speakers' codec embedding rows as the model was loaded (the
    vectors generation reads for them), or None when the table keeps none."""
    kept = [speaker.codec_id for speaker in table if speaker.kept]
    if not kept:
        return None
    return model.talker.get_input_embeddings().weight[kept].detach().clone()


# ---------------------------------------------------------------------------------------------
# What a run says about its voices: the banner, the losses at the start and at the end
# ---------------------------------------------------------------------------------------------

REPORT_FILE = "voices_report.json"  # in --output_model_path, written at the end of a run
# A new speaker's training loss is measured over at most this many of its clips, evenly spread.
REPORT_TRAIN_CLIPS = 32


def banner_lines(run) -> list:
    """The kept speakers, and which of them are rehearsed, said before step 1."""
    kept = [speaker for speaker in run.speaker_table if speaker.kept]
    lines = []
    if read_config(run.args.init_model_path).get("tts_model_type") == CUSTOM_VOICE:
        source = encoder_source(run.args)
        lines.append("  speaker encoder for the new voices: " + (
            f"the one this trainer kept beside {source} (a CustomVoice model has none in its weights)"
            if Path(source).resolve() == Path(run.args.init_model_path).resolve()
            else f"from {source} (the starting model has none of its own)"))
    if not kept:
        return lines
    lines.append("  kept speakers of the starting model: " + ", ".join(
        f"{s.name} (codec id {s.codec_id}" + (f", {s.dialect})" if s.dialect else ")") for s in kept)
        + "; their rows are written back unchanged at export")
    replay_set = run.replay_set
    kept_names = {speaker.name for speaker in kept}
    rehearsed = {clip.speaker for clip in run.train_set.clips if clip.speaker in kept_names}
    if replay_set is not None:
        mixed = sum(1 for clip in run.train_set.clips if clip.speaker in kept_names)
        lines.append(f"  replay set: {len(replay_set.clips)} clips of {', '.join(s.name for s in replay_set.speakers)} "
                     f"({'reused' if replay_set.reused else 'generated'}: {replay_set.path}); {mixed} of the "
                     f"{len(run.train_set.clips)} clips of each epoch (--replay_ratio {run.args.replay_ratio})")
        if replay_set.dropped:
            lines.append(f"  replay set: {replay.dropped_count(replay_set.dropped)} left out "
                         f"(--replay_max_seconds {run.args.replay_max_seconds})")
    idle = [speaker.name for speaker in kept if speaker.name not in rehearsed]
    asked = {speaker.name for speaker in replay_set.speakers} if replay_set is not None else set()
    with_clips = {clip.speaker for clip in replay_set.clips} if replay_set is not None else set()
    unheard = [name for name in idle if name in asked - with_clips]
    measured_only = [name for name in idle if name in asked & with_clips]
    not_asked = [name for name in idle if name not in asked]
    if unheard:
        lines.append(f"  warning: {', '.join(unheard)}: asked to be rehearsed, but the replay set holds none of their "
                     f"speech (the starting model ran past --replay_max_seconds on every sentence): not rehearsed, "
                     f"their voices may drift")
    if measured_only:  # --replay_ratio 0 (or too small to draw their clips): their drift is measured only
        lines.append(f"  {', '.join(measured_only)}: replay loss measured at the start and the end, but not rehearsed: "
                     f"--replay_ratio {run.args.replay_ratio} mixes none of their replay clips into training")
    if not_asked:
        lines.append(f"  speakers of the starting model {', '.join(not_asked)} kept but not rehearsed: their voices "
                     f"may drift; --replay_speakers all rehearses them")
    return lines


def replay_losses(run) -> dict:
    """{rehearsed speaker: loss per target of its replay clips}, in the layout they were spoken in;
    {} without a replay set. Every process must call it (they share the measuring)."""
    from qwen3_tts_sft.sequence_layout import NON_STREAMING
    from qwen3_tts_sft.training_data import TalkerDataset

    replay_set = run.replay_set
    if replay_set is None or not replay_set.clips:
        return {}
    dataset = TalkerDataset(replay_set.clips, run.train_set.ids, run.train_set.speaker_index, (NON_STREAMING,))
    return {speaker.name: dataset_loss(run, dataset, [i for i, clip in enumerate(replay_set.clips)
                                                      if clip.speaker == speaker.name])
            for speaker in replay_set.speakers if replay_set.clips_of(speaker.name)}


def dataset_loss(run, dataset, indices: list) -> float:
    """Loss per target of these examples: group 0 plus the weighted code predictor, as train/loss is."""
    codec0, code_predictor = run.teacher_forced_losses(dataset, indices)
    return codec0 + run.args.code_predictor_loss_weight * code_predictor


def log_starting_losses(run) -> None:
    """The replay sets' loss before the first step (the starting model's), logged at step 0."""
    losses = replay_losses(run)
    if losses:
        run.report({f"replay/{name}/loss": loss for name, loss in losses.items()})


def measure(run) -> dict:
    """{"kept": {name: its replay loss at the start and now, ...}, "new": {name: its train and eval
    loss now, ...}}. Every process must call it."""
    started = {}
    for entry in run.progress.log_history:
        if entry["step"] == 0:  # log_starting_losses
            started.update({key.split("/")[1]: value for key, value in entry.items() if key.startswith("replay/")})
    now = replay_losses(run)
    summary = dict(kept={}, new={})
    for speaker in run.speaker_table:
        if speaker.kept:
            clips = len(run.replay_set.clips_of(speaker.name)) if run.replay_set is not None else 0
            summary["kept"][speaker.name] = dict(codec_id=speaker.codec_id, dialect=speaker.dialect,
                                                 replay_clips=clips, replay_loss_start=started.get(speaker.name),
                                                 replay_loss_end=now.get(speaker.name))
            continue
        # The prefix a voice learnt is its rows' language's: generation should be asked for that one.
        languages = sorted({clip.language for clip in run.train_set.clips if clip.speaker == speaker.name})
        entry = summary["new"][speaker.name] = dict(codec_id=speaker.codec_id, languages=languages)
        for split, dataset in (("train", run.train_set), ("eval", run.eval_set)):
            indices = [i for i, clip in enumerate(dataset.clips) if clip.speaker == speaker.name] if dataset else []
            entry[f"{split}_clips_in_data"] = len(indices)
            if split == "train" and indices:
                indices = indices[::math.ceil(len(indices) / REPORT_TRAIN_CLIPS)]
            entry[f"{split}_clips"] = len(indices)
            entry[f"{split}_loss"] = dataset_loss(run, dataset, indices) if indices else None
    return summary


def report(run) -> list:
    """measure(run), logged, written to REPORT_FILE, and said as the summary's lines (on the main
    process). Every process must call it."""
    summary = measure(run)
    values = {f"replay/{name}/loss": entry["replay_loss_end"] for name, entry in summary["kept"].items()
              if entry["replay_loss_end"] is not None}
    values.update({f"{split}/{name}/loss": entry[f"{split}_loss"] for name, entry in summary["new"].items()
                   for split in ("train", "eval") if entry[f"{split}_loss"] is not None})
    if values:
        run.report(values)
    if not run.accelerator.is_main_process:
        return []
    (run.output_dir / REPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    rehearsed = {speaker.name for speaker in run.replay_set.speakers} if run.replay_set is not None else set()
    lines = [f"  voices, loss per target (group 0 + {run.args.code_predictor_loss_weight} x code predictor), "
             f"also in {run.output_dir / REPORT_FILE}:"]
    for name, entry in summary["kept"].items():
        start, end = entry["replay_loss_start"], entry["replay_loss_end"]
        if end is None:
            why = "none of its replay speech stopped in time" if name in rehearsed else "no replay set"
            lines.append(f"    {name}: kept; not measured ({why})")
        elif start is None:
            lines.append(f"    {name}: kept; replay loss {end:.4f} now, over {entry['replay_clips']} clips (not "
                         f"measured at the start of this run)")
        else:
            lines.append(f"    {name}: kept; replay loss {start:.4f} at the start -> {end:.4f} now "
                         f"({end - start:+.4f}), over {entry['replay_clips']} clips")
    for name, entry in summary["new"].items():
        losses = [f"{split} loss {entry[f'{split}_loss']:.4f} over {entry[f'{split}_clips']} clips"
                  + (f" (a sample of its {entry[f'{split}_clips_in_data']})"
                     if entry[f"{split}_clips"] < entry[f"{split}_clips_in_data"] else "")
                  for split in ("train", "eval") if entry[f"{split}_loss"] is not None]
        untrained = "; untrained: no training row speaks it" if entry["train_clips"] == 0 else ""
        speak = (f"; generate_custom_voice(language={' or '.join(map(repr, entry['languages']))})"
                 if entry["languages"] else "")
        lines.append(f"    {name}: new (codec id {entry['codec_id']}{untrained}); " + ", ".join(losses) + speak)
    return lines
