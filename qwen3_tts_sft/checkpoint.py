"""Checkpoint folders: the one owner of their format. What is in them, writing them safely, reading
them back, finding them again.

    output/checkpoint-step-500/          loads with Qwen3TTSModel.from_pretrained
        config.json                      the base config; tts_model_type custom_voice, spk_id, spk_is_dialect
                                         (the starting model's speakers, then the new ones)
        model.safetensors                talker weights (bf16 by default), speaker rows filled in (the
                                         starting model's speakers' rows exactly as they were)
        speaker_encoder.safetensors      the speaker encoder: for speaker-similarity checks, and for the
                                         new voices of a run that starts from this checkpoint
        adapter/                         with LoRA: the adapter alone (the model above has it merged)
        generation_config.json, tokenizer files, speech_tokenizer/   copied from the base model
        trainer_state.json               progress, flags, versions, speakers (TrainerState, readable)
        training_state/                  accelerate state: weights as trained (TrainerState.weights),
                                         optimizer, scheduler, RNG;
                                         and speaker_vectors.safetensors, the vectors training used

A folder is written under a temporary name and renamed into place, so a crash (or a full disk)
never leaves a half-written checkpoint under a checkpoint's name, and the previous one stays.
"""

import contextlib
import errno
import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qwen3_tts_sft import output_lock

MODEL_WEIGHTS = "model.safetensors"
SPEAKER_ENCODER_WEIGHTS = "speaker_encoder.safetensors"
TRAINER_STATE = "trainer_state.json"
TRAINING_STATE_DIR = "training_state"
# In training_state/: the size of every file there, so that a resume tells a whole copy from a part.
TRAINING_STATE_FILES = "files.json"
SPEAKER_VECTORS = "speaker_vectors.safetensors"
PARTIAL_SUFFIX = ".partial"
# In the output folder: held (flock) by the run writing its checkpoints, so a second job on the same folder
# is refused instead of deleting the first one's half-written save and pruning its checkpoints.
OUTPUT_LOCK = ".trainer.lock"
# Base-model files that are not copied: they are rewritten, or they are another run's state.
NOT_COPIED = {"config.json", MODEL_WEIGHTS, SPEAKER_ENCODER_WEIGHTS, TRAINER_STATE, "model.safetensors.index.json"}
# The one folder of a model that loading reads. Other folders in a starting checkpoint are what was
# written into it (training_state/, adapter/, an infer_test/ report, a run's logs): not the model's.
MODEL_FOLDERS = {"speech_tokenizer"}
# The trainer's flags that name files or folders: trainer_state.json records them as absolute paths,
# so that infer_test.py (its training data, its base model) finds them from any folder.
PATH_FLAGS = ("init_model_path", "train_jsonl", "eval_jsonl", "output_model_path", "speaker_encoder_from",
              "eval_sentences", "asr_model", "resume_from_checkpoint")
# Key prefixes: the trainer wraps the loaded model as `.model` (talker_step.TalkerTrainingModel), and
# the model keeps its speaker encoder as `.speaker_encoder`.
TRAINING_MODULE_PREFIX = "model."
SPEAKER_ENCODER_PREFIX = "speaker_encoder."


@dataclass
class TrainingProgress:
    """Everything a resume needs to continue where a run stopped, besides accelerate's state."""

    seed: int
    step: int = 0                  # optimizer steps taken
    epoch: int = 0                 # epoch in progress
    steps_done_in_epoch: int = 0   # optimizer steps of that epoch already taken
    nonfinite_in_a_row: int = 0
    highest_lr: float = 0.0        # the highest learning rate an update used, over resumes (the summary's)
    best_eval_loss: float = None
    best_eval_step: int = None
    best_step: int = None          # the evaluation --metric_for_best_model ranks first (scoring.choose_best)
    best_checkpoint: str = None    # checkpoint saved at best_step, kept by --save_total_limit
    tracker_run: str = None        # the run's tracker folder under logs/: a resume writes on in it
    log_history: list = field(default_factory=list)
    # One entry per evaluation: eval loss and listening measures, and the checkpoint saved at its step
    # (scoring.py; scores.jsonl lists them).
    evaluations: list = field(default_factory=list)


