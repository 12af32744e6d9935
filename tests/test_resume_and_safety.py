"""Runs survive: exact resume after SIGKILL, a clean save on SIGTERM or Ctrl-C (to the trainer or to
the whole job, data workers included), no half-written checkpoint (a crash or a full disk), no lost
work on non-finite steps, eval at the right steps, one command for a job and its requeues, runs of
any precision one after another in one process, and only safe file loading."""

import argparse
import errno
import gc
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from qwen_tts import Qwen3TTSModel
from safetensors.torch import load_file

from qwen3_tts_sft import checkpoint
from qwen3_tts_sft.training_setup import find_resume_checkpoint
from helpers import GPU_DEFAULT_PATH, ROOT, build_run, read_jsonl, train, trainer_argv, write_jsonl

# 12 clips, 2 per step: 6 steps an epoch; saving every step lets a run resume from any point.
RUN = dict(batch_size=2, gradient_accumulation_steps=1, num_epochs=2, save_steps=1, lr=1e-3, warmup_steps=2)


@pytest.fixture(scope="module")
def twelve_clips(coded_clips, tmp_path_factory):
    rows = read_jsonl(coded_clips)
    return write_jsonl(tmp_path_factory.mktemp("twelve") / "train.jsonl", rows + rows[:4])


def trainer_command(model_dir, data, output, **flags):
    return [sys.executable, "sft_12hz_chatterbox.py", *trainer_argv(model_dir, data, output, **dict(RUN, **flags))]


def start_and_wait_for(command, line_start: str, **options) -> subprocess.Popen:
    """Start the trainer as a user would and return once it has printed a line starting with `line_start`."""
    options = dict(dict(stderr=subprocess.DEVNULL), **options)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"), **options)
    for line in process.stdout:
        if line.startswith(line_start):
            return process
    process.wait()
    raise AssertionError(f"the trainer exited ({process.returncode}) before printing {line_start!r}")


def final_weights(output):
    folder = checkpoint.latest_checkpoint(output)
    return load_file(folder / checkpoint.TRAINING_STATE_DIR / "model.safetensors"), folder.name


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tiny_model, twelve_clips, tmp_path):
    run = dict(RUN, **GPU_DEFAULT_PATH)  # on a GPU: compiled layers and CUDA graphs, as users train
    train(tiny_model, twelve_clips, tmp_path / "whole", **run)
    expected, expected_name = final_weights(tmp_path / "whole")

    seed = int(os.environ.get("TEST_SEED", "0"))  # another TEST_SEED kills at another step
    kill_after = random.Random(seed).randint(2, 10)
    print(f"killing after step {kill_after} (TEST_SEED {seed})")
    process = start_and_wait_for(trainer_command(tiny_model, twelve_clips, tmp_path / "killed", **GPU_DEFAULT_PATH),
                                 f"train step {kill_after}/")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.latest_checkpoint(tmp_path / "killed") is not None
    train(tiny_model, twelve_clips, tmp_path / "killed", resume_from_checkpoint="latest", **run)

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
    # Saved, not finished: 143, as a job killed by SIGTERM, so that a retry of failed jobs runs it again.
    assert process.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in output and "--resume_from_checkpoint latest (exit status 143: not finished)" in output
    saved = checkpoint.latest_checkpoint(tmp_path / "out")
    assert saved is not None and saved.name.startswith("checkpoint-step-")
    train(tiny_model, twelve_clips, tmp_path / "out", resume_from_checkpoint="latest", save_steps=0,
          **{k: v for k, v in RUN.items() if k != "save_steps"})
    assert checkpoint.read_trainer_state(checkpoint.latest_checkpoint(tmp_path / "out")).progress.step == 12


def test_sigterm_while_setting_up_says_nothing_was_saved(tiny_model, twelve_clips, tmp_path):
    """Preempted while the model loads: no traceback, no silent death; the usual exit status."""
    process = start_and_wait_for(trainer_command(tiny_model, twelve_clips, tmp_path / "out"), "train data: ",
                                 stderr=subprocess.PIPE)
    process.send_signal(signal.SIGTERM)
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, errors[-3000:]
    assert "stopped by SIGTERM while setting up, before the first step: nothing was trained or saved" in errors
    assert "Traceback" not in errors
    assert checkpoint.latest_checkpoint(tmp_path / "out") is None


