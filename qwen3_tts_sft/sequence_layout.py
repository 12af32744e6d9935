"""The talker's input layout: which vector sits at which position, and which positions are targets.

This module is the only place that knows the special ids and the order of the prefix. It mirrors
`Qwen3TTSForConditionalGeneration.generate` in qwen_tts 0.1.1. Every position's input is the sum
of a text-track vector and a codec-track vector. With `non_streaming_mode=True` (the default of
`generate_custom_voice`) the whole text comes before the audio:

    positions       text track                    codec track
    role (3)        <|im_start|> assistant \n      -
    prefix (P)      tts_pad x (P-1), tts_bos      [nothink, think_bos, think_eos] or
                                                  [think, think_bos, <language>, think_eos],
                                                  then the speaker vector, then codec_pad
    text (L+1)      the text's ids, tts_eos       codec_pad
    codec_bos       tts_pad                       codec_bos
    frame k         tts_pad                       sum of the 16 code embeddings of frame k

With `non_streaming_mode=False` ("streaming") the text is fed alongside the audio: the first text
id sits on the codec_bos position, and frame k's position carries the (k+1)-th remaining text id
(then tts_eos, then tts_pad once the text is used up):

    role (3), prefix (P)   as above
    codec_bos              first text id                 codec_bos
    frame k                text id k+1 / tts_eos / tts_pad   sum of the 16 code embeddings of frame k

Targets, in both layouts: the position holding codec_bos predicts group 0 of frame 0; frame k's
position predicts group 0 of frame k+1; the last frame's position predicts codec_eos. The code
predictor makes groups 1..15 of a frame from the talker's hidden state at the position that
predicted the frame's group 0.
"""

from dataclasses import dataclass

import numpy as np
import torch

from qwen3_tts_sft.languages import AUTO_LANGUAGE, model_languages
from qwen3_tts_sft.quiet import import_qwen_tts

import_qwen_tts()  # before the import below, so that qwen_tts's notices about flash-attn and SoX stay unprinted
from qwen_tts.inference.qwen3_tts_model import Qwen3TTSModel  # noqa: E402

# The tokenized prompt is "<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n";
# generate() keeps the first 3 ids as the role and drops the last 5.
ROLE_LENGTH = 3
PROMPT_SUFFIX_LENGTH = 5
NON_STREAMING, STREAMING = "non_streaming", "streaming"  # generate(non_streaming_mode=True / False)
IGNORE_INDEX = -100  # label of positions that predict nothing (torch cross_entropy's default)


@dataclass(frozen=True)
class SpecialIds:
    """Special ids of one model, read once from its config."""

    tts_pad: int
    tts_bos: int
    tts_eos: int
    codec_pad: int
    codec_bos: int
    codec_eos: int
    codec_think: int
    codec_nothink: int
    codec_think_bos: int
    codec_think_eos: int
    language_ids: dict
    codebook_size: int
    num_code_groups: int

    @classmethod
    def from_config(cls, config) -> "SpecialIds":
        talker = config.talker_config
        return cls(
            tts_pad=config.tts_pad_token_id,
            tts_bos=config.tts_bos_token_id,
            tts_eos=config.tts_eos_token_id,
            codec_pad=talker.codec_pad_id,
            codec_bos=talker.codec_bos_id,
            codec_eos=talker.codec_eos_token_id,
            codec_think=talker.codec_think_id,
            codec_nothink=talker.codec_nothink_id,
            codec_think_bos=talker.codec_think_bos_id,
            codec_think_eos=talker.codec_think_eos_id,
            language_ids={name.lower(): i for name, i in (talker.codec_language_id or {}).items()},
            codebook_size=talker.code_predictor_config.vocab_size,
            num_code_groups=talker.num_code_groups,
        )

    def supported_languages(self) -> list:
        """Languages a row may name; dialects are reached through dialect speakers only."""
        return model_languages(self.language_ids)

    def codec_prefix(self, language: str) -> list:
        """Codec-track control ids before the speaker slot."""
        language = language.lower()
        if language == AUTO_LANGUAGE:
            return [self.codec_nothink, self.codec_think_bos, self.codec_think_eos]
        return [self.codec_think, self.codec_think_bos, self.language_ids[language], self.codec_think_eos]


def prefix_language(language: str, dialect) -> str:
    """The language whose id generate() puts in the prefix for a speaker: a dialect speaker's dialect
    (its spk_is_dialect entry) replaces chinese and auto."""
    if dialect and language.lower() in ("chinese", AUTO_LANGUAGE):
        return dialect.lower()
    return language.lower()


