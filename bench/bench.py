"""Training speed and memory of the trainer's own code path, on a random model of a real shape.

    python bench/bench.py --size 1.7b --batch_size 4 --gradient_accumulation_steps 2 --steps 30
    python bench/bench.py --size tiny --device cpu --steps 3          # what CI runs
    python bench/bench.py --size 1.7b --clips 4096 --whole_run       # a whole epoch, start to finish

Builds a random Qwen3-TTS of the published shape (tiny_model.py), synthetic coded clips with a
realistic length mix (2-15 s, text at ~15 characters a second), then runs the trainer's setup
and optimizer steps (training_setup.build_run, training_run.py) and times them after warm-up: the
steady state. It also times the whole run, from the start of the setup (loading the model) to
the last step, compiles and CUDA-graph recordings included; with --whole_run that is every step
of an epoch, the last --steps of them timed as the steady state.
Prints a table and writes every figure as JSON.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the trainer at the repository root
import sft_12hz_chatterbox as sft  # noqa: E402
from qwen3_tts_sft import tiny_model  # noqa: E402
from qwen3_tts_sft.audio import FRAMES_PER_SECOND  # noqa: E402
from qwen3_tts_sft.sequence_layout import BatchShapes  # noqa: E402
from qwen3_tts_sft.training_setup import build_run  # noqa: E402

CHARACTERS_PER_SECOND = 15
WORDS = ("the quick brown fox jumps over lazy dog she sells sea shells by shore one two three four five "
         "hello world voice speech model train sound clear bright morning evening river mountain").split()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=sorted(tiny_model.SIZES))
    parser.add_argument("--work_dir", default="bench_out", help="model, data and results go here (model reused)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    parser.add_argument("--whole_run", action="store_true",
                        help="run every step of one epoch of --clips (the last --steps timed as the steady state), "
                             "as the trainer would; --warmup is then the rest")
    parser.add_argument("--clip_seconds", type=float, default=0,
                        help="every clip this long; 0 = a mix of 2-15 s")
    parser.add_argument("--clips", type=int, default=512, help="synthetic clips in the data set")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--trainer_flags", default="",
                        help="extra sft_12hz_chatterbox.py flags, written --trainer_flags=\"--low_memory --lora_rank 16\"")
    parser.add_argument("--json", default=None, help="result file (default: WORK_DIR/bench_SIZE.json)")
    parser.add_argument("--batch_shapes", default="table", choices=["table", "multiples"],
                        help="experiment: 'multiples' pads every micro-batch to multiples of 8 positions and 32 "
                             "frames (many CUDA graphs) instead of to the plan's table of a few shapes")
    parser.add_argument("--no_optimizer_graph", action="store_true",
                        help="experiment: run the --low_memory optimizer step eagerly instead of as a recorded graph")
    parser.add_argument("--listen", action="store_true",
                        help="after the timed steps, one listening evaluation as the trainer runs it at each eval "
                             "(scoring.listen: the built-in sentences, greedy, the default frame cap), timed, and its "
                             "share of the training time between evals at the default --eval_steps")
    parser.add_argument("--profile", type=int, default=0,
                        help="after timing, profile this many more steps and print the busiest kernels")
    return parser.parse_args(argv)


def synthetic_data(folder: Path, clips: int, clip_seconds: float, seed: int = 0) -> Path:
    """A codes JSONL of random codes with plausible text lengths, and one reference clip."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    reference = folder / "reference.wav"
    sf.write(reference, tiny_model.synthetic_voice(3.0, 24000, 140.0, rng), 24000)
    rows = []
    for _ in range(clips):
        seconds = clip_seconds or float(rng.uniform(2.0, 15.0))
        frames = int(seconds * FRAMES_PER_SECOND)
        text = ""
        while len(text) < seconds * CHARACTERS_PER_SECOND:
            text += rng.choice(WORDS) + " "
        rows.append(dict(text=text.strip().capitalize() + ".", language="auto", speaker="bench",
                         ref_audio=str(reference.resolve()),
                         audio_codes=rng.integers(0, tiny_model.CODEBOOK_SIZE, (frames, 16)).tolist()))
    path = folder / f"codes_{clips}_{clip_seconds or 'mix'}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def matmul_peak_tflops(device) -> float:
    """Measured bf16 matrix-product rate: the ceiling MFU is taken against."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12


def matmul_parameters(module) -> int:
    """Weights of the linear layers (embedding lookups do no multiply-adds)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


