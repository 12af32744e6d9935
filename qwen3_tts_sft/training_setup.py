"""From parsed flags to a run ready to train: `build_run(args)`.

The order is fixed, and this is its only copy (the trainer, bench/bench.py and the tests all call
it): what the flags mean on this machine (refusing impossible combinations before any model
loads), the accelerator, the checkpoint to resume, the base model, the data and speakers, the
module that trains, the optimizer and schedule, then either the checkpoint's state or a fresh start.
"""

import difflib
import functools
import gc
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, ProjectConfiguration, broadcast
from transformers import get_scheduler

from qwen3_tts_sft import checkpoint, replay, scoring, voices
from qwen3_tts_sft.bf16_adamw import Bf16WeightsAdamW
from qwen3_tts_sft.checkpoint import DataFingerprint, TrainingProgress
from qwen3_tts_sft.sequence_layout import NON_STREAMING, STREAMING, SpecialIds
from qwen3_tts_sft.speakers import reference_mels, speaker_vectors
from qwen3_tts_sft.talker_step import TalkerTrainingModel
from qwen3_tts_sft.training_data import (DataError, TalkerDataset, apply_length_limits, make_prompter, read_clips,
                                         speaker_name, split_off_eval)
from qwen3_tts_sft.training_run import LOSS_CURVE, TrainingRun, hear_it

# The CUDA caching allocator's setting for training: expandable segments grow one mapped range of
# memory instead of reserving a new block for each new size, so memory a shorter batch shape freed
# serves a longer one. On the 2-15 s mix with --low_memory: 20.2 GB reserved with it (an H100),
# 21.8 without it in an earlier version's run (an H200; bench_notes.md, eleventh session). A
# PYTORCH_CUDA_ALLOC_CONF of the user's own wins.
CUDA_ALLOCATOR_SETTINGS = "expandable_segments:True"

# Flags that decide which clips go into which step, or what the saved state holds: a resume with
# other values would not continue the same run. --eval_split moves clips between the train and eval
# sets: clips already trained on would join the eval set.
DATA_ORDER_FLAGS = ("batch_size", "gradient_accumulation_steps", "seed", "group_by_length", "text_layout",
                    "eval_split")
STATE_FLAGS = ("low_memory", "lora_rank")
# Flags that decide which weights train: the optimizer's saved state holds moments for exactly those
# (another set fails to load into it). Another set is a new run: --init_model_path the checkpoint.
TRAINED_WEIGHTS_FLAGS = ("train_text_embedding", "train_speaker_encoder", "lora_target_modules")
# Flags that decide what each update does, refused on a resume too (no escape flag: none is a schedule):
# AdamW's saved param groups keep the old --weight_decay (a new one would be silently ignored), and
# --lora_alpha (the adapters' scale) and --code_predictor_loss_weight change the trained function or
# the loss under a run half done.
UPDATE_FLAGS = ("weight_decay", "lora_alpha", "code_predictor_loss_weight")
LORA_ONLY_FLAGS = ("lora_alpha", "lora_target_modules")  # mean nothing without LoRA (--lora_rank 0)
# Files whose content the evaluations measure, and the measure each one feeds: a resume that changes one
# would rank the run's earlier evaluations against measures of other clips or sentences.
EVAL_DATA_FLAGS = {"eval_jsonl": "eval_loss", "eval_sentences": "listening_score"}
# Flags that shape the learning-rate schedule: a resume with other values moves the rate from where
# the run is, so it needs --allow_schedule_change.
SCHEDULE_FLAGS = ("num_epochs", "max_steps", "warmup_steps", "lr", "lr_scheduler")
TRACKER_DIR = "logs"        # under --output_model_path: one folder per run, named TRACKER_PROJECT-time
TRACKER_PROJECT = "sft_12hz"


@dataclass(frozen=True)
class WeightStorage:
    """How the trained weights and AdamW's state are held. A checkpoint's training state holds them
    that way, so a resume must hold them the same way (TrainerState.weights names it)."""

    name: str
    dtype: torch.dtype    # the model's weights, as loaded and trained
    optimizer_bytes: int  # per trained weight: AdamW's two moments, and the fp32 master copy if any
    description: str      # for the run's header

    @property
    def weight_bytes(self) -> int:
        return torch.finfo(self.dtype).bits // 8


FP32_WEIGHTS = WeightStorage("fp32", torch.float32, 8, "weights and AdamW state fp32")
BF16_WITH_FP32_MASTER = WeightStorage(
    "bf16 + fp32 master", torch.bfloat16, 12,
    "bf16 weights and gradients, fp32 master weights and AdamW moments (--bf16_weights)")
BF16_WEIGHTS = WeightStorage("bf16", torch.bfloat16, 4,
                             "weights, gradients and AdamW moments bf16, stochastic rounding (--low_memory)")


class AlreadyFinished(Exception):
    """The checkpoint to resume ends its run: there is nothing to train (said when raised)."""


@dataclass(frozen=True)
class Settings:
    """What the flags mean on this machine, resolved once; the flags themselves stay as given."""

    mixed_precision: str       # "bf16" or "no"
    weights: WeightStorage     # how the trained weights and AdamW's state are held
    torch_compile: str         # "layers" or "no"
    cuda_graphs: bool          # record and replay each micro-batch (cuda_graphs.py)
    drop_graphs_when_short: bool  # --cuda_graphs auto: give them up where memory is short
    layouts: tuple             # text layouts every clip is trained in
    save_dtype: torch.dtype
    train_data: DataFingerprint
    eval_data: dict            # EVAL_DATA_FLAGS given: their files' sha256 (TrainerState.eval_data_sha256)
    resume_dir: Path           # None: a fresh start
    new_schedule: tuple        # SCHEDULE_FLAGS a resume changes (--allow_schedule_change)
    versions: dict
    listening: bool = False    # speak and measure at evaluations (scoring.py)
    listen_steps: int = 0      # every this many steps, and at the end (0: at the end only)


