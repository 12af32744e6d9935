"""Checkpoints chosen by listening: what the trainer hears at its evaluations, and which one wins.

The loss says little about what users hear. At its listening steps (--eval_generate_steps, by
default every eval) the trainer speaks a few sentences in every new voice of the run, greedily, in
each text layout it trains, with the weights as they stand: the talker being trained and the run's
speaker vectors. listening.py measures them, as infer_test.py measures a saved checkpoint. The
measures go to the tracker (scalars and audio), to the log, and to one entry per evaluation in the
progress (saved with every checkpoint, so a resume keeps them), which scores.jsonl in the output
folder lists. --metric_for_best_model ranks the entries; the winner's checkpoint is kept by
--save_total_limit, and with --load_best_model_at_end it is the run's result, linked as best/.

Generation runs on the main process (the others wait), in inference mode, the model in eval mode
and put back in train mode, the random streams untouched (listening.speak_in_batches), torch.compile
set aside (eager), and no parameter replaced: CUDA graph replays read them in place.
"""

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qwen3_tts_sft import listening
from qwen3_tts_sft.audio import FRAMES_PER_SECOND, SpeakingRates, rate_group
from qwen3_tts_sft.listening import FLOOR_CHECKS, SCORING_SENTENCES, SpeakSettings, Thresholds
from qwen3_tts_sft.sequence_layout import NON_STREAMING

SCORES_FILE = "scores.jsonl"   # in --output_model_path: one line per evaluation, rewritten from the progress
BEST_LINK = "best"             # in --output_model_path, with --load_best_model_at_end: a link to the winner
# How --metric_for_best_model ranks: eval_loss lower, the others higher. The listening metrics have a
# hard floor: an evaluation where a sentence did not stop (or held NaN) ranks below every one where
# all stopped, whatever its value.
METRICS = {"eval_loss": "lowest", "speaker_similarity": "highest", "listening_score": "highest"}
LISTENING_METRICS = ("speaker_similarity", "listening_score")
GENERATE_BATCH = 16            # sentences spoken together: a default set in one batch, bounded for memory
CAP_MARGIN_SECONDS = 2.0       # the default frame cap's room beyond the slowest speech still judged natural


@dataclass
class Listener:
    """What the run speaks at each listening step, and how it judges it (main process only)."""

    tts: object            # the run's Qwen3TTSModel: its .model is the module in training (weights in place)
    prompter: object       # text -> prompt ids, as training tokenizes (training_data.make_prompter)
    items: dict            # {language: [(speaker, index, text)]}
    rates: dict            # the training data's speaking rates (SpeakingRates.rates())
    layouts: tuple         # the text layouts the run trains
    max_new_tokens: int    # frame cap; 0: frame_cap of each language's sentences
    transcribe: object     # (wav, sample_rate) -> text, or None (no CER)

    @property
    def sentences(self) -> int:
        return sum(len(items) for items in self.items.values()) * len(self.layouts)


def read_sentences(path) -> list:
    """--eval_sentences: one sentence a line (blank lines skipped); SystemExit naming the flag."""
    try:
        return listening.sentences_in_file(path)
    except ValueError as problem:
        raise SystemExit(f"error: --eval_sentences {path}: {problem}") from None


def make_listener(args, settings, tts, prompter, speaker_table, train_clips, device) -> Listener:
    """The run's Listener: each voice the run trains speaks --eval_sentences (else the built-in set
    of the language most of its training clips are in) in every trained layout."""
    own = read_sentences(args.eval_sentences) if args.eval_sentences else None
    rates = SpeakingRates()
    for clip in train_clips:
        rates.add(clip.text, clip.num_frames, clip.speaker, clip.language)
    items = items_to_speak(speaker_table, train_clips, own)
    tokenizer = tts.model.speech_tokenizer
    tokenizer.model.to(device).eval()  # the speech decoder, on the training device
    tokenizer.device = device
    transcribe = listening.speech_recognizer(args.asr_model, device) if args.asr_model else None
    return Listener(tts, prompter, items, rates.rates(), settings.layouts, args.eval_max_new_tokens, transcribe)


