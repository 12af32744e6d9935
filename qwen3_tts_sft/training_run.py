"""A run ready to train (built by training_setup.build_run): its state, and what it does.

It owns the progress; hands out each optimizer step's micro-batches (`steps()`); takes the step
(`optimizer_step`); logs, evaluates, saves checkpoints and sums up at the end. The trainer's loop
(sft_12hz_chatterbox.train), bench/bench.py and the tests drive it.
"""

import contextlib
import functools
import math
import os
import shlex
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qwen3_tts_sft import checkpoint, scoring, voices
from qwen3_tts_sft.bf16_adamw import Bf16WeightsAdamW
from qwen3_tts_sft.checkpoint import TrainerState
from qwen3_tts_sft.cuda_graphs import MicroBatchGraphs, forward_backward
from qwen3_tts_sft.sequence_layout import collate
from qwen3_tts_sft.stop_signals import STOP_SIGNALS
from qwen3_tts_sft.training_data import EpochPlan, StepTargets, plan_epoch

# What that takes is on Linux; elsewhere (macOS, Windows) the workers keep torch's own handling.
WORKERS_CAN_LEAVE_STOPS = hasattr(signal, "sigwaitinfo")

LOSS_CURVE = "loss_curve.png"  # in the output folder, drawn at the end
# Without a terminal (output to a log file) tqdm hides its bar: a progress line at least this often.
PROGRESS_LINE_SECONDS = 30


@dataclass
class PlannedStep:
    """One optimizer step's work: this process's micro-batches, and what the whole step predicts."""
    micro_batches: list    # collated TalkerBatch, on the host
    targets: StepTargets   # over all micro-batches of all processes: the loss normalisation
    epoch: int
    ends_epoch: bool


