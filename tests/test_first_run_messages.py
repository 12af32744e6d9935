"""The trainer tells a new user the truth before and after a run: a warmup too long for the run, the
learning rate it reaches, the disk its checkpoints take, progress in a log file, a finished or
re-shaped resume, the common mistakes with their fixes, and no noise from optional packages."""

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, read_jsonl, train, write_jsonl
from qwen3_tts_sft import checkpoint, quiet, training_run, training_setup

# 8 clips, 2 held out: 6 train clips, 2 a step -> 3 steps. A warmup of 4 covers all of them, so the
# rate climbs 0, 2.5e-06, 5e-06 and never reaches --lr 1e-05.
# --speaker_name as the recipe has it, though every row of these clips names its speaker (alice, bob).
RUN = dict(batch_size=2, lr=1e-5, warmup_steps=4, eval_split=0.25, eval_steps=2, report_to="tensorboard",
           speaker_name="my_speaker")


@pytest.fixture(scope="module")
def short_run(tiny_model, coded_clips, tmp_path_factory):
    """(output folder, everything it printed): a run too short for its warmup, written to a pipe
    (no terminal), with a progress line after every step."""
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(training_run, "PROGRESS_LINE_SECONDS", 0)
        output = train(tiny_model, coded_clips, tmp_path_factory.mktemp("short") / "out", **RUN)
    return output, printed.getvalue()


def copy_of(output, tmp_path):
    return shutil.copytree(output, tmp_path / "out")


def banner_and_summary(printed: str) -> tuple:
    banner = printed.split("***** Running training *****")[1].split("train step")[0]
    return banner, printed.split("***** Training finished *****")[1]


def test_a_loss_logged_once_is_not_shown_as_a_trend(tiny_model, coded_clips, tmp_path, capsys):
    train(tiny_model, coded_clips, tmp_path / "out", max_steps=2, logging_steps=50)
    summary = capsys.readouterr().out.split("***** Training finished *****")[1]
    assert "at step 2, logged once (every --logging_steps 50 steps, and at the end)" in summary
    assert " -> " not in summary.split("learning rate")[0]


def test_a_speaker_name_that_names_no_voice_is_said(short_run):
    _, printed = short_run
    assert ("note: --speaker_name my_speaker names no voice of this run: every row names its own speaker "
            "(alice, bob)") in printed


