"""Two processes give the result of one process with the same clips per step, and write one checkpoint.

The processes are started with torch.distributed.run, which is what `accelerate launch
--multi_gpu` runs on GPUs; here they run on the CPU and talk through gloo, on a GPU machine too
(where one GPU could not give each process its own, and fp32 on the CPU is what the comparison
needs). accelerate enables FSDP only on GPUs, so accelerate_configs/fsdp.yaml is not exercised here.
"""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qwen3_tts_sft import checkpoint, scoring
from helpers import ROOT, trainer_argv

FLAGS = dict(num_epochs=2, lr=1e-3, warmup_steps=1, save_steps=0)


def train_on_cpu(launcher: list, model_dir, data, output, **flags) -> subprocess.CompletedProcess:
    """The trainer in child processes that see no GPU, started by `launcher` (nothing: one process)."""
    command = [sys.executable, *launcher, "sft_12hz_chatterbox.py",
               *trainer_argv(model_dir, data, output, **FLAGS, **flags)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def one_process_run(tiny_model, coded_clips, tmp_path_factory):
    """One process: 2 clips a micro-batch x 2 accumulation = 4 clips a step."""
    output = tmp_path_factory.mktemp("one") / "out"
    train_on_cpu([], tiny_model, coded_clips, output, batch_size=2, gradient_accumulation_steps=2)
    return output


def test_two_processes_match_one_process_and_save_once(tiny_model, coded_clips, one_process_run, tmp_path):
    # Two processes: 2 clips each x 1 accumulation = the same 4 clips a step. The main process speaks
    # at steps 2 and 4 while the other waits (scoring.py); training is the same.
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("Hi.\n")
    result = train_on_cpu(["-m", "torch.distributed.run", "--nproc_per_node", "2"], tiny_model, coded_clips,
                          tmp_path / "two", batch_size=2, gradient_accumulation_steps=1, eval_generate_steps=2,
                          eval_sentences=sentences, eval_max_new_tokens=4)
    assert "2 per process x 1 accumulation x 2 processes = 4 clips per step" in result.stdout
    assert "processes: 2 (MULTI_CPU)" in result.stdout
    assert result.stdout.count("train step 1/") == 1  # only the main process logs
    assert result.stdout.count("listen step 2: ") == result.stdout.count("listen step 4: ") == 1
    assert [entry["step"] for entry in scoring.read_scores(tmp_path / "two" / scoring.SCORES_FILE)] == [2, 4]
    assert "flash-attn" not in result.stdout + result.stderr and "SoX" not in result.stdout + result.stderr
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-epoch-0", "checkpoint-epoch-1"]
    # No partial or duplicate folders; the run lock (checkpoint.OUTPUT_LOCK) stays, as lock files do.
    assert [path.name for path in (tmp_path / "two").glob(".*")] == [checkpoint.OUTPUT_LOCK]

    one = load_file(one_process_run / "checkpoint-epoch-1" / checkpoint.TRAINING_STATE_DIR / "model.safetensors")
    two = load_file(tmp_path / "two" / "checkpoint-epoch-1" / checkpoint.TRAINING_STATE_DIR / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-6), name
    assert checkpoint.read_trainer_state(tmp_path / "two" / "checkpoint-epoch-1").num_processes == 2
    base = load_file(tiny_model / "model.safetensors")
    trained = [name for name in one if not torch.equal(one[name], base[name.removeprefix("model.")].float())]
    assert trained  # the comparison is between trained weights, not two copies of the base
    exported_one = load_file(one_process_run / "checkpoint-epoch-1" / checkpoint.MODEL_WEIGHTS)
    exported_two = load_file(tmp_path / "two" / "checkpoint-epoch-1" / checkpoint.MODEL_WEIGHTS)
    assert exported_one.keys() == exported_two.keys()
    assert all(torch.allclose(exported_one[n].float(), exported_two[n].float(), rtol=1e-2, atol=1e-3) for n in exported_one)


def test_a_requeue_with_another_number_of_processes_says_how_to_launch_it(tiny_model, coded_clips, one_process_run):
    """A job requeued onto a node with another GPU count: refused before the model loads, naming the
    checkpoint and the launch that resumes it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "sft_12hz_chatterbox.py",
               *trainer_argv(tiny_model, coded_clips, one_process_run, **FLAGS, batch_size=2,
                             gradient_accumulation_steps=2, resume_from_checkpoint="latest")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))
    assert result.returncode != 0
    assert f"cannot resume {one_process_run / 'checkpoint-epoch-1'}:" in result.stderr, result.stderr[-3000:]
    assert ("2 processes but the checkpoint was made with 1 (each process saved its own data position and random "
            "state): resume with python, or accelerate launch --num_processes 1") in result.stderr
