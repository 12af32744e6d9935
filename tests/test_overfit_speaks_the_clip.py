"""Overfit one clip, save, reload with the stock loader: greedy speech reproduces the clip exactly."""

import numpy as np
import torch
from qwen_tts import Qwen3TTSModel

from helpers import read_jsonl, train, write_jsonl


def generated_codes(tts, text, speaker, language, max_new_tokens):
    """Greedy generate_custom_voice, returning the codes it hands to the speech decoder."""
    captured = []
    decode = tts.model.speech_tokenizer.decode
    tts.model.speech_tokenizer.decode = lambda encoded: captured.append(encoded) or decode(encoded)
    wavs, _ = tts.generate_custom_voice(text, speaker=speaker, language=language, do_sample=False,
                                        subtalker_dosample=False, max_new_tokens=max_new_tokens)
    assert wavs[0].size > 0
    return captured[0][0]["audio_codes"].cpu().numpy()


def test_overfit_clip_is_reproduced_after_reload(tiny_model, coded_clips, tmp_path):
    row = read_jsonl(coded_clips)[1]  # bob, English
    data = write_jsonl(tmp_path / "one_clip.jsonl", [row] * 600)
    output = train(tiny_model, data, tmp_path / "out", batch_size=4, lr=3e-3, warmup_steps=5,
                   lr_scheduler="constant_with_warmup")
    checkpoint_dir = output / "checkpoint-epoch-0"

    tts = Qwen3TTSModel.from_pretrained(str(checkpoint_dir), dtype=torch.float32)
    target = np.array(row["audio_codes"])
    codes = generated_codes(tts, row["text"], row["speaker"].upper(), row["language"], len(target) + 8)
    # Equal length below max_new_tokens means codec_eos came right after the last frame.
    assert codes.shape == target.shape
    assert np.array_equal(codes, target)
