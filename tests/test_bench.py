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