def build_run(args) -> TrainingRun:
    """A run ready to train, from the trainer's parsed flags (sft_12hz_chatterbox.parse_args)."""
    use_expandable_segments()
    accelerator = make_accelerator(args)
    settings = resolve_settings(args, accelerator)
    log_run_header(args, settings, accelerator)

    listens_here = settings.listening and accelerator.is_main_process  # the others wait while it speaks
    tts = load_base_model(args, settings.weights, keep_speech_decoder=listens_here)
    ids = SpecialIds.from_config(tts.model.config)
    train_set, eval_set, speaker_table, replay_set = load_datasets(args, settings, ids, tts, accelerator)
    torch.manual_seed(args.seed)  # the LoRA adapters' first weights and the dropout masks: the same run twice
    train_module = make_training_model(tts.model, speaker_table, args, settings, accelerator)
    optimizer = make_optimizer(train_module, args, settings, accelerator)
    listener = None
    if listens_here:
        listener = scoring.make_listener(args, settings, tts, make_prompter(tts.processor, tts.model.config),
                                         speaker_table, train_set.clips, accelerator.device)
    run = TrainingRun(args, settings, accelerator, train_set, eval_set, speaker_table, replay_set, listener)
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps,
                              num_training_steps=run.total_steps)
    train_module, optimizer, scheduler = accelerator.prepare(train_module, optimizer, scheduler)
    # Before the output folder is first written to (not before the data is checked: a refused run leaves
    # nothing): a second job there would remove this one's partial save and prune its checkpoints.
    run.output_lock = checkpoint.lock_output_dir(Path(args.output_model_path)) if accelerator.is_main_process else None
    progress = resume_or_start(args, settings, accelerator)
    if settings.new_schedule:
        follow_new_schedule(scheduler, args.lr, progress.step, accelerator)
    run.start(train_module, optimizer, scheduler, progress)
    if settings.resume_dir is not None and run.finished:  # the new schedule ends at or before the checkpoint
        accelerator.print(finished_message(settings.resume_dir, progress, run.total_steps,
                                           [speaker.name for speaker in speaker_table], args.load_best_model_at_end))
        accelerator.end_training()
        raise AlreadyFinished
    if progress.step == 0:
        voices.log_starting_losses(run)  # the replay sets' loss before training, for the end-of-run report
    return run


# ---------------------------------------------------------------------------------------------
# What the flags mean here
# ---------------------------------------------------------------------------------------------

def make_accelerator(args) -> Accelerator:
    precision = mixed_precision_choice(args)
    # TF32 matrix products with bf16 autocast (what is not autocast still multiplies quickly); with
    # --mixed_precision no, fp32 really is fp32 (the tests compare exact numbers that way on a GPU too).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "bf16"
    # accelerate keeps one state per process and refuses a second precision: a run started earlier
    # in this process (a test, a notebook) must not decide this one's.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    # Accumulation is done by the loop (exact target-count normalisation), so accelerate gets 1,
    # and the scheduler steps once per optimizer step whatever the number of processes.
    return Accelerator(
        mixed_precision=precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_model_path,
                                            logging_dir=str(Path(args.output_model_path) / TRACKER_DIR)),
        step_scheduler_with_optimizer=False,
    )


