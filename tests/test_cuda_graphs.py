"""CUDA graphs (cuda_graphs.py): replayed micro-batches train exactly as eager ones.

The GPU tests (marked `gpu`) skip on a machine without CUDA (CI); `python -m pytest -m gpu` runs
them on a GPU machine, and so does the whole suite there.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwen3_tts_sft import checkpoint
from helpers import GPU_DEFAULT_PATH, ROOT, build_run, read_jsonl, train, write_jsonl
from qwen3_tts_sft import training_data


@pytest.fixture(scope="module")
def repeated_clips(coded_clips, tmp_path_factory):
    """Each of the 8 clips four times: at batch size 1 every shape is recorded and replayed."""
    return write_jsonl(tmp_path_factory.mktemp("repeated") / "train.jsonl", read_jsonl(coded_clips) * 4)


def train_steps(model_dir, data, out_dir, cuda_graphs: str, before_training=None, **flags):
    """Every step of one epoch through TrainingRun.optimizer_step; returns (per-step losses, weights, run).
    The layers compiled as on a GPU by default, unless `flags` say otherwise."""
    run = build_run(model_dir, data, out_dir, batch_size=1, gradient_accumulation_steps=4, lr=1e-3,
                    lr_scheduler="constant_with_warmup", **dict(GPU_DEFAULT_PATH, **flags, cuda_graphs=cuda_graphs))
    if before_training is not None:
        before_training(run)
    losses = []
    for step in run.steps():
        run.optimizer_step(step, stop_asked=False)
        losses.append(run.last_loss)
    # The trained weights: the fp32 master copies where the weights are bf16 (the GPU default).
    weights = {name: p.detach().float().cpu() for name, p in run.train_module.named_parameters() if p.requires_grad}
    weights.update({name: master.cpu() for name, master in run.master_weights().items()})
    return losses, weights, run


def initial_weights(model_dir, names):
    """The trained weights as the run loads them: the base model's, in fp32."""
    base = load_file(Path(model_dir) / checkpoint.MODEL_WEIGHTS)
    return {name: base[name.removeprefix(checkpoint.TRAINING_MODULE_PREFIX)].float() for name in names}


def assert_same_training(model_dir, eager, graphs):
    """Same per-step losses, and weights within 1% of how far training moved them."""
    (eager_losses, eager_weights, _), (graph_losses, graph_weights, _) = eager, graphs
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4)
    initial = initial_weights(model_dir, eager_weights)
    moved = max((eager_weights[name] - initial[name]).abs().max().item() for name in initial)
    differ = max((eager_weights[name] - graph_weights[name]).abs().max().item() for name in initial)
    assert moved > 1e-3 and differ < 0.01 * moved


@pytest.fixture(scope="module")
def eager_training(tiny_model, repeated_clips, tmp_path_factory):
    return train_steps(tiny_model, repeated_clips, tmp_path_factory.mktemp("eager"), "no")


@pytest.fixture(scope="module")
def graph_training(tiny_model, repeated_clips, tmp_path_factory):
    # Recordings made free: a batch-shape table of several sizes, so several graphs share the pool.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training_data, "RECORDING_COST_IN_MICRO_BATCHES", 0)
        return train_steps(tiny_model, repeated_clips, tmp_path_factory.mktemp("graphs"), "yes")


@pytest.mark.gpu
def test_replayed_micro_batches_train_as_eager_ones(tiny_model, eager_training, graph_training):
    graphs = graph_training
    recorded = graphs[2].graphs.recorded
    assert len(recorded) >= 2 and set(recorded) == graphs[2].graphs.warmed_up  # every shape warmed up, then recorded
    assert_same_training(tiny_model, eager_training, graphs)


@pytest.mark.gpu
def test_graphs_are_dropped_where_memory_is_short(tiny_model, repeated_clips, tmp_path, eager_training, monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 80 * 10**9))  # a full GPU
    graphs = train_steps(tiny_model, repeated_clips, tmp_path / "graphs", "auto")
    assert not graphs[2].graphs.enabled and not graphs[2].graphs.recorded
    assert_same_training(tiny_model, eager_training, graphs)