@dataclass
class TrainerState:
    """trainer_state.json: the progress, and what made the run (its flags, versions, data and speakers).
    The JSON is flat: the progress fields, then these."""

    progress: TrainingProgress
    checkpoint: str = None         # the folder's own name
    total_steps: int = None        # the run's length in optimizer steps: a checkpoint at it has nothing left
    flags: dict = field(default_factory=dict)        # the trainer's flags as given
    versions: dict = field(default_factory=dict)     # python, torch, transformers, accelerate, qwen_tts
    num_processes: int = 1
    weights: str = None            # how training held the weights (training_setup.WeightStorage.name)
    train_data_sha256: str = None  # DataFingerprint.sha256 of --train_jsonl
    # What the evaluations measured, {"eval_jsonl": sha256, "eval_sentences": sha256} (those given): a resume
    # on other ones would rank measures of other clips or sentences against the run's own.
    eval_data_sha256: dict = None
    speakers: list = field(default_factory=list)     # new ones: [{name, codec_id, reference_audio: [paths]}]
    kept_speakers: list = field(default_factory=list)  # the starting model's: [{name, codec_id, dialect}]

    def to_json(self) -> dict:
        return dict(asdict(self.progress), **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "progress"})

    @classmethod
    def from_json(cls, values: dict) -> "TrainerState":
        progress_names = {f.name for f in fields(TrainingProgress)}
        own_names = {f.name for f in fields(cls)} - {"progress"}
        return cls(progress=TrainingProgress(**{k: v for k, v in values.items() if k in progress_names}),
                   **{k: v for k, v in values.items() if k in own_names})


@dataclass(frozen=True)
class DataFingerprint:
    """A data file's line count and content hash: logged, and checked on resume."""
    lines: int
    sha256: str  # hex prefix

    @classmethod
    def of(cls, path) -> "DataFingerprint":
        digest, lines = hashlib.sha256(), 0
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
                lines += chunk.count(b"\n")
        return cls(lines, digest.hexdigest()[:16])


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def recorded_flags(args) -> dict:
    """The trainer's flags as trainer_state.json records them: paths absolute ('latest' as it is)."""
    flags = dict(vars(args))
    for name in PATH_FLAGS:
        if flags.get(name) and flags[name] != "latest":
            flags[name] = str(Path(flags[name]).expanduser().resolve())
    return flags


def export_model(state_dict: dict, base_dir: Path, out_dir: Path, speakers: list, speaker_vectors: torch.Tensor,
                 dtype: torch.dtype = torch.bfloat16, speaker_encoder_config: dict = None) -> None:
    """Write an inference-ready model folder from a full `Qwen3TTSForConditionalGeneration` state dict.

    `speakers` (speakers.Speaker) and `speaker_vectors` go into spk_id, spk_is_dialect and the codec
    embedding rows; the base config's other speakers stay as they are. `speaker_encoder_config`
    replaces the base config's when the encoder came from another model (voices.py).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in copied_from_base(base_dir):
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
    if speaker_encoder_config is not None:
        config["speaker_encoder_config"] = speaker_encoder_config
    talker_config = config.setdefault("talker_config", {})
    spk_id = dict(talker_config.get("spk_id") or {})
    spk_is_dialect = dict(talker_config.get("spk_is_dialect") or {})
    for speaker in speakers:
        spk_id[speaker.name] = speaker.codec_id
        spk_is_dialect[speaker.name] = speaker.dialect
    talker_config["spk_id"] = spk_id
    talker_config["spk_is_dialect"] = spk_is_dialect
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    talker_weights, encoder_weights = {}, {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu", dtype).contiguous()
        (encoder_weights if name.startswith(SPEAKER_ENCODER_PREFIX) else talker_weights)[name] = tensor
    codec_embedding = talker_weights["talker.model.codec_embedding.weight"].clone()
    for speaker, vector in zip(speakers, speaker_vectors):
        codec_embedding[speaker.codec_id] = vector.detach().to("cpu", dtype)
    talker_weights["talker.model.codec_embedding.weight"] = codec_embedding
    save_file(talker_weights, str(out_dir / MODEL_WEIGHTS), metadata={"format": "pt"})
    if encoder_weights:
        save_file(encoder_weights, str(out_dir / SPEAKER_ENCODER_WEIGHTS), metadata={"format": "pt"})


def copied_from_base(base_dir: Path) -> list:
    """The base model's files and folders that every checkpoint carries as they are."""
    return [item for item in sorted(Path(base_dir).iterdir())
            if (item.name in MODEL_FOLDERS if item.is_dir() else
                not (item.name in NOT_COPIED or item.name.endswith(".safetensors") or item.name.startswith(".")))]


