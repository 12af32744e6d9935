"""Fine-tune a Qwen3-TTS 12 Hz Base model on your voice (or several voices), Chatterbox-style.

    CUDA_VISIBLE_DEVICES=0 python sft_12hz_chatterbox.py --init_model_path Qwen3-TTS-12Hz-1.7B-Base \\
      --train_jsonl train_with_codes.jsonl --output_model_path output --speaker_name my_speaker \\
      --batch_size 4 --lr 5e-5 --num_epochs 1 --gradient_accumulation_steps 2 --warmup_steps 100 \\
      --freeze_speaker_encoder

Runs with `python` (one GPU, or CPU) or `accelerate launch` (several GPUs). Each checkpoint
folder loads with `Qwen3TTSModel.from_pretrained(folder)` and speaks with
`generate_custom_voice(text, language="auto", speaker=NAME)`. README_CHATTERBOX_STYLE.md explains
every setting.
"""

import argparse
import functools
import math
import platform
import shutil
import signal
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, broadcast
from tqdm.auto import tqdm
from transformers import get_scheduler

from qwen3_tts_sft import checkpoint
from qwen3_tts_sft import lora
from qwen3_tts_sft.bf16_adamw import StochasticRoundingAdamW
from qwen3_tts_sft.checkpoint import TrainingProgress
from qwen3_tts_sft.sequence_layout import NON_STREAMING, STREAMING, SpecialIds, collate
from qwen3_tts_sft.speakers import assign_speakers, reference_mels, speaker_vectors
from qwen3_tts_sft.talker_step import TalkerTrainingModel
from qwen3_tts_sft.training_data import (DataError, TalkerDataset, apply_length_limits, file_fingerprint, make_prompter,
                           plan_epoch, read_clips, split_off_eval)
from qwen3_tts_sft.training_run import Run

