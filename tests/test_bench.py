"""bench.py runs the trainer's code path and reports every figure it promises (not how fast: CI has no GPU)."""

import json

import bench

FIELDS = {"samples_per_second", "audio_hours_per_hour", "talker_tokens_per_second",
          "code_predictor_tokens_per_second", "model_tflops_per_second", "mfu", "measured_peak_tflops",
          "padding_waste", "time_to_first_step_seconds", "peak_memory_allocated_gb", "peak_memory_reserved_gb",
          "tflop_per_sample"}


def test_bench_on_the_tiny_model_writes_every_field(tmp_path):
    result = bench.main(["--size", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--clips", "24",
                         "--work_dir", str(tmp_path)])
    written = json.loads((tmp_path / "bench_tiny.json").read_text())
    assert FIELDS <= written.keys() and written == json.loads(json.dumps(result))
    assert written["samples_per_second"] > 0 and written["model_tflops_per_second"] > 0
    assert 0 <= written["padding_waste"] < 1
    # 2-15 s clips at 12.5 frames a second: the hour rate follows from the clip rate.
    assert 2 <= written["audio_hours_per_hour"] / written["samples_per_second"] <= 15


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
