"""The speaker table: a codec id and a speaker vector for every speaker in the training data.

A speaker's vector is the mean x-vector (speaker-encoder output) of its reference clips. It fills
the speaker slot of every training sequence of that speaker, and at export it is written into
that speaker's row of the talker's codec embedding, which is where generate_custom_voice reads it.

A model that already has speakers (a CustomVoice model, or a checkpoint of this trainer) keeps
them: the table lists the new speakers first, then the model's own ("kept"), whose vectors are
their codec embedding rows as loaded (voices.py).
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qwen3_tts_sft import audio
from qwen3_tts_sft.quiet import import_qwen_tts

import_qwen_tts()  # before the import below, so that qwen_tts's notices about flash-attn and SoX stay unprinted
from qwen_tts.core.models.modeling_qwen3_tts import mel_spectrogram  # noqa: E402

# Upstream's fine-tuning script puts its one speaker at codec id 3000; new speakers count up from
# there, skipping ids the model already uses. Ids 2048.. are never generated (generate() suppresses
# them), so a speaker row is only ever read as the speaker slot.
FIRST_NEW_SPEAKER_ID = 3000
# At most this many distinct reference clips are averaged per speaker (the first ones in data
# order): a stable mean, and a bounded cost when the speaker encoder trains.
MAX_REFERENCE_CLIPS = 16
# The mel settings of Qwen3TTSForConditionalGeneration.extract_speaker_embedding (qwen_tts 0.1.1).
MEL_SETTINGS = dict(n_fft=1024, num_mels=128, hop_size=256, win_size=1024, fmin=0, fmax=12000)


@dataclass
class Speaker:
    name: str                  # lower-cased, as generate() looks it up
    codec_id: int
    reference_audio: list = field(default_factory=list)
    unusable_references: list = field(default_factory=list)  # [(source line, path, why)], left out
    dialect: object = False    # its spk_is_dialect entry: False, or the dialect's codec_language_id name
    kept: bool = False         # a speaker of the starting model, kept as it was

    def as_json(self) -> dict:
        """Its entry in trainer_state.json."""
        if self.kept:
            return dict(name=self.name, codec_id=self.codec_id, dialect=self.dialect)
        return dict(name=self.name, codec_id=self.codec_id, reference_audio=[str(p) for p in self.reference_audio])


def existing_speaker_ids(spk_id) -> dict:
    """{name: codec id} of the speakers a model already has (its talker_config.spk_id), names
    lower-cased as generate() reads them."""
    return {name.lower(): codec_id for name, codec_id in (spk_id or {}).items()}


def assign_speakers(clips: list, talker_config, overwrite_existing: bool = False, reference_problem=None) -> list:
    """One Speaker per distinct clip speaker, in order of first appearance, each with a free codec id
    and up to MAX_REFERENCE_CLIPS reference clips.

    A name the model already has is refused (ValueError), or with `overwrite_existing` keeps its
    codec id: the new voice replaces the old one in that row. With `reference_problem` (path -> why
    it cannot be a reference, or None), unusable references are left out and listed on the speaker;
    a speaker left with none is refused (ValueError).
    """
    existing = existing_speaker_ids(talker_config.spk_id)
    taken = set(existing.values())
    taken |= set((talker_config.codec_language_id or {}).values())
    taken |= {talker_config.codec_pad_id, talker_config.codec_bos_id, talker_config.codec_eos_token_id,
              talker_config.codec_think_id, talker_config.codec_nothink_id,
              talker_config.codec_think_bos_id, talker_config.codec_think_eos_id}
    speakers, problems = {}, {}  # reference path -> why it cannot be one (None: it can)
    next_id = FIRST_NEW_SPEAKER_ID
    for clip in clips:
        speaker = speakers.get(clip.speaker)
        if speaker is None and clip.speaker in existing:
            if not overwrite_existing:
                raise ValueError(
                    f"{clip.source}: speaker: {clip.speaker!r} is already a speaker of the starting model (codec id "
                    f"{existing[clip.speaker]}); pick another name, or pass --overwrite_speaker to replace its voice")
            speaker = speakers[clip.speaker] = Speaker(clip.speaker, existing[clip.speaker])
        if speaker is None:
            while next_id in taken:
                next_id += 1
            if next_id >= talker_config.vocab_size:
                raise ValueError(f"no free codec id left for speaker {clip.speaker!r}")
            speaker = speakers[clip.speaker] = Speaker(clip.speaker, next_id)
            taken.add(next_id)
        if clip.ref_audio in speaker.reference_audio or len(speaker.reference_audio) >= MAX_REFERENCE_CLIPS:
            continue
        if clip.ref_audio not in problems:
            problems[clip.ref_audio] = reference_problem(clip.ref_audio) if reference_problem else None
        if not problems[clip.ref_audio]:
            speaker.reference_audio.append(clip.ref_audio)
        elif clip.ref_audio not in [path for _, path, _ in speaker.unusable_references]:  # said for every speaker
            speaker.unusable_references.append((clip.source, clip.ref_audio, problems[clip.ref_audio]))
    for speaker in speakers.values():
        if not speaker.reference_audio:
            raise ValueError(f"speaker {speaker.name!r} has no usable reference clip (its vector comes from them):\n"
                             + "\n".join(f"  {source}: ref_audio: {path}: {why}"
                                         for source, path, why in speaker.unusable_references))
    return list(speakers.values())


def reference_problem(path: Path, max_seconds: float = 0.0):
    """Why a reference clip named by the training data cannot give its speaker's vector, or None:
    the checks prepare_codes.py applies to references, and no longer than --max_audio_seconds."""
    def length_problem(seconds):
        if seconds < audio.MIN_CLIP_SECONDS:
            return f"{seconds:.2f} s long, under {audio.MIN_CLIP_SECONDS:g} s: too short to give a voice"
        if max_seconds and seconds > max_seconds:
            return (f"{seconds:.1f} s long, over --max_audio_seconds {max_seconds:g}: a reference is one "
                    f"utterance of a few seconds")
        return None
    return audio.reference_problem(path, audio.TOKENIZER_SAMPLE_RATE, length_problem)


def reference_mel(path: Path, sample_rate: int) -> torch.Tensor:
    """[1, frames, mels] log-mel of a reference clip, as qwen_tts computes it for the speaker encoder."""
    return waveform_mel(audio.load_mono(path, sample_rate), sample_rate)


def waveform_mel(waveform: np.ndarray, sample_rate: int) -> torch.Tensor:
    """[1, frames, mels] log-mel of a mono waveform already at `sample_rate`, as for reference_mel."""
    samples = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)).clamp(-1.0, 1.0)
    mel = mel_spectrogram(samples.unsqueeze(0), sampling_rate=sample_rate, **MEL_SETTINGS)
    return mel.transpose(1, 2)


def reference_mels(speakers: list, sample_rate: int) -> list:
    """Per speaker, the list of its reference mels."""
    return [[reference_mel(path, sample_rate) for path in speaker.reference_audio] for speaker in speakers]


def speaker_vectors(speaker_encoder, mels: list) -> torch.Tensor:
    """[speakers, hidden]: each speaker's mean x-vector over its reference mels."""
    parameter = next(speaker_encoder.parameters())
    vectors = []
    for speaker_mels in mels:
        xvectors = [speaker_encoder(mel.to(parameter.device, parameter.dtype)) for mel in speaker_mels]
        vectors.append(torch.cat(xvectors).mean(dim=0))
    return torch.stack(vectors)
