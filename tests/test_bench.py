"""bench.py runs the trainer's code path and reports every figure it promises (not how fast: CI has no GPU)."""

import json

import bench

FIELDS = {"samples_per_second", "audio_hours_per_hour", "talker_tokens_per_second",
          "code_predictor_tokens_per_second", "model_tflops_per_second", "mfu", "measured_peak_tflops",
          "padding_waste", "code_predictor_padding_waste", "time_to_first_step_seconds", "peak_memory_allocated_gb",
          "peak_memory_reserved_gb", "tflop_per_sample", "batch_shapes", "cuda_graphs_recorded",
          "run_samples_per_second", "run_loop_samples_per_second", "run_seconds", "run_peak_memory_reserved_gb",
          "compile_seconds", "compiled_graphs"}


def test_bench_on_the_tiny_model_writes_every_field(tmp_path):
    result = bench.main(["--size", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--clips", "24",
                         "--work_dir", str(tmp_path)])
    written = json.loads((tmp_path / "bench_tiny.json").read_text())
    assert FIELDS <= written.keys() and written == json.loads(json.dumps(result))
    assert written["samples_per_second"] > 0 and written["model_tflops_per_second"] > 0
    assert 0 <= written["padding_waste"] < 1 and 0 <= written["code_predictor_padding_waste"] < 1
    # 2-15 s clips at 12.5 frames a second: the hour rate follows from the clip rate.
    assert 2 <= written["audio_hours_per_hour"] / written["samples_per_second"] <= 15
    # The whole run: 3 steps of 8 clips, timed from the model's loading (slower than the steady state).
    assert written["run_steps"] == 3 and written["run_clips"] == 24
    assert 0 < written["run_samples_per_second"] < written["run_loop_samples_per_second"]
    assert written["run_seconds"] > written["setup_seconds"]


def test_bench_whole_run_trains_every_step_of_the_epoch(tmp_path):
    result = bench.main(["--size", "tiny", "--device", "cpu", "--whole_run", "--steps", "1", "--clips", "16",
                         "--work_dir", str(tmp_path)])
    assert result["run_steps"] == 2 and result["run_clips"] == 16 and result["timed_steps"] == 1


def test_bench_runs_script_records_each_named_run(tmp_path):
    """bench_runs.sh (the commands behind the README's GPU tables) runs a named bench and keeps its JSON."""
    import os
    import subprocess
    import sys

    from helpers import ROOT

    result = subprocess.run(["bash", "bench/bench_runs.sh", str(tmp_path), "tiny_cpu", "no_such_run"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHON=sys.executable, BENCH_WORK_DIR=str(tmp_path / "work")))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [row["name"] for row in rows] == ["tiny_cpu"] and FIELDS <= rows[0].keys()
    assert "unknown run no_such_run" in (tmp_path / "log.txt").read_text()


def test_bench_times_a_listening_evaluation_against_the_training_between_evals(tmp_path):
    result = bench.main(["--size", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--clips", "16",
                         "--work_dir", str(tmp_path), "--listen", "--trainer_flags=--eval_max_new_tokens 4"])
    assert result["listen_sentences"] == 4 and result["eval_steps"] == 2000  # the built-in set, one voice
    assert result["listen_seconds"] > 0 and 0 < result["listen_share_at_eval_steps"] < 1
