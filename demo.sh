#!/usr/bin/env bash
# The whole pipeline on the embedded default: a tiny random Qwen3-TTS built offline, a few
# synthetic clips. The same four commands as the real recipe (README_CHATTERBOX_STYLE.md), with
# a learning rate suited to a tiny model and a few dozen clips. Runs in a couple of minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-.venv/bin/python}
RUN=${RUN:-demo_run}
rm -rf "$RUN"

echo "== 1. a tiny random Qwen3-TTS Base model and 48 synthetic clips"
$PYTHON -m qwen3_tts_sft.tiny_model --out "$RUN/base_model" --clips 48

echo "== 2. audio -> 12 Hz codes"
$PYTHON prepare_codes.py --tokenizer_model_path "$RUN/base_model/speech_tokenizer" \
  --input_jsonl "$RUN/clips/raw.jsonl" --output_jsonl "$RUN/train_with_codes.jsonl" --device cpu

echo "== 3. fine-tune"
$PYTHON sft_12hz_chatterbox.py --init_model_path "$RUN/base_model" \
  --train_jsonl "$RUN/train_with_codes.jsonl" --output_model_path "$RUN/output" --speaker_name demo_speaker \
  --batch_size 4 --lr 2e-3 --num_epochs 5 --gradient_accumulation_steps 2 --warmup_steps 5 \
  --freeze_speaker_encoder --logging_steps 6 --save_total_limit 2 --num_workers 0

echo "== 4. reload, speak and check (a tiny random model speaks noise: the checks report, not gate)"
$PYTHON infer_test.py --model_path "$RUN/output/checkpoint-epoch-4" --speaker demo_speaker \
  --out_dir "$RUN/speech" --max_new_tokens 100 --greedy --report_only
echo "demo finished: listen to $RUN/speech/*.wav"
