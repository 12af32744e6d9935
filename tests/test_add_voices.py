"""Adding voices to a model that has some: a CustomVoice model keeps its speakers, their dialects and
their rows, and gains new ones; what a fine-tuned checkpoint can and cannot do in stock qwen_tts.

The CustomVoice model here is the tiny random Base model turned into one as a download is laid out
(tiny_model.write_custom_voice_dir): two built-in speakers, serena and eric (a Sichuan-dialect
speaker), and no speaker encoder.
"""

import json
import re

import numpy as np
import pytest
import torch
from qwen_tts import Qwen3TTSModel
from safetensors.torch import load_file

from helpers import forced_generation_logits, read_jsonl, train, write_jsonl
from qwen3_tts_sft import checkpoint, tiny_model as tiny
from qwen3_tts_sft.replay import replay_clip
from qwen3_tts_sft.sequence_layout import SpecialIds, collate
from qwen3_tts_sft.speakers import Speaker
from qwen3_tts_sft.talker_step import TalkerTrainingModel
from qwen3_tts_sft.training_data import TalkerDataset, make_prompter
from test_checkpoint_contents import reference_xvector

CODEC_EMBEDDING = "talker.model.codec_embedding.weight"
BUILT_IN = {name: codec_id for name, (codec_id, _) in tiny.TINY_BUILT_IN_SPEAKERS.items()}


@pytest.fixture(scope="module")
def custom_voice(tiny_model, tmp_path_factory):
    return tiny.write_custom_voice_dir(tiny_model, tmp_path_factory.mktemp("custom_voice") / "model")


def new_voice_rows(coded_clips, name, count=4, recorded_by="alice"):
    """`count` clips of one recorded voice (one reference clip), under a new speaker name."""
    rows = [row for row in read_jsonl(coded_clips) if row["speaker"] == recorded_by]
    return [dict(row, speaker=name) for row in rows[:count]]


def test_the_tiny_custom_voice_model_loads_as_a_download_does(custom_voice):
    tts = Qwen3TTSModel.from_pretrained(str(custom_voice), dtype=torch.float32)
    assert tts.model.tts_model_type == "custom_voice"
    assert tts.model.speaker_encoder is None  # qwen_tts builds no encoder for a CustomVoice model
    assert tts.get_supported_speakers() == ["eric", "serena"]
    assert not any(name.startswith("speaker_encoder.") for name in load_file(custom_voice / "model.safetensors"))


def test_a_custom_voice_start_without_a_speaker_encoder_is_refused_naming_the_flag(custom_voice, coded_clips,
                                                                                  tmp_path):
    data = write_jsonl(tmp_path / "new.jsonl", new_voice_rows(coded_clips, "newvoice"))
    with pytest.raises(SystemExit, match="has no speaker encoder.*--speaker_encoder_from"):
        train(custom_voice, data, tmp_path / "out")


@pytest.fixture(scope="module")
def added_voice(custom_voice, tiny_model, coded_clips, tmp_path_factory):
    """The custom_voice model with one voice added (newvoice, two training steps), saved in float32."""
    folder = tmp_path_factory.mktemp("added_voice")
    data = write_jsonl(folder / "new.jsonl", new_voice_rows(coded_clips, "NewVoice"))
    # A strong weight decay: it shrinks every row of the codec embedding, the built-in speakers' too.
    output = train(custom_voice, data, folder / "out", lr=1e-2, weight_decay=0.5, save_dtype="float32",
                   speaker_encoder_from=tiny_model)
    return output / "checkpoint-epoch-0"