class TrainingRun:
    def __init__(self, args, settings, accelerator, train_set, eval_set, speaker_table, replay_set=None,
                 listener=None):
        self.args = args              # the flags as given; read, never changed
        self.settings = settings      # what they mean on this machine (training_setup.Settings)
        self.accelerator = accelerator
        self.device = accelerator.device
        self.train_set = train_set
        self.eval_set = eval_set
        self.speaker_table = speaker_table  # the new speakers, then the starting model's own (voices.py)
        self.replay_set = replay_set        # replay.ReplaySet, or None
        self.listener = listener            # scoring.Listener on the main process of a listening run, else None
        self.output_dir = Path(args.output_model_path)
        self.output_lock = None             # the main process's hold on output_dir (checkpoint.lock_output_dir)
        self.first_plan = self.plan(epoch=0)
        self.steps_per_epoch = len(self.first_plan.steps)
        self.total_steps = min(args.max_steps or math.inf, self.steps_per_epoch * args.num_epochs)

    def start(self, train_module, optimizer, scheduler, progress):
        """Take the prepared module, optimizer and schedule, and the progress to continue from."""
        self.train_module = train_module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.progress = progress
        self.trainable = [p for p in train_module.parameters() if p.requires_grad]  # what the step clips
        # Bf16WeightsAdamW scales (and zeroes) the gradients inside its update, sparing passes over
        # them; with several processes the gradients are left to accelerate, which knows how they are split.
        update = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        self.clipping_update = (update if isinstance(update, Bf16WeightsAdamW) and self.accelerator.num_processes == 1
                                else None)
        self.graphs = None
        if self.settings.cuda_graphs:
            self.graphs = MicroBatchGraphs(train_module, self.trainable, self.accelerator.backward,
                                           check_memory=self.settings.drop_graphs_when_short)
        self.last_checkpoint = None
        self.last_lr = self.last_loss = float("nan")
        self.checkpoint_bytes = checkpoint.checkpoint_bytes(self.accelerator.unwrap_model(train_module),
                                                            self.settings.weights, self.settings.save_dtype,
                                                            Path(self.args.init_model_path))
        self.started = self.last_line_at = time.perf_counter()
        self.start_step = progress.step
        self.clips_this_run = 0
        self.reset_interval()
        if progress.evaluations:  # a resume: its checkpoint's history, ranked by this run's metric
            self.rank_evaluations()
            if self.accelerator.is_main_process:
                scoring.write_scores(self.output_dir, progress.evaluations)

    # -----------------------------------------------------------------------------------------
    # The data of each step
    # -----------------------------------------------------------------------------------------

    def plan(self, epoch: int) -> EpochPlan:
        args, accelerator = self.args, self.accelerator
        return plan_epoch(self.train_set, args.batch_size, args.gradient_accumulation_steps, accelerator.num_processes,
                          accelerator.process_index, args.seed, epoch, args.group_by_length)

    def micro_batch_loader(self, plan: EpochPlan, steps_done: int):
        """This process's micro-batches from step `steps_done` of the plan on, collated by workers, and
        padded to the plan's few batch shapes where CUDA graphs record one graph per shape."""
        batches = [batch for step in plan.micro_batches[steps_done:] for batch in step]
        shapes = plan.shapes if self.settings.cuda_graphs else None
        worker_start = functools.partial(leave_stop_signals_to_main, os.getpid()) if WORKERS_CAN_LEAVE_STOPS else None
        return torch.utils.data.DataLoader(
            self.train_set, batch_sampler=batches, collate_fn=functools.partial(collate, shapes=shapes),
            num_workers=self.args.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            # Its own random stream: creating a loader draws a seed, which would otherwise shift the
            # global stream (dropout's) between a resumed run and the uninterrupted one.
            generator=torch.Generator().manual_seed(self.args.seed),
            worker_init_fn=worker_start,
        )

    def steps(self):
        """The remaining optimizer steps of the run, each as a PlannedStep, from where the progress is."""
        progress = self.progress
        while progress.step < self.total_steps and progress.epoch < self.args.num_epochs:
            plan = self.first_plan if progress.epoch == 0 else self.plan(progress.epoch)
            with stop_signals_held():  # the workers start here
                micro_batches = iter(self.micro_batch_loader(plan, progress.steps_done_in_epoch))
            for index in range(progress.steps_done_in_epoch, len(plan.steps)):
                batches = [next(micro_batches) for _ in plan.micro_batches[index]]
                yield PlannedStep(batches, self.train_set.targets(plan.steps[index]), progress.epoch,
                                  ends_epoch=index == len(plan.steps) - 1)
                if progress.step >= self.total_steps:
                    return

    # -----------------------------------------------------------------------------------------
    # One optimizer step
    # -----------------------------------------------------------------------------------------

    def reset_interval(self):
        """Sums over the steps since the last log line, kept on the device until logged."""
        self.interval_loss_sums = torch.zeros(2, device=self.device)
        self.interval_targets = [0, 0]
        self.interval_clips = 0
        self.interval_start = time.perf_counter()
        self.last_grad_norm = float("nan")

    def optimizer_step(self, step: PlannedStep, stop_asked: bool) -> bool:
        """Forward and backward over this process's micro-batches of one step, then one update, and
        the progress moved on (the epoch too when the step ends it).

        Each loss is divided by the number of its targets in the whole step (all micro-batches, all
        processes), so the summed gradients equal those of one big batch. Returns whether a stop
        was asked on any process.
        """
        codec0_targets, code_predictor_targets = step.targets.codec0, step.targets.code_predictor
        weight = self.args.code_predictor_loss_weight
        # DDP averages gradients over processes; the losses are already global sums over targets.
        scale = self.accelerator.num_processes
        loss_weights = torch.tensor([scale / codec0_targets, scale * weight / code_predictor_targets]).to(self.device)
        step_sums = torch.zeros(2, device=self.device)
        for index, batch in enumerate(step.micro_batches):
            if self.graphs is not None:  # one process: no gradient sync to hold back
                step_sums += self.graphs.forward_backward(batch, loss_weights)
            else:
                last = index == len(step.micro_batches) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(self.train_module):
                    step_sums += forward_backward(self.train_module, batch.to(self.device), loss_weights,
                                                  self.accelerator.backward)

        max_norm = self.args.max_grad_norm or float("inf")
        if self.clipping_update is not None:
            grad_norm = self.clipping_update.clip_grad_norm_(max_norm)
        else:
            grad_norm = self.accelerator.clip_grad_norm_(self.trainable, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the norm as a distributed tensor
            grad_norm = grad_norm.full_tensor()
        # One host sync per step: is the update finite, did any process get a stop signal, and the
        # step's loss for the progress bar.
        status = torch.cat([torch.stack([grad_norm.detach().float() + step_sums.sum(),
                                         torch.tensor(float(stop_asked), device=self.device)]), step_sums])
        if self.accelerator.num_processes > 1:
            status = self.accelerator.reduce(status, "sum")
        health, stop, codec0_sum, code_predictor_sum = status.tolist()
        finite, stop = math.isfinite(health), stop > 0
        self.last_loss = codec0_sum / codec0_targets + weight * code_predictor_sum / code_predictor_targets

        progress = self.progress
        progress.step += 1
        progress.steps_done_in_epoch += 1
        if step.ends_epoch:
            progress.epoch += 1
            progress.steps_done_in_epoch = 0
        if finite:
            progress.highest_lr = max(progress.highest_lr, self.optimizer.param_groups[0]["lr"])
            self.optimizer.step()
            if self.graphs is not None:
                self.graphs.optimizer_has_stepped = True
            progress.nonfinite_in_a_row = 0
            self.interval_loss_sums += step_sums
            self.interval_targets[0] += codec0_targets
            self.interval_targets[1] += code_predictor_targets
            self.last_grad_norm = grad_norm
        else:
            progress.nonfinite_in_a_row += 1
            self.accelerator.print(f"\nstep {progress.step}: non-finite loss or gradient; update skipped")
            if progress.nonfinite_in_a_row >= self.args.max_nonfinite_steps:
                last = self.last_checkpoint or "none yet"
                raise SystemExit(f"error: {progress.nonfinite_in_a_row} steps in a row had a non-finite loss or "
                                 f"gradient; stopping. Last good checkpoint: {last}. Try a lower --lr.")
        self.last_lr = self.scheduler.get_last_lr()[0]  # the rate this step's update used
        self.scheduler.step()
        # The CUDA graphs write into the gradient tensors they recorded: keep them, zeroed (an
        # update of Bf16WeightsAdamW has zeroed them already).
        if not (finite and self.clipping_update is not None and self.clipping_update.zero_grads):
            self.optimizer.zero_grad(set_to_none=self.graphs is None)
        self.interval_clips += step.targets.clips
        self.clips_this_run += step.targets.clips
        return stop

    @property
    def finished(self) -> bool:
        return self.progress.step >= self.total_steps or self.progress.epoch >= self.args.num_epochs

    def postfix(self) -> str:
        return f"loss {self.last_loss:.3f}, lr {self.last_lr:.2e}"

    def highest_lr(self, steps: int) -> float:
        """The highest rate the first `steps` updates use. Every schedule here rises through the
        warmup and then falls or stays, so it is the rate of the last warmup update they reach."""
        schedule = self.scheduler.scheduler  # accelerate's wrapper holds the LambdaLR
        return self.args.lr * schedule.lr_lambdas[0](min(self.args.warmup_steps, max(steps - 1, 0)))

    def highest_lr_used(self) -> float:
        """The highest rate the run's updates used, over its resumes (recorded at each update; from a
        checkpoint written before that record, its earlier updates as logged)."""
        earlier = [entry["train/lr"] for entry in self.progress.log_history
                   if "train/lr" in entry and entry["step"] <= self.start_step]
        return max([self.progress.highest_lr] + earlier)

    def warmup_warning(self) -> str:
        """A warning when the warmup takes more than half the run: the rate then stays far below --lr."""
        args, steps = self.args, self.total_steps
        if args.warmup_steps <= steps / 2:
            return ""
        peak = self.highest_lr(steps)
        if peak < args.lr:
            effect = f"the learning rate never gets above {peak:.3g} (--lr {args.lr:g}) and the run learns little"
        else:
            effect = f"the learning rate reaches --lr {args.lr:g} only at step {args.warmup_steps + 1}"
        # Any warmup makes the first update's rate 0: below 2 steps of it, none at all is better.
        suggested = f"--warmup_steps {steps // 10} here" if steps // 10 >= 2 else \
            "--warmup_steps 0 here: any warmup makes the first update's rate 0"
        return (f"  warning: --warmup_steps {args.warmup_steps} covers more than half of the {steps} optimizer "
                f"steps: {effect}. Warm up over about 5-10% of the steps ({suggested}), or train for more steps.")

    def elapsed_and_eta(self) -> str:
        elapsed = time.perf_counter() - self.started
        done, left = self.progress.step - self.start_step, self.total_steps - self.progress.step
        eta = tqdm.format_interval(elapsed / done * left) if done else "?"
        return f"{tqdm.format_interval(elapsed)} elapsed, ETA {eta}"

    def write_progress(self):
        """A progress line, unless one was written less than PROGRESS_LINE_SECONDS ago."""
        if time.perf_counter() - self.last_line_at >= PROGRESS_LINE_SECONDS:
            rate = self.clips_this_run / (time.perf_counter() - self.started)
            self.write_line(f"train step {self.progress.step}/{self.total_steps}: {rate:.1f} clips/s, "
                            f"{self.elapsed_and_eta()}")

    def write_line(self, line: str):
        tqdm.write(line)  # above the progress bar, when there is one
        self.last_line_at = time.perf_counter()

    # -----------------------------------------------------------------------------------------
    # Logging and eval
    # -----------------------------------------------------------------------------------------

    def log_training(self):
        codec0_targets, code_predictor_targets = self.interval_targets
        if not codec0_targets:
            return
        sums = self.interval_loss_sums
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, "sum")
        seconds = time.perf_counter() - self.interval_start
        codec0, code_predictor = (sums[0] / codec0_targets).item(), (sums[1] / code_predictor_targets).item()
        values = {
            "train/loss": codec0 + self.args.code_predictor_loss_weight * code_predictor,
            "train/codec0_loss": codec0,
            "train/code_predictor_loss": code_predictor,
            "train/lr": self.last_lr,
            "train/grad_norm": float(self.last_grad_norm),
            "train/samples_per_second": self.interval_clips / seconds,
        }
        if self.device.type == "cuda":  # the largest over the processes: the GPU that runs out first
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 1e9], device=self.device)
            values["train/gpu_memory_peak_gb"] = self.accelerator.gather(peak).max().item()
        self.report(values)
        self.reset_interval()

    def due(self, every: int, last_step: bool) -> bool:
        return last_step or bool(every) and self.progress.step % every == 0

    def evaluation_due(self, last_step: bool) -> bool:
        return self.loss_due(last_step) or self.listening_due(last_step)

    def loss_due(self, last_step: bool) -> bool:
        return self.eval_set is not None and self.due(self.args.eval_steps, last_step)

    def listening_due(self, last_step: bool) -> bool:
        return self.settings.listening and self.due(self.settings.listen_steps, last_step)

    def evaluate(self, last_step: bool = False):
        """The evaluations due at this step: the eval loss (mean per target, group 0 and code predictor
        separately, over the whole eval set) and listening (scoring.py). Each is an entry of the
        progress's evaluations, ranked by --metric_for_best_model."""
        progress = self.progress
        entry = dict(step=progress.step, eval_loss=None, checkpoint=None)
        if self.loss_due(last_step):
            codec0, code_predictor = self.teacher_forced_losses(self.eval_set, range(len(self.eval_set)))
            loss = codec0 + self.args.code_predictor_loss_weight * code_predictor
            if progress.best_eval_loss is None or loss < progress.best_eval_loss:
                progress.best_eval_loss, progress.best_eval_step = loss, progress.step
            self.report({"eval/loss": loss, "eval/codec0_loss": codec0, "eval/code_predictor_loss": code_predictor})
            entry["eval_loss"] = loss
        if self.listening_due(last_step):
            entry.update(self.listen())
        progress.evaluations.append(entry)
        self.rank_evaluations()
        if self.accelerator.is_main_process:
            scoring.write_scores(self.output_dir, progress.evaluations)

    def rank_evaluations(self, saving: str = None):
        """progress.best_step: the best evaluation by --metric_for_best_model whose weights can still be
        had (a resume under another metric may favour one whose checkpoint --save_total_limit removed
        under the old one; evaluations between saves have none, and rank as before).
        progress.best_checkpoint, which --save_total_limit keeps: the best of the saved ones. When the
        best evaluation fell between saves, that is the best saved since, not an older one it beat.
        `saving`: the checkpoint being written, counted as on hand."""
        progress, metric = self.progress, self.args.metric_for_best_model
        on_hand = [entry for entry in progress.evaluations if not entry["checkpoint"] or entry["checkpoint"] == saving
                   or (self.output_dir / entry["checkpoint"]).is_dir()]
        best = scoring.choose_best(on_hand, metric)
        if best is not None:
            progress.best_step = best["step"]
        best_saved = scoring.choose_best([entry for entry in on_hand if entry["checkpoint"]], metric)
        # None when none is on hand: a run branched off into another folder has none of the old one's checkpoints.
        progress.best_checkpoint = best_saved["checkpoint"] if best_saved is not None else None

    def listen(self) -> dict:
        """Speak and measure with the weights as they stand (scoring.listen) on the main process, log
        it there; every process gets the measures, the others waiting meanwhile."""
        measured = [None]
        if self.accelerator.is_main_process:
            measured[0], wavs = scoring.listen(self)
            scoring.log_listening(self, measured[0], wavs)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(measured)
        return measured[0]

    @property
    def best_unsaved(self) -> bool:
        """--load_best_model_at_end and this step's evaluation is the new best: it must be saved."""
        entry = self.progress.evaluations[-1] if self.progress.evaluations else None
        return bool(self.args.load_best_model_at_end and entry is not None and entry["step"] == self.progress.step
                    and self.progress.best_step == self.progress.step and entry["checkpoint"] is None)

    def teacher_forced_losses(self, dataset, indices) -> tuple:
        """(group 0, code predictor): mean loss per target over these examples of `dataset`, as the
        training forward computes it (no update). Every process takes part, each with its share."""
        module = self.train_module
        module.eval()
        order = sorted(indices, key=dataset.length)
        batches = [order[i:i + self.args.batch_size] for i in range(0, len(order), self.args.batch_size)]
        mine = batches[self.accelerator.process_index::self.accelerator.num_processes]
        sums = torch.zeros(4, device=self.device)
        with torch.no_grad():
            for batch_indices in mine:
                out = module(collate([dataset[i] for i in batch_indices]).to(self.device))
                targets = dataset.targets(batch_indices)
                sums += torch.stack([out.codec0_loss_sum, out.code_predictor_loss_sum,
                                     torch.tensor(float(targets.codec0), device=self.device),
                                     torch.tensor(float(targets.code_predictor), device=self.device)])
        module.train()
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, "sum")
        return (sums[0] / sums[2]).item(), (sums[1] / sums[3]).item()

    def report(self, values: dict):
        """Log `values` to the tracker and the history, and print them as one line: train/ or eval/
        values (train/loss ...) labelled as such, per-speaker ones (train/NAME/loss, replay/NAME/loss
        of voices.py) as voice losses."""
        step = self.progress.step
        self.accelerator.log(values, step=step)
        self.progress.log_history.append(dict(step=step, **values))
        if not self.accelerator.is_main_process:
            return
        if any(key.count("/") > 1 for key in values):
            self.write_line(f"voice losses at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
            return
        numbers = ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in values.items())
        if next(iter(values)).startswith("eval/"):
            self.write_line(f"eval step {step}: {numbers}")
        else:
            self.write_line(f"train step {step}/{self.total_steps}: {numbers} ({self.elapsed_and_eta()})")

    # -----------------------------------------------------------------------------------------
    # Checkpoints and the end
    # -----------------------------------------------------------------------------------------

    def save(self, name: str):
        """Write checkpoint `name` (checkpoint.save), then keep only the newest --save_total_limit."""
        progress, final = self.progress, self.output_dir / name
        for entry in progress.evaluations:
            if entry["step"] == progress.step:
                entry["checkpoint"] = name
        if progress.evaluations:
            self.rank_evaluations(saving=name)
        state = TrainerState(progress, checkpoint=name, total_steps=self.total_steps,
                             flags=checkpoint.recorded_flags(self.args), versions=self.settings.versions,
                             num_processes=self.accelerator.num_processes, weights=self.settings.weights.name,
                             train_data_sha256=self.settings.train_data.sha256,
                             eval_data_sha256=self.settings.eval_data,
                             speakers=[s.as_json() for s in self.speaker_table if not s.kept],
                             kept_speakers=[s.as_json() for s in self.speaker_table if s.kept])
        checkpoint.save(self.accelerator, self.train_module, final, Path(self.args.init_model_path),
                        self.speaker_table, state, self.settings.save_dtype, self.checkpoint_bytes,
                        master_weights=self.master_weights())
        if self.accelerator.is_main_process:
            if self.args.save_total_limit:
                protect = {progress.best_checkpoint} if progress.best_checkpoint else set()
                for folder in checkpoint.remove_old_checkpoints(self.output_dir, self.args.save_total_limit, protect):
                    tqdm.write(f"removed old checkpoint {folder}")
            if progress.evaluations:
                scoring.write_scores(self.output_dir, progress.evaluations)  # with the checkpoint's name
            # A best/ made before a resume without --load_best_model_at_end follows the kept best too: left
            # alone, it would point at a checkpoint --save_total_limit removes once a better one comes.
            if progress.best_checkpoint and (self.args.load_best_model_at_end
                                             or (self.output_dir / scoring.BEST_LINK).is_symlink()):
                scoring.link_best(self.output_dir, progress.best_checkpoint)
            tqdm.write(f"saved {final}")
        self.last_checkpoint = final

    def master_weights(self) -> dict:
        """The optimizer's fp32 master copy of each bf16 weight, by name (none without them, or
        before the first update)."""
        state = getattr(self.optimizer, "optimizer", self.optimizer).state  # accelerate wraps the optimizer
        module = self.accelerator.unwrap_model(self.train_module)
        return {name: state[weight]["master"] for name, weight in module.named_parameters()
                if "master" in state.get(weight, {})}

    def banner(self) -> str:
        """What will happen, said before step 1."""
        args, accelerator, settings = self.args, self.accelerator, self.settings
        module = accelerator.unwrap_model(self.train_module)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
        clips_per_step = args.batch_size * args.gradient_accumulation_steps * accelerator.num_processes
        peak_lr = self.highest_lr(self.total_steps)
        lines = [
            "***** Running training *****",
            f"  clips: {len(self.train_set.clips)} train"
            + (f", {len(self.eval_set.clips)} eval" if self.eval_set else ", no eval data")
            + f"; text layout {args.text_layout}"
            + (" (each clip in both: twice the examples)" if len(settings.layouts) > 1 else ""),
            "  speakers: " + ", ".join(f"{s.name} (codec id {s.codec_id}, {len(s.reference_audio)} reference clips)"
                                        for s in self.speaker_table if not s.kept),
            f"  batch: {args.batch_size} per process x {args.gradient_accumulation_steps} accumulation x "
            f"{accelerator.num_processes} processes = {clips_per_step} clips per step"
            + (f"; note: the {len(self.train_set.clips)} training clips fill less than one step, so each epoch is "
               f"one smaller step" if clips_per_step > len(self.train_set.clips) * len(settings.layouts) else ""),
            f"  steps: {self.steps_per_epoch} per epoch x {args.num_epochs} epochs -> {self.total_steps} optimizer "
            f"steps, {args.warmup_steps} warmup, {args.lr_scheduler} schedule, peak lr "
            f"{peak_lr:.3g}" + (f" (--lr {args.lr:g})" if peak_lr < args.lr else "")
            + (f"; --max_steps {args.max_steps} is more than {args.num_epochs} epochs hold: raise --num_epochs to "
               f"train that long" if args.max_steps > self.steps_per_epoch * args.num_epochs else ""),
            f"  parameters: {parameter_count(trainable)} trainable, {parameter_count(frozen)} frozen "
            + (f"(LoRA rank {args.lora_rank} adapters, merged into each checkpoint; " if args.lora_rank else "(")
            + f"speaker encoder {'trained' if args.train_speaker_encoder else 'frozen'}, "
            f"text embedding {'trained' if args.train_text_embedding else 'frozen'})",
            "  precision: " + settings.weights.description
            + f", compute {'bf16 autocast' if settings.mixed_precision == 'bf16' else 'fp32'}"
            + (", gradient checkpointing" if args.gradient_checkpointing else "")
            + f", torch.compile: {settings.torch_compile}"
            + (", CUDA graphs" if self.graphs is not None else ""),
            f"  checkpoints: {self.output_dir}/checkpoint-epoch-N"
            + (f" and every {args.save_steps} steps" if args.save_steps else "")
            + f", about {gigabytes(self.checkpoint_bytes)} each; "
            + self.kept_checkpoints(),
        ]
        if settings.listening:
            lines.append(self.listening_line())
        if self.warmup_warning():
            lines.append(self.warmup_warning())
        if self.first_plan.dropped:
            lines.append(f"  {self.first_plan.dropped} clips per epoch left out: too few to give every process "
                         f"a micro-batch")
        if settings.resume_dir is not None:
            lines.append(f"  resumed from {settings.resume_dir} at step {self.progress.step} (epoch "
                         f"{self.progress.epoch}, step {self.progress.steps_done_in_epoch} of it)")
        elif args.resume_from_checkpoint == "latest":  # in the banner: a mistyped folder starts over unseen
            lines.append(f"  resume: no checkpoint in {self.output_dir}, so a new run from step 0; to continue "
                         f"one, give its --output_model_path")
        lines += voices.banner_lines(self)
        return "\n".join(lines)

    def kept_checkpoints(self) -> str:
        """What --save_total_limit keeps, and the most the checkpoints take on disk while the next is written."""
        args, limit = self.args, self.args.save_total_limit
        if not limit:
            return "--save_total_limit 0 keeps them all"
        # Said, or --eval_steps and the metric would pass unnoticed. The listening metrics need listening
        # (refused without it); the eval loss needs eval data.
        if self.eval_set is None and args.metric_for_best_model == "eval_loss":
            kept, text = limit, (f"--save_total_limit {limit} keeps the newest {limit}, and no best: "
                                 f"--metric_for_best_model eval_loss needs eval data (--eval_split or --eval_jsonl)")
        elif limit == 1:  # the newest always stays (a run resumes from it): an older best is kept beside it
            kept, text = 2, ("--save_total_limit 1 keeps the newest, and the best by --metric_for_best_model beside "
                             "it when that is an older one")
        else:
            kept, text = limit, (f"--save_total_limit {limit} keeps the newest {limit}, the best by "
                                 f"--metric_for_best_model counted among them")
        return f"{text}: up to {gigabytes(self.checkpoint_bytes * (kept + 1))} while the next is written (0 keeps all)"

    def listening_line(self) -> str:
        args, settings = self.args, self.settings
        when = f"every {settings.listen_steps} steps and at the end" if settings.listen_steps else "at the end"
        new_voices = [speaker for speaker in self.speaker_table if not speaker.kept]
        count = f"{self.listener.sentences} sentences" if self.listener else "sentences"
        voice_count, layout_count = len(new_voices), len(settings.layouts)
        return (f"  listening: {when}, {count} ({voice_count} voice{'s' * (voice_count != 1)} x "
                f"{'--eval_sentences' if args.eval_sentences else 'built-in sentences'} x {layout_count} "
                f"layout{'s' * (layout_count != 1)}), greedy, measured as infer_test.py does; best by "
                f"--metric_for_best_model "
                f"{args.metric_for_best_model}" + (", linked as best/" if args.load_best_model_at_end else ""))

    def finish(self):
        """End trackers, draw the loss curve, and print a one-screen summary."""
        voice_lines = voices.report(self)  # measured by every process, so before the trackers end
        self.accelerator.end_training()
        if not self.accelerator.is_main_process:
            return
        history, progress = self.progress.log_history, self.progress
        plot_losses(history, self.output_dir / LOSS_CURVE)
        train = [e for e in history if "train/loss" in e]
        evals = [e for e in history if "eval/loss" in e]
        minutes = (time.perf_counter() - self.started) / 60
        lines = ["***** Training finished *****",
                 f"  steps: {progress.step} ({progress.step - self.start_step} in this run, {minutes:.1f} min)"]
        if len(train) == 1:
            lines.append(f"  train loss: {train[0]['train/loss']:.4f} at step {train[0]['step']}, logged once "
                         f"(every --logging_steps {self.args.logging_steps} steps, and at the end)")
        elif train:
            lines.append(f"  train loss: {train[0]['train/loss']:.4f} at step {train[0]['step']} -> "
                         f"{train[-1]['train/loss']:.4f} at step {train[-1]['step']}")
        lines.append(f"  learning rate: reached {self.highest_lr_used():.3g} (--lr {self.args.lr:g}, "
                     f"{self.args.warmup_steps} warmup steps)")
        if self.warmup_warning():
            lines.append(self.warmup_warning())
        if evals:
            lines.append(f"  eval loss: {evals[-1]['eval/loss']:.4f} (best {progress.best_eval_loss:.4f} at step "
                         f"{progress.best_eval_step})")
        lines += self.evaluation_lines()
        if self.device.type == "cuda":
            lines.append(f"  peak GPU memory: {torch.cuda.max_memory_allocated() / 1e9:.1f} GB allocated")
        lines.append(f"  loss curve: {self.output_dir / LOSS_CURVE}")
        lines += voice_lines
        result = self.last_checkpoint
        if self.args.load_best_model_at_end and progress.best_checkpoint:
            result = scoring.link_best(self.output_dir, progress.best_checkpoint)
        if result is not None:
            lines += [f"  model: {result}" + (f" (-> {progress.best_checkpoint})" if result != self.last_checkpoint else ""),
                      f"  hear it: {hear_it(result, [speaker.name for speaker in self.speaker_table])}"]
        print("\n".join(lines))

    def evaluation_lines(self) -> list:
        """The table of evaluations, and which one won and why."""
        progress, metric = self.progress, self.args.metric_for_best_model
        evaluations = progress.evaluations
        if not evaluations:
            return []
        best = scoring.choose_best(evaluations, metric)
        lines = [f"  evaluations (also in {self.output_dir / scoring.SCORES_FILE}; * the best by "
                 f"--metric_for_best_model {metric}):"]
        resumed_in = self.settings.resume_dir.parent if self.settings.resume_dir is not None else None
        branched_from = None if resumed_in is None or resumed_in.resolve() == self.output_dir.resolve() else resumed_in
        labels = [scoring.checkpoint_label(self.output_dir, entry["checkpoint"], branched_from)
                  for entry in evaluations]
        lines += ["  " + line for line in scoring.table_rows(evaluations, labels, winner=best)]
        if best is None:
            lines.append(f"  best: none of the evaluations measured {metric}" + (
                " (--metric_for_best_model listening_score ranks them by what they sound like)"
                if metric == "eval_loss" else ""))
        else:
            kept = best["checkpoint"] or "not saved (an evaluation between saves)" + (
                f"; the best saved one, kept: {progress.best_checkpoint}" if progress.best_checkpoint else "")
            lines.append(f"  best: step {best['step']}, {kept}: {scoring.why_best(best, metric)}")
        return lines


