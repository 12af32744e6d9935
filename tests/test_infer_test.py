"""infer_test.py: each check passes a good case and catches its planted failure, on arrays and end to end.

The tiny model speaks noise, so the end-to-end cases plant what they need: generation is forced
along a training clip's codes (then codec_eos), and the speech decoder is replaced by a stand-in
voice (or silence) of the clip's length at the speaker's pitch.
"""

import contextlib
import json
import re
import shutil
import unicodedata

import numpy as np
import pytest
import soundfile as sf
import torch

import infer_test
from qwen3_tts_sft import checkpoint, listening, tiny_model
from qwen3_tts_sft.audio import SpeakingRates
from qwen3_tts_sft.listening import Thresholds
from helpers import ROOT, forced_heads, read_jsonl, run_script, train, write_jsonl

ALICE_PITCH_HZ = 110.0  # tiny_model.write_synthetic_clips voices its first speaker at 110 Hz
RATE = tiny_model.SAMPLE_RATE


def voice(seconds=1.0, seed=0):
    return tiny_model.synthetic_voice(seconds, RATE, ALICE_PITCH_HZ, np.random.default_rng(seed))


def failed_checks(wav, frames=12, cap=100, training_rate=None):
    sentence = listening.measure_sentence(("alice", 0, "Hello there."), wav, RATE, frames, cap, 1.0, training_rate)
    return {failure.check: failure for failure in listening.sentence_failures(sentence, Thresholds())}


# ---------------------------------------------------------------------------------------------
# Checks on arrays
# ---------------------------------------------------------------------------------------------

def test_a_sentence_file_from_a_windows_editor_reads_as_written(tmp_path):
    """--text_file and --eval_sentences: a byte-order mark and CRLF line ends are no part of a sentence."""
    path = tmp_path / "sentences.txt"
    path.write_bytes("Hello there.\r\n\r\nSecond one.\r\n".encode("utf-8-sig"))
    assert listening.sentences_in_file(path) == ["Hello there.", "Second one."]
    path.write_text("\n \n")
    with pytest.raises(ValueError, match="holds no sentences"):
        listening.sentences_in_file(path)


def test_audio_checks_pass_a_voice_and_catch_silence_clipping_and_nan():
    good = voice()
    assert failed_checks(good) == {}

    silent = failed_checks(np.zeros(RATE, np.float32))
    assert silent.keys() == {"rms", "silence"}
    assert silent["rms"].value == listening.DBFS_FLOOR and "80.0 dB below" in silent["rms"].message

    gap = good.copy()
    gap[int(0.3 * RATE):] = 0  # loud enough overall, but 70% of it is silence
    assert failed_checks(gap).keys() == {"silence"}
    assert failed_checks(gap)["silence"].value == pytest.approx(0.7, abs=0.05)

    clipped = failed_checks(np.clip(good * 8, -1, 1))
    assert clipped.keys() == {"clipping"} and clipped["clipping"].value > 0.1

    broken = good.copy()
    broken[100] = np.nan
    assert failed_checks(broken).keys() == {"finite"}


def test_dc_offset_is_removed_before_loudness_and_flagged():
    # Mostly DC offset: a constant 0.3 under a whisper of voice. Before the offset was removed,
    # this read as -10 dBFS and never silent, and passed.
    mostly_dc = failed_checks(np.float32(0.3) + 0.003 * voice())
    assert mostly_dc.keys() == {"dc_offset", "rms", "silence"}
    assert mostly_dc["dc_offset"].value == pytest.approx(0.3, abs=1e-3)
    assert mostly_dc["rms"].value < Thresholds.min_rms_dbfs
    # A real voice riding on an offset: loud enough once the offset is removed, but the offset is flagged.
    offset_voice = failed_checks(voice() - 0.1)
    assert offset_voice.keys() == {"dc_offset"} and "-0.100" in offset_voice["dc_offset"].message
    level = listening.measure_waveform(voice() - 0.1, RATE)["rms_dbfs"]
    assert level == pytest.approx(listening.measure_waveform(voice(), RATE)["rms_dbfs"], abs=0.1)


def test_stop_check_reads_the_frame_count_generation_returns():
    # A run that never stops comes back with max_new_tokens - 1 frames (see stopped_before_cap).
    assert failed_checks(voice(), frames=39, cap=40).keys() == {"stop"}
    assert failed_checks(voice(), frames=38, cap=40) == {}


def test_a_sentence_cut_short_or_drawn_out_fails_on_its_own():
    # "Hello there." is 12 characters: 12 chars/s in the 1 s voice
    assert failed_checks(voice(), training_rate=6.0) == {}  # 2x: left to the speaker's overall rate check
    assert failed_checks(voice(), training_rate=3.0)["sentence_rate"].value == pytest.approx(4.0, rel=1e-3)
    assert "0.25x" in failed_checks(voice(), training_rate=48.0)["sentence_rate"].message