def save(accelerator, train_module, final: Path, base_dir: Path, speaker_table: list, state: TrainerState,
         save_dtype: torch.dtype, needed_bytes: int, master_weights: dict = None) -> None:
    """Write checkpoint folder `final` (the inference-ready model plus the training state), atomically.

    `master_weights` (name -> fp32 tensor): the optimizer's master copies of bf16 weights, which the
    model is exported from instead (the same bf16 weights, rounded to nearest, and more with fp32).

    Every process calls it (FSDP gathers the weights from all of them). Refuses before writing when
    the disk has less than `needed_bytes` free; a disk that fills up during the write leaves the
    earlier checkpoints as they were and stops with the size a checkpoint needs.
    """
    partial = partial_path(final)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(train_module)  # every process takes part (FSDP)
    state_dict.update(master_weights or {})
    module = accelerator.unwrap_model(train_module)
    with torch.no_grad():
        vectors = module.speaker_vectors().float()
    try:
        if accelerator.is_main_process:
            check_disk_space(final, needed_bytes)
            shutil.rmtree(partial, ignore_errors=True)
            prefix = TRAINING_MODULE_PREFIX
            model_state = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
            if module.lora_config is not None:
                from qwen3_tts_sft import lora  # peft loads only for LoRA runs

                lora.save_adapter(model_state, module.lora_config, partial / "adapter")
                model_state = lora.merged_state_dict(model_state, module.lora_config)
            export_model(model_state, base_dir, partial, speaker_table, vectors, dtype=save_dtype,
                         speaker_encoder_config=module.speaker_encoder_config)
        del state_dict
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial / TRAINING_STATE_DIR))
        accelerator.wait_for_everyone()  # every process's files are written before they are listed
        if accelerator.is_main_process:
            save_file({"speaker_vectors": vectors.detach().to("cpu", torch.float32).contiguous()},
                      str(partial / TRAINING_STATE_DIR / SPEAKER_VECTORS))
            list_training_state(partial / TRAINING_STATE_DIR)
            (partial / TRAINER_STATE).write_text(json.dumps(state.to_json(), indent=2, default=str) + "\n",
                                                 encoding="utf-8")
            publish(partial, final)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        shutil.rmtree(partial, ignore_errors=True)
        raise SystemExit(f"error: the disk filled up while saving {final.name} ({error.strerror}); nothing of it "
                         f"was kept and the earlier checkpoints are intact. A checkpoint needs about "
                         f"{needed_bytes / 1e9:.1f} GB in {final.parent}. Free space and resume with "
                         f"--resume_from_checkpoint latest.") from None
    accelerator.wait_for_everyone()


def checkpoint_bytes(train_module, weights, save_dtype: torch.dtype, base_dir: Path) -> int:
    """About how much disk one checkpoint takes: the exported weights, the training weights and AdamW's
    state (`weights`, a training_setup.WeightStorage, says their sizes), and the files copied from the
    base model (the speech tokenizer, the text tokenizer...)."""
    parameters = sum(p.numel() for p in train_module.parameters())
    trainable = sum(p.numel() for p in train_module.parameters() if p.requires_grad)
    export_bytes = torch.finfo(save_dtype).bits // 8
    copied = sum(path.stat().st_size for item in copied_from_base(base_dir)
                 for path in ([item] if item.is_file() else item.rglob("*")) if path.is_file())
    return parameters * (export_bytes + weights.weight_bytes) + trainable * weights.optimizer_bytes + copied


def check_disk_space(final: Path, needed_bytes: int) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(final.parent).free
    if free < needed_bytes * 1.05:
        latest = latest_checkpoint(final.parent)
        raise SystemExit(
            f"error: not enough disk space in {final.parent} to save {final.name}: it needs about "
            f"{needed_bytes / 1e9:.1f} GB and {free / 1e9:.1f} GB are free. Last saved checkpoint: "
            f"{latest or 'none'}. Free space and resume with --resume_from_checkpoint latest."
        )


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


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def read_trainer_state(folder: Path) -> TrainerState:
    return TrainerState.from_json(json.loads((Path(folder) / TRAINER_STATE).read_text(encoding="utf-8")))


def has_trainer_state(folder: Path) -> bool:
    return (Path(folder) / TRAINER_STATE).is_file()


def list_training_state(state_dir: Path) -> None:
    sizes = {str(path.relative_to(state_dir)): path.stat().st_size
             for path in sorted(state_dir.rglob("*")) if path.is_file()}
    (state_dir / TRAINING_STATE_FILES).write_text(json.dumps(sizes, indent=1) + "\n", encoding="utf-8")