def free_memory():
    """What a finished run held (its model, compiled layers, CUDA graphs and their memory pools) is
    freed when main() returns, so a process that goes on (a notebook, the tests) starts its next run
    clean. Left to a garbage collection that happened to start inside the next run's torch.compile,
    the freeing aborted the whole process (seen on an H100)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def mixed_precision_choice(args) -> str:
    """auto: bf16 autocast on a GPU that has it, else fp32."""
    if args.mixed_precision != "auto":
        return args.mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def resolve_settings(args, accelerator) -> Settings:
    """Refuse every impossible combination (naming the flags) before any model loads."""
    device_type, fsdp = accelerator.device.type, accelerator.distributed_type == DistributedType.FSDP
    problems = []
    if args.low_memory and fsdp:
        problems.append("--low_memory works on one GPU or with DDP, not with FSDP (which shards the memory "
                        "itself); drop one of them")
    graphs, drop_when_short = cuda_graphs_choice(args, device_type, accelerator.num_processes, problems)
    weights = weight_storage_choice(args, accelerator.mixed_precision, device_type, accelerator.num_processes, fsdp,
                                    problems)
    train_data = DataFingerprint.of(args.train_jsonl)
    eval_data = {name: DataFingerprint.of(getattr(args, name)).sha256 for name in EVAL_DATA_FLAGS if getattr(args, name)}
    resume_dir = find_resume_checkpoint(args, Path(args.output_model_path), problems, log=accelerator.print)
    note_checkpoint_start(Path(args.init_model_path), accelerator.print)
    resumed = None
    if resume_dir is not None and not problems:
        resumed = checkpoint.read_trainer_state(resume_dir)
        problems += resume_problems(args, resumed, resume_dir, train_data, weights, accelerator)
        problems += eval_data_problems(args, resumed, eval_data, resume_dir)
    problems += voices.flag_problems(args, resumed)  # the starting model's speakers, encoder, replay
    listening, listen_steps = listening_choice(args, fsdp, problems, accelerator.print)
    if problems:
        raise SystemExit("error: " + "\n       ".join(problems))
    new_schedule = schedule_changes(args, resumed) if resumed else ()
    # The same schedule flags: the saved length is this run's length too.
    if resumed and not new_schedule and resumed.progress.step >= (resumed.total_steps or float("inf")):
        accelerator.print(finished_message(resume_dir, resumed.progress, resumed.total_steps,
                                           [speaker["name"] for speaker in resumed.speakers],
                                           args.load_best_model_at_end))
        raise AlreadyFinished
    return Settings(
        mixed_precision=accelerator.mixed_precision,
        weights=weights,
        torch_compile=compile_choice(args, device_type, fsdp),
        cuda_graphs=graphs, drop_graphs_when_short=drop_when_short,
        layouts=(NON_STREAMING, STREAMING) if args.text_layout == "both" else (args.text_layout,),
        save_dtype=getattr(torch, args.save_dtype),
        train_data=train_data, eval_data=eval_data,
        resume_dir=resume_dir,
        new_schedule=new_schedule,
        versions=library_versions(),
        listening=listening, listen_steps=listen_steps,
    )


def listening_choice(args, fsdp: bool, problems: list, log) -> tuple:
    """(listen, every how many steps; 0: at the end only): what --eval_generate_steps means here.
    The flags were checked together already (sft_12hz_chatterbox.listening_problems)."""
    every = args.eval_generate_steps
    if every == 0 or (every is None and not (args.eval_jsonl or args.eval_split)):
        return False, 0
    if fsdp:  # FSDP shards the weights over the processes: no one process holds a whole model to speak with
        if every is not None or args.metric_for_best_model in scoring.LISTENING_METRICS:
            problems.append(f"--eval_generate_steps / --metric_for_best_model {args.metric_for_best_model}: speaking "
                            f"needs the whole model on one process, and FSDP shards it; pass --eval_generate_steps 0 "
                            f"and check checkpoints with infer_test.py --compare")
        else:
            log("note: no listening evaluations under FSDP (it shards the model); check checkpoints with "
                "infer_test.py --compare")
        return False, 0
    return True, args.eval_steps if every is None else every


def use_expandable_segments() -> None:
    """CUDA_ALLOCATOR_SETTINGS for this process, unless the user set the allocator's variables. CUDA
    reads them when it starts: a process that used CUDA already keeps what it has."""
    if not any(name in os.environ for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = CUDA_ALLOCATOR_SETTINGS


def compile_choice(args, device_type: str, fsdp: bool) -> str:
    """What --torch_compile means on this machine: layers or no."""
    if args.torch_compile != "auto":
        return args.torch_compile
    if device_type != "cuda" or fsdp:
        return "no"  # CPU: compiling costs more than it saves; FSDP: its hooks run around the layers
    return "layers"


def cuda_graphs_choice(args, device_type: str, num_processes: int, problems: list) -> tuple:
    """(record graphs, drop them where memory is short): what --cuda_graphs means on this run.
    `yes` where graphs cannot work adds to `problems`."""
    unsupported = []
    if device_type != "cuda":
        unsupported.append("they need a CUDA GPU")
    if num_processes > 1:
        unsupported.append("they work in one process only (the gradient all-reduce runs outside them)")
    if args.train_speaker_encoder:
        unsupported.append("they do not work with --train_speaker_encoder (the trained encoder reads its mels "
                           "from host memory)")
    if args.gradient_checkpointing:
        unsupported.append("they do not work with --gradient_checkpointing")
    if args.cuda_graphs == "yes":
        if unsupported:
            problems.append("--cuda_graphs yes: " + "; ".join(unsupported))
        return True, False
    if args.cuda_graphs == "no" or unsupported:
        return False, False
    return True, True


def weight_storage_choice(args, precision: str, device_type: str, num_processes: int, fsdp: bool,
                          problems: list) -> WeightStorage:
    """What --low_memory and --bf16_weights mean on this run; impossible combinations add to `problems`.

    auto gives bf16 weights with an fp32 master copy where the compute is bf16 on one CUDA GPU: the
    forward and backward then read bf16 weights and write bf16 gradients with no casts, and their
    activations are bf16 (1.7B: faster, and less memory on long clips; see README_CHATTERBOX_STYLE.md).
    Elsewhere it keeps fp32 weights: with several processes accelerate's DDP would sum the bf16
    gradients in bf16, and LoRA trains few weights (neither measured with it); pass yes to have it.
    """
    if args.low_memory:
        if args.bf16_weights == "yes":
            problems.append("--bf16_weights yes and --low_memory: --low_memory keeps bf16 weights already, without "
                            "the fp32 copy; pass one of them")
        if args.bf16_weights == "no":  # else ignored: the weights would be bf16 all the same
            problems.append("--bf16_weights no and --low_memory: --low_memory holds the weights in bf16; for fp32 "
                            "weights drop --low_memory")
        return BF16_WEIGHTS
    if args.bf16_weights == "yes":
        if fsdp:
            problems.append("--bf16_weights yes works on one GPU or with DDP, not with FSDP (which keeps its own "
                            "fp32 copy of the sharded weights); drop one of them")
        return BF16_WITH_FP32_MASTER
    if (args.bf16_weights == "auto" and precision == "bf16" and device_type == "cuda" and num_processes == 1
            and not args.lora_rank and not fsdp):
        return BF16_WITH_FP32_MASTER
    return FP32_WEIGHTS


def find_resume_checkpoint(args, output_dir: Path, problems: list, log=print):
    """The checkpoint to resume from, or None; refuses to overwrite earlier checkpoints by accident,
    those kept without their training state (for listening) included."""
    finished = checkpoint.list_checkpoints(output_dir, with_training_state=False) if output_dir.is_dir() else []
    if args.resume_from_checkpoint == "latest":
        state_problems = {found: checkpoint.training_state_problem(found) for found in finished}
        resumable = [found for found in finished if state_problems[found] is None]
        start = resumable[-1] if resumable else None
        start_step = checkpoint.checkpoint_step(start) if start else 0
        later = [found for found in finished if state_problems[found] and saved_after(found, start_step)]
        kept = [found.name for found in later if not (found / checkpoint.TRAINING_STATE_DIR).is_dir()]
        cut = [f"{found.name}: {state_problems[found]}" for found in later if found.name not in kept]
        newer = (f"newer than {start.name}, the newest checkpoint it can resume from" if start else
                 "and none it can resume from")
        if kept:  # the run would save over them under the same names
            problems.append(
                f"--resume_from_checkpoint latest: {output_dir} holds checkpoints without their training state "
                f"({', '.join(kept)}), {newer}; resuming would write over them. Move them out of {output_dir}, or "
                f"pass another --output_model_path")
        if cut:
            problems.append(
                f"--resume_from_checkpoint latest: {output_dir} holds checkpoints that cannot be resumed from "
                f"({'; '.join(cut)}), {newer}. Copy them again whole, or delete them to resume from "
                f"{start.name if start else 'the start'}")
        if start is None and not later:
            # A job's first start, or a requeue of one stopped before its first save: one command serves both.
            log(f"--resume_from_checkpoint latest: no checkpoint in {output_dir} yet, starting from the beginning"
                + runs_of_a_similar_name(output_dir))
        return start
    if args.resume_from_checkpoint:
        path = Path(args.resume_from_checkpoint)
        if not path.exists() and (output_dir / path).exists():  # a checkpoint's name, as the trainer printed it
            path = output_dir / path
        if not path.exists():
            problems.append(f"--resume_from_checkpoint {path}: not found (or pass latest: the newest in "
                            f"{output_dir})")
            return path
        problem = checkpoint.training_state_problem(path)
        if problem:
            problems.append(f"--resume_from_checkpoint {path}: cannot be resumed from: {problem}")
            return path
        step = checkpoint.checkpoint_step(path)
        later = [found.name for found in finished if saved_after(found, step)]
        if later:  # they would be written again from here: the run they came from would be lost
            problems.append(
                f"--resume_from_checkpoint {path} (step {step}): {output_dir} holds later checkpoints of that run "
                f"({', '.join(later)}), which resuming here would overwrite. To branch off from step {step}, pass "
                f"another --output_model_path; to continue the run, --resume_from_checkpoint latest")
        return path
    if finished and not args.overwrite_output_dir:
        problems.append(
            f"{output_dir} already holds checkpoints ({finished[-1].name} ...). Continue that run with "
            f"--resume_from_checkpoint latest, or start over with --overwrite_output_dir.")
    return None


def runs_of_a_similar_name(output_dir: Path) -> str:
    """A note naming folders beside `output_dir` with a close name that hold resumable checkpoints:
    `latest` must start a job's first run quietly, so a mistyped --output_model_path would too."""
    parent = output_dir.parent
    try:
        names = [entry.name for entry in os.scandir(parent) if entry.name != output_dir.name]
    except OSError:  # no such folder, or not ours to list
        return ""
    # Names first, then the few close ones looked into: a cluster's scratch folder may hold thousands.
    close = [parent / name for name in difflib.get_close_matches(output_dir.name, names, n=3, cutoff=0.8)]
    runs = [str(folder) for folder in close if folder.is_dir() and checkpoint.list_checkpoints(folder)]
    if not runs:
        return ""
    return (f". Note: {', '.join(runs)} beside it {'holds' if len(runs) == 1 else 'hold'} checkpoints; to continue "
            f"that run, stop this one and pass it as --output_model_path")