def test_a_custom_voice_model_keeps_its_speakers_dialects_and_rows_and_gains_one(added_voice, custom_voice,
                                                                                 tiny_model):
    config = json.loads((added_voice / "config.json").read_text())
    base_config = json.loads((custom_voice / "config.json").read_text())
    talker = config["talker_config"]
    assert config["tts_model_type"] == "custom_voice"
    assert talker["spk_id"] == dict(BUILT_IN, newvoice=3000)
    assert talker["spk_is_dialect"] == {"serena": False, "eric": "sichuan_dialect", "newvoice": False}
    assert talker["codec_language_id"] == base_config["talker_config"]["codec_language_id"]
    tts = Qwen3TTSModel.from_pretrained(str(added_voice), dtype=torch.float32)
    assert tts.get_supported_speakers() == ["eric", "newvoice", "serena"]

    # The built-in speakers' rows are exactly the starting model's, though training moved them.
    start = load_file(custom_voice / "model.safetensors")[CODEC_EMBEDDING]
    exported = load_file(added_voice / checkpoint.MODEL_WEIGHTS)[CODEC_EMBEDDING]
    trained = load_file(added_voice / checkpoint.TRAINING_STATE_DIR / "model.safetensors")["model." + CODEC_EMBEDDING]
    for codec_id in BUILT_IN.values():
        assert torch.equal(exported[codec_id], start[codec_id].float())  # bf16 values, saved in float32
        assert not torch.equal(trained[codec_id], start[codec_id].float())  # the decay moved it in training

    # The new voice's vector is its reference clip's x-vector by the Base model's encoder, which
    # the checkpoint keeps beside the model.
    state = checkpoint.read_trainer_state(added_voice)
    assert [s["name"] for s in state.speakers] == ["newvoice"]
    assert state.kept_speakers == [dict(name="serena", codec_id=3066, dialect=False),
                                   dict(name="eric", codec_id=2875, dialect="sichuan_dialect")]
    expected = reference_xvector(tiny_model, state.speakers[0]["reference_audio"][0])
    assert torch.allclose(exported[3000], expected, atol=1e-6)
    base = load_file(tiny_model / "model.safetensors")
    encoder = load_file(added_voice / checkpoint.SPEAKER_ENCODER_WEIGHTS)
    assert encoder.keys() == {name for name in base if name.startswith("speaker_encoder.")}
    assert all(torch.equal(base[name].float(), encoder[name]) for name in encoder)
    assert config["speaker_encoder_config"] == json.loads((tiny_model / "config.json").read_text())[
        "speaker_encoder_config"]


def test_infer_test_names_the_kept_voices_it_does_not_check(added_voice, tmp_path, capsys):
    """infer_test.py without --speaker speaks the voices the run trained; the ones the checkpoint kept
    are named as not checked, with the flag that checks them, not passed over in silence."""
    import infer_test

    capsys.readouterr()
    infer_test.main(["--model_path", str(added_voice), "--out_dir", str(tmp_path), "--text", "Hi.", "--greedy",
                     "--max_new_tokens", "4", "--device", "cpu", "--report_only"])
    printed = capsys.readouterr().out
    assert ("note: checking newvoice, the voices this checkpoint's run trained; not checked: serena, eric, kept from "
            "the model it started from: add --speaker NAME for each to hear them") in printed
    infer_test.main(["--model_path", str(added_voice), "--out_dir", str(tmp_path), "--text", "Hi.", "--greedy",
                     "--max_new_tokens", "4", "--device", "cpu", "--report_only", "--speaker", "serena"])
    assert "not checked" not in capsys.readouterr().out


def test_a_fourth_voice_joins_and_the_banner_says_where_the_encoder_comes_from(added_voice, coded_clips,
                                                                             tmp_path, capsys):
    """A second voice added to a checkpoint of this trainer: the encoder is the one it kept. The random
    tiny model never stops speaking, so with a 1 s cap every replay sentence is left out: the banner
    warns that the speakers asked for are not rehearsed, instead of advising the flag already given."""
    data = write_jsonl(tmp_path / "second.jsonl", new_voice_rows(coded_clips, "second"))
    capsys.readouterr()
    output = train(added_voice, data, tmp_path / "out", max_steps=1, replay_speakers="all", replay_max_seconds=1,
                   replay_languages="english")
    printed = capsys.readouterr().out
    # The fourth voice joins the three of the first run's output.
    saved = Qwen3TTSModel.from_pretrained(str(checkpoint.latest_checkpoint(output)), dtype=torch.float32)
    assert saved.get_supported_speakers() == ["eric", "newvoice", "second", "serena"]
    assert f"speaker encoder for the new voices: the one this trainer kept beside {added_voice}" in printed
    assert "warning: serena, eric, newvoice: asked to be rehearsed, but the replay set holds none of their speech" in printed
    assert "--replay_speakers all rehearses them" not in printed
    assert re.search(r"replay set: (\d+) sentences \(\1 ran past --replay_max_seconds\) left out", printed)