def training_state_problem(folder: Path):
    """Why a run cannot resume from this checkpoint, or None: no trainer_state.json or a damaged one, no
    training_state/ (deleted from a checkpoint kept for listening), or files it listed missing or of
    another size (a copy cut short). Checkpoints written before the list was kept are taken as they are."""
    state_dir = Path(folder) / TRAINING_STATE_DIR
    if not has_trainer_state(folder):
        return f"no {TRAINER_STATE}"
    if checkpoint_step(folder) is None:
        return f"its {TRAINER_STATE} is damaged (not readable JSON with a step)"
    if not state_dir.is_dir():
        return f"no {TRAINING_STATE_DIR}/"
    if not (state_dir / TRAINING_STATE_FILES).is_file():
        return None
    try:
        sizes = json.loads((state_dir / TRAINING_STATE_FILES).read_text(encoding="utf-8"))
    except ValueError:
        return f"{TRAINING_STATE_DIR}/{TRAINING_STATE_FILES} is damaged (not readable JSON)"
    wrong = [name for name, size in sizes.items()
             if not (state_dir / name).is_file() or (state_dir / name).stat().st_size != size]
    if wrong:
        return f"{TRAINING_STATE_DIR}/ is incomplete: {', '.join(wrong)} missing or cut short (an interrupted copy?)"
    return None


def resumable(folder: Path) -> bool:
    return training_state_problem(folder) is None


def load_training_state(folder: Path, accelerator) -> TrainerState:
    """Load accelerate's state (weights, optimizer, scheduler, random streams) into the prepared objects.
    Raises SystemExit, naming the checkpoint, where its state does not fit the model being trained or
    a file of it is damaged."""
    # accelerate passes over random streams it cannot read, and the resume would not be the run's.
    damaged = unreadable_files(Path(folder) / TRAINING_STATE_DIR, suffixes=(".pkl",))
    if damaged:
        raise damaged_state(folder, damaged, "the random streams do not read")
    try:
        with damaged_files_named(folder):
            accelerator.load_state(str(Path(folder) / TRAINING_STATE_DIR))
    except FileNotFoundError as error:
        raise SystemExit(f"error: cannot resume from {folder}: {error.filename} is missing (an interrupted copy?). "
                         f"Copy the checkpoint again, or resume from an earlier one") from None
    except RuntimeError as error:
        if "in loading state_dict" not in str(error):  # not a mismatch of weights: someone else's problem
            raise
        mismatch = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line),
                        str(error).splitlines()[0])
        raise SystemExit(f"error: cannot resume from {folder}: its weights do not fit the model being trained "
                         f"({mismatch}). Resume with the --init_model_path the run started with (its "
                         f"trainer_state.json names it), or start afresh into another --output_model_path") from None
    return read_trainer_state(folder)


def load_speaker_vectors(folder: Path) -> torch.Tensor:
    with damaged_files_named(folder):
        return load_file(str(Path(folder) / TRAINING_STATE_DIR / SPEAKER_VECTORS))["speaker_vectors"]


@contextlib.contextmanager
def damaged_files_named(folder: Path):
    """Loading a checkpoint's training state: a file of it that does not read (garbage of the right size,
    which files.json cannot tell from a whole copy) stops the run with a SystemExit naming it, instead
    of the reader's traceback."""
    try:
        yield
    except Exception as error:  # garbage fails a reader in any of a dozen ways (an unpickler's IndexError, too)
        damaged = unreadable_files(Path(folder) / TRAINING_STATE_DIR)
        if not damaged:
            raise  # every file reads: someone else's problem (a size mismatch is load_training_state's)
        raise damaged_state(folder, damaged, (str(error).strip().splitlines() or [type(error).__name__])[0]) from None


def damaged_state(folder: Path, damaged: list, reason: str) -> SystemExit:
    what = ", ".join(f"{TRAINING_STATE_DIR}/{name}" for name in damaged)
    return SystemExit(f"error: cannot resume from {folder}: {what} is damaged ({reason}). Copy the checkpoint "
                      f"again if it was copied; else resume from the one before it: move {Path(folder).name} "
                      f"out of {Path(folder).parent} and pass --resume_from_checkpoint latest")


def unreadable_files(state_dir: Path, suffixes=(".safetensors", ".bin", ".pkl", ".pt")) -> list:
    """The files of a training state (of these suffixes) that do not read: torch's zip files whose
    entries fail their checksums, safetensors files whose header does not parse."""
    from safetensors import safe_open

    unreadable = []
    for path in sorted(path for path in Path(state_dir).rglob("*") if path.suffix in suffixes):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as tensors:
                    tensors.keys()
            elif path.suffix in (".bin", ".pkl", ".pt"):
                with zipfile.ZipFile(path) as archive:
                    if archive.testzip() is not None:
                        unreadable.append(str(path.relative_to(state_dir)))
        except (SafetensorError, zipfile.BadZipFile, OSError, ValueError, EOFError):
            unreadable.append(str(path.relative_to(state_dir)))
    return unreadable