LR_SCHEDULERS = ["linear", "cosine", "constant_with_warmup"]
COMPILE_OPTIONS = dict(dynamic=True)  # lengths vary from batch to batch (padded to multiples of 8)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    paths = parser.add_argument_group("data and model")
    paths.add_argument("--init_model_path", required=True,
                       help="the Base model folder to start from (a download of Qwen3-TTS-12Hz-1.7B-Base or 0.6B-Base)")
    paths.add_argument("--train_jsonl", required=True, help="codes JSONL written by prepare_codes.py")
    paths.add_argument("--output_model_path", default="output", help="where checkpoint folders are written")
    paths.add_argument("--speaker_name", default=None,
                       help="speaker name for rows without a 'speaker' field; it is what you pass to "
                            "generate_custom_voice(speaker=...) (stored lower-cased)")
    paths.add_argument("--eval_jsonl", default=None, help="held-out codes JSONL for eval loss")
    paths.add_argument("--eval_split", type=float, default=0.0,
                       help="hold out this fraction of --train_jsonl for eval instead (seeded); 0 = none")

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--batch_size", type=int, default=4, help="clips per micro-batch per GPU")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=2,
                       help="micro-batches per optimizer step; exact: 4x2 and 8x1 give the same update")
    optim.add_argument("--lr", type=float, default=5e-5,
                       help="peak learning rate; 5e-5 adapts a voice without erasing what the model knows")
    optim.add_argument("--num_epochs", type=int, default=1,
                       help="passes over the data; 1 epoch of a few thousand clips is enough for one voice")
    optim.add_argument("--max_steps", type=int, default=0,
                       help="stop after this many optimizer steps (0 = run all epochs)")
    optim.add_argument("--warmup_steps", type=int, default=100,
                       help="linear warmup from 0 to --lr; avoids large first updates from fresh optimizer state")
    optim.add_argument("--lr_scheduler", default="linear", choices=LR_SCHEDULERS,
                       help="shape after warmup; linear decays to 0 at the last step")
    optim.add_argument("--weight_decay", type=float, default=0.01,
                       help="AdamW decay on matrices (not on norms or biases)")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping; 0 disables it")
    optim.add_argument("--sub_talker_loss_weight", type=float, default=0.3,
                       help="weight of the code predictor's loss (groups 1-15) next to the talker's (group 0)")
    optim.add_argument("--freeze_speaker_encoder", action="store_true",
                       help="keep the speaker encoder fixed (recommended): speaker vectors are computed once")
    optim.add_argument("--train_text_embedding", action="store_true",
                       help="also train the 151936-row text embedding table (about 4 GB more GPU memory on 1.7B); "
                            "off by default: a new voice needs no new word vectors, and text_projection still trains")
    optim.add_argument("--text_layout", default="non_streaming", choices=["non_streaming", "streaming", "both"],
                       help="how the text sits beside the audio in training, as generate_custom_voice's "
                            "non_streaming_mode=True (default) or False lays it out; 'both' trains every clip "
                            "in both layouts (twice the steps), so either mode speaks well")
    optim.add_argument("--seed", type=int, default=42, help="data order and any randomness")
    optim.add_argument("--low_memory", action="store_true",
                       help="bf16 weights and AdamW moments, updates rounded stochastically so small steps are "
                            "not lost (bf16_adamw.py): about half the memory of the default fp32 weights and "
                            "moments; 1.7B fits a 24 GB GPU")
    optim.add_argument("--gradient_checkpointing", action="store_true",
                       help="recompute each layer's activations in the backward pass instead of storing them: "
                            "less memory for long clips or large batches, ~30%% more compute")

    lora_group = parser.add_argument_group("LoRA (train small adapters instead of every weight)")
    lora_group.add_argument("--lora_rank", type=int, default=0,
                            help="rank of LoRA adapters on the linear layers; 0 = full fine-tuning. 16-64 suit a voice")
    lora_group.add_argument("--lora_alpha", type=float, default=None, help="adapter scale numerator (default 2 x rank)")
    lora_group.add_argument("--lora_dropout", type=float, default=0.0)
    lora_group.add_argument("--lora_target_modules", default=None,
                            help="comma-separated linear layer names to adapt (default: every attention and MLP "
                                 "projection of the talker and code predictor)")

    run = parser.add_argument_group("run")
    run.add_argument("--mixed_precision", default="auto", choices=["auto", "bf16", "no"],
                     help="auto: bf16 autocast on a GPU that supports it (weights and AdamW state stay fp32 unless --low_memory), "
                          "fp32 otherwise")
    run.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    run.add_argument("--torch_compile", default="auto", choices=["auto", "layers", "no"],
                     help="torch.compile each transformer layer (fused kernels, less Python a step); auto = "
                          "layers on a GPU, except under FSDP (no). The first steps take about a minute longer")
    run.add_argument("--cuda_graphs", default="auto", choices=["auto", "yes", "no"],
                     help="replay each micro-batch's forward and backward as one recorded CUDA graph, one per "
                          "batch shape (cuda_graphs.py), and the --low_memory optimizer step as another: 1.7-2.4x "
                          "the speed of 1.7B at batch 4. auto = yes on one GPU with --freeze_speaker_encoder, "
                          "except with --gradient_checkpointing, and dropped where memory is short")
    run.add_argument("--logging_steps", type=int, default=10, help="log losses every this many optimizer steps")
    run.add_argument("--save_steps", type=int, default=4000,
                     help="write checkpoint-step-N every this many steps (0 = only per epoch)")
    run.add_argument("--eval_steps", type=int, default=2000,
                     help="eval loss every this many steps, and at the end (needs eval data)")
    run.add_argument("--save_total_limit", type=int, default=0,
                     help="keep only the newest N checkpoints (0 = keep all); the best eval one is also kept")
    run.add_argument("--save_dtype", default="bfloat16", choices=["bfloat16", "float32"],
                     help="dtype of the exported model.safetensors")
    run.add_argument("--resume_from_checkpoint", default=None,
                     help="a checkpoint folder, or 'latest' for the newest in --output_model_path")
    run.add_argument("--overwrite_output_dir", action="store_true",
                     help="delete checkpoints already in --output_model_path and start over")
    run.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "none"],
                     help="tracker for losses and learning rate (written under --output_model_path/logs)")
    run.add_argument("--num_workers", type=int, default=2, help="data loader worker processes")
    run.add_argument("--group_by_length", type=int, default=1, choices=[0, 1],
                     help="put clips of similar length in the same micro-batch (less padding, same randomness per step)")

    data = parser.add_argument_group("data checks")
    data.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping bad rows")
    data.add_argument("--max_bad_fraction", type=float, default=0.01,
                      help="stop if more than this fraction of rows are bad")
    data.add_argument("--max_audio_seconds", type=float, default=30.0,
                      help="drop clips longer than this (memory grows with length)")
    data.add_argument("--max_text_tokens", type=int, default=0, help="drop clips whose prompt is longer (0 = no limit)")
    data.add_argument("--max_nonfinite_steps", type=int, default=5,
                      help="stop after this many optimizer steps in a row with a non-finite loss or gradient")
    return parser.parse_args(argv)