def test_replay_sentences_left_out_say_why():
    """Speech that runs past the cap and speech that ends at once are both left out, each named as what it is."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from qwen3_tts_sft import replay
    from qwen3_tts_sft.speakers import Speaker

    class Speaking(torch.nn.Module):  # per sentence in turn: no frames, 3 frames, 99 frames
        def generate(self, input_ids, **options):
            return [torch.zeros((0, 3, 16, 99)[index % 3], 16) for index in range(len(input_ids))], None

    accelerator = SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext)
    rows, dropped = replay.generate(SimpleNamespace(model=Speaking()), [Speaker("serena", 3000)], ["english"], 12, {},
                                    lambda text: [1, 2], accelerator)
    sentences = len(replay.sentences()["english"])
    assert len(rows) == sentences // 3 and all(len(row["audio_codes"]) == 3 for row in rows)
    assert dropped[0].endswith("(no speech: it ended at once)") and dropped[1].endswith("(ran past --replay_max_seconds)")
    assert replay.dropped_count(dropped) == (f"{len(dropped)} sentences ({(sentences + 2) // 3} no speech: it ended at "
                                             f"once, {(sentences + 1) // 3} ran past --replay_max_seconds)")


@pytest.mark.parametrize("flags", [["--replay_ratio", "0.5"], ["--replay_languages", "german"],
                                   ["--replay_max_seconds", "5.5"]])
def test_replay_settings_without_replay_speakers_are_refused_not_ignored(flags, capsys):
    """Without --replay_speakers there is no replay set: a ratio, languages or a cap given alone would
    change nothing, and the user would believe the kept voices rehearsed at that ratio."""
    import sft_12hz_chatterbox

    needed = ["--init_model_path", "model", "--train_jsonl", "train.jsonl"]
    with pytest.raises(SystemExit):
        sft_12hz_chatterbox.parse_args(needed + flags)
    assert f"{flags[0]} {flags[1]}: nothing is rehearsed without --replay_speakers" in capsys.readouterr().err
    assert sft_12hz_chatterbox.parse_args(needed + flags + ["--replay_speakers", "all"]).replay_speakers == "all"


def test_a_built_in_name_is_refused_unless_overwritten(custom_voice, tiny_model, coded_clips, tmp_path):
    data = write_jsonl(tmp_path / "eric.jsonl", new_voice_rows(coded_clips, "Eric", count=2))
    with pytest.raises(SystemExit, match=r"eric.jsonl:1: speaker: 'eric' is already a speaker.*--overwrite_speaker"):
        train(custom_voice, data, tmp_path / "refused", speaker_encoder_from=tiny_model)

    folder = train(custom_voice, data, tmp_path / "out", speaker_encoder_from=tiny_model,
                   overwrite_speaker=True) / "checkpoint-epoch-0"
    talker = json.loads((folder / "config.json").read_text())["talker_config"]
    assert talker["spk_id"] == BUILT_IN  # the same row, holding the new voice
    assert talker["spk_is_dialect"] == {"serena": False, "eric": False}  # trained in the rows' own languages
    state = checkpoint.read_trainer_state(folder)
    row = load_file(folder / checkpoint.MODEL_WEIGHTS)[CODEC_EMBEDDING][BUILT_IN["eric"]]
    expected = reference_xvector(tiny_model, state.speakers[0]["reference_audio"][0])
    assert torch.allclose(row.float(), expected.to(torch.bfloat16).float(), atol=1e-6)


def test_overwrite_speaker_that_replaces_no_voice_is_refused(custom_voice, tiny_model, coded_clips, tmp_path):
    """--overwrite_speaker with rows of a name the model lacks ("erik" for eric): the voice meant to be
    replaced would stay, and a new one join, unsaid."""
    data = write_jsonl(tmp_path / "erik.jsonl", new_voice_rows(coded_clips, "erik", count=2))
    with pytest.raises(SystemExit, match=r"--overwrite_speaker: no speaker of this run is one the starting model "
                                         r"has, so none is replaced \(this run trains erik; the model has serena, eric\)"):
        train(custom_voice, data, tmp_path / "out", speaker_encoder_from=tiny_model, overwrite_speaker=True)


@pytest.mark.parametrize("speaker, language", [("eric", "chinese"), ("eric", "auto"), ("serena", "chinese")])
def test_replay_clips_are_laid_out_as_generation_speaks_them(custom_voice, coded_clips, speaker, language):
    """A dialect speaker speaks its dialect for chinese and auto (generate() swaps the language id):
    its replay clips must be trained with that prefix, or training teaches another layout."""
    tts = Qwen3TTSModel.from_pretrained(str(custom_voice), dtype=torch.float32)
    model, config = tts.model.eval(), tts.model.config
    ids = SpecialIds.from_config(config)
    codes = np.array(read_jsonl(coded_clips)[0]["audio_codes"])
    name_and_dialect = {name: dialect for name, (_, dialect) in tiny.TINY_BUILT_IN_SPEAKERS.items()}
    kept = Speaker(speaker, BUILT_IN[speaker], dialect=name_and_dialect[speaker], kept=True)
    row = dict(speaker=speaker, language=language, text="How are you today?", audio_codes=codes.tolist())
    clip = replay_clip(row, kept, make_prompter(tts.processor, config), source="test")
    vectors = model.talker.get_input_embeddings().weight[[kept.codec_id]].detach()
    with torch.no_grad():
        out = TalkerTrainingModel(model, speaker_vectors=vectors).eval()(
            collate([TalkerDataset([clip], ids, {speaker: 0})[0]]))
    gen_codec0, gen_sub = forced_generation_logits(model, clip.prompt, language, speaker, codes)
    assert (gen_codec0 - out.codec0_logits[:len(gen_codec0)]).abs().max() < 1e-4
    assert (gen_sub - out.code_predictor_logits[:len(codes)]).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------
# What a fine-tuned checkpoint can and cannot do in stock qwen_tts (each claim of the README's
# "What a fine-tuned checkpoint can do" table has its test here)
# ---------------------------------------------------------------------------------------------

GREEDY = dict(do_sample=False, subtalker_dosample=False, max_new_tokens=4)


def custom_voice_codes(tts, speaker, instruct=None, text="How are you today?"):
    """Greedy generate_custom_voice's codes, as handed to the speech decoder."""
    captured, decode = [], tts.model.speech_tokenizer.decode
    tts.model.speech_tokenizer.decode = lambda encoded: captured.append(encoded) or decode(encoded)
    try:
        wavs, _ = tts.generate_custom_voice(text, speaker=speaker, language="english", instruct=instruct, **GREEDY)
    finally:
        tts.model.speech_tokenizer.decode = decode
    assert wavs[0].size > 0
    return captured[0][0]["audio_codes"]