def prompt_ids(processor, text: str) -> list:
    """Token ids of the prompt, tokenized exactly as `generate_custom_voice` tokenizes it."""
    prompt = Qwen3TTSModel._build_assistant_text(None, text)
    return processor(text=prompt)["input_ids"][0]


def check_prompt_ids(ids: list, im_start_id: int, im_end_id: int) -> None:
    """Raise if the tokenizer splits the role or suffix differently from what generate() assumes."""
    if len(ids) <= ROLE_LENGTH + PROMPT_SUFFIX_LENGTH:
        raise ValueError("the text tokenizes to nothing")
    if ids[0] != im_start_id or ids[-PROMPT_SUFFIX_LENGTH] != im_end_id or ids[-3] != im_start_id:
        raise ValueError(
            "the tokenizer does not split '<|im_start|>assistant\\n' into 3 tokens; "
            "qwen_tts generation would misread the prompt"
        )


@dataclass
class TalkerExample:
    """One training sequence, position by position, with its named positions."""

    text_ids: np.ndarray        # [T] text-track id per position
    codec_ids: np.ndarray       # [T] codec-track id per position (group 0 code or control id)
    has_codec: np.ndarray       # [T] position has a codec_embedding vector (not role, not speaker slot)
    frame_codes: np.ndarray     # [T, G] codes of the frame whose embedding is this position's input
    codec0_labels: np.ndarray   # [T] group-0 id this position predicts, or IGNORE_INDEX
    speaker_slot: int           # position of the speaker vector
    codec_bos: int              # position of codec_bos; it predicts frame 0
    first_frame: int            # position whose input is frame 0
    num_frames: int
    speaker_index: int          # row in the speaker table

    @property
    def length(self) -> int:
        return len(self.text_ids)

    @property
    def predicting_positions(self) -> np.ndarray:
        """Positions whose hidden state predicts a frame (feeds the code predictor), in frame order."""
        return np.arange(self.codec_bos, self.codec_bos + self.num_frames)


def example_length(ids: SpecialIds, prompt_length: int, num_frames: int, language: str,
                   layout: str = NON_STREAMING) -> int:
    """Number of positions build_example() lays out; known without building the example."""
    prefix_length = len(ids.codec_prefix(language)) + 2  # control ids, speaker slot, codec_pad
    if layout == STREAMING:
        return ROLE_LENGTH + prefix_length + 1 + num_frames  # + codec_bos
    text_length = prompt_length - ROLE_LENGTH - PROMPT_SUFFIX_LENGTH
    return ROLE_LENGTH + prefix_length + text_length + 1 + 1 + num_frames  # + tts_eos, codec_bos


def num_targets(num_frames: int, num_code_groups: int) -> tuple:
    """(group-0 targets, code-predictor targets) of one clip: every frame plus codec_eos, then groups 1.."""
    return num_frames + 1, num_frames * (num_code_groups - 1)


