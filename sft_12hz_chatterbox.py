"""Fine-tune a Qwen3-TTS 12 Hz model on your voice (or several voices), Chatterbox-style.

    CUDA_VISIBLE_DEVICES=0 python sft_12hz_chatterbox.py --init_model_path Qwen3-TTS-12Hz-1.7B-Base \\
      --train_jsonl train_with_codes.jsonl --output_model_path output --speaker_name my_speaker \\
      --batch_size 4 --lr 5e-5 --num_epochs 1 --gradient_accumulation_steps 2 --warmup_steps 100 \\
      --freeze_speaker_encoder

Runs with `python` (one GPU, or CPU) or `accelerate launch` (several GPUs). Each checkpoint
folder loads with `Qwen3TTSModel.from_pretrained(folder)` and speaks with
`generate_custom_voice(text, language=LANGUAGE, speaker=NAME)`, LANGUAGE being the one its rows
name ("auto" where they name none; the summary says it per voice). Start from a Base model, or add
voices to a CustomVoice model (or to a checkpoint of this trainer): its own speakers are kept, and
--replay_speakers rehearses them. README_CHATTERBOX_STYLE.md explains every setting.
"""

import argparse
import signal
import sys
from pathlib import Path

from qwen3_tts_sft.stop_signals import STOP_SIGNALS  # imports nothing heavy

# torch, accelerate and the model code are imported in main(), after the flags are read and the stop
# signals taken over: --help and a mistyped flag answer at once, and Ctrl-C while they load is no traceback.