def items_to_speak(speaker_table: list, train_clips: list, own_sentences: list = None) -> dict:
    """{language: [(speaker, index, text)]}: the sentences each trained voice speaks at a listening step.

    Left out: a kept voice (watched by its replay loss, voices.py), and a voice only the eval data
    speaks: training never touches it, and as a run's score is its worst voice's, it would choose the
    best checkpoint by a voice the run does not train.
    """
    items = {}
    for speaker in speaker_table:
        languages = Counter(clip.language for clip in train_clips if clip.speaker == speaker.name)
        if speaker.kept or not languages:
            continue
        language = languages.most_common(1)[0][0]
        if own_sentences is None and language not in SCORING_SENTENCES:
            language = "auto"  # a dialect or another language without a built-in set
        texts = own_sentences or SCORING_SENTENCES[language]
        items.setdefault(language, []).extend((speaker.name, index, text) for index, text in enumerate(texts))
    return items


# ---------------------------------------------------------------------------------------------
# Listening
# ---------------------------------------------------------------------------------------------

def listen(run) -> tuple:
    """(entry, wavs): the measures of the run's weights as they stand, as a JSON-ready entry, and
    {(layout, speaker, index): (wav, sample_rate)}. Main process only."""
    listener, accelerator = run.listener, run.accelerator
    module = accelerator.unwrap_model(run.train_module)
    model = module.model
    started = time.perf_counter()
    with torch.no_grad():
        table_vectors = module.speaker_vectors().detach().float()
    vectors = {speaker.name: table_vectors[index] for index, speaker in enumerate(run.speaker_table)}
    encoder_rate = model.config.speaker_encoder_config.sample_rate
    generate = listening.vector_voice(listener.tts, vectors, listener.prompter)
    layouts, wavs = {}, {}
    was_training = model.training
    model.eval()  # the speaker encoder too: it measures similarity after generation
    try:
        # Eager: the compiled layers were traced for training shapes; generation would recompile them.
        with torch.compiler.set_stance("force_eager"), accelerator.autocast():
            for layout in listener.layouts:
                sentences, layout_wavs = [], []
                for language, items in listener.items.items():
                    cap = listener.max_new_tokens or frame_cap(items, listener.rates, language)
                    settings = SpeakSettings(language=language, non_streaming_mode=layout == NON_STREAMING,
                                             greedy=True, max_new_tokens=cap, batch_size=GENERATE_BATCH)
                    spoken, spoken_wavs = listening.speak_and_measure(
                        listener.tts, items, vectors, model.speaker_encoder, listener.rates, settings, generate,
                        encoder_rate)
                    sentences += spoken
                    layout_wavs += spoken_wavs
                if listener.transcribe is not None:
                    listening.add_transcripts(sentences, layout_wavs, listener.transcribe)
                layouts[layout] = listening.assess(sentences, listener.rates, Thresholds(), layout_wavs)
                for sentence, wav in zip(sentences, layout_wavs):
                    wavs[(layout, sentence["speaker"], sentence["index"])] = wav
    finally:
        model.train(was_training)
    return entry_of(layouts, time.perf_counter() - started), wavs


def frame_cap(items: list, rates: dict, language: str = None) -> int:
    """The default frame cap of (speaker, index, text) items: the longest text spoken by the slowest
    of their speakers at 1/max_sentence_rate_ratio of its training rate (slower fails that check
    anyway), plus CAP_MARGIN_SECONDS. It bounds what a model that never stops costs at each
    evaluation: a third of infer_test.py's cap (5 s + 0.5 s a character) for the built-in long lines.
    `language`: what they are spoken in; each text's rate is its rate group's (audio.rate_group)."""
    slowest = min(listening.training_rate_for(rates, name, rate_group(text, language)) or 0 for name, _, text in items)
    if not slowest:
        return listening.auto_frame_cap([text for _, _, text in items])
    longest = max(len(text) for _, _, text in items)
    return math.ceil(FRAMES_PER_SECOND * (CAP_MARGIN_SECONDS + Thresholds.max_sentence_rate_ratio * longest / slowest))


