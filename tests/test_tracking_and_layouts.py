"""What a user sees around training: tensorboard scalars, the loss-curve PNG, the summary, and
training in the streaming text layout too."""

import json

from helpers import train


def test_tensorboard_has_the_scalars_and_the_png_is_drawn(tiny_model, coded_clips, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = train(tiny_model, coded_clips, tmp_path / "out", report_to="tensorboard", eval_split=0.25,
                   eval_steps=1, num_epochs=2)
    event_files = list((output / "logs").glob("sft_12hz-*/events.out.tfevents.*"))  # hparams sit in a subfolder
    assert len(event_files) == 1
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/codec0_loss", "train/code_predictor_loss", "train/lr", "train/grad_norm",
                "train/samples_per_second", "eval/loss", "eval/codec0_loss", "eval/code_predictor_loss"}
    assert expected <= tags
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]

    png = (output / "loss_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    summary = capsys.readouterr().out.split("***** Training finished *****")[1]
    assert "steps: 6" in summary and "eval loss:" in summary and "hear it: python infer_test.py" in summary


def test_both_layouts_train_every_clip_twice(tiny_model, coded_clips, tmp_path, capsys):
    output = train(tiny_model, coded_clips, tmp_path / "out", text_layout="both", batch_size=4)
    assert "text layout both (each clip in both: twice the examples)" in capsys.readouterr().out
    state = json.loads((output / "checkpoint-epoch-0" / "trainer_state.json").read_text())
    assert state["step"] == 4  # 8 clips x 2 layouts / 4 a step