LR_SCHEDULERS = ["linear", "cosine", "constant_with_warmup"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and each flag's default after its help, unless the help says it
    already (a required flag has none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default:" in text or action.required or action.default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    paths = parser.add_argument_group("data and model")
    paths.add_argument("--init_model_path", required=True,
                       help="the model folder to start from: a Base model (a download of Qwen3-TTS-12Hz-1.7B-Base or "
                            "0.6B-Base), a CustomVoice model, or a checkpoint of this trainer; a model's own "
                            "speakers are kept")
    paths.add_argument("--train_jsonl", required=True, help="codes JSONL written by prepare_codes.py")
    paths.add_argument("--output_model_path", default="output", help="where checkpoint folders are written")
    paths.add_argument("--speaker_name", default=None,
                       help="speaker name for rows without a 'speaker' field; it is what you pass to "
                            "generate_custom_voice(speaker=...) (stored lower-cased)")
    paths.add_argument("--eval_jsonl", default=None, help="held-out codes JSONL for eval loss")
    paths.add_argument("--eval_split", type=float, default=0.0,
                       help="hold out this fraction of --train_jsonl for eval instead (seeded); 0 = none")

    voices = parser.add_argument_group("voices (adding speakers to a model that has some)")
    voices.add_argument("--speaker_encoder_from", default=None, metavar="PATH",
                        help="starting from a CustomVoice model (it has no speaker encoder): the Base model of the "
                             "same size, or a checkpoint folder with speaker_encoder.safetensors, whose encoder makes "
                             "the new voices' vectors. Not needed from a checkpoint of this trainer (it keeps one)")
    voices.add_argument("--overwrite_speaker", action="store_true",
                        help="a speaker name the starting model already has replaces that voice (same codec id) "
                             "instead of being an error")
    voices.add_argument("--replay_speakers", default=None, metavar="NAMES|all",
                        help="comma-separated speakers of the starting model (or 'all') to rehearse: the frozen "
                             "starting model speaks a replay set for each (greedy, cached in "
                             "--output_model_path/replay/), mixed into training so their voices do not drift; "
                             "their replay loss before and after is reported")
    voices.add_argument("--replay_ratio", type=float, default=0.2,
                        help="fraction of each epoch's clips drawn from the replay set (0: measure the drift only)")
    voices.add_argument("--replay_languages", default="all",
                        help="comma-separated languages the replay set is spoken in; 'all': auto and every language "
                             "of the model, with infer_test.py's sentences (a dialect speaker speaks its dialect "
                             "for chinese and auto)")
    voices.add_argument("--replay_max_seconds", type=float, default=20.0,
                        help="replay speech longer than this did not stop and is left out")

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
                       help="linear warmup from 0 to --lr; avoids large first updates from fresh optimizer state. "
                            "About 5-10%% of the run's optimizer steps (the banner prints their number); the "
                            "trainer warns when it covers more than half the run")
    optim.add_argument("--lr_scheduler", default="linear", choices=LR_SCHEDULERS,
                       help="shape after warmup; linear decays to 0 at the last step")
    optim.add_argument("--weight_decay", type=float, default=0.01,
                       help="AdamW decay on matrices (not on norms or biases)")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping; 0 disables it")
    optim.add_argument("--code_predictor_loss_weight", "--sub_talker_loss_weight", type=float, default=0.3,
                       dest="code_predictor_loss_weight",
                       help="weight of the code predictor's loss (groups 1-15) next to the talker's (group 0)")
    optim.add_argument("--train_speaker_encoder", action="store_true",
                       help="train the speaker encoder too (off: it stays fixed and each speaker's vector is "
                            "computed once from its reference clips). Trained with few voices it tends to pull "
                            "their vectors together until the voices mix (README_CHATTERBOX_STYLE.md)")
    optim.add_argument("--freeze_speaker_encoder", action="store_false", dest="train_speaker_encoder",
                       help="keep the speaker encoder fixed (default: on; accepted because the recipe names it)")
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
                            "not lost (bf16_adamw.py), and the code predictor's layers recomputed in the backward "
                            "instead of keeping their activations: about half the memory of the default; 1.7B "
                            "fits a 24 GB GPU")
    optim.add_argument("--bf16_weights", default="auto", choices=["auto", "yes", "no"],
                       help="the forward and backward use bf16 weights and gradients while AdamW keeps fp32 master "
                            "weights and fp32 moments (bf16_adamw.py): as many bytes as fp32 weights, but no casts "
                            "and bf16 activations, so faster and lighter on long clips. auto = yes on one GPU with "
                            "bf16 compute, except with LoRA; no = fp32 weights under bf16 autocast")
    optim.add_argument("--gradient_checkpointing", action="store_true",
                       help="recompute each layer's activations in the backward pass instead of storing them: "
                            "less memory for long clips or large batches, ~30%% more compute")

    lora_group = parser.add_argument_group("LoRA (train small adapters instead of every weight)")
    lora_group.add_argument("--lora_rank", type=int, default=0,
                            help="rank of LoRA adapters on the linear layers; 0 = full fine-tuning. 16-64 suit a voice")
    lora_group.add_argument("--lora_alpha", type=float, default=None, help="adapter scale numerator (default: 2 x rank)")
    lora_group.add_argument("--lora_dropout", type=float, default=0.0,
                            help="dropout on the adapters' input; 0 = none, as in peft. Above 0, --low_memory keeps the "
                                 "code predictor's activations instead of recomputing them")
    lora_group.add_argument("--lora_target_modules", default=None,
                            help="comma-separated linear layer names to adapt (default: every attention and MLP "
                                 "projection of the talker and code predictor)")

    run = parser.add_argument_group("run")
    run.add_argument("--mixed_precision", default="auto", choices=["auto", "bf16", "no"],
                     help="auto: bf16 autocast on a GPU that supports it (AdamW's weights and state stay fp32 unless --low_memory), "
                          "fp32 otherwise")
    run.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"],
                     help="attention kernels the model is loaded with; sdpa is PyTorch's own and needs no extra "
                          "package (flash_attention_2 needs flash-attn)")
    run.add_argument("--torch_compile", default="auto", choices=["auto", "layers", "no"],
                     help="torch.compile each transformer layer (fused kernels, less Python a step); auto = "
                          "layers on a GPU, except under FSDP (no). The first steps take about a minute longer")
    run.add_argument("--cuda_graphs", default="auto", choices=["auto", "yes", "no"],
                     help="replay each micro-batch's forward and backward as one recorded CUDA graph, one per "
                          "batch shape (cuda_graphs.py), and the --low_memory optimizer step as another: 1.7-2.4x "
                          "the speed of 1.7B at batch 4. auto = yes on one GPU, except with --gradient_checkpointing "
                          "or --train_speaker_encoder, and dropped where memory is short")
    run.add_argument("--logging_steps", type=int, default=10, help="log losses every this many optimizer steps")
    run.add_argument("--save_steps", type=int, default=4000,
                     help="write checkpoint-step-N every this many steps (0 = only per epoch)")
    run.add_argument("--eval_steps", type=int, default=2000,
                     help="eval loss every this many steps, and at the end (needs eval data)")
    run.add_argument("--save_total_limit", type=int, default=2,
                     help="keep only N checkpoints: the newest, and the best by --metric_for_best_model counted "
                          "among them "
                          "(0 = keep all); the banner says what they take on disk")
    run.add_argument("--save_dtype", default="bfloat16", choices=["bfloat16", "float32"],
                     help="dtype of the exported model.safetensors")
    run.add_argument("--resume_from_checkpoint", default=None,
                     help="a checkpoint folder, or 'latest' for the newest in --output_model_path")
    run.add_argument("--allow_schedule_change", action="store_true",
                     help="let a resume change --num_epochs, --max_steps, --warmup_steps, --lr or --lr_scheduler: "
                          "the rest of the run then follows the new schedule from the checkpoint's step (refused "
                          "without it: the learning rate would jump)")
    run.add_argument("--overwrite_output_dir", action="store_true",
                     help="delete the checkpoints, tracker logs and loss curve already in --output_model_path "
                          "(each named as it goes) and start over")
    run.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "none"],
                     help="tracker for losses and learning rate (written under --output_model_path/logs, a "
                          "folder per run; a resume writes on in its run's folder)")
    run.add_argument("--num_workers", type=int, default=2, help="data loader worker processes")
    run.add_argument("--group_by_length", action="store_true", default=True,
                     help="put clips of similar length in the same micro-batch (less padding, same randomness per step)")
    run.add_argument("--no_group_by_length", action="store_false", dest="group_by_length",
                     help="micro-batches of clips in plain random order (default: off: grouped)")

    listen = parser.add_argument_group("listening (checkpoints chosen by what they sound like; README_CHATTERBOX_STYLE.md)")
    listen.add_argument("--eval_generate_steps", type=int, default=None, metavar="N",
                        help="every N steps and at the end, speak the eval sentences in every new voice, greedily, "
                             "in each trained text layout, with the weights as they stand, and measure them as "
                             "infer_test.py does (scores.jsonl, the tracker's scalars and audio). 0: never; unset "
                             "(None): with each eval loss (--eval_steps and the end), so only with eval data")
    listen.add_argument("--eval_sentences", default=None, metavar="FILE",
                        help="UTF-8 file of sentences to speak, one a line (default: 4 built-in ones in each voice's "
                             "language: a very short line, numbers, a question, a long line)")
    listen.add_argument("--eval_max_new_tokens", type=int, default=0,
                        help="frame cap of that speech (12.5 a second); 0: the longest sentence at a third of the "
                             "voice's training speaking rate, plus 2 s (slower speech fails the rate check anyway)")
    listen.add_argument("--asr_model", default=None, metavar="PATH",
                        help="local transformers speech-recognition model folder: adds the character error rate")
    listen.add_argument("--metric_for_best_model", default="eval_loss",
                        choices=["eval_loss", "speaker_similarity", "listening_score"],
                        help="what ranks the evaluations; the best one's checkpoint is kept by --save_total_limit. "
                             "eval_loss: lowest; speaker_similarity: highest worst-voice similarity; listening_score: "
                             "highest combined score (similarity x pace x (1 - CER) x share of clean sentences). Both "
                             "listening metrics rank an evaluation where a sentence did not stop below all others")
    listen.add_argument("--load_best_model_at_end", action="store_true",
                        help="the run's result is its best checkpoint: each new best is saved (even between "
                             "--save_steps), output/best links to it, and the summary names it")

    data = parser.add_argument_group("data checks")
    data.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping bad rows")
    data.add_argument("--max_bad_fraction", type=float, default=0.01,
                      help="stop if more than this fraction of rows are bad")
    data.add_argument("--max_audio_seconds", type=float, default=30.0,
                      help="drop clips longer than this (memory grows with length; 0 = no limit)")
    data.add_argument("--max_text_tokens", type=int, default=0, help="drop clips whose prompt is longer (0 = no limit)")
    data.add_argument("--max_nonfinite_steps", type=int, default=5,
                      help="stop after this many optimizer steps in a row with a non-finite loss or gradient")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    # The replay flags shape the replay set, which only --replay_speakers makes: alone they would be ignored.
    ignored = [f"--{name} {getattr(args, name)}" for name in ("replay_ratio", "replay_languages", "replay_max_seconds")
               if getattr(args, name) != parser.get_default(name)]
    if ignored and not args.replay_speakers:
        parser.error(f"{', '.join(ignored)}: nothing is rehearsed without --replay_speakers NAMES|all (the kept "
                     f"speakers to rehearse)")
    # Likewise --eval_steps without eval data: nothing would be evaluated, and nothing said.
    if args.eval_steps != parser.get_default("eval_steps") and not (args.eval_split or args.eval_jsonl):
        parser.error(f"--eval_steps {args.eval_steps}: there is no eval data to evaluate: give --eval_split (0.05 "
                     f"holds out 5% of the clips) or --eval_jsonl FILE")
    return args


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
        problems.append(missing_model_problem(Path(args.init_model_path)))
    for flag, value in (("--train_jsonl", args.train_jsonl), ("--eval_jsonl", args.eval_jsonl)):
        if value and not Path(value).is_file():
            problems.append(f"{flag} {value}: " + ("a folder, not a JSONL file" if Path(value).is_dir() else
                                                   "file not found"))
    problems += output_folder_problems(Path(args.init_model_path), Path(args.output_model_path))
    if args.num_workers < 0:
        problems.append("--num_workers must not be negative (0: load data in the main process)")
    if args.code_predictor_loss_weight < 0:
        problems.append("--code_predictor_loss_weight must not be negative")
    if args.lora_rank < 0:
        problems.append("--lora_rank must not be negative (0: full fine-tuning)")
    if args.lora_rank and args.lora_alpha is not None and args.lora_alpha <= 0:
        problems.append("--lora_alpha must be positive: the adapters' output is scaled by alpha / rank")
    if not 0 <= args.lora_dropout < 1:
        problems.append("--lora_dropout must be in [0, 1)")
    # Without --lora_rank they would go unused, and the run would fine-tune every weight unasked.
    lora_only = [f"--{name}" for name in ("lora_alpha", "lora_dropout", "lora_target_modules") if getattr(args, name)]
    if lora_only and not args.lora_rank:
        problems.append(f"{', '.join(lora_only)} without --lora_rank, which turns LoRA on (0, the default, fine-tunes "
                        f"every weight): give --lora_rank N (16-64 suit a voice), or drop them")
    if args.speaker_encoder_from and not Path(args.speaker_encoder_from).is_dir():
        problems.append(f"--speaker_encoder_from {args.speaker_encoder_from}: no such folder")
    if not 0 <= args.replay_ratio < 1:
        problems.append("--replay_ratio must be in [0, 1)")
    if args.replay_max_seconds <= 0:
        problems.append("--replay_max_seconds must be positive")
    problems += listening_problems(args)
    if problems:
        raise SystemExit("error: " + "\n       ".join(problems))
    return args


