"""`--torch_compile layers` (the GPU default): all talker layers share one compiled graph, all code
predictor layers another, and the compiled forward and backward compute what eager mode computes,
for batches of different lengths without recompiling.

The real GPU compiler (inductor) needs CUDA to pay off and a C++ toolchain on CPU, so the
numerical check uses the `aot_eager` backend: the same captured forward and backward graphs,
run by eager kernels.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from qwen3_tts_sft.sequence_layout import SpecialIds, collate
from qwen3_tts_sft.talker_step import TalkerTrainingModel
from qwen3_tts_sft.training_setup import compile_layers
from qwen3_tts_sft.training_data import TalkerDataset, make_prompter, read_clips


@pytest.fixture(scope="module")
def model_and_batches(tiny_model, coded_clips):
    from qwen_tts import Qwen3TTSModel

    tts = Qwen3TTSModel.from_pretrained(str(tiny_model), dtype=torch.float32)
    ids = SpecialIds.from_config(tts.model.config)
    clips = read_clips(coded_clips, ids, prompter=make_prompter(tts.processor, tts.model.config))
    clips.sort(key=lambda clip: len(clip.codes))
    speakers = {name: index for index, name in enumerate(sorted({clip.speaker for clip in clips}))}
    dataset = TalkerDataset(clips, ids, speakers)
    short, long = collate([dataset[0], dataset[1]]), collate([dataset[5], dataset[6], dataset[7]])
    assert short.is_real.shape[1] != long.is_real.shape[1] and short.target_codes.shape[0] != long.target_codes.shape[0]
    vectors = torch.randn(len(speakers), tts.model.config.talker_config.hidden_size)
    return tts.model, vectors, [short, long]


def losses_and_gradients(module, batch):
    module.zero_grad(set_to_none=True)
    out = module(batch)
    loss = out.codec0_loss_sum / batch.num_codec0_targets + 0.3 * out.code_predictor_loss_sum / batch.num_code_predictor_targets
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return out.codec0_loss_sum.detach(), out.code_predictor_loss_sum.detach(), gradients


def leave_eager(model):
    """Undo compile_layers on the shared model: dynamo's caches emptied, every layer eager again."""
    torch._dynamo.reset()
    for layer in list(model.talker.model.layers) + list(model.talker.code_predictor.model.layers):
        layer._compiled_call_impl = None


