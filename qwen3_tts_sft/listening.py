"""Listening measures: speak sentences with a model, measure what came out, and judge it.

The one home of these measures: infer_test.py calls it on a saved checkpoint, and the trainer
can call it on the weights as they stand. Per sentence: duration, finiteness, DC offset, RMS
level and silent fraction (both after the DC offset is removed), clipping, whether codec_eos came
before the frame cap, speaking rate against the training data's of the same rate group (the
language, else the script: audio.rate_group; none of that group: not checked), speaker similarity to the
speaker's vector, and the character error rate when a transcriber is given. Per speaker: the same
measures over all its sentences, the checks that fail, and one combined score.

    spoken = listen(tts, vectors, [("alice", "Hello there."), ("bob", "Hello there.")],
                    speaker_encoder, rates=training_rates)
    spoken.passed, spoken.score, spoken.speakers, spoken.failures, spoken.sentences

torch and qwen_tts are imported inside the functions that need them, so infer_test.py can read
its command line (and answer --help) without loading them.
"""

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen3_tts_sft import audio
from qwen3_tts_sft.audio import FRAMES_PER_SECOND, SpeakingRates
from qwen3_tts_sft.transcription import character_error_rate

SILENT_WINDOW_SECONDS = 0.05
SILENT_WINDOW_DBFS = -50.0   # a 50 ms window quieter than this is silence (pauses, not soft consonants)
DBFS_FLOOR = -120.0          # reported for digital silence instead of -inf
ALL_SPEAKERS = SpeakingRates.ALL  # key of the whole training set's rate
CHECKS = ["finite", "stop", "dc_offset", "rms", "silence", "clipping", "sentence_rate", "rate",
          "speaker_similarity", "cer"]
FLOOR_CHECKS = {"finite", "stop"}  # a sentence that fails one of these makes the speaker's score negative

# What the trainer speaks at its listening evaluations (scoring.py), per language: a very short line
# (where models fail to stop or stop at once), numbers, a question, and a long line (where speed
# drifts and speech runs away). Few on purpose: they are generated at every evaluation.
SCORING_SENTENCES = {
    "english": ["Yes.", "The train leaves at 7:45 from platform 12, and a ticket costs 23 dollars.",
                "Could you tell me where the nearest pharmacy is?",
                "When we finally reached the top of the hill, the whole valley lay below us in the evening light, "
                "and for a long moment nobody said a word."],
    "chinese": ["好的。", "火车7点45分从12号站台出发，票价是23元。", "请问最近的药店在哪里？",
                "当我们终于爬到山顶的时候，整个山谷都沉浸在傍晚的光线里，很长一段时间里没有人说一句话。"],
    "german": ["Ja.", "Der Zug fährt um 7:45 Uhr von Gleis 12 ab, und die Fahrkarte kostet 23 Euro.",
               "Können Sie mir sagen, wo die nächste Apotheke ist?",
               "Als wir endlich oben auf dem Hügel ankamen, lag das ganze Tal im Abendlicht unter uns, und eine "
               "lange Weile sagte niemand ein Wort."],
    "spanish": ["Sí.", "El tren sale a las 7:45 del andén 12, y el billete cuesta 23 euros.",
                "¿Podría decirme dónde está la farmacia más cercana?",
                "Cuando por fin llegamos a lo alto de la colina, todo el valle se extendía bajo nosotros con la luz "
                "de la tarde, y durante un largo rato nadie dijo una palabra."],
    "french": ["Oui.", "Le train part à 7 h 45 du quai 12, et le billet coûte 23 euros.",
               "Pourriez-vous me dire où se trouve la pharmacie la plus proche ?",
               "Quand nous sommes enfin arrivés en haut de la colline, toute la vallée s'étendait sous nous dans la "
               "lumière du soir, et pendant un long moment personne n'a dit un mot."],
    "italian": ["Sì.", "Il treno parte alle 7:45 dal binario 12, e il biglietto costa 23 euro.",
                "Potrebbe dirmi dov'è la farmacia più vicina?",
                "Quando finalmente arrivammo in cima alla collina, tutta la valle si stendeva sotto di noi nella luce "
                "della sera, e per un lungo momento nessuno disse una parola."],
    "portuguese": ["Sim.", "O trem sai às 7h45 da plataforma 12, e a passagem custa 23 reais.",
                   "Você poderia me dizer onde fica a farmácia mais próxima?",
                   "Quando finalmente chegamos ao topo da colina, todo o vale se estendia abaixo de nós na luz do fim "
                   "de tarde, e por um longo momento ninguém disse uma palavra."],
    "japanese": ["はい。", "電車は7時45分に12番線から出発し、切符は230円です。", "一番近い薬局はどこか教えていただけますか？",
                 "ようやく丘の頂上にたどり着いたとき、谷全体が夕方の光の中に広がっていて、しばらくの間、誰も一言も話しませんでした。"],
    "korean": ["네.", "기차는 7시 45분에 12번 승강장에서 출발하고, 표는 2300원입니다.",
               "가장 가까운 약국이 어디에 있는지 알려 주시겠어요?",
               "마침내 언덕 꼭대기에 올랐을 때 온 골짜기가 저녁 햇살 속에 우리 발아래 펼쳐져 있었고, 한참 동안 아무도 말을 하지 "
               "않았습니다."],
    "russian": ["Да.", "Поезд отправляется в 7:45 с платформы 12, а билет стоит 23 рубля.",
                "Не подскажете, где ближайшая аптека?",
                "Когда мы наконец поднялись на вершину холма, вся долина лежала под нами в вечернем свете, и долгое "
                "время никто не произносил ни слова."],
}
SCORING_SENTENCES["auto"] = SCORING_SENTENCES["english"]