def test_help_shows_the_defaults_without_importing_torch():
    code = ("import contextlib, io, sys\n"
            "import sft_12hz_chatterbox\n"
            "shown = io.StringIO()\n"
            "with contextlib.redirect_stdout(shown), contextlib.suppress(SystemExit):\n"
            "    sft_12hz_chatterbox.parse_args(['--help'])\n"
            "print('torch' in sys.modules, '(default: 100)' in shown.getvalue(), '(default: 2)' in shown.getvalue())\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["False", "True", "True"], result.stdout + result.stderr


def test_a_warmup_longer_than_half_the_run_is_warned_with_the_rate_reached(short_run):
    banner, summary = banner_and_summary(short_run[1])
    assert "3 optimizer steps, 4 warmup, linear schedule, peak lr 5e-06 (--lr 1e-05)" in banner
    warning = ("warning: --warmup_steps 4 covers more than half of the 3 optimizer steps: the learning rate never "
               "gets above 5e-06 (--lr 1e-05)")
    assert warning in banner
    assert "(--warmup_steps 0 here: any warmup makes the first update's rate 0)" in banner
    assert "learning rate: reached 5e-06 (--lr 1e-05, 4 warmup steps)" in summary and warning in summary


def test_a_warmup_within_the_run_is_not_warned(tiny_model, coded_clips, tmp_path, capsys):
    train(tiny_model, coded_clips, tmp_path / "out", batch_size=2, lr=1e-5, warmup_steps=1, max_steps=2)
    printed = capsys.readouterr().out
    assert "linear schedule, peak lr 1e-05\n" in printed and "warning" not in printed
    assert "learning rate: reached 1e-05" in printed


def test_trainer_state_keeps_the_learning_rate_at_full_precision(short_run):
    state = json.loads((short_run[0] / "checkpoint-epoch-0" / checkpoint.TRAINER_STATE).read_text())
    rates = [entry["train/lr"] for entry in state["log_history"] if "train/lr" in entry]
    assert rates == [0.0, 2.5e-06, 5e-06]  # exactly: not rounded to 3e-06


def test_progress_lines_without_a_terminal_and_labelled_eval_lines(short_run):
    lines = short_run[1].splitlines()
    progress = [line for line in lines if line.startswith("train step ") and " clips/s, " in line]
    assert [line.split(":")[0] for line in progress] == ["train step 1/3", "train step 2/3", "train step 3/3"]
    assert all(" elapsed, ETA " in line for line in progress)
    logged = [line for line in lines if line.startswith("train step ") and "loss " in line]
    assert len(logged) == 3 and all("elapsed, ETA" in line for line in logged)
    assert [line.split(":")[0] for line in lines if line.startswith("eval step ")] == ["eval step 2", "eval step 3"]
    assert not [line for line in lines if line.startswith("step ")]


def test_the_header_says_why_it_trains_on_the_cpu(short_run, monkeypatch):
    header = short_run[1].split("flags: ")[0]
    if training_setup.torch.cuda.is_available():  # a GPU box: the run took it and says so, with no excuse
        assert "device: cuda" in header and "training on the CPU" not in header
    else:
        assert ("no CUDA GPU found (torch.cuda.is_available() is False): training on the CPU, which is only "
                "practical for the tiny test model") in header
    # The reasons, whatever this machine has: none visible, none found, a torch without CUDA.
    monkeypatch.setattr(training_setup.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(training_setup.torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert training_setup.why_no_gpu() == "no CUDA GPU found (torch.cuda.is_available() is False)"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert training_setup.why_no_gpu() == ("no GPU is visible: CUDA_VISIBLE_DEVICES is set to '' and torch sees "
                                           "no GPU through it")


def test_the_banner_states_which_checkpoints_are_kept_and_their_disk_cost(short_run):
    banner, _ = banner_and_summary(short_run[1])
    stated = float(banner.split(", about ")[1].split(" MB each; ")[0]) * 1e6
    written = sum(path.stat().st_size for path in (short_run[0] / "checkpoint-epoch-0").rglob("*") if path.is_file())
    assert 0.9 < stated / written < 1.1
    kept = banner.split(" MB each; --save_total_limit 2 keeps the newest 2, the best by --metric_for_best_model "
                        "counted among them: "
                        "up to ")[1]
    number, unit = kept.split(" while the next is written (0 keeps all)")[0].split()
    assert 2.9 < float(number) * {"MB": 1e6, "GB": 1e9}[unit] / stated < 3.1  # two kept and the next one


def test_hear_it_names_every_speaker(short_run):
    _, summary = banner_and_summary(short_run[1])
    folder = short_run[0] / "checkpoint-epoch-0"
    assert f"hear it: python infer_test.py --model_path {folder} --speaker alice --speaker bob" in summary


def test_each_run_logs_to_its_own_tracker_folder(short_run):
    runs = list((short_run[0] / "logs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("sft_12hz-")
    state = checkpoint.read_trainer_state(short_run[0] / "checkpoint-epoch-0")
    assert state.progress.tracker_run == runs[0].name and state.total_steps == 3


def test_resuming_a_finished_run_says_so_and_trains_nothing(tiny_model, coded_clips, short_run, tmp_path, capsys):
    output = copy_of(short_run[0], tmp_path)
    train(tiny_model, coded_clips, output, resume_from_checkpoint="latest", **RUN)  # returns: exit status 0
    printed = capsys.readouterr().out
    assert f"already finished: {output / 'checkpoint-epoch-0'} is at step 3 of the run's 3" in printed
    assert f"hear it: python infer_test.py --model_path {output / 'checkpoint-epoch-0'}" in printed
    assert "Running training" not in printed and "train step" not in printed


def test_a_changed_schedule_on_resume_is_refused_unless_allowed(tiny_model, coded_clips, short_run, tmp_path, capsys):
    output = copy_of(short_run[0], tmp_path)
    with pytest.raises(SystemExit) as raised:
        train(tiny_model, coded_clips, output, resume_from_checkpoint="latest", **dict(RUN, num_epochs=2, lr=2e-5))
    message = str(raised.value)
    assert "--num_epochs is 2 but the checkpoint was made with 1" in message
    assert "--lr is 2e-05 but the checkpoint was made with 1e-05" in message and "--allow_schedule_change" in message

    capsys.readouterr()
    train(tiny_model, coded_clips, output, resume_from_checkpoint="latest", allow_schedule_change=True,
          **dict(RUN, num_epochs=2, lr=2e-5))
    history = checkpoint.read_trainer_state(output / "checkpoint-epoch-1").progress.log_history
    rates = [entry["train/lr"] for entry in history if "train/lr" in entry]
    # Steps 1-3 as trained; then the new schedule (6 steps, warmup 4, peak 2e-5) from step 4 on.
    assert rates[:3] == [0.0, 2.5e-06, 5e-06]
    assert rates[3:] == pytest.approx([1.5e-5, 2e-5, 1e-5], rel=1e-12)
    assert "from step 4 the learning rate follows the new schedule (7.5e-06 -> 1.5e-05)" in capsys.readouterr().out
    runs = list((output / "logs").iterdir())
    resumed = checkpoint.read_trainer_state(output / "checkpoint-epoch-1")
    assert [run.name for run in runs] == [resumed.progress.tracker_run]
    assert len(list(runs[0].glob("events.out.tfevents.*"))) == 2  # the resume wrote on in its run's folder


def test_the_summary_gives_the_rate_reached_under_a_changed_schedule(tiny_model, coded_clips, short_run, tmp_path,
                                                                    capsys):
    # Steps 1-3 rose to 5e-06; the new schedule has no warmup and decays from 2e-5 over 6 steps, so
    # steps 4-6 use 1e-05, 6.7e-06 and 3.3e-06: the rate never reached --lr.
    output = copy_of(short_run[0], tmp_path)
    capsys.readouterr()
    train(tiny_model, coded_clips, output, resume_from_checkpoint="latest", allow_schedule_change=True,
          **dict(RUN, num_epochs=2, lr=2e-5, warmup_steps=0))
    summary = capsys.readouterr().out.split("***** Training finished *****")[1]
    assert "learning rate: reached 1e-05 (--lr 2e-05" in summary


def test_overwrite_output_dir_names_what_it_removes(tiny_model, coded_clips, short_run, tmp_path, capsys):
    output = copy_of(short_run[0], tmp_path)
    old_run = next((output / "logs").iterdir()).name
    train(tiny_model, coded_clips, output, overwrite_output_dir=True, max_steps=1, report_to="tensorboard")
    printed = capsys.readouterr().out
    assert f"removing 1 checkpoints from {output} (with anything written into them, such as listening reports): " \
           f"checkpoint-epoch-0" in printed
    assert f"removing the tracker logs {output / 'logs'}: {old_run}" in printed
    new_runs = list((output / "logs").iterdir())
    assert len(new_runs) == 1 and len(list(new_runs[0].glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-step-1"]


def test_a_raw_jsonl_is_sent_to_prepare_codes(tiny_model, coded_clips, tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", [{k: v for k, v in row.items() if k != "audio_codes"}
                                               for row in read_jsonl(coded_clips)])
    with pytest.raises(SystemExit) as raised:
        train(tiny_model, raw, tmp_path / "out")
    message = str(raised.value)
    assert f'{raw}: 8 rows (the first at {raw}:1) have "audio" but no "audio_codes"' in message
    assert (f"python prepare_codes.py --tokenizer_model_path {tiny_model / 'speech_tokenizer'} --input {raw} "
            f"--output_jsonl {tmp_path / 'raw_with_codes.jsonl'}") in message
    assert "audio_codes: missing" not in message and "raise the limit" not in message
    assert len(message.splitlines()) == 3


def test_init_model_path_mistakes_say_what_to_pass(tiny_model, coded_clips, short_run, tmp_path, capsys):
    output = short_run[0]
    with pytest.raises(SystemExit) as raised:
        train(output, coded_clips, tmp_path / "a")
    message = str(raised.value)
    assert f"--init_model_path {output} is a training output folder (it holds checkpoint-epoch-0)" in message
    assert f"that run started from {tiny_model}" in message
    assert f"--output_model_path {output} --resume_from_checkpoint latest" in message

    # A checkpoint is a start like a CustomVoice model (its voices kept: test_add_voices.py); the
    # trainer says how to continue that run instead. The start is refused here for want of a
    # speaker encoder only because the test removes the one the checkpoint keeps.
    checkpoint_dir = tmp_path / "checkpoint_copy"
    shutil.copytree(output / "checkpoint-epoch-0", checkpoint_dir)
    (checkpoint_dir / "speaker_encoder.safetensors").unlink()
    with pytest.raises(SystemExit) as raised:
        train(checkpoint_dir, coded_clips, tmp_path / "b")
    printed = capsys.readouterr().out
    assert "is a checkpoint of a fine-tuning run: a new run starts from it" in printed
    assert f"--resume_from_checkpoint {checkpoint_dir}" in printed and f"--init_model_path {tiny_model}" in printed
    assert "--speaker_encoder_from" in str(raised.value)

    custom_voice = tmp_path / "custom_voice"
    custom_voice.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    (custom_voice / "config.json").write_text(json.dumps(dict(config, tts_model_type="voice_design")))
    with pytest.raises(SystemExit) as raised:
        train(custom_voice, coded_clips, tmp_path / "c")
    assert "is a 'voice_design' model; start from a Base or a CustomVoice model" in str(raised.value)

    # The speech tokenizer folder inside the model, a folder that is not there, a hub id.
    with pytest.raises(SystemExit) as raised:
        train(tiny_model / "speech_tokenizer", coded_clips, tmp_path / "d")
    assert f"it is a part of the model in {tiny_model}; pass that folder" in str(raised.value)
    with pytest.raises(SystemExit) as raised:
        train(tmp_path / "nowhere", coded_clips, tmp_path / "e")
    assert f"--init_model_path {tmp_path / 'nowhere'}: no such folder" in str(raised.value)
    with pytest.raises(SystemExit) as raised:
        train("Qwen/Qwen3-TTS-12Hz-1.7B-Base", coded_clips, tmp_path / "f")
    assert "huggingface-cli download Qwen/Qwen3-TTS-12Hz-1.7B-Base --local-dir Qwen3-TTS-12Hz-1.7B-Base" in str(raised.value)


def test_the_commands_import_qwen_tts_without_its_notices(tiny_model):
    """Each command's own way to qwen_tts (the trainer's setup, infer_test's model loader,
    prepare_codes' tokenizer loader), each in a fresh process run side by side, prints no notice."""
    loaders = ["import sft_12hz_chatterbox; from qwen3_tts_sft import training_setup",  # what main() imports
               "import infer_test; infer_test.load_model(MODEL, 'cpu')",
               "import prepare_codes; prepare_codes.load_tokenizer(MODEL + '/speech_tokenizer', 'cpu')"]
    processes = [subprocess.Popen([sys.executable, "-c", f"MODEL = {str(tiny_model)!r}; {loader}; import sys; "
                                   "assert 'qwen_tts' in sys.modules"], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for loader in loaders]
    for loader, process in zip(loaders, processes):
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{loader}: {stderr}"
        assert "flash-attn" not in stdout + stderr and "SoX" not in stdout + stderr, loader
        assert "sox: not found" not in stderr, loader


def test_only_the_import_notices_are_silenced(capfd):
    with quiet.shell_stderr_without(quiet.SHELL_SOX_NOT_FOUND):
        subprocess.run(["sh", "-c", "echo 'sh: 1: sox: not found' >&2; echo 'a real problem' >&2"], check=True)
    assert capfd.readouterr().err == "a real problem\n"


def test_after_a_resume_the_summary_gives_the_highest_rate_any_update_used(tiny_model, coded_clips, tmp_path, capsys):
    """Step 1 used --lr (no warmup, then a linear decay); the resumed run's summary still says so,
    though no log line recorded that rate."""
    flags = dict(batch_size=2, lr=1e-5, warmup_steps=0, logging_steps=50, save_steps=1)
    output = train(tiny_model, coded_clips, tmp_path / "out", max_steps=2, **flags)
    capsys.readouterr()
    train(tiny_model, coded_clips, output, max_steps=3, resume_from_checkpoint="latest", allow_schedule_change=True,
          **flags)
    assert "learning rate: reached 1e-05 (--lr 1e-05, 0 warmup steps)" in capsys.readouterr().out


def test_an_eval_only_speaker_and_a_max_steps_beyond_the_epochs_are_said(tiny_model, coded_clips, tmp_path, capsys):
    eval_rows = [dict(row, speaker="stranger") for row in read_jsonl(coded_clips)[:2]]
    eval_jsonl = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    train(tiny_model, coded_clips, tmp_path / "out", batch_size=4, max_steps=50, eval_jsonl=eval_jsonl,
          eval_generate_steps=0)
    printed = capsys.readouterr().out
    assert "warning: stranger only in the eval data: no training row speaks that voice" in printed
    assert "stranger: new (codec id" in printed and "; untrained: no training row speaks it); eval loss" in printed
    # Each voice is to be asked for in the language its rows trained (alice's rows are auto, bob's english):
    # another language argument gives generation a prefix the voice never trained with.
    assert re.search(r"alice: new \(codec id \d+\); train loss .*; generate_custom_voice\(language='auto'\)\n", printed)
    assert re.search(r"bob: new \(codec id \d+\); train loss .*; generate_custom_voice\(language='english'\)\n", printed)
    assert "; --max_steps 50 is more than 1 epochs hold: raise --num_epochs to train that long" in printed


def test_a_voice_whose_every_clip_eval_split_held_out_is_said_so(tiny_model, coded_clips, tmp_path, capsys):
    """A second voice of one clip: the random --eval_split can take it (seed 24 draws index 7 first). The warning
    names the split, not a misspelt name."""
    from helpers import build_run

    rows = read_jsonl(coded_clips)
    alice = [row for row in rows if row["speaker"] == "alice"]
    bob = [row for row in rows if row["speaker"] == "bob"]
    data = write_jsonl(tmp_path / "train.jsonl", (alice * 2)[:7] + bob[:1])
    build_run(tiny_model, data, tmp_path / "out", eval_split=0.125, seed=24, eval_generate_steps=0)
    printed = capsys.readouterr().out
    assert "warning: bob only in the eval data" in printed
    assert "--eval_split 0.125 held out every clip of it: lower it, or give held-out clips as --eval_jsonl" in printed
    assert "misspelt" not in printed


def test_the_banner_says_no_best_is_kept_when_nothing_is_evaluated(tiny_model, coded_clips, tmp_path, capsys):
    """--save_total_limit given, the eval data forgotten: the banner does not promise a best, and an
    --eval_steps given without eval data, which would evaluate nothing, is refused."""
    from helpers import build_run

    with pytest.raises(SystemExit):
        build_run(tiny_model, coded_clips, tmp_path / "out", eval_steps=5)
    assert "--eval_steps 5: there is no eval data to evaluate: give --eval_split" in capsys.readouterr().err
    banner = build_run(tiny_model, coded_clips, tmp_path / "out", save_total_limit=1).banner()
    no_best = ("--save_total_limit 1 keeps the newest 1, and no best: --metric_for_best_model eval_loss needs eval "
               "data (--eval_split or --eval_jsonl)")
    assert no_best in banner
    assert "counted among them" not in banner
    # Listening without eval data does not measure the eval loss either.
    assert no_best in build_run(tiny_model, coded_clips, tmp_path / "out1", eval_generate_steps=5, save_total_limit=1).banner()
    # With a best, 1 keeps two (the newest always stays, an older best beside it): three while the next is written.
    banner = build_run(tiny_model, coded_clips, tmp_path / "out2", eval_split=0.25, eval_generate_steps=0,
                       save_total_limit=1).banner()
    each = float(banner.split(", about ")[1].split(" MB each; ")[0])
    kept = banner.split("--save_total_limit 1 keeps the newest, and the best by --metric_for_best_model beside it "
                        "when that is an older one: up to ")[1]
    assert 2.9 < float(kept.split(" MB while the next is written")[0]) / each < 3.1
