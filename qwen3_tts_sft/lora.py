"""LoRA through peft: low-rank adapters on the talker's and code predictor's linear layers.

Only the adapters train (plus whatever the trainer's own flags unfreeze), so the optimizer state
shrinks from two fp32 copies of every weight to two of the adapters. A checkpoint holds the
merged model (W + alpha/r * B A), which stock qwen_tts loads like any other, and the adapter alone
in `adapter/`, which peft loads:

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    inject_adapter_in_model(LoraConfig.from_pretrained("adapter"), tts.model.talker)
    set_peft_model_state_dict(tts.model.talker, load_file("adapter/adapter_model.safetensors"))
"""

from pathlib import Path

from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file

# Attention and MLP projections of both transformers (talker and code predictor).
DEFAULT_TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
ADAPTER = "default"          # peft's name for a single adapter
TALKER_PREFIX = "talker."    # the adapters live in model.talker


def target_module_names(target_modules) -> list:
    """--lora_target_modules as the sorted layer names it means: "v_proj, q_proj" and "q_proj,v_proj"
    are one choice, and no value means the defaults."""
    return sorted({name.strip() for name in (target_modules or DEFAULT_TARGET_MODULES).split(",") if name.strip()})


def add_adapters(model, rank: int, alpha: float, dropout: float, target_modules: str) -> LoraConfig:
    """Put LoRA adapters into model.talker and make them the only trainable weights."""
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_module_names(target_modules))
    try:
        inject_adapter_in_model(config, model.talker, adapter_name=ADAPTER)
    except ValueError as error:  # no layer of that name, or one that is not a linear layer
        raise SystemExit(f"error: --lora_target_modules {target_modules}: {error}. The defaults are "
                         f"{DEFAULT_TARGET_MODULES}") from None
    for name, parameter in model.named_parameters():
        parameter.requires_grad = ".lora_" in name
    return config


def merged_state_dict(state_dict: dict, config: LoraConfig) -> dict:
    """A plain Qwen3-TTS state dict from one with adapters: each adapted weight becomes
    W + (alpha / r) * B @ A under its original name, and the adapter tensors are dropped."""
    scaling = config.lora_alpha / config.r
    merged = {}
    for name, tensor in state_dict.items():
        if ".lora_" in name:
            continue
        if ".base_layer." not in name:
            merged[name] = tensor
            continue
        layer, leaf = name.split(".base_layer.")
        if leaf == "weight":
            # In float64: the trainer lets a GPU's fp32 products use TF32 (10-bit mantissa), which would
            # make the merged weight differ from base + adapter by far more than fp32 rounding.
            a = state_dict[f"{layer}.lora_A.{ADAPTER}.weight"].double()
            b = state_dict[f"{layer}.lora_B.{ADAPTER}.weight"].double()
            tensor = (tensor.double() + scaling * (b @ a)).to(tensor.dtype)
        merged[f"{layer}.{leaf}"] = tensor
    return merged


def save_adapter(state_dict: dict, config: LoraConfig, folder: Path) -> None:
    """The adapter alone, in peft's format (names relative to model.talker)."""
    folder.mkdir(parents=True, exist_ok=True)
    adapter = {name[len(TALKER_PREFIX):].replace(f".{ADAPTER}.", "."): tensor.detach().to("cpu").contiguous()
               for name, tensor in state_dict.items() if ".lora_" in name}
    save_file(adapter, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(folder))