@dataclass
class Thresholds:
    """Defaults are loose on purpose: each one flags a defect a listener hears, not a style."""

    min_rms_dbfs: float = -40.0            # speech sits near -30..-15 dBFS; 10 dB under quiet speech is broken
    max_silent_fraction: float = 0.5       # read speech pauses for well under half of a sentence
    max_clipped_fraction: float = 0.001    # 24 clipped samples a second at 24 kHz are already audible crackle
    max_dc_offset: float = audio.MAX_DC_OFFSET  # decoders centre on 0
    max_rate_ratio: float = 1.5            # sessions differ by 20-30% in rate; 2x is the "too fast/slow" complaint
    max_sentence_rate_ratio: float = 3.0   # one sentence is noisier (pauses, length); 3x is cut off or drawn out
    min_speaker_similarity: float = 0.5    # the usual same/different-speaker boundary for ECAPA x-vectors
    max_cer: float = 0.2                   # ASR of clean TTS speech is usually well under 10% CER


@dataclass
class Failure:
    check: str
    speaker: str
    sentence: int       # index in the speaker's sentences; None for a check of all the speaker's sentences
    value: float
    limit: float
    message: str


@dataclass
class SpeakSettings:
    """How the sentences are generated."""

    language: str = "auto"
    non_streaming_mode: bool = True   # generate_custom_voice's text layout (True: all the text before frame 0)
    greedy: bool = True               # no sampling: the same codes every run
    max_new_tokens: int = 0           # frame cap; 0: auto_frame_cap of each batch
    batch_size: int = 4               # sentences generated together
    seed: int = 0                     # for sampling; the caller's random state is left as it was


@dataclass
class Listening:
    """What listen() heard. `sentences` and `speakers` are JSON-ready dicts (see measure_sentence and
    summarize_speaker); `wavs` holds each sentence's (samples, sample_rate), in the same order."""

    sentences: list
    speakers: list
    failures: list
    skipped: dict            # check -> why it was not run
    score: float             # the worst speaker's score (see speaker_score)
    wavs: list = field(default_factory=list, repr=False)

    @property
    def passed(self) -> bool:
        return not self.failures

    def check_results(self) -> dict:
        """Every check in CHECKS: 'passed', 'failed' or 'skipped'."""
        failed = {failure.check for failure in self.failures}
        return {check: "skipped" if check in self.skipped else "failed" if check in failed else "passed"
                for check in CHECKS}


