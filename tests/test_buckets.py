"""Batch shapes (length buckets): a clip trains the same whichever shape it is padded to and whatever
clips share its batch, and the plan's table keeps a mixed-length dataset to a few shapes with
little padding."""

import dataclasses

import numpy as np
import pytest
import torch

from helpers import build_run
from qwen3_tts_sft.sequence_layout import BatchShapes, collate, padded_cost, padded_sizes
from qwen3_tts_sft.training_data import MAX_BATCH_SHAPES, plan_epoch


@pytest.fixture(scope="module")
def trainer(tiny_model, coded_clips, tmp_path_factory):
    """The trainer's own setup, batch 2: a run ready to train. In fp32, not compiled, no graphs on a GPU
    too: the tests compare losses and gradients to 1e-5, which bf16 autocast does not keep."""
    return build_run(tiny_model, coded_clips, tmp_path_factory.mktemp("buckets"), batch_size=2,
                     mixed_precision="no", torch_compile="no", cuda_graphs="no")


@pytest.fixture(scope="module")
def setup(trainer):
    """The module, and the shortest and the longest clip."""
    train_set, module = trainer.train_set, trainer.train_module
    by_length = sorted(range(len(train_set)), key=train_set.length)
    return module, [train_set[i] for i in (by_length[0], by_length[-1])]


def loss_and_gradients(module, examples, shapes=None):
    """Loss sums [group 0, code predictor] and the trained weights' gradients of one batch."""
    batch = collate(examples, shapes)
    module.zero_grad(set_to_none=True)
    out = module(batch.to(next(module.parameters()).device))
    (out.codec0_loss_sum + 0.3 * out.code_predictor_loss_sum).backward()
    gradients = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return torch.stack([out.codec0_loss_sum, out.code_predictor_loss_sum]).detach(), gradients, batch


def assert_same(a, b):
    (losses_a, gradients_a), (losses_b, gradients_b) = a, b
    assert torch.allclose(losses_a, losses_b, rtol=1e-5)
    assert gradients_a.keys() == gradients_b.keys()
    scale = max(g.abs().max().item() for g in gradients_a.values())
    assert scale > 0 and max((gradients_a[n] - gradients_b[n]).abs().max().item() for n in gradients_a) < 1e-5 * scale


def larger_shape(rows, examples, extra_positions, extra_frames):
    longest = max(example.length for example in examples)
    frames = sum(example.num_frames for example in examples)
    return BatchShapes(rows, ((-(-longest // 8) * 8 + extra_positions, -(-frames // 32) * 32 + extra_frames),))


def test_a_clip_trains_the_same_in_any_bucket(setup):
    module, (short, _) = setup
    alone = loss_and_gradients(module, [short])
    for extra_positions, extra_frames in [(8, 32), (64, 96)]:
        padded = loss_and_gradients(module, [short], larger_shape(1, [short], extra_positions, extra_frames))
        assert padded[2].is_real.shape[1] > alone[2].is_real.shape[1]  # really another shape
        assert padded[2].target_codes.shape[0] > alone[2].target_codes.shape[0]
        assert padded[2].codec0_targets.shape[0] > alone[2].codec0_targets.shape[0]
        assert_same(alone[:2], padded[:2])


def test_a_clip_beside_a_long_one_trains_as_alone(setup):
    """The losses are sums, so a batch's loss and gradient are its clips' own, added: whatever
    padding the long clip forces on the short one, in either row, in either bucket."""
    module, (short, long) = setup
    assert long.length > short.length  # the short clip gets padding positions
    short_alone, long_alone = loss_and_gradients(module, [short]), loss_and_gradients(module, [long])
    expected = (short_alone[0] + long_alone[0],
                {name: short_alone[1][name] + long_alone[1][name] for name in short_alone[1]})
    assert_same(expected, loss_and_gradients(module, [short, long])[:2])
    assert_same(expected, loss_and_gradients(module, [long, short], larger_shape(2, [short, long], 16, 64))[:2])


class MixedClips:
    """Lengths and frame counts like a 2-15 s dataset (12.5 frames a second, text beside them)."""

    def __init__(self, count, seed=0):
        rng = np.random.default_rng(seed)
        self.frames = (rng.uniform(2, 15, count) * 12.5).astype(int)
        self.lengths = self.frames + rng.integers(15, 60, count)

    def __len__(self):
        return len(self.frames)

    def length(self, index):
        return int(self.lengths[index])

    def num_frames(self, index):
        return int(self.frames[index])


def padded_and_needed(data, plan, shapes):
    """Summed padded and unpadded cost of the plan's micro-batches, and the distinct shapes."""
    padded = needed = 0
    distinct = set()
    for step in plan.micro_batches:
        for batch in step:
            longest, frames = max(map(data.length, batch)), sum(map(data.num_frames, batch))
            size = padded_sizes(len(batch), longest, frames, shapes)
            distinct.add((len(batch), *size))
            padded += padded_cost(len(batch), *size)
            needed += sum(map(data.length, batch)) + frames
    return padded, needed, distinct


def test_a_mixed_dataset_gets_a_few_shapes_with_little_padding():
    data = MixedClips(4096)
    plan = plan_epoch(data, 4, 2, 1, 0, seed=0, epoch=0)
    shapes = plan.shapes
    assert 2 <= len(shapes.sizes) <= MAX_BATCH_SHAPES
    padded, needed, distinct = padded_and_needed(data, plan, shapes)
    assert len(distinct) == len(shapes.sizes)  # every micro-batch (all full) fits a size of the table
    assert padded / needed < 1.12
    # Padding each batch to multiples (8 positions, 32 frames) pads less but makes many more shapes.
    _, _, many = padded_and_needed(data, plan, None)
    assert len(many) > 4 * len(distinct)
    # Later epochs use the same table, so the graphs recorded for it serve the whole run.
    assert plan_epoch(data, 4, 2, 1, 0, seed=0, epoch=1).shapes == shapes


def test_a_batch_that_fits_no_shape_pads_to_multiples():
    shapes = BatchShapes(4, ((64, 128), (128, 320)))
    assert shapes.fit(4, 60, 100) == (64, 128)
    assert shapes.fit(4, 60, 200) == (128, 320)  # more frames than the small size holds
    assert shapes.fit(4, 130, 100) is None and shapes.fit(3, 60, 100) is None
    assert padded_sizes(3, 60, 100, shapes) == (64, 128)  # multiples of 8 and 32


def test_the_loader_pads_to_the_plans_shapes_where_graphs_record_them(trainer, monkeypatch):
    plan = trainer.first_plan

    def loaded_shapes():
        return {(batch.is_real.shape[1], batch.target_codes.shape[0]) for batch in trainer.micro_batch_loader(plan, 0)}

    assert not trainer.settings.cuda_graphs  # no graphs, so no table
    to_multiples = loaded_shapes()
    monkeypatch.setattr(trainer, "settings", dataclasses.replace(trainer.settings, cuda_graphs=True))
    to_table = loaded_shapes()
    assert to_table <= set(plan.shapes.sizes) and len(to_table) < len(to_multiples)