def listening_problems(args) -> list:
    """The listening flags that cannot work together (see the "listening" group)."""
    problems = []
    eval_data = bool(args.eval_jsonl or args.eval_split)
    every = args.eval_generate_steps
    listening = bool(every) or (every is None and eval_data)
    if every is not None and every < 0:
        problems.append("--eval_generate_steps must not be negative (0: never)")
    if args.eval_max_new_tokens and args.eval_max_new_tokens < 3:
        problems.append("--eval_max_new_tokens must be at least 3: generation makes at least 2 frames")
    if args.eval_sentences:
        path = Path(args.eval_sentences)
        if not path.is_file():
            problems.append(f"--eval_sentences {path}: file not found")
        else:  # read as the listening steps will, before the model loads rather than after
            from qwen3_tts_sft.listening import sentences_in_file

            try:
                sentences_in_file(path)
            except ValueError as problem:
                problems.append(f"--eval_sentences {path}: {problem}")
    if args.asr_model:  # before the model loads, not at the first evaluation's load of the recogniser
        from qwen3_tts_sft.transcription import model_problem

        problem = model_problem(args.asr_model)
        if problem:
            problems.append(f"--asr_model {args.asr_model}: {problem}")
    unused = [flag for flag, given in (("--eval_sentences", args.eval_sentences), ("--asr_model", args.asr_model),
                                       ("--eval_max_new_tokens", args.eval_max_new_tokens)) if given]
    why_not = ("--eval_generate_steps 0" if every == 0 else
               "no eval data (--eval_jsonl or --eval_split) and no --eval_generate_steps N")
    if unused and not listening:
        problems.append(f"{', '.join(unused)}: nothing is spoken with {why_not}")
    if args.metric_for_best_model != "eval_loss" and not listening:
        problems.append(f"--metric_for_best_model {args.metric_for_best_model} is measured by speaking, and nothing "
                        f"is spoken with {why_not}")
    if args.metric_for_best_model == "eval_loss" and args.load_best_model_at_end and not eval_data:
        problems.append("--load_best_model_at_end with --metric_for_best_model eval_loss needs eval data "
                        "(--eval_jsonl or --eval_split)")
    return problems