def saved_after(folder: Path, step: int) -> bool:
    """Whether checkpoint `folder` is past `step`; one of no known step (a damaged trainer_state.json) may be,
    so a resume must not save over it unasked either."""
    folder_step = checkpoint.checkpoint_step(folder)
    return folder_step is None or folder_step > step


def note_checkpoint_start(model_dir: Path, log) -> None:
    """A checkpoint of this trainer is a start like any CustomVoice model (its voices are kept, new
    ones added: voices.py); say so, in case the user meant to continue that run instead."""
    if checkpoint.has_trainer_state(model_dir):
        base = checkpoint.read_trainer_state(model_dir).flags.get("init_model_path")
        log(f"note: --init_model_path {model_dir} is a checkpoint of a fine-tuning run: a new run starts from it, "
            f"keeping its voices. To continue its training instead, pass --resume_from_checkpoint {model_dir} "
            f"(with that run's --output_model_path)"
            + (f"; to fine-tune anew from the Base model it came from: --init_model_path {base}" if base else ""))


def schedule_changes(args, state) -> tuple:
    """The SCHEDULE_FLAGS whose values differ from the checkpoint's."""
    return tuple(name for name in SCHEDULE_FLAGS if name in state.flags and state.flags[name] != getattr(args, name))


def resume_problems(args, state, resume_dir: Path, train_data: DataFingerprint, weights: WeightStorage,
                    accelerator) -> list:
    """Why this checkpoint cannot be continued with these flags (and, printed, which flags changed)."""
    saved = state.flags

    def meaning(name, value):
        """A flag's value as what it does: the target modules in any order are one choice."""
        if name == "lora_target_modules" and args.lora_rank:
            from qwen3_tts_sft import lora  # peft loads only for LoRA runs

            return lora.target_module_names(value)
        return value

    def changed(names) -> list:
        return [f"--{name} is {getattr(args, name)} but the checkpoint was made with {saved.get(name)}"
                for name in names if meaning(name, saved.get(name, False)) != meaning(name, getattr(args, name))
                and not (name in LORA_ONLY_FLAGS and not args.lora_rank)]

    problems = changed(DATA_ORDER_FLAGS + STATE_FLAGS + UPDATE_FLAGS)
    trained_weights_changes = changed(TRAINED_WEIGHTS_FLAGS)
    if trained_weights_changes:
        problems += trained_weights_changes + [
            f"({', '.join('--' + name for name in TRAINED_WEIGHTS_FLAGS)} decide which weights train, and the "
            f"checkpoint's optimizer state holds those it trained. To train others, start a new run from the "
            f"checkpoint: --init_model_path {resume_dir} and another --output_model_path)"]
    # Checkpoints from before TrainerState.weights held fp32 weights, or bf16 ones with --low_memory.
    saved_weights = state.weights or (BF16_WEIGHTS if saved.get("low_memory") else FP32_WEIGHTS).name
    if saved_weights != weights.name and not problems:
        match = "no" if saved_weights == FP32_WEIGHTS.name else "yes"
        problems.append(f"the checkpoint holds {saved_weights} weights and this run would hold {weights.name} "
                        f"(--bf16_weights {args.bf16_weights} here); resume with --bf16_weights {match}")
    started_from, starting_from = Path(saved.get("init_model_path") or args.init_model_path), Path(args.init_model_path)
    if started_from.resolve() != starting_from.resolve() and all(
            (folder / "config.json").is_file() for folder in (started_from, starting_from)) and (
            (started_from / "config.json").read_bytes() != (starting_from / "config.json").read_bytes()):
        problems.append(f"--init_model_path is {starting_from} but the checkpoint was made from {started_from}, "
                        f"another model (their config.json differ): resume with the model the run started with")
    if state.num_processes != accelerator.num_processes:
        # A requeue onto a node with another GPU count: each process saved its own random streams and
        # data position, so the run continues only with as many.
        launch = ("python, or accelerate launch --num_processes 1" if state.num_processes == 1 else
                  f"accelerate launch --num_processes {state.num_processes}")
        problems.append(f"{accelerator.num_processes} processes but the checkpoint was made with {state.num_processes}"
                        f" (each process saved its own data position and random state): resume with {launch}, or "
                        f"start a new run from it: --init_model_path {resume_dir} and another --output_model_path")
    if state.train_data_sha256 != train_data.sha256:
        problems.append(f"{args.train_jsonl} differs from the file the checkpoint was trained on "
                        f"({saved.get('train_jsonl')}, sha256 {state.train_data_sha256[:12]}...)")
    refused_changes = () if args.allow_schedule_change else schedule_changes(args, state)
    problems += [f"--{name} is {getattr(args, name)} but the checkpoint was made with {saved[name]}"
                 for name in refused_changes]
    if refused_changes:
        problems.append(f"({', '.join('--' + name for name in SCHEDULE_FLAGS)} shape the learning-rate schedule: "
                        f"new values would move the rate away from where the run is, at step {state.progress.step}. "
                        f"Keep the checkpoint's values, or pass --allow_schedule_change to follow the new schedule "
                        f"from there)")
    if problems:
        return [f"cannot resume {resume_dir}:\n  " + "\n  ".join(problems)]
    now = checkpoint.recorded_flags(args)  # paths absolute, as they were recorded: ./x and /abs/x are one
    changed = [f"--{name} {saved.get(name)} -> {value}" for name, value in sorted(now.items())
               if name in saved and saved[name] != value
               and name not in ("resume_from_checkpoint", "allow_schedule_change")]
    if changed:
        accelerator.print("resuming with changed flags: " + ", ".join(changed))
    return []


