"""Write a random Qwen3-TTS model directory, offline, in the on-disk format of a real download.

The directory holds everything `Qwen3TTSModel.from_pretrained` reads: config.json,
generation_config.json, text tokenizer files (built here with the `tokenizers` library, with the
real special tokens at their real ids), processor config, model.safetensors and a random
`speech_tokenizer/`. Weights are random; the shapes come from a size preset:

    tiny       the demo and tests: 1.7B-shaped (text width == talker width, a projection
               between talker and code predictor), a few hundred thousand weights per layer
    tiny-0.6b  0.6B-shaped: the text width differs from the talker width
    1.7b, 0.6b the published shapes, for GPU benchmarks

write_custom_voice_dir turns such a folder (or a checkpoint) into a CustomVoice model with
built-in speakers, laid out as a CustomVoice download is.

Run it on its own:  python -m qwen3_tts_sft.tiny_model --out demo_run/base_model [--size tiny] [--clips 6]
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from qwen3_tts_sft.languages import PUBLISHED_LANGUAGE_IDS
from qwen3_tts_sft.quiet import import_qwen_tts

import_qwen_tts()  # before the qwen_tts imports below, so that its flash-attn and SoX notices stay unprinted

# Ids and tables shared by every released Qwen3-TTS 12 Hz model, from the published config.json
# and tokenizer_config.json. The tiny model keeps them, so the trainer sees the real id layout.
FIRST_SPECIAL_TEXT_ID = 151643
SPECIAL_TEXT_TOKENS = [  # ids 151643.. in order; "special" is false for the ones marked below
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
]
NOT_SPECIAL = set(range(151657, 151669))  # tool-call, fim and think markers
TEXT_VOCAB_SIZE = 151936
CODEC_SPECIAL_IDS = dict(
    codec_pad_id=2148,
    codec_bos_id=2149,
    codec_eos_token_id=2150,
    codec_think_id=2154,
    codec_nothink_id=2155,
    codec_think_bos_id=2156,
    codec_think_eos_id=2157,
)
TALKER_VOCAB_SIZE = 3072  # codes 0..2047, then control, language and speaker ids
CODEBOOK_SIZE = 2048
NUM_CODE_GROUPS = 16
SAMPLE_RATE = 24000
SAMPLES_PER_FRAME = 1920  # 24 kHz / 12.5 Hz

# Widths per preset. Everything not listed is the same for every size. The 0.6B shapes differ from
# the 1.7B ones in the talker only: it is narrower than the text embedding, and as wide as the
# code predictor (so no projection sits between them).
TINY_CODE_PREDICTOR = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=16)
FULL_CODE_PREDICTOR = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=5, num_attention_heads=16,
                           num_key_value_heads=8, head_dim=128)
TINY_SPEAKER_ENCODER = dict(enc_channels=[32, 32, 32, 32, 96], enc_attention_channels=16, enc_res2net_scale=4,
                            enc_se_channels=16)
SIZES = {
    "tiny": dict(
        talker=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                    num_key_value_heads=1, head_dim=16, text_hidden_size=48, mrope_section=[4, 2, 2]),
        code_predictor=TINY_CODE_PREDICTOR, speaker_encoder=TINY_SPEAKER_ENCODER, tts_model_size="1b7",
        speech_tokenizer="tiny",
    ),
    "tiny-0.6b": dict(
        talker=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16, text_hidden_size=48, mrope_section=[4, 2, 2]),
        code_predictor=TINY_CODE_PREDICTOR, speaker_encoder=TINY_SPEAKER_ENCODER, tts_model_size="0b6",
        speech_tokenizer="tiny",
    ),
    "1.7b": dict(
        talker=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=128, text_hidden_size=2048, mrope_section=[24, 20, 20]),
        code_predictor=FULL_CODE_PREDICTOR, speaker_encoder={}, tts_model_size="1b7", speech_tokenizer="full",
    ),
    "0.6b": dict(
        talker=dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=128, text_hidden_size=2048, mrope_section=[24, 20, 20]),
        code_predictor=FULL_CODE_PREDICTOR, speaker_encoder={}, tts_model_size="0b6", speech_tokenizer="full",
    ),
}

SPEECH_TOKENIZER_SIZES = {
    "tiny": dict(
        encoder=dict(hidden_size=32, num_filters=4, num_hidden_layers=1, intermediate_size=64,
                     num_attention_heads=2, num_key_value_heads=2, head_dim=16, codebook_dim=16,
                     vector_quantization_hidden_dimension=16, upsample_groups=32),
        decoder=dict(hidden_size=32, latent_dim=32, codebook_dim=16, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2, head_dim=16, intermediate_size=64,
                     decoder_dim=32),
    ),
    "full": dict(
        encoder=dict(hidden_size=512, num_filters=64, num_hidden_layers=8, intermediate_size=2048,
                     num_attention_heads=8, num_key_value_heads=8, head_dim=64, codebook_dim=256,
                     vector_quantization_hidden_dimension=256, upsample_groups=512),
        decoder=dict(hidden_size=512, latent_dim=1024, codebook_dim=512, num_hidden_layers=8,
                     num_attention_heads=16, num_key_value_heads=16, head_dim=64, intermediate_size=1024,
                     decoder_dim=1536),
    ),
}


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def model_config(size: str) -> dict:
    """config.json of a Qwen3-TTS 12 Hz Base model of the given size preset."""
    preset = SIZES[size]
    talker = dict(preset["talker"])
    mrope_section = talker.pop("mrope_section")
    code_predictor = dict(
        preset["code_predictor"],
        vocab_size=CODEBOOK_SIZE,
        num_code_groups=NUM_CODE_GROUPS,
        hidden_act="silu",
        max_position_embeddings=65536,
        rms_norm_eps=1e-6,
        rope_theta=1000000,
        rope_scaling=None,
        attention_bias=False,
        attention_dropout=0,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=28,
        layer_types=["full_attention"] * preset["code_predictor"]["num_hidden_layers"],
        tie_word_embeddings=False,
        initializer_range=0.02,
        use_cache=True,
        model_type="qwen3_tts_talker_code_predictor",
    )
    talker_config = dict(
        talker,
        code_predictor_config=code_predictor,
        vocab_size=TALKER_VOCAB_SIZE,
        text_vocab_size=TEXT_VOCAB_SIZE,
        num_code_groups=NUM_CODE_GROUPS,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000,
        rope_scaling=dict(interleaved=True, mrope_section=mrope_section, rope_type="default", type="default"),
        attention_bias=False,
        attention_dropout=0,
        use_sliding_window=False,
        sliding_window=None,
        initializer_range=0.02,
        use_cache=True,
        position_id_per_seconds=13,
        codec_language_id=dict(PUBLISHED_LANGUAGE_IDS),
        spk_id={},
        spk_is_dialect={},
        model_type="qwen3_tts_talker",
        **CODEC_SPECIAL_IDS,
    )
    # The x-vector is written into a codec_embedding row, so its width is the talker's.
    speaker_encoder_config = dict(preset["speaker_encoder"], enc_dim=talker["hidden_size"], sample_rate=SAMPLE_RATE)
    return dict(
        architectures=["Qwen3TTSForConditionalGeneration"],
        model_type="qwen3_tts",
        tokenizer_type="qwen3_tts_tokenizer_12hz",
        tts_model_size=preset["tts_model_size"],
        tts_model_type="base",
        im_start_token_id=151644,
        im_end_token_id=151645,
        tts_pad_token_id=151671,
        tts_bos_token_id=151672,
        tts_eos_token_id=151673,
        assistant_token_id=None,  # filled in once the text tokenizer exists
        talker_config=talker_config,
        speaker_encoder_config=speaker_encoder_config,
        # Kept as published: transformers picks the tokenizer's pre-tokenizer fix by this version.
        transformers_version="4.57.3",
    )


def speech_tokenizer_config(size: str) -> dict:
    """speech_tokenizer/config.json: a Mimi encoder and the Qwen3-TTS 12 Hz decoder."""
    sizes = SPEECH_TOKENIZER_SIZES[size]
    encoder = dict(
        sizes["encoder"],
        model_type="mimi",
        sampling_rate=SAMPLE_RATE,
        frame_rate=12.5,
        audio_channels=1,
        upsampling_ratios=[8, 6, 5, 4],
        codebook_size=CODEBOOK_SIZE,
        num_quantizers=32,
        num_semantic_quantizers=1,
        use_causal_conv=True,
        sliding_window=250,
        use_cache=False,
    )
    decoder = dict(
        sizes["decoder"],
        codebook_size=CODEBOOK_SIZE,
        num_quantizers=NUM_CODE_GROUPS,
        sliding_window=72,
        max_position_embeddings=8000,
        rope_theta=10000,
        upsample_rates=[8, 5, 4, 3],
        upsampling_ratios=[2, 2],
        layer_scale_initial_scale=0.01,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        num_semantic_quantizers=1,
        semantic_codebook_size=4096,
        vector_quantization_hidden_dimension=sizes["decoder"]["codebook_dim"],
    )
    return dict(
        architectures=["Qwen3TTSTokenizerV2Model"],
        model_type="qwen3_tts_tokenizer_12hz",
        encoder_config=encoder,
        decoder_config=decoder,
        encoder_valid_num_quantizers=NUM_CODE_GROUPS,
        input_sample_rate=SAMPLE_RATE,
        output_sample_rate=SAMPLE_RATE,
        encode_downsample_rate=SAMPLES_PER_FRAME,
        decode_upsample_rate=SAMPLES_PER_FRAME,
        transformers_version="4.57.3",
    )


SPEECH_TOKENIZER_PREPROCESSOR = dict(
    feature_extractor_type="EncodecFeatureExtractor",
    feature_size=1,
    sampling_rate=SAMPLE_RATE,
    padding_side="right",
    padding_value=0.0,
    return_attention_mask=True,
    chunk_length_s=None,
    overlap=None,
)

GENERATION_CONFIG = dict(
    do_sample=True,
    repetition_penalty=1.05,
    temperature=0.9,
    top_p=1.0,
    top_k=50,
    subtalker_dosample=True,
    subtalker_temperature=0.9,
    subtalker_top_p=1.0,
    subtalker_top_k=50,
    max_new_tokens=8192,
)


# ---------------------------------------------------------------------------------------------
# Text tokenizer
# ---------------------------------------------------------------------------------------------

TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, this is a short test of the tiny speech model.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "One, two, three, four, five. Numbers like 42 and 2026 are read digit by digit.",
    "How are you today? I am fine, thank you very much!",
    "A fine-tuned voice should sound like the speaker it was trained on.",
    "Speech codes at twelve point five frames a second.",
]
TOKENIZER_MERGES = 400


def train_byte_level_bpe():
    """Learn a small byte-level BPE (vocab, merges) on a tiny corpus; 'assistant' ends up one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + TOKENIZER_MERGES, initial_alphabet=alphabet,
                                  show_progress=False)
    # "assistant" is repeated so that it becomes a single token, as in the real vocabulary.
    tokenizer.train_from_iterator(TOKENIZER_CORPUS * 20 + ["assistant"] * 400, trainer=trainer)
    spec = json.loads(tokenizer.to_str())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["merges"]]
    return spec["vocab"], merges