def output_folder_problems(init_model: Path, output: Path) -> list:
    """An --output_model_path that cannot hold checkpoints, or that would swallow the starting model
    (--overwrite_output_dir deletes the checkpoints in it) or be copied into every checkpoint of itself
    (each checkpoint carries the starting model's folder)."""
    init_model, output = init_model.resolve(), output.resolve()
    existing = next((path for path in [output, *output.parents] if path.exists()), None)
    if existing is not None and not existing.is_dir():
        return [f"--output_model_path {output}: {existing} is a file, not a folder"]
    if init_model == output or output in init_model.parents:
        return [f"--init_model_path {init_model} is, or lies inside, --output_model_path {output}, where this run's "
                f"checkpoints go (and --overwrite_output_dir would delete it): choose another --output_model_path"]
    if init_model in output.parents:
        return [f"--output_model_path {output} lies inside --init_model_path {init_model}, which every checkpoint "
                f"copies: choose an --output_model_path outside it"]
    return []


def missing_model_problem(path: Path) -> str:
    """What to pass instead of an --init_model_path without config.json."""
    from qwen3_tts_sft import checkpoint  # imports torch: only on this mistake

    if not path.exists():
        return f"--init_model_path {path}: no such folder" + checkpoint.hub_download_hint(path)
    if not any(path.glob("checkpoint-*")):
        return f"--init_model_path {path}: no config.json there (is it a downloaded model folder?)"

    found = checkpoint.list_checkpoints(path)
    if not found:
        return f"--init_model_path {path} is a training output folder, not a model: pass the Base model to fine-tune"
    base = checkpoint.read_trainer_state(found[-1]).flags.get("init_model_path")
    return (f"--init_model_path {path} is a training output folder (it holds {', '.join(f.name for f in found)}), "
            f"not a model. To fine-tune, pass the Base model" + (f" (that run started from {base})" if base else "")
            + f"; to continue that run, --output_model_path {path} --resume_from_checkpoint latest; to speak with "
            f"its newest checkpoint, python infer_test.py --model_path {found[-1]}")


