"""--low_memory: bf16 weights and AdamW moments with stochastic rounding still train like fp32 AdamW;
--gradient_checkpointing changes memory, not the gradient; training processes hold their GPU memory
in expandable segments."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qwen3_tts_sft import checkpoint
from qwen3_tts_sft.bf16_adamw import Bf16WeightsAdamW, round_to_bf16_stochastically
from qwen3_tts_sft.training_setup import CUDA_ALLOCATOR_SETTINGS, use_expandable_segments
from helpers import adamw_steps, build_run, train


def test_stochastic_rounding_is_exact_on_average():
    key = torch.tensor(12345.0)
    for value in (1 + 2**-10, -(1 + 2**-10)):  # an eighth of the way from bf16 1.0 to the next, 1 + 2**-7
        between = torch.full((200_000,), value)
        rounded = round_to_bf16_stochastically(between, key).float()
        assert set(rounded.abs().unique().tolist()) == {1.0, 1 + 2**-7}
        assert abs(rounded.mean().item() - value) < 2e-5
        assert torch.equal(between.to(torch.bfloat16).float().abs(), torch.ones(200_000))  # nearest loses it all
    # Over keys (steps) too: one element, rounded with 4,000 keys.
    one = torch.full((1,), 1 + 2**-10)
    over_keys = torch.cat([round_to_bf16_stochastically(one, torch.tensor(float(k))).float() for k in range(4000)])
    assert abs(over_keys.mean().item() - (1 + 2**-10)) < 2e-4
    exact = torch.tensor([0.5, -3.0, 1 + 2**-7, -(1 + 2**-7), 0.0, float("inf")])
    assert torch.equal(round_to_bf16_stochastically(exact, key).float(), exact)  # representable values stay put
    nans = torch.tensor([0x7FFFFFFF, -1, 0x7FC00000], dtype=torch.int32).view(torch.float32)
    assert round_to_bf16_stochastically(nans, key).isnan().all()  # even those whose bits wrap when noise is added


def run_optimizer(optimizer_class, weight, gradients, **options):
    return adamw_steps(optimizer_class, weight, gradients, **options)[0].detach().float()


def test_update_is_torch_adamw_and_small_bf16_steps_are_not_lost():
    torch.manual_seed(0)
    weight = torch.randn(64, 32)
    gradients = [torch.randn(64, 32) for _ in range(5)]
    # fp32 weights: no rounding, so the update must be AdamW's to float precision.
    ours = run_optimizer(Bf16WeightsAdamW, weight, gradients)
    reference = run_optimizer(torch.optim.AdamW, weight, gradients)
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)

    # bf16 weights near 1 move by ~1e-3 a step, an eighth of a bf16 step (2**-7): 300 steps of
    # constant gradient move them ~0.3 as in fp32; round-to-nearest would leave them where they are.
    start = torch.ones(4096)
    steady = [torch.ones(4096)] * 300
    fp32 = run_optimizer(torch.optim.AdamW, start, steady)
    bf16 = run_optimizer(Bf16WeightsAdamW, start.to(torch.bfloat16), steady)
    assert (1 - fp32).mean() > 0.25
    assert abs(bf16.mean() - fp32.mean()) < 0.01 * (1 - fp32).mean()


def test_rounding_noise_depends_only_on_the_seed_and_step():
    """What keeps data-parallel processes identical: the same seed and gradients give the same bf16
    weights whatever else drew random numbers before; another seed rounds otherwise."""
    torch.manual_seed(0)
    weight, gradients = torch.randn(4096).to(torch.bfloat16), [torch.randn(4096) for _ in range(3)]

    def weights_after(seed, global_seed):
        torch.manual_seed(global_seed)
        return run_optimizer(Bf16WeightsAdamW, weight, gradients, seed=seed)

    assert torch.equal(weights_after(seed=1, global_seed=10), weights_after(seed=1, global_seed=20))
    assert not torch.equal(weights_after(seed=1, global_seed=10), weights_after(seed=2, global_seed=10))
    # And the step leaves the global stream (dropout's) where it was.
    torch.manual_seed(5)
    expected = torch.rand(3)
    weights_after(seed=1, global_seed=5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_update_is_torch_adamw():
    """The update as the GPU runs it (compiled into one kernel), checked on fp32 weights."""
    torch.manual_seed(0)
    weight = torch.randn(64, 32)
    gradients = [torch.randn(64, 32) for _ in range(3)]
    compiled = run_optimizer(Bf16WeightsAdamW, weight, gradients, compile=True)
    assert torch.allclose(compiled, run_optimizer(torch.optim.AdamW, weight, gradients), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu  # the recorded step needs a CUDA GPU
def test_recorded_optimizer_step_updates_as_the_launched_one():
    """On the GPU the step is recorded once the same tensors come back (gradients kept, as with CUDA
    graphs) and replayed: bit for bit the update of launching its kernels one by one, with the
    trainer's clipping factor and zeroing of the gradients inside it."""
    torch.manual_seed(0)
    start = [torch.randn(shape, device="cuda").to(torch.bfloat16) for shape in [(64, 32), (300,), (7, 5, 3)]]
    # Norms from ~0.5 to ~50: some steps clipped to 1, some not.
    gradients = [[torch.randn_like(w, dtype=torch.float32) * size for w in start] for size in (1, 0.01, 1, 0.02, 1, 1)]

    def train(record_graph):
        weights = [torch.nn.Parameter(w.clone()) for w in start]
        for weight in weights:
            weight.grad = torch.zeros_like(weight)
        optimizer = Bf16WeightsAdamW([dict(params=weights[:2]), dict(params=weights[2:], weight_decay=0.0)],
                                     lr=1e-3, compile=True, record_graph=record_graph, zero_grads=True)
        for step_gradients in gradients:
            for weight, gradient in zip(weights, step_gradients):
                weight.grad.copy_(gradient)  # the same .grad tensors every step
            optimizer.clip_grad_norm_(1.0)
            optimizer.step()
            assert all(not weight.grad.any() for weight in weights)
        return weights, optimizer

    recorded, optimizer = train(record_graph=True)
    assert optimizer.graph is not None  # replayed from the third step on
    launched, _ = train(record_graph=False)
    assert all(torch.equal(a, b) for a, b in zip(recorded, launched))
    assert not torch.equal(recorded[0], start[0])