def summary(rate_ratio=1.0, similarity=0.9, cer=None):
    """A speaker's summary of one 1 s sentence of 20 characters, the training rate set to give `rate_ratio`."""
    sentences = [dict(text="x" * 20, seconds=1.0, speaker_similarity=similarity, cer=cer)]
    rates = {listening.ALL_SPEAKERS: {"alice": 20.0 / rate_ratio}} if rate_ratio else None
    return listening.summarize_speaker("alice", sentences, rates)


def test_speaker_checks_catch_rate_similarity_and_cer_by_how_much():
    ALL = listening.ALL_SPEAKERS
    def failures(**values):
        return {f.check: f for f in listening.speaker_failures(summary(**values), Thresholds())}

    assert failures() == {}
    assert failures(rate_ratio=1.4, similarity=0.6, cer=0.1) == {}
    assert "speaks 2.00x the training rate (20.0 vs 10.0 chars/s;" in failures(rate_ratio=2.0)["rate"].message
    # A voice the starting model had, with no training rows: held to the whole set's rate, and told so.
    kept_voice = listening.summarize_speaker("alice", [dict(text="x" * 20, seconds=1.0, speaker_similarity=0.9,
                                                            cer=None)], {ALL: {ALL: 10.0}})
    assert kept_voice["training_rate_of"] == "all speakers"
    assert ("(20.0 vs 10.0 chars/s, the whole training set's: no rows of this speaker;" in
            listening.speaker_failures(kept_voice, Thresholds())[0].message)
    assert failures(rate_ratio=0.5)["rate"].value == 0.5
    assert failures(rate_ratio=None) == {}  # no training rate: main() reports the check as skipped
    assert failures(similarity=0.3)["speaker_similarity"].limit == Thresholds.min_speaker_similarity
    assert "could not be measured" in failures(similarity=None)["speaker_similarity"].message
    assert failures(cer=0.5)["cer"].value == 0.5


def test_training_rate_per_speaker_from_codes_rows(tiny_model, tmp_path, capsys):
    """The rows as the trainer read them: a byte-order mark is no part of the first; a line that is not
    UTF-8, or a row the trainer skipped, counts for no rate; reference clips are not needed here."""
    frames = [[0] * 16]
    rows = [dict(text="a" * 20, audio_codes=frames * 25, speaker="Alice", language="German"),  # 20 chars in 2 s
            dict(text="b" * 10, audio_codes=frames * 25, speaker="alice", language="german"),  # 10 chars in 2 s
            dict(text="c" * 30, audio_codes=frames * 50),                     # 30 chars in 4 s, default speaker
            dict(text="d" * 90, audio_codes=frames * 25, speaker=123)]        # skipped by the trainer
    path = write_jsonl(tmp_path / "codes.jsonl", [dict(row, ref_audio="elsewhere.wav") for row in rows])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes() + b'{"text": "caf\xe9"}\n')
    rates, languages = infer_test.training_data(path, tiny_model, default_speaker="Bob")
    ALL = listening.ALL_SPEAKERS
    assert rates == {ALL: pytest.approx({"alice": 7.5, "bob": 7.5, ALL: 7.5}),
                     "german": pytest.approx({"alice": 7.5, ALL: 7.5}), "auto/other": pytest.approx({"bob": 7.5, ALL: 7.5})}
    assert languages == {"alice": {"german"}, "bob": {"auto"}}  # a row without a language is auto, as trained
    assert "skipping 2 bad rows of 5" in capsys.readouterr().out
    summary_file = tmp_path / "summary.json"
    summary = dict(characters_per_second=12.5, speakers=dict(Alice=dict(characters_per_second=10)))
    summary_file.write_text(json.dumps(summary))
    assert infer_test.summary_rate(summary_file) == {ALL: {ALL: 12.5, "alice": 10.0}}  # before rate groups
    summary.update(characters_per_second_by_group={"chinese": 5.0, "english": 15.0},
                   speakers=dict(Alice=dict(characters_per_second=10, characters_per_second_by_group={"chinese": 4.0})))
    summary_file.write_text(json.dumps(summary))
    assert infer_test.summary_rate(summary_file) == {ALL: {ALL: 12.5, "alice": 10.0}, "chinese": {ALL: 5.0, "alice": 4.0},
                                                     "english": {ALL: 15.0}}


