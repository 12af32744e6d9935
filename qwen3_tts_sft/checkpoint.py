"""Checkpoint folders: what is in them, writing them safely, finding them again.

    output/checkpoint-step-500/          loads with Qwen3TTSModel.from_pretrained
        config.json                      the base config; tts_model_type custom_voice, spk_id, spk_is_dialect
        model.safetensors                talker weights (bf16 by default), speaker rows filled in
        speaker_encoder.safetensors      the speaker encoder, kept for speaker-similarity checks
        adapter/                         with LoRA: the adapter alone (the model above has it merged)
        generation_config.json, tokenizer files, speech_tokenizer/   copied from the base model
        trainer_state.json               progress, flags, versions, speakers (readable)
        training_state/                  accelerate state: fp32 weights, optimizer, scheduler, RNG

A folder is written under a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint under a checkpoint's name.
"""

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MODEL_WEIGHTS = "model.safetensors"
SPEAKER_ENCODER_WEIGHTS = "speaker_encoder.safetensors"
TRAINER_STATE = "trainer_state.json"
TRAINING_STATE_DIR = "training_state"
SPEAKER_VECTORS = "speaker_vectors.safetensors"
PARTIAL_SUFFIX = ".partial"
# Base-model files that are not copied: they are rewritten, or they are another run's state.
NOT_COPIED = {"config.json", MODEL_WEIGHTS, SPEAKER_ENCODER_WEIGHTS, TRAINER_STATE, TRAINING_STATE_DIR,
              "model.safetensors.index.json", "adapter"}


@dataclass
class TrainingProgress:
    """Everything a resume needs to continue where a run stopped, besides accelerate's state."""

    seed: int
    step: int = 0                  # optimizer steps taken
    epoch: int = 0                 # epoch in progress
    steps_done_in_epoch: int = 0   # optimizer steps of that epoch already taken
    nonfinite_in_a_row: int = 0
    best_eval_loss: float = None
    best_eval_step: int = None
    best_checkpoint: str = None    # checkpoint saved at the best eval step, kept by --save_total_limit
    log_history: list = field(default_factory=list)


def export_model(state_dict: dict, base_dir: Path, out_dir: Path, speakers: list, speaker_vectors: torch.Tensor,
                 dtype: torch.dtype = torch.bfloat16) -> None:
    """Write an inference-ready model folder from a full `Qwen3TTSForConditionalGeneration` state dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in Path(base_dir).iterdir():
        if item.name in NOT_COPIED or item.name.endswith(".safetensors") or item.name.startswith("."):
            continue
        target = out_dir / item.name
        if item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)

    # The config is the base's own JSON with the speakers added. It is written as plain JSON:
    # Qwen3TTSConfig.save_pretrained output does not load back, and keeping the base's
    # transformers_version keeps inference tokenizing text as training did.
    config = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    config["tts_model_type"] = "custom_voice"
    talker_config = config.setdefault("talker_config", {})
    spk_id = dict(talker_config.get("spk_id") or {})
    spk_is_dialect = dict(talker_config.get("spk_is_dialect") or {})
    for speaker in speakers:
        spk_id[speaker.name] = speaker.codec_id
        spk_is_dialect[speaker.name] = False
    talker_config["spk_id"] = spk_id
    talker_config["spk_is_dialect"] = spk_is_dialect
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    talker_weights, encoder_weights = {}, {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu", dtype).contiguous()
        (encoder_weights if name.startswith("speaker_encoder.") else talker_weights)[name] = tensor
    codec_embedding = talker_weights["talker.model.codec_embedding.weight"].clone()
    for speaker, vector in zip(speakers, speaker_vectors):
        codec_embedding[speaker.codec_id] = vector.detach().to("cpu", dtype)
    talker_weights["talker.model.codec_embedding.weight"] = codec_embedding
    save_file(talker_weights, str(out_dir / MODEL_WEIGHTS), metadata={"format": "pt"})
    if encoder_weights:
        save_file(encoder_weights, str(out_dir / SPEAKER_ENCODER_WEIGHTS), metadata={"format": "pt"})


def partial_path(final_path: Path) -> Path:
    return final_path.with_name("." + final_path.name + PARTIAL_SUFFIX)


def publish(partial: Path, final_path: Path) -> None:
    """Move a finished folder into place, replacing an older folder of the same name."""
    if final_path.exists():
        old = final_path.with_name("." + final_path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_path, old)
        os.replace(partial, final_path)
        shutil.rmtree(old)
    else:
        os.replace(partial, final_path)


def write_trainer_state(folder: Path, progress: TrainingProgress, extra: dict) -> None:
    state = dict(asdict(progress), **extra)
    (folder / TRAINER_STATE).write_text(json.dumps(state, indent=2, default=str) + "\n", encoding="utf-8")


def read_trainer_state(folder: Path) -> dict:
    return json.loads((Path(folder) / TRAINER_STATE).read_text(encoding="utf-8"))


def progress_from_state(state: dict) -> TrainingProgress:
    names = TrainingProgress.__dataclass_fields__
    return TrainingProgress(**{key: value for key, value in state.items() if key in names})


def save_speaker_vectors(folder: Path, vectors: torch.Tensor) -> None:
    save_file({"speaker_vectors": vectors.detach().to("cpu", torch.float32).contiguous()}, str(folder / SPEAKER_VECTORS))


def load_speaker_vectors(folder: Path) -> torch.Tensor:
    return load_file(str(folder / SPEAKER_VECTORS))["speaker_vectors"]


def list_checkpoints(output_dir: Path) -> list:
    """Finished checkpoints (ones with a trainer_state.json), oldest step first."""
    found = []
    for folder in Path(output_dir).glob("checkpoint-*"):
        if (folder / TRAINER_STATE).is_file() and (folder / TRAINING_STATE_DIR).is_dir():
            found.append((read_trainer_state(folder)["step"], folder.stat().st_mtime, folder))
    return [folder for _, _, folder in sorted(found)]


def latest_checkpoint(output_dir: Path):
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def remove_old_checkpoints(output_dir: Path, keep: int, protect=()) -> list:
    """Delete all but the newest `keep` checkpoints (never one named in `protect`); return the deleted."""
    checkpoints = [c for c in list_checkpoints(output_dir) if c.name not in protect]
    keep_slots = max(0, keep - sum(1 for name in protect if (Path(output_dir) / name).exists()))
    doomed = checkpoints[:max(0, len(checkpoints) - keep_slots)]
    for folder in doomed:
        shutil.rmtree(folder)
    return doomed


def remove_partials(output_dir: Path) -> None:
    """Remove folders left by a save that was interrupted."""
    for folder in Path(output_dir).glob("." + "*" + PARTIAL_SUFFIX):
        shutil.rmtree(folder, ignore_errors=True)