def write_text_tokenizer(out_dir: Path) -> int:
    """Write vocab.json, merges.txt and tokenizer_config.json, as the hub repos ship them.

    transformers builds the fast tokenizer from these files, with Qwen2's own pre-tokenizer, just
    as it does for a real download. Returns the id of "assistant".
    """
    vocab, merges = train_byte_level_bpe()
    # The real vocabulary has 151643 ordinary tokens; pad ours to that size with tokens no merge
    # can produce, so every id below the special ones exists.
    for token_id in range(len(vocab), FIRST_SPECIAL_TEXT_ID):
        vocab[f"<|unused_{token_id}|>"] = token_id
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special_ids = range(FIRST_SPECIAL_TEXT_ID, FIRST_SPECIAL_TEXT_ID + len(SPECIAL_TEXT_TOKENS))
    tokenizer_config = dict(
        add_bos_token=False,
        add_prefix_space=False,
        added_tokens_decoder={
            str(token_id): dict(content=content, lstrip=False, normalized=False, rstrip=False,
                                single_word=False, special=token_id not in NOT_SPECIAL)
            for token_id, content in zip(special_ids, SPECIAL_TEXT_TOKENS)
        },
        additional_special_tokens=[
            content for token_id, content in zip(special_ids, SPECIAL_TEXT_TOKENS)
            if token_id not in NOT_SPECIAL and content not in ("<|endoftext|>", "<tts_text_eod>")
        ],
        bos_token=None,
        clean_up_tokenization_spaces=False,
        eos_token="<|im_end|>",
        errors="replace",
        model_max_length=131072,
        pad_token="<|endoftext|>",
        split_special_tokens=False,
        tokenizer_class="Qwen2Tokenizer",
        unk_token=None,
    )
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out_dir / "preprocessor_config.json").write_text(json.dumps(dict(
        padding_side="left", padding_value=0.0, processor_class="Qwen3TTSProcessor", return_attention_mask=True,
    ), indent=2))
    return vocab["assistant"]


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

