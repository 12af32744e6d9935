#!/usr/bin/env bash
# The runs behind the GPU tables in README_CHATTERBOX_STYLE.md, by name (the case list at the end):
#
#   bash bench/bench_runs.sh RESULTS_DIR 1.7b_default 1.7b_low_memory codes    # one GPU
#   bash bench/bench_runs.sh RESULTS_DIR multi_gpu                                    # two GPUs of one machine
#
# Every run appends one JSON line to RESULTS_DIR/results.jsonl and its output to
# RESULTS_DIR/log.txt; a run that fails or passes BENCH_TIMEOUT seconds is logged and skipped.
# bench.py builds its models and data under BENCH_WORK_DIR (default bench_out) and reuses them;
# codes and multi_gpu work in bench_out. The trainer saves on SIGTERM, so `timeout -k` also kills.
set -u
results=${1:?usage: bash bench/bench_runs.sh RESULTS_DIR GROUP...}
shift
mkdir -p "$results"
results=$(cd "$results" && pwd)
cd "$(dirname "$0")/.."  # the repository root: the trainer, and bench_out/, are there
python=${PYTHON:-python3}
limit=${BENCH_TIMEOUT:-400}
ten_seconds=(--clip_seconds 10 --warmup 6 --steps 15)
# The recipe's command on 4,096 mixed clips, every step of the epoch: the whole-run average (model load,
# compiles and recordings included) and the steady state of its last 20 steps.
mix_whole_run=(--clips 4096 --whole_run --steps 20)

note() { echo "=== $(date +%T) $*" | tee -a "$results/log.txt"; }

bench() {  # bench NAME bench.py-flags...: one bench.py run, its JSON appended to results.jsonl
  local name=$1
  shift
  note "$name: bench.py $*"
  timeout -k 60 "$limit" "$python" bench/bench.py --work_dir "${BENCH_WORK_DIR:-bench_out}" --json "$results/$name.json" "$@" \
    >>"$results/log.txt" 2>&1
  if [ -f "$results/$name.json" ]; then  # written last: the run finished (even if its exit then hung)
    "$python" -c 'import json, sys; r = json.load(open(sys.argv[1])); r["name"] = sys.argv[2]; print(json.dumps(r))' \
      "$results/$name.json" "$name" | tee -a "$results/results.jsonl"
  else
    note "$name failed or timed out"
  fi
  rm -f "$results/$name.json"
}