# ---------------------------------------------------------------------------------------------
# Measurements on arrays
# ---------------------------------------------------------------------------------------------

def sentences_in_file(path) -> list:
    """A file's sentences, one a line, blank lines skipped; ValueError saying what is wrong with it."""
    try:
        data = Path(path).read_bytes()
        # utf-8-sig: a byte-order mark (some Windows editors write one) is no part of the first sentence.
        lines = data.decode("utf-8-sig").splitlines()
    except OSError as error:
        raise ValueError(str(error)) from None
    except UnicodeDecodeError as error:  # the line to fix, and what the file should be
        line = data[:error.start].count(b"\n") + 1
        raise ValueError(f"line {line}: not UTF-8 ({error.reason} at byte {data[error.start]:#04x}); save the file "
                         f"as UTF-8") from None
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise ValueError("holds no sentences")
    return sentences


def dbfs(samples: np.ndarray) -> float:
    """audio.rms_dbfs, with DBFS_FLOOR for silence (a report holds no -inf)."""
    return max(DBFS_FLOOR, audio.rms_dbfs(samples))


def measure_waveform(wav: np.ndarray, sample_rate: int) -> dict:
    """Duration, finiteness, DC offset (the mean sample), RMS level and silent fraction (of 50 ms
    windows) of the audio with its DC offset removed, and clipped fraction (of the samples as they are).

    The offset is removed first because it carries no sound: audio that is mostly DC offset would
    otherwise read as loud and never silent."""
    finite = bool(np.isfinite(wav).all())
    samples = np.nan_to_num(np.asarray(wav, dtype=np.float64), nan=0.0, posinf=1.0, neginf=-1.0)
    dc_offset = float(samples.mean()) if len(samples) else 0.0
    centred = samples - dc_offset
    window = max(1, int(SILENT_WINDOW_SECONDS * sample_rate))
    count = len(centred) // window
    window_rms = np.sqrt((centred[:count * window].reshape(count, window) ** 2).mean(axis=1))
    silent = list(20 * np.log10(np.maximum(window_rms, 1e-12)) < SILENT_WINDOW_DBFS)
    return dict(
        seconds=len(samples) / sample_rate,
        finite=finite,
        dc_offset=dc_offset,
        rms_dbfs=dbfs(centred),
        silent_fraction=float(np.mean(silent)) if silent else 1.0,
        clipped_fraction=audio.clipped_fraction(samples),
    )


def stopped_before_cap(frames: int, max_new_tokens: int) -> bool:
    """Whether codec_eos came. qwen_tts expands a generated token into its 16 codes only when the
    token is fed back, so a run that never stops returns max_new_tokens - 1 frames."""
    return frames < max_new_tokens - 1


def auto_frame_cap(texts: list) -> int:
    """Default max_new_tokens: 5 s plus 0.5 s a character, several times any natural reading."""
    return math.ceil(FRAMES_PER_SECOND * (5 + max(len(text) for text in texts) / 2))


