"""Accumulation is exact: 8x1, 4x2 and 2x4 over the same clips give the same gradient.

The production step (training_run.Run.optimizer_step) runs with plain SGD at lr 1, so the change
of each weight is exactly minus its gradient.
"""

import torch

import sft_12hz_chatterbox as sft
from qwen3_tts_sft.checkpoint import TrainingProgress
from helpers import trainer_setup
from qwen3_tts_sft.training_run import Run


def one_step(model_dir, data, out_dir, batch_size, accumulation, classic_bug=False):
    args, accelerator, _, train_set, table, module = trainer_setup(
        model_dir, data, out_dir, "--batch_size", batch_size, "--gradient_accumulation_steps", accumulation,
        "--max_grad_norm", "0")
    parameters = {name: p for name, p in module.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in parameters.items()}
    optimizer = torch.optim.SGD(parameters.values(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    plan = sft.plan_for(train_set, args, accelerator, epoch=0)
    assert len(plan.steps[0]) == 8
    loader = iter(sft.micro_batch_loader(train_set, plan, 0, args, accelerator))
    batches = [next(loader) for _ in plan.micro_batches[0]]
    if classic_bug:  # what the loss would be if each micro-batch were averaged on its own
        for batch in batches:
            out = module(batch)
            loss = out.codec0_loss_sum / batch.num_codec0_targets + 0.3 * out.sub_talker_loss_sum / batch.num_sub_talker_targets
            (loss / len(batches)).backward()
        optimizer.step()
    else:
        run = Run(args, accelerator, module, optimizer, scheduler, table, out_dir, TrainingProgress(seed=args.seed))
        run.optimizer_step(batches, train_set.targets(plan.steps[0]), stop_asked=False)
    return {name: before[name] - p.detach() for name, p in parameters.items()}


def max_relative_difference(a, b):
    scale = max(v.abs().max().item() for v in a.values())
    return max((a[name] - b[name]).abs().max().item() for name in a) / scale


def test_accumulation_splits_give_the_same_gradient(tiny_model, coded_clips, tmp_path):
    gradients = {(b, a): one_step(tiny_model, coded_clips, tmp_path / f"{b}x{a}", b, a) for b, a in [(8, 1), (4, 2), (2, 4)]}
    assert max_relative_difference(gradients[(8, 1)], gradients[(4, 2)]) < 1e-5
    assert max_relative_difference(gradients[(8, 1)], gradients[(2, 4)]) < 1e-5
    # The classic per-micro-batch average would not pass: the clips differ in length.
    buggy = one_step(tiny_model, coded_clips, tmp_path / "bug", 2, 4, classic_bug=True)
    assert max_relative_difference(gradients[(8, 1)], buggy) > 1e-3