def write_speech_tokenizer(out_dir: Path, size: str, seed: int) -> None:
    from qwen_tts.core import Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model

    out_dir.mkdir(parents=True, exist_ok=True)
    config_dict = speech_tokenizer_config(size)
    torch.manual_seed(seed)
    model = Qwen3TTSTokenizerV2Model(Qwen3TTSTokenizerV2Config(**config_dict))
    # Codebooks are stored as running sums (encoder: buffers, decoder: parameters) that start at
    # zero, which would make every code decode to silence; give them random vectors instead.
    with torch.no_grad():
        for name, tensor in list(model.named_buffers()) + list(model.named_parameters()):
            if name.endswith(("embed_sum", "embedding_sum")):
                tensor.normal_(0.0, 1.0)
            elif name.endswith(("cluster_usage", "initialized")):
                tensor.fill_(1.0)
        if size == "tiny":
            make_decoder_audible(model.decoder)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2))
    (out_dir / "preprocessor_config.json").write_text(json.dumps(SPEECH_TOKENIZER_PREPROCESSOR, indent=2))


def make_decoder_audible(decoder, target_std: float = 0.1) -> None:
    """Random decoder weights at the usual 0.02 scale shrink the signal ~10x a layer, so the tiny
    decoder would output silence. Use PyTorch's fan-in initialisation for its convolutions, then
    scale the last one so decoded random codes come out at a speech-like level, centred on zero as a
    trained decoder's are (random weights leave a DC offset larger than the signal)."""
    convolutions = [m for m in decoder.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d))]
    for convolution in convolutions:
        convolution.reset_parameters()
    codes = torch.randint(0, decoder.config.codebook_size, (4, decoder.config.num_quantizers, 25),
                          generator=torch.Generator().manual_seed(0))
    last = convolutions[-1]
    last.weight.mul_(target_std / max(decoder(codes).std().item(), 1e-12))
    last.bias.sub_(decoder(codes).mean())