def test_low_memory_run_trains_saves_and_refuses_a_mismatched_resume(tiny_model, coded_clips, tmp_path, capsys):
    def losses(output):
        history = checkpoint.read_trainer_state(output / "checkpoint-epoch-2").progress.log_history
        return [entry["train/loss"] for entry in history if "train/loss" in entry]

    flags = dict(batch_size=4, num_epochs=3, lr=3e-3, save_steps=0)
    output = train(tiny_model, coded_clips, tmp_path / "out", low_memory=True, **flags)
    assert "weights, gradients and AdamW moments bf16" in capsys.readouterr().out
    full_precision = losses(train(tiny_model, coded_clips, tmp_path / "fp32", **flags))
    low_memory = losses(output)
    assert len(low_memory) == 6 and low_memory[-1] < 0.92 * low_memory[0]
    assert all(abs(a - b) < 0.02 * b for a, b in zip(low_memory, full_precision)), (low_memory, full_precision)
    folder = output / "checkpoint-epoch-2"
    state = load_file(folder / checkpoint.TRAINING_STATE_DIR / "model.safetensors")
    # The training weights are bf16; the frozen speaker encoder stays fp32 (it computes the speaker vectors).
    assert {tensor.dtype for name, tensor in state.items() if ".speaker_encoder." not in name} == {torch.bfloat16}

    try:
        train(tiny_model, coded_clips, output, batch_size=4, num_epochs=4, resume_from_checkpoint="latest")
        raise AssertionError("a full-precision resume of a --low_memory run was accepted")
    except SystemExit as error:
        assert "--low_memory is False but the checkpoint was made with True" in str(error)


def gradients_of_one_batch(model_dir, data, out_dir, **flags):
    # fp32, eager and on the CPU, on a GPU machine too: the recomputation must give the same numbers,
    # not merely close ones. bf16, or layers compiled with and without checkpointing, would round
    # differently, and GPU kernels that add with atomics sum in a different order in each pass. No
    # CUDA graphs either: with them the batch is padded to a recorded shape, and checkpointing turns
    # them off, so the two runs saw differently padded batches (why the test failed on an H100).
    run = build_run(model_dir, data, out_dir, batch_size=4, mixed_precision="no", torch_compile="no",
                    cuda_graphs="no", **flags)
    module = run.train_module.to("cpu")
    layer_calls = []
    module.talker.model.layers[0].register_forward_pre_hook(lambda *_: layer_calls.append(1))
    batch = next(run.steps()).micro_batches[0].to("cpu")
    out = module(batch)
    (out.codec0_loss_sum + out.code_predictor_loss_sum).backward()
    return {name: p.grad for name, p in module.named_parameters() if p.grad is not None}, len(layer_calls)