def eval_data_problems(args, state, eval_data: dict, resume_dir: Path) -> list:
    """A resume whose --eval_jsonl or --eval_sentences holds other content than the run's evaluations so far
    measured: the best checkpoint would be chosen by comparing measures of different clips or sentences."""
    problems = []
    for name, measure in EVAL_DATA_FLAGS.items():
        saved = (state.eval_data_sha256 or {}).get(name)  # None: not given then, or a checkpoint from before the record
        measured = any(entry.get(measure) is not None for entry in state.progress.evaluations)
        if measured and saved and name in eval_data and eval_data[name] != saved:
            problems.append(
                f"--{name} {getattr(args, name)} holds other content than {state.flags.get(name)}, which the run's "
                f"evaluations so far measured (sha256 {saved}): the best checkpoint would be chosen by comparing "
                f"{measure} on different {'clips' if name == 'eval_jsonl' else 'sentences'}. Resume with the file as "
                f"it was, or start a new run from the checkpoint (--init_model_path {resume_dir}, another "
                f"--output_model_path)")
    return problems


def library_versions() -> dict:
    import accelerate
    import qwen_tts
    import transformers
    from importlib.metadata import version

    return dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                accelerate=accelerate.__version__, qwen_tts=getattr(qwen_tts, "__version__", version("qwen-tts")))


def log_run_header(args, settings: Settings, accelerator) -> None:
    """What reproduces this run: versions, flags, the data file's size and hash."""
    if not accelerator.is_main_process:
        return
    print("versions: " + ", ".join(f"{k} {v}" for k, v in settings.versions.items()))
    print(f"device: {accelerator.device}, processes: {accelerator.num_processes} "
          f"({accelerator.distributed_type.value}), mixed precision: {settings.mixed_precision}")
    if accelerator.device.type == "cpu":
        print(f"  {why_no_gpu()}: training on the CPU, which is only practical for the tiny test model")
    print("flags: " + " ".join(f"--{k} {v}" for k, v in sorted(vars(args).items())))
    print(f"train data: {args.train_jsonl}: {settings.train_data.lines} lines, sha256 {settings.train_data.sha256}")


