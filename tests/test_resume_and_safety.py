"""Runs survive: exact resume after SIGKILL, a clean save on SIGTERM, no half-written checkpoint,
no lost work on non-finite steps, eval at the right steps, and only safe file loading."""

import json
import os
import random
import signal
import subprocess
import time
import sys

import pytest
import torch
from safetensors.torch import load_file

from qwen3_tts_sft import checkpoint
from qwen3_tts_sft import talker_step
from helpers import ROOT, read_jsonl, train, trainer_argv, write_jsonl

# 12 clips, 2 per step: 6 steps an epoch; saving every step lets a run resume from any point.
RUN = dict(batch_size=2, gradient_accumulation_steps=1, num_epochs=2, save_steps=1, lr=1e-3, warmup_steps=2)


@pytest.fixture(scope="module")
def twelve_clips(coded_clips, tmp_path_factory):
    rows = read_jsonl(coded_clips)
    return write_jsonl(tmp_path_factory.mktemp("twelve") / "train.jsonl", rows + rows[:4])


def trainer_command(model_dir, data, output, **flags):
    return [sys.executable, "sft_12hz_chatterbox.py", *trainer_argv(model_dir, data, output, **dict(RUN, **flags))]


def start_and_wait_for(command, line_start: str) -> subprocess.Popen:
    """Start the trainer as a user would and return once it has printed a line starting with `line_start`."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in process.stdout:
        if line.startswith(line_start):
            return process
    process.wait()
    raise AssertionError(f"the trainer exited ({process.returncode}) before printing {line_start!r}")


def final_weights(output):
    folder = checkpoint.latest_checkpoint(output)
    return load_file(folder / checkpoint.TRAINING_STATE_DIR / "model.safetensors"), folder.name


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tiny_model, twelve_clips, tmp_path):
    train(tiny_model, twelve_clips, tmp_path / "whole", **RUN)
    expected, expected_name = final_weights(tmp_path / "whole")

    seed = int(os.environ.get("TEST_SEED", "0"))  # another TEST_SEED kills at another step
    kill_after = random.Random(seed).randint(2, 10)
    print(f"killing after step {kill_after} (TEST_SEED {seed})")
    process = start_and_wait_for(trainer_command(tiny_model, twelve_clips, tmp_path / "killed"),
                                 f"train step {kill_after}/")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.latest_checkpoint(tmp_path / "killed") is not None
    train(tiny_model, twelve_clips, tmp_path / "killed", resume_from_checkpoint="latest", **RUN)

    resumed, resumed_name = final_weights(tmp_path / "killed")
    assert resumed_name == expected_name == "checkpoint-epoch-1"
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)
    assert not list((tmp_path / "killed").glob(".*" + checkpoint.PARTIAL_SUFFIX))


def test_sigterm_saves_a_resumable_checkpoint_and_exits_cleanly(tiny_model, twelve_clips, tmp_path):
    process = start_and_wait_for(trainer_command(tiny_model, twelve_clips, tmp_path / "out", save_steps=0),
                                 "train step 2/")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0
    assert "stopped by SIGTERM" in output and "--resume_from_checkpoint latest" in output
    saved = checkpoint.latest_checkpoint(tmp_path / "out")
    assert saved is not None and saved.name.startswith("checkpoint-step-")
    train(tiny_model, twelve_clips, tmp_path / "out", resume_from_checkpoint="latest", save_steps=0,
          **{k: v for k, v in RUN.items() if k != "save_steps"})
    assert checkpoint.read_trainer_state(checkpoint.latest_checkpoint(tmp_path / "out")).progress.step == 12


def test_a_crash_during_save_leaves_no_half_written_checkpoint(tiny_model, twelve_clips, tmp_path, monkeypatch):
    real_export = checkpoint.export_model

    def export_then_crash(state_dict, base_dir, out_dir, *args, **kwargs):
        real_export(state_dict, base_dir, out_dir, *args, **kwargs)
        raise RuntimeError("power cut")

    monkeypatch.setattr(checkpoint, "export_model", export_then_crash)
    with pytest.raises(RuntimeError, match="power cut"):
        train(tiny_model, twelve_clips, tmp_path / "out", **RUN)
    assert not list((tmp_path / "out").glob("checkpoint-*"))  # only a hidden partial folder
    assert checkpoint.list_checkpoints(tmp_path / "out") == []
    assert list((tmp_path / "out").glob(".checkpoint-step-1" + checkpoint.PARTIAL_SUFFIX))

    monkeypatch.setattr(checkpoint, "export_model", real_export)
    train(tiny_model, twelve_clips, tmp_path / "out", overwrite_output_dir=True, **RUN)
    assert not list((tmp_path / "out").glob(".*" + checkpoint.PARTIAL_SUFFIX))


def test_nonfinite_steps_are_skipped_then_the_run_stops(tiny_model, twelve_clips, tmp_path, monkeypatch, capsys):
    real_forward = talker_step.TalkerTrainingModel.forward
    calls = {"n": 0}

    def forward_with_nan(self, batch):
        out = real_forward(self, batch)
        calls["n"] += 1
        if calls["n"] == 3 or calls["n"] >= 8:  # one bad step, later only bad steps
            out.codec0_loss_sum = out.codec0_loss_sum * float("nan")
        return out

    monkeypatch.setattr(talker_step.TalkerTrainingModel, "forward", forward_with_nan)
    with pytest.raises(SystemExit) as raised:
        train(tiny_model, twelve_clips, tmp_path / "out", max_nonfinite_steps=3, **RUN)
    printed = capsys.readouterr().out
    assert "step 3: non-finite loss or gradient; update skipped" in printed
    assert "3 steps in a row had a non-finite loss" in str(raised.value)
    assert str(raised.value).split("Last good checkpoint: ")[1].startswith(str(tmp_path / "out" / "checkpoint-step-7"))
    assert not (tmp_path / "out" / "checkpoint-step-8").exists()  # no saves during a bad streak
    state = checkpoint.read_trainer_state(tmp_path / "out" / "checkpoint-step-7")
    assert state.progress.nonfinite_in_a_row == 0
    weights = load_file(tmp_path / "out" / "checkpoint-step-7" / checkpoint.TRAINING_STATE_DIR / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_eval_loss_is_logged_at_eval_steps_and_at_the_end(tiny_model, twelve_clips, tmp_path):
    output = train(tiny_model, twelve_clips, tmp_path / "out", eval_split=0.25, eval_steps=2, batch_size=3,
                   num_epochs=2, save_steps=0)
    state = checkpoint.read_trainer_state(output / "checkpoint-epoch-1")
    eval_steps = [entry["step"] for entry in state.progress.log_history if "eval/loss" in entry]
    assert eval_steps == [2, 4, 6]  # 9 train clips, 3 per step: 3 steps an epoch, 6 in all
    entry = next(e for e in state.progress.log_history if "eval/loss" in e)
    assert {"eval/codec0_loss", "eval/code_predictor_loss"} <= entry.keys()
    assert state.progress.best_eval_step in eval_steps


def test_save_total_limit_keeps_the_newest_and_the_best(tiny_model, twelve_clips, tmp_path):
    output = train(tiny_model, twelve_clips, tmp_path / "out", save_total_limit=2, **RUN)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-epoch-1", "checkpoint-step-11"]
    for step in range(1, 4):
        folder = tmp_path / "fake" / f"checkpoint-step-{step}"
        (folder / checkpoint.TRAINING_STATE_DIR).mkdir(parents=True)
        (folder / checkpoint.TRAINER_STATE).write_text(json.dumps({"step": step}))
    removed = checkpoint.remove_old_checkpoints(tmp_path / "fake", keep=2, protect={"checkpoint-step-1"})
    assert [p.name for p in removed] == ["checkpoint-step-2"]


def test_an_existing_run_is_not_overwritten_by_accident(tiny_model, twelve_clips, tmp_path):
    train(tiny_model, twelve_clips, tmp_path / "out", max_steps=1)
    with pytest.raises(SystemExit) as raised:
        train(tiny_model, twelve_clips, tmp_path / "out", max_steps=1)
    assert "--resume_from_checkpoint latest" in str(raised.value) and "--overwrite_output_dir" in str(raised.value)
    with pytest.raises(SystemExit) as raised:
        train(tiny_model, twelve_clips, tmp_path / "out", resume_from_checkpoint="latest", batch_size=3)
    assert "--batch_size is 3 but the checkpoint was made with 2" in str(raised.value)


def test_a_full_disk_is_reported_before_saving(tiny_model, twelve_clips, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(SystemExit) as raised:
        train(tiny_model, twelve_clips, tmp_path / "out", max_steps=1)
    assert "not enough disk space" in str(raised.value) and "GB are free" in str(raised.value)


def test_resume_reads_no_pickled_code(tiny_model, twelve_clips, tmp_path, monkeypatch):
    train(tiny_model, twelve_clips, tmp_path / "out", max_steps=2, **{k: v for k, v in RUN.items()})
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real_load(*a, **k))
    train(tiny_model, twelve_clips, tmp_path / "out", resume_from_checkpoint="latest", max_steps=3,
          allow_schedule_change=True, **RUN)
    assert calls and all(flag is True for flag in calls)


def test_sigkill_while_saving_never_shows_a_half_written_checkpoint(tiny_model, twelve_clips, tmp_path):
    output = tmp_path / "out"
    process = subprocess.Popen(trainer_command(tiny_model, twelve_clips, output), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(output.glob(".checkpoint-step-3" + checkpoint.PARTIAL_SUFFIX)):  # the third save is under way
        assert process.poll() is None and time.monotonic() < deadline, "the trainer never reached its third save"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    visible = sorted(p.name for p in output.glob("checkpoint-*"))
    assert visible
    assert visible == sorted(p.name for p in checkpoint.list_checkpoints(output))  # each visible one is complete
    train(tiny_model, twelve_clips, output, resume_from_checkpoint="latest", **RUN)
    assert checkpoint.latest_checkpoint(output).name == "checkpoint-epoch-1"