def check_args(args):
    """Reject impossible settings before any model is loaded."""
    problems = []
    for name in ("batch_size", "gradient_accumulation_steps", "num_epochs", "logging_steps"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1")
    for name in ("warmup_steps", "save_steps", "eval_steps", "save_total_limit", "max_steps", "max_text_tokens"):
        if getattr(args, name) < 0:
            problems.append(f"--{name} must not be negative")
    if args.lr <= 0:
        problems.append("--lr must be positive")
    if not 0 <= args.eval_split < 1:
        problems.append("--eval_split must be in [0, 1)")
    if args.eval_split and args.eval_jsonl:
        problems.append("give --eval_jsonl or --eval_split, not both")
    if args.resume_from_checkpoint and args.overwrite_output_dir:
        problems.append("--resume_from_checkpoint and --overwrite_output_dir contradict each other")
    if not Path(args.init_model_path, "config.json").is_file():
        problems.append(f"--init_model_path {args.init_model_path}: no config.json there (is it a downloaded model folder?)")
    if not Path(args.train_jsonl).is_file():
        problems.append(f"--train_jsonl {args.train_jsonl}: file not found")
    if args.eval_jsonl and not Path(args.eval_jsonl).is_file():
        problems.append(f"--eval_jsonl {args.eval_jsonl}: file not found")
    if problems:
        raise SystemExit("error: " + "\n       ".join(problems))
    return args


# ---------------------------------------------------------------------------------------------
# main: the phases in order, then the loop
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args = check_args(parse_args(argv))
    accelerator = make_accelerator(args)
    output_dir = Path(args.output_model_path)
    resume_dir = find_resume_checkpoint(args, output_dir)
    log_run_header(args, accelerator)

    tts = load_base_model(args)
    model, config = tts.model, tts.model.config
    ids = SpecialIds.from_config(config)
    train_set, eval_set, speaker_table = load_datasets(args, ids, tts.processor, config, accelerator)
    train_module = make_training_model(model, speaker_table, args, accelerator, resume_dir)
    optimizer = make_optimizer(train_module, args, accelerator)
    first_plan = plan_for(train_set, args, accelerator, epoch=0)
    steps_per_epoch = len(first_plan.steps)
    total_steps = min(args.max_steps or math.inf, steps_per_epoch * args.num_epochs)
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.warmup_steps,
                              num_training_steps=total_steps)
    train_module, optimizer, scheduler = accelerator.prepare(train_module, optimizer, scheduler)
    progress = resume_or_start(args, accelerator, resume_dir, output_dir)
    run = Run(args, accelerator, train_module, optimizer, scheduler, speaker_table, output_dir, progress,
              cuda_graphs_choice(args, accelerator))
    print_banner(run, train_set, eval_set, first_plan, total_steps, resume_dir)

    # The loop. One iteration is one optimizer step over batch x accumulation x processes clips.
    stop_request = StopRequest()
    bar = tqdm(total=total_steps, initial=progress.step, desc="training", unit="step", dynamic_ncols=True,
               disable=None if accelerator.is_main_process else True)
    while progress.step < total_steps and progress.epoch < args.num_epochs:
        plan = plan_for(train_set, args, accelerator, epoch=progress.epoch)
        micro_batches = iter(micro_batch_loader(train_set, plan, progress.steps_done_in_epoch, args, accelerator))
        for step_in_epoch in range(progress.steps_done_in_epoch, len(plan.steps)):
            step_targets = train_set.targets(plan.steps[step_in_epoch])
            batches = [next(micro_batches) for _ in plan.micro_batches[step_in_epoch]]
            stop_asked = run.optimizer_step(batches, step_targets, stop_request.asked)
            progress.steps_done_in_epoch += 1
            bar.update(1)
            bar.set_postfix_str(run.postfix())

            step, last_step = progress.step, progress.step >= total_steps
            if step % args.logging_steps == 0 or last_step:
                run.log_training()
            if eval_set is not None and (last_step or (args.eval_steps and step % args.eval_steps == 0)):
                run.evaluate(eval_set)
            if progress.steps_done_in_epoch == len(plan.steps):
                progress.epoch += 1
                progress.steps_done_in_epoch = 0
                run.save(f"checkpoint-epoch-{progress.epoch - 1}")
            elif last_step or stop_asked or (args.save_steps and step % args.save_steps == 0 and
                                             not progress.nonfinite_in_a_row):  # keep the last good one
                run.save(f"checkpoint-step-{step}")
            if stop_asked:
                bar.close()
                accelerator.print(f"stopped by {stop_request.signal_name} at step {step}; the state is saved. "
                                  f"Continue with --resume_from_checkpoint latest")
                accelerator.end_training()
                return
            if last_step:
                break
    bar.close()
    run.finish()