def test_training_forward_has_no_graph_break(model_and_batches):
    """The whole forward traces as one graph, so nothing in it forces a graph break inside a compiled
    region; compiling it whole was tried and takes too long to compile (bench_notes.md)."""
    model, vectors, batches = model_and_batches
    module = TalkerTrainingModel(model, speaker_vectors=vectors).train()
    explanation = torch._dynamo.explain(module.forward)(batches[0])
    assert explanation.graph_break_count == 0, [str(reason.reason) for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compiled_layers_match_eager_for_any_length(model_and_batches, monkeypatch):
    model, vectors, batches = model_and_batches
    module = TalkerTrainingModel(model, speaker_vectors=vectors).train()
    eager = [losses_and_gradients(module, batch) for batch in batches]

    torch._dynamo.reset()
    counters.clear()
    compile_layers(model, backend="aot_eager")  # inductor's C++ build is slow on CPU
    compiled = [losses_and_gradients(module, batches[0])]
    with torch._dynamo.config.patch(error_on_recompile=True):  # the other length reuses the graphs
        compiled.append(losses_and_gradients(module, batches[1]))
    assert counters["stats"]["unique_graphs"] == 2  # one for every talker layer, one for every code predictor layer
    assert not counters["graph_break"]
    leave_eager(model)

    for (codec0, sub, grads), (codec0_c, sub_c, grads_c) in zip(eager, compiled):
        assert torch.allclose(codec0, codec0_c, rtol=1e-5) and torch.allclose(sub, sub_c, rtol=1e-5)
        assert grads.keys() == grads_c.keys() and len(grads) > 50
        for name in grads:
            assert torch.allclose(grads[name], grads_c[name], rtol=1e-4, atol=1e-6), name


def test_lora_layers_compile_once_though_nothing_before_them_trains(tiny_model, model_and_batches):
    """With LoRA nothing before the first talker layer trains; its input is marked as needing a
    gradient anyway, so the first layer shares the graph of the others instead of compiling its own
    (the guard on requires_grad): one compile fewer before the first step."""
    from qwen_tts import Qwen3TTSModel

    from qwen3_tts_sft import lora

    _, vectors, batches = model_and_batches
    model = Qwen3TTSModel.from_pretrained(str(tiny_model), dtype=torch.float32).model
    lora.add_adapters(model, rank=4, alpha=8, dropout=0.0, target_modules=lora.DEFAULT_TARGET_MODULES)
    module = TalkerTrainingModel(model, speaker_vectors=vectors).train()
    torch._dynamo.reset()
    counters.clear()
    try:
        compile_layers(model, backend="eager")  # dynamo's guards alone decide what recompiles
        _, _, gradients = losses_and_gradients(module, batches[0])
        assert counters["stats"]["unique_graphs"] == 2
    finally:
        torch._dynamo.reset()
    assert gradients and all(".lora_" in name for name in gradients)


def test_gradient_checkpointing_inside_compiled_layers_gives_the_eager_gradient(model_and_batches, monkeypatch):
    """--gradient_checkpointing with the GPU default: each compiled layer is recomputed in the backward."""
    model, vectors, batches = model_and_batches
    module = TalkerTrainingModel(model, speaker_vectors=vectors).train()
    _, _, eager = losses_and_gradients(module, batches[1])

    torch._dynamo.reset()
    model.talker.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
    compile_layers(model, backend="aot_eager")  # inductor's C++ build is slow on CPU
    layer_calls = []
    hook = model.talker.model.layers[0].register_forward_pre_hook(lambda *_: layer_calls.append(1))
    try:
        _, _, checkpointed = losses_and_gradients(module, batches[1])
    finally:
        hook.remove()
        model.talker.gradient_checkpointing_disable()
        leave_eager(model)
    assert len(layer_calls) == 2  # forward, then the recomputation in the backward
    assert eager.keys() == checkpointed.keys()
    assert all(torch.allclose(eager[name], checkpointed[name], rtol=1e-4, atol=1e-6) for name in eager)


def test_low_memory_recomputes_the_code_predictor_layers_with_the_same_graphs_and_gradient(model_and_batches):
    """--low_memory recomputes the compiled code-predictor layers in the backward: the talker's
    layers run once, the code predictor's twice, no layer compiles a second graph for it (each
    compile costs seconds before the first step), and the gradient is the eager one."""
    from types import SimpleNamespace

    from qwen3_tts_sft.training_setup import recompute_layers

    model, vectors, batches = model_and_batches
    module = TalkerTrainingModel(model, speaker_vectors=vectors).train()
    _, _, eager = losses_and_gradients(module, batches[1])

    torch._dynamo.reset()
    counters.clear()
    recompute_layers(model, SimpleNamespace(gradient_checkpointing=False, low_memory=True, lora_rank=0, lora_dropout=0))
    compile_layers(model, backend="aot_eager")
    talker_calls, predictor_calls = [], []
    hooks = [model.talker.model.layers[0].register_forward_pre_hook(lambda *_: talker_calls.append(1)),
             model.talker.code_predictor.model.layers[0].register_forward_pre_hook(lambda *_: predictor_calls.append(1))]
    try:
        losses_and_gradients(module, batches[0])
        with torch._dynamo.config.patch(error_on_recompile=True):
            _, _, recomputed = losses_and_gradients(module, batches[1])
        graphs = counters["stats"]["unique_graphs"]
    finally:
        for hook in hooks:
            hook.remove()
        model.talker.code_predictor.gradient_checkpointing_disable()
        leave_eager(model)
    assert (len(talker_calls), len(predictor_calls)) == (2, 4)  # two batches: once, and forward + recomputation
    assert graphs == 2
    assert eager.keys() == recomputed.keys()
    assert all(torch.allclose(eager[name], recomputed[name], rtol=1e-4, atol=1e-6) for name in eager)


def code_predictor_graphs_over_frame_counts(model, frame_counts) -> int:
    """Graphs dynamo compiled for the code predictor's layers (inductor, on the GPU) over a forward
    and backward at each frame count."""
    code_predictor = model.talker.code_predictor.model
    hidden_size = code_predictor.config.hidden_size
    torch._dynamo.reset()
    counters.clear()
    compile_layers(model)
    try:
        for frames in frame_counts:
            embeds = torch.randn(frames, 16, hidden_size, device="cuda", requires_grad=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                hidden = code_predictor(inputs_embeds=embeds, use_cache=False).last_hidden_state
            hidden.float().square().mean().backward()
        return counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()  # the model is the caller's own: its compiled layers go with it


@pytest.mark.gpu  # inductor's GPU fusion choices
def test_a_layer_compiles_once_for_few_and_many_frames(tiny_model):
    """Inductor fuses a norm's backward sums only above 5 Mi elements, a guard on the batch size by
    default: on 1.7B the code predictor's layer compiled again whenever a micro-batch crossed 320
    frames (~10 s each). With the trainer's inductor options one graph serves both sides."""
    from qwen_tts import Qwen3TTSModel

    model = Qwen3TTSModel.from_pretrained(str(tiny_model), dtype=torch.float32).model.cuda()
    hidden_size = model.talker.code_predictor.config.hidden_size
    above = 5 * 2**20 // (16 * hidden_size) + 64  # frames x 16 positions x hidden above 5 Mi elements
    assert code_predictor_graphs_over_frame_counts(model, [64, above, 128]) == 1


def test_a_layer_recomputed_on_another_thread_compiles_once():
    """On a GPU autograd recomputes a checkpointed layer on its own thread, whose CPU thread count is the
    one last set anywhere in the process (the DataLoader's pin-memory thread sets 1), and compiled code
    guards on the count. Here the backward runs on a thread with another count, as it does there: the
    recomputation takes the forward's count and reuses its graph; plain checkpointing compiles again."""
    import threading

    from qwen3_tts_sft.training_setup import checkpoint_with_the_forwards_thread_count

    def compiles_of(checkpoint_function) -> int:
        torch._dynamo.reset()
        compiled = []
        layer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.SiLU())
        layer.compile(dynamic=True, backend=lambda graph, inputs: compiled.append(graph) or graph.forward)
        inputs = torch.randn(3, 8, requires_grad=True)
        loss = checkpoint_function(layer, inputs, use_reentrant=False, preserve_rng_state=False).sum()

        def backward_elsewhere():
            torch.set_num_threads(1)
            loss.backward()

        backward = threading.Thread(target=backward_elsewhere)
        backward.start()
        backward.join()
        assert inputs.grad is not None
        return len(compiled)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert compiles_of(torch.utils.checkpoint.checkpoint) == 2  # the failure this guards against
        assert compiles_of(checkpoint_with_the_forwards_thread_count) == 1
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()


@pytest.mark.gpu
def test_on_a_gpu_the_layers_low_memory_recomputes_compile_once(tmp_path):
    """On a GPU autograd runs the backward, and so the recomputation of the code predictor's layers
    under --low_memory, on a thread of its own, whose CPU thread count compiled code checks. Each
    layer should compile once all the same. In a process of its own, with torch's default thread
    counts: autograd's thread starts at its first backward."""
    import json
    import os
    import subprocess
    import sys

    from helpers import ROOT

    environment = {name: value for name, value in os.environ.items()
                   if name not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}  # pytest's workers set them
    result = subprocess.run([sys.executable, "bench/bench.py", "--size", "tiny", "--warmup", "1", "--steps", "1",
                             "--clips", "16", "--work_dir", str(tmp_path), "--json", str(tmp_path / "result.json"),
                             "--trainer_flags=--low_memory"],
                            cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The talker's layer, the code predictor's layer and the update, each compiled once.
    assert json.loads((tmp_path / "result.json").read_text())["compiled_graphs"] == 3