def finite_at_rate(wav: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """float32 samples at `target_rate`, NaN and infinities zeroed (models need finite input)."""
    samples = np.nan_to_num(np.asarray(wav, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return audio.resample(samples, sample_rate, target_rate)


def speaker_similarity(encoder, encoder_rate: int, wav: np.ndarray, sample_rate: int, vector):
    """Cosine between the speaker encoder's x-vector of `wav` and `vector` (a tensor); None when the
    audio is too short for one mel frame."""
    import torch
    from qwen3_tts_sft.speakers import MEL_SETTINGS, speaker_vectors, waveform_mel

    samples = finite_at_rate(wav, sample_rate, encoder_rate)
    if len(samples) < MEL_SETTINGS["n_fft"]:
        return None
    with torch.inference_mode():
        xvector = speaker_vectors(encoder, [[waveform_mel(samples, encoder_rate)]])[0]
    return float(torch.nn.functional.cosine_similarity(xvector.float().cpu().flatten(),
                                                       vector.float().cpu().flatten(), dim=0))


# ---------------------------------------------------------------------------------------------
# Sentences and speakers
# ---------------------------------------------------------------------------------------------

def rate_of(rates: dict, key: str, group: str):
    """The training rate (chars/s) of `key` (a speaker, or ALL_SPEAKERS) for a sentence of a rate group
    (audio.rate_group), from `rates` (SpeakingRates.rates()): of the group itself, else the mean over
    the groups of its script (rows named english, a sentence spoken as auto), else None: rates of
    another script differ (a Chinese character is read about 3x as slowly as an English letter).
    Rates that name no group (a data summary written before groups) hold for every group."""
    rates = rates or {}
    if set(rates) == {ALL_SPEAKERS}:
        return rates[ALL_SPEAKERS].get(key)
    if key in rates.get(group, {}):
        return rates[group][key]
    alike = [table[key] for name, table in rates.items() if name != ALL_SPEAKERS and key in table
             and audio.group_script(name) == audio.group_script(group)]
    return float(np.mean(alike)) if alike else None


def training_rate_for(rates: dict, name: str, group: str):
    """The speaker's own training rate for a sentence of the group (rate_of), else the whole training
    set's, else None."""
    own = rate_of(rates, name, group)
    return own if own is not None else rate_of(rates, ALL_SPEAKERS, group)


def unrated_group(rates: dict, group: str) -> str:
    """Why a sentence of `group` has no training rate to be held to, or None where it has one (or no
    rates were given: the rate checks are skipped as a whole then)."""
    if rates is None or rate_of(rates, ALL_SPEAKERS, group) is not None:
        return None
    trained = ", ".join(sorted(g for g in rates if g != ALL_SPEAKERS))
    return (f"the training data has no clips of {audio.describe_group(group)} (it has {trained}): characters per "
            f"second differ by script, so this text's rate cannot be compared with the training rate")


def measure_sentence(item, wav, sample_rate, frames, cap, rtf, training_rate) -> dict:
    """One sentence's measures: `item` is (speaker, index, text); frames is what generation
    returned under the cap; training_rate is chars/s or None."""
    name, index, text = item
    measured = measure_waveform(wav, sample_rate)
    rate = audio.spoken_characters(text) / measured["seconds"] if measured["seconds"] else None
    return dict(speaker=name, index=index, text=text, frames=frames, max_new_tokens=cap,
                stopped=stopped_before_cap(frames, cap), **measured, rtf=rtf, characters_per_second=rate,
                training_characters_per_second=training_rate,
                rate_ratio=rate / training_rate if rate and training_rate else None)


def mean_of(values) -> float:
    values = [value for value in values if value is not None]
    return float(np.mean(values)) if values else None


def summarize_speaker(name: str, sentences: list, rates: dict) -> dict:
    """A speaker's measures over its sentences: rate (total characters over total seconds) and its
    ratio to the training rate over the sentences of a rate group training had (rate_group: the
    sentence's, else the group of its text as auto), mean similarity (and the base model's, with the
    gain, where measured), mean CER."""
    characters = sum(audio.spoken_characters(s["text"]) for s in sentences)
    seconds = sum(s["seconds"] for s in sentences)
    rate = characters / seconds if seconds > 0 else None
    groups = [s.get("rate_group") or audio.rate_group(s["text"]) for s in sentences]
    rated = [(s, training) for s, group in zip(sentences, groups)
             if (training := training_rate_for(rates, name, group))]
    # Each sentence against its own group's training rate: the seconds the training pace would take.
    expected_seconds = sum(audio.spoken_characters(s["text"]) / training for s, training in rated)
    rated_seconds = sum(s["seconds"] for s, _ in rated)
    rated_characters = sum(audio.spoken_characters(s["text"]) for s, _ in rated)
    training_rate = rated_characters / expected_seconds if expected_seconds else None
    own = all(rate_of(rates, name, group) is not None for group in groups if rate_of(rates, ALL_SPEAKERS, group))
    similarity = mean_of(s["speaker_similarity"] for s in sentences)
    base_similarity = mean_of(s.get("base_speaker_similarity") for s in sentences)
    return dict(
        speaker=name, sentences=len(sentences), seconds=seconds, characters_per_second=rate,
        training_characters_per_second=training_rate,
        # A speaker without training rows (one the starting model had) is held to the whole set's rate.
        training_rate_of=None if training_rate is None else "speaker" if own else "all speakers",
        rate_ratio=expected_seconds / rated_seconds if expected_seconds and rated_seconds else None,
        rate_checked_sentences=len(rated),
        speaker_similarity=similarity, base_speaker_similarity=base_similarity,
        similarity_gain=similarity - base_similarity if None not in (similarity, base_similarity) else None,
        cer=mean_of(s.get("cer") for s in sentences),
    )


def sentence_failures(sentence: dict, limits: Thresholds) -> list:
    """Checks of one sentence: each is a defect a listener hears in that sentence alone."""
    def fail(check, value, limit, message):
        failures.append(Failure(check, sentence["speaker"], sentence["index"], value, limit, message))

    failures = []
    if not sentence["finite"]:
        fail("finite", False, True, "the audio holds NaN or infinite samples")
    if not sentence["stopped"]:
        fail("stop", sentence["frames"], sentence["max_new_tokens"],
             f"no codec_eos within max_new_tokens {sentence['max_new_tokens']}: generation ran to the cap "
             f"({sentence['frames']} frames, {sentence['seconds']:.1f} s)")
    if abs(sentence["dc_offset"]) > limits.max_dc_offset:
        fail("dc_offset", sentence["dc_offset"], limits.max_dc_offset,
             f"DC offset {sentence['dc_offset']:+.3f} (the mean sample) is beyond ±{limits.max_dc_offset:.3f}: "
             f"a click at the start and end; level and silence were measured with it removed")
    if sentence["rms_dbfs"] < limits.min_rms_dbfs:
        fail("rms", sentence["rms_dbfs"], limits.min_rms_dbfs,
             f"RMS {sentence['rms_dbfs']:.1f} dBFS is {limits.min_rms_dbfs - sentence['rms_dbfs']:.1f} dB "
             f"below the {limits.min_rms_dbfs:.1f} dBFS minimum")
    if sentence["silent_fraction"] > limits.max_silent_fraction:
        fail("silence", sentence["silent_fraction"], limits.max_silent_fraction,
             f"{sentence['silent_fraction']:.0%} of the audio is silent (limit {limits.max_silent_fraction:.0%})")
    if sentence["clipped_fraction"] > limits.max_clipped_fraction:
        fail("clipping", sentence["clipped_fraction"], limits.max_clipped_fraction,
             f"{sentence['clipped_fraction']:.2%} of samples are clipped (limit {limits.max_clipped_fraction:.2%})")
    ratio = sentence["rate_ratio"]
    if ratio is not None and not 1 / limits.max_sentence_rate_ratio <= ratio <= limits.max_sentence_rate_ratio:
        fail("sentence_rate", ratio, limits.max_sentence_rate_ratio,
             f"this sentence runs at {ratio:.2f}x the training rate (allowed {1 / limits.max_sentence_rate_ratio:.2f}x "
             f"to {limits.max_sentence_rate_ratio:.2f}x): cut short or drawn out")
    return failures


def speaker_failures(summary: dict, limits: Thresholds) -> list:
    """Checks of a speaker's sentences together: rate, similarity and CER are noisy per sentence."""
    def fail(check, value, limit, message):
        failures.append(Failure(check, summary["speaker"], None, value, limit, message))

    failures = []
    ratio = summary["rate_ratio"]
    if ratio is not None and not 1 / limits.max_rate_ratio <= ratio <= limits.max_rate_ratio:
        whose = (", the whole training set's: no rows of this speaker"
                 if summary.get("training_rate_of") == "all speakers" else "")
        fail("rate", ratio, limits.max_rate_ratio,
             # The rate of the sentences held to a training rate: those of a group training had.
             f"speaks {ratio:.2f}x the training rate ({ratio * summary['training_characters_per_second']:.1f} vs "
             f"{summary['training_characters_per_second']:.1f} chars/s{whose}; allowed "
             f"{1 / limits.max_rate_ratio:.2f}x to {limits.max_rate_ratio:.2f}x)")
    similarity = summary["speaker_similarity"]
    if similarity is None or not similarity >= limits.min_speaker_similarity:
        shown = "could not be measured" if similarity is None else f"{similarity:.3f}"
        fail("speaker_similarity", similarity, limits.min_speaker_similarity,
             f"speaker similarity {shown} is below the {limits.min_speaker_similarity:.2f} minimum")
    if summary["cer"] is not None and summary["cer"] > limits.max_cer:
        fail("cer", summary["cer"], limits.max_cer,
             f"character error rate {summary['cer']:.1%} is above the {limits.max_cer:.0%} limit")
    return failures


def speaker_score(summary: dict, sentence_failures_of_speaker: list) -> float:
    """One number to rank checkpoints by, higher is better.

    Hard floor: when any sentence did not stop or held NaN, the score is minus the share of the
    speaker's sentences that did so (-1: none stopped), so such a model never outranks one that
    stops on every sentence. Otherwise it is in [0, 1]: similarity (negative counted as 0) times
    pace (min(r, 1/r) of the speaking-rate ratio r) times (1 - CER) times the share of sentences
    that pass every sentence check; a factor that was not measured counts as 1 (similarity: as 0).
    """
    sentences = max(1, summary["sentences"])
    floored = {failure.sentence for failure in sentence_failures_of_speaker if failure.check in FLOOR_CHECKS}
    if floored:
        return -len(floored) / sentences
    ratio = summary["rate_ratio"]
    pace = min(ratio, 1 / ratio) if ratio else 1.0
    intelligibility = max(0.0, 1 - summary["cer"]) if summary["cer"] is not None else 1.0
    clean = 1 - len({failure.sentence for failure in sentence_failures_of_speaker}) / sentences
    return max(0.0, summary["speaker_similarity"] or 0.0) * pace * intelligibility * clean


def assess(sentences: list, rates: dict, limits: Thresholds, wavs: list = ()) -> Listening:
    """Judge measured sentences (from speak_and_measure, with `cer` where add_transcripts ran):
    every check, a summary and a score per speaker (in order of first appearance), and the overall
    score, the worst speaker's (a model is as good as its worst voice)."""
    failures, summaries = [], []
    for name in dict.fromkeys(s["speaker"] for s in sentences):
        own = [s for s in sentences if s["speaker"] == name]
        summary = summarize_speaker(name, own, rates)
        own_sentence_failures = [f for s in own for f in sentence_failures(s, limits)]
        summary["score"] = speaker_score(summary, own_sentence_failures)
        failures += own_sentence_failures + speaker_failures(summary, limits)
        summaries.append(summary)
    skipped = dict.fromkeys(["sentence_rate", "rate"], "no training rate given") if rates is None else {}
    unrated = [s["rate_not_checked"] for s in sentences if s.get("rate_not_checked")]
    if sentences and len(unrated) == len(sentences):  # else the sentences say which were left out
        skipped = dict.fromkeys(["sentence_rate", "rate"], "; ".join(dict.fromkeys(unrated)))
    if not any("cer" in s for s in sentences):
        skipped["cer"] = "no speech recognizer given"
    score = min((summary["score"] for summary in summaries), default=None)
    return Listening(sentences, summaries, failures, skipped, score, list(wavs))


# ---------------------------------------------------------------------------------------------
# Speaking
# ---------------------------------------------------------------------------------------------

def custom_voice(tts):
    """The default generate(texts, speakers, options) for speak_in_batches: each speaker by name
    (its spk_id in the model's config), as stock qwen_tts users call it."""
    def generate(texts, names, options):
        return tts.generate_custom_voice(texts, speaker=names, **options)
    return generate


def vector_voice(tts, vectors: dict, prompter):
    """A generate(texts, speakers, options) for speak_in_batches that puts vectors[speaker] in the
    speaker slot itself, for a model whose config does not name the speaker yet (a run in training):
    stock generate's x-vector-only voice prompt fills the very slot a spk_id row fills, so the
    talker sees what generate_custom_voice would show it once the vector is exported as that row.
    prompter: text -> prompt ids, tokenized as generate_custom_voice does (training_data.make_prompter)."""
    import torch

    model = tts.model

    def generate(texts, names, options):
        options = dict(options)
        language, non_streaming_mode = options.pop("language"), options.pop("non_streaming_mode")
        device = next(model.talker.parameters()).device
        prompt = dict(ref_code=None, ref_spk_embedding=[vectors[name] for name in names],
                      x_vector_only_mode=[True] * len(texts), icl_mode=[False] * len(texts))
        codes, _ = model.generate(input_ids=[torch.tensor([prompter(text)], device=device) for text in texts],
                                  voice_clone_prompt=prompt, languages=[language] * len(texts),
                                  non_streaming_mode=non_streaming_mode, **tts._merge_generate_kwargs(**options))
        return model.speech_tokenizer.decode([{"audio_codes": frames} for frames in codes])
    return generate


def speech_recognizer(path, device):
    """A transcriber (wav, sample_rate) -> text from a local transformers speech-recognition model."""
    from transformers import pipeline

    recognizer = pipeline("automatic-speech-recognition", model=str(path), device=device)
    rate = recognizer.feature_extractor.sampling_rate

    def transcribe(wav, sample_rate):
        samples = finite_at_rate(wav, sample_rate, rate)
        return recognizer({"raw": samples, "sampling_rate": rate})["text"].strip()
    return transcribe


def speak(tts, generate):
    """Run `generate()` (a generate_* call of `tts`); also return each sample's frame count, as
    handed to the speech decoder (generate() cuts each sample at codec_eos), and the seconds taken."""
    handed = []
    decoder = tts.model.speech_tokenizer
    decode = decoder.decode
    decoder.decode = lambda encoded: handed.extend(encoded) or decode(encoded)
    started = time.perf_counter()
    try:
        wavs, sample_rate = generate()
    finally:
        decoder.decode = decode
    return wavs, sample_rate, [len(item["audio_codes"]) for item in handed], time.perf_counter() - started


def speak_in_batches(tts, items: list, settings: SpeakSettings, generate=None) -> list:
    """[(item, wav, sample_rate, frames, max_new_tokens, rtf)] for each (speaker, index, text) item,
    settings.batch_size at a time, in inference mode with the model in eval mode (its mode and the
    caller's random state are restored afterwards). `generate(texts, speakers, options)` makes one
    batch; default: custom_voice(tts)."""
    import torch

    from qwen3_tts_sft.quiet import quiet_transformers

    generate = generate or custom_voice(tts)
    model = tts.model
    was_training = model.training
    spoken = []
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []), torch.inference_mode():
        torch.manual_seed(settings.seed)
        model.eval()
        try:
            for start in range(0, len(items), settings.batch_size):
                batch = items[start:start + settings.batch_size]
                cap = settings.max_new_tokens or auto_frame_cap([text for _, _, text in batch])
                options = dict(language=settings.language, non_streaming_mode=settings.non_streaming_mode,
                               max_new_tokens=cap)
                if settings.greedy:
                    # Temperature 1 changes nothing without sampling; the model's default (0.9) would
                    # make transformers print that the flag is ignored, on every call.
                    options.update(do_sample=False, subtalker_dosample=False, temperature=1.0, subtalker_temperature=1.0)
                texts, names = [text for _, _, text in batch], [name for name, _, _ in batch]
                with quiet_transformers():  # generate's notice of the pad id it picks, on every call
                    wavs, sample_rate, frames, seconds = speak(tts, lambda: generate(texts, names, options))
                rtf = seconds / max(sum(len(wav) for wav in wavs) / sample_rate, 1e-9)
                spoken += [(item, wav, sample_rate, count, cap, rtf) for item, wav, count in zip(batch, wavs, frames)]
        finally:
            model.train(was_training)
    return spoken


def numbered(items: list) -> list:
    """(speaker, text) items as (speaker, index, text): index counts each speaker's sentences from 0."""
    counts = {}
    numbered_items = []
    for name, text in items:
        numbered_items.append((name, counts.get(name, 0), text))
        counts[name] = counts.get(name, 0) + 1
    return numbered_items


def speak_and_measure(tts, items: list, vectors: dict, speaker_encoder, rates: dict = None,
                      settings: SpeakSettings = None, generate=None, encoder_rate: int = None):
    """Speak every (speaker, index, text) item and measure it (measure_sentence, plus
    speaker_similarity to vectors[speaker]). Returns (sentence dicts, [(wav, sample_rate)])."""
    settings = settings or SpeakSettings()
    encoder_rate = encoder_rate or tts.model.config.speaker_encoder_config.sample_rate
    sentences, wavs = [], []
    for item, wav, sample_rate, frames, cap, rtf in speak_in_batches(tts, items, settings, generate):
        name, _, text = item
        group = audio.rate_group(text, settings.language)
        sentence = measure_sentence(item, wav, sample_rate, frames, cap, rtf, training_rate_for(rates, name, group))
        sentence["rate_group"] = group
        if unrated_group(rates, group):
            sentence["rate_not_checked"] = unrated_group(rates, group)
        sentence["speaker_similarity"] = speaker_similarity(speaker_encoder, encoder_rate, wav, sample_rate,
                                                            vectors[name])
        sentences.append(sentence)
        wavs.append((wav, sample_rate))
    return sentences, wavs


def add_transcripts(sentences: list, wavs: list, transcribe) -> None:
    """Add `transcript` (transcribe(wav, sample_rate) -> text) and `cer` to each sentence."""
    for sentence, (wav, sample_rate) in zip(sentences, wavs):
        sentence["transcript"] = transcribe(wav, sample_rate)
        sentence["cer"] = character_error_rate(sentence["text"], sentence["transcript"])


def listen(tts, vectors: dict, items: list, speaker_encoder, rates: dict = None, limits: Thresholds = None,
           settings: SpeakSettings = None, transcribe=None, generate=None) -> Listening:
    """Speak (speaker, text) items with a loaded Qwen3TTSModel and judge what came out.

    tts: a qwen_tts Qwen3TTSModel (or anything with .model and the generate_* methods) whose
        config names every speaker of `items` in spk_id, unless `generate` says otherwise.
    vectors: {speaker: its reference vector (a tensor)}, for speaker similarity.
    items: [(speaker, text)]; speakers lower-cased, as the model's spk_id holds them.
    speaker_encoder: the Qwen3TTSSpeakerEncoder module (kept as it is; its sample rate is the model's).
    rates: the training data's speaking rates, SpeakingRates.rates(): {rate group: {speaker: chars/s,
        ALL_SPEAKERS: chars/s}}; None skips the rate checks; a sentence of a group training had no
        clips of is not rate-checked (its rate_not_checked says why).
    limits: Thresholds (default: Thresholds()); settings: SpeakSettings (default: greedy, batches of 4).
    transcribe: optional (wav, sample_rate) -> text, for the CER check.
    generate: optional generate(texts, speakers, options) -> (wavs, sample_rate); default custom_voice(tts).

    Generation runs in inference mode with the model in eval mode; the model's training mode and
    the caller's random state are restored. Returns a Listening: per-sentence dicts, per-speaker
    summaries (each with a score), failures, skipped checks, and the overall score.
    """
    sentences, wavs = speak_and_measure(tts, numbered(items), vectors, speaker_encoder, rates, settings, generate)
    if transcribe is not None:
        add_transcripts(sentences, wavs, transcribe)
    return assess(sentences, rates, limits or Thresholds(), wavs)