# ---------------------------------------------------------------------------------------------
# Model, data, training module, optimizer
# ---------------------------------------------------------------------------------------------

def why_no_gpu() -> str:
    """Why a run is on the CPU, for its header."""
    if torch.cuda.is_available():
        return "a CUDA GPU is there, but accelerate's config asks for the CPU (use_cpu)"
    if not torch.backends.cuda.is_built():
        return f"this torch ({torch.__version__}) is built without CUDA"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return f"no GPU is visible: CUDA_VISIBLE_DEVICES is set to {visible!r} and torch sees no GPU through it"
    return "no CUDA GPU found (torch.cuda.is_available() is False)"


def load_base_model(args, weights: WeightStorage, keep_speech_decoder: bool = False):
    """The starting model (Base or CustomVoice) through the same loader a user's download goes
    through, with fp32 or bf16 weights as `weights` says. A CustomVoice model gets a Base model's
    speaker encoder for its new voices (voices.py). The speech tokenizer is dropped unless the run
    speaks (scoring.py)."""
    from qwen_tts import Qwen3TTSModel

    tts = Qwen3TTSModel.from_pretrained(args.init_model_path, dtype=weights.dtype,
                                        attn_implementation=args.attn_implementation)
    if tts.model.speaker_encoder is None:  # refused there, naming --speaker_encoder_from, when none is found
        voices.attach_speaker_encoder(tts.model, args)
    if not args.train_speaker_encoder:
        # Frozen, it only computes the speaker vectors, once: in fp32 whatever the trained weights
        # are, so a voice's vector is the x-vector qwen_tts computes in fp32 (12 M weights, 48 MB).
        tts.model.speaker_encoder.float()
    if not keep_speech_decoder:
        tts.model.speech_tokenizer = None  # not needed for training; frees its memory
    return tts


def load_datasets(args, settings: Settings, ids, tts, accelerator) -> tuple:
    """Checked, tokenized, length-limited train (and eval) datasets, the speaker table (the new
    speakers, then the starting model's own) and the replay set (None without --replay_speakers),
    whose clips make up --replay_ratio of the train set."""
    processor, config = tts.processor, tts.model.config

    def read(path, what):
        try:
            clips = read_clips(path, ids, args.speaker_name, strict=args.strict, max_bad_fraction=args.max_bad_fraction,
                               log=accelerator.print, prompter=make_prompter(processor, config),
                               max_positions=config.talker_config.max_position_embeddings,
                               tokenizer_path=Path(args.init_model_path) / "speech_tokenizer")
            return apply_length_limits(clips, args.max_audio_seconds, args.max_text_tokens, log=accelerator.print)
        except DataError as error:
            raise SystemExit(f"error: the {what} cannot be used:\n{error}")

    train_clips = read(args.train_jsonl, "training data (--train_jsonl)")
    eval_clips = read(args.eval_jsonl, "eval data (--eval_jsonl)") if args.eval_jsonl else None
    names = sorted({clip.speaker for clip in train_clips})
    if args.speaker_name and speaker_name(args.speaker_name) not in names:
        accelerator.print(f"note: --speaker_name {args.speaker_name} names no voice of this run: every row names its "
                          f"own speaker ({', '.join(names)}), and the flag only names rows without one. Pass those "
                          f"names to generate_custom_voice(speaker=...)")
    if args.eval_split:
        try:
            train_clips, eval_clips = split_off_eval(train_clips, args.eval_split, args.seed)
        except DataError as error:
            raise SystemExit(f"error: {error}") from None
    speaker_table = voices.speaker_table(train_clips + (eval_clips or []), tts.model, args.overwrite_speaker,
                                         args.max_audio_seconds, log=accelerator.print)
    untrained = sorted({clip.speaker for clip in eval_clips or []} - {clip.speaker for clip in train_clips})
    if untrained:
        accelerator.print(f"warning: {', '.join(untrained)} only in the eval data: no training row speaks "
                          f"{'that voice' if len(untrained) == 1 else 'those voices'}, so the checkpoint holds "
                          f"{'it' if len(untrained) == 1 else 'them'} untrained (the speaker vector of the reference "
                          f"clips alone), and listening leaves it out. "
                          # The split is random, not per speaker: a voice of few clips can lose them all to it.
                          + (f"--eval_split {args.eval_split} held out every clip of "
                             f"{'it' if len(untrained) == 1 else 'them'}: lower it, or give held-out clips as "
                             f"--eval_jsonl" if args.eval_split else "A misspelt speaker name?"))
    replay_set = replay.build(tts, speaker_table, args, accelerator, make_prompter(processor, config))
    rehearsal = replay.mixed_clips(replay_set, len(train_clips), args.replay_ratio, args.seed)
    speaker_index = {speaker.name: index for index, speaker in enumerate(speaker_table)}
    train_set = TalkerDataset(train_clips + rehearsal, ids, speaker_index, settings.layouts)
    eval_set = TalkerDataset(eval_clips, ids, speaker_index, settings.layouts) if eval_clips else None
    return train_set, eval_set, speaker_table, replay_set