# ---------------------------------------------------------------------------------------------
# main: set up, train, finish
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    with StopAtOnce():  # first: the imports below take seconds
        args = check_args(parse_args(argv))
        from qwen3_tts_sft.training_setup import AlreadyFinished, build_run, free_memory  # quietly imports qwen_tts

        try:
            run = build_run(args)
        except AlreadyFinished:  # a resume of a run that has nothing left to train (it said so)
            return
    output_dir = Path(args.output_model_path)
    try:
        run.accelerator.print(run.banner())
        with StopRequest(output_dir) as stop_request:
            finished = train(run, stop_request)
        with StopNow(output_dir):  # the state is saved: a signal now stops at once, without a traceback
            if finished:
                run.finish()
    finally:
        with StopNow(output_dir):
            del run
            free_memory()
    if not finished:
        # Saved but not done: exit as a job killed by the signal would, so that whatever retries failed
        # jobs (a requeue script, Kubernetes, AWS Batch, `set -e`) runs it again; 0 reads as finished.
        raise SystemExit(stop_request.exit_status)


def train(run, stop_request) -> bool:
    """The loop: one iteration is one optimizer step over batch x accumulation x processes clips.
    Returns False when a stop signal ended the run early (its state saved)."""
    from tqdm.auto import tqdm

    args, accelerator, progress = run.args, run.accelerator, run.progress
    bar = tqdm(total=run.total_steps, initial=progress.step, desc="training", unit="step", dynamic_ncols=True,
               disable=None if accelerator.is_main_process else True)
    # No terminal (output to a log file): tqdm hides its bar, so the run writes progress lines instead.
    progress_lines = accelerator.is_main_process and bar.disable
    for step in run.steps():
        stop_asked = run.optimizer_step(step, stop_request.asked)
        bar.update(1)
        bar.set_postfix_str(run.postfix())

        number, last_step = progress.step, progress.step >= run.total_steps
        if number % args.logging_steps == 0 or last_step:
            run.log_training()
        if run.evaluation_due(last_step):
            run.evaluate(last_step)  # eval loss, and speaking with the weights as they stand
        if step.ends_epoch:
            run.save(f"checkpoint-epoch-{step.epoch}")
        elif last_step or stop_asked or run.best_unsaved or (args.save_steps and number % args.save_steps == 0 and
                                                             not progress.nonfinite_in_a_row):  # keep the last good one
            run.save(f"checkpoint-step-{number}")
        if progress_lines:
            run.write_progress()
        if stop_asked:
            bar.close()
            accelerator.print(f"stopped by {stop_request.signal_name} at step {number}; the state is saved. "
                              f"Continue with --resume_from_checkpoint latest (exit status "
                              f"{stop_request.exit_status}: not finished)")
            accelerator.end_training()
            return False
    bar.close()
    return True