def test_gradient_checkpointing_gives_the_same_gradient(tiny_model, coded_clips, tmp_path):
    plain, plain_calls = gradients_of_one_batch(tiny_model, coded_clips, tmp_path / "a")
    checkpointed, checkpointed_calls = gradients_of_one_batch(tiny_model, coded_clips, tmp_path / "b",
                                                              gradient_checkpointing=True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the layer really is recomputed in the backward
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[name], checkpointed[name], rtol=1e-5, atol=1e-7) for name in plain)


def test_low_memory_recomputes_the_code_predictor_layers_unless_they_have_dropout(tiny_model, coded_clips, tmp_path):
    """What each run recomputes in its backward (the gradient is unchanged: test_compiled_forward)."""
    def recomputing(**flags):
        talker = build_run(tiny_model, coded_clips, tmp_path / "-".join(flags), **flags).train_module.talker
        return talker.model.layers[0].gradient_checkpointing, talker.code_predictor.model.layers[0].gradient_checkpointing

    assert recomputing() == (False, False)
    assert recomputing(low_memory=True) == (False, True)
    assert recomputing(gradient_checkpointing=True) == (True, True)
    # Dropout would need its random state replayed in the recomputation: the activations are kept.
    assert recomputing(low_memory=True, lora_rank=4, lora_dropout=0.1) == (False, False)


def test_low_memory_resume_is_bit_identical(tiny_model, coded_clips, tmp_path):
    """The bf16 moments and the rounding's random stream are saved and restored with the checkpoint."""
    flags = dict(low_memory=True, batch_size=2, num_epochs=2, save_steps=1, save_total_limit=0, lr=1e-3,
                 warmup_steps=1)
    whole = train(tiny_model, coded_clips, tmp_path / "whole", **flags)
    resumed = train(tiny_model, coded_clips, tmp_path / "resumed", resume_from_checkpoint=whole / "checkpoint-step-3",
                    **flags)
    expected = load_file(whole / "checkpoint-epoch-1" / checkpoint.TRAINING_STATE_DIR / "model.safetensors")
    got = load_file(resumed / "checkpoint-epoch-1" / checkpoint.TRAINING_STATE_DIR / "model.safetensors")
    start = load_file(whole / "checkpoint-step-3" / checkpoint.TRAINING_STATE_DIR / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert not all(torch.equal(expected[name], start[name]) for name in expected)  # the resumed steps did train


def test_lora_with_low_memory_saves_a_checkpoint_stock_qwen_tts_loads(tiny_model, coded_clips, tmp_path):
    from qwen_tts import Qwen3TTSModel

    output = train(tiny_model, coded_clips, tmp_path / "out", low_memory=True, lora_rank=4, batch_size=4, lr=5e-3)
    folder = output / "checkpoint-epoch-0"
    base = load_file(tiny_model / "model.safetensors")
    merged = load_file(folder / checkpoint.MODEL_WEIGHTS)
    adapted = "talker.model.layers.0.self_attn.q_proj.weight"
    assert merged[adapted].dtype == torch.bfloat16
    assert not torch.equal(merged[adapted], base[adapted].to(torch.bfloat16))  # the adapters trained and were merged
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert Qwen3TTSModel.from_pretrained(str(folder)).model.talker is not None


def test_training_processes_use_expandable_segments_unless_the_user_set_the_allocator(monkeypatch):
    """Every run sets CUDA's allocator to expandable segments before CUDA starts (less memory
    reserved on clips of mixed length); an allocator setting of the user's own is left alone. On a
    GPU: a process that sets it after importing torch gets expandable segments."""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    use_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == CUDA_ALLOCATOR_SETTINGS
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    use_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"

    if torch.cuda.is_available():
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
        check = ("import torch; from qwen3_tts_sft.training_setup import use_expandable_segments; "
                 "use_expandable_segments(); torch.ones(1, device='cuda'); "
                 "print([segment['is_expandable'] for segment in torch.cuda.memory_snapshot()])")
        printed = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
        assert printed.strip() == "[True]", printed
