"""Checkpoints chosen by listening: the trainer speaks at its evaluations with the weights as they
stand, logs what it heard (scores.jsonl, tensorboard scalars and audio) without changing training,
ranks the evaluations, keeps and links the best, and a resume keeps the history; infer_test.py
--compare shows the evaluations side by side.

The tiny model speaks noise that never stops, so the ranking test plants what it needs: generation
forced along alice's clip (then codec_eos) and a stand-in voice at her pitch for the speech decoder,
then a wrong speaker vector at one step and a layout that never stops at another."""

import shutil

import numpy as np
import pytest
import torch
from qwen_tts import Qwen3TTSModel

import infer_test
import sft_12hz_chatterbox
from qwen3_tts_sft import checkpoint, listening, scoring, tiny_model
from helpers import forced_heads, read_jsonl, train, write_jsonl

ALICE_PITCH_HZ = 110.0  # tiny_model.write_synthetic_clips voices its first speaker at 110 Hz
RUN = dict(max_steps=4, save_steps=2)  # 8 clips, 2 a step
LISTEN = dict(eval_generate_steps=2, eval_max_new_tokens=6, report_to="tensorboard")  # a few frames at steps 2, 4


@pytest.fixture(scope="module")
def one_sentence(tmp_path_factory):
    path = tmp_path_factory.mktemp("sentences") / "sentences.txt"
    path.write_text("Hi there.\n\n")
    return path


@pytest.fixture(scope="module")
def listened(tiny_model, coded_clips, one_sentence, tmp_path_factory):
    """A run that listens at steps 2 and 4 (8 clips, 2 a step), with tensorboard, and its twin without."""
    folder = tmp_path_factory.mktemp("listened")
    on = train(tiny_model, coded_clips, folder / "on", eval_sentences=one_sentence, **RUN, **LISTEN)
    off = train(tiny_model, coded_clips, folder / "off", eval_generate_steps=0, **RUN)
    return on, off


