"""--bf16_weights (the default on one GPU): the forward and backward use bf16 weights, AdamW keeps an
fp32 master copy and fp32 moments. The update is fp32 AdamW's, nothing of the master is lost to a
checkpoint or a resume, and the choice is made (or refused) where it should be."""

import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from qwen3_tts_sft import checkpoint, training_setup
from qwen3_tts_sft.bf16_adamw import Bf16WeightsAdamW
from helpers import adamw_steps, train


def test_the_master_is_the_fp32_update_and_the_bf16_weight_is_it_rounded():
    """The master moves as fp32 weights do under the same update (test_low_memory checks that update
    against torch.optim.AdamW), including the steps bf16 alone would round away."""
    torch.manual_seed(0)
    # Weights near 1 move by ~1e-3 a step, an eighth of bf16's step there (2**-7): without the master
    # copy, round-to-nearest would keep them where they started.
    start = (torch.ones(4096) + torch.randn(4096) * 0.01).to(torch.bfloat16)
    gradients = [torch.randn(4096).to(torch.bfloat16) + 1 for _ in range(300)]  # bf16, as the backward gives
    fp32_weight, _ = adamw_steps(Bf16WeightsAdamW, start.float(), gradients)
    weight, optimizer = adamw_steps(Bf16WeightsAdamW, start, gradients, fp32_master=True)
    master = optimizer.state[weight]["master"]
    assert master.dtype == torch.float32 and optimizer.state[weight]["exp_avg"].dtype == torch.float32
    assert torch.equal(master, fp32_weight.detach())
    assert torch.equal(weight.detach(), master.to(torch.bfloat16))
    assert (start.float() - master).mean() > 0.2  # they did move, far beyond bf16's step


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_the_compiled_update_with_a_master_is_the_launched_one():
    """On a GPU the update runs compiled into one kernel a tensor (weight, master, moments at once)."""
    torch.manual_seed(2)
    start = torch.randn(64, 32).to(torch.bfloat16)
    gradients = [torch.randn(64, 32).to(torch.bfloat16) for _ in range(4)]
    compiled, compiled_optimizer = adamw_steps(Bf16WeightsAdamW, start, gradients, fp32_master=True, compile=True)
    launched, launched_optimizer = adamw_steps(Bf16WeightsAdamW, start, gradients, fp32_master=True)
    assert torch.allclose(compiled_optimizer.state[compiled]["master"], launched_optimizer.state[launched]["master"],
                          rtol=1e-6, atol=1e-7)
    assert torch.equal(compiled.detach(), compiled_optimizer.state[compiled]["master"].to(torch.bfloat16))


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.skipif(
    shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler"))])
def test_clipping_and_zeroing_inside_the_update_are_torch_clipping_then_the_update(compile):
    """The trainer leaves gradient clipping and zeroing to this optimizer's update, one pass over the
    gradients instead of three. It must equal torch's clip_grad_norm_ followed by the update, and leave
    the gradients zero for the next step to add into. Steps far above and below the limit alternate,
    so a factor applied wrongly (or not at all) would show even through Adam's normalisation."""
    torch.manual_seed(3)
    starts = [torch.randn(64, 32).to(torch.bfloat16), torch.randn(32).to(torch.bfloat16)]
    steps = [[torch.randn(start.shape) * size for start in starts] for size in (10.0, 1e-3, 30.0, 1e-2, 3.0)]
    weights = [torch.nn.Parameter(start.clone()) for start in starts]
    folded = Bf16WeightsAdamW(weights, lr=1e-3, weight_decay=0.1, fp32_master=True, zero_grads=True, compile=compile)
    references = [torch.nn.Parameter(start.float()) for start in starts]  # fp32: the master's own update
    reference = Bf16WeightsAdamW(references, lr=1e-3, weight_decay=0.1)
    for gradients in steps:
        for weight, gradient in zip(weights, gradients):
            weight.grad = gradient.to(torch.bfloat16)
        norm = folded.clip_grad_norm_(1.0)
        folded.step()
        assert all(torch.equal(weight.grad, torch.zeros_like(weight)) for weight in weights)
        for weight, gradient in zip(references, gradients):
            weight.grad = gradient.to(torch.bfloat16).float()
        reference_norm = torch.nn.utils.clip_grad_norm_(references, 1.0)
        reference.step()
        assert torch.allclose(norm.float(), reference_norm, rtol=4e-3)  # bf16 gradients sum to a bf16 norm
    for weight, expected in zip(weights, references):
        master = folded.state[weight]["master"]
        # The weights moved ~5e-3. The bf16 norm's rounding leaves ~3e-6; an unscaled update is 3e-3 off.
        assert (master - expected.detach()).abs().max() < 2e-5
        assert torch.equal(weight.detach(), master.to(torch.bfloat16))


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_the_compiled_update_compiles_once_for_weights_of_every_shape():
    """One compiled update serves every trained tensor, matrices and the norms' vectors alike: each
    further graph would add seconds of compiling to a GPU run's first step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    weights = [torch.nn.Parameter(torch.randn(shape).to(torch.bfloat16)) for shape in [(64, 32), (96,), (3, 4, 5), (40,)]]
    optimizer = Bf16WeightsAdamW([dict(params=weights[:2]), dict(params=weights[2:], weight_decay=0.0)],
                                 fp32_master=True, zero_grads=True, compile=True)
    for _ in range(2):
        for weight in weights:
            weight.grad = torch.randn(weight.shape).to(torch.bfloat16)
        optimizer.step()
    assert counters["stats"]["unique_graphs"] == 1
    assert all(not weight.grad.any() for weight in weights)  # the update wrote through to the tensors


def test_a_loaded_state_keeps_its_fp32_master_and_continues_as_if_never_stopped():
    torch.manual_seed(1)
    start = torch.randn(64, 32).to(torch.bfloat16)
    gradients = [torch.randn(64, 32) for _ in range(6)]
    whole, _ = adamw_steps(Bf16WeightsAdamW, start, gradients, fp32_master=True)
    stopped, optimizer = adamw_steps(Bf16WeightsAdamW, start, gradients[:3], fp32_master=True)
    saved = optimizer.state_dict()
    weight = torch.nn.Parameter(stopped.detach().clone())
    resumed = Bf16WeightsAdamW([weight], lr=1e-3, weight_decay=0.1, fp32_master=True)
    resumed.load_state_dict(saved)  # torch's own loading casts the state to the weight's dtype, bf16
    state = resumed.state[weight]
    assert {state[name].dtype for name in ("master", "exp_avg", "exp_avg_sq")} == {torch.float32}
    assert torch.equal(state["master"], optimizer.state[stopped]["master"])
    for gradient in gradients[3:]:
        weight.grad = gradient.to(torch.bfloat16)
        resumed.step()
    assert torch.equal(weight, whole)


def choice(**given):
    flags = dict(low_memory=False, bf16_weights="auto", lora_rank=0)
    where = dict(precision="bf16", device_type="cuda", num_processes=1, fsdp=False)
    for name, value in given.items():
        (flags if name in flags else where)[name] = value
    problems = []
    weights = training_setup.weight_storage_choice(SimpleNamespace(**flags), problems=problems, **where)
    return weights.name, problems


def test_auto_takes_bf16_weights_only_for_bf16_compute_on_one_gpu():
    master, fp32, bf16 = (training_setup.BF16_WITH_FP32_MASTER.name, training_setup.FP32_WEIGHTS.name,
                          training_setup.BF16_WEIGHTS.name)
    assert choice() == (master, [])
    assert choice(device_type="cpu") == (fp32, [])
    assert choice(precision="no") == (fp32, [])
    assert choice(num_processes=2) == (fp32, [])
    assert choice(lora_rank=16) == (fp32, [])
    assert choice(bf16_weights="no") == (fp32, [])
    assert choice(low_memory=True) == (bf16, [])
    assert choice(bf16_weights="yes", device_type="cpu", precision="no", num_processes=2) == (master, [])
    _, problems = choice(bf16_weights="yes", low_memory=True)
    assert len(problems) == 1 and "--low_memory" in problems[0]
    _, problems = choice(bf16_weights="no", low_memory=True)  # not ignored: the weights would be bf16 anyway
    assert len(problems) == 1 and "--bf16_weights no and --low_memory" in problems[0]
    _, problems = choice(bf16_weights="yes", fsdp=True)
    assert len(problems) == 1 and "FSDP" in problems[0]


def test_a_bf16_weights_run_trains_like_fp32_and_exports_its_master(tiny_model, coded_clips, tmp_path, capsys):
    def losses(output):
        history = checkpoint.read_trainer_state(output / "checkpoint-epoch-2").progress.log_history
        return [entry["train/loss"] for entry in history if "train/loss" in entry]

    flags = dict(batch_size=4, num_epochs=3, lr=3e-3, save_steps=0, mixed_precision="no")
    output = train(tiny_model, coded_clips, tmp_path / "out", bf16_weights="yes", save_dtype="float32", **flags)
    assert "fp32 master weights and AdamW moments" in capsys.readouterr().out
    folder = output / "checkpoint-epoch-2"
    assert checkpoint.read_trainer_state(folder).weights == training_setup.BF16_WITH_FP32_MASTER.name
    training_weights = load_file(folder / checkpoint.TRAINING_STATE_DIR / "model.safetensors")
    trained = {name: tensor for name, tensor in training_weights.items() if ".speaker_encoder." not in name}
    assert {tensor.dtype for tensor in trained.values()} == {torch.bfloat16}  # the frozen encoder stays fp32
    # --save_dtype float32 exports the master weights: finer than bf16, and the training weight is
    # them rounded to nearest.
    exported = load_file(folder / checkpoint.MODEL_WEIGHTS)
    name = "talker.model.layers.0.mlp.up_proj.weight"
    assert exported[name].dtype == torch.float32
    assert not torch.equal(exported[name], exported[name].to(torch.bfloat16).float())
    assert torch.equal(exported[name].to(torch.bfloat16), training_weights["model." + name])

    full_precision = losses(train(tiny_model, coded_clips, tmp_path / "fp32", **flags))
    bf16_weights = losses(output)
    assert len(bf16_weights) == 6 and bf16_weights[-1] < 0.92 * bf16_weights[0]
    assert all(abs(a - b) < 0.02 * b for a, b in zip(bf16_weights, full_precision)), (bf16_weights, full_precision)


def test_a_bf16_weights_resume_is_bit_identical_and_a_mismatched_one_refused(tiny_model, coded_clips, tmp_path):
    # --save_dtype float32: the exported model is the master weights, the training state's the bf16 ones.
    flags = dict(bf16_weights="yes", batch_size=2, num_epochs=2, save_steps=1, save_total_limit=0, lr=1e-3,
                 warmup_steps=1, mixed_precision="no", save_dtype="float32")
    whole = train(tiny_model, coded_clips, tmp_path / "whole", **flags)
    resumed = train(tiny_model, coded_clips, tmp_path / "resumed", resume_from_checkpoint=whole / "checkpoint-step-3",
                    **flags)
    for saved in (checkpoint.TRAINING_STATE_DIR + "/model.safetensors", checkpoint.MODEL_WEIGHTS):
        expected = load_file(whole / "checkpoint-epoch-1" / saved)
        got = load_file(resumed / "checkpoint-epoch-1" / saved)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[name], got[name]) for name in expected), saved

    flags["bf16_weights"] = "no"
    try:
        train(tiny_model, coded_clips, whole, resume_from_checkpoint="latest", **dict(flags, num_epochs=3))
        raise AssertionError("an fp32-weights resume of a --bf16_weights run was accepted")
    except SystemExit as error:
        assert "holds bf16 + fp32 master weights" in str(error) and "--bf16_weights yes" in str(error)