def test_sigterm_to_the_whole_job_with_data_workers_saves_and_exits_cleanly(tiny_model, twelve_clips, tmp_path):
    """What Slurm preemption, `timeout` and `kill -TERM -PGID` do: every process of the job, the data
    loader's workers (the default --num_workers 2) included, gets the signal."""
    saved = stop_the_whole_job(tiny_model, twelve_clips, tmp_path / "out", signal.SIGTERM)
    assert saved.name.startswith("checkpoint-step-")
    train(tiny_model, twelve_clips, tmp_path / "out", resume_from_checkpoint="latest",
          **{k: v for k, v in RUN.items() if k != "save_steps"})
    assert checkpoint.read_trainer_state(checkpoint.latest_checkpoint(tmp_path / "out")).progress.step == 12


def test_ctrl_c_in_a_terminal_also_stops_the_whole_job_cleanly(tiny_model, twelve_clips, tmp_path):
    """Ctrl-C sends SIGINT to every process of the terminal's foreground job."""
    saved = stop_the_whole_job(tiny_model, twelve_clips, tmp_path / "out", signal.SIGINT)
    assert saved.name.startswith("checkpoint-step-")


def test_slurm_s_warning_signal_sigusr1_also_saves_and_stops_cleanly(tiny_model, twelve_clips, tmp_path):
    """`sbatch --signal=USR1@120` warns every process of the job before its time limit: by default
    SIGUSR1 kills a process at once, and the steps since the last save were lost."""
    saved = stop_the_whole_job(tiny_model, twelve_clips, tmp_path / "out", signal.SIGUSR1)
    assert saved.name.startswith("checkpoint-step-")


def test_a_second_job_on_the_same_output_folder_is_refused_naming_the_first(tiny_model, twelve_clips, tmp_path):
    """Two jobs of one command started at once (a job array, a requeue while the first still runs): the
    second would delete the first one's half-written save and prune its checkpoints; it stops, naming it."""
    job = dict(RUN, num_epochs=100, save_steps=2, resume_from_checkpoint="latest")  # one command for both
    first = start_and_wait_for(trainer_command(tiny_model, twelve_clips, tmp_path / "out", **job), "train step 2/")
    try:
        with pytest.raises(SystemExit) as refused:
            train(tiny_model, twelve_clips, tmp_path / "out", **job)
        assert first.poll() is None  # still training, its checkpoints untouched
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert f"another training run (process {first.pid} on " in str(refused.value)
    assert f"is writing checkpoints to {tmp_path / 'out'}" in str(refused.value)
    assert first.returncode == 128 + signal.SIGTERM  # it saved and stopped as usual
    # Once it has ended, the same command (a requeue) resumes its run.
    run = build_run(tiny_model, twelve_clips, tmp_path / "out", **job)
    assert run.progress.step >= 2
    del run


def test_an_output_folder_on_a_file_system_without_locks_trains_unlocked(tiny_model, twelve_clips, tmp_path,
                                                                          monkeypatch):
    """Lustre mounted without `flock` (ENOSYS), NFS without its lock service (ENOLCK): nobody holds the
    lock, so the run is not refused as if another one did."""
    import fcntl

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    run = build_run(tiny_model, twelve_clips, tmp_path / "out", **RUN)
    assert run.progress.step == 0
    del run


def stop_the_whole_job(model_dir, data, output, stop_signal):
    """Start the trainer with data workers as a job of its own, signal all its processes after step 2,
    check that it said so and exited 128 + the signal; return the checkpoint it saved."""
    command = trainer_command(model_dir, data, output, save_steps=0, num_workers=None)
    with open(output.parent / "stderr.txt", "w") as errors:
        process = start_and_wait_for(command, "train step 2/", start_new_session=True, stderr=errors)
        assert data_workers(process.pid)  # the signal reaches them too
        os.killpg(process.pid, stop_signal)
        printed, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + stop_signal, (output.parent / "stderr.txt").read_text()[-3000:]
    assert f"stopped by {stop_signal.name}" in printed
    saved = checkpoint.latest_checkpoint(output)
    assert saved is not None
    return saved