class FlopCounter:
    """Training FLOPs of a micro-batch: 3x the forward (forward + backward), useful tokens only.

    Forward per token: 2 x (linear weights the token passes through); attention adds
    2 x 2 x layers x width x (positions before it) for scores and the weighted sum.
    """

    def __init__(self, model):
        talker, predictor = model.talker, model.talker.code_predictor
        config = model.config.talker_config
        self.talker_linear = (matmul_parameters(talker.model) + matmul_parameters(talker.text_projection))
        self.codec_head = talker.codec_head.weight.numel()
        self.talker_attention = config.num_hidden_layers * config.num_attention_heads * config.head_dim
        cp_config = config.code_predictor_config
        heads = predictor.lm_head
        self.predictor_linear = (matmul_parameters(predictor.model) + matmul_parameters(predictor.small_to_mtp_projection)
                                 + heads[0].weight.numel())  # each position goes through one head
        self.predictor_attention = cp_config.num_hidden_layers * cp_config.num_attention_heads * cp_config.head_dim
        self.groups = config.num_code_groups

    def micro_batch(self, batch) -> dict:
        lengths = batch.lengths.double()
        talker_tokens = lengths.sum().item()
        frames = int(batch.num_frames)
        forward = 2 * self.talker_linear * talker_tokens + 2 * self.codec_head * batch.num_codec0_targets
        forward += 2 * self.talker_attention * (lengths * (lengths + 1)).sum().item()  # causal: T(T+1)/2 pairs x 4
        predictor_tokens = frames * self.groups
        forward += 2 * self.predictor_linear * predictor_tokens
        forward += 2 * self.predictor_attention * frames * self.groups * (self.groups + 1)
        padded = batch.lengths.shape[0] * batch.is_real.shape[1]
        return dict(flops=3 * forward, talker_tokens=talker_tokens, padded_tokens=padded,
                    predictor_tokens=predictor_tokens, frames=frames, padded_frames=batch.target_codes.shape[0])