# ---------------------------------------------------------------------------------------------
# Setup, one function per object
# ---------------------------------------------------------------------------------------------

def make_accelerator(args):
    if args.mixed_precision == "auto":
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        args.mixed_precision = "bf16" if use_bf16 else "no"
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Accumulation is done by the loop (exact target-count normalisation), so accelerate gets 1,
    # and the scheduler steps once per optimizer step whatever the number of processes.
    return Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_model_path,
                                            logging_dir=str(Path(args.output_model_path) / "logs")),
        step_scheduler_with_optimizer=False,
    )


def find_resume_checkpoint(args, output_dir: Path):
    """The checkpoint to resume from, or None; refuses to overwrite earlier checkpoints by accident."""
    existing = checkpoint.list_checkpoints(output_dir) if output_dir.is_dir() else []
    if args.resume_from_checkpoint == "latest":
        if not existing:
            raise SystemExit(f"error: --resume_from_checkpoint latest: no checkpoint in {output_dir}")
        return existing[-1]
    if args.resume_from_checkpoint:
        path = Path(args.resume_from_checkpoint)
        if not (path / checkpoint.TRAINING_STATE_DIR).is_dir():
            raise SystemExit(f"error: --resume_from_checkpoint {path}: not a checkpoint with training state")
        return path
    if existing and not args.overwrite_output_dir:
        raise SystemExit(
            f"error: {output_dir} already holds checkpoints ({existing[-1].name} ...). Continue that run with "
            f"--resume_from_checkpoint latest, or start over with --overwrite_output_dir."
        )
    return None


def log_run_header(args, accelerator):
    """What reproduces this run: versions, resolved flags, the data file's size and hash."""
    if not accelerator.is_main_process:
        return
    import accelerate
    import qwen_tts
    import transformers

    versions = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                    accelerate=accelerate.__version__, qwen_tts=getattr(qwen_tts, "__version__", package_version("qwen-tts")))
    lines, digest = file_fingerprint(args.train_jsonl)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"device: {accelerator.device}, processes: {accelerator.num_processes} "
          f"({accelerator.distributed_type.value}), mixed precision: {args.mixed_precision}")
    print("flags: " + " ".join(f"--{k} {v}" for k, v in sorted(vars(args).items())))
    print(f"train data: {args.train_jsonl}: {lines} lines, sha256 {digest}")
    args.versions = versions


def package_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def load_base_model(args):
    """The base model through the same loader a user's download goes through; fp32 master weights
    (bf16 with --low_memory)."""
    from qwen_tts import Qwen3TTSModel

    tts = Qwen3TTSModel.from_pretrained(args.init_model_path, dtype=torch.bfloat16 if args.low_memory else torch.float32,
                                        attn_implementation=args.attn_implementation)
    if tts.model.speaker_encoder is None:
        raise SystemExit(
            f"error: {args.init_model_path} has no speaker encoder (tts_model_type "
            f"{tts.model.tts_model_type!r}); fine-tune from a Base model"
        )
    tts.model.speech_tokenizer = None  # not needed for training; frees its memory
    return tts