SENTENCE_FIELDS = ("speaker", "index", "text", "frames", "stopped", "seconds", "rms_dbfs", "silent_fraction",
                   "clipped_fraction", "rate_ratio", "speaker_similarity", "transcript", "cer")


def entry_of(layouts: dict, seconds: float) -> dict:
    """The JSON-ready measures of one listening step over all layouts: the worst layout's score and
    speaker similarity (a model is as good as its worst voice in its worst layout), whether every
    sentence passed the floor checks, and per layout the speakers, failures and sentences."""
    similarities = [s["speaker_similarity"] for heard in layouts.values() for s in heard.speakers]
    sentences = [s for heard in layouts.values() for s in heard.sentences]
    return dict(
        listening_score=min(heard.score for heard in layouts.values()),
        speaker_similarity=None if None in similarities else min(similarities),
        floors_passed=not any(f.check in FLOOR_CHECKS for heard in layouts.values() for f in heard.failures),
        stopped=sum(s["stopped"] for s in sentences), sentences=len(sentences),
        listen_seconds=seconds,
        layouts={layout: dict(
            score=heard.score,
            speakers=heard.speakers,
            failures=[f.check + (f" ({f.speaker} #{f.sentence})" if f.sentence is not None else f" ({f.speaker})")
                      for f in heard.failures],
            skipped=heard.skipped,
            sentences=[{key: s.get(key) for key in SENTENCE_FIELDS} for s in heard.sentences],
        ) for layout, heard in layouts.items()},
    )


def log_listening(run, entry: dict, wavs: dict) -> None:
    """The tracker's scalars and audio, and one log line with the time it took. Main process only."""
    step = run.progress.step
    values = {"listen/score": entry["listening_score"], "listen/stopped_fraction": entry["stopped"] / entry["sentences"],
              "listen/seconds": entry["listen_seconds"]}
    if entry["speaker_similarity"] is not None:
        values["listen/speaker_similarity"] = entry["speaker_similarity"]
    for layout, measured in entry["layouts"].items():
        for summary in measured["speakers"]:
            for key in ("score", "speaker_similarity", "rate_ratio", "cer"):
                if summary.get(key) is not None:
                    values[f"listen/{layout}/{summary['speaker']}/{key}"] = summary[key]
    run.accelerator.log(values, step=step)
    if run.args.report_to == "tensorboard":
        writer = run.accelerator.get_tracker("tensorboard", unwrap=True)
        for (layout, speaker, index), (wav, sample_rate) in wavs.items():
            samples = np.clip(np.nan_to_num(np.asarray(wav, dtype=np.float32)), -1, 1)
            writer.add_audio(f"listen/{layout}/{speaker}/{index}", torch.from_numpy(samples), step, sample_rate)
        writer.flush()
    rates = [s["rate_ratio"] for m in entry["layouts"].values() for s in m["speakers"] if s["rate_ratio"] is not None]
    similarity = entry["speaker_similarity"]
    failures = sorted({f for m in entry["layouts"].values() for f in m["failures"]})
    run.write_line(
        f"listen step {step}: score {entry['listening_score']:.3f}, speaker similarity "
        + ("-" if similarity is None else f"{similarity:.3f}")
        + f", stopped {entry['stopped']}/{entry['sentences']}"
        + (f", rate {min(rates):.2f}-{max(rates):.2f}x training" if rates else "")
        + (f"; failed: {', '.join(failures[:6])}" + (" ..." if len(failures) > 6 else "") if failures else "")
        + f" ({entry['sentences']} sentences in {len(entry['layouts'])} layout"
        + ("s" if len(entry["layouts"]) > 1 else "") + f", generated and measured in {entry['listen_seconds']:.1f} s)")


# ---------------------------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------------------------

def rank(entry: dict, metric: str):
    """A key to compare evaluations by `metric`, higher is better; None when the entry lacks it."""
    value = entry.get(metric)
    if value is None:
        return None
    if metric == "eval_loss":
        return (True, -value)
    # Equal listening measures (every evaluation at the floor of -1, say) are told apart by the
    # teacher-forced loss where there is one.
    eval_loss = entry.get("eval_loss")
    return (entry.get("floors_passed", True), value, -math.inf if eval_loss is None else -eval_loss)