def build_example(ids: SpecialIds, prompt: list, codes: np.ndarray, language: str,
                  speaker_index: int, layout: str = NON_STREAMING) -> TalkerExample:
    """Lay out one clip: `prompt` from prompt_ids(), `codes` [frames, groups]."""
    role = list(prompt[:ROLE_LENGTH])
    text = list(prompt[ROLE_LENGTH:-PROMPT_SUFFIX_LENGTH])
    codec_prefix = ids.codec_prefix(language)
    num_frames = len(codes)

    # Prefix: control ids, the speaker slot, codec_pad; the text track is tts_pad.., tts_bos.
    prefix_codec = codec_prefix + [ids.codec_pad, ids.codec_pad]  # the first pad is the speaker slot
    prefix_text = [ids.tts_pad] * (len(prefix_codec) - 1) + [ids.tts_bos]
    speaker_slot = ROLE_LENGTH + len(codec_prefix)

    if layout == NON_STREAMING:
        text_track = role + prefix_text + text + [ids.tts_eos] + [ids.tts_pad] * (1 + num_frames)
        codec_bos = ROLE_LENGTH + len(prefix_codec) + len(text) + 1
    else:
        # The text rides along the frames; whatever does not fit before the last frame is never read.
        trailing = (text[1:] + [ids.tts_eos] + [ids.tts_pad] * num_frames)[:num_frames]
        text_track = role + prefix_text + text[:1] + trailing
        codec_bos = ROLE_LENGTH + len(prefix_codec)
    first_frame = codec_bos + 1
    length = first_frame + num_frames
    assert len(text_track) == length == example_length(ids, len(prompt), num_frames, language, layout)

    codec_ids = np.zeros(length, dtype=np.int64)
    codec_ids[ROLE_LENGTH:speaker_slot + 2] = prefix_codec
    codec_ids[speaker_slot + 2:codec_bos] = ids.codec_pad
    codec_ids[codec_bos] = ids.codec_bos
    codec_ids[first_frame:] = codes[:, 0]

    has_codec = np.ones(length, dtype=bool)
    has_codec[:ROLE_LENGTH] = False
    has_codec[speaker_slot] = False

    frame_codes = np.zeros((length, ids.num_code_groups), dtype=np.int64)
    frame_codes[first_frame:] = codes

    codec0_labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
    codec0_labels[codec_bos:codec_bos + num_frames] = codes[:, 0]
    codec0_labels[codec_bos + num_frames] = ids.codec_eos

    return TalkerExample(
        text_ids=np.asarray(text_track, dtype=np.int64), codec_ids=codec_ids, has_codec=has_codec,
        frame_codes=frame_codes, codec0_labels=codec0_labels, speaker_slot=speaker_slot,
        codec_bos=codec_bos, first_frame=first_frame, num_frames=num_frames, speaker_index=speaker_index,
    )


@dataclass
class TalkerBatch:
    """Right-padded batch. Padding sits after every real position, so causal attention needs no mask.

    Target positions are flat indices into the [B*T] positions, so the forward gathers them
    without a host sync.
    """

    text_ids: torch.Tensor        # [B, T]
    codec_ids: torch.Tensor       # [B, T]
    has_codec: torch.Tensor       # [B, T] bool: a codec_embedding vector is added
    is_frame: torch.Tensor        # [B, T] bool: the input is a frame's codes
    frame_codes: torch.Tensor     # [B, T, G]
    is_real: torch.Tensor         # [B, T] bool: not padding
    speaker_slot: torch.Tensor    # [B]
    speaker_index: torch.Tensor   # [B]
    codec0_positions: torch.Tensor  # [M] flat positions that predict a group-0 id (then padding rows)
    codec0_targets: torch.Tensor    # [M] the ids they predict (frame codes, then codec_eos); IGNORE_INDEX on padding
    predicting_positions: torch.Tensor  # [F] flat positions whose hidden state feeds the code predictor
    target_codes: torch.Tensor    # [F, G] codes of the frame each of those positions predicts
    code_predictor_labels: torch.Tensor  # [F, G-1] groups 1.. of those frames; IGNORE_INDEX on padding frames
    lengths: torch.Tensor         # [B]
    num_frames: torch.Tensor      # [] real frames (F counts padding frames too)

    @property
    def num_codec0_targets(self) -> int:
        return int((self.codec0_targets != IGNORE_INDEX).sum())

    @property
    def num_code_predictor_targets(self) -> int:
        return int(self.num_frames) * (self.target_codes.shape[1] - 1)

    def to(self, device) -> "TalkerBatch":
        return TalkerBatch(**{name: value.to(device, non_blocking=True) for name, value in vars(self).items()})

    def pin_memory(self) -> "TalkerBatch":
        return TalkerBatch(**{name: value.pin_memory() for name, value in vars(self).items()})


# Without a shape table, batches are padded to a multiple of this many positions (aligned shapes suit
# the matrix units, and torch.compile then needs one graph for every length instead of one for
# aligned and one for not), and the code predictor's frames to a multiple of this many rows.
PAD_TO_MULTIPLE_OF = 8
FRAMES_PAD_TO_MULTIPLE_OF = 32


@dataclass(frozen=True)
class BatchShapes:
    """The few sizes micro-batches of `rows` clips are padded to: (positions, frames) pairs.

    A CUDA graph holds fixed shapes (cuda_graphs.py records one per batch shape), so a dataset of many
    lengths should make few shapes; training_data.choose_batch_shapes picks them from an epoch's
    micro-batches. A batch pads to the cheapest size that holds it; one that fits none (another
    row count, or longer than any) pads to multiples as without a table.
    """

    rows: int
    sizes: tuple  # ((positions, frames), ...): positions a multiple of 8, frames of 32

    def fit(self, rows: int, positions: int, frames: int):
        """The cheapest (positions, frames) of the table holding such a batch, or None."""
        if rows != self.rows:
            return None
        holding = [size for size in self.sizes if size[0] >= positions and size[1] >= frames]
        return min(holding, key=lambda size: padded_cost(rows, *size), default=None)


