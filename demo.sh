#!/usr/bin/env bash
# The whole pipeline on the embedded default: a tiny random Qwen3-TTS built offline and four
# synthetic clips, one per sentence. The same four commands as the real recipe
# (README_CHATTERBOX_STYLE.md). The tiny model is trained until it has learned the clips (their
# JSONL repeated, one clip per step's slot, a high learning rate), so that asked to say those
# sentences it speaks them back and infer_test.py's checks pass. README.md says how long it takes.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-.venv/bin/python}
RUN=${RUN:-demo_run}
rm -rf "$RUN"

echo "== 1. a tiny random Qwen3-TTS Base model and 4 synthetic clips"
$PYTHON -m qwen3_tts_sft.tiny_model --out "$RUN/base_model" --clips 4

echo "== 2. audio -> 12 Hz codes"
$PYTHON prepare_codes.py --tokenizer_model_path "$RUN/base_model/speech_tokenizer" \
  --input_jsonl "$RUN/clips/raw.jsonl" --output_jsonl "$RUN/train_with_codes.jsonl" --device cpu

echo "== 3. fine-tune until the clips are learned (each clip seen 400 times)"
for _ in $(seq 100); do cat "$RUN/train_with_codes.jsonl"; done >"$RUN/train_repeated.jsonl"
$PYTHON sft_12hz_chatterbox.py --init_model_path "$RUN/base_model" \
  --train_jsonl "$RUN/train_repeated.jsonl" --output_model_path "$RUN/output" --speaker_name demo_speaker \
  --batch_size 4 --gradient_accumulation_steps 1 --lr 3e-3 --lr_scheduler constant_with_warmup --warmup_steps 5 \
  --num_epochs 4 --logging_steps 50 --save_total_limit 1 --num_workers 0

echo "== 4. reload with stock qwen_tts, say the four sentences, check the audio"
$PYTHON infer_test.py --model_path "$RUN/output/checkpoint-epoch-3" --speaker demo_speaker \
  --text_file "$RUN/clips/sentences.txt" --out_dir "$RUN/speech" --greedy
echo "demo passed: the fine-tuned tiny model says its four sentences and every check passed;" \
  "listen to $RUN/speech/*.wav (a random speech decoder: it sounds like noise, by design)"