def speaker_encoder_weights(checkpoint_dir: Path, base_dir=None) -> tuple:
    """(the speaker encoder's state dict in fp32, the files it came from): from the checkpoint's
    speaker_encoder.safetensors, else from the base model's weights. Raises FileNotFoundError."""
    from safetensors import safe_open

    files = [Path(checkpoint_dir) / SPEAKER_ENCODER_WEIGHTS]
    if not files[0].is_file():
        if not base_dir:
            raise FileNotFoundError(f"{checkpoint_dir} has no {SPEAKER_ENCODER_WEIGHTS} and no base model is known")
        index = Path(base_dir) / "model.safetensors.index.json"
        names = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {MODEL_WEIGHTS}
        files = [Path(base_dir) / name for name in sorted(names)]
    weights = {}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (looking for the speaker encoder weights)")
        with safe_open(str(path), framework="pt") as tensors:
            weights.update({key[len(SPEAKER_ENCODER_PREFIX):]: tensors.get_tensor(key).float()
                            for key in tensors.keys() if key.startswith(SPEAKER_ENCODER_PREFIX)})
    if not weights:
        raise FileNotFoundError(f"no {SPEAKER_ENCODER_PREFIX}* weights in {', '.join(map(str, files))}")
    return weights, files


def list_checkpoints(output_dir: Path, with_training_state: bool = True) -> list:
    """Finished checkpoints (with trainer_state.json), oldest step first: those a run can resume from
    (with training_state/ too), or with `with_training_state=False` also those kept for listening
    whose training state was deleted."""
    found = []
    for folder in Path(output_dir).glob("checkpoint-*"):
        if resumable(folder) if with_training_state else has_trainer_state(folder):
            step = checkpoint_step(folder)
            # One whose step cannot be read (a damaged trainer_state.json) sorts last: it may be the newest.
            found.append((step is None, step or 0, folder.stat().st_mtime, folder))
    return [folder for *_, folder in sorted(found)]


def hub_download_hint(path) -> str:
    """For a model folder that does not exist but is written as a Hugging Face model name (owner/name):
    a sentence, to end an error with, on downloading it first; "" otherwise."""
    name = str(path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return ""
    return (f". It looks like a Hugging Face model name, and the commands read local folders: download it first "
            f"(huggingface-cli download {name} --local-dir {name.split('/')[1]}) and pass that folder")


def checkpoint_step(folder: Path):
    """The optimizer steps a checkpoint holds; None where its trainer_state.json is damaged (garbage,
    cut short) or missing."""
    try:
        step = json.loads((Path(folder) / TRAINER_STATE).read_text(encoding="utf-8"))["step"]  # TrainingProgress.step
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


def latest_checkpoint(output_dir: Path):
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def remove_old_checkpoints(output_dir: Path, keep: int, protect=()) -> list:
    """Delete all but the newest `keep` checkpoints (never one named in `protect`, which count among
    them; the newest always stays, so a run resumes where it was); return the deleted."""
    found = list_checkpoints(output_dir)
    protect = set(protect) | {folder.name for folder in found[-1:]}
    checkpoints = [c for c in found if c.name not in protect]
    keep_slots = max(0, keep - sum(1 for name in protect if (Path(output_dir) / name).exists()))
    doomed = checkpoints[:max(0, len(checkpoints) - keep_slots)]
    for folder in doomed:
        shutil.rmtree(folder)
    return doomed


def lock_output_dir(output_dir: Path):
    """Make `output_dir` and hold its OUTPUT_LOCK for as long as the returned open file lives (the lock
    goes when the process ends, even killed); another run holding it stops this one, naming it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    handle, holder = output_lock.hold(output_dir / OUTPUT_LOCK)
    if holder:
        raise SystemExit(f"error: another training run ({holder}) is writing checkpoints to {output_dir}: two runs "
                         f"there would delete each other's saves. Wait for it to end (a requeue of this job after it "
                         f"ends resumes with --resume_from_checkpoint latest), or give another --output_model_path")
    return handle


def remove_partials(output_dir: Path) -> None:
    """Remove folders left by a save that was interrupted."""
    for folder in Path(output_dir).glob("." + "*" + PARTIAL_SUFFIX):
        shutil.rmtree(folder, ignore_errors=True)