def write_model_dir(out_dir, size: str = "tiny", seed: int = 0) -> Path:
    """Write a complete random Qwen3-TTS Base model directory and return its path."""
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_dict = model_config(size)
    config_dict["assistant_token_id"] = write_text_tokenizer(out_dir)
    torch.manual_seed(seed)
    # Random initialisation of a full-size model is much faster on a GPU, when there is one.
    with torch.device("cuda" if torch.cuda.is_available() and size not in ("tiny", "tiny-0.6b") else "cpu"):
        model = Qwen3TTSForConditionalGeneration(Qwen3TTSConfig(**config_dict))
    state = {k: v.to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    del model
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    # Written as plain JSON: Qwen3TTSConfig.save_pretrained output does not load back.
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    write_speech_tokenizer(out_dir / "speech_tokenizer", SIZES[size]["speech_tokenizer"], seed + 1)
    return out_dir


# ---------------------------------------------------------------------------------------------
# CustomVoice models
# ---------------------------------------------------------------------------------------------

# The dialects a CustomVoice config adds to codec_language_id, with the ids the published
# CustomVoice configs use (as independent ports of them list them; not checked against a download).
CUSTOM_VOICE_DIALECT_IDS = {"beijing_dialect": 2074, "sichuan_dialect": 2062}
# Built-in speakers for tests: {name: (codec id, spk_is_dialect entry)}, one plain and one dialect
# speaker, at ids the published CustomVoice models give two of theirs.
TINY_BUILT_IN_SPEAKERS = {"serena": (3066, False), "eric": (2875, "sichuan_dialect")}


def write_custom_voice_dir(model_dir, out_dir, speakers: dict = None) -> Path:
    """A CustomVoice model folder made from the model folder `model_dir` (a tiny Base model, or a
    checkpoint whose speaker rows hold trained voices): tts_model_type custom_voice; `speakers`
    ({name: (codec id, dialect or False)}, TINY_BUILT_IN_SPEAKERS by default) in spk_id and
    spk_is_dialect, their vectors the codec embedding rows already at those ids; the dialects in
    codec_language_id; and no speaker encoder weights, since qwen_tts builds no encoder for a
    CustomVoice model. Returns its path."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qwen3_tts_sft.checkpoint import MODEL_WEIGHTS, SPEAKER_ENCODER_PREFIX, copied_from_base

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    speakers = TINY_BUILT_IN_SPEAKERS if speakers is None else speakers
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in copied_from_base(model_dir):
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, out_dir / item.name)
    weights = load_file(str(model_dir / MODEL_WEIGHTS))
    save_file({name: tensor for name, tensor in weights.items() if not name.startswith(SPEAKER_ENCODER_PREFIX)},
              str(out_dir / MODEL_WEIGHTS), metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["tts_model_type"] = "custom_voice"
    talker = config["talker_config"]
    talker["codec_language_id"] = dict(talker["codec_language_id"], **CUSTOM_VOICE_DIALECT_IDS)
    talker["spk_id"] = {name: codec_id for name, (codec_id, _) in speakers.items()}
    talker["spk_is_dialect"] = {name: dialect for name, (_, dialect) in speakers.items()}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def make_speaker_encoder_separate(model_dir, reference_audio: list, vector_norm: float = 1.0) -> None:
    """Change the model's speaker encoder (in model.safetensors) so that it tells the recordings in
    `reference_audio` (wav paths) apart, as a trained encoder tells voices apart.

    A random encoder maps every recording to nearly one point (cosine 0.95 and more between a
    tone, noise and a voice), because the pooled statistics its last layer reads are nearly the
    same for every input. Its last layer is changed to subtract their mean over these
    recordings, x = k W (s - mean s), with k scaling the mean vector length to `vector_norm`:
    the recordings' x-vectors then point in very different directions (two of them: opposite),
    and another recording of the same synthetic voice still lands next to its own (cosine 0.99
    in a trial). The length: at 0.3 (the random encoder's own) two voices saying one sentence
    still began with the same frame after 60 training steps in a trial; at 1.0 both came back.
    """
    from safetensors.torch import load_file, save_file

    from qwen3_tts_sft.checkpoint import MODEL_WEIGHTS
    from qwen3_tts_sft.speakers import reference_mel
    from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSSpeakerEncoderConfig
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSSpeakerEncoder

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())["speaker_encoder_config"]
    weights = load_file(str(model_dir / MODEL_WEIGHTS))
    prefix = "speaker_encoder."
    encoder = Qwen3TTSSpeakerEncoder(Qwen3TTSSpeakerEncoderConfig(**config))
    encoder.load_state_dict({k[len(prefix):]: v.float() for k, v in weights.items() if k.startswith(prefix)})
    pooled = []  # what the last layer reads, per recording
    encoder.fc.register_forward_hook(lambda module, inputs, output: pooled.append(inputs[0].squeeze(-1)))
    with torch.no_grad():
        for path in reference_audio:
            encoder(reference_mel(path, config["sample_rate"]))
        statistics = torch.cat(pooled)
        weight = encoder.fc.weight[:, :, 0].clone()
        scale = vector_norm / ((statistics - statistics.mean(dim=0)) @ weight.T).norm(dim=1).mean()
        encoder.fc.weight.copy_(scale * encoder.fc.weight)
        encoder.fc.bias.copy_(-scale * statistics.mean(dim=0) @ weight.T)
    dtype = weights[prefix + "fc.weight"].dtype
    weights[prefix + "fc.weight"] = encoder.fc.weight.detach().to(dtype).contiguous()
    weights[prefix + "fc.bias"] = encoder.fc.bias.detach().to(dtype).contiguous()
    save_file(weights, str(model_dir / MODEL_WEIGHTS), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# Synthetic clips
# ---------------------------------------------------------------------------------------------

DEMO_SENTENCES = [
    "Hello, this is a short test.",
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore.",
    "How are you today?",
    "One, two, three, four, five.",
    "A fine-tuned voice should sound like its speaker.",
    "Speech codes at twelve point five frames a second.",
    "Thank you very much!",
]


def synthetic_voice(seconds: float, sample_rate: int, pitch_hz: float, rng: np.random.Generator) -> np.ndarray:
    """A voiced-sounding signal: a gliding harmonic tone with a syllable-like amplitude envelope."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    glide = pitch_hz * (1.0 + 0.1 * np.sin(2 * math.pi * rng.uniform(0.3, 1.0) * t))
    phase = 2 * math.pi * np.cumsum(glide) / sample_rate
    tone = sum(np.sin(k * phase) / k for k in range(1, 6))
    syllables = 0.5 * (1 - np.cos(2 * math.pi * rng.uniform(3.0, 5.0) * t))
    signal = 0.3 * tone * syllables + 0.005 * rng.standard_normal(t.shape)
    return signal.astype(np.float32)


def write_synthetic_clips(out_dir, count: int = 6, seed: int = 0, speakers=("demo_speaker",),
                          languages=("auto",)) -> Path:
    """Write `count` short wavs, a reference clip per speaker, and a raw JSONL for prepare_codes.py.

    Returns the JSONL path. Clips use a mix of sample rates, as user data does.
    """
    out_dir = Path(out_dir)
    (out_dir / "wavs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rates = [24000, 16000, 44100]
    references = {}
    for index, speaker in enumerate(speakers):
        path = out_dir / "wavs" / f"ref_{speaker}.wav"
        sf.write(path, synthetic_voice(2.0, 24000, 110.0 + 60 * index, rng), 24000)
        references[speaker] = path
    rows = []
    for index in range(count):
        speaker = speakers[index % len(speakers)]
        rate = rates[index % len(rates)]
        seconds = float(rng.uniform(0.8, 1.6))
        path = out_dir / "wavs" / f"clip_{index:03d}.wav"
        sf.write(path, synthetic_voice(seconds, rate, 110.0 + 60 * speakers.index(speaker), rng), rate)
        rows.append(dict(
            audio=str(path.resolve()),
            text=DEMO_SENTENCES[index % len(DEMO_SENTENCES)],
            ref_audio=str(references[speaker].resolve()),
            speaker=speaker,
            language=languages[index % len(languages)],
        ))
    jsonl = out_dir / "raw.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return jsonl


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clips", type=int, default=0, help="also write this many synthetic clips beside it")
    args = parser.parse_args()
    model_dir = write_model_dir(args.out, args.size, args.seed)
    print(f"wrote {args.size} model to {model_dir}")
    if args.clips:
        jsonl = write_synthetic_clips(Path(args.out).parent / "clips", args.clips, args.seed)
        # Their sentences, one a line: what the demo asks the fine-tuned model to say (infer_test --text_file).
        texts = dict.fromkeys(json.loads(line)["text"] for line in jsonl.read_text().splitlines())
        (jsonl.parent / "sentences.txt").write_text("".join(text + "\n" for text in texts))
        print(f"wrote {args.clips} clips; raw JSONL at {jsonl}, their sentences in {jsonl.parent / 'sentences.txt'}")


if __name__ == "__main__":
    main()
