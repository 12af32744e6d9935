"""Accumulation is exact: 8x1, 4x2 and 2x4 over the same clips give the same gradient.

The production step (training_run.TrainingRun.optimizer_step) runs with the update and the
zeroing of gradients held back, so what it leaves in each weight's .grad is the step's gradient.
The compute is fp32 (on a GPU too, where auto would pick bf16): the splits pad differently, and
bf16's rounding of that would hide the difference the test looks for.
"""

from helpers import build_run


def one_step(model_dir, data, out_dir, batch_size, accumulation, classic_bug=False):
    run = build_run(model_dir, data, out_dir, batch_size=batch_size, gradient_accumulation_steps=accumulation,
                    max_grad_norm=0, mixed_precision="no")
    step = next(run.steps())
    assert step.targets.clips == 8
    if classic_bug:  # what the loss would be if each micro-batch were averaged on its own
        for batch in step.micro_batches:
            out = run.train_module(batch.to(run.device))
            loss = out.codec0_loss_sum / batch.num_codec0_targets + 0.3 * out.code_predictor_loss_sum / batch.num_code_predictor_targets
            (loss / len(step.micro_batches)).backward()
    else:
        run.optimizer.step = run.optimizer.zero_grad = lambda *args, **kwargs: None
        run.optimizer_step(step, stop_asked=False)
    return {name: p.grad.detach().clone() for name, p in run.train_module.named_parameters() if p.requires_grad}


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
