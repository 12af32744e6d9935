"""One training run's state and actions: an optimizer step, logging, eval, saving a checkpoint.

The loop itself is in sft_12hz_chatterbox.py; it calls these once per optimizer step.
"""

import contextlib
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qwen3_tts_sft import checkpoint
from qwen3_tts_sft import lora
from qwen3_tts_sft.cuda_graphs import MicroBatchGraphs, forward_backward
from qwen3_tts_sft.sequence_layout import collate
from qwen3_tts_sft.training_data import file_fingerprint


class Run:
    def __init__(self, args, accelerator, train_module, optimizer, scheduler, speaker_table, output_dir, progress,
                 cuda_graphs=False):
        self.args = args
        self.accelerator = accelerator
        self.train_module = train_module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.speaker_table = speaker_table
        self.output_dir = output_dir
        self.progress = progress
        self.trainable = [p for p in train_module.parameters() if p.requires_grad]  # what the step clips
        self.graphs = None
        if cuda_graphs:  # --cuda_graphs auto drops them where memory is short; yes keeps them
            self.graphs = MicroBatchGraphs(train_module, self.trainable, accelerator.backward,
                                           check_memory=args.cuda_graphs == "auto")
        self.device = accelerator.device
        self.last_checkpoint = None
        self.last_lr = self.last_loss = float("nan")
        self.started = time.perf_counter()
        self.start_step = progress.step
        self.reset_interval()

    def reset_interval(self):
        """Sums over the steps since the last log line, kept on the device until logged."""
        self.interval_loss_sums = torch.zeros(2, device=self.device)
        self.interval_targets = [0, 0]
        self.interval_clips = 0
        self.interval_start = time.perf_counter()
        self.last_grad_norm = float("nan")

    def optimizer_step(self, batches, step_targets, stop_asked: bool) -> bool:
        """Forward and backward over this process's micro-batches of one step, then one update.

        Each loss is divided by the number of its targets in the whole step (all micro-batches, all
        processes), so the summed gradients equal those of one big batch. Returns whether a stop
        was asked on any process.
        """
        codec0_targets, sub_targets = step_targets.codec0, step_targets.sub_talker
        weight = self.args.sub_talker_loss_weight
        # DDP averages gradients over processes; the losses are already global sums over targets.
        scale = self.accelerator.num_processes
        loss_weights = torch.tensor([scale / codec0_targets, scale * weight / sub_targets]).to(self.device)
        step_sums = torch.zeros(2, device=self.device)
        for index, batch in enumerate(batches):
            if self.graphs is not None:  # one process: no gradient sync to hold back
                step_sums += self.graphs.forward_backward(batch, loss_weights)
            else:
                last = index == len(batches) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(self.train_module):
                    step_sums += forward_backward(self.train_module, batch.to(self.device), loss_weights,
                                                  self.accelerator.backward)

        grad_norm = self.accelerator.clip_grad_norm_(self.trainable, self.args.max_grad_norm or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the norm as a distributed tensor
            grad_norm = grad_norm.full_tensor()
        # One host sync per step: is the update finite, did any process get a stop signal, and the
        # step's loss for the progress bar.
        status = torch.cat([torch.stack([grad_norm.detach().float() + step_sums.sum(),
                                         torch.tensor(float(stop_asked), device=self.device)]), step_sums])
        if self.accelerator.num_processes > 1:
            status = self.accelerator.reduce(status, "sum")
        health, stop, codec0_sum, sub_sum = status.tolist()
        finite, stop = math.isfinite(health), stop > 0
        self.last_loss = codec0_sum / codec0_targets + weight * sub_sum / sub_targets

        progress = self.progress
        progress.step += 1
        if finite:
            self.optimizer.step()
            if self.graphs is not None:
                self.graphs.optimizer_has_stepped = True
            progress.nonfinite_in_a_row = 0
            self.interval_loss_sums += step_sums
            self.interval_targets[0] += codec0_targets
            self.interval_targets[1] += sub_targets
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
        # The CUDA graphs write into the gradient tensors they recorded: keep them, zeroed.
        self.optimizer.zero_grad(set_to_none=self.graphs is None)
        self.interval_clips += step_targets.clips
        return stop

    def postfix(self) -> str:
        return f"loss {self.last_loss:.3f}, lr {self.last_lr:.2e}"

    def log_training(self):
        codec0_targets, sub_targets = self.interval_targets
        if not codec0_targets:
            return
        sums = self.interval_loss_sums
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, "sum")
        seconds = time.perf_counter() - self.interval_start
        codec0, sub = (sums[0] / codec0_targets).item(), (sums[1] / sub_targets).item()
        values = {
            "train/loss": codec0 + self.args.sub_talker_loss_weight * sub,
            "train/codec0_loss": codec0,
            "train/sub_talker_loss": sub,
            "train/lr": self.last_lr,
            "train/grad_norm": float(self.last_grad_norm),
            "train/samples_per_second": self.interval_clips / seconds,
        }
        if self.device.type == "cuda":  # the largest over the processes: the GPU that runs out first
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 1e9], device=self.device)
            values["train/gpu_memory_peak_gb"] = self.accelerator.gather(peak).max().item()
        self.report(values)
        self.reset_interval()

    def evaluate(self, eval_set):
        """Mean eval loss per target, group 0 and code predictor separately, over the whole eval set."""
        module = self.train_module
        module.eval()
        order = sorted(range(len(eval_set)), key=eval_set.length)
        batches = [order[i:i + self.args.batch_size] for i in range(0, len(order), self.args.batch_size)]
        mine = batches[self.accelerator.process_index::self.accelerator.num_processes]
        sums = torch.zeros(4, device=self.device)
        with torch.no_grad():
            for indices in mine:
                out = module(collate([eval_set[i] for i in indices]).to(self.device))
                targets = eval_set.targets(indices)
                sums += torch.stack([out.codec0_loss_sum, out.sub_talker_loss_sum,
                                     torch.tensor(float(targets.codec0), device=self.device),
                                     torch.tensor(float(targets.sub_talker), device=self.device)])
        module.train()
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, "sum")
        codec0, sub = (sums[0] / sums[2]).item(), (sums[1] / sums[3]).item()
        loss = codec0 + self.args.sub_talker_loss_weight * sub
        progress = self.progress
        if progress.best_eval_loss is None or loss < progress.best_eval_loss:
            progress.best_eval_loss, progress.best_eval_step = loss, progress.step
        self.report({"eval/loss": loss, "eval/codec0_loss": codec0, "eval/sub_talker_loss": sub})

    def report(self, values: dict):
        step = self.progress.step
        self.accelerator.log(values, step=step)
        self.progress.log_history.append(dict(step=step, **{k: round(v, 6) for k, v in values.items()}))
        if self.accelerator.is_main_process:
            tqdm.write(f"step {step}: " + ", ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in values.items()))

    def save(self, name: str):
        """Write checkpoint `name` (an inference-ready folder plus the training state), atomically."""
        accelerator, progress = self.accelerator, self.progress
        final = self.output_dir / name
        partial = checkpoint.partial_path(final)
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(self.train_module)  # every process takes part (FSDP)
        module = accelerator.unwrap_model(self.train_module)
        with torch.no_grad():
            vectors = module.speaker_vectors().float()
        if accelerator.is_main_process:
            self.check_disk_space(name)
            shutil.rmtree(partial, ignore_errors=True)
            model_state = {key[len("model."):]: value for key, value in state_dict.items() if key.startswith("model.")}
            if module.lora_config is not None:
                lora.save_adapter(model_state, module.lora_config, partial / "adapter")
                model_state = lora.merged_state_dict(model_state, module.lora_config)
            checkpoint.export_model(model_state, Path(self.args.init_model_path), partial, self.speaker_table,
                                    vectors, dtype=getattr(torch, self.args.save_dtype))
        del state_dict
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial / checkpoint.TRAINING_STATE_DIR))
        if accelerator.is_main_process:
            checkpoint.save_speaker_vectors(partial / checkpoint.TRAINING_STATE_DIR, vectors)
            if progress.best_eval_step == progress.step:
                progress.best_checkpoint = name
            checkpoint.write_trainer_state(partial, progress, self.trainer_state_extra(name))
            checkpoint.publish(partial, final)
            if self.args.save_total_limit:
                protect = {progress.best_checkpoint} if progress.best_checkpoint else set()
                for folder in checkpoint.remove_old_checkpoints(self.output_dir, self.args.save_total_limit, protect):
                    tqdm.write(f"removed old checkpoint {folder}")
            tqdm.write(f"saved {final}")
        self.last_checkpoint = final
        accelerator.wait_for_everyone()

    def trainer_state_extra(self, name: str) -> dict:
        flags = {k: v for k, v in vars(self.args).items() if k != "versions"}
        return dict(
            checkpoint=name,
            flags=flags,
            versions=getattr(self.args, "versions", {}),
            num_processes=self.accelerator.num_processes,
            train_data_sha256=file_fingerprint(self.args.train_jsonl)[1],
            speakers=[dict(name=s.name, codec_id=s.codec_id, reference_audio=[str(p) for p in s.reference_audio])
                      for s in self.speaker_table],
        )

    def check_disk_space(self, name: str):
        module = self.accelerator.unwrap_model(self.train_module)
        parameters = sum(p.numel() for p in module.parameters())
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        export_bytes = 2 if self.args.save_dtype == "bfloat16" else 4
        weight_bytes = 2 if self.args.low_memory else 4
        needed = parameters * (export_bytes + weight_bytes) + trainable * 2 * weight_bytes  # export, weights, moments
        self.output_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.output_dir).free
        if free < needed * 1.05:
            raise SystemExit(
                f"error: not enough disk space in {self.output_dir} to save {name}: it needs about "
                f"{needed / 1e9:.1f} GB and {free / 1e9:.1f} GB are free. Last saved checkpoint: "
                f"{self.last_checkpoint or 'none'}. Free space and resume with --resume_from_checkpoint latest."
            )

    def finish(self):
        """End trackers, draw the loss curve, and print a one-screen summary."""
        self.accelerator.end_training()
        if not self.accelerator.is_main_process:
            return
        history, progress = self.progress.log_history, self.progress
        plot_losses(history, self.output_dir / "loss_curve.png")
        train = [e for e in history if "train/loss" in e]
        evals = [e for e in history if "eval/loss" in e]
        minutes = (time.perf_counter() - self.started) / 60
        lines = ["***** Training finished *****",
                 f"  steps: {progress.step} ({progress.step - self.start_step} in this run, {minutes:.1f} min)"]
        if train:
            lines.append(f"  train loss: {train[0]['train/loss']:.4f} at step {train[0]['step']} -> "
                         f"{train[-1]['train/loss']:.4f} at step {train[-1]['step']}")
        if evals:
            lines.append(f"  eval loss: {evals[-1]['eval/loss']:.4f} (best {progress.best_eval_loss:.4f} at step "
                         f"{progress.best_eval_step}" + (f", {progress.best_checkpoint})" if progress.best_checkpoint else ")"))
        if self.device.type == "cuda":
            lines.append(f"  peak GPU memory: {torch.cuda.max_memory_allocated() / 1e9:.1f} GB allocated")
        lines.append(f"  loss curve: {self.output_dir / 'loss_curve.png'}")
        if self.last_checkpoint is not None:
            lines += [f"  model: {self.last_checkpoint}",
                      f"  hear it: python infer_test.py --model_path {self.last_checkpoint} --speaker {self.speaker_table[0].name}"]
        print("\n".join(lines))


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
