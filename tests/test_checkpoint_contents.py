"""What a checkpoint folder holds: untouched weights stay byte-identical, speakers are in place,
both model shapes train, save and speak."""

import filecmp
import json

import torch
from qwen_tts import Qwen3TTSModel
from safetensors.torch import load_file

from qwen3_tts_sft import checkpoint
from helpers import train
from qwen3_tts_sft.speakers import reference_mel


def tensors_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_frozen_parts_are_byte_identical_and_speakers_are_registered(tiny_model, coded_clips, tmp_path):
    output = train(tiny_model, coded_clips, tmp_path / "out", batch_size=4)
    folder = output / "checkpoint-epoch-0"

    comparison = filecmp.dircmp(tiny_model / "speech_tokenizer", folder / "speech_tokenizer")
    assert comparison.left_list == comparison.right_list
    assert not comparison.diff_files and not comparison.funny_files
    _, mismatch, errors = filecmp.cmpfiles(tiny_model / "speech_tokenizer", folder / "speech_tokenizer",
                                           comparison.common_files, shallow=False)
    assert not mismatch and not errors

    base = load_file(tiny_model / "model.safetensors")
    encoder = load_file(folder / checkpoint.SPEAKER_ENCODER_WEIGHTS)
    assert encoder.keys() == {k for k in base if k.startswith("speaker_encoder.")}
    assert all(tensors_identical(base[name], encoder[name]) for name in encoder)

    trained = load_file(folder / checkpoint.MODEL_WEIGHTS)
    assert not any(name.startswith("speaker_encoder.") for name in trained)
    assert all(tensor.dtype == torch.bfloat16 for tensor in trained.values())
    assert not tensors_identical(base["talker.model.layers.0.mlp.up_proj.weight"],
                                 trained["talker.model.layers.0.mlp.up_proj.weight"])

    base_config = json.loads((tiny_model / "config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert config["tts_model_type"] == "custom_voice"
    assert config["transformers_version"] == base_config["transformers_version"]
    assert config["talker_config"]["spk_id"] == {"alice": 3000, "bob": 3001}
    assert config["talker_config"]["spk_is_dialect"] == {"alice": False, "bob": False}

    # The speaker row holds the speaker's x-vector from the frozen encoder.
    tts = Qwen3TTSModel.from_pretrained(str(folder), dtype=torch.float32)
    state = json.loads((folder / checkpoint.TRAINER_STATE).read_text())
    alice_reference = state["speakers"][0]["reference_audio"][0]
    expected = reference_xvector(tiny_model, alice_reference)
    row = tts.model.talker.get_input_embeddings().weight[3000]
    assert torch.allclose(row, expected.to(torch.bfloat16).float(), atol=1e-6)


def reference_xvector(model_dir, audio_path):
    """The x-vector qwen_tts itself computes for a clip, with the encoder weights in `model_dir`."""
    import soundfile as sf

    base = Qwen3TTSModel.from_pretrained(str(model_dir), dtype=torch.float32).model
    audio, rate = sf.read(audio_path, dtype="float32")
    stock = base.extract_speaker_embedding(audio, rate)
    ours = base.speaker_encoder(reference_mel(audio_path, 24000))[0]
    assert torch.allclose(stock, ours, atol=1e-5)  # our mel is the stock one
    return stock


def test_unfrozen_encoder_trains_and_the_saved_vector_uses_it(tiny_model, coded_clips, tmp_path):
    output = train(tiny_model, coded_clips, tmp_path / "out", batch_size=4, lr=1e-2, train_speaker_encoder=True)
    folder = output / "checkpoint-epoch-0"
    base = load_file(tiny_model / "model.safetensors")
    encoder = load_file(folder / checkpoint.SPEAKER_ENCODER_WEIGHTS)
    assert not all(tensors_identical(base[name], encoder[name]) for name in encoder)

    state = json.loads((folder / checkpoint.TRAINER_STATE).read_text())
    model = Qwen3TTSModel.from_pretrained(str(tiny_model), dtype=torch.float32).model
    model.speaker_encoder.load_state_dict({k[len("speaker_encoder."):]: v.float() for k, v in encoder.items()})
    with torch.no_grad():
        expected = model.speaker_encoder(reference_mel(state["speakers"][1]["reference_audio"][0], 24000))[0]
    row = load_file(folder / checkpoint.MODEL_WEIGHTS)["talker.model.codec_embedding.weight"][3001].float()
    assert torch.allclose(row, expected, atol=0.02 * expected.abs().max().item())


def test_a_06b_shaped_model_trains_saves_and_speaks(tiny_model_06b, coded_clips, tmp_path):
    config = json.loads((tiny_model_06b / "config.json").read_text())["talker_config"]
    assert config["text_hidden_size"] != config["hidden_size"]
    output = train(tiny_model_06b, coded_clips, tmp_path / "out", batch_size=4)
    tts = Qwen3TTSModel.from_pretrained(str(output / "checkpoint-epoch-0"), dtype=torch.float32)
    wavs, rate = tts.generate_custom_voice("Hello there.", speaker="alice", language="english", max_new_tokens=6)
    assert rate == 24000 and wavs[0].size > 0


def test_a_checkpoint_carries_the_starting_models_files_not_what_was_written_into_it(tmp_path):
    start = tmp_path / "start"
    for name in ("config.json", "model.safetensors", "vocab.json", "trainer_state.json", "generation_config.json"):
        (start / name).parent.mkdir(parents=True, exist_ok=True)
        (start / name).write_text("{}")
    for folder in ("speech_tokenizer", "infer_test", "training_state", "adapter", "logs"):
        (start / folder).mkdir()
    assert [item.name for item in checkpoint.copied_from_base(start)] == ["generation_config.json",
                                                                          "speech_tokenizer", "vocab.json"]


def test_trainer_state_records_paths_that_work_from_any_folder(tmp_path, monkeypatch):
    from argparse import Namespace

    monkeypatch.chdir(tmp_path)
    flags = checkpoint.recorded_flags(Namespace(train_jsonl="data/train.jsonl", init_model_path="base",
                                                resume_from_checkpoint="latest", eval_jsonl=None, lr=1e-5))
    assert flags == dict(train_jsonl=str(tmp_path / "data" / "train.jsonl"), init_model_path=str(tmp_path / "base"),
                         resume_from_checkpoint="latest", eval_jsonl=None, lr=1e-5)
