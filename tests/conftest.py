"""The `gpu` marker, fresh compiler caches for each file, and the session fixtures: the tiny model
folder and a small coded dataset, built once per test run."""

import os

import pytest

from helpers import read_jsonl, write_jsonl

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Tests spread over worker processes (pytest -n): each takes its share of the cores, for itself and
    # the commands it starts, or the workers' torch thread pools fight over the same cores.
    threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)

# The tests on a GPU run with the CUDA allocator's settings of the trainer's runs.
from qwen3_tts_sft.training_setup import use_expandable_segments  # noqa: E402

use_expandable_segments()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA GPU: without one they are skipped (CI), with one they run with the rest."""
    import torch

    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="module", autouse=True)
def fresh_compiler_caches():
    """Each test file starts with torch.compile's caches empty, as a process of its own would. On a GPU
    the layers compile in every run; the variants left by other files' runs (precisions, LoRA, batch
    sizes) would pile up, and past torch's recompile limit a layer runs eager, unlike in the trainer
    processes that some tests compare with."""
    import torch

    torch._dynamo.reset()
    yield
    if torch.cuda.is_available():
        # What this file's runs left (compiled graphs, CUDA graphs and their pools) is freed here,
        # between files, not by a garbage collection that happens to start inside the next file's
        # compilation (one whole-suite GPU run aborted in torch.compile's fake-tensor cache during one).
        import gc

        gc.collect()
        torch.cuda.synchronize()
        torch._dynamo.reset()
        torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Qwen3-TTS Base model folder, 1.7B-shaped."""
    from qwen3_tts_sft import tiny_model

    return tiny_model.write_model_dir(tmp_path_factory.mktemp("tiny") / "base", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model_06b(tmp_path_factory):
    """A tiny random model shaped like 0.6B: the text width differs from the talker width."""
    from qwen3_tts_sft import tiny_model

    return tiny_model.write_model_dir(tmp_path_factory.mktemp("tiny06") / "base", size="tiny-0.6b", seed=1)


@pytest.fixture(scope="session")
def coded_clips(tmp_path_factory, tiny_model):
    """Eight synthetic clips of two speakers (auto and English), coded by prepare_codes.py, as
    recorded: not trimmed or normalised (the trainer tests, test_overfit_speaks_the_clip among
    them, were written against the codes of these clips as they are)."""
    import prepare_codes
    from qwen3_tts_sft import tiny_model as tiny

    folder = tmp_path_factory.mktemp("clips")
    raw = tiny.write_synthetic_clips(folder, count=8, seed=0, speakers=("alice", "bob"), languages=("auto", "english"))
    coded = folder / "train_with_codes.jsonl"
    prepare_codes.main(["--tokenizer_model_path", str(tiny_model / "speech_tokenizer"), "--input_jsonl", str(raw),
                        "--output_jsonl", str(coded), "--batch_size", "4", "--device", "cpu",
                        "--no_trim", "--no_loudness_normalisation"])
    return coded


@pytest.fixture
def one_clip_jsonl(coded_clips, tmp_path):
    """A file holding one clip, for single-clip experiments."""
    return write_jsonl(tmp_path / "one.jsonl", read_jsonl(coded_clips)[:1])
