"""Step counts, learning rate and effective batch follow the flags."""

import json

import pytest

from helpers import train
from qwen3_tts_sft.training_data import plan_epoch


def logged(output, name):
    state = json.loads((output / "checkpoint-epoch-2" / "trainer_state.json").read_text())
    return [entry[name] for entry in state["log_history"] if name in entry], state


def test_steps_warmup_and_decay_follow_the_flags(tiny_model, coded_clips, tmp_path, capsys):
    # 8 clips, 2 per micro-batch x 2 accumulation = 4 clips per step: 2 steps per epoch, 6 in 3 epochs.
    output = train(tiny_model, coded_clips, tmp_path / "out", batch_size=2, gradient_accumulation_steps=2,
                   num_epochs=3, warmup_steps=2, lr=1e-3, lr_scheduler="linear", save_total_limit=0)
    printed = capsys.readouterr().out
    assert "= 4 clips per step" in printed and "fill less than one step" not in printed
    assert "2 per epoch x 3 epochs -> 6 optimizer steps" in printed
    assert sorted(p.name for p in output.glob("checkpoint-*")) == [f"checkpoint-epoch-{e}" for e in range(3)]

    rates, state = logged(output, "train/lr")
    assert state["step"] == 6
    # The rate each update used: linear warmup from 0 over 2 steps, then linear decay to 0 at step 6.
    assert rates == pytest.approx([0.0, 0.5e-3, 1e-3, 0.75e-3, 0.5e-3, 0.25e-3])


def test_a_batch_larger_than_the_data_is_pointed_out(tiny_model, coded_clips, tmp_path, capsys):
    train(tiny_model, coded_clips, tmp_path / "out", batch_size=8, gradient_accumulation_steps=2, max_steps=1)
    assert "= 16 clips per step; note: the 8 training clips fill less than one step" in capsys.readouterr().out


def test_max_steps_stops_early_with_a_step_checkpoint(tiny_model, coded_clips, tmp_path):
    output = train(tiny_model, coded_clips, tmp_path / "out", batch_size=2, num_epochs=5, max_steps=3)
    assert [p.name for p in output.glob("checkpoint-*")] == ["checkpoint-step-3"]
    assert json.loads((output / "checkpoint-step-3" / "trainer_state.json").read_text())["step"] == 3


class Lengths:
    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def length(self, index):
        return self.lengths[index]

    def num_frames(self, index):
        return self.lengths[index] // 2


@pytest.mark.parametrize("group_by_length", [True, False])
def test_each_step_holds_the_same_clips_whatever_the_split(group_by_length):
    data = Lengths([(i * 37) % 101 for i in range(50)])
    plans = {(b, a): plan_epoch(data, b, a, 1, 0, seed=3, epoch=1, group_by_length=group_by_length)
             for b, a in [(8, 1), (4, 2), (2, 4)]}
    steps = {key: [sorted(step) for step in plan.steps] for key, plan in plans.items()}
    assert steps[(8, 1)] == steps[(4, 2)] == steps[(2, 4)]
    for (batch, accumulation), plan in plans.items():
        for step, micro_batches in zip(plan.steps, plan.micro_batches):
            assert sorted(i for mb in micro_batches for i in mb) == sorted(step)
            assert all(len(mb) <= batch for mb in micro_batches) and len(micro_batches) <= accumulation
    assert sorted(i for step in steps[(8, 1)] for i in step) == list(range(50))


def test_processes_split_each_step_without_overlap():
    data = Lengths(list(range(40)))
    plans = [plan_epoch(data, 2, 2, 2, rank, seed=0, epoch=0) for rank in range(2)]
    for step_index, step in enumerate(plans[0].steps):
        shares = [sorted(i for mb in plan.micro_batches[step_index] for i in mb) for plan in plans]
        assert not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == sorted(step)