def test_each_sentence_is_held_to_the_training_rate_of_its_own_language_or_script():
    """A speaker trained on Chinese (5 chars/s) and English (15): each sentence against its own group's rate,
    else that of the groups of its script (German and auto English text against the English rows); a
    sentence of a script training lacks is left out of the rate (not passed, not failed), and said so."""
    ALL = listening.ALL_SPEAKERS
    rates = {ALL: {"alice": 10.0, ALL: 10.0}, "chinese": {"alice": 5.0, ALL: 5.0}, "english": {"alice": 15.0, ALL: 15.0}}
    sentences = [dict(text="x" * 30, seconds=2.0, rate_group="english", speaker_similarity=0.9, cer=None),
                 dict(text="字" * 10, seconds=2.0, rate_group="chinese", speaker_similarity=0.9, cer=None),
                 dict(text="y" * 30, seconds=2.0, rate_group="german", speaker_similarity=0.9, cer=None),
                 dict(text="z" * 30, seconds=2.0, rate_group="auto/other", speaker_similarity=0.9, cer=None)]
    summary = listening.summarize_speaker("alice", sentences, rates)
    assert summary["rate_ratio"] == pytest.approx(1.0) and summary["rate_checked_sentences"] == 4
    assert listening.speaker_failures(summary, Thresholds()) == []  # the whole set's 10 chars/s would fail them
    # A speaker's own rows of the script come before another speaker's rows of the very group.
    two = {ALL: {"bi": 5.0, "bi_auto": 4.0, ALL: 4.5}, "chinese": {"bi": 5.0, ALL: 5.0},
           "auto/cjk": {"bi_auto": 4.0, ALL: 4.0}}
    assert listening.training_rate_for(two, "bi_auto", "chinese") == 4.0
    assert listening.training_rate_for(two, "bi", "auto/cjk") == 5.0
    assert listening.training_rate_for(two, "nobody", "chinese") == 5.0
    english_only = {ALL: {"alice": 15.0, ALL: 15.0}, "english": {"alice": 15.0, ALL: 15.0}}
    assert listening.training_rate_for(english_only, "alice", "auto/cjk") is None
    assert "no clips of Chinese, Japanese or Korean script text" in listening.unrated_group(english_only, "auto/cjk")
    # Trained on Chinese rows of language auto, checked with the built-in English sentences: said so.
    chinese_only = {ALL: {"alice": 5.0, ALL: 5.0}, "auto/cjk": {"alice": 5.0, ALL: 5.0}}
    note = infer_test.other_script_note(chinese_only, ["alice"], infer_test.SENTENCES["auto"], "auto", own_text=False)
    assert ("trained on Chinese, Japanese or Korean script text (language auto), and the built-in auto sentences are "
            "alphabetic script text (language auto)") in note
    assert "--language chinese or japanese or korean" in note and "--text" in note
    assert infer_test.other_script_note(chinese_only, ["alice"], ["你好。"], "auto", own_text=True) is None


def test_character_error_rate():
    assert listening.character_error_rate("Hello, world!", "hello world") == 0
    assert listening.character_error_rate("abcd", "abxd") == 0.25
    assert listening.character_error_rate("abcd", "") == 1
    assert listening.character_error_rate("你好，世界。", "你好世") == pytest.approx(0.25)
    assert listening.character_error_rate("你好，世界。", "你好世界") == 0  # spacing aside, as punctuation
    # Vowel signs and tone marks are letters' parts, not punctuation: Hindi "मैं ठीक हूँ" heard as
    # "में ठिक हु", Thai ไม่ ("not") heard as ไม้ ("wood"), are other words.
    assert listening.character_error_rate("मैं ठीक हूँ", "में ठिक हु") > 0.3
    assert listening.character_error_rate("ไม่", "ไม้") > 0
    # Arabic and Hebrew vowel points are optional in writing, and a recogniser seldom writes them.
    assert listening.character_error_rate("مَرْحَبًا بِكُمْ", "مرحبا بكم") == 0
    assert listening.character_error_rate("שָׁלוֹם", "שלום") == 0
    # A letter and its accent typed apart (NFD) are the letter with its accent.
    assert listening.character_error_rate("Tiếng Việt", unicodedata.normalize("NFD", "tiếng việt")) == 0


# ---------------------------------------------------------------------------------------------
# The speaker encoder and the checkpoint
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_model, coded_clips, tmp_path_factory):
    return train(tiny_model, coded_clips, tmp_path_factory.mktemp("infer") / "out", batch_size=4) / "checkpoint-epoch-0"


@pytest.fixture(scope="module")
def alice_clip(coded_clips):
    """alice's shortest clip: generation forced along it is quick."""
    return min((row for row in read_jsonl(coded_clips) if row["speaker"] == "alice"),
               key=lambda row: len(row["audio_codes"]))


def test_speaker_similarity_scores_the_reference_audio_and_rejects_a_wrong_vector(trained, tiny_model, tmp_path):
    tts = infer_test.load_model(trained, "cpu")
    config, state = tts.model.config, checkpoint.read_trainer_state(trained)
    alice = infer_test.checkpoint_speaker_vectors(tts, ["alice"], state, trained)["alice"]
    reference, rate = sf.read(state.speakers[0]["reference_audio"][0], dtype="float32")
    encoder, source = infer_test.load_speaker_encoder(config, trained, None, "cpu")
    assert source.endswith("speaker_encoder.safetensors")
    # No encoder file beside the weights: it comes from the base model instead (the same frozen weights).
    from_base, source = infer_test.load_speaker_encoder(config, tmp_path, tiny_model, "cpu")
    assert source.endswith("model.safetensors")

    own = listening.speaker_similarity(encoder, 24000, reference, rate, alice)
    assert own > 0.99  # the row holds this clip's x-vector, stored in bf16
    assert listening.speaker_similarity(from_base, 24000, reference, rate, alice) == pytest.approx(own, abs=1e-6)
    wrong = torch.randn(alice.shape, generator=torch.Generator().manual_seed(0))
    low = listening.speaker_similarity(encoder, 24000, reference, rate, wrong)
    assert low < Thresholds.min_speaker_similarity