def test_a_data_worker_lost_otherwise_stops_the_run_naming_it(tiny_model, twelve_clips, tmp_path):
    command = trainer_command(tiny_model, twelve_clips, tmp_path / "out", save_steps=0, num_workers=None)
    with open(tmp_path / "stderr.txt", "w") as errors:
        process = start_and_wait_for(command, "train step 2/", start_new_session=True, stderr=errors)
        worker = data_workers(process.pid)[0]
        os.kill(worker, signal.SIGKILL)
        process.communicate(timeout=120)
    assert process.returncode != 0
    assert f"DataLoader worker (pid {worker}) is killed by signal: Killed" in (tmp_path / "stderr.txt").read_text()


def data_workers(pid: int) -> list:
    """The pids of the data loader worker processes of the trainer `pid` (torch names them pt_data_worker)."""
    workers = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        if Path(f"/proc/{child}/comm").read_text().strip() == "pt_data_worker":
            workers.append(int(child))
    return workers


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
    """The fault comes through a weight, set to NaN in place before a step: a replayed CUDA graph reads
    it as the eager forward does, so on a GPU this checks the default path (compiled layers, CUDA
    graphs, bf16), on CPU the eager one."""
    import sft_12hz_chatterbox

    run = build_run(tiny_model, twelve_clips, tmp_path / "out", max_nonfinite_steps=3, **RUN, **GPU_DEFAULT_PATH)
    weight = run.accelerator.unwrap_model(run.train_module).talker.codec_head.weight
    take_step, bad_steps = run.optimizer_step, {3, 8, 9, 10}  # one bad step, later only bad steps
    graph_replays = count_graph_replays(monkeypatch)
    replays_in_bad_steps, weights_around_step_3 = [], []

    def step_with_a_nan_weight(step, stop_asked):
        number, replays_before = run.progress.step + 1, len(graph_replays)
        if number not in bad_steps:
            return take_step(step, stop_asked)
        good_value = weight[0, 0].item()
        if number == 3:
            weights_around_step_3.append(trainable_weights(run))
        with torch.no_grad():
            weight[0, 0] = float("nan")  # in place: the memory a recorded graph reads
        stop = take_step(step, stop_asked)
        replays_in_bad_steps.append(len(graph_replays) - replays_before)
        if number == 3:
            with torch.no_grad():
                weight[0, 0] = good_value
            weights_around_step_3.append(trainable_weights(run))
        return stop

    run.optimizer_step = step_with_a_nan_weight
    with pytest.raises(SystemExit) as raised, sft_12hz_chatterbox.StopRequest(tmp_path / "out") as stop_request:
        sft_12hz_chatterbox.train(run, stop_request)
    printed = capsys.readouterr().out
    assert "step 3: non-finite loss or gradient; update skipped" in printed
    before, after = weights_around_step_3
    assert all(torch.equal(before[name], after[name]) for name in before)  # no weight moved
    assert "3 steps in a row had a non-finite loss" in str(raised.value)
    assert str(raised.value).split("Last good checkpoint: ")[1].startswith(str(tmp_path / "out" / "checkpoint-step-7"))
    assert not (tmp_path / "out" / "checkpoint-step-8").exists()  # no saves during a bad streak
    state = checkpoint.read_trainer_state(tmp_path / "out" / "checkpoint-step-7")
    assert state.progress.nonfinite_in_a_row == 0
    weights = load_file(tmp_path / "out" / "checkpoint-step-7" / checkpoint.TRAINING_STATE_DIR / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    if run.graphs is not None:  # the GPU default: the last bad steps ran as replayed graphs
        assert sum(replays_in_bad_steps[1:]) > 0


def trainable_weights(run) -> dict:
    return {name: p.detach().clone() for name, p in run.train_module.named_parameters() if p.requires_grad}


def count_graph_replays(monkeypatch) -> list:
    """A list that grows by one each time a recorded CUDA graph is replayed."""
    replays = []
    if torch.cuda.is_available():
        real_replay = torch.cuda.CUDAGraph.replay
        monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or real_replay(graph))
    return replays


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
    # Other data under the same flags: both files are named.
    other = write_jsonl(tmp_path / "other.jsonl", read_jsonl(twelve_clips)[:10])
    with pytest.raises(SystemExit) as raised:
        train(tiny_model, other, tmp_path / "out", resume_from_checkpoint="latest")
    assert f"{other} differs from the file the checkpoint was trained on ({twelve_clips}, sha256 " in str(raised.value)