def test_scores_and_audio_at_the_listening_steps_and_training_is_unchanged(listened, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    on, off = listened
    scores = scoring.read_scores(on / scoring.SCORES_FILE)
    assert [entry["step"] for entry in scores] == [2, 4]
    assert [entry["checkpoint"] for entry in scores] == ["checkpoint-step-2", "checkpoint-epoch-0"]
    for entry in scores:
        speakers = entry["layouts"]["non_streaming"]["speakers"]
        assert [s["speaker"] for s in speakers] == ["alice", "bob"]
        assert all(-1 <= s["speaker_similarity"] <= 1 and s["rate_ratio"] > 0 for s in speakers)
        assert entry["sentences"] == 2 and entry["listen_seconds"] > 0
        assert entry["listening_score"] == -1.0 and not entry["floors_passed"]  # random weights: 6 frames, no stop
    assert not (off / scoring.SCORES_FILE).exists()

    events = EventAccumulator(str(next((on / "logs").glob("sft_12hz-*"))), size_guidance={"audio": 0})
    events.Reload()
    assert [e.step for e in events.Audio("listen/non_streaming/alice/0")] == [2, 4]
    assert [e.step for e in events.Audio("listen/non_streaming/bob/0")] == [2, 4]
    assert [e.step for e in events.Scalars("listen/score")] == [2, 4]
    assert "listen/non_streaming/alice/speaker_similarity" in events.Tags()["scalars"]

    # Speaking draws no randomness and leaves the model in train mode: the same losses and weights.
    def losses(output):
        history = checkpoint.read_trainer_state(output / "checkpoint-epoch-0").progress.log_history
        return [entry["train/loss"] for entry in history if "train/loss" in entry]
    assert losses(on) == losses(off) and len(losses(on)) == 4
    weights_on = (on / "checkpoint-epoch-0" / checkpoint.MODEL_WEIGHTS).read_bytes()
    assert weights_on == (off / "checkpoint-epoch-0" / checkpoint.MODEL_WEIGHTS).read_bytes()


def test_resume_keeps_the_evaluation_history(listened, tiny_model, coded_clips, one_sentence, tmp_path):
    on, _ = listened
    output = tmp_path / "resumed"
    shutil.copytree(on, output, symlinks=True)
    # As if killed after step 4's listening was written, before its checkpoint was saved.
    shutil.rmtree(output / "checkpoint-epoch-0")
    train(tiny_model, coded_clips, output, eval_sentences=one_sentence, resume_from_checkpoint="latest",
          **RUN, **LISTEN)
    first, again = scoring.read_scores(on / scoring.SCORES_FILE), scoring.read_scores(output / scoring.SCORES_FILE)
    assert [entry["step"] for entry in again] == [2, 4]  # step 4 measured again, not listed twice
    assert again[0] == first[0]  # step 2 as the checkpoint saved it
    assert again[1]["speaker_similarity"] == pytest.approx(first[1]["speaker_similarity"], abs=1e-5)
    state = checkpoint.read_trainer_state(output / "checkpoint-epoch-0")
    assert [entry["step"] for entry in state.progress.evaluations] == [2, 4]


def test_a_resume_under_another_metric_never_links_a_removed_checkpoint(listened, tiny_model, coded_clips,
                                                                       one_sentence, tmp_path):
    """Under the old metric --save_total_limit removed step 2's checkpoint; ranked by the new one,
    step 2 would win. The resumed run picks the best it still has, and best/ never dangles."""
    import json

    on, _ = listened
    output = tmp_path / "resumed"
    shutil.copytree(on, output, symlinks=True)
    shutil.rmtree(output / "checkpoint-step-2")
    state_file = output / "checkpoint-epoch-0" / checkpoint.TRAINER_STATE
    state = json.loads(state_file.read_text())
    state["evaluations"][0]["speaker_similarity"] = 1.0  # step 2: the best by similarity
    state_file.write_text(json.dumps(state))
    train(tiny_model, coded_clips, output, eval_sentences=one_sentence, resume_from_checkpoint="latest",
          metric_for_best_model="speaker_similarity", load_best_model_at_end=True, allow_schedule_change=True,
          num_epochs=2, **dict(RUN, max_steps=6), **LISTEN)
    best = (output / scoring.BEST_LINK).resolve()
    assert best.is_dir() and best.name != "checkpoint-step-2"
    assert Qwen3TTSModel.from_pretrained(str(best)).model.talker is not None


# ---------------------------------------------------------------------------------------------
# Planted bad checkpoints
# ---------------------------------------------------------------------------------------------

def stand_in_voice(encoded):
    """The speech decoder's answer to codes: a voice at alice's pitch, 1920 samples a frame."""
    rng = np.random.default_rng(1)
    rate = tiny_model.SAMPLE_RATE
    return [tiny_model.synthetic_voice(len(item["audio_codes"]) / 12.5, rate, ALICE_PITCH_HZ, rng)
            for item in encoded], rate


def test_planted_bad_checkpoints_score_worse_and_the_best_survives_as_best(tiny_model, coded_clips, tmp_path,
                                                                           monkeypatch, capsys):
    alice_rows = [row for row in read_jsonl(coded_clips) if row["speaker"] == "alice"]
    clip = min(alice_rows, key=lambda row: len(row["audio_codes"]))
    data = write_jsonl(tmp_path / "alice.jsonl", alice_rows)  # 4 clips x 2 layouts, 2 a step: 4 steps, 3 run
    sentences = tmp_path / "sentences.txt"
    sentences.write_text(clip["text"] + "\n")
    codes = np.asarray(clip["audio_codes"])
    cap = len(codes) + 4
    runaway = np.concatenate([codes] * (cap // len(codes) + 2))  # codec_eos would come after the cap
    planted = {2: "wrong speaker vector", 3: "streaming never stops"}
    real_listen, real_voice = scoring.listen, listening.vector_voice
    good_vectors, current_step = {}, [0]

    def listen(run):
        current_step[0] = run.progress.step
        module = run.accelerator.unwrap_model(run.train_module)
        vectors = module.fixed_speaker_vectors
        good_vectors.setdefault("alice", vectors[0].clone())
        vectors[0].copy_(good_vectors["alice"])  # in place, as CUDA graphs need; undoes an earlier plant
        if planted.get(run.progress.step) == "wrong speaker vector":
            vectors[0].copy_(torch.randn(vectors.shape[1], generator=torch.Generator().manual_seed(0)))
        return real_listen(run)

    def vector_voice(tts, vectors, prompter):
        tts.model.speech_tokenizer.decode = stand_in_voice
        generate = real_voice(tts, vectors, prompter)
        eos = tts.model.config.talker_config.codec_eos_token_id

        def forced(texts, names, options):  # the heads are forced only while this batch speaks
            runs_away = planted.get(current_step[0]) == "streaming never stops" and not options["non_streaming_mode"]
            with forced_heads(tts.model, runaway if runs_away else codes, eos):
                return generate(texts, names, options)
        return forced

    monkeypatch.setattr(scoring, "listen", listen)
    monkeypatch.setattr(listening, "vector_voice", vector_voice)
    flags = dict(text_layout="both", eval_generate_steps=1, eval_sentences=sentences, eval_max_new_tokens=cap,
                 metric_for_best_model="listening_score", load_best_model_at_end=True, save_total_limit=1,
                 save_steps=0, max_steps=3)
    output = train(tiny_model, data, tmp_path / "out", **flags)
    monkeypatch.undo()

    scores = {entry["step"]: entry for entry in scoring.read_scores(output / scoring.SCORES_FILE)}
    assert sorted(scores) == [1, 2, 3]
    good = scores[1]
    assert good["floors_passed"] and good["stopped"] == good["sentences"] == 2
    assert good["speaker_similarity"] > 0.9
    assert scores[2]["speaker_similarity"] < listening.Thresholds.min_speaker_similarity
    assert scores[2]["listening_score"] < good["listening_score"]
    assert not scores[3]["floors_passed"] and scores[3]["listening_score"] < 0
    assert scores[3]["layouts"]["non_streaming"]["score"] == pytest.approx(good["listening_score"])

    # Step 1 won: kept beside the newest (the last step), linked as best/; no planted one was ever saved.
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-step-1", "checkpoint-step-3"]
    assert (output / scoring.BEST_LINK).resolve() == (output / "checkpoint-step-1").resolve()
    summary = capsys.readouterr().out.split("***** Training finished *****")[1]
    assert "best: step 1, checkpoint-step-1: highest listening_score" in summary
    assert "among the evaluations where every sentence stopped" in summary
    assert f"model: {output / 'best'} (-> checkpoint-step-1)" in summary
    assert "* checkpoint-step-1 " in summary

    tts = Qwen3TTSModel.from_pretrained(str(output / "best"), dtype=torch.float32)
    row = tts.model.talker.get_input_embeddings().weight[tts.model.config.talker_config.spk_id["alice"]]
    assert torch.allclose(row, good_vectors["alice"].to(row), atol=1e-2)  # the good vector, in bf16, on its device

    # A requeue of the finished run names the best as its result, as the summary did, not the newest.
    train(tiny_model, data, output, resume_from_checkpoint="latest", **flags)
    printed = capsys.readouterr().out
    assert "The run's result is its best checkpoint, checkpoint-step-1 (--load_best_model_at_end)" in printed
    assert f"hear it: python infer_test.py --model_path {output / 'checkpoint-step-1'} --speaker alice" in printed


def test_the_best_saved_checkpoint_is_kept_when_the_best_evaluation_fell_between_saves(
        tiny_model, coded_clips, tmp_path, monkeypatch, capsys):
    """--eval_steps finer than --save_steps (the defaults are 2000 and 4000): the best evaluation, at step 3,
    has no checkpoint. --save_total_limit keeps the best saved one (step 4's, eval loss 3), not step 2's
    (eval loss 5) that it happened to beat first."""
    from qwen3_tts_sft.training_run import TrainingRun

    planted = {1: 9.0, 2: 5.0, 3: 1.0, 4: 3.0, 5: 8.0, 6: 8.0, 7: 8.0, 8: 8.0}
    monkeypatch.setattr(TrainingRun, "teacher_forced_losses", lambda run, dataset, indices: (planted[run.progress.step], 0.0))
    # 8 clips, 2 a step: 4 steps an epoch, 8 in all; saved at 2, 4 (epoch 0), 6 and 8 (epoch 1).
    output = train(tiny_model, coded_clips, tmp_path / "out", eval_jsonl=coded_clips, eval_steps=1, save_steps=2,
                   num_epochs=2, save_total_limit=1)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-epoch-0", "checkpoint-epoch-1"]
    state = checkpoint.read_trainer_state(output / "checkpoint-epoch-1")
    assert (state.progress.best_step, state.progress.best_checkpoint) == (3, "checkpoint-epoch-0")
    summary = capsys.readouterr().out.split("***** Training finished *****")[1]
    assert "best: step 3, not saved (an evaluation between saves); the best saved one, kept: checkpoint-epoch-0" in summary


def test_best_follows_the_best_after_a_resume_without_load_best_model_at_end(tiny_model, coded_clips, tmp_path,
                                                                             monkeypatch):
    """The first part of the run linked best/; its requeue forgot --load_best_model_at_end. Better checkpoints
    come, the old best is removed by --save_total_limit: best/ moves with the best instead of dangling."""
    from qwen3_tts_sft.training_run import TrainingRun

    monkeypatch.setattr(TrainingRun, "teacher_forced_losses", lambda run, dataset, indices: (10.0 - run.progress.step, 0.0))
    flags = dict(eval_jsonl=coded_clips, eval_steps=1, save_steps=1, save_total_limit=1)
    output = train(tiny_model, coded_clips, tmp_path / "out", max_steps=2, load_best_model_at_end=True, **flags)
    assert (output / scoring.BEST_LINK).resolve().name == "checkpoint-step-2"
    train(tiny_model, coded_clips, output, max_steps=4, resume_from_checkpoint="latest", allow_schedule_change=True,
          **flags)
    assert not (output / "checkpoint-step-2").exists()
    assert (output / scoring.BEST_LINK).resolve() == (output / "checkpoint-epoch-0").resolve()
    assert Qwen3TTSModel.from_pretrained(str(output / scoring.BEST_LINK)).model.talker is not None


def test_a_run_branched_off_into_another_folder_never_links_the_old_folders_best(tiny_model, coded_clips, tmp_path,
                                                                                  capsys):
    """The checkpoint's best lies in the folder it came from. Until the branch evaluates, it has no best: its
    step-2 checkpoint names none and best/ is made with the first best of its own, never pointing outside it.
    The summary's table says where the inherited evaluation's checkpoint lies, not that it was removed."""
    flags = dict(eval_jsonl=coded_clips, save_steps=1, load_best_model_at_end=True)
    first = train(tiny_model, coded_clips, tmp_path / "first", eval_steps=1, max_steps=2, **flags)
    capsys.readouterr()
    branch = train(tiny_model, coded_clips, tmp_path / "branch", eval_steps=3, max_steps=3, allow_schedule_change=True,
                   resume_from_checkpoint=first / "checkpoint-step-1", **flags)
    assert checkpoint.read_trainer_state(branch / "checkpoint-step-2").progress.best_checkpoint is None
    assert (branch / scoring.BEST_LINK).resolve() == (branch / "checkpoint-step-3").resolve()
    summary = capsys.readouterr().out
    assert "checkpoint-step-1 (in first/)" in summary and "(removed)" not in summary


# ---------------------------------------------------------------------------------------------
# Flags and infer_test.py --compare
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (dict(metric_for_best_model="listening_score"), "--metric_for_best_model listening_score is measured by speaking"),
    (dict(load_best_model_at_end=True), "--load_best_model_at_end with --metric_for_best_model eval_loss needs eval"),
    (dict(eval_split=0.25, eval_generate_steps=0, asr_model="."), "--asr_model: nothing is spoken with "
                                                                  "--eval_generate_steps 0"),
    (dict(eval_generate_steps=2, eval_sentences="nowhere.txt"), "--eval_sentences nowhere.txt: file not found"),
])
def test_listening_flags_that_cannot_work_are_refused_by_name(tiny_model, coded_clips, tmp_path, flags, message):
    from helpers import trainer_argv

    argv = trainer_argv(tiny_model, coded_clips, tmp_path, **flags)
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        sft_12hz_chatterbox.check_args(sft_12hz_chatterbox.parse_args(argv))


def test_eval_sentences_that_do_not_read_are_refused_before_the_model_loads(tiny_model, coded_clips, tmp_path):
    """A file saved in Latin-1: named with its line before any model loads, not after it, at the listening setup."""
    from helpers import trainer_argv

    sentences = tmp_path / "sentences.txt"
    sentences.write_bytes("Hello.\nCaf\u00e9 ol\u00e9.\n".encode("latin-1"))
    argv = trainer_argv(tiny_model, coded_clips, tmp_path / "out", eval_generate_steps=2, eval_sentences=sentences)
    with pytest.raises(SystemExit, match=f"--eval_sentences {sentences}: line 2: not UTF-8 .* save the file as UTF-8"):
        sft_12hz_chatterbox.check_args(sft_12hz_chatterbox.parse_args(argv))


def test_a_model_that_does_not_transcribe_is_refused_as_the_recogniser_before_the_run(tiny_model, coded_clips,
                                                                                      tmp_path):
    """The Qwen3-TTS model given as --asr_model: named at the flags, not a transformers traceback at the
    first evaluation that speaks."""
    from helpers import trainer_argv

    argv = trainer_argv(tiny_model, coded_clips, tmp_path, eval_split=0.25, eval_generate_steps=2, asr_model=tiny_model)
    with pytest.raises(SystemExit, match="--asr_model .*: a 'qwen3_tts' model, not a speech-recognition one"):
        sft_12hz_chatterbox.check_args(sft_12hz_chatterbox.parse_args(argv))


def test_compare_prints_checkpoints_and_scores_side_by_side(listened, capsys, tmp_path):
    on, _ = listened
    infer_test.main(["--compare", str(on), str(on / "checkpoint-step-2"), "--text", "Hi.", "--max_new_tokens", "4",
                     "--greedy", "--out_dir", str(tmp_path)])
    printed = capsys.readouterr().out.splitlines()
    table = printed[printed.index(next(line for line in printed if "similarity" in line and "stopped" in line)):]
    rows = table[1:4]
    assert "on/checkpoint-step-2" in rows[0] and "on/checkpoint-epoch-0" in rows[1]
    assert str(on / "checkpoint-step-2") in rows[2] and "0/2" in rows[2]
    assert (tmp_path / "checkpoint-step-2" / "report.json").is_file()
    assert table[-1].startswith("* the best: ")


def test_compare_on_an_output_without_evaluations_lists_its_checkpoints(tiny_model, tmp_path, capsys):
    output = tmp_path / "out"
    for name in ("checkpoint-epoch-0", "checkpoint-epoch-1"):
        (output / name).mkdir(parents=True)
        (output / name / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as raised:
        infer_test.main(["--compare", str(output)])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert f"holds no {scoring.SCORES_FILE}: the run made no evaluations" in error
    assert f"--compare {output / 'checkpoint-epoch-0'} {output / 'checkpoint-epoch-1'}" in error


def test_ranking_puts_every_stopping_evaluation_first_and_ties_go_to_the_lower_eval_loss():
    def entry(step, similarity, floors_passed=True, eval_loss=None):
        return dict(step=step, speaker_similarity=similarity, listening_score=similarity if floors_passed else -0.5,
                    floors_passed=floors_passed, eval_loss=eval_loss)
    runs_away = entry(1, 0.95, floors_passed=False, eval_loss=1.0)  # the most similar voice, but one sentence never stops
    stops, same = entry(2, 0.7, eval_loss=2.0), entry(3, 0.7, eval_loss=3.0)
    evaluations = [runs_away, stops, same]
    assert scoring.choose_best(evaluations, "speaker_similarity") is stops
    assert scoring.choose_best(evaluations, "listening_score") is stops
    assert scoring.choose_best(evaluations, "eval_loss") is runs_away  # the loss alone cannot tell
    assert scoring.choose_best([entry(4, None)], "speaker_similarity") is None
    # Equal measures: the lower eval loss wins, whichever step came first; without losses, the earlier step.
    never_stops, lower_loss = entry(5, -1.0, False, eval_loss=2.5), entry(6, -1.0, False, eval_loss=1.5)
    assert scoring.choose_best([never_stops, lower_loss], "listening_score") is lower_loss
    assert scoring.choose_best([stops, same], "speaker_similarity") is stops
    first, second = entry(7, 0.7), entry(8, 0.7)
    assert scoring.choose_best([first, second], "speaker_similarity") is first
    assert "every sentence stopped" in scoring.why_best(stops, "speaker_similarity")
    # The default frame cap: the longest text at a third of the slowest voice's training rate, plus 2 s.
    items = [("alice", 0, "x" * 30), ("bob", 0, "y" * 15)]
    rates = {listening.ALL_SPEAKERS: {"alice": 15.0, "bob": 10.0}}
    assert scoring.frame_cap(items, rates) == 138  # 12.5/s x (2 s + 3 x 30 chars / 10 a s)
    assert scoring.frame_cap(items, None) == listening.auto_frame_cap(["x" * 30])


def test_the_table_keeps_a_wide_value_apart_from_the_next():
    """A checkpoint that stops at once speaks many times the training rate: 0/9 and 32.76-39.71x must not
    read as 0/932.76-39.71x."""
    entry = dict(step=3, eval_loss=10.15, listening_score=-1.0, speaker_similarity=0.869, stopped=0, sentences=9,
                 listen_seconds=0.6, checkpoint="checkpoint-step-3",
                 layouts={"non_streaming": dict(speakers=[dict(rate_ratio=32.76), dict(rate_ratio=39.71)])})
    header, row = scoring.table_rows([entry])
    assert row.split() == ["checkpoint-step-3", "3", "10.1500", "-1.000", "0.869", "0/9", "32.76-39.71x", "-", "0.6"]
    assert header.split() == ["step", "eval", "loss", "score", "similarity", "stopped", "rate", "cer", "seconds"]


def test_listening_speaks_the_voices_the_run_trains_and_no_others():
    """A voice only the eval data speaks is untrained: as a run's score is its worst voice's, listening to
    it would choose the best checkpoint by a voice training never touches. Kept voices have their replay loss."""
    from types import SimpleNamespace

    from qwen3_tts_sft.speakers import Speaker

    table = [Speaker("anna", 3000), Speaker("bert", 3001), Speaker("stranger", 3002), Speaker("vivian", 3003, kept=True)]
    clips = [SimpleNamespace(speaker="anna", language="english")] * 3 + [SimpleNamespace(speaker="bert", language="chinese")]
    items = scoring.items_to_speak(table, clips)
    assert {speaker for spoken in items.values() for speaker, _, _ in spoken} == {"anna", "bert"}
    assert [speaker for speaker, _, _ in items["english"]] == ["anna"] * len(listening.SCORING_SENTENCES["english"])
    own = scoring.items_to_speak(table, clips, ["One.", "Two."])
    assert own == {"english": [("anna", 0, "One."), ("anna", 1, "Two.")], "chinese": [("bert", 0, "One."), ("bert", 1, "Two.")]}