class StopSignals:
    """Inside a `with` block, the stop signals (SIGTERM and SIGUSR1, which schedulers send before
    preemption or a time limit, and Ctrl-C's SIGINT) go to self.handle, whether they are sent to this
    process or to the whole job (the data workers leave them to this process:
    training_run.leave_stop_signals_to_main). The earlier handlers are
    back afterwards, for whatever else runs in this process (tests, a notebook)."""

    def __init__(self):
        self.earlier_handlers = {signum: signal.signal(signum, self.handle) for signum in STOP_SIGNALS}

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        for signum, handler in self.earlier_handlers.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python

    def handle(self, signum, frame):
        raise NotImplementedError


class StopAtOnce(StopSignals):
    """While the run is being set up there is nothing to save: stop at once and say so, with the usual
    exit status (128 + the signal), instead of dying silently (SIGTERM) or with a traceback (Ctrl-C)."""

    def handle(self, signum, frame):
        print(f"stopped by {signal.Signals(signum).name} while setting up, before the first step: nothing was "
              f"trained or saved", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)


class StopNow(StopSignals):
    """Stop at once, in one line naming the checkpoint the run can resume from (found in `output_dir`),
    with 128 + the signal: after the training loop (its state is saved), and for StopRequest's second
    signal."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        super().__init__()

    def handle(self, signum, frame):
        from qwen3_tts_sft import checkpoint  # imported already: costs nothing here

        latest = checkpoint.latest_checkpoint(self.output_dir)
        print(f"stopped at once by {signal.Signals(signum).name}: nothing was saved beyond "
              + (f"the last checkpoint, {latest}" if latest else "the start (no checkpoint yet)")
              + ". Continue with --resume_from_checkpoint latest", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)


class StopRequest(StopNow):
    """Turns a stop signal into a save-and-exit at the next step; a second one stops at once."""

    def __init__(self, output_dir: Path):
        self.signal_name = self.signum = None
        super().__init__(output_dir)

    def handle(self, signum, frame):
        if self.signal_name is not None:  # a second signal: stop now
            super().handle(signum, frame)
        self.signal_name, self.signum = signal.Signals(signum).name, signum

    @property
    def asked(self) -> bool:
        return self.signal_name is not None

    @property
    def exit_status(self) -> int:
        """128 + the signal, as a job killed by it; SIGTERM's where another process got it (the stop is
        agreed by all processes at each step)."""
        return 128 + (self.signum or signal.SIGTERM)


if __name__ == "__main__":
    main()