def load_datasets(args, ids, processor, config, accelerator):
    """Checked, tokenized, length-limited train (and eval) datasets, and the speaker table."""
    def read(path):
        try:
            clips = read_clips(path, ids, args.speaker_name, strict=args.strict, max_bad_fraction=args.max_bad_fraction,
                               log=accelerator.print, prompter=make_prompter(processor, config),
                               max_positions=config.talker_config.max_position_embeddings)
            return apply_length_limits(clips, args.max_audio_seconds, args.max_text_tokens, log=accelerator.print)
        except DataError as error:
            raise SystemExit(f"error: the training data cannot be used:\n{error}")

    train_clips = read(args.train_jsonl)
    eval_clips = read(args.eval_jsonl) if args.eval_jsonl else None
    if args.eval_split:
        train_clips, eval_clips = split_off_eval(train_clips, args.eval_split, args.seed)
    speaker_table = assign_speakers(train_clips + (eval_clips or []), config.talker_config)
    speaker_index = {speaker.name: index for index, speaker in enumerate(speaker_table)}
    layouts = [NON_STREAMING, STREAMING] if args.text_layout == "both" else [args.text_layout]
    train_set = TalkerDataset(train_clips, ids, speaker_index, layouts)
    eval_set = TalkerDataset(eval_clips, ids, speaker_index, layouts) if eval_clips else None
    return train_set, eval_set, speaker_table


def make_training_model(model, speaker_table, args, accelerator, resume_dir):
    """The module accelerate trains, with the speaker encoder frozen or not."""
    model.train()
    lora_config = None
    if args.lora_rank:
        lora_config = lora.add_adapters(model, args.lora_rank, args.lora_alpha or 2 * args.lora_rank,
                                        args.lora_dropout, args.lora_target_modules or lora.DEFAULT_TARGET_MODULES)
    model.talker.get_text_embeddings().requires_grad_(args.train_text_embedding)
    model.speaker_encoder.requires_grad_(not args.freeze_speaker_encoder)
    if args.gradient_checkpointing:
        # Non-reentrant checkpointing: works with frozen inputs, LoRA and torch.compile.
        model.talker.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
    if compile_choice(args, accelerator) == "layers":
        compile_layers(model)
    if args.freeze_speaker_encoder:
        if resume_dir is not None:
            vectors = checkpoint.load_speaker_vectors(resume_dir / checkpoint.TRAINING_STATE_DIR)
        else:
            with torch.no_grad():
                vectors = speaker_vectors(model.speaker_encoder, reference_mels(speaker_table, config_sample_rate(model)))
        # Every process must fill the speaker slot with the same vector: take process 0's.
        vectors = broadcast(vectors.to(accelerator.device)) if accelerator.num_processes > 1 else vectors
        module = TalkerTrainingModel(model, speaker_vectors=vectors)
    else:
        module = TalkerTrainingModel(model, reference_mels=reference_mels(speaker_table, config_sample_rate(model)))
    module.lora_config = lora_config  # the checkpoint export merges the adapters with it
    return module


def compile_choice(args, accelerator) -> str:
    """What --torch_compile means on this machine: layers or no."""
    if args.torch_compile != "auto":
        return args.torch_compile
    if accelerator.device.type != "cuda" or accelerator.distributed_type == DistributedType.FSDP:
        return "no"  # CPU: compiling costs more than it saves; FSDP: its hooks run around the layers
    return "layers"


def compile_layers(model):
    """torch.compile every decoder layer of the talker and code predictor (regional compilation).

    Layers of one kind share one compiled graph, and lengths are dynamic, so batches of any length
    reuse it; the rest of the forward stays eager.
    """
    # No duck shaping: it gives equal-sized dimensions one symbol, so a batch whose frame count
    # happens to equal the hidden size (1024 frames, say) would fix that count and recompile later.
    from torch.fx.experimental import _config as symbolic_shapes

    symbolic_shapes.use_duck_shape = False
    for layer in list(model.talker.model.layers) + list(model.talker.code_predictor.model.layers):
        layer.compile(**COMPILE_OPTIONS)