codes_throughput() {  # prepare_codes.py on 800 synthetic 44.1 kHz clips of 2-15 s, full-size random tokenizer
  note "codes: building data"
  "$python" - <<'EOF' >>"$results/log.txt" 2>&1
import json
from pathlib import Path
import numpy as np, soundfile as sf
from qwen3_tts_sft import tiny_model
work = Path("bench_out/codes"); (work / "wavs").mkdir(parents=True, exist_ok=True)
tiny_model.write_speech_tokenizer(work / "tokenizer", "full", 0)
rng, rows = np.random.default_rng(0), []
for index in range(800):
    path = work / "wavs" / f"{index:05d}.wav"
    sf.write(path, tiny_model.synthetic_voice(rng.uniform(2, 15), 44100, 120.0, rng), 44100, subtype="PCM_16")
    rows.append(dict(audio=str(path.resolve()), text=tiny_model.DEMO_SENTENCES[index % 8]))
(work / "raw.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
EOF
  for batch in 32; do
    note "codes: prepare_codes.py --batch_size $batch"
    rm -f bench_out/codes/train*.jsonl*
    timeout -k 60 "$limit" "$python" prepare_codes.py --tokenizer_model_path bench_out/codes/tokenizer \
      --input bench_out/codes/raw.jsonl --output_jsonl bench_out/codes/train.jsonl --device cuda \
      --batch_size "$batch" --num_workers 8 >>"$results/log.txt" 2>&1 || note "codes failed"
    [ -f bench_out/codes/train.jsonl.summary.json ] &&
      "$python" -c 'import json, sys; s = json.load(open("bench_out/codes/train.jsonl.summary.json"))
print(json.dumps(dict(name="codes_batch_" + sys.argv[1], **s["throughput"])))' "$batch" | tee -a "$results/results.jsonl"
  done
}

multi_gpu() {  # the trainer CLI: 1 process (4 x 2) vs DDP and FSDP on 2 GPUs (4 x 1 each): 8 clips a step
  local steps=${MULTI_GPU_STEPS:-30} data
  [ -f bench_out/model_1.7b/model.safetensors ] ||
    "$python" -c "from qwen3_tts_sft import tiny_model; tiny_model.write_model_dir('bench_out/model_1.7b', '1.7b')"
  data=$("$python" -c "import sys; sys.path.insert(0, 'bench'); import bench; from pathlib import Path; print(bench.synthetic_data(Path('bench_out/data'), 512, 10))" 2>/dev/null | tail -n 1)
  local common=(sft_12hz_chatterbox.py --init_model_path bench_out/model_1.7b --train_jsonl "$data" --max_steps "$steps"
                --warmup_steps 5 --logging_steps 1 --save_steps 0 --report_to none --freeze_speaker_encoder
                --overwrite_output_dir)
  for run in ${MULTI_GPU_RUNS:-one ddp fsdp}; do
    note "multi_gpu: $run"
    case $run in
      one) CUDA_VISIBLE_DEVICES=0 timeout -k 60 "$limit" "$python" "${common[@]}" --output_model_path bench_out/mg_one \
             --batch_size 4 --gradient_accumulation_steps 2 >>"$results/log.txt" 2>&1 ;;
      *) timeout -k 60 "$limit" "$python" -m accelerate.commands.launch --config_file "accelerate_configs/$run.yaml" --num_processes 2 "${common[@]}" \
           --output_model_path "bench_out/mg_$run" --batch_size 4 --gradient_accumulation_steps 1 >>"$results/log.txt" 2>&1 ;;
    esac || note "multi_gpu $run failed"
    cp "bench_out/mg_$run/checkpoint-step-$steps/trainer_state.json" "$results/trainer_state_$run.json" 2>/dev/null
    rm -rf "bench_out/mg_$run"  # ~25 GB of training state each
  done
  "$python" - "$results" <<'EOF' | tee -a "$results/results.jsonl"
import json, statistics, sys
from pathlib import Path
runs = {}
for run in ("one", "ddp", "fsdp"):
    path = Path(sys.argv[1]) / f"trainer_state_{run}.json"
    if path.exists():
        runs[run] = [e for e in json.loads(path.read_text())["log_history"] if "train/loss" in e]