def profile_steps(run, steps, count: int, work: Path, device):
    """Profile `count` more optimizer steps: print the kernels that take the most device time, save a trace."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        started = time.perf_counter()
        for _ in range(count):
            run.optimizer_step(next(steps), stop_asked=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort, row_limit=30))
    if device.type == "cuda":
        busy = sum(e.device_time_total for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"profiled {count} steps: wall {wall:.3f} s, kernels {busy / 1e6:.3f} s "
              f"(GPU busy {busy / 1e6 / wall:.0%} of the wall time, counting overlap once per kernel)")
    profiler.export_chrome_trace(str(work / "trace.json"))


def listening_cost(run, step_seconds: float, synchronize) -> dict:
    """One listening evaluation with the weights as they stand, and its share of the time from one
    eval to the next at the run's --eval_steps. `listen_stopped` says how many sentences stopped
    before the frame cap (the full-size random 1.7B stopped on all 4 on an H100; the tiny one never
    stops)."""
    from qwen3_tts_sft import scoring

    synchronize()
    started = time.perf_counter()
    entry, _ = scoring.listen(run)
    synchronize()
    seconds = time.perf_counter() - started
    training = run.args.eval_steps * step_seconds
    return dict(listen_seconds=seconds, listen_sentences=entry["sentences"], listen_stopped=entry["stopped"],
                listen_share_at_eval_steps=seconds / (seconds + training), eval_steps=run.args.eval_steps)


def compile_time() -> dict:
    """Seconds torch.compile spent so far in this process (graphs traced and compiled, forward and
    backward), and how many graphs it compiled: what of the first step is compiling."""
    from torch._dynamo.utils import compilation_time_metrics as metrics

    forward, backward = metrics.get("_compile.compile_inner", []), metrics.get("compile_fx.<locals>.bw_compiler", [])
    return dict(compile_seconds=sum(forward) + sum(backward), compiled_graphs=len(forward))


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work = Path(args.work_dir)
    model_dir = work / f"model_{args.size}"
    if not (model_dir / "model.safetensors").exists():
        started = time.perf_counter()
        tiny_model.write_model_dir(model_dir, args.size)
        print(f"built {args.size} model in {time.perf_counter() - started:.0f} s")
    data = synthetic_data(work / "data", args.clips, args.clip_seconds)

    if args.whole_run and args.profile:
        raise SystemExit("--profile needs steps beyond the timed ones: not with --whole_run")
    total = 0 if args.whole_run else args.warmup + args.steps + args.profile  # 0: the whole epoch
    flags = ["--init_model_path", str(model_dir), "--train_jsonl", str(data), "--output_model_path", str(work / "run"),
             "--batch_size", str(args.batch_size), "--gradient_accumulation_steps", str(args.gradient_accumulation_steps),
             "--report_to", "none", "--overwrite_output_dir", "--max_steps", str(total),
             "--lr_scheduler", "constant_with_warmup", "--warmup_steps", "0"]
    if device.type == "cpu":
        flags += ["--mixed_precision", "no", "--num_workers", "0"]
    if args.listen:  # a listener, as eval data would give; bench.py itself says when it listens
        flags += ["--eval_generate_steps", str(total or 10 ** 9)]

    started = time.perf_counter()
    run = build_run(sft.check_args(sft.parse_args(flags + args.trainer_flags.split())))
    counter = FlopCounter(run.accelerator.unwrap_model(run.train_module).model)
    if args.no_optimizer_graph:
        run.optimizer.optimizer.record_graph = False  # accelerate wraps the trainer's optimizer
    if args.batch_shapes == "multiples":
        shapes = run.first_plan.shapes
        run.first_plan.shapes = BatchShapes(shapes.rows, ())  # nothing fits: every batch pads to multiples
    if args.whole_run:
        args.warmup = run.total_steps - args.steps
    setup_seconds = time.perf_counter() - started
    if args.warmup < 0 or run.total_steps < args.warmup + args.steps + args.profile:
        raise SystemExit(f"--clips {args.clips} give only {run.total_steps} steps; need "
                         f"{args.warmup + args.steps + args.profile}")
    steps = run.steps()

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    on_gpu = device.type == "cuda"
    timed = dict(flops=0.0, talker_tokens=0.0, padded_tokens=0.0, predictor_tokens=0.0, frames=0.0, padded_frames=0.0,
                 clips=0)
    run_clips, warmup_peaks = 0, (0, 0)
    # One event after each step: the GPU's timeline per step, without a synchronize that would change
    # the overlap of host and GPU. Steps far above the median are first runs, recordings, compiles.
    step_ends = [torch.cuda.Event(enable_timing=True) for _ in range(args.warmup + args.steps + 1)] if on_gpu else []
    loop_start = time.perf_counter()
    if step_ends:
        step_ends[0].record()
    for number in range(args.warmup + args.steps):
        if number == args.warmup:
            synchronize()
            timed_start = time.perf_counter()
            if device.type == "cuda":
                warmup_peaks = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
                torch.cuda.reset_peak_memory_stats()
        step = next(steps)
        if number >= args.warmup:
            for batch in step.micro_batches:
                for key, value in counter.micro_batch(batch).items():
                    timed[key] += value
            timed["clips"] += step.targets.clips
        run_clips += step.targets.clips
        run.optimizer_step(step, stop_asked=False)
        if step_ends:
            step_ends[number + 1].record()
        if number == 0:
            synchronize()
            first_step_seconds = time.perf_counter() - loop_start
            compiled = compile_time()
            # Said at once, so that the log of a run stopped by a timeout tells where it was.
            print(f"first step after {first_step_seconds:.1f} s ({compiled['compile_seconds']:.1f} s compiling, "
                  f"{compiled['compiled_graphs']} graphs)", flush=True)
        elif number % 100 == 0:
            print(f"step {number}: {time.perf_counter() - loop_start:.1f} s", flush=True)
    synchronize()
    loop_end = time.perf_counter()
    nan = float("nan")
    seconds = loop_end - timed_start
    if args.profile:
        profile_steps(run, steps, args.profile, work, device)
    listened = listening_cost(run, seconds / args.steps, synchronize) if args.listen else {}

    step_ms = [start.elapsed_time(end) for start, end in zip(step_ends, step_ends[1:])]
    median_ms = statistics.median(step_ms) if step_ms else nan
    peak = matmul_peak_tflops(device)
    model_tflops = timed["flops"] / seconds / 1e12
    trainer_args, settings = run.args, run.settings
    trainer_optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate wraps it
    result = dict(
        size=args.size, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        batch_size=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        clip_seconds=args.clip_seconds or "2-15", mixed_precision=settings.mixed_precision,
        attn_implementation=trainer_args.attn_implementation, trainer_flags=args.trainer_flags,
        torch_compile=settings.torch_compile, batch_shapes_mode=args.batch_shapes,
        low_memory=trainer_args.low_memory, weights=settings.weights.name,
        gradient_checkpointing=trainer_args.gradient_checkpointing,
        lora_rank=trainer_args.lora_rank, cuda_graphs=run.graphs is not None and run.graphs.enabled,
        batch_shapes=len(run.first_plan.shapes.sizes) if run.graphs else 0,  # the plan's table, used with CUDA graphs
        cuda_graphs_recorded=len(run.graphs.recorded) if run.graphs else 0,  # batch shapes, one graph each
        cuda_graphs_first_runs=len(run.graphs.warmed_up) if run.graphs else 0,  # shapes seen, each run once first
        cuda_graphs_recordings=run.graphs.recordings if run.graphs else 0,  # a shape recorded again counts again
        optimizer_graph=getattr(trainer_optimizer, "graph", None) is not None,  # the bf16-weights step recorded
        timed_steps=args.steps,
        samples_per_second=timed["clips"] / seconds,
        audio_hours_per_hour=timed["frames"] / FRAMES_PER_SECOND / seconds,
        talker_tokens_per_second=timed["talker_tokens"] / seconds,
        code_predictor_tokens_per_second=timed["predictor_tokens"] / seconds,
        model_tflops_per_second=model_tflops,
        tflop_per_sample=timed["flops"] / timed["clips"] / 1e12,
        measured_peak_tflops=peak,
        mfu=model_tflops / peak if math.isfinite(peak) else float("nan"),
        padding_waste=1 - timed["talker_tokens"] / timed["padded_tokens"],  # talker positions that are padding
        code_predictor_padding_waste=1 - timed["frames"] / timed["padded_frames"],
        setup_seconds=setup_seconds,
        time_to_first_step_seconds=first_step_seconds,
        **compile_time(),
        peak_memory_allocated_gb=torch.cuda.max_memory_allocated() / 1e9 if on_gpu else nan,
        peak_memory_reserved_gb=torch.cuda.max_memory_reserved() / 1e9 if on_gpu else nan,
        # The whole run: setup (model load), compiles, recordings and every step, warm-up included.
        run_steps=args.warmup + args.steps,
        run_clips=run_clips,
        run_seconds=setup_seconds + loop_end - loop_start,
        run_samples_per_second=run_clips / (setup_seconds + loop_end - loop_start),
        run_loop_samples_per_second=run_clips / (loop_end - loop_start),  # from the first step on
        run_peak_memory_allocated_gb=max(warmup_peaks[0], torch.cuda.max_memory_allocated()) / 1e9 if on_gpu else nan,
        run_peak_memory_reserved_gb=max(warmup_peaks[1], torch.cuda.max_memory_reserved()) / 1e9 if on_gpu else nan,
        # Per step on the GPU's timeline: the median, what the slower steps cost beyond it (first runs
        # of a shape, recordings, compiles), and the slowest ten as [step, ms].
        step_ms_median=median_ms,
        seconds_above_median=sum(max(0.0, ms - median_ms) for ms in step_ms) / 1e3 if step_ms else nan,
        slowest_steps=[[number, round(step_ms[number], 1)] for number in
                       sorted(range(len(step_ms)), key=step_ms.__getitem__, reverse=True)[:10]],
        **listened,
    )
    out = Path(args.json or work / f"bench_{args.size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, result))
    print("\n".join(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}"
                    for key, value in result.items()))
    return result


if __name__ == "__main__":
    main()