@pytest.mark.gpu
def test_low_memory_recomputation_inside_recorded_micro_batches_trains_as_eager(tiny_model, repeated_clips, tmp_path):
    """--low_memory recomputes the code predictor's layers in each backward, and that recomputation
    is recorded with the rest of the micro-batch: replayed, it trains as the eager run does."""
    eager = train_steps(tiny_model, repeated_clips, tmp_path / "eager", "no", low_memory=True)
    graphs = train_steps(tiny_model, repeated_clips, tmp_path / "graphs", "yes", low_memory=True)
    run = graphs[2]
    assert run.graphs.recorded
    assert run.accelerator.unwrap_model(run.train_module).talker.code_predictor.model.layers[0].gradient_checkpointing
    assert graphs[0] == pytest.approx(eager[0], rel=1e-3)
    # bf16 weights rounded stochastically: a gradient that differs in its last bits may round a weight
    # the other way, one bf16 step (2**-8 of it), so weights are compared to a few such steps.
    initial = initial_weights(tiny_model, eager[1])
    moved = max((eager[1][name] - initial[name]).abs().max().item() for name in initial)
    differ = max((eager[1][name] - graphs[1][name]).abs().max().item() for name in initial)
    assert moved > 1e-3 and differ < 0.1 * moved


def train_with_a_host_sync_while_recording(model_dir, data, out_dir):
    """Training whose forward reads a value on the host while being recorded (as a .item() in a
    model would): the recording fails."""
    def host_sync_while_recording(module, args):
        if torch.cuda.is_current_stream_capturing():
            args[0].codec_ids.sum().item()

    train_steps(model_dir, data, out_dir, "yes",
                lambda run: run.train_module.register_forward_pre_hook(host_sync_while_recording),
                torch_compile="no")  # a process of its own would compile the layers afresh; they are not the point


@pytest.mark.gpu
def test_a_failed_recording_stops_with_what_to_do(tiny_model, repeated_clips, tmp_path):
    # In a child process: a failed recording leaves CUDA unusable in its process.
    code = ("import sys; import test_cuda_graphs as t; "
            "t.train_with_a_host_sync_while_recording(*sys.argv[1:])")
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", code, str(tiny_model), str(repeated_clips), str(tmp_path)],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=path), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "recording the CUDA graph of a micro-batch of shape" in result.stderr
    assert "Resume from the last checkpoint with --cuda_graphs no" in result.stderr


@pytest.mark.gpu
def test_replacing_a_recorded_gradient_is_refused(graph_training):
    _, _, run = graph_training
    run.optimizer.zero_grad(set_to_none=True)  # what the eager loop does; the graphs hold the old tensors
    recorded = next(iter(run.graphs.recorded.values()))
    with pytest.raises(RuntimeError, match="set_to_none=False"):
        run.graphs.forward_backward(recorded.batch, recorded.loss_weights)


@pytest.mark.gpu
def test_trainer_cli_with_graphs_evaluates_and_saves(tiny_model, repeated_clips, tmp_path):
    out = train(tiny_model, repeated_clips, tmp_path / "run", batch_size=1, gradient_accumulation_steps=2,
                eval_split=0.25, save_steps=0, **dict(GPU_DEFAULT_PATH, cuda_graphs="yes"))
    assert (out / "checkpoint-epoch-0" / "model.safetensors").is_file()


def test_cuda_graphs_yes_where_they_cannot_work_is_refused_before_the_model_loads(tiny_model, coded_clips, tmp_path,
                                                                                  monkeypatch):
    from qwen3_tts_sft import training_setup

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were refused")

    monkeypatch.setattr(training_setup, "load_base_model", no_model)
    with pytest.raises(SystemExit, match="--cuda_graphs yes: .*--gradient_checkpointing"):
        build_run(tiny_model, coded_clips, tmp_path, gradient_checkpointing=True, cuda_graphs="yes")
    monkeypatch.undo()
    # auto falls back to eager instead
    assert build_run(tiny_model, coded_clips, tmp_path, gradient_checkpointing=True, cuda_graphs="auto").graphs is None
