"""Speak test sentences with a fine-tuned checkpoint, write the wavs, and check them.

    python infer_test.py --model_path output/checkpoint-epoch-0 --speaker my_speaker

Exits non-zero when a sentence comes out empty or not finite.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

DEFAULT_SENTENCES = [
    "Hello, this is a short test of my fine-tuned voice.",
    "The quick brown fox jumps over the lazy dog.",
    "How are you today?",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="a checkpoint folder written by sft_12hz_chatterbox.py")
    parser.add_argument("--speaker", required=True, help="speaker name given at training")
    parser.add_argument("--language", default="auto")
    parser.add_argument("--text", action="append", help="sentence to speak (repeatable); default: built-in set")
    parser.add_argument("--out_dir", default=None, help="where wavs and report.json go (default: MODEL_PATH/infer_test)")
    parser.add_argument("--greedy", action="store_true", help="no sampling: the same codes every run")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="cap on generated frames (12.5 per second)")
    parser.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_model(model_path, device):
    from qwen_tts import Qwen3TTSModel

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return Qwen3TTSModel.from_pretrained(str(model_path), dtype=dtype, device_map=device)


def main(argv=None):
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    tts = load_model(args.model_path, device)
    out_dir = Path(args.out_dir or Path(args.model_path) / "infer_test")
    out_dir.mkdir(parents=True, exist_ok=True)
    sentences = args.text or DEFAULT_SENTENCES
    options = dict(do_sample=False, subtalker_dosample=False) if args.greedy else {}
    if args.max_new_tokens:
        options["max_new_tokens"] = args.max_new_tokens
    wavs, sample_rate = tts.generate_custom_voice(sentences, speaker=args.speaker, language=args.language, **options)
    report, failed = [], 0
    for index, (sentence, wav) in enumerate(zip(sentences, wavs)):
        path = out_dir / f"sentence_{index:02d}.wav"
        sf.write(path, wav, sample_rate)
        ok = wav.size > 0 and bool(np.isfinite(wav).all())
        failed += not ok
        report.append(dict(text=sentence, wav=str(path), seconds=wav.size / sample_rate, ok=ok))
        print(f"{'ok  ' if ok else 'FAIL'} {wav.size / sample_rate:6.2f} s  {path.name}  {sentence}")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    if failed:
        raise SystemExit(f"{failed} of {len(sentences)} sentences came out empty or not finite")


if __name__ == "__main__":
    main()