def prefill_embeds(tts, speaker, instruct=None) -> torch.Tensor:
    """The input vectors [1, positions, hidden] generate_custom_voice hands the talker before the
    first frame."""
    handed, talker_generate = [], tts.model.talker.generate

    def recording_generate(**kwargs):
        handed.append(kwargs["inputs_embeds"])
        return talker_generate(**kwargs)

    tts.model.talker.generate = recording_generate
    try:
        custom_voice_codes(tts, speaker, instruct)
    finally:
        tts.model.talker.generate = talker_generate
    return handed[0]


def prefill_length(tts, speaker, instruct=None) -> int:
    return prefill_embeds(tts, speaker, instruct).shape[1]


def test_a_checkpoint_speaks_its_new_and_its_built_in_voices(added_voice):
    """Each speaker speaks (codes come back) with its own row in the speaker slot: the inputs of the
    new voice and of a built-in one differ at that one position, by the difference of their rows.
    (Whether their greedy codes differ too is up to a random tiny model, so it is not asserted.)"""
    tts = Qwen3TTSModel.from_pretrained(str(added_voice), dtype=torch.float32)
    embeds = {name: prefill_embeds(tts, name)[0] for name in ("newvoice", "serena", "eric")}
    new, serena = embeds["newvoice"], embeds["serena"]
    assert new.shape == serena.shape
    differing = (new != serena).any(dim=-1).nonzero().flatten().tolist()
    assert len(differing) == 1
    rows = tts.model.talker.get_input_embeddings().weight
    slot = differing[0]
    assert torch.allclose(new[slot] - serena[slot], rows[3000] - rows[BUILT_IN["serena"]], atol=1e-5)


