"""LoRA: only the adapters train; the checkpoint holds the merged model, which stock qwen_tts loads
and which computes what the adapted model computed; the adapter alone loads back with peft."""

import re

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from qwen_tts import Qwen3TTSModel
from safetensors.torch import load_file

from qwen3_tts_sft import checkpoint
from qwen3_tts_sft import lora
from helpers import train
from qwen3_tts_sft.sequence_layout import SpecialIds, collate
from qwen3_tts_sft.talker_step import TalkerTrainingModel
from qwen3_tts_sft.training_data import TalkerDataset, make_prompter, read_clips


def test_lora_trains_adapters_and_saves_a_merged_model_and_the_adapter(tiny_model, coded_clips, tmp_path, capsys):
    output = train(tiny_model, coded_clips, tmp_path / "out", lora_rank=4, lr=5e-3, batch_size=4, num_epochs=2,
                   save_dtype="float32")
    printed = capsys.readouterr().out
    assert "LoRA rank 4 adapters" in printed
    assert re.search(r"parameters: \d+\.\dK trainable", printed)  # not "0.0M": a tiny model's adapters are few
    folder = output / "checkpoint-epoch-1"

    # Weights that no adapter touches stay exactly the base's; adapted ones have changed.
    base = load_file(tiny_model / "model.safetensors")
    merged = load_file(folder / checkpoint.MODEL_WEIGHTS)
    untouched = "talker.model.layers.0.input_layernorm.weight"
    adapted = "talker.model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(merged[untouched], base[untouched].float())
    assert not torch.allclose(merged[adapted], base[adapted].float())

    # The merged checkpoint (stock loader) computes what base + adapter (peft) computes.
    tts = Qwen3TTSModel.from_pretrained(str(folder), dtype=torch.float32)
    adapted_tts = Qwen3TTSModel.from_pretrained(str(tiny_model), dtype=torch.float32)
    inject_adapter_in_model(LoraConfig.from_pretrained(str(folder / "adapter")), adapted_tts.model.talker)
    result = set_peft_model_state_dict(adapted_tts.model.talker, load_file(folder / "adapter" / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if ".lora_" in k]

    ids = SpecialIds.from_config(tts.model.config)
    clips = read_clips(coded_clips, ids, prompter=make_prompter(tts.processor, tts.model.config))[:3]
    speakers = {name: index for index, name in enumerate(sorted({c.speaker for c in clips}))}
    batch = collate([TalkerDataset(clips, ids, speakers)[i] for i in range(len(clips))])
    vectors = torch.randn(len(speakers), tts.model.config.talker_config.hidden_size)
    with torch.no_grad():
        from_merged = TalkerTrainingModel(tts.model, speaker_vectors=vectors).eval()(batch)
        from_adapter = TalkerTrainingModel(adapted_tts.model, speaker_vectors=vectors).eval()(batch)
    assert torch.allclose(from_merged.codec0_logits, from_adapter.codec0_logits, atol=1e-4)
    assert torch.allclose(from_merged.code_predictor_logits, from_adapter.code_predictor_logits, atol=1e-4)


def test_merging_is_w_plus_scaled_b_a():
    config = LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"])
    weight, a, b = torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
    state = {"talker.x.q_proj.base_layer.weight": weight, "talker.x.q_proj.lora_A.default.weight": a,
             "talker.x.q_proj.lora_B.default.weight": b, "talker.y.bias": torch.ones(3)}
    merged = lora.merged_state_dict(state, config)
    assert merged.keys() == {"talker.x.q_proj.weight", "talker.y.bias"}
    assert torch.allclose(merged["talker.x.q_proj.weight"], weight + 3.0 * b @ a)


def test_a_lora_run_repeats_exactly_with_its_seed(tiny_model, coded_clips, tmp_path):
    adapters = []
    for name in ("first", "second"):
        output = train(tiny_model, coded_clips, tmp_path / name, lora_rank=4, batch_size=4, max_steps=1)
        adapters.append(load_file(output / "checkpoint-step-1" / "adapter" / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])


def test_target_modules_that_match_no_linear_layer_are_named(tiny_model, coded_clips, tmp_path):
    for modules in ("nonexistent", "text_projection"):
        with pytest.raises(SystemExit, match=f"(?s)--lora_target_modules {modules}: .*The defaults are q_proj"):
            train(tiny_model, coded_clips, tmp_path / modules, lora_rank=4, lora_target_modules=modules, max_steps=1)


def test_lora_flags_without_lora_rank_are_refused_not_ignored(tiny_model, coded_clips, tmp_path):
    """--lora_rank forgotten: the run would fine-tune every weight, the adapter flags unused."""
    import sft_12hz_chatterbox
    from helpers import trainer_argv

    argv = trainer_argv(tiny_model, coded_clips, tmp_path, lora_alpha=32, lora_target_modules="q_proj")
    with pytest.raises(SystemExit, match="--lora_alpha, --lora_target_modules without --lora_rank, which turns LoRA on"):
        sft_12hz_chatterbox.check_args(sft_12hz_chatterbox.parse_args(argv))
    sft_12hz_chatterbox.check_args(sft_12hz_chatterbox.parse_args(argv + ["--lora_rank", "4"]))