def make_training_model(model, speaker_table, args, settings: Settings, accelerator) -> TalkerTrainingModel:
    """The module accelerate trains, with the speaker encoder frozen (the default) or trained."""
    model.train()
    lora_config = None
    if args.lora_rank:
        from qwen3_tts_sft import lora  # peft loads only for LoRA runs

        lora_config = lora.add_adapters(model, args.lora_rank, args.lora_alpha or 2 * args.lora_rank,
                                        args.lora_dropout, args.lora_target_modules or lora.DEFAULT_TARGET_MODULES)
    model.talker.get_text_embeddings().requires_grad_(args.train_text_embedding)
    model.speaker_encoder.requires_grad_(args.train_speaker_encoder)
    recompute_layers(model, args)
    if settings.torch_compile == "layers":
        compile_layers(model)
    sample_rate = model.config.speaker_encoder_config.sample_rate
    # The table lists the new speakers, then the kept ones, whose vectors are their rows as loaded.
    new_speakers = [speaker for speaker in speaker_table if not speaker.kept]
    kept = voices.kept_vectors(model, speaker_table)
    if args.train_speaker_encoder:
        module = TalkerTrainingModel(model, speaker_vectors=kept,
                                     reference_mels=reference_mels(new_speakers, sample_rate))
    else:
        if settings.resume_dir is not None:
            vectors = checkpoint.load_speaker_vectors(settings.resume_dir)
        else:
            with torch.no_grad():
                vectors = speaker_vectors(model.speaker_encoder, reference_mels(new_speakers, sample_rate))
            if kept is not None:
                vectors = torch.cat([vectors, kept.to(vectors.dtype)])
        # Every process must fill the speaker slot with the same vector: take process 0's.
        vectors = broadcast(vectors.to(accelerator.device)) if accelerator.num_processes > 1 else vectors
        module = TalkerTrainingModel(model, speaker_vectors=vectors)
    module.lora_config = lora_config  # the checkpoint export merges the adapters with it
    module.speaker_encoder_config = voices.borrowed_encoder_config(args)  # the export writes it, when borrowed
    return module


def recompute_layers(model, args) -> None:
    """Which layers recompute their activations in the backward pass instead of keeping them.

    --gradient_checkpointing: every layer. --low_memory: the code predictor's five layers. Each
    frame is 16 code-predictor positions, so on long clips those five layers keep about as much as
    the talker's 28. Recomputing them one layer at a time took 1.7B's peak on the 2-15 s mix from
    19.6 to 17.3 GB in use, for 7% of the speed (an H100; bench_notes.md, thirteenth session). The
    recomputation replays no random state, which keeps it recordable in a CUDA graph; a code
    predictor with dropout (--lora_dropout) keeps its activations instead.
    """
    # Non-reentrant checkpointing: works with frozen inputs, LoRA and torch.compile.
    if args.gradient_checkpointing:
        recomputed, options = model.talker, dict(use_reentrant=False)
    elif args.low_memory and not (args.lora_rank and args.lora_dropout):
        recomputed, options = model.talker.code_predictor, dict(use_reentrant=False, preserve_rng_state=False)
    else:
        return
    recomputed.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    recomputed._set_gradient_checkpointing(gradient_checkpointing_func=functools.partial(
        checkpoint_with_the_forwards_thread_count, **options))


def checkpoint_with_the_forwards_thread_count(function, *args, **options):
    """torch.utils.checkpoint.checkpoint, whose recomputation runs with the CPU thread count its forward
    ran with. On a GPU autograd runs the backward, the recomputation included, on a thread of its own,
    which starts with the count last set anywhere in the process: the DataLoader's pin-memory thread
    sets 1. Compiled code guards on the count, so the recomputed layer compiled a second time (an H100,
    bench_notes.md, sixteenth session)."""
    count = torch.get_num_threads()

    def run(*inputs, **keywords):
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
        return function(*inputs, **keywords)

    return torch.utils.checkpoint.checkpoint(run, *args, **options)


def compile_layers(model, backend: str = "inductor") -> None:
    """torch.compile every decoder layer of the talker and code predictor (regional compilation).

    Layers of one kind share one compiled graph, and lengths are dynamic, so batches of any length
    reuse it; the rest of the forward stays eager.
    """
    # No duck shaping: it gives equal-sized dimensions one symbol, so a batch whose frame count
    # happens to equal the hidden size (1024 frames, say) would fix that count and recompile later.
    from torch.fx.experimental import _config as symbolic_shapes

    symbolic_shapes.use_duck_shape = False
    options = inductor_options() if backend == "inductor" else None
    for layer in list(model.talker.model.layers) + list(model.talker.code_predictor.model.layers):
        layer.compile(dynamic=True, backend=backend, options=options)  # lengths vary from batch to batch


def inductor_options() -> dict:
    """Inductor settings for the compiled layers: none that would recompile them for a batch size.

    By default inductor fuses a norm's backward row and column sums into one kernel only above 5 Mi
    elements, and that test becomes a guard on the batch's size: on an H100 the code predictor's
    layer compiled again (about 10 s each) whenever a micro-batch crossed 320 frames, twice in a
    run on 2-15 s clips. Non-strict mode skips the size test (the fusion is made at every size), so
    one graph serves every length. Older torch versions have no such test and no such setting.
    """
    from torch._inductor import config

    if hasattr(config.triton, "mix_order_reduction_non_strict_mode"):
        return {"triton.mix_order_reduction_non_strict_mode": True}
    return {}