@contextlib.contextmanager
def stop_signals_held():
    """Hold the stop signals back in this thread while data workers start. Forked from it, a worker
    starts with them held, so none can end it before it takes them over (leave_stop_signals_to_main);
    one sent to this process meanwhile arrives when they are released."""
    if not WORKERS_CAN_LEAVE_STOPS:
        yield
        return
    held_before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held_before)


def leave_stop_signals_to_main(main_pid: int, worker_id: int) -> None:
    """A data worker's worker_init_fn: leave the stop signals (SIGTERM, SIGINT, SIGUSR1) to the main process.

    Sent to the whole job, they would otherwise end the workers first, and the trainer with
    "DataLoader worker ... killed by signal". A worker still ends when the main process shuts the
    loader down or sends it SIGTERM itself (torch's fallback and multiprocessing's cleanup at exit do;
    torch's own handler exits quietly then too), and when the main process dies (torch's watchdog).
    A worker lost any other way stays the loader's error, which names it.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # here and in the threads started from here
    threading.Thread(target=wait_for_stop_signals, args=(main_pid,), name="stop signals", daemon=True).start()


def wait_for_stop_signals(main_pid: int) -> None:
    """Take every stop signal sent to this worker: end it when the main process sent it, else ignore it."""
    while True:
        if signal.sigwaitinfo(STOP_SIGNALS).si_pid == main_pid:
            os._exit(0)
def hear_it(model_dir: Path, speakers: list) -> str:
    """The infer_test.py command that speaks with a checkpoint in each of its voices."""
    return f"python infer_test.py --model_path {shlex.quote(str(model_dir))} " + " ".join(
        f"--speaker {shlex.quote(name)}" for name in speakers)


def gigabytes(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def parameter_count(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count / 1e3:.1f}K"  # LoRA on a tiny model: thousands


def plot_losses(history: list, path: Path) -> None:
    """Train and eval loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for key, label in [("train/loss", "train"), ("eval/loss", "eval")]:
        points = [(entry["step"], entry[key]) for entry in history if key in entry]
        if points:
            axes.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (group 0 + weighted code predictor)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