def test_instructions_are_read_for_every_speaker_of_a_1_7b_shaped_checkpoint(added_voice):
    """generate_custom_voice puts the instruction before the text, as a user turn, for built-in and
    new speakers alike. (How well a new voice follows one is another matter: the trainer never
    trains with instructions, and the replay set is spoken without them.)"""
    tts = Qwen3TTSModel.from_pretrained(str(added_voice), dtype=torch.float32)
    assert tts.model.tts_model_size == "1b7"
    instruction = tts._build_instruct_text("Speak slowly.")
    added = len(tts._tokenize_texts([instruction])[0][0])
    for speaker in ("newvoice", "serena", "eric"):
        assert prefill_length(tts, speaker, "Speak slowly.") == prefill_length(tts, speaker) + added


def test_a_0_6b_custom_voice_model_ignores_instructions(tiny_model_06b, tmp_path):
    """qwen_tts 0.1.1 drops `instruct` for tts_model_size 0b6: the same input and the same speech."""
    tts = Qwen3TTSModel.from_pretrained(str(tiny.write_custom_voice_dir(tiny_model_06b, tmp_path / "cv06")),
                                        dtype=torch.float32)
    assert prefill_length(tts, "serena", "Speak slowly.") == prefill_length(tts, "serena")
    assert torch.equal(custom_voice_codes(tts, "serena"), custom_voice_codes(tts, "serena", "Speak slowly."))


def test_stock_voice_cloning_refuses_a_checkpoint(added_voice, coded_clips):
    """A checkpoint is tts_model_type custom_voice, and qwen_tts clones voices with a "base" model only."""
    tts = Qwen3TTSModel.from_pretrained(str(added_voice), dtype=torch.float32)
    reference = read_jsonl(coded_clips)[0]["ref_audio"]
    with pytest.raises(ValueError, match="does not support generate_voice_clone"):
        tts.generate_voice_clone("How are you today?", ref_audio=reference, x_vector_only_mode=True)
    with pytest.raises(ValueError, match="does not support create_voice_clone_prompt"):
        tts.create_voice_clone_prompt(ref_audio=reference, x_vector_only_mode=True)