def test_resuming_from_an_older_checkpoint_never_overwrites_the_later_ones(tiny_model, twelve_clips, tmp_path):
    flags = dict(max_steps=2, save_steps=1, eval_split=0.25, eval_steps=1)  # evaluations: scores.jsonl on resume
    output = train(tiny_model, twelve_clips, tmp_path / "out", **flags)
    later = output / "checkpoint-step-2" / checkpoint.TRAINER_STATE
    before = later.read_bytes()
    with pytest.raises(SystemExit) as raised:
        train(tiny_model, twelve_clips, output, lr=2e-3, allow_schedule_change=True,
              resume_from_checkpoint=output / "checkpoint-step-1", **flags)
    assert "holds later checkpoints of that run (checkpoint-step-2), which resuming here would overwrite" in str(raised.value)
    assert "another --output_model_path" in str(raised.value) and later.read_bytes() == before
    # Branching off into another folder, not made yet, is how to do it (its scores.jsonl is written first).
    train(tiny_model, twelve_clips, tmp_path / "branch", resume_from_checkpoint=output / "checkpoint-step-1", **flags)
    assert (tmp_path / "branch" / "checkpoint-step-2").is_dir()
    assert [json.loads(line)["step"] for line in (tmp_path / "branch" / "scores.jsonl").read_text().splitlines()] == [1, 2]


def test_a_full_disk_is_reported_before_saving(tiny_model, twelve_clips, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(SystemExit) as raised:
        train(tiny_model, twelve_clips, tmp_path / "out", max_steps=1)
    assert "not enough disk space" in str(raised.value) and "GB are free" in str(raised.value)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tiny_model, twelve_clips, tmp_path, monkeypatch):
    real_save_file = checkpoint.save_file

    def disk_fills_up_in_the_second_save(tensors, filename, *args, **kwargs):
        if "checkpoint-step-2" in str(filename):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", disk_fills_up_in_the_second_save)
    with pytest.raises(SystemExit) as raised:
        train(tiny_model, twelve_clips, tmp_path / "out", max_steps=3, **RUN)
    message = str(raised.value)
    assert "the disk filled up while saving checkpoint-step-2" in message
    assert re.search(r"A checkpoint needs about \d+\.\d GB in ", message)
    assert "--resume_from_checkpoint latest" in message
    output = tmp_path / "out"
    assert [folder.name for folder in checkpoint.list_checkpoints(output)] == ["checkpoint-step-1"]
    assert not list(output.glob("*checkpoint-step-2*")) and not list(output.glob(".*" + checkpoint.PARTIAL_SUFFIX))
    assert Qwen3TTSModel.from_pretrained(str(output / "checkpoint-step-1")).model.talker is not None
    monkeypatch.undo()
    train(tiny_model, twelve_clips, output, resume_from_checkpoint="latest", max_steps=3, **RUN)
    assert checkpoint.latest_checkpoint(output).name == "checkpoint-step-3"


