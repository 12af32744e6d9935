"""The training forward: talker inputs as inference builds them, the two heads, the two losses.

`TalkerTrainingModel` wraps a loaded `Qwen3TTSForConditionalGeneration` so that accelerate (DDP,
FSDP, mixed precision) sees one module whose forward returns the losses. Losses are sums, not
means: the loop divides by the number of targets in the whole accumulation window, which makes
accumulation exact.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwen3_tts_sft import speakers
from qwen3_tts_sft.sequence_layout import TalkerBatch


@dataclass
class TalkerStepOutput:
    codec0_loss_sum: torch.Tensor   # summed cross-entropy of group 0 (frames and codec_eos)
    code_predictor_loss_sum: torch.Tensor  # summed cross-entropy of groups 1..15
    codec0_logits: torch.Tensor     # [M, vocab] at every predicting position, batch-major
    code_predictor_logits: torch.Tensor  # [F, groups-1, codebook] for every predicted frame (and padding frames)


# FSDP finds the forward's output tensors through pytree to hook the backward (where it gathers the
# sharded weights again); an unregistered dataclass would hide them.
torch.utils._pytree.register_dataclass(TalkerStepOutput)


class TalkerTrainingModel(nn.Module):
    """The talker and code predictor of `model`, and what fills each sequence's speaker slot.

    Give `speaker_vectors` [speakers, hidden] when the speaker encoder is frozen. When it trains,
    give `reference_mels` (per speaker, its reference mels) for the speakers it encodes, the first
    ones of the table: their vectors are then recomputed by the encoder in every forward, so
    gradients reach it. `speaker_vectors` then holds the fixed vectors of the speakers after them
    (a starting model's own speakers, voices.py), or is None.
    """

    def __init__(self, model, speaker_vectors: torch.Tensor = None, reference_mels: list = None):
        super().__init__()
        assert speaker_vectors is not None or reference_mels is not None
        self.model = model
        self.reference_mels = reference_mels
        self.register_buffer("fixed_speaker_vectors", speaker_vectors, persistent=False)

    @property
    def talker(self):
        return self.model.talker

    def speaker_vectors(self) -> torch.Tensor:
        if self.reference_mels is None:
            return self.fixed_speaker_vectors
        encoded = speakers.speaker_vectors(self.model.speaker_encoder, self.reference_mels)
        if self.fixed_speaker_vectors is None:
            return encoded
        return torch.cat([encoded, self.fixed_speaker_vectors.to(encoded.dtype)])

    def embed(self, batch: TalkerBatch, speaker_vectors: torch.Tensor) -> torch.Tensor:
        """Input vectors [B, T, hidden]: text track + codec track + speaker vector + frame codes."""
        talker = self.talker
        text = talker.text_projection(talker.get_text_embeddings()(batch.text_ids))
        text = text * batch.is_real.unsqueeze(-1)
        codec = talker.get_input_embeddings()(batch.codec_ids) * batch.has_codec.unsqueeze(-1)
        # Groups 1..15 of each frame go through the code predictor's embeddings, as in generation.
        code_embeddings = talker.code_predictor.get_input_embeddings()
        groups = sum(code_embeddings[g - 1](batch.frame_codes[..., g]) for g in range(1, len(code_embeddings) + 1))
        groups = groups * batch.is_frame.unsqueeze(-1)
        embeds = text + codec + groups
        rows = torch.arange(embeds.shape[0], device=embeds.device)
        speaker = speaker_vectors[batch.speaker_index].to(embeds.dtype)
        return embeds.index_put((rows, batch.speaker_slot), speaker, accumulate=True)

    def forward(self, batch: TalkerBatch) -> TalkerStepOutput:
        embeds = self.embed(batch, self.speaker_vectors())
        if torch.is_grad_enabled() and not embeds.requires_grad:
            # Nothing before the first layer trains (LoRA): its input would need no gradient while
            # every later layer's does, and the compiled layers, which guard on that, would compile
            # a second graph. Such an embeds is a leaf, so it can just be marked.
            embeds.requires_grad_()
        # Right padding only: every real position attends to real positions, so no mask is needed
        # and attention can take its fastest causal path. Positions are 0..T-1 as in generation.
        hidden = self.talker.model(inputs_embeds=embeds, use_cache=False).last_hidden_state

        hidden = hidden.flatten(0, 1)
        codec0_logits = self.talker.codec_head(hidden[batch.codec0_positions])
        codec0_loss_sum = F.cross_entropy(codec0_logits.float(), batch.codec0_targets, reduction="sum")

        code_predictor_logits = self.code_predictor_logits(hidden[batch.predicting_positions], batch.target_codes)
        code_predictor_loss_sum = F.cross_entropy(
            code_predictor_logits.flatten(0, 1).float(), batch.code_predictor_labels.flatten(), reduction="sum"
        )
        return TalkerStepOutput(codec0_loss_sum, code_predictor_loss_sum, codec0_logits, code_predictor_logits)

    def code_predictor_logits(self, predicting_hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Logits of groups 1..G-1 [F, G-1, codebook] from the hidden state that predicted each frame.

        Input sequence per frame, as in generation: [talker hidden, group 0 (talker embedding),
        group 1 .. group G-2 (code predictor embeddings)]; position j predicts group j.
        The library's own loss (forward_sub_talker_finetune) shifts labels twice, so only its
        logits are used.
        """
        talker = self.talker
        code_embeddings = talker.code_predictor.get_input_embeddings()
        inputs = [predicting_hidden.unsqueeze(1), talker.get_input_embeddings()(codes[:, :1])]
        inputs += [code_embeddings[g - 1](codes[:, g:g + 1]) for g in range(1, codes.shape[1] - 1)]
        return talker.code_predictor.forward_finetune(inputs_embeds=torch.cat(inputs, dim=1), use_cache=False).logits
