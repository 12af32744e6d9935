#!/usr/bin/env bash
# Python 3.12 wheels, into .whl/ (git-ignored), of what a lent GPU machine's image lacks or holds at
# another version: qwen-tts with its pins (transformers 4.57.3 and the tokenizers and hub releases it
# accepts, accelerate 1.12.0), the audio packages, and soundfile's cffi and pycparser. Each at the
# version this checkout's .venv installed from requirements.txt. Run here, from the repository root,
# after the install command; on the GPU machine, carry .whl and begin the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
# (a plain `pip install` into that machine's system Python failed there without a word on stdout)
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(qwen-tts transformers accelerate tokenizers huggingface-hub peft safetensors silero-vad pyloudnorm
          soundfile soxr cffi pycparser librosa audioread pooch platformdirs decorator sox pytest-xdist execnet)
pins=()
for name in "${packages[@]}"; do
  version=$(.venv/bin/pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
  [ -n "$version" ] || { echo "$name is not installed in .venv: run the install command first" >&2; exit 1; }
  pins+=("$name==$version")
done
mkdir -p .whl
for pin in "${pins[@]}"; do  # a package published only as source (sox) is built into a wheel here
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform any -d .whl "$pin" 2>/dev/null ||
    .venv/bin/pip wheel -q --no-deps -w .whl "$pin"
done
ls .whl