def cuda_graphs_choice(args, accelerator) -> bool:
    """Whether --cuda_graphs means recording graphs on this run; refuses `yes` where they cannot work."""
    unsupported = []
    if accelerator.device.type != "cuda":
        unsupported.append("they need a CUDA GPU")
    if accelerator.num_processes > 1:
        unsupported.append("they work in one process only (the gradient all-reduce runs outside them)")
    if not args.freeze_speaker_encoder:
        unsupported.append("they need --freeze_speaker_encoder (the trained encoder reads its mels from host memory)")
    if args.gradient_checkpointing:
        unsupported.append("they do not work with --gradient_checkpointing")
    if args.cuda_graphs == "yes" and unsupported:
        raise SystemExit("error: --cuda_graphs yes: " + "; ".join(unsupported))
    return args.cuda_graphs != "no" and not unsupported


def config_sample_rate(model) -> int:
    return model.config.speaker_encoder_config.sample_rate


def make_optimizer(train_module, args, accelerator):
    """AdamW: on fp32 weights and fused on CUDA, or on bf16 weights with --low_memory; no decay on
    norms and biases."""
    decay, no_decay = [], []
    for parameter in train_module.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    on_gpu = accelerator.device.type == "cuda"
    if args.low_memory:
        if accelerator.distributed_type == DistributedType.FSDP:
            raise SystemExit("error: --low_memory works on one GPU or with DDP, not with FSDP (which shards "
                             "the memory itself); drop one of them")
        return StochasticRoundingAdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, seed=args.seed,
                                       compile=on_gpu, record_graph=on_gpu and args.cuda_graphs != "no")
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, fused=on_gpu)


def plan_for(dataset, args, accelerator, epoch):
    return plan_epoch(dataset, args.batch_size, args.gradient_accumulation_steps, accelerator.num_processes,
                      accelerator.process_index, args.seed, epoch, bool(args.group_by_length))


def micro_batch_loader(dataset, plan, steps_done, args, accelerator):
    """This process's micro-batches from step `steps_done` of the plan on, collated by workers, and
    padded to the plan's few batch shapes where CUDA graphs record one graph per shape."""
    batches = [batch for step in plan.micro_batches[steps_done:] for batch in step]
    shapes = plan.shapes if cuda_graphs_choice(args, accelerator) else None
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=functools.partial(collate, shapes=shapes),
        num_workers=args.num_workers,
        pin_memory=accelerator.device.type == "cuda", persistent_workers=False,
        # Its own random stream: creating a loader draws a seed, which would otherwise shift the
        # global stream (dropout's) between a resumed run and the uninterrupted one.
        generator=torch.Generator().manual_seed(args.seed),
    )


def resume_or_start(args, accelerator, resume_dir, output_dir):
    """Progress to continue from: a fresh one, or the checkpoint's (with accelerate's state loaded)."""
    if resume_dir is None:
        if accelerator.is_main_process:
            if args.overwrite_output_dir and output_dir.is_dir():
                for folder in output_dir.glob("checkpoint-*"):
                    shutil.rmtree(folder)
            output_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.remove_partials(output_dir)
        if args.report_to != "none":
            accelerator.init_trackers("sft_12hz", config=tracker_config(args))
        return TrainingProgress(seed=args.seed)
    state = checkpoint.read_trainer_state(resume_dir)
    check_resume_flags(args, state, accelerator)
    accelerator.load_state(str(resume_dir / checkpoint.TRAINING_STATE_DIR))
    if accelerator.is_main_process:
        checkpoint.remove_partials(output_dir)
    if args.report_to != "none":
        accelerator.init_trackers("sft_12hz", config=tracker_config(args))
    return checkpoint.progress_from_state(state)


# Flags that decide which clips go into which step, or what the saved state holds: a resume with
# other values would not continue the same run.
DATA_ORDER_FLAGS = ("batch_size", "gradient_accumulation_steps", "seed", "group_by_length", "text_layout")
STATE_FLAGS = ("low_memory", "lora_rank")