def test_latest_with_no_checkpoint_yet_starts_from_the_beginning(tiny_model, twelve_clips, tmp_path, capsys):
    """One command for a job and its requeues, even when it was stopped before its first save."""
    output = tmp_path / "out"
    command = dict(RUN, resume_from_checkpoint="latest", save_steps=0, max_steps=1)
    train(tiny_model, twelve_clips, output, **command)
    said = capsys.readouterr().out
    assert f"no checkpoint in {output} yet, starting from the beginning" in said
    # Said again in the banner, where a mistyped --output_model_path would be seen.
    assert f"  resume: no checkpoint in {output}, so a new run from step 0; to continue one, give its " \
           f"--output_model_path" in said.split("***** Running training *****")[1]
    assert checkpoint.read_trainer_state(output / "checkpoint-step-1").progress.step == 1
    # A mistyped --output_model_path starts anew too (it may be a job's first start), and names the run meant.
    said, problems = [], []
    assert find_resume_checkpoint(argparse.Namespace(resume_from_checkpoint="latest"), tmp_path / "outt", problems,
                                  log=said.append) is None
    assert not problems and f"{output} beside it holds checkpoints; to continue that run" in said[0]
    find_resume_checkpoint(argparse.Namespace(resume_from_checkpoint="latest"), tmp_path / "elsewhere", problems,
                           log=said.append)
    assert "beside it" not in said[1]
    # The requeue of a job that then finished: the same command reads that checkpoint and stops there.
    train(tiny_model, twelve_clips, output, **command)
    assert f"already finished: {output / 'checkpoint-step-1'} is at step 1" in capsys.readouterr().out


def test_runs_of_either_precision_follow_each_other_in_one_process(tiny_model, twelve_clips, tmp_path, capsys,
                                                                   monkeypatch):
    """Tests and notebooks call main() again and again: each run gets its own precision (accelerate
    keeps one state per process), the signal handlers are back as they were after each, and the
    model a run trained is freed when main() returns, not by a later garbage collection (one that
    started inside the next run's compilation aborted a whole GPU test run)."""
    from qwen3_tts_sft import training_setup

    trained_modules, real_build_run = [], training_setup.build_run

    def build_run_and_watch(args):
        run = real_build_run(args)
        trained_modules.append(weakref.ref(run.train_module))
        return run

    monkeypatch.setattr(training_setup, "build_run", build_run_and_watch)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    for precision, compute in [("bf16", "compute bf16 autocast"), ("no", "compute fp32")]:
        gc.disable()  # only main() itself may collect
        try:
            train(tiny_model, twelve_clips, tmp_path / precision, max_steps=1, mixed_precision=precision)
        finally:
            gc.enable()
        assert trained_modules[-1]() is None
        printed = capsys.readouterr().out
        assert f"mixed precision: {precision}" in printed and compute in printed
        assert {signum: signal.getsignal(signum) for signum in handlers} == handlers


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