for run, history in runs.items():
    losses = [e["train/loss"] for e in history]
    speed = statistics.median(e["train/samples_per_second"] for e in history[len(history) // 2:])
    row = dict(name=f"multi_gpu_{run}", steps=len(losses), samples_per_second=round(speed, 2),
               gpu_memory_peak_gb=history[-1].get("train/gpu_memory_peak_gb"), losses=losses)
    if run != "one" and "one" in runs:
        reference = [e["train/loss"] for e in runs["one"]]
        row["max_loss_difference_vs_one_process"] = max(abs(a - b) for a, b in zip(losses, reference))
    print(json.dumps(row))
EOF
}

for name in "$@"; do
  case $name in
    # 1.7B, batch 4 x 2, 10 s clips (the issue's setting) by compile choice
    1.7b_default) bench "$name" --size 1.7b "${ten_seconds[@]}" ;;  # auto: layers compiled, CUDA graphs
    # bf16 weights with an fp32 master copy are the default: these are the fp32-weights path before it
    1.7b_default_fp32_weights) bench "$name" --size 1.7b "${ten_seconds[@]}" --trainer_flags="--bf16_weights no" ;;
    1.7b_mix_2_15s_fp32_weights) bench "$name" --size 1.7b "${mix_whole_run[@]}" --trainer_flags="--bf16_weights no" ;;
    1.7b_no_graphs) bench "$name" --size 1.7b "${ten_seconds[@]}" --trainer_flags="--cuda_graphs no" ;;
    1.7b_eager) bench "$name" --size 1.7b "${ten_seconds[@]}" --trainer_flags="--torch_compile no" ;;
    # the same update as 4 x 2 (exact accumulation) with half the launches per clip; the 2-15 s mix
    1.7b_batch8x1) bench "$name" --size 1.7b "${ten_seconds[@]}" --batch_size 8 --gradient_accumulation_steps 1 ;;
    1.7b_mix_2_15s) bench "$name" --size 1.7b "${mix_whole_run[@]}" ;;  # ~2.5 min after the model is built
    1.7b_mix_2_15s_no_graphs) bench "$name" --size 1.7b "${mix_whole_run[@]}" --trainer_flags="--cuda_graphs no" ;;
    # lever 1 against its baseline: every micro-batch padded to multiples of 8 / 32, one graph per shape
    1.7b_mix_2_15s_multiples) bench "$name" --size 1.7b "${mix_whole_run[@]}" --batch_shapes multiples ;;
    1.7b_mix_2_15s_low_memory) bench "$name" --size 1.7b "${mix_whole_run[@]}" --trainer_flags="--low_memory" ;;
    # the allocator as it was before the trainer chose expandable segments (CUDA_ALLOCATOR_SETTINGS)
    1.7b_mix_2_15s_low_memory_fixed_segments) PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False \
      bench "$name" --size 1.7b "${mix_whole_run[@]}" --trainer_flags="--low_memory" ;;
    # the previous mix entry: 1,024 clips, 60 warm-up steps, 20 timed
    1.7b_mix_1024_clips) bench "$name" --size 1.7b --warmup 60 --steps 20 --clips 1024 ;;
    # where a step's time goes (busiest kernels and GPU busy share, in log.txt): 4 x 2 against 8 x 1
    1.7b_profile_4x2) bench "$name" --size 1.7b "${ten_seconds[@]}" --profile 2 ;;
    1.7b_profile_8x1) bench "$name" --size 1.7b "${ten_seconds[@]}" --profile 2 --batch_size 8 --gradient_accumulation_steps 1 ;;
    # memory: --low_memory, gradient checkpointing, LoRA
    1.7b_low_memory) bench "$name" --size 1.7b "${ten_seconds[@]}" --trainer_flags="--low_memory" ;;  # graphs now
    # lever 3 against its baseline: the micro-batch graphs, but the optimizer step launched tensor by tensor
    1.7b_low_memory_no_optimizer_graph) bench "$name" --size 1.7b "${ten_seconds[@]}" --trainer_flags="--low_memory" --no_optimizer_graph ;;
    1.7b_low_memory_no_graphs) bench "$name" --size 1.7b "${ten_seconds[@]}" --trainer_flags="--low_memory --cuda_graphs no" ;;
    1.7b_low_memory_checkpointing) bench "$name" --size 1.7b "${ten_seconds[@]}" --trainer_flags="--low_memory --gradient_checkpointing" ;;
    1.7b_lora16) bench "$name" --size 1.7b "${ten_seconds[@]}" --trainer_flags="--lora_rank 16" ;;
    1.7b_lora16_low_memory) bench "$name" --size 1.7b "${ten_seconds[@]}" --trainer_flags="--lora_rank 16 --low_memory" ;;
    0.6b_default) bench "$name" --size 0.6b "${ten_seconds[@]}" ;;
    1.7b_listen) bench "$name" --size 1.7b "${ten_seconds[@]}" --listen ;;  # one listening evaluation's cost
    0.6b_low_memory) bench "$name" --size 0.6b "${ten_seconds[@]}" --trainer_flags="--low_memory" ;;
    tiny_cpu) bench "$name" --size tiny --device cpu --steps 2 --warmup 1 ;;  # checks this script anywhere
    codes) codes_throughput ;;
    multi_gpu) multi_gpu ;;
    *) note "unknown run $name" ;;
  esac
done