def check_resume_flags(args, state, accelerator):
    saved = state["flags"]
    problems = [f"--{name} is {getattr(args, name)} but the checkpoint was made with {saved.get(name)}"
                for name in DATA_ORDER_FLAGS + STATE_FLAGS if saved.get(name, False) != getattr(args, name)]
    if state.get("num_processes") != accelerator.num_processes:
        problems.append(f"{accelerator.num_processes} processes but the checkpoint was made with "
                        f"{state.get('num_processes')}")
    if state.get("train_data_sha256") != file_fingerprint(args.train_jsonl)[1]:
        problems.append(f"{args.train_jsonl} differs from the file the checkpoint was trained on")
    if problems:
        raise SystemExit("error: cannot resume this checkpoint:\n  " + "\n  ".join(problems))
    changed = [f"--{name} {saved.get(name)} -> {value}" for name, value in sorted(vars(args).items())
               if name in saved and saved[name] != value and name not in ("resume_from_checkpoint", "versions")]
    if changed:
        accelerator.print("resuming with changed flags: " + ", ".join(changed))


def tracker_config(args):
    return {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}


def print_banner(run, train_set, eval_set, plan, total_steps, resume_dir):
    """Say what will happen before step 1."""
    args, accelerator = run.args, run.accelerator
    module = accelerator.unwrap_model(run.train_module)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    steps_per_epoch = len(plan.steps)
    lines = [
        "***** Running training *****",
        f"  clips: {len(train_set.clips)} train" + (f", {len(eval_set.clips)} eval" if eval_set else ", no eval data")
        + f"; text layout {args.text_layout}" + (" (each clip in both: twice the examples)" if len(train_set.layouts) > 1 else ""),
        "  speakers: " + ", ".join(f"{s.name} (codec id {s.codec_id}, {len(s.reference_audio)} reference clips)"
                                    for s in run.speaker_table),
        f"  batch: {args.batch_size} per process x {args.gradient_accumulation_steps} accumulation x "
        f"{accelerator.num_processes} processes = {args.batch_size * args.gradient_accumulation_steps * accelerator.num_processes} clips per step",
        f"  steps: {steps_per_epoch} per epoch x {args.num_epochs} epochs -> {total_steps} optimizer steps, "
        f"{args.warmup_steps} warmup, {args.lr_scheduler} schedule, peak lr {args.lr}",
        f"  parameters: {trainable / 1e6:.1f}M trainable, {frozen / 1e6:.1f}M frozen "
        + (f"(LoRA rank {args.lora_rank} adapters, merged into each checkpoint; " if args.lora_rank else "(")
        + f"speaker encoder {'frozen' if args.freeze_speaker_encoder else 'trained'}, "
        f"text embedding {'trained' if args.train_text_embedding else 'frozen'})",
        "  precision: " + ("weights, gradients and AdamW moments bf16, stochastic rounding (--low_memory)"
                           if args.low_memory else "weights and AdamW state fp32")
        + f", compute {'bf16 autocast' if args.mixed_precision == 'bf16' else 'fp32'}"
        + (", gradient checkpointing" if args.gradient_checkpointing else "")
        + f", torch.compile: {compile_choice(args, accelerator)}"
        + (", CUDA graphs" if run.graphs is not None else ""),
        f"  checkpoints: {run.output_dir}/checkpoint-epoch-N" + (f" and every {args.save_steps} steps" if args.save_steps else ""),
    ]
    if plan.dropped:
        lines.append(f"  {plan.dropped} clips per epoch left out: too few to give every process a micro-batch")
    if resume_dir is not None:
        lines.append(f"  resumed from {resume_dir} at step {run.progress.step} (epoch {run.progress.epoch}, "
                     f"step {run.progress.steps_done_in_epoch} of it)")
    accelerator.print("\n".join(lines))


class StopRequest:
    """Turns SIGTERM / SIGINT (what schedulers send before preemption) into a save-and-exit at the next step."""

    def __init__(self):
        self.signal_name = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        if self.signal_name is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    @property
    def asked(self) -> bool:
        return self.signal_name is not None


if __name__ == "__main__":
    main()