def test_a_checkpoint_clones_from_an_x_vector_through_model_generate(added_voice, coded_clips):
    """What does work: a speaker vector handed to the model's own generate() as an x-vector-only
    voice-clone prompt (generate() does not check the model type). The speaker_encoder.safetensors
    the checkpoint keeps makes such vectors from reference clips: the new speaker's row is its
    reference clip's x-vector, and cloned from that vector the checkpoint speaks exactly as
    generate_custom_voice does with the speaker."""
    from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSSpeakerEncoderConfig
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSSpeakerEncoder
    from qwen3_tts_sft.speakers import reference_mel

    tts = Qwen3TTSModel.from_pretrained(str(added_voice), dtype=torch.float32)
    encoder = Qwen3TTSSpeakerEncoder(Qwen3TTSSpeakerEncoderConfig(
        **json.loads((added_voice / "config.json").read_text())["speaker_encoder_config"]))
    weights, _ = checkpoint.speaker_encoder_weights(added_voice)
    encoder.load_state_dict(weights)
    reference = checkpoint.read_trainer_state(added_voice).speakers[0]["reference_audio"][0]
    with torch.no_grad():
        xvector = encoder(reference_mel(reference, 24000))[0]
    row = tts.model.talker.get_input_embeddings().weight[3000]
    assert torch.allclose(xvector, row, atol=1e-5)

    prompt = tts._tokenize_texts([tts._build_assistant_text("How are you today?")])
    cloned, _ = tts.model.generate(
        input_ids=prompt, languages=["english"], non_streaming_mode=True,
        voice_clone_prompt=dict(ref_code=[None], ref_spk_embedding=[row], x_vector_only_mode=[True], icl_mode=[False]),
        **tts._merge_generate_kwargs(**GREEDY))
    assert torch.equal(cloned[0], custom_voice_codes(tts, "newvoice"))


# ---------------------------------------------------------------------------------------------
# Voices the tiny model tells apart: a CustomVoice model whose built-in speakers speak, a voice
# added to it, and a fourth added to that
# ---------------------------------------------------------------------------------------------

LEARNING = dict(batch_size=4, lr=1e-2, warmup_steps=2, code_predictor_loss_weight=1.0)


def voices_model(tiny_model, folder, voices: tuple) -> tuple:
    """(a copy of the tiny Base model whose speaker encoder tells `voices` apart, {voice: its
    reference clip}).

    The random tiny speaker encoder maps every recording to nearly one vector (cosine 0.95 and
    more between a tone, noise and a synthetic voice), so the talker could hardly tell voices
    apart. tiny_model.make_speaker_encoder_separate changes its last layer to subtract what these
    voices' recordings have in common, as a trained encoder in effect does: their x-vectors then
    point in clearly different directions (asserted here).
    """
    import shutil

    import soundfile as sf

    shutil.copytree(tiny_model, folder / "base")
    rng = np.random.default_rng(21)
    references = {}
    for index, voice in enumerate(voices):
        references[voice] = str(folder / f"ref_{voice}.wav")
        sf.write(references[voice], tiny.synthetic_voice(2.0, 24000, 110.0 + 60 * index, rng), 24000)
    tiny.make_speaker_encoder_separate(folder / "base", list(references.values()))
    base = Qwen3TTSModel.from_pretrained(str(folder / "base"), dtype=torch.float32).model
    vectors = torch.stack([reference_xvector_of(base, path) for path in references.values()])
    cosines = torch.nn.functional.cosine_similarity(vectors[:, None], vectors[None], dim=-1)
    assert cosines[~torch.eye(len(voices), dtype=bool)].max() < 0.5
    return folder / "base", references


def reference_xvector_of(model, path):
    import soundfile as sf

    audio, rate = sf.read(path, dtype="float32")
    return model.extract_speaker_embedding(audio, rate)


def voice_row(voice, references, text, codes, language="english"):
    return dict(text=text, audio_codes=np.asarray(codes).tolist(), ref_audio=references[voice], speaker=voice,
                language=language)


def greedy_codes(folder, text, speaker, language, max_new_tokens):
    from test_overfit_speaks_the_clip import generated_codes

    tts = Qwen3TTSModel.from_pretrained(str(folder), dtype=torch.float32)
    return generated_codes(tts, text, speaker, language, max_new_tokens)


