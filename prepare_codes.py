"""Turn recorded clips into 12 Hz speech codes: the training JSONL for sft_12hz_chatterbox.py.

    python prepare_codes.py --tokenizer_model_path Qwen3-TTS-12Hz-1.7B-Base/speech_tokenizer \\
        --input_jsonl raw.jsonl --output_jsonl train_with_codes.jsonl --device cuda

Each input row: {"audio": "clip.wav", "text": "...", "ref_audio": "ref.wav", "speaker": "...",
"language": "auto"} (speaker and language optional). Each output row is the input row with
`audio_codes` (frames x 16 ints) added and the paths made absolute. Audio in any format and
sample rate soundfile reads is downmixed and resampled to the tokenizer's rate.
"""

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

import audio_io
from training_data import resolve_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer_model_path", required=True,
                        help="the speech tokenizer folder (speech_tokenizer/ inside a model download, "
                             "or Qwen3-TTS-Tokenizer-12Hz)")
    parser.add_argument("--input_jsonl", required=True)
    parser.add_argument("--output_jsonl", required=True)
    parser.add_argument("--batch_size", type=int, default=32, help="clips encoded together")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    return parser.parse_args(argv)


def read_rows(path: Path) -> list:
    rows, problems = [], []
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"{path}:{line_number}: (json): not valid JSON ({error.msg})")
                continue
            for field in ("audio", "text", "ref_audio"):
                if not isinstance(row.get(field), str) or not row[field].strip():
                    problems.append(f"{path}:{line_number}: {field}: missing or empty")
            if "audio" in row and isinstance(row["audio"], str):
                row["audio"] = str(resolve_path(row["audio"], path.parent).resolve())
            if "ref_audio" in row and isinstance(row["ref_audio"], str):
                row["ref_audio"] = str(resolve_path(row["ref_audio"], path.parent).resolve())
            rows.append(row)
    if problems:
        raise SystemExit("error: bad rows in the input:\n" + "\n".join(problems))
    return rows


def main(argv=None):
    args = parse_args(argv)
    from qwen_tts import Qwen3TTSTokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = Qwen3TTSTokenizer.from_pretrained(args.tokenizer_model_path, device_map=device)
    sample_rate = tokenizer.get_input_sample_rate()
    rows = read_rows(Path(args.input_jsonl))
    output = Path(args.output_jsonl)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as out, tqdm(total=len(rows), unit="clip", desc="encoding") as bar:
        for start in range(0, len(rows), args.batch_size):
            batch = rows[start:start + args.batch_size]
            waveforms = [audio_io.load_mono(row["audio"], sample_rate) for row in batch]
            encoded = tokenizer.encode(waveforms, sr=sample_rate)
            for row, codes in zip(batch, encoded.audio_codes):
                out.write(json.dumps(dict(row, audio_codes=codes.cpu().tolist()), ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(batch))
    print(f"wrote {len(rows)} rows to {output}")


if __name__ == "__main__":
    main()