def make_optimizer(train_module, args, settings: Settings, accelerator):
    """AdamW: on fp32 weights, fused on CUDA; or on bf16 weights with an fp32 master copy, or with
    stochastic rounding (--low_memory). No decay on norms and biases."""
    weights = settings.weights
    decay, no_decay = [], []
    for parameter in train_module.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    on_gpu = accelerator.device.type == "cuda"
    if weights != FP32_WEIGHTS:
        # On a GPU the whole update is recorded as one CUDA graph too, unless --cuda_graphs no.
        return Bf16WeightsAdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, seed=args.seed,
                                compile=on_gpu, record_graph=on_gpu and args.cuda_graphs != "no",
                                fp32_master=weights == BF16_WITH_FP32_MASTER,
                                # CUDA graphs keep the gradient tensors: the update zeroes them as it reads them.
                                zero_grads=settings.cuda_graphs)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, fused=on_gpu)


# ---------------------------------------------------------------------------------------------
# Resume or start
# ---------------------------------------------------------------------------------------------

def resume_or_start(args, settings: Settings, accelerator) -> TrainingProgress:
    """Progress to continue from: a fresh one, or the checkpoint's (with accelerate's state loaded).
    The tracker writes in the run's own folder under logs/, so a fresh start never mixes into an
    earlier run's loss series."""
    output_dir, resume_dir = Path(args.output_model_path), settings.resume_dir
    if resume_dir is None:
        if accelerator.is_main_process:
            if args.overwrite_output_dir and output_dir.is_dir():
                remove_earlier_runs(output_dir, accelerator.print)
        progress = TrainingProgress(seed=args.seed)
    else:
        progress = checkpoint.load_training_state(resume_dir, accelerator).progress
    if accelerator.is_main_process:
        # A resume may branch off into a new folder (a checkpoint given by path): scores.jsonl goes there first.
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partials(output_dir)
    if args.report_to != "none":
        progress.tracker_run = progress.tracker_run or new_tracker_run(output_dir / TRACKER_DIR)
        accelerator.init_trackers(progress.tracker_run, config=tracker_config(args))
    return progress


def remove_earlier_runs(output_dir: Path, log=print) -> None:
    """--overwrite_output_dir: delete what earlier runs left in `output_dir`, naming each thing."""
    checkpoints = sorted(folder for folder in output_dir.glob("checkpoint-*") if folder.is_dir())
    tracker_runs = sorted(folder.name for folder in (output_dir / TRACKER_DIR).glob("*"))
    loss_curve = output_dir / LOSS_CURVE
    scores, best = output_dir / scoring.SCORES_FILE, output_dir / scoring.BEST_LINK
    for item in (scores, best):
        if item.is_symlink() or item.is_file():
            log(f"--overwrite_output_dir: removing {item}")
            item.unlink()
    if checkpoints:
        log(f"--overwrite_output_dir: removing {len(checkpoints)} checkpoints from {output_dir} (with anything "
            f"written into them, such as listening reports): " + ", ".join(folder.name for folder in checkpoints))
    if tracker_runs:
        log(f"--overwrite_output_dir: removing the tracker logs {output_dir / TRACKER_DIR}: " + ", ".join(tracker_runs))
    if loss_curve.is_file():
        log(f"--overwrite_output_dir: removing {loss_curve}")
        loss_curve.unlink()
    for folder in checkpoints:
        shutil.rmtree(folder)
    shutil.rmtree(output_dir / TRACKER_DIR, ignore_errors=True)


def new_tracker_run(logs_dir: Path) -> str:
    """A fresh run's tracker folder name: the project and the start time, unused in `logs_dir`."""
    name = f"{TRACKER_PROJECT}-{time.strftime('%Y%m%d-%H%M%S')}"
    taken = {folder.name for folder in logs_dir.glob(name + "*")}
    return next(candidate for candidate in [name] + [f"{name}-{n}" for n in range(2, len(taken) + 2)]
                if candidate not in taken)


def follow_new_schedule(scheduler, lr: float, step: int, accelerator) -> None:
    """--allow_schedule_change: the loaded schedule keeps its position (the step) but takes the new
    flags' shape and peak rate; the next update already uses the new schedule's rate."""
    schedule = scheduler.scheduler  # accelerate's wrapper holds the LambdaLR get_scheduler made
    before = schedule.get_last_lr()[0]
    schedule.base_lrs = [lr for _ in schedule.base_lrs]
    for group, lr_lambda in zip(schedule.optimizer.param_groups, schedule.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * lr_lambda(schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]  # what get_last_lr reports
    accelerator.print(f"--allow_schedule_change: from step {step + 1} the learning rate follows the new schedule "
                      f"({before:.3g} -> {schedule.get_last_lr()[0]:.3g})")


def finished_message(resume_dir: Path, progress: TrainingProgress, total_steps: int, speakers: list,
                     best_is_result: bool = False) -> str:
    best = resume_dir.parent / progress.best_checkpoint if progress.best_checkpoint else None
    # With --load_best_model_at_end the best checkpoint is the run's result.
    result = best if best_is_result and best is not None and best.is_dir() else resume_dir
    said = (f"The run's result is its best checkpoint, {best.name} (--load_best_model_at_end)" if result != resume_dir
            else "Its model is the run's result")
    lines = [f"already finished: {resume_dir} is at step {progress.step} of the run's {total_steps}; nothing is "
             f"left to train. {said}",
             f"  hear it: {hear_it(result, speakers)}"]
    if progress.best_checkpoint:
        lines.append(f"  best by --metric_for_best_model: {progress.best_checkpoint} (step "
                     f"{progress.best_step or progress.best_eval_step}; the table in {scoring.SCORES_FILE})")
    lines.append("  to train further, resume with a larger --num_epochs or --max_steps and --allow_schedule_change")
    return "\n".join(lines)


def tracker_config(args) -> dict:
    return {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}