def test_listen_speaks_measures_and_scores_a_loaded_model(trained, alice_clip):
    """The call the trainer makes: a model object, speaker vectors, (speaker, text) items."""
    tts = infer_test.load_model(trained, "cpu")
    vectors = infer_test.checkpoint_speaker_vectors(tts, ["alice"], None, trained)
    encoder, _ = infer_test.load_speaker_encoder(tts.model.config, trained, None, "cpu")
    text, codes = alice_clip["text"], np.asarray(alice_clip["audio_codes"])
    rates = SpeakingRates()
    rates.add(text, len(codes), "alice")
    eos = tts.model.config.talker_config.codec_eos_token_id
    tts.model.speech_tokenizer.decode = stand_in_voice(ALICE_PITCH_HZ)
    tts.model.train()  # as the trainer leaves it between steps
    random_state = torch.get_rng_state()

    def heard(forced_codes, cap):
        settings = listening.SpeakSettings(language=alice_clip["language"], max_new_tokens=cap)
        with forced_heads(tts.model, forced_codes, eos):
            return listening.listen(tts, vectors, [("alice", text)], encoder, rates.rates(), settings=settings)

    good = heard(codes, len(codes) + 4)
    assert good.passed and good.skipped == {"cer": "no speech recognizer given"}
    assert good.check_results()["stop"] == "passed" and good.check_results()["cer"] == "skipped"
    assert good.sentences[0]["stopped"] and good.sentences[0]["rate_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert good.speakers[0]["score"] == good.score and good.score > 0.99  # similarity ~1, pace 1, all clean
    assert len(good.wavs) == 1 and good.wavs[0][1] == RATE
    assert tts.model.training and torch.equal(torch.get_rng_state(), random_state)

    never_stops = heard(np.concatenate([codes, codes]), len(codes) + 3)
    assert {f.check for f in never_stops.failures} == {"stop"}
    assert never_stops.score == -1.0  # the hard floor: below any model that stops


# ---------------------------------------------------------------------------------------------
# The command, end to end
# ---------------------------------------------------------------------------------------------

def stand_in_voice(pitch_hz, silent=False):
    """A speech decoder that answers codes with a voice (or silence) of their length (1920 samples a frame)."""
    def decode(encoded):
        rng = np.random.default_rng(1)
        voices = [tiny_model.synthetic_voice(len(item["audio_codes"]) / 12.5, RATE, pitch_hz, rng)
                  for item in encoded]
        return [np.zeros_like(voice) if silent else voice for voice in voices], RATE
    return decode


def run_checker(monkeypatch, checkpoint_dir, out_dir, argv, codes, voiced=True, speaker_row=None, transcript=None):
    """infer_test.main(argv) with the checkpoint's generation forced along `codes`; (exit code, report).

    voiced: a stand-in voice, else stand-in silence, instead of the tiny decoder; speaker_row: written over alice's row;
    transcript: what a stand-in speech recognizer hears (then --asr_model is given)."""
    real_load = infer_test.load_model
    if transcript is not None:
        monkeypatch.setattr(infer_test, "load_asr", lambda path, device: lambda wav, sample_rate: transcript)
        stand_in = out_dir.parent / "asr"  # a folder that names a speech-recognition model, as --asr_model checks
        stand_in.mkdir(exist_ok=True)
        (stand_in / "config.json").write_text('{"model_type": "whisper"}')
        (stand_in / "preprocessor_config.json").write_text("{}")
        argv = [*argv, "--asr_model", str(stand_in)]
    with contextlib.ExitStack() as stack:
        def load(path, device):
            tts = real_load(path, device)
            if path == checkpoint_dir:
                eos = tts.model.config.talker_config.codec_eos_token_id
                stack.enter_context(forced_heads(tts.model, np.asarray(codes), eos))
                tts.model.speech_tokenizer.decode = stand_in_voice(ALICE_PITCH_HZ, silent=not voiced)
                if speaker_row is not None:
                    with torch.no_grad():
                        alice_id = tts.model.config.talker_config.spk_id["alice"]
                        tts.model.talker.get_input_embeddings().weight[alice_id] = speaker_row
            return tts
        monkeypatch.setattr(infer_test, "load_model", load)
        try:
            infer_test.main(["--model_path", str(checkpoint_dir), "--out_dir", str(out_dir), "--greedy", *argv])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    return code, json.loads((out_dir / "report.json").read_text())


@pytest.mark.parametrize("text_layout", ["non_streaming", "streaming"])
def test_a_good_checkpoint_passes(trained, alice_clip, monkeypatch, tmp_path, capsys, text_layout):
    frames = len(alice_clip["audio_codes"])
    extra = ["--compare_base"] if text_layout == "streaming" else []
    code, report = run_checker(monkeypatch, trained, tmp_path / "check", [
        "--speaker", "alice", "--text", alice_clip["text"], "--language", alice_clip["language"],
        "--train_jsonl", str(write_jsonl(tmp_path / "clip.jsonl", [alice_clip])),
        "--max_new_tokens", str(frames + 4), "--text_layout", text_layout, *extra],
        alice_clip["audio_codes"])

    assert code == 0, report["failures"]
    assert report["passed"] and report["failures"] == []
    assert report["checks"] == dict.fromkeys(listening.CHECKS, "passed") | {"cer": "skipped"}
    assert report["skipped"] == {"cer": "no --asr_model given"}
    assert report["non_streaming_mode"] == (text_layout == "non_streaming")
    sentence = report["sentences"][0]
    assert sentence["frames"] == frames and sentence["stopped"]
    assert sentence["rate_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert sentence["speaker_similarity"] > 0.99
    assert sf.info(sentence["wav"]).frames == pytest.approx(frames * 1920, abs=1)
    if extra:  # the base model speaks the tiny decoder's noise: the gain is measured, not judged
        assert report["speakers"][0]["similarity_gain"] is not None
        assert (tmp_path / "check" / "base" / "alice_00.wav").is_file()
    printed = capsys.readouterr().out
    assert "PASSED" in printed and "skipped cer: no --asr_model given" in printed


@pytest.mark.parametrize("planted, expected", [
    ("silent output", {"rms", "silence"}),
    ("runs to max_new_tokens", {"stop"}),
    ("speaking rate 2x off", {"rate"}),
    ("wrong speaker vector", {"speaker_similarity"}),
    ("unintelligible speech", {"cer"}),
])
def test_each_check_catches_its_planted_failure(trained, alice_clip, monkeypatch, tmp_path, planted, expected):
    codes = np.asarray(alice_clip["audio_codes"])
    frames = len(codes)
    cap, plant = frames + 4, {}
    training_data = ["--train_jsonl", str(write_jsonl(tmp_path / "clip.jsonl", [alice_clip]))]
    if planted == "silent output":
        plant["voiced"] = False
    elif planted == "runs to max_new_tokens":
        codes, cap = np.concatenate([codes, codes]), frames + 3  # codec_eos would come after the cap
    elif planted == "speaking rate 2x off":
        summary_file = tmp_path / "summary.json"  # the training data spoke at half the generated rate
        summary_file.write_text(json.dumps(dict(characters_per_second=len(alice_clip["text"]) / (frames / 12.5) / 2)))
        training_data = ["--data_summary", str(summary_file)]
    elif planted == "wrong speaker vector":
        width = json.loads((trained / "config.json").read_text())["talker_config"]["hidden_size"]
        plant["speaker_row"] = torch.randn(width, generator=torch.Generator().manual_seed(0))
    elif planted == "unintelligible speech":
        plant["transcript"] = alice_clip["text"][: len(alice_clip["text"]) // 2]  # the second half is not heard
    code, report = run_checker(monkeypatch, trained, tmp_path / "check", [
        "--speaker", "alice", "--text", alice_clip["text"], "--language", alice_clip["language"],
        "--max_new_tokens", str(cap), *training_data], codes, **plant)

    assert code == 1
    assert {f["check"] for f in report["failures"]} == expected
    assert {check for check, result in report["checks"].items() if result == "failed"} == expected
    failure = report["failures"][0]
    if planted == "runs to max_new_tokens":
        assert failure["value"] == frames + 2 and (failure["speaker"], failure["sentence"]) == ("alice", 0)
    elif planted == "speaking rate 2x off":
        assert failure["value"] == pytest.approx(2.0, abs=1e-3) and "speaks 2.00x" in failure["message"]
        assert failure["sentence"] is None  # a check of the speaker's sentences together
    elif planted == "wrong speaker vector":
        assert failure["value"] < Thresholds.min_speaker_similarity
    elif planted == "unintelligible speech":
        assert failure["value"] == pytest.approx(0.5, abs=0.1) and report["sentences"][0]["transcript"]


def documented_report() -> dict:
    """The report.json the recipe shows (README_CHATTERBOX_STYLE.md, "#### report.json")."""
    recipe = (ROOT / "README_CHATTERBOX_STYLE.md").read_text()
    return json.loads(re.search(r"#### report\.json\n+```json\n(.*?)\n```", recipe, re.S).group(1))


def kind(value) -> str:
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def assert_shaped_like(shown, real, where="report"):
    """Every field the recipe shows is in the real report, holding the same kind of value (null aside);
    the `checks` and `thresholds` it shows are all there are."""
    if where == "report.training_rate.characters_per_second":  # keyed by the data's rate groups and speakers
        assert {kind(rate) for rates in [*shown.values(), *real.values()] for rate in rates.values()} == {"number"}
    elif isinstance(shown, dict):
        assert isinstance(real, dict), where
        assert set(shown) <= set(real), f"{where}: {sorted(set(shown) - set(real))} not in the real report"
        if where in ("report.checks", "report.thresholds"):
            assert set(shown) == set(real), f"{where}: the real report has {sorted(real)}"
        for key, value in shown.items():
            assert_shaped_like(value, real[key], f"{where}.{key}")
    elif isinstance(shown, list) and shown and real:
        assert_shaped_like(shown[0], real[0], f"{where}[0]")
    elif shown is not None and real is not None:
        assert kind(shown) == kind(real), f"{where}: shown as {kind(shown)}, is {kind(real)}"


def test_the_command_line_exits_1_on_a_failing_check(trained, tmp_path):
    """The real script in a child process, on the checkpoint as it is: barely trained, it does not stop."""
    out = tmp_path / "check"
    result = run_script("infer_test.py", "--model_path", trained, "--out_dir", out, "--speaker", "bob",
                        "--text", "Hello.", "--greedy", "--max_new_tokens", "4", check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert "stop" in {f["check"] for f in report["failures"]}
    assert "FAIL stop (bob #0): no codec_eos within max_new_tokens 4" in result.stdout
    assert_shaped_like(documented_report(), report)
    # transformers' notices about generate's settings (the pad id it picks, sampling flags unused
    # when greedy) are not the user's business
    assert "pad_token_id" not in result.stdout + result.stderr and "not valid" not in result.stdout + result.stderr


def test_problems_that_stop_the_check_exit_2(trained, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        infer_test.main(["--model_path", str(trained), "--asr_model", str(tmp_path / "nowhere")])
    assert stopped.value.code == 2
    with pytest.raises(SystemExit) as stopped:
        infer_test.main(["--model_path", str(trained), "--speaker", "carol", "--out_dir", str(tmp_path)])
    assert stopped.value.code == 2


def test_english_sentences_of_a_voice_trained_on_chinese_are_not_rate_checked(trained, alice_clip, monkeypatch,
                                                                               tmp_path, capsys):
    """Trained on Chinese rows (language auto) at a third of the characters a second of English: an English
    sentence is neither failed as 3x too fast nor passed: its rate checks are skipped, and the note says why."""
    frames = len(alice_clip["audio_codes"])
    chinese = dict(alice_clip, text="字" * round(len(alice_clip["text"]) / 3))
    del chinese["language"]
    code, report = run_checker(monkeypatch, trained, tmp_path / "check", [
        "--speaker", "alice", "--text", alice_clip["text"], "--max_new_tokens", str(frames + 4),
        "--train_jsonl", str(write_jsonl(tmp_path / "clip.jsonl", [chinese]))], alice_clip["audio_codes"])

    assert code == 0, report["failures"]
    assert report["checks"]["rate"] == report["checks"]["sentence_rate"] == "skipped"
    assert "no clips of alphabetic script text (language auto)" in report["skipped"]["rate"]
    assert report["sentences"][0]["rate_ratio"] is None and report["speakers"][0]["rate_ratio"] is None
    printed = capsys.readouterr().out
    assert "note: the model was trained on Chinese, Japanese or Korean script text" in printed
    assert "skipped rate: the training data has no clips of alphabetic script text" in printed


def test_a_truncated_weights_file_is_named(trained, tmp_path, capsys):
    """A checkpoint whose model.safetensors was cut short (an interrupted copy): exit 2 naming the file."""
    damaged = tmp_path / "checkpoint-copy"
    shutil.copytree(trained, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    with pytest.raises(SystemExit) as stopped:
        infer_test.main(["--model_path", str(damaged), "--text", "Hello.", "--max_new_tokens", "4"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"{weights} is incomplete or damaged" in error and "Copy it again, or check another checkpoint" in error


def test_a_checkpoint_deleted_while_checked_stops_with_why(trained, tmp_path, monkeypatch, capsys):
    """The trainer's --save_total_limit deletes the checkpoint (and its infer_test/ folder) while it is
    spoken: exit 2 saying so, not a soundfile traceback."""
    doomed = tmp_path / "checkpoint-copy"
    shutil.copytree(trained, doomed)
    speak = listening.speak_and_measure

    def speak_then_deleted(*args, **options):
        spoken = speak(*args, **options)
        shutil.rmtree(doomed)
        return spoken
    monkeypatch.setattr(listening, "speak_and_measure", speak_then_deleted)
    with pytest.raises(SystemExit) as stopped:
        infer_test.main(["--model_path", str(doomed), "--speaker", "bob", "--text", "Hello.", "--greedy",
                         "--max_new_tokens", "4"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"{doomed / 'infer_test'} was removed while checking" in error and "--save_total_limit" in error


def test_wavs_of_an_earlier_run_are_removed(trained, tmp_path, capsys):
    """Four sentences, then one: bob_01..03.wav of the first run go, so the report's bob_*.wav are this
    run's; files infer_test does not write stay."""
    out = tmp_path / "check"
    out.mkdir()
    (out / "bob_take.wav").write_bytes(b"mine")
    (out / "alice_00.wav").write_bytes(b"another speaker's")
    common = ["--model_path", str(trained), "--out_dir", str(out), "--speaker", "bob", "--greedy",
              "--max_new_tokens", "4", "--report_only"]
    infer_test.main([*common, *[option for index in range(4) for option in ("--text", f"Sentence {index}.")]])
    assert sorted(path.name for path in out.glob("bob_0*.wav")) == [f"bob_0{index}.wav" for index in range(4)]
    capsys.readouterr()
    infer_test.main([*common, "--text", "Only one sentence now."])
    assert sorted(path.name for path in out.glob("*.wav")) == ["alice_00.wav", "bob_00.wav", "bob_take.wav"]
    assert f"removed 4 wavs an earlier run wrote in {out} (bob_00.wav, bob_01.wav, bob_02.wav, ...)" in \
        capsys.readouterr().out


class ModelLoading(Exception):
    """Raised where infer_test would load the model: the language and sentences are settled by then."""


def settled_language(monkeypatch, argv) -> tuple:
    """(language, sentences) infer_test.main settles on for `argv`, without loading the model (seconds):
    the language of its generation settings, and the sentences it read."""
    languages, sentences, read = [], [], infer_test.read_sentences

    def reading(*given):
        sentences.append(read(*given))
        return sentences[-1]

    def settings(**options):
        languages.append(options["language"])
        return listening.SpeakSettings(**options)

    def loading(path, device):
        raise ModelLoading
    monkeypatch.setattr(infer_test, "read_sentences", reading)
    monkeypatch.setattr(infer_test, "SpeakSettings", settings)
    monkeypatch.setattr(infer_test, "load_model", loading)
    with pytest.raises(ModelLoading):
        infer_test.main(argv)
    return languages[-1], sentences[-1]


def test_without_language_a_voice_is_checked_in_the_language_it_was_trained_in(
        trained, coded_clips, monkeypatch, tmp_path, capsys):
    """The checkpoint names its training data (trainer_state.json flags.train_jsonl), whose rows name
    each clip's language: a German-only voice speaks the German sentences, not the English ones."""
    out = ["--out_dir", str(tmp_path / "check")]
    # The trainer's own record as written: bob's rows are all english, alice's auto.
    assert settled_language(monkeypatch, ["--model_path", str(trained), "--speaker", "bob", *out])[0] == "english"
    assert "speaking english, the language bob was trained in" in capsys.readouterr().out
    # The same checkpoint's record, its training data with bob's rows in German (the model is never loaded).
    german = tmp_path / "checkpoint-german"
    german.mkdir()
    shutil.copy(trained / "config.json", german)
    for name in ("model.safetensors", "speech_tokenizer"):  # a whole model folder, the weights never loaded
        (german / name).symlink_to(trained / name)
    state = json.loads((trained / checkpoint.TRAINER_STATE).read_text())
    rows = [dict(row, language="german") if row["speaker"] == "bob" else row for row in read_jsonl(coded_clips)]
    state["flags"]["train_jsonl"] = str(write_jsonl(tmp_path / "german.jsonl", rows))
    (german / checkpoint.TRAINER_STATE).write_text(json.dumps(state))
    base = ["--model_path", str(german), *out]

    assert settled_language(monkeypatch, [*base, "--speaker", "bob"]) == ("german", infer_test.SENTENCES["german"])
    assert capsys.readouterr().out.startswith(
        "--language not given: speaking german, the language bob was trained in (the rows of ")
    # Given, --language is kept; with --data_summary for the rates, the rows still give the language.
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps(dict(characters_per_second=12.0)))
    assert settled_language(monkeypatch, [*base, "--speaker", "bob", "--language", "Auto"])[0] == "auto"
    assert settled_language(monkeypatch, [*base, "--speaker", "bob", "--data_summary", str(summary)])[0] == "german"
    capsys.readouterr()
    # No single language to pick: alice's rows are auto; alice and bob together are auto and german.
    assert settled_language(monkeypatch, [*base, "--speaker", "alice"]) == ("auto", infer_test.SENTENCES["english"])
    # Rows that name no language may be of one the model lacks: said, with how to check it in its own.
    said = capsys.readouterr().out
    assert "name no language for alice (auto), so the built-in sentences spoken are English; a voice of another " \
           "language is checked in it with --text_file FILE" in said and "--language not given" not in said
    assert settled_language(monkeypatch, base)[0] == "auto"
    said = capsys.readouterr().out
    assert "--language not given" not in said and "name no language" not in said


@pytest.mark.parametrize("given, meant, text", [("de", "german", []), ("germna", "german", ["--text", "Hallo."]),
                                                ("pt-BR", "portuguese", [])])
def test_a_language_the_model_lacks_suggests_the_one_meant(trained, tmp_path, capsys, given, meant, text):
    """An ISO code or a misspelling stops before the model loads, naming the language it most likely
    means, whether the built-in sentences or --text are spoken."""
    with pytest.raises(SystemExit) as stopped:
        infer_test.main(["--model_path", str(trained), "--language", given, *text, "--out_dir", str(tmp_path)])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"--language {given!r} is not one of ['auto', " in error and error.endswith(f"did you mean {meant!r}?\n")


def test_an_output_folder_lists_its_checkpoints_and_names_the_newest(trained, capsys):
    with pytest.raises(SystemExit) as stopped:
        infer_test.main(["--model_path", str(trained.parent)])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"{trained.parent} is a training output folder, not a checkpoint" in error
    assert f"  {trained}  (step " in error and f"the newest: --model_path {trained}" in error


def test_a_base_model_says_it_has_no_fine_tuned_speakers(tiny_model, capsys):
    with pytest.raises(SystemExit) as stopped:
        infer_test.main(["--model_path", str(tiny_model)])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"{tiny_model} is a Base model: it has no fine-tuned speakers" in error
    assert f"sft_12hz_chatterbox.py --init_model_path {tiny_model}" in error and "is not in" not in error


def test_every_speaker_is_named_where_to_listen(trained, alice_clip, monkeypatch, tmp_path, capsys):
    out = tmp_path / "check"
    run_checker(monkeypatch, trained, out, [
        "--speaker", "alice", "--speaker", "bob", "--text", alice_clip["text"], "--language", alice_clip["language"],
        "--max_new_tokens", str(len(alice_clip["audio_codes"]) + 4), "--report_only"], alice_clip["audio_codes"])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"for alice, bob: report.json in {out}" in last_line
    assert f"listen to {out / 'alice_*.wav'}, {out / 'bob_*.wav'}" in last_line


def test_help_shows_defaults_without_importing_torch():
    """--help and reading the command line answer in a moment: the model code is not imported."""
    child = """
import runpy, sys
import infer_test
infer_test.parse_args(["--model_path", "some/checkpoint"])
print("after parse_args, torch imported:", "torch" in sys.modules)
sys.argv = ["infer_test.py", "--help"]
try:
    runpy.run_path("infer_test.py", run_name="__main__")
except SystemExit:
    pass
print("after --help, torch imported:", "torch" in sys.modules)
"""
    printed = run_script("-c", child).stdout
    assert "after parse_args, torch imported: False" in printed and "after --help, torch imported: False" in printed
    assert "sentences generated together (default: 4)" in printed
    assert f"(default: {Thresholds.max_dc_offset})" in printed
    assert "(default: the language the checked speakers' training rows name, when it is one with built-in " \
           "sentences, else auto)" in " ".join(printed.split())  # the help's lines are wrapped


def test_speaker_names_that_clean_up_alike_get_files_of_their_own():
    stems = infer_test.wav_stems(["a b", "a_b", "A_B", "émile"])
    assert stems == {"a b": "a_b", "a_b": "a_b-2", "A_B": "A_B-3", "émile": "émile"}


def test_arguments_that_cannot_work_stop_with_a_message_not_a_traceback(trained, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    bad_config = tmp_path / "bad_model"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    cut_copy = tmp_path / "cut_copy"  # a checkpoint copied without its weights
    shutil.copytree(trained, cut_copy, ignore=shutil.ignore_patterns("model.safetensors", "training_state"))
    cases = [(["--text", " "], "--text must hold a sentence"),
             (["--device", "bogus"], "--device bogus: not a device"),
             (["--out_dir", str(tmp_path / "a_file")], "cannot make that folder"),
             (["--compare_base", "--base_model_path", str(tmp_path / "nowhere")], "no model folder there"),
             (["--model_path", str(bad_config)], "config.json is not valid JSON"),
             (["--model_path", str(cut_copy)], "an incomplete model folder: no model.safetensors (an interrupted"),
             (["--model_path", str(trained / "speech_tokenizer")], "is not a Qwen3-TTS model folder"),
             # the TTS model passed for the recogniser: named before anything is spoken, not a traceback after
             (["--asr_model", str(trained)], "a 'qwen3_tts' model, not a speech-recognition one"),
             (["--compare", str(tmp_path / "nowhere")], "--compare " + str(tmp_path / "nowhere") + ": not found")]
    for flags, message in cases:
        model = [] if "--model_path" in flags or "--compare" in flags else ["--model_path", str(trained)]
        with pytest.raises(SystemExit) as stopped:
            infer_test.main(model + flags)
        assert stopped.value.code == 2, flags
        assert message in capsys.readouterr().err, flags