def choose_best(evaluations: list, metric: str):
    """The winning evaluation entry (of equals, the one with the lower eval loss, then the earliest),
    or None when none measured `metric`."""
    best = None
    for entry in evaluations:
        key = rank(entry, metric)
        if key is not None and (best is None or key > rank(best, metric)):
            best = entry
    return best


def why_best(entry: dict, metric: str) -> str:
    text = f"{METRICS[metric]} {metric} ({entry[metric]:.4g})"
    if metric in LISTENING_METRICS:
        text += (" among the evaluations where every sentence stopped" if entry.get("floors_passed", True) else
                 "; no evaluation stopped on every sentence")
    return text


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def write_scores(output_dir: Path, evaluations: list) -> None:
    """scores.jsonl from the progress's evaluations, replaced whole: after a resume it holds the
    resumed checkpoint's history, not the evaluations of the steps that are trained again."""
    path = Path(output_dir) / SCORES_FILE
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in evaluations),
                       encoding="utf-8")
    os.replace(partial, path)


def read_scores(path) -> list:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def link_best(output_dir: Path, checkpoint_name: str) -> Path:
    """Point output/best at the winning checkpoint folder (a relative link, replaced atomically)."""
    link = Path(output_dir) / BEST_LINK
    partial = link.with_name("." + BEST_LINK + ".partial")
    if partial.is_symlink() or partial.exists():
        partial.unlink()
    os.symlink(checkpoint_name, partial, target_is_directory=True)
    os.replace(partial, link)
    return link


# ---------------------------------------------------------------------------------------------
# The table (the end-of-run summary and infer_test.py --compare)
# ---------------------------------------------------------------------------------------------

COLUMNS = [("step", ">6", "step", ""), ("eval loss", ">10", "eval_loss", ".4f"), ("score", ">7", "listening_score", ".3f"),
           ("similarity", ">11", "speaker_similarity", ".3f"), ("stopped", ">9", "stopped", ""),
           ("rate", ">11", "rate", ""), ("cer", ">6", "cer", ".0%"), ("seconds", ">8", "listen_seconds", ".1f")]


def checkpoint_label(output_dir: Path, name: str, branched_from: Path = None) -> str:
    """An evaluation's checkpoint as a table names it: marked when it lies in the folder a run branched off
    from (its history came with the resumed checkpoint), or when --save_total_limit removed it since."""
    if not name or (Path(output_dir) / name).is_dir():
        return name or ""
    if branched_from is not None and (Path(branched_from) / name).is_dir():
        return f"{name} (in {Path(branched_from).name}/)"
    return f"{name} (removed)"


def table_rows(entries: list, labels: list = None, winner=None) -> list:
    """One line a header, then one an entry (labelled, e.g. with its checkpoint; the winner starred)."""
    labels = labels or [entry.get("checkpoint") or "" for entry in entries]
    width = max([len(label) for label in labels] + [10])
    # Cells joined by a space: a value wider than its column (a rate of 10x and more) stays apart from the next.
    lines = ["  " + format("", f"<{width}") + " ".join(format(title, align) for title, align, _, _ in COLUMNS)]
    for entry, label in zip(entries, labels):
        speakers = [s for layout in (entry.get("layouts") or {}).values() for s in layout["speakers"]]
        rates = [s["rate_ratio"] for s in speakers if s.get("rate_ratio") is not None]
        cers = [s["cer"] for s in speakers if s.get("cer") is not None]
        shown = dict(entry, rate=f"{min(rates):.2f}-{max(rates):.2f}x" if rates else None,
                     cer=max(cers) if cers else None,
                     stopped=f"{entry['stopped']}/{entry['sentences']}" if entry.get("sentences") else None)
        cells = ["-" if shown.get(key) is None else format(shown[key], form) for _, _, key, form in COLUMNS]
        mark = "* " if entry is winner else "  "
        lines.append(mark + format(label, f"<{width}") + " ".join(format(c, a) for c, (_, a, _, _) in zip(cells, COLUMNS)))
    return lines