def test_latest_never_writes_over_checkpoints_kept_without_their_training_state(tiny_model, twelve_clips, tmp_path):
    """The recipe says to delete training_state/ from checkpoints kept for listening. `latest` resumes
    from the newest that can be resumed, and refuses when a stripped one lies past it: the run would
    save over it under the same name."""
    output = train(tiny_model, twelve_clips, tmp_path / "out", max_steps=2, save_steps=1, save_total_limit=0)
    shutil.rmtree(output / "checkpoint-step-2" / checkpoint.TRAINING_STATE_DIR)
    (output / "checkpoint-step-2" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as raised:
        train(tiny_model, twelve_clips, output, max_steps=3, save_steps=1, save_total_limit=0,
              resume_from_checkpoint="latest", allow_schedule_change=True)
    assert ("holds checkpoints without their training state (checkpoint-step-2), newer than checkpoint-step-1, "
            "the newest checkpoint it can resume from; resuming would write over them" in str(raised.value))
    shutil.rmtree(output / "checkpoint-step-1" / checkpoint.TRAINING_STATE_DIR)
    with pytest.raises(SystemExit, match=r"\(checkpoint-step-1, checkpoint-step-2\), and none it can resume from;"):
        train(tiny_model, twelve_clips, output, max_steps=3, resume_from_checkpoint="latest")
    with pytest.raises(SystemExit, match="already holds checkpoints"):  # a fresh start into it, likewise
        train(tiny_model, twelve_clips, output, max_steps=1)
    assert (output / "checkpoint-step-2" / "notes.txt").read_text() == "mine"


def test_a_checkpoint_copied_in_part_or_from_another_model_is_named_not_a_traceback(tiny_model, tiny_model_06b,
                                                                                     twelve_clips, tmp_path,
                                                                                     monkeypatch, capsys):
    """Checkpoints carried to another machine: a training state copied in part, a resume given a
    checkpoint's name, the same model at another path, and another model."""
    base = Path(shutil.copytree(tiny_model, tmp_path / "base"))
    output = train(base, twelve_clips, tmp_path / "out", max_steps=2, save_steps=1, save_total_limit=0)
    (output / "checkpoint-step-2" / checkpoint.TRAINING_STATE_DIR / "optimizer.bin").unlink()
    with pytest.raises(SystemExit) as raised:
        train(base, twelve_clips, output, max_steps=3, resume_from_checkpoint="latest", allow_schedule_change=True)
    assert ("checkpoint-step-2: training_state/ is incomplete: optimizer.bin missing or cut short (an interrupted "
            "copy?)" in str(raised.value))

    # A checkpoint's name, as the trainer prints it, from another working directory; the model moved.
    shutil.rmtree(output / "checkpoint-step-2")
    moved = Path(shutil.copytree(base, tmp_path / "moved_base"))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    train(moved, os.path.relpath(twelve_clips), output, max_steps=2, resume_from_checkpoint="checkpoint-step-1")
    [changed] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resuming with changed")]
    assert checkpoint.latest_checkpoint(output).name == "checkpoint-step-2"
    assert f"--init_model_path {base} -> {moved}" in changed and "--train_jsonl" not in changed  # the same file

    shutil.rmtree(output / "checkpoint-step-2")
    with pytest.raises(SystemExit, match="another model \\(their config.json differ\\)"):
        train(tiny_model_06b, twelve_clips, output, max_steps=2, resume_from_checkpoint="latest")
    shutil.rmtree(base)  # the model the run started from is gone: the weights themselves do not fit
    with pytest.raises(SystemExit, match="its weights do not fit the model being trained \\(size mismatch"):
        train(tiny_model_06b, twelve_clips, output, max_steps=2, resume_from_checkpoint="latest")


def test_a_starting_model_and_the_output_folder_must_not_hold_each_other(tiny_model, tmp_path):
    """Starting from a checkpoint inside the output folder, --overwrite_output_dir (which the refusal to
    overwrite suggests) would delete it; an output inside the starting model's folder would be copied
    into each of its own checkpoints."""
    import sft_12hz_chatterbox

    inner = tmp_path / "out" / "checkpoint-epoch-0"
    shutil.copytree(tiny_model, inner)
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")

    def refusal(init, output, *flags):
        args = sft_12hz_chatterbox.parse_args(["--init_model_path", str(init), "--train_jsonl", str(data),
                                               "--output_model_path", str(output), *flags])
        with pytest.raises(SystemExit) as raised:
            sft_12hz_chatterbox.check_args(args)
        return str(raised.value)

    assert "lies inside, --output_model_path" in refusal(inner, tmp_path / "out", "--overwrite_output_dir")
    assert "lies inside --init_model_path" in refusal(inner, inner / "second_run")
    (tmp_path / "a_file").write_text("")
    assert "is a file, not a folder" in refusal(tiny_model, tmp_path / "a_file" / "out")
    for flags, problem in ((["--lora_rank", "-2"], "--lora_rank must not be negative"),
                           (["--lora_rank", "4", "--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)"),
                           (["--lora_rank", "4", "--lora_alpha", "0"], "--lora_alpha must be positive"),
                           (["--num_workers", "-1"], "--num_workers must not be negative")):
        assert problem in refusal(tiny_model, tmp_path / "out2", *flags)
    assert inner.is_dir()


def test_a_resume_refuses_flags_that_would_change_the_run_by_name(tiny_model, twelve_clips, tmp_path):
    """Each refused before the model loads: --eval_split would move trained clips into the eval set,
    AdamW's saved state keeps the old --weight_decay, the others change the loss, the adapters' scale
    or which weights train (the optimizer state would not load)."""
    output = train(tiny_model, twelve_clips, tmp_path / "out", max_steps=1, save_steps=1)
    lora_output = train(tiny_model, twelve_clips, tmp_path / "lora", max_steps=1, save_steps=1, lora_rank=2)
    for folder, flags, refusal in [
            (output, dict(eval_split=0.25), "--eval_split is 0.25 but the checkpoint was made with 0.0"),
            (output, dict(weight_decay=0.1), "--weight_decay is 0.1 but the checkpoint was made with 0.01"),
            (output, dict(code_predictor_loss_weight=0.5),
             "--code_predictor_loss_weight is 0.5 but the checkpoint was made with 0.3"),
            (output, dict(train_text_embedding=True), "--train_text_embedding is True but the checkpoint was made with False"),
            (output, dict(train_speaker_encoder=True),
             "--train_speaker_encoder is True but the checkpoint was made with False"),
            (lora_output, dict(lora_rank=2, lora_alpha=8), "--lora_alpha is 8.0 but the checkpoint was made with None"),
            (lora_output, dict(lora_rank=2, lora_target_modules="q_proj"),
             "--lora_target_modules is q_proj but the checkpoint was made with None")]:
        with pytest.raises(SystemExit) as raised:
            train(tiny_model, twelve_clips, folder, max_steps=2, save_steps=1, resume_from_checkpoint="latest",
                  allow_schedule_change=True, **flags)
        assert refusal in str(raised.value) and "Traceback" not in str(raised.value)
        if "train_" in refusal or "target_modules" in refusal:
            assert f"start a new run from the checkpoint: --init_model_path {folder / 'checkpoint-step-1'}" in str(
                raised.value)
    # The same choice spelt otherwise is no change: the default modules, in another order, with spaces.
    from qwen3_tts_sft.lora import DEFAULT_TARGET_MODULES

    same_modules = ", ".join(reversed(DEFAULT_TARGET_MODULES.split(",")))
    train(tiny_model, twelve_clips, lora_output, max_steps=2, save_steps=1, resume_from_checkpoint="latest",
          allow_schedule_change=True, lora_rank=2, lora_target_modules=same_modules)
    assert checkpoint.latest_checkpoint(lora_output).name == "checkpoint-step-2"


def test_a_resume_on_other_eval_data_is_refused_by_name(tiny_model, twelve_clips, tmp_path):
    """The best checkpoint is chosen by comparing the evaluations' eval losses: a resume that measured other
    clips would compare losses of different data. The same clips in a copy at another path are no change."""
    rows = read_jsonl(twelve_clips)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", rows[:4])
    output = train(tiny_model, twelve_clips, tmp_path / "out", max_steps=1, save_steps=1, eval_jsonl=held_out)
    other = write_jsonl(tmp_path / "other.jsonl", rows[4:8])
    with pytest.raises(SystemExit) as raised:
        train(tiny_model, twelve_clips, output, max_steps=2, save_steps=1, resume_from_checkpoint="latest",
              allow_schedule_change=True, eval_jsonl=other)
    assert f"--eval_jsonl {other} holds other content than {held_out}, which the run's evaluations" in str(raised.value)
    assert f"--init_model_path {output / 'checkpoint-step-1'}" in str(raised.value)
    moved = tmp_path / "moved.jsonl"
    shutil.copy(held_out, moved)
    train(tiny_model, twelve_clips, output, max_steps=2, save_steps=1, resume_from_checkpoint="latest",
          allow_schedule_change=True, eval_jsonl=moved)
    assert [entry["step"] for entry in checkpoint.read_trainer_state(output / "checkpoint-step-2").progress.evaluations] == [1, 2]


def test_a_damaged_checkpoint_is_named_not_a_traceback(tiny_model, twelve_clips, tmp_path):
    """Garbage in trainer_state.json: `latest` names the checkpoint, as it names one copied in part.
    A training-state file of the right size but damaged (which files.json cannot tell): named, with
    what to do."""
    output = train(tiny_model, twelve_clips, tmp_path / "out", max_steps=2, save_steps=1, save_total_limit=0)
    state_file = output / "checkpoint-step-2" / checkpoint.TRAINER_STATE
    whole = state_file.read_bytes()
    state_file.write_bytes(b"\x00garbage" * 10)
    assert [folder.name for folder in checkpoint.list_checkpoints(output)] == ["checkpoint-step-1"]
    with pytest.raises(SystemExit) as raised:
        train(tiny_model, twelve_clips, output, max_steps=3, resume_from_checkpoint="latest", allow_schedule_change=True)
    assert ("holds checkpoints that cannot be resumed from (checkpoint-step-2: its trainer_state.json is damaged "
            "(not readable JSON with a step)), newer than checkpoint-step-1, the newest checkpoint it can resume "
            "from. Copy them again whole, or delete them to resume from checkpoint-step-1") in str(raised.value)

    state_file.write_bytes(whole)
    optimizer_state = output / "checkpoint-step-2" / checkpoint.TRAINING_STATE_DIR / "optimizer.bin"
    whole_optimizer_state = optimizer_state.read_bytes()
    optimizer_state.write_bytes(os.urandom(optimizer_state.stat().st_size))
    with pytest.raises(SystemExit) as raised:
        train(tiny_model, twelve_clips, output, max_steps=3, resume_from_checkpoint="latest", allow_schedule_change=True)
    message = str(raised.value)
    assert f"cannot resume from {output / 'checkpoint-step-2'}: training_state/optimizer.bin is damaged (" in message
    assert f"move checkpoint-step-2 out of {output} and pass --resume_from_checkpoint latest" in message

    # accelerate itself passes over random streams it cannot read: the resume would not be the run's.
    optimizer_state.write_bytes(whole_optimizer_state)
    [random_states] = (output / "checkpoint-step-2" / checkpoint.TRAINING_STATE_DIR).glob("random_states_*.pkl")
    random_states.write_bytes(os.urandom(random_states.stat().st_size))
    with pytest.raises(SystemExit, match=f"training_state/{random_states.name} is damaged \\(the random streams do "
                                         f"not read\\)"):
        train(tiny_model, twelve_clips, output, max_steps=3, resume_from_checkpoint="latest", allow_schedule_change=True)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_the_libraries_load_says_nothing_was_saved(tiny_model, twelve_clips, tmp_path,
                                                                       stop_signal):
    """The first seconds go to importing torch and the model code: the signals are handled before."""
    process = subprocess.Popen(trainer_command(tiny_model, twelve_clips, tmp_path / "out"), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text():  # importing torch
        assert process.poll() is None and time.monotonic() < deadline, "the trainer never imported torch"
        time.sleep(0.002)
    process.send_signal(stop_signal)
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 128 + stop_signal, errors[-3000:]
    assert f"stopped by {stop_signal.name} while setting up, before the first step: nothing was trained" in errors
    assert "Traceback" not in errors


def test_a_second_ctrl_c_stops_at_once_naming_the_last_checkpoint(tiny_model, twelve_clips, tmp_path):
    output = tmp_path / "out"
    process = start_and_wait_for(trainer_command(tiny_model, twelve_clips, output), "train step 3/",
                                 stderr=subprocess.PIPE)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, errors[-3000:]
    assert "Traceback" not in errors
    latest = checkpoint.latest_checkpoint(output)
    assert errors.strip().splitlines()[-1] == (
        f"stopped at once by SIGINT: nothing was saved beyond the last checkpoint, {latest}. Continue "
        f"with --resume_from_checkpoint latest")


def test_a_signal_once_the_training_loop_is_over_stops_at_once_without_a_traceback(tmp_path, capsys):
    """After the loop (its state saved: the end summary, freeing memory) a stop signal has nothing left
    to save: it stops at once, in the one line a second Ctrl-C gives, not with a KeyboardInterrupt."""
    import os

    from sft_12hz_chatterbox import StopNow

    with pytest.raises(SystemExit) as stopped:
        with StopNow(tmp_path):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler runs at once; this is never reached
    assert stopped.value.code == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip() == ("stopped at once by SIGINT: nothing was saved beyond the start (no "
                                               "checkpoint yet). Continue with --resume_from_checkpoint latest")
