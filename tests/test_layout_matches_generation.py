"""The core check: training sees, position by position, what generation sees.

For a padded batch of two speakers (one clip in auto language, one in English), in both text
layouts (generate's non_streaming_mode True and False), the training
forward's group-0 logits and code-predictor logits must equal the logits that the stock
`Qwen3TTSForConditionalGeneration.generate` computes step by step when forced along the same codes,
on the exported checkpoint reloaded through `Qwen3TTSModel.from_pretrained`.
"""

import numpy as np
import pytest
import torch
from qwen_tts import Qwen3TTSModel

from qwen3_tts_sft import checkpoint
from helpers import forced_generation_logits
from qwen3_tts_sft.sequence_layout import NON_STREAMING, STREAMING, SpecialIds, collate
from qwen3_tts_sft.speakers import assign_speakers, reference_mels, speaker_vectors
from qwen3_tts_sft.talker_step import TalkerTrainingModel
from qwen3_tts_sft.training_data import TalkerDataset, make_prompter, read_clips

TOLERANCE = 1e-4


@pytest.mark.parametrize("layout", [NON_STREAMING, STREAMING])
def test_training_logits_equal_generation_logits(tiny_model, coded_clips, tmp_path, layout):
    tts = Qwen3TTSModel.from_pretrained(str(tiny_model), dtype=torch.float32)
    model, config = tts.model, tts.model.config
    ids = SpecialIds.from_config(config)
    clips = read_clips(coded_clips, ids, prompter=make_prompter(tts.processor, config))
    alice = next(c for c in clips if c.speaker == "alice" and c.language == "auto")
    bob = next(c for c in clips if c.speaker == "bob" and c.language == "english")
    assert alice.num_frames != bob.num_frames  # so the batch is padded
    table = assign_speakers([alice, bob], config.talker_config)
    with torch.no_grad():
        vectors = speaker_vectors(model.speaker_encoder, reference_mels(table, 24000))
    dataset = TalkerDataset([alice, bob], ids, {s.name: i for i, s in enumerate(table)}, layouts=[layout])
    batch = collate([dataset[0], dataset[1]])

    training = TalkerTrainingModel(model, speaker_vectors=vectors).eval()
    with torch.no_grad():
        out = training(batch)

    exported = tmp_path / "exported"
    checkpoint.export_model(model.state_dict(), tiny_model, exported, table, vectors, dtype=torch.float32)
    reloaded = Qwen3TTSModel.from_pretrained(str(exported), dtype=torch.float32).model.eval()

    codec0_row, frame_row = 0, 0
    for clip in (alice, bob):
        frames = clip.num_frames
        codes = clip.codes.astype(np.int64)
        gen_codec0, gen_sub = forced_generation_logits(reloaded, clip.prompt, clip.language, clip.speaker, codes,
                                                       non_streaming_mode=layout == NON_STREAMING)
        train_codec0 = out.codec0_logits[codec0_row:codec0_row + frames + 1]
        train_sub = out.code_predictor_logits[frame_row:frame_row + frames]
        codec0_row, frame_row = codec0_row + frames + 1, frame_row + frames

        assert gen_codec0.shape == train_codec0.shape and gen_sub.shape == train_sub.shape
        assert gen_codec0.std(dim=0).mean() > 1e-3  # positions really differ: the comparison has teeth
        assert (gen_codec0 - train_codec0).abs().max() < TOLERANCE, f"{clip.speaker}: group-0 logits differ"
        assert (gen_sub - train_sub).abs().max() < TOLERANCE, f"{clip.speaker}: code-predictor logits differ"


def test_a_shifted_layout_would_be_caught(tiny_model, coded_clips):
    """The reference script's double shift (predicting frame p+2) gives logits far from generation's."""
    tts = Qwen3TTSModel.from_pretrained(str(tiny_model), dtype=torch.float32)
    model, config = tts.model, tts.model.config
    ids = SpecialIds.from_config(config)
    clip = read_clips(coded_clips, ids, prompter=make_prompter(tts.processor, config))[0]
    table = assign_speakers([clip], config.talker_config)
    with torch.no_grad():
        vectors = speaker_vectors(model.speaker_encoder, reference_mels(table, 24000))
        out = TalkerTrainingModel(model, speaker_vectors=vectors).eval()(collate([TalkerDataset([clip], ids, {clip.speaker: 0})[0]]))
    with torch.no_grad():
        model.talker.get_input_embeddings().weight[table[0].codec_id] = vectors[0]
    config.talker_config.spk_id = {clip.speaker: table[0].codec_id}
    config.talker_config.spk_is_dialect = {clip.speaker: False}
    gen_codec0, _ = forced_generation_logits(model.eval(), clip.prompt, clip.language, clip.speaker,
                                             clip.codes.astype(np.int64))
    train_codec0 = out.codec0_logits[:len(gen_codec0)]  # then padding rows
    assert (gen_codec0 - train_codec0).abs().max() < TOLERANCE
    assert (gen_codec0[1:] - train_codec0[:-1]).abs().max() > 100 * TOLERANCE