def padded_cost(rows: int, positions: int, frames: int) -> int:
    """What a padded batch costs to train, in talker positions: on the 1.7B model a code-predictor
    frame (16 short positions through a smaller transformer, and 15 heads) costs about as much as a
    talker position, ~8 GFLOP each (bench.py's count; on 0.6B a frame costs ~3 positions)."""
    return rows * positions + frames


def padded_sizes(rows: int, longest: int, frames: int, shapes: BatchShapes = None) -> tuple:
    """(positions, frame rows) a batch is padded to: a size of `shapes`, else the next multiples."""
    size = shapes.fit(rows, longest, frames) if shapes is not None else None
    if size is not None:
        return size
    return round_up(longest, PAD_TO_MULTIPLE_OF), round_up(frames, FRAMES_PAD_TO_MULTIPLE_OF)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def collate(examples: list, shapes: BatchShapes = None) -> TalkerBatch:
    """Right-pad `examples` into one batch, to a size of `shapes` when one holds it.

    Padding never changes a clip's loss or gradient: padding positions come after every real one
    (causal attention never reads them) and padding target rows predict nothing. The group-0 rows
    are the frame rows plus one codec_eos per clip, so the frame rows fix them.
    """
    batch_size = len(examples)
    longest = max(example.length for example in examples)
    max_length, frame_rows = padded_sizes(batch_size, longest, sum(e.num_frames for e in examples), shapes)
    num_groups = examples[0].frame_codes.shape[1]

    def padded(field, fill, dtype, extra=()):
        out = np.full((batch_size, max_length, *extra), fill, dtype=dtype)
        for row, example in enumerate(examples):
            out[row, :example.length] = getattr(example, field)
        return torch.from_numpy(out)

    lengths = np.array([example.length for example in examples])
    positions = np.arange(max_length)[None, :]
    first_frames = np.array([example.first_frame for example in examples])[:, None]
    codec0_positions, codec0_targets, predicting_positions = [], [], []
    for row, example in enumerate(examples):
        targets = np.flatnonzero(example.codec0_labels != IGNORE_INDEX)
        codec0_positions.append(row * max_length + targets)
        codec0_targets.append(example.codec0_labels[targets])
        predicting_positions.append(row * max_length + example.predicting_positions)
    # Padding rows read position 0 and predict nothing.
    padding = frame_rows + batch_size - sum(map(len, codec0_targets))
    codec0_positions.append(np.zeros(padding, dtype=np.int64))
    codec0_targets.append(np.full(padding, IGNORE_INDEX, dtype=np.int64))
    target_codes = np.concatenate([example.frame_codes[example.first_frame:] for example in examples])
    num_frames = len(target_codes)
    padding = frame_rows - num_frames
    predicting_positions.append(np.zeros(padding, dtype=np.int64))
    target_codes = np.concatenate([target_codes, np.zeros((padding, num_groups), dtype=np.int64)])
    code_predictor_labels = target_codes[:, 1:].copy()
    code_predictor_labels[num_frames:] = IGNORE_INDEX
    return TalkerBatch(
        text_ids=padded("text_ids", 0, np.int64),
        codec_ids=padded("codec_ids", 0, np.int64),
        has_codec=padded("has_codec", False, bool),
        is_frame=torch.from_numpy((positions >= first_frames) & (positions < lengths[:, None])),
        frame_codes=padded("frame_codes", 0, np.int64, (num_groups,)),
        is_real=torch.from_numpy(positions < lengths[:, None]),
        speaker_slot=torch.tensor([example.speaker_slot for example in examples]),
        speaker_index=torch.tensor([example.speaker_index for example in examples]),
        codec0_positions=torch.from_numpy(np.concatenate(codec0_positions)),
        codec0_targets=torch.from_numpy(np.concatenate(codec0_targets)),
        predicting_positions=torch.from_numpy(np.concatenate(predicting_positions)),
        target_codes=torch.from_numpy(target_codes),
        code_predictor_labels=torch.from_numpy(code_predictor_labels),
        lengths=torch.from_numpy(lengths),
        num_frames=torch.tensor(num_frames),
    )