def test_two_voices_saying_the_same_sentence_each_come_back_as_their_own(tiny_model, coded_clips, tmp_path):
    """The strongest check that speakers are not mixed up, on the trainer as it is (a Base model,
    the speaker encoder frozen): two voices say the same sentence, in clips whose codes differ from
    the first frame on, so only the speaker vector tells the talker which clip to speak. After
    training, greedy speech gives each voice its own clip back, exactly."""
    base, references = voices_model(tiny_model, tmp_path, ("voice_a", "voice_b"))
    rows, text = read_jsonl(coded_clips), "How are you today?"
    clips = {"voice_a": np.array(rows[0]["audio_codes"])[:4], "voice_b": np.array(rows[1]["audio_codes"])[1:5]}
    assert not np.array_equal(clips["voice_a"][0], clips["voice_b"][0])
    data = write_jsonl(tmp_path / "two.jsonl", [voice_row(voice, references, text, codes)
                                                for voice, codes in clips.items()] * 120)
    folder = train(base, data, tmp_path / "out", lr_scheduler="linear", **LEARNING) / "checkpoint-epoch-0"
    for voice, codes in clips.items():
        assert np.array_equal(greedy_codes(folder, text, voice, "english", len(codes) + 4), codes), voice


# ---------------------------------------------------------------------------------------------
# Replay: the kept voice's own speech, rehearsed while a new voice trains
# ---------------------------------------------------------------------------------------------

# A kept speaker's replay loss (per target) may rise by at most this much over a run that adds a voice
# with --replay_ratio 0.5; without rehearsal the same run moves it by more than REPLAY_DRIFT.
REPLAY_MARGIN, REPLAY_DRIFT = 0.1, 0.3


@pytest.fixture(scope="module")
def speaking_start(tiny_model, coded_clips, tmp_path_factory):
    """A starting model whose own voice stops speaking, so that it has a replay set: the tiny model
    overfit on one clip of "keeper" (a random one never stops, and every replay sentence is left out).
    A checkpoint of this trainer: a CustomVoice model with the Base encoder kept beside it."""
    folder = tmp_path_factory.mktemp("speaking_start")
    keeper = dict(read_jsonl(coded_clips)[1], speaker="keeper", text="How are you today?", language="english")
    data = write_jsonl(folder / "keeper.jsonl", [keeper] * 600)
    output = train(tiny_model, data, folder / "out", batch_size=4, lr=3e-3, warmup_steps=5,
                   lr_scheduler="constant_with_warmup")
    return output / "checkpoint-epoch-0", keeper


def add_newbie(start, coded_clips, output, replay_ratio):
    """The recorded voice "newbie" added to `start` at a high learning rate, keeper's replay loss
    measured at the start and the end; returns keeper's entry of the voices report."""
    data = write_jsonl(output.parent / f"{output.name}.jsonl", new_voice_rows(coded_clips, "newbie") * 4)
    train(start, data, output, lr=3e-3, save_steps=0, replay_speakers="keeper", replay_ratio=replay_ratio,
          replay_languages="english", replay_max_seconds=4)
    return json.loads((output / "voices_report.json").read_text())["kept"]["keeper"]


def test_replay_keeps_a_kept_voice_whose_loss_drifts_without_it(speaking_start, coded_clips, tmp_path, capsys):
    start, keeper = speaking_start
    without = add_newbie(start, coded_clips, tmp_path / "without", replay_ratio=0)
    printed = capsys.readouterr().out
    assert "keeper: replay loss measured at the start and the end, but not rehearsed: --replay_ratio 0.0" in printed
    assert "asked to be rehearsed, but the replay set holds none" not in printed
    rehearsed = add_newbie(start, coded_clips, tmp_path / "with", replay_ratio=0.5)

    # The replay set is the starting model's own greedy speech: for the sentence it learned, that clip.
    replay_file = next((tmp_path / "with" / "replay").glob("replay-*.json"))
    spoken = {row["text"]: row["audio_codes"] for row in json.loads(replay_file.read_text())["clips"]}
    assert spoken[keeper["text"]] == keeper["audio_codes"]
    assert without["replay_clips"] == rehearsed["replay_clips"] == len(spoken) >= 1

    assert without["replay_loss_start"] == pytest.approx(rehearsed["replay_loss_start"])
    assert without["replay_loss_end"] > without["replay_loss_start"] + REPLAY_DRIFT
    assert rehearsed["replay_loss_end"] < rehearsed["replay_loss_start"] + REPLAY_MARGIN
