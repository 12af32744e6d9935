"""Real recordings in, clean training data out: prepare_codes.py on a synthetic dataset with the
faults real ones have (a truncated file, long takes, padded silences, wrong transcripts, a low
sample rate, clipping, duplicates, lines that are not UTF-8), speech recognition with a tiny random
Whisper, reference checks and choice, the quality report, and the command line itself.

Most runs use --validate_only (no encoding); one encodes, on the tiny speech tokenizer."""

import contextlib
import hashlib
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import prepare_codes
from helpers import ROOT, read_jsonl
from qwen3_tts_sft import audio, data_report, voice_activity
from qwen3_tts_sft.data_report import ClipInfo, DatasetChecks
from qwen3_tts_sft.dataset_layouts import (AudioChecks, InputRow, Limits, PlannedClip, Processing, Reject, RowChecker,
                                           line_to_feed_again, read_input)
from recordings import cut_short, room_tone, speech, write, write_tiny_whisper

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "She sells sea shells by the sea shore today.",
             "How are you doing on this fine day, my friend?", "A fine voice should sound like its speaker.",
             "One, two, three, four, five, six and seven.", "Thank you very much for coming here tonight."]
RATE = 14.0  # characters per second the synthetic clips are made to speak at


def validate(input_path, output, *flags):
    return prepare_codes.main(["--input", *map(str, input_path if isinstance(input_path, list) else [input_path]),
                               "--output_jsonl", str(output), "--validate_only", "--num_workers", "0",
                               *map(str, flags)])


def rejects_of(output) -> dict:
    return {reject["source"].rsplit("/", 1)[-1]: reject for reject in read_jsonl(f"{output}.rejects.jsonl")}


def clips_of(output) -> dict:
    report = json.loads((output.parent / f"{output.name}.report.json").read_text())
    return {clip["source"].rsplit("/", 1)[-1]: clip for clip in report["clips_report"]}


# ---------------------------------------------------------------------------------------------
# A dataset with every fault, checked once (validate only)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def faulty_dataset(tmp_path_factory):
    """raw.jsonl: two speakers, six clips each at RATE, and the faults, line by line (see `lines`)."""
    folder = tmp_path_factory.mktemp("faulty")
    lines = []

    def row(name, samples, text, speaker, rate=24000, **extra):
        if samples is not None:
            write(folder / name, samples, rate)
        lines.append(json.dumps(dict(audio=name, text=text, speaker=speaker, **extra)))

    for speaker, pitch in (("anna", 210.0), ("bert", 110.0)):
        for index, text in enumerate(SENTENCES):  # lines 1-6 anna, 7-12 bert
            voice = speech(len(text) / RATE, pitch=pitch, seed=10 * index + len(speaker))
            if index == 0:  # 1.5 s of room tone before, 1.8 s after
                voice = np.concatenate([room_tone(1.5), voice, room_tone(1.8)])
            row(f"{speaker}_{index}.wav", voice, text, speaker)
    row("anna_0.wav", None, "The same audio again.", "anna")                                  # 13 duplicate audio
    row("retake.wav", speech(len(SENTENCES[1]) / RATE, pitch=210, seed=99), SENTENCES[1], "anna")  # 14 duplicate text
    row("wrong.wav", speech(4.0, pitch=210, seed=98), "How are you?", "anna")                    # 15 ~0.2x the rate
    row("loose.wav", speech(2.2, pitch=210, seed=97), SENTENCES[4] + " Again.", "anna")           # 16 ~1.7x the rate
    row("truncated.wav", speech(3.12, pitch=210, seed=96), "This file was cut short.", "anna")    # 17
    cut_short(folder / "truncated.wav", 0.4)
    take = np.concatenate([room_tone(0.5), speech(4, pitch=110, seed=5), room_tone(0.8), speech(5, pitch=110, seed=6),
                           room_tone(1.0), speech(6, pitch=110, seed=7), room_tone(0.7)])  # 24 s, pauses at 4.5, 10.3, 17.3 s
    write(folder / "take.wav", take)
    segments = [dict(start=0.3, end=4.7, text="w" * 56), dict(start=5.1, end=10.5, text="x" * 70),
                dict(start=11.1, end=17.5, text="y" * 84)]
    row("take.wav", None, "a transcript of the whole take", "bert", segments=segments)         # 18 aligned transcript
    row("take.wav", None, "a transcript of the whole take", "bert")                            # 19 too long, no way to cut
    row("narrow.wav", speech(3.0, rate=8000, pitch=110, seed=95), SENTENCES[2][:42], "bert", 8000)  # 20 low rate
    row("clipped.wav", np.clip(4 * speech(3.0, pitch=110, seed=94), -1, 1), SENTENCES[3][:42], "bert")  # 21
    row("quiet.wav", speech(3.0, pitch=110, seed=93, level=0.03), SENTENCES[4][:42], "bert")    # 22 -40 LUFS or so
    silent = write(folder / "silent_ref.wav", np.zeros(48000))
    row("bert_1.wav", None, SENTENCES[1], "bert", ref_audio=str(silent))                       # 23 silent reference
    raw = folder / "raw.jsonl"
    with open(raw, "wb") as out:
        out.write(("\n".join(lines) + "\n").encode())
        out.write(b'{"audio": "anna_1.wav", "text": "caf\xe9 in Latin-1", "speaker": "anna"}\n')  # 24 not UTF-8
        out.write(b'{"audio": "anna_2.wav", "text": "cut sh\n')                                 # 25 cut mid-JSON
        out.write((lines[2] + "\n").encode())                                                   # 26 fine again
    return raw


@pytest.fixture(scope="module")
def faulty_report(faulty_dataset, tmp_path_factory):
    output = tmp_path_factory.mktemp("faulty_out") / "train.jsonl"
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):  # where the rejects are printed; kept beside the output
        summary = validate(faulty_dataset, output, "--max_seconds", 15, "--max_segment_seconds", 10)
    (output.parent / "stderr.txt").write_text(printed.getvalue())
    return output, summary


def test_bad_lines_are_rejected_on_their_own_line_and_the_rest_kept(faulty_dataset, faulty_report):
    output, _ = faulty_report
    rejects, clips = rejects_of(output), clips_of(output)
    assert rejects["raw.jsonl:24"]["reason"] == "bad_row" and "not UTF-8" in rejects["raw.jsonl:24"]["problem"]
    assert rejects["raw.jsonl:24"]["field"] == "(encoding)"
    assert rejects["raw.jsonl:25"]["reason"] == "bad_row" and "not valid JSON" in rejects["raw.jsonl:25"]["problem"]
    assert "raw.jsonl:26" in rejects and rejects["raw.jsonl:26"]["reason"] == "duplicate_audio"  # read, a copy of 3
    assert "raw.jsonl:23" not in clips and "raw.jsonl:1" in clips


def test_truncated_file_is_rejected_not_kept_in_part(faulty_report):
    output, _ = faulty_report
    reject = rejects_of(output)["raw.jsonl:17"]
    assert reject["reason"] == "truncated_audio"
    assert "3.12 s" in reject["problem"] and "1.25 s" in reject["problem"]


def test_silence_at_the_edges_is_trimmed_to_the_padding(faulty_report):
    output, _ = faulty_report
    clips = clips_of(output)
    speech_seconds = len(SENTENCES[0]) / RATE
    padded = clips["raw.jsonl:1"]
    assert padded["trimmed_seconds"] == pytest.approx(1.5 + 1.8 - 2 * 0.2, abs=0.2)
    assert padded["seconds"] == pytest.approx(speech_seconds + 2 * 0.2, abs=0.2)
    assert clips["raw.jsonl:2"]["trimmed_seconds"] < 0.25  # no silence to speak of: left as it is


def test_long_take_with_an_aligned_transcript_becomes_its_segments(faulty_report):
    output, _ = faulty_report
    clips, rejects = clips_of(output), rejects_of(output)
    pieces = [clips[f"raw.jsonl:18#{k}"] for k in (1, 2, 3)]
    for piece, (start, end) in zip(pieces, ((0.5, 4.5), (5.3, 10.3), (11.3, 17.3))):
        # each segment trimmed to its speech (+0.2 s) and rounded up to whole frames
        assert piece["seconds"] == pytest.approx(end - start + 0.4, abs=0.25)
        assert piece["characters_per_second"] == pytest.approx(14, abs=2)
    too_long = rejects["raw.jsonl:19"]
    assert too_long["reason"] == "too_long"
    assert '"segments"' in too_long["problem"] and "--asr_model" in too_long["problem"]


def test_wrong_transcripts_are_rejected_and_doubtful_ones_flagged(faulty_report):
    output, _ = faulty_report
    clips, rejects = clips_of(output), rejects_of(output)
    assert rejects["raw.jsonl:15"]["reason"] == "speaking_rate"
    assert "the speaker's median" in rejects["raw.jsonl:15"]["problem"]
    # Rejected after every clip was read, yet printed with the rest, and given as a line to feed again.
    printed = (output.parent / "stderr.txt").read_text()
    assert "rejected: " in printed and f"{rejects['raw.jsonl:15']['source']}: text: " in printed
    fed_again = json.loads(rejects["raw.jsonl:15"]["input"])
    assert fed_again["audio"].endswith("wrong.wav") and fed_again["speaker"] == "anna"
    assert fed_again["text"] == "How are you?"
    assert 1.5 < clips["raw.jsonl:16"]["rate_ratio"] < 2.5 and "speaking_rate" in clips["raw.jsonl:16"]["flags"]
    assert not any(clips[f"raw.jsonl:{n}"]["flags"] for n in range(1, 13))  # the speakers' own clips


def test_a_transcript_no_one_could_say_in_its_clip_is_rejected_for_a_speaker_of_few_clips(tmp_path):
    """Too few clips for a median (MIN_CLIPS_FOR_MEDIAN), yet 380 characters in a second is no speech
    at all: rejected by the absolute bound, and left out of the speaker's rate that infer_test uses."""
    lines = []
    for name, seconds, text in (("one.wav", 3.0, SENTENCES[0]), ("two.wav", 3.0, SENTENCES[1]),
                                ("blurt.wav", 1.0, "x" * 380)):
        write(tmp_path / name, speech(seconds, seed=len(lines)))
        lines.append(json.dumps(dict(audio=name, text=text, speaker="cara")))
    raw = tmp_path / "raw.jsonl"
    raw.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out" / "train.jsonl"

    summary = validate(raw, output)

    reject = rejects_of(output)["raw.jsonl:3"]
    assert reject["reason"] == "speaking_rate" and reject["field"] == "text"
    assert re.search(r"blurt\.wav: 380 characters in 1\.\d\d s is \d{3}\.\d characters/s, beyond the 60 ", reject["problem"])
    assert summary["clips"] == 2 and summary["speakers"]["cara"]["characters_per_second"] < 20


def test_a_rejected_piece_of_a_take_is_fed_again_as_that_take_with_its_segment():
    piece = dict(audio="/data/take.wav", text="Heard text.", speaker="bert", language="english", text_from="asr",
                 segment=dict(start=5.1, end=10.5), source="raw.jsonl:18#2", quality=dict(frames=68),
                 flags=dict(speaking_rate="..."))
    assert json.loads(line_to_feed_again(piece)) == dict(
        audio="/data/take.wav", speaker="bert", language="english",
        segments=[dict(start=5.1, end=10.5, text="Heard text.")])


def test_low_rate_clipping_and_duplicates_are_named_per_clip(faulty_report):
    output, summary = faulty_report
    clips, rejects = clips_of(output), rejects_of(output)
    assert "8000 Hz" in clips["raw.jsonl:20"]["flags"]["low_sample_rate"]
    assert "full scale" in clips["raw.jsonl:21"]["flags"]["clipped"]
    assert rejects["raw.jsonl:13"]["reason"] == "duplicate_audio" and "raw.jsonl:1" in rejects["raw.jsonl:13"]["problem"]
    assert "and not this row's 'The same audio again.'" in rejects["raw.jsonl:13"]["problem"]  # which text was dropped
    assert "raw.jsonl:2" in clips["raw.jsonl:14"]["flags"]["duplicate_text"]
    assert summary["flagged_clips"]["low_sample_rate"] == 1 and summary["flagged_clips"]["clipped"] == 1
    assert rejects["raw.jsonl:23"]["reason"] == "bad_ref_audio" and "silent" in rejects["raw.jsonl:23"]["problem"]


def test_loudness_is_evened_out(faulty_report):
    output, _ = faulty_report
    clips = clips_of(output)
    quiet, normal = clips["raw.jsonl:22"], clips["raw.jsonl:2"]
    assert quiet["loudness_lufs"] < -35 and quiet["gain_db"] > 10
    for clip in (quiet, normal):
        assert clip["loudness_lufs"] + clip["gain_db"] == pytest.approx(-23.0, abs=0.05)
    clipped = clips["raw.jsonl:21"]  # peaks at full scale: held at -1 dBFS, short of the target
    assert clipped["gain_db"] <= -1.0 + 1e-6 and clipped["loudness_lufs"] + clipped["gain_db"] < -10


def test_references_are_each_speakers_cleanest_clips(faulty_report):
    output, _ = faulty_report
    report = json.loads(output.with_name("train.jsonl.report.json").read_text())
    for speaker in ("anna", "bert"):
        references = report["speakers"][speaker]["references"]
        assert len(references) == 4 and all(reference["clean"] for reference in references)
        names = [reference["source"].rsplit("/", 1)[-1] for reference in references]
        assert not {"raw.jsonl:1", "raw.jsonl:16", "raw.jsonl:20", "raw.jsonl:21"} & set(names)  # silence, flagged
        assert all(3.0 <= reference["seconds"] <= 10.0 for reference in references)


def test_report_has_every_clip_and_a_plot(faulty_report):
    output, summary = faulty_report
    report = json.loads(output.with_name("train.jsonl.report.json").read_text())
    assert summary["complete"] is False and not output.exists()  # validate only: no dataset written
    assert not output.with_name("train.jsonl.validate.partial").exists()
    assert len(report["clips_report"]) == report["clips"] == summary["clips"]
    for clip in report["clips_report"]:
        assert {"seconds", "characters_per_second", "rate_ratio", "loudness_lufs", "snr_db", "flags"} <= set(clip)
    anna = report["speakers"]["anna"]
    assert anna["seconds"]["min"] <= anna["seconds"]["median"] <= anna["seconds"]["max"]
    assert anna["characters_per_second"]["median"] == pytest.approx(RATE, abs=1.5)
    assert output.with_name("train.jsonl.report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Pieces on their own: reading lines, truncation, voice activity, loudness
# ---------------------------------------------------------------------------------------------

def test_reader_numbers_lines_as_an_editor_does(tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(b'{"audio": "a.wav",\r "text": "a lone CR is no line break"}\r\n'
                    b'\xff\xfe not text\n'
                    b'{"audio": "b.wav", "text": "th\n'
                    b'{"audio": "c.wav", "text": "four"}')
    items = list(read_input("jsonl", raw))
    assert [item.source for item in items] == [f"{raw}:{n}" for n in (1, 2, 3, 4)]
    assert [type(item).__name__ for item in items] == ["InputRow", "Reject", "Reject", "InputRow"]
    assert "byte 0xff at column 1" in items[1].problem
    clips = tmp_path / "clips"
    write(clips / "a.wav", speech(1.0))
    (clips / "a.txt").write_bytes(b"caf\xe9")
    [reject] = read_input("folder", clips)
    assert isinstance(reject, Reject) and "a.txt is not UTF-8" in reject.problem


@pytest.mark.parametrize("name, options", [
    ("clip.wav", dict(subtype="PCM_16")), ("clip.wav", dict(subtype="PCM_24")), ("clip.wav", dict(subtype="IMA_ADPCM")),
    ("clip.rf64", dict(format="RF64")), ("clip.w64", dict(format="W64")), ("clip.flac", {}), ("clip.ogg", {}),
    ("clip.opus", dict(format="OGG", subtype="OPUS")), ("clip.mp3", {}), ("clip.aiff", {}),
    ("clip.aiff", dict(subtype="IMA_ADPCM")), ("clip.au", {}), ("clip.au", dict(subtype="ULAW"))])
@pytest.mark.parametrize("keep", [0.4, 0.97])
def test_cut_files_are_found_out(tmp_path, name, options, keep, capfd):
    """Whatever the container: WAVs (ADPCM's frames come in blocks), the 64-bit WAVs (RF64, Wave64),
    AIFF (AIFF-C's ima4 counts packets of 64 frames) and AU, whose cut files libsndfile reads in part
    without a word, Ogg cut inside a page, and cut near the end as well as in the middle. Quietly: libmpg123's own
    notice about a cut MP3 would break the progress bar."""
    path = write(tmp_path / name, speech(3.12), **options)
    assert audio.decode(path, 24000).truncated is None
    cut_short(path, keep)
    if name.endswith(".flac"):  # libsndfile gives up on a cut FLAC: unreadable, rejected all the same
        with pytest.raises(RuntimeError, match="lost sync") as raised:
            audio.decode(path, 24000)
        assert "its header says 3.12 s: the file is cut short or damaged" in audio.unreadable(path, raised.value)
        return
    assert audio.probe(path)[1] is None
    assert audio.decode(path, 24000).truncated.startswith("truncated: ")
    assert audio.MPG123_SIZE_NOTICE not in capfd.readouterr().err


@pytest.mark.parametrize("name", ["whole.mp3", "whole.wav"])
def test_mp3s_joined_end_to_end_are_not_kept_in_part(tmp_path, name, capfd):
    """`cat part1.mp3 part2.mp3 > whole.mp3`: libmpg123 decodes only the first part's length, which
    its header gives, so the file is not read whole. Told by the format soundfile finds, not the name:
    the same bytes named .wav are rejected alike, and libmpg123's notice stays off the terminal on
    every path, the header check of a row as well as the decoding."""
    parts = [write(tmp_path / f"part{index}.mp3", speech(2.0, seed=index)).read_bytes() for index in range(2)]
    whole = tmp_path / name
    whole.write_bytes(b"".join(parts))
    assert audio.decode(tmp_path / "part0.mp3", 24000).truncated is None
    problem = audio.decode(whole, 24000).truncated
    assert problem is not None and "MP3s joined end to end?" in problem
    planned = RowChecker(Limits(0.5, 30)).check(InputRow(str(whole), dict(audio=str(whole), text="Two parts."), ""))
    checks = AudioChecks(Limits(0.5, 30), -50, 0.001, False, Processing(False, 0.2, 15, 0.4, None))
    [take] = checks.decode_take(planned, 24000)
    assert take.reject.reason == "truncated_audio" and "MP3s joined end to end?" in take.reject.problem
    assert audio.MPG123_SIZE_NOTICE not in capfd.readouterr().err


@pytest.mark.parametrize("name, options", [("whole.ogg", {}), ("whole.opus", dict(format="OGG", subtype="OPUS")),
                                           ("whole.flac", {}), ("whole.au", {})])
def test_files_joined_end_to_end_are_not_kept_in_part(tmp_path, name, options):
    """`cat part1.ogg part2.ogg > whole.ogg` (a chained Ogg), and FLAC or AU files joined so: libsndfile
    decodes the first part and says nothing of the rest, so the clip would keep 2 s of its 5 s and the
    whole transcript. Rejected as truncated_audio, naming what decodes; each part alone passes."""
    suffix = Path(name).suffix
    parts = [write(tmp_path / f"part{index}{suffix}", speech(seconds, seed=index), **options)
             for index, seconds in enumerate((2.0, 3.0))]
    assert all(audio.decode(part, 24000).truncated is None for part in parts)
    whole = tmp_path / name
    whole.write_bytes(b"".join(part.read_bytes() for part in parts))
    planned = RowChecker(Limits(0.5, 30)).check(InputRow(str(whole), dict(audio=str(whole), text="Two parts."), ""))
    checks = AudioChecks(Limits(0.5, 30), -50, 0.001, False, Processing(False, 0.2, 15, 0.4, None))
    [take] = checks.decode_take(planned, 24000)
    assert take.reject.reason == "truncated_audio"
    assert "only its 2.00 s decode" in take.reject.problem and "joined end to end?" in take.reject.problem


def test_an_ogg_cut_between_pages_or_inside_its_last_page_is_found_out(tmp_path):
    whole = write(tmp_path / "clip.ogg", speech(3.12)).read_bytes()
    pages = [index for index in range(len(whole)) if whole.startswith(b"OggS", index)]
    for cut in (pages[-1], pages[-1] + (len(whole) - pages[-1]) // 2):
        (tmp_path / "cut.ogg").write_bytes(whole[:cut])
        assert audio.decode(tmp_path / "cut.ogg", 24000).truncated.startswith("truncated: ")


def test_a_wav_its_recorder_never_finished_is_named_as_such(tmp_path):
    """Size fields left at 0 by a recorder that streams the audio and fills them in last: the audio is
    there but no tool can tell how much; rejected with the fix, not as an empty file."""
    path = write(tmp_path / "streamed.wav", speech(3.0), subtype="PCM_16")
    raw = bytearray(path.read_bytes())
    data = raw.index(b"data")
    raw[4:8] = raw[data + 4:data + 8] = b"\0\0\0\0"
    path.write_bytes(bytes(raw))
    seconds, (reason, problem) = audio.probe(path)
    assert seconds is None and reason == "unreadable_audio"
    assert f"but {3 * 24000 * 2} bytes of audio follow" in problem and "sox --ignore-length" in problem
    assert audio.probe(write(tmp_path / "empty.wav", np.zeros(0)))[1] == ("empty_audio", "holds no samples")


def test_voice_activity_finds_the_speech_and_the_pauses():
    rate = 24000
    padded = np.concatenate([room_tone(1.5), speech(2.0, seed=1), room_tone(2.0)])
    late = np.concatenate([room_tone(4.0), speech(1.0, seed=2), room_tone(4.0)])  # beyond the edge windows
    bounds = voice_activity.speech_bounds([padded, late, room_tone(3.0)], rate)
    assert bounds[0][0] / rate == pytest.approx(1.5, abs=0.1) and bounds[0][1] / rate == pytest.approx(3.5, abs=0.1)
    assert bounds[1][0] / rate == pytest.approx(4.0, abs=0.1) and bounds[1][1] / rate == pytest.approx(5.0, abs=0.1)
    assert bounds[2] is None
    take = np.concatenate([room_tone(0.5), speech(4, seed=3), room_tone(0.8), speech(5, seed=4), room_tone(0.2),
                           speech(4, seed=5), room_tone(1.0), speech(3, seed=6), room_tone(0.5)])
    def pieces(max_seconds):
        spans, cuts_in_speech = voice_activity.speech_pieces(take, rate, max_seconds, 0.4, 0.2)
        assert cuts_in_speech == []
        return np.array(spans) / rate

    # Cut at the 0.8 s and 1.0 s pauses, not at the 0.2 s one; each piece padded by 0.2 s.
    np.testing.assert_allclose(pieces(12.0), [(0.3, 4.7), (5.1, 14.7), (15.3, 18.7)], atol=0.15)
    # 9.6 s is too long for 8 s pieces: that one is cut at its longest inner pause.
    np.testing.assert_allclose(pieces(8.0), [(0.3, 4.7), (5.1, 10.4), (10.4, 14.7), (15.3, 18.7)], atol=0.15)


def test_a_long_take_without_pauses_is_cut_between_words():
    """Speech with no pause longer than 80 ms, 30 s of it, in pieces of at most 8 s: silero alone cut
    it at the limit, mid-word. Each cut falls where the take is quiet, in a gap between words."""
    rate, take = 24000, speech(30, seed=8)
    spans, cuts_in_speech = voice_activity.speech_pieces(take, rate, 8.0, 0.4, 0.2)
    assert cuts_in_speech == [] and len(spans) >= 4
    assert all(end - start <= 8 * rate for start, end in spans)
    speech_level = audio.rms_dbfs(take)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        for at in (end, start):  # 10 ms either side of each edge
            assert audio.rms_dbfs(take[at - 240:at + 240]) < speech_level - audio.SPEECH_BELOW_LOUDEST_DB, at / rate


def test_pieces_a_long_take_had_to_be_cut_inside_speech_are_rejected_naming_where(tmp_path, monkeypatch):
    """12 s the detector hears as speech throughout, under noise as loud as the voice (not a frame
    quieter than speech), to be cut into pieces of at most 5 s: no cut can fall between words, so
    each piece is rejected, saying where it was cut, rather than kept and transcribed."""
    rate = 24000
    voice = speech(12, seed=9) + (0.1 * np.random.default_rng(9).standard_normal(12 * rate)).astype(np.float32)
    path = write(tmp_path / "take.wav", np.concatenate([room_tone(1), voice, room_tone(1)]))

    def heard_as_speech_throughout(windows):  # the detector, sure of the voice under the noise
        seconds = np.arange(len(windows[0]) // voice_activity.WINDOW) * voice_activity.WINDOW / 16000
        return [np.where((seconds >= 1) & (seconds < 13), 0.95, 0.01)]

    monkeypatch.setattr(voice_activity, "speech_probabilities", heard_as_speech_throughout)
    checks = AudioChecks(Limits(0.5, 30), -50, 0.001, False, Processing(True, 0.2, 5, 0.4, None))
    [take] = checks.process([PlannedClip("take.wav", dict(audio=str(path)), "", 14.0)], rate, 1920)
    assert [piece.reject.reason if piece.reject else None for piece in take] == ["cut_in_speech"] * 3
    assert re.fullmatch(re.escape(f"{path} from ") + r"5\.\d\d s: it starts at 5\.\d\d s and ends at 10\.\d\d s, "
                        r"inside speech: the take has no pause there, nor any sound quieter than its speech, within "
                        r"--max_segment_seconds 5, so it was cut mid-word\. Give the take's \"segments\" \(start, end, "
                        r"text\), or a longer --max_segment_seconds", take[1].reject.problem)
    assert "starts at" not in take[0].reject.problem and "ends at" not in take[2].reject.problem


def test_trimming_cuts_only_quiet_sound():
    """A steady tone is loud, but no speech to the detector (it stops hearing it within a second
    or two): trimming leaves it whole and cuts only the room tone around it."""
    from qwen3_tts_sft.tiny_model import synthetic_voice

    tone = synthetic_voice(1.2, 24000, 140.0, np.random.default_rng(3))
    samples = np.concatenate([room_tone(0.15), tone, room_tone(0.15)])  # heard as one window
    checks = AudioChecks(Limits(0.5, 30), -50, 0.001, False, Processing(True, 0.05, 15, 0.4, None))
    [piece] = checks.pieces_of(PlannedClip("x", dict(audio="x.wav", text="t"), None, 1.5), samples,
                               samples[:, None], 24000, 24000)
    [bounds] = voice_activity.speech_bounds([piece.samples], 24000)
    assert bounds[1] / 24000 < 1.0  # the detector alone would cut the tone's end off
    checks.trim(piece, bounds, 24000)
    assert 1.2 <= len(piece.samples) / 24000 <= 1.2 + 2 * 0.05 + 0.03


def test_a_long_take_the_detector_mostly_misses_is_flagged_not_lost_quietly():
    """A long take is cut where the detector hears speech. Sound as loud as speech that no piece holds
    (a voice it does not take for speech, here a steady tone) is said on each piece; a take of
    speech and pauses is cut without that flag."""
    rate = 24000
    checks = AudioChecks(Limits(0.5, 30), -50, 0.001, False, Processing(True, 0.2, 15, 0.4, None))
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(20 * rate) / rate)).astype(np.float32)
    missed_take = np.concatenate([room_tone(0.5), speech(4, seed=3), room_tone(0.8), tone, room_tone(0.5)])
    spoken_take = np.concatenate([room_tone(0.5), speech(8, seed=3), room_tone(0.8), speech(9, seed=4),
                                  room_tone(1.0), speech(7, seed=6), room_tone(0.5)])
    for take, missed in ((missed_take, True), (spoken_take, False)):
        planned = PlannedClip("take.wav", dict(audio="take.wav"), None, len(take) / rate)  # no text: to be transcribed
        pieces = checks.pieces_of(planned, take, take[:, None], rate, rate)
        assert pieces and all(piece.source.startswith("take.wav#") for piece in pieces)
        flags = [piece.flags.get("speech_missed") for piece in pieces]
        if missed:
            left_out = float(re.search(r"([0-9.]+) s of sound as loud as speech", flags[0]).group(1))
            assert all(flag == flags[0] for flag in flags) and 12 < left_out <= 20.5 and '"segments"' in flags[0]
        else:
            assert flags == [None] * len(pieces)


def test_loudness_normalisation_reaches_the_target_and_never_clips():
    checks = AudioChecks(Limits(0.5, 30), -50, 0.001, False, Processing(False, 0.2, 15, 0.4, -23.0))
    quiet = speech(3.0, level=0.02)
    spiky = speech(3.0, level=0.05)
    spiky[30000] = 0.9  # one peak: reaching -23 LUFS would push it far past full scale
    for samples in (quiet, spiky):
        planned = PlannedClip("x", dict(audio="x.wav", text="t"), None, 3.0)
        [piece] = checks.pieces_of(planned, samples, samples[:, None], 24000, 24000)
        checks.finish(piece, 24000, 1920)
        peak = float(np.max(np.abs(piece.samples)))
        assert peak <= 10 ** (audio.PEAK_CEILING_DBFS / 20) + 1e-6
        loudness = audio.integrated_loudness(piece.samples[:len(samples)], 24000)
        if samples is quiet:
            assert loudness == pytest.approx(-23.0, abs=0.05)
        else:
            assert peak == pytest.approx(10 ** (audio.PEAK_CEILING_DBFS / 20), rel=1e-4) and loudness < -23


# ---------------------------------------------------------------------------------------------
# Encoding: segments, references written, the tokenizer path
# ---------------------------------------------------------------------------------------------

def test_model_folder_as_tokenizer_path_and_segment_references(tiny_model, tmp_path, capsys):
    data = tmp_path / "data"
    take = np.concatenate([room_tone(0.3), speech(3.5, seed=1), room_tone(0.8), speech(3.2, seed=2), room_tone(0.4)])
    write(data / "take.wav", take)
    segments = [dict(start=0.0, end=4.0, text="a" * 49), dict(start=4.3, end=8.2, text="b" * 45)]
    raw = data / "raw.jsonl"
    raw.write_text(json.dumps(dict(audio="take.wav", speaker="cleo", segments=segments)) + "\n")
    output = tmp_path / "out" / "train.jsonl"
    base = ["--input", str(raw), "--output_jsonl", str(output), "--device", "cpu", "--num_workers", "0"]

    not_a_tokenizer = tmp_path / "empty"
    not_a_tokenizer.mkdir()
    with pytest.raises(SystemExit, match="is not a speech tokenizer folder .*speech_tokenizer/"):
        prepare_codes.main(base + ["--tokenizer_model_path", str(not_a_tokenizer)])
    assert not output.parent.exists()  # nothing left to block the corrected command

    summary = prepare_codes.main(base + ["--tokenizer_model_path", str(tiny_model)])

    assert "is a model folder: using its speech tokenizer" in capsys.readouterr().out
    assert summary["settings"]["tokenizer_model_path"] == str(tiny_model / "speech_tokenizer")
    rows = read_jsonl(output)
    assert [row["source"] for row in rows] == [f"{raw}:1#1", f"{raw}:1#2"]
    assert [row["text"] for row in rows] == ["a" * 49, "b" * 45]
    for row, segment in zip(rows, segments):
        assert row["segment"] == dict(start=segment["start"], end=segment["end"])
        assert len(row["audio_codes"]) == row["quality"]["frames"] == math.ceil(row["quality"]["seconds"] * 12.5 - 1e-6)
    # The speaker has only pieces of a take: its references are those pieces, written out as encoded.
    references = {row["ref_audio"] for row in rows}
    assert len(references) == 2 and all(".references/cleo-" in path for path in references)
    lengths = sorted(len(audio.load_mono(path, 24000)) for path in references)
    assert lengths == pytest.approx(sorted(row["quality"]["seconds"] * 24000 for row in rows), abs=50)  # ms-rounded
    for path in references:
        assert audio.integrated_loudness(audio.load_mono(path, 24000), 24000) == pytest.approx(-23.0, abs=0.3)


def test_speakers_whose_names_clean_up_alike_keep_their_own_references(tiny_model, tmp_path):
    """"x y" and "x_y" are two voices: each one's written references are its own pieces, in files
    of its own, named the same way on every run."""
    data = tmp_path / "data"
    lines = []
    for seed, speaker in ((1, "x y"), (2, "x_y")):
        take = np.concatenate([speech(1.8, seed=seed), room_tone(0.6), speech(1.8, seed=seed + 10)])
        write(data / f"take{seed}.wav", take)
        segments = [dict(start=0.0, end=1.9, text="a" * 25), dict(start=2.3, end=4.2, text="b" * 25)]
        lines.append(json.dumps(dict(audio=f"take{seed}.wav", speaker=speaker, segments=segments)))
    raw = data / "raw.jsonl"
    raw.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out" / "train.jsonl"
    prepare_codes.main(["--input", str(raw), "--output_jsonl", str(output), "--device", "cpu", "--num_workers", "0",
                        "--tokenizer_model_path", str(tiny_model)])

    references = {}
    for row in read_jsonl(output):
        references.setdefault(row["speaker"], set()).add(row["ref_audio"])
    assert len(references["x y"]) == len(references["x_y"]) == 2 and not references["x y"] & references["x_y"]
    assert len(list(output.with_name("train.jsonl.references").iterdir())) == 4
    report = json.loads(output.with_name("train.jsonl.report.json").read_text())
    for speaker, line in (("x y", 1), ("x_y", 2)):  # each speaker's references come from its own take
        assert {reference["source"].rsplit("#", 1)[0] for reference in report["speakers"][speaker]["references"]} \
            == {f"{raw}:{line}"}
    assert data_report.reference_name("x_y") == "x_y"
    assert data_report.reference_name("x y") == "x_y-" + hashlib.sha1(b"x y").hexdigest()[:8]


def encode_one(tiny_model, folder, samples, speaker: str, text: str) -> dict:
    """prepare_codes.py on one recording of `speaker`; its output row."""
    raw = folder / "data" / "raw.jsonl"
    write(raw.with_name("clip.wav"), samples)
    raw.write_text(json.dumps(dict(audio="clip.wav", speaker=speaker, text=text)) + "\n")
    output = folder / "out" / "train.jsonl"
    prepare_codes.main(["--input", str(raw), "--output_jsonl", str(output), "--device", "cpu", "--num_workers", "0",
                        "--tokenizer_model_path", str(tiny_model)])
    row, = read_jsonl(output)
    return row


def test_a_reference_with_long_silences_is_written_trimmed(tiny_model, tmp_path):
    """The trainer reads a reference file whole: a chosen clip that lost seconds of edge silence to
    trimming is written out as it was encoded, not named as its silent original."""
    padded = np.concatenate([room_tone(3.0), speech(3.5, seed=3), room_tone(4.0)])
    row = encode_one(tiny_model, tmp_path, padded, "dora", "d" * 49)
    assert row["quality"]["trimmed_seconds"] > 6 and ".references/dora-1" in row["ref_audio"]
    assert len(audio.load_mono(row["ref_audio"], 24000)) == pytest.approx(row["quality"]["seconds"] * 24000, abs=50)


def test_a_recording_with_a_dc_offset_is_removed_trimmed_and_flagged(tiny_model, tmp_path):
    """A mean sample of +0.3 (a faulty interface) holds no sound: left in, it would hide the edge
    silence from trimming and teach the model a click. It is removed, the clip trimmed and flagged."""
    offset = np.concatenate([room_tone(2.0), speech(3.0, seed=4), room_tone(2.0)]) + 0.3
    row = encode_one(tiny_model, tmp_path, offset, "emil", "e" * 42)
    assert re.search(r"mean sample was \+0\.3\d\d of full scale", row["flags"]["dc_offset"])
    assert row["quality"]["trimmed_seconds"] > 3


# ---------------------------------------------------------------------------------------------
# Reference clips, inputs, speech recognition, the command line
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, message", [("silent", "silent"), ("long", "longer than --max_seconds"),
                                           ("narrow", "8000 Hz"), ("short", "shorter than --min_seconds")])
def test_ref_audio_is_checked_like_a_training_clip(tmp_path, kind, message):
    samples = dict(silent=(np.zeros(72000), 24000), long=(speech(44.0), 24000), narrow=(speech(4.0, rate=8000), 8000),
                   short=(speech(0.3), 24000))[kind]
    ref = write(tmp_path / f"{kind}.wav", *samples)
    write(tmp_path / "clip.wav", speech(2.0))
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps(dict(audio="clip.wav", text="A sentence.")) + "\n")
    with pytest.raises(SystemExit, match=f"--ref_audio {ref}: .*{message}"):
        validate(raw, tmp_path / "out.jsonl", "--ref_audio", ref)


def test_metadata_csv_beside_its_clips_and_several_inputs(tmp_path):
    ljs, folder = tmp_path / "ljs", tmp_path / "folder"
    for index in range(2):
        write(ljs / f"LJ{index}.wav", speech(2.0, seed=index))
        write(folder / f"take_{index}.flac", speech(2.0, seed=10 + index))
        (folder / f"take_{index}.txt").write_text(SENTENCES[index][:28])
    (ljs / "metadata.csv").write_text("".join(f"LJ{index}|{SENTENCES[index][:28]}\n" for index in range(2)))

    summary = validate([ljs, folder], tmp_path / "out.jsonl")
    assert summary["clips"] == 4 and summary["rejected"] == 0
    assert summary["settings"]["layout"] == ["ljspeech", "folder"]

    empty = tmp_path / "elsewhere"
    empty.mkdir()
    (empty / "metadata.csv").write_text("LJ0|Its clip is not here.\n")
    with pytest.raises(SystemExit, match="no usable clips") as stopped:
        validate(empty, tmp_path / "none.jsonl")
    assert stopped.value.code != 0
    assert rejects_of(tmp_path / "none.jsonl")["metadata.csv:1"]["reason"] == "missing_audio"


def test_a_speaker_or_language_flag_that_rows_override_is_pointed_out(tmp_path, capsys):
    rows = [dict(audio=str(write(tmp_path / f"c{index}.wav", speech(2.0, seed=index))), text=SENTENCES[index][:28],
                 speaker="anna", **({"language": "german"} if index else {})) for index in range(2)]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(row) + "\n" for row in rows))
    validate(raw, tmp_path / "out" / "train.jsonl", "--speaker", "bob", "--language", "english")
    out = capsys.readouterr().out
    assert "note: 2 rows name their own speaker, which --speaker bob does not replace" in out
    assert "note: 1 rows name their own language, which --language english does not replace" in out


def test_speech_recognition_transcribes_cuts_and_checks(tmp_path):
    whisper = write_tiny_whisper(tmp_path / "whisper")
    clips = tmp_path / "clips"
    write(clips / "untranscribed.wav", speech(2.0, seed=1))
    write(clips / "transcribed.wav", speech(2.5, seed=2))
    (clips / "transcribed.txt").write_text("Known text here.")
    take = np.concatenate([room_tone(0.5), speech(6, seed=5), room_tone(0.8), speech(7, seed=6), room_tone(0.5)])
    write(clips / "take.wav", take)
    output = tmp_path / "out.jsonl"

    without = validate(clips, tmp_path / "no_asr.jsonl", "--max_segment_seconds", 8)
    assert without["clips"] == 1 and without["rejects_by_reason"]["missing_transcript"] == 2
    assert "--asr_model" in rejects_of(tmp_path / "no_asr.jsonl")["take.wav"]["problem"]

    # A random model says nonsense: the rate checks would reject it all, so they are off here.
    summary = validate(clips, output, "--asr_model", whisper, "--asr_check", "--max_segment_seconds", 8,
                       "--flag_rate_ratio", 100, "--reject_rate_ratio", 100)

    report = clips_of(output)
    assert set(report) == {"untranscribed.wav", "transcribed.wav", "take.wav#1", "take.wav#2"}
    for name in ("untranscribed.wav", "take.wav#1", "take.wav#2"):
        assert report[name]["text_from"] == "asr" and report[name]["cer"] is None
    assert report["transcribed.wav"]["text_from"] is None and 0 <= report["transcribed.wav"]["cer"]
    assert "transcript_mismatch" in report["transcribed.wav"]["flags"]  # nonsense against the real text
    assert summary["transcribed_clips"] == 3 and summary["settings"]["asr_model"] == str(whisper)


def test_a_folder_that_is_not_a_speech_recogniser_is_refused_before_any_work(tiny_model, tmp_path, capsys):
    """The Qwen3-TTS model or its speech tokenizer passed as --asr_model (both have a config.json and a
    preprocessor_config.json) is named with what it is, before a row is read: not a transformers
    traceback once every recording is decoded."""
    write(tmp_path / "clips" / "a.wav", speech(2.0, seed=1))
    for folder in (tiny_model, tiny_model / "speech_tokenizer"):
        with pytest.raises(SystemExit):
            validate(tmp_path / "clips", tmp_path / "out.jsonl", "--asr_model", folder)
        error = capsys.readouterr().err
        assert f"--asr_model {folder}: a 'qwen3_tts" in error and "not a speech-recognition one" in error
    assert not (tmp_path / "out.jsonl.rejects.jsonl").exists()


def test_max_cer_without_asr_check_is_refused_rather_than_ignored(tmp_path, capsys):
    """--max_cer limits --asr_check's comparison: without it no clip would be held to the limit given."""
    whisper = write_tiny_whisper(tmp_path / "whisper")
    write(tmp_path / "clips" / "a.wav", speech(2.0, seed=1))
    (tmp_path / "clips" / "a.txt").write_text("Some words.")
    for flags in (["--max_cer", "0.1"], ["--asr_model", whisper, "--max_cer", "0.1"]):
        with pytest.raises(SystemExit):
            validate(tmp_path / "clips", tmp_path / "out.jsonl", *flags)
        assert "--max_cer is the limit of --asr_check" in capsys.readouterr().err


def test_help_imports_no_torch_and_shows_every_default():
    check = ("import runpy, sys; sys.argv = ['prepare_codes.py', '--help']\n"
             "try:\n    runpy.run_path('prepare_codes.py', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "heavy = [name for name in ('torch', 'transformers', 'qwen_tts') if name in sys.modules]\n"
             "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--validate_only" in result.stdout and "--asr_model" in result.stdout
    for action in prepare_codes.build_parser()._actions:
        if action.option_strings != ["-h", "--help"]:
            assert "default" in action.help, action.option_strings


def test_row_checker_plans_long_takes_only_when_they_can_be_cut(tmp_path):
    write(tmp_path / "take.wav", speech(40.0))
    row = dict(audio=str(tmp_path / "take.wav"), text="Forty seconds of it.")
    item = InputRow("raw.jsonl:1", row, "")
    assert RowChecker(Limits(0.5, 30)).check(item).reason == "too_long"
    assert isinstance(RowChecker(Limits(0.5, 30), transcribe=True).check(item), PlannedClip)
    with_segments = InputRow("raw.jsonl:2", dict(row, segments=[dict(start=1, end=5, text="Some.")]), "")
    assert isinstance(RowChecker(Limits(0.5, 30)).check(with_segments), PlannedClip)
    beyond = InputRow("raw.jsonl:3", dict(row, segments=[dict(start=38, end=45, text="Past the end.")]), "")
    assert "after the audio's end" in RowChecker(Limits(0.5, 30)).check(beyond).problem


def test_a_segment_that_holds_no_voice_is_rejected_even_when_its_take_has_one(tmp_path):
    """The level check of a whole take passes on its speech; a segment laid over a pause is room
    tone, and kept it would be boosted by tens of dB and trained on as speech."""
    path = write(tmp_path / "take.wav", np.concatenate([speech(5, seed=1), room_tone(4, seed=2), speech(5, seed=3)]))
    segments = [dict(start=0, end=5, text="Speech one."), dict(start=5.2, end=8.8, text="Only room tone."),
                dict(start=9, end=14, text="Speech two.")]
    clip = PlannedClip("raw.jsonl:1", dict(audio=str(path)), "", 14.0, segments)
    checks = AudioChecks(Limits(0.5, 30), -50, 0.001, False, Processing(False, 0.1, 15, 0.4, -23.0))
    [take] = checks.process([clip], 24000, 1920)
    assert [piece.reject.reason if piece.reject else None for piece in take] == [None, "silent", None]
    assert f"{path} from 5.20 s: level" in take[1].reject.problem
    # Fed again, the line makes that one segment, not the whole take with the two kept ones.
    assert json.loads(take[1].reject.input) == dict(audio=str(path), segments=[
        dict(start=5.2, end=8.8, text="Only room tone.")])


def test_speech_recorded_at_low_gain_is_told_apart_from_room_noise(tmp_path):
    """Both at -60 dBFS, both below --silence_dbfs -50: clean speech, its loud parts well above its noise
    floor, is named as speech recorded at low gain, with the --silence_dbfs that keeps it; room noise
    is only said to be below it."""
    def at_level(samples, dbfs):
        return (samples * 10 ** (dbfs / 20) / np.sqrt(np.mean(np.square(samples)))).astype(np.float32)

    quiet_speech = write(tmp_path / "quiet_speech.wav", at_level(speech(3, seed=11), -60), subtype="PCM_24")
    room = write(tmp_path / "room.wav", at_level(room_tone(3, seed=12), -60), subtype="PCM_24")

    def decoded(path, silence_dbfs):
        checks = AudioChecks(Limits(0.5, 30), silence_dbfs, 0.001, False, Processing(False, 0.1, 15, 0.4, None))
        [piece] = checks.decode_take(PlannedClip("raw.jsonl:1", dict(audio=str(path), text="t"), "", 3.0), 24000)
        return piece

    speech_reject, noise_reject = decoded(quiet_speech, -50).reject, decoded(room, -50).reject
    assert speech_reject.reason == noise_reject.reason == "silent"
    level, advice = speech_reject.problem.split(", but ")
    assert level == noise_reject.problem.replace(str(room), str(quiet_speech))
    assert re.fullmatch(r"its loud parts stand [2-4]\d dB above its noise floor: it looks like speech recorded at low "
                        r"gain, not room noise\. Lower --silence_dbfs \(e\.g\. -70\) to keep it", advice)
    assert noise_reject.problem == f"{room}: level -60.0 dBFS is below --silence_dbfs -50"
    assert decoded(quiet_speech, -70).reject is None


def noise(seconds: float, dbfs: float, seed: int) -> np.ndarray:
    """White noise at an RMS level of `dbfs`, as a microphone's preamp adds it."""
    return (10 ** (dbfs / 20) * np.random.default_rng(seed).standard_normal(int(seconds * 24000))).astype(np.float32)


@pytest.mark.parametrize("name, cancel", [("inverted", True), ("inverted, each channel with its noise", True),
                                          ("inverted, one channel lower", True), ("the same in both", False),
                                          ("one channel lower", False), ("independent channels", False),
                                          ("one channel silent", False), ("5.1, the voice in the centre", False)])
def test_channels_that_cancel_when_mixed_to_mono_are_named_whatever_is_left(tmp_path, name, cancel):
    """One channel the other inverted: the voice cancels in the mono mix. What is left, each channel's
    own noise, is loud enough to pass for a clip (it would be boosted 20 dB and kept), so the file is
    rejected by how far the mix falls below its channels, not by its level. Stereo as recorded (one
    voice in both, two voices, one channel silent) and a voice in one channel of six mix as they are."""
    voice, other = speech(3, seed=4), speech(3, seed=5, pitch=200)
    silent = np.zeros_like(voice)
    channels = {"inverted": [voice, -voice],
                "inverted, each channel with its noise": [voice + noise(3, -45, 1), -voice + noise(3, -45, 2)],
                "inverted, one channel lower": [voice, -0.9 * voice],
                "the same in both": [voice, voice], "one channel lower": [voice, 0.3 * voice],
                "independent channels": [voice, other], "one channel silent": [voice, silent],
                "5.1, the voice in the centre": [silent, silent, voice, silent, silent, silent]}[name]
    path = write(tmp_path / "take.wav", np.stack(channels, axis=1))
    checks = AudioChecks(Limits(0.5, 30), -50, 0.001, False, Processing(False, 0.1, 15, 0.4, None))
    [piece] = checks.decode_take(PlannedClip("raw.jsonl:1", dict(audio=str(path), text="t"), "", 3.0), 24000)
    problem = audio.reference_problem(path, 24000)
    if cancel:
        assert piece.reject.reason == "channels_cancel" and "cancel when mixed to mono" in piece.reject.problem
        assert "Re-save it with one channel" in piece.reject.problem
        assert piece.reject.problem == f"{path}: {problem}"  # a reference clip is refused alike
    else:
        assert piece.reject is None and problem is None


def test_rows_and_transcripts_that_do_not_say_what_they_mean_are_named(tmp_path):
    (tmp_path / "folder.wav").mkdir()
    checker = RowChecker(Limits(0.5, 30))
    assert checker.check(InputRow("raw.jsonl:1", dict(audio=123, text="t"), "")).problem.startswith("is not a string")
    reject = checker.check(InputRow("raw.jsonl:1", dict(audio="a.wav", text="t", speaker=1088), ""))
    assert (reject.field, reject.problem) == ("speaker", 'is the number 1088, not a name: write it as a string ("1088")')
    reject = checker.check(InputRow("raw.jsonl:2", dict(audio=str(tmp_path / "folder.wav"), text="t"), ""))
    assert "is a folder, not an audio file" in reject.problem
    clips = tmp_path / "clips"
    write(clips / "a.wav", speech(1.0))
    (clips / "a.txt").write_text("What was said.")
    (clips / "a.lab").write_text("Something else.")
    [reject] = read_input("folder", clips)
    assert isinstance(reject, Reject) and "its transcripts differ" in reject.problem
    (clips / "a.lab").write_text("What  was said.\n")  # the same words: no conflict
    [row] = read_input("folder", clips)
    assert row.row["text"] == "What was said."


def test_folder_layout_reads_links_cases_and_names_what_it_cannot_decode(tmp_path):
    """A data set built from symbolic links, transcripts named with any case, formats soundfile reads
    beyond WAV and FLAC; audio it cannot decode is named, not passed over; macOS ._ files are skipped."""
    pool, clips = tmp_path / "pool", tmp_path / "clips"
    write(pool / "aaa.wav", speech(1.0, seed=1))
    (pool / "aaa.txt").write_text("The pool's own text, for something else.")
    clips.mkdir()
    (clips / "take1.wav").symlink_to(pool / "aaa.wav")
    (clips / "take1.txt").write_text("The take's text.")
    write(clips / "Upper.WAV", speech(1.0, seed=2))
    (clips / "Upper.Txt").write_text("Mixed-case transcript.")
    write(clips / "apple.caf", speech(1.0, seed=3), format="CAF")
    (clips / "apple.txt").write_text("From a CAF file.")
    (clips / "phone.m4a").write_bytes(b"\0\0\0\x20ftypM4A ")
    (clips / "phone.txt").write_text("Not decodable here.")
    (clips / "._Upper.WAV").write_bytes(b"\0\x05\x16\x07")
    (clips / "gone.wav").symlink_to(tmp_path / "deleted.wav")
    (clips / "gone.txt").write_text("Its file was deleted.")

    rows = {Path(item.source).name: item for item in read_input("folder", clips)}

    assert set(rows) == {"take1.wav", "Upper.WAV", "apple.caf", "phone.m4a", "gone.wav"}
    assert rows["take1.wav"].row == dict(audio=str(clips / "take1.wav"), text="The take's text.")
    assert rows["Upper.WAV"].row["text"] == "Mixed-case transcript."
    assert rows["apple.caf"].row["text"] == "From a CAF file."
    assert isinstance(rows["phone.m4a"], Reject) and "convert it" in rows["phone.m4a"].problem
    checker = RowChecker(Limits(0.5, 30))
    assert isinstance(checker.check(rows["apple.caf"]), PlannedClip)
    assert checker.check(rows["gone.wav"]).reason == "missing_audio"


def test_ljspeech_ids_find_clips_with_upper_case_extensions(tmp_path):
    write(tmp_path / "wavs" / "LJ000.WAV", speech(1.0))
    (tmp_path / "metadata.csv").write_text("LJ000|Upper-case file name.\nfile_name,transcription\n")
    row, comma = read_input("ljspeech", tmp_path / "metadata.csv")
    assert row.row["audio"] == str(tmp_path / "wavs" / "LJ000.WAV")
    assert "comma-separated" in comma.problem


def test_a_folder_per_speaker_is_one_voice_unless_speaker_from_folder_says_so(tmp_path, capsys):
    """VCTK-like folders (one per speaker, sessions below), one holding an LJSpeech metadata.csv of its
    own: without --speaker_from_folder the run says the folders are read as one voice; with it, each
    clip's speaker is its top folder, and the metadata.csv's transcripts are used, not looked for in
    .txt files. A folder name stored decomposed (NFD, as macOS file systems write "ü") is the speaker's
    name as a keyboard types it (NFC): generate_custom_voice(speaker="Anna Müller") finds it."""
    import unicodedata

    data = tmp_path / "data"
    anna = unicodedata.normalize("NFD", "Anna Müller")
    for number, name in enumerate((f"{anna}/session 1/a1.wav", f"{anna}/a2.wav", "bob/b1.wav")):
        write(data / name, speech(1.0, seed=number))
        (data / name).with_suffix(".txt").write_text(f"Clip number {number} of this voice.")
    write(data / "carol" / "wavs" / "c1.wav", speech(1.0, seed=5))
    (data / "carol" / "metadata.csv").write_text("C1|Carol's line from her metadata.\n")

    validate(data, tmp_path / "one" / "train.jsonl")
    assert "note: the recordings lie in 3 folders below" in capsys.readouterr().out
    rows = list(read_input("folder", data, speaker_from_folder=True))
    speakers = {Path(row.row["audio"]).name: row.row.get("speaker") for row in rows}
    assert speakers == {"a1.wav": "Anna Müller", "a2.wav": "Anna Müller", "b1.wav": "bob", "c1.wav": "carol"}
    carol = next(row for row in rows if row.row["audio"].endswith("c1.wav"))
    assert carol.row["text"] == "Carol's line from her metadata." and carol.source.endswith("metadata.csv:1")

    summary = validate(data, tmp_path / "by_folder" / "train.jsonl", "--speaker_from_folder")
    assert "note: the recordings lie" not in capsys.readouterr().out
    assert sorted(summary["speakers"]) == ["anna müller", "bob", "carol"]
    write(data / "Bob" / "b2.wav", speech(1.0, seed=7))  # another person's folder, or the same one's?
    (data / "Bob" / "b2.txt").write_text("Clip number seven of this voice.")
    validate(data, tmp_path / "cased" / "train.jsonl", "--speaker_from_folder")
    assert "note: the folders 'Bob' and 'bob' are one speaker, 'bob'" in capsys.readouterr().out
    write(data / "loose.wav", speech(1.0, seed=8))
    (data / "loose.txt").write_text("A clip in no speaker's folder.")
    validate(data, tmp_path / "loose" / "train.jsonl", "--speaker_from_folder")
    assert f"note: 1 clips lie directly in {data}, in no speaker's folder, and have no speaker" in \
        capsys.readouterr().out
    # A folder named on macOS holds its name decomposed ("u" + U+0308): the speaker is the name as typed.
    write(data / "Anna Mu\u0308ller" / "a3.wav", speech(1.0, seed=9))
    (data / "Anna Mu\u0308ller" / "a3.txt").write_text("Clip number nine of this voice.")
    rows = {Path(row.row["audio"]).name: row.row for row in read_input("folder", data, speaker_from_folder=True)}
    assert rows["a3.wav"]["speaker"] == rows["a1.wav"]["speaker"] == "Anna M\u00fcller"


def test_an_empty_transcript_file_is_named_with_what_to_do(tmp_path):
    """A clip whose .txt is empty (a placeholder a tool wrote) is rejected naming that file, and how to
    have speech recognition write its text instead; the clip beside it is read."""
    for name in ("a", "b"):
        write(tmp_path / f"{name}.wav", speech(1.0))
    (tmp_path / "a.txt").write_text(" \n")
    (tmp_path / "b.txt").write_text("Some words.")
    rows = {Path(row.source).name: row for row in read_input("folder", tmp_path)}
    assert isinstance(rows["a.wav"], Reject) and rows["a.wav"].reason == "empty_transcript"
    assert rows["a.wav"].problem == (f"{tmp_path / 'a.txt'} is empty: write what is said in the clip, or delete the "
                                     f"file to have --asr_model transcribe it")
    assert rows["b.wav"].row["text"] == "Some words."


def test_folders_behind_links_are_read_and_broken_or_unreadable_transcripts_named(tmp_path):
    """A session folder that is a symbolic link is read like any other (a link back up is read once);
    a transcript that is a link to nowhere rejects its clip, naming it, and the rest goes on."""
    elsewhere, data = tmp_path / "elsewhere", tmp_path / "data"
    write(elsewhere / "s2" / "two.wav", speech(1.0, seed=2))
    (elsewhere / "s2" / "two.txt").write_text("From the linked session.")
    write(data / "s1" / "one.wav", speech(1.0, seed=1))
    (data / "s1" / "one.txt").write_text("From the session itself.")
    (data / "s2").symlink_to(elsewhere / "s2", target_is_directory=True)
    (data / "s1" / "up").symlink_to(data, target_is_directory=True)  # a loop
    write(data / "s1" / "lost.wav", speech(1.0, seed=3))
    (data / "s1" / "lost.txt").symlink_to(tmp_path / "nowhere.txt")
    (data / "s1" / "notepad.wav").write_bytes((data / "s1" / "one.wav").read_bytes())
    (data / "s1" / "notepad.txt").write_bytes("Saved as Unicode by Notepad.".encode("utf-16"))

    rows = {Path(row.source).name: row for row in read_input("folder", data)}

    assert set(rows) == {"one.wav", "two.wav", "lost.wav", "notepad.wav"}
    assert rows["two.wav"].row["text"] == "From the linked session."
    assert rows["notepad.wav"].row["text"] == "Saved as Unicode by Notepad."
    assert isinstance(rows["lost.wav"], Reject)
    assert rows["lost.wav"].problem == f"{data / 's1' / 'lost.txt'} cannot be read (No such file or directory)"


def test_metadata_written_by_hand_or_by_a_csv_writer_keeps_no_wrong_transcript(tmp_path):
    """In an id|text file, a third column is a "|" in the text: rejected, not split. A file written by
    pandas or Python's csv quotes the fields that hold a "|" or a quote: read as CSV. Quotes that are
    the text's own stay. Ids match files in any case; a tab-separated file is named as such."""
    for clip_id in ("LJ001", "lj002", "LJ003", "LJ004", "LJ005"):
        write(tmp_path / "wavs" / f"{clip_id}.wav", speech(1.0))
    (tmp_path / "metadata.csv").write_text(
        "LJ001|Ok | The box was thrown.\n"
        'LJ002|"She said ""not today"" and closed the door."\n'
        'LJ003|"Option A | option B" are both fine.\n'  # not CSV: quotes of its own, then more text
        'LJ004|"Option A | option B are both fine."\n'
        '"LJ005"|"Hello," he said.\n'
        "LJ006\tA tab-separated line.\n")
    rows = list(read_input("ljspeech", tmp_path / "metadata.csv"))
    assert isinstance(rows[0], Reject) and "columns where the file's other lines have 2" in rows[0].problem
    assert rows[1].row["text"] == 'She said "not today" and closed the door.'
    assert rows[1].row["audio"] == str(tmp_path / "wavs" / "lj002.wav")
    assert isinstance(rows[2], Reject)
    assert rows[3].row["text"] == "Option A | option B are both fine."
    assert rows[4].row["text"] == '"Hello," he said.'
    assert "it looks tab-separated" in rows[5].problem


def test_input_files_of_the_wrong_kind_are_named(tmp_path):
    wav = write(tmp_path / "take.wav", speech(1.0))
    (tmp_path / "manifest.json").write_text('[{"audio": "take.wav", "text": "Hello."}]')
    (tmp_path / "utf16.jsonl").write_bytes('{"audio": "take.wav", "text": "Hello."}\n'.encode("utf-16"))
    for name, message in ((wav.name, "is an audio file, not a list of clips. --input takes a JSONL"),
                          ("manifest.json", "is one JSON array, not a JSON object a line: convert it with jq"),
                          ("utf16.jsonl", "is UTF-16 text: save it as UTF-8")):
        with pytest.raises(SystemExit, match=message):
            validate(tmp_path / name, tmp_path / "out" / "train.jsonl")
    checker = RowChecker(Limits(0.5, 30))
    reject = checker.check(InputRow("raw.jsonl:1", dict(wav=str(wav), transcript="Hello."), ""))
    assert reject.field == "text" and reject.problem.startswith(
        "missing (this row's transcript, wav are not a field read here: the fields are audio, text, ref_audio, "
        "speaker, language, segments)")
    reject = checker.check(InputRow("raw.jsonl:2", dict(wav=str(wav), text="Hello."), ""))
    assert reject.field == "audio" and reject.problem == "missing (this row's wav is not a field read here: the " \
                                                         "fields are audio, text, ref_audio, speaker, language, segments)"


def test_transcripts_without_a_letter_or_digit_are_rejected_in_any_script(tmp_path):
    """Only punctuation or emoji says nothing to train on; a letter or digit of any script is words."""
    path = str(write(tmp_path / "clip.wav", speech(1.0)))
    checker = RowChecker(Limits(0.5, 30))
    for line, text in enumerate(("...!?", " \u2026 ", "\U0001f642\U0001f642"), start=1):
        reject = checker.check(InputRow(f"raw.jsonl:{line}", dict(audio=path, text=text), ""))
        assert isinstance(reject, Reject) and reject.reason == "empty_transcript"
        assert reject.message() == f"raw.jsonl:{line}: text: {text.strip()!r} has no letters or digits: there are " \
                                   f"no words in it to speak"
    for text in ("你好。", "Ça va ?", "42!", "I <3 you, and 2 < 3 > 1."):
        assert isinstance(checker.check(InputRow("raw.jsonl:4", dict(audio=path, text=text), "")), PlannedClip)
    reject = checker.check(InputRow("raw.jsonl:6", dict(audio=path, text='<speak>Hello <break time="1s"/> world.'
                                                                          '</speak>'), ""))
    assert (reject.reason, reject.field) == ("bad_row", "text")
    assert reject.problem == 'holds markup (<speak>, <break time="1s"/>, </speak>): write the words as spoken, ' \
                             'without tags'
    segments = [dict(start=0.0, end=0.5, text="Hello."), dict(start=0.5, end=1.0, text="?!")]
    reject = checker.check(InputRow("raw.jsonl:5", dict(audio=path, segments=segments), ""))
    assert reject.field == "segments" and reject.problem == "segment 2: text '?!' has no letters or digits: there " \
                                                            "are no words in it to speak"


def test_duplicate_text_names_only_a_clip_that_is_kept():
    """The first clip of a text is rejected across clips (at 34 characters/s, nearly 3x its speaker's
    median): the retakes after it name each other, not it."""
    def clip(line, text, seconds):
        return ClipInfo(("raw.jsonl", line, None), ("raw.jsonl", line, 0), f"raw.jsonl:{line}", "anna", text,
                        seconds, f"/data/{line}.wav", None, None, dict(sha1=str(line)), {})

    clips = [clip(1, "Hello there!", 0.35), clip(2, "Hello there!", 1.0), clip(3, "Hello there!", 1.1)]
    clips += [clip(line, f"Sentence {line:03}", 1.0) for line in range(4, 8)]  # 12 characters/s
    rejects, _ = DatasetChecks(1.5, 2.5, 4).run(clips)
    assert list(rejects) == ["raw.jsonl:1"] and rejects["raw.jsonl:1"][0] == "speaking_rate"
    assert clips[1].flags == {} and clips[2].flags == dict(duplicate_text="the same text as raw.jsonl:2")


CHINESE = ["你好，这是一个简短的测试。", "今天天气很好，我们去公园散步吧。", "请把窗户关上，外面有点冷。",
           "这本书非常有意思，我推荐给你。", "我们明天早上八点在学校门口见面。", "他每天晚上都会给家里打一个电话。",
           "这个问题比我想象的要复杂得多。", "周末我打算和朋友一起去看电影。"]


def bilingual_clips(language_of) -> list:
    """A speaker's 8 Chinese clips at 5 characters/s and 5 English ones at 15 (normal reading of each);
    language_of(english) is the row's language. The English are 3x the Chinese rate."""
    texts = [(text, 5.0, False) for text in CHINESE] + [(text, 15.0, True) for text in SENTENCES[:5]]
    return [ClipInfo(("raw.jsonl", line, None), ("raw.jsonl", line, 0), f"raw.jsonl:{line}", "anna", text,
                     len(text) / rate, f"/data/{line}.wav", None, None, dict(sha1=str(line)), {}, language_of(english))
            for line, (text, rate, english) in enumerate(texts, start=1)]


def test_a_rate_group_is_the_script_of_the_text_where_the_language_says_otherwise():
    """Chinese with a brand name in it is Chinese text; a language whose script the text is not in
    (Chinese spoken with --language english) gives way to the text's script."""
    assert audio.rate_group("今天发布了iPhone 15 Pro Max。") == "auto/cjk"
    assert audio.rate_group("iPhone 15 发布了") == "auto/cjk"
    assert audio.rate_group("The new iPhone is out.") == "auto/other"
    assert audio.rate_group("今天天气很好。", "english") == "auto/cjk"
    assert (audio.rate_group("Hello.", "English"), audio.rate_group("こんにちは。", "japanese")) == ("english", "japanese")


@pytest.mark.parametrize("language_of", [lambda english: "english" if english else "chinese",
                                         lambda english: None], ids=["languages named", "auto: by script"])
def test_a_bilingual_speakers_rates_are_compared_within_each_language(language_of):
    """English is read at about 3x the characters a second of Chinese: each clip is held to the median of
    the speaker's clips of its own language, or of its own script where the rows name none."""
    clips = bilingual_clips(language_of)
    slow = clips[9]  # one English clip read at 1/3 the English rate: 5 characters/s, as the Chinese
    slow.seconds *= 3
    rejects, medians = DatasetChecks(1.5, 2.5, 4).run(clips)
    assert list(rejects) == ["raw.jsonl:10"] and "of its" in rejects["raw.jsonl:10"][1]
    groups = ("english", "chinese") if language_of(True) else ("auto/other", "auto/cjk")
    assert medians == pytest.approx({("anna", groups[0]): 15.0, ("anna", groups[1]): 5.0})
    entry = data_report.speaker_entries([c for c in clips if c is not slow], medians, {})["anna"]
    assert entry["median_rate_checked"] == sorted(groups)
    assert entry["characters_per_second_by_group"][groups[0]]["median"] == pytest.approx(15.0)
    summary = prepare_codes.DatasetSummary()
    for clip in clips:
        summary.add(clip, dict(speaker="Anna"))
    report = summary.report(Path("train.jsonl"), [], {}, prepare_codes.new_throughput(), False)
    english = clips[8:]  # the slow clip counts in its own group's rate only
    assert report["speakers"]["anna"]["characters_per_second_by_group"] == pytest.approx(
        {groups[0]: sum(len(c.text) for c in english) / sum(c.seconds for c in english), groups[1]: 5.0}, rel=2e-2)


KOREAN = ["안녕하세요, 만나서 반갑습니다.", "오늘은 날씨가 정말 좋네요.", "내일 아침에 다시 전화할게요.",
          "이 책은 아주 재미있어요.", "주말에 친구와 영화를 봤어요.", "공원에서 산책을 하고 싶어요.",
          "저녁으로 김치찌개를 먹었어요.", "회의는 세 시에 시작합니다."]


def test_text_typed_in_decomposed_unicode_or_with_invisible_characters_is_read_at_its_spoken_rate():
    """A speaker's transcripts from two sources, some decomposed (NFD, as macOS and some keyboards
    write: a hangul syllable as 2-3 jamo, a Vietnamese letter and its accents apart) or holding
    zero-width characters: the same speech is the same rate, not 2x faster. The tokenizer reads NFC,
    so does the rate."""
    import unicodedata

    texts = KOREAN[:5] + [unicodedata.normalize("NFD", text) for text in KOREAN[5:]]
    texts[1] = texts[1].replace(" ", " \u200b")  # zero-width spaces, as web pages hold them
    seconds = [len(text) / 7.0 for text in KOREAN]  # all read at 7 syllables (and spaces) a second
    clips = [ClipInfo(("raw.jsonl", line, None), ("raw.jsonl", line, 0), f"raw.jsonl:{line}", "minji", text,
                      length, f"/data/{line}.wav", None, None, dict(sha1=str(line)), {}, "korean")
             for line, (text, length) in enumerate(zip(texts, seconds), start=1)]
    assert len(texts[6]) > 2 * len(KOREAN[6])  # decomposed: over twice the code points
    rejects, medians = DatasetChecks(1.5, 2.5, 4).run(clips)
    assert rejects == {} and [clip.flags for clip in clips] == [{}] * len(clips)
    assert medians == pytest.approx({("minji", "korean"): 7.0})
    rates = audio.SpeakingRates()
    for clip in clips:
        rates.add(clip.text, round(clip.seconds * audio.FRAMES_PER_SECOND), "minji", "korean")
    assert rates.rates()["korean"]["minji"] == pytest.approx(7.0, rel=2e-2)
    # Arabic written with its optional vowel points is the same speech as without them.
    assert audio.spoken_characters("مَرْحَبًا بِكُمْ") == audio.spoken_characters("مرحبا بكم") == 9


def test_a_recording_listed_twice_keeps_the_row_whose_text_fits(tmp_path):
    """The same take listed first with another sentence's longer text, then with its own: the row that
    fits the speaker's rate is kept and the other rejected for its rate, not the right one as a copy."""
    rows = []
    for index, sentence in enumerate(SENTENCES):
        path = write(tmp_path / f"clip_{index}.wav", speech(len(sentence) / RATE, seed=index))
        rows.append(dict(audio=str(path), text=sentence, speaker="anna"))
    wrong = dict(rows[0], text=" ".join(SENTENCES[:3]))  # three sentences over one sentence's audio
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(row) + "\n" for row in [wrong] + rows))

    validate(raw, tmp_path / "out.jsonl")

    rejects = rejects_of(tmp_path / "out.jsonl")
    assert {source: reject["reason"] for source, reject in rejects.items()} == {"raw.jsonl:1": "speaking_rate"}
    assert "raw.jsonl:2" in clips_of(tmp_path / "out.jsonl")  # the same take, its own text: kept


@pytest.mark.parametrize("flags, message", [
    (["--trim_padding_seconds", "-0.5"], "need --trim_padding_seconds >= 0"),
    (["--min_pause_seconds", "-1"], "--min_pause_seconds > 0"),
    (["--loudness_lufs", "10"], "levels below full scale: negative numbers"),
    (["--num_shards", "2", "--shard_index", "1"], "--validate_only checks the whole dataset at once")])
def test_settings_that_cannot_mean_what_they_say_are_refused(tmp_path, flags, message, capsys):
    """A negative padding would cut into the speech, a positive loudness clip every clip; shards of a
    validation would skip the checks across clips."""
    with pytest.raises(SystemExit) as stopped:
        validate(tmp_path, tmp_path / "out.jsonl", *flags)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("noise_dbfs", [-70, -54, -45])
def test_room_noise_at_the_edges_is_trimmed_whatever_its_level(noise_dbfs):
    """A home recording's room noise can sit within 35 dB of its speech: it is the recording's noise
    floor, not loud sound the detector missed, and is trimmed all the same."""
    rng = np.random.default_rng(7)
    voice = speech(3.0, seed=5)
    samples = np.concatenate([np.zeros(36000, np.float32), voice, np.zeros(24000, np.float32)])
    samples = samples + (10 ** (noise_dbfs / 20) * rng.standard_normal(len(samples))).astype(np.float32)
    checks = AudioChecks(Limits(0.5, 30), -50, 0.001, False, Processing(True, 0.2, 15, 0.4, None))
    [piece] = checks.pieces_of(PlannedClip("x", dict(audio="x.wav", text="t"), None, 5.5), samples,
                               samples[:, None], 24000, 24000)
    [bounds] = voice_activity.speech_bounds([piece.samples], 24000)
    checks.trim(piece, bounds, 24000)
    assert piece.quality["trimmed_seconds"] > 1.5  # of the 2.5 s of room noise around the speech


def test_a_clip_speech_recognition_fails_on_is_rejected_and_the_run_goes_on(tmp_path):
    """The recogniser raising on one clip of a batch (transformers' long-form path did on a clip over
    30 s) names that clip; the others keep their transcripts."""
    from qwen3_tts_sft.dataset_layouts import Decoded
    from qwen3_tts_sft.transcription import Failure, Transcriber

    transcriber = Transcriber(str(write_tiny_whisper(tmp_path / "whisper")), "cpu")
    pipeline = transcriber.pipeline

    def failing_on_long_clips(inputs, **options):
        if any(len(item["raw"]) > 5 * transcriber.sample_rate for item in (inputs if isinstance(inputs, list)
                                                                             else [inputs])):
            raise IndexError("index -1 is out of bounds for dimension 0 with size 0")
        return pipeline(inputs, **options)

    transcriber.pipeline = failing_on_long_clips
    short, long = transcriber([speech(2.0, seed=1), speech(6.0, seed=2)], 24000)
    assert not isinstance(short, Failure) and isinstance(long, Failure) and long.startswith("IndexError: ")

    pieces = [Decoded(PlannedClip("take.wav", dict(audio="take.wav"), None, 8.0), f"take.wav#{number}",
                      dict(audio="take.wav"), samples) for number, samples in ((1, speech(2.0)), (2, speech(6.0)))]
    prepare_codes.transcribe(pieces, transcriber, 24000, check=False, max_cer=0.3)
    assert pieces[0].reject is None and pieces[0].row["text_from"] == "asr"
    assert pieces[1].reject.reason == "missing_transcript"
    assert "speech recognition failed on it (IndexError: index -1" in pieces[1].reject.problem


def test_segments_without_text_are_transcribed_with_speech_recognition(tmp_path):
    """Times from a diarization or voice-activity tool, no words: each segment becomes a clip whose
    text speech recognition writes; without --asr_model the row is named, with the flag to pass."""
    take = write(tmp_path / "take.wav", np.concatenate([speech(4, seed=1), room_tone(1, seed=2), speech(5, seed=3)]))
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps(dict(audio=str(take), speaker="dora", segments=[dict(start=0, end=4.2),
                                                                               dict(start=4.8, end=10)])) + "\n")
    with pytest.raises(SystemExit, match="no usable clips"):
        validate(raw, tmp_path / "no_asr.jsonl")
    assert "or pass --asr_model to transcribe it" in rejects_of(tmp_path / "no_asr.jsonl")["raw.jsonl:1"]["problem"]

    whisper = write_tiny_whisper(tmp_path / "whisper")
    summary = validate(raw, tmp_path / "out.jsonl", "--asr_model", whisper)
    report = clips_of(tmp_path / "out.jsonl")
    assert summary["clips"] == summary["transcribed_clips"] == 2
    assert all(clip["text_from"] == "asr" for clip in report.values())
    assert set(report) == {"raw.jsonl:1#1", "raw.jsonl:1#2"}


def test_metadata_lines_without_text_are_transcribed_with_speech_recognition(tmp_path):
    """An LJSpeech metadata.csv of ids alone (or id|): --asr_model writes their text, as for a folder's
    clips without a .txt; without it each line is named with the flag to pass."""
    for clip_id in ("a1", "a2", "a3"):
        write(tmp_path / "wavs" / f"{clip_id}.wav", speech(2.0, seed=len(clip_id) + int(clip_id[1])))
    (tmp_path / "metadata.csv").write_text("a1|\na2\na3|Its own text.\n")
    assert validate(tmp_path, tmp_path / "no_asr.jsonl")["clips"] == 1
    rejects = rejects_of(tmp_path / "no_asr.jsonl")
    for line in ("metadata.csv:1", "metadata.csv:2"):
        reject = next(r for source, r in rejects.items() if source.endswith(line))
        assert reject["reason"] == "missing_transcript"
        assert reject["problem"] == "the line has no text (id|text) (or pass --asr_model to transcribe it)"

    summary = validate(tmp_path, tmp_path / "out.jsonl", "--asr_model", write_tiny_whisper(tmp_path / "whisper"))
    clips = clips_of(tmp_path / "out.jsonl")
    assert summary["clips"] == 3 and summary["transcribed_clips"] == 2
    assert [clip.get("text_from") for _, clip in sorted(clips.items())] == ["asr", "asr", None]


def test_a_long_take_whose_own_text_cannot_be_used_is_said_once(tmp_path, capsys):
    pauses = [part for seed in range(5) for part in (speech(6, seed=seed), room_tone(1, seed=seed))]
    take = write(tmp_path / "chapter.wav", np.concatenate(pauses))  # 35 s: longer than --max_seconds 30
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps(dict(audio=str(take), text="The whole chapter's text.", speaker="eve")) + "\n")
    validate(raw, tmp_path / "out.jsonl", "--asr_model", write_tiny_whisper(tmp_path / "whisper"),
             "--reject_rate_ratio", 100, "--flag_rate_ratio", 100)
    printed = capsys.readouterr().out
    assert printed.count("note: 1 takes too long to keep whole have a text of their own (e.g. ") == 1
    assert all(clip["text_from"] == "asr" for clip in clips_of(tmp_path / "out.jsonl").values())


def test_the_report_plot_labels_names_no_font_here_draws_without_warnings(tmp_path):
    """A Chinese speaker name on a machine without a Chinese font: no warning per missing glyph, and the
    legend names it by its place among the speakers; names the fonts draw keep their names."""
    import warnings
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    drawable = set().union(*(FT2Font(font.fname).get_charmap() for font in font_manager.fontManager.ttflist
                             if not font.name.startswith("Last Resort")))
    undrawable = next(chr(code) for code in range(0x4E00, 0xA000) if code not in drawable)
    names = ["Анна", f"{undrawable}{undrawable}", "bert"]
    families, labels = data_report.fonts_and_labels(sorted(names))
    assert labels == ["bert", "Анна", "speaker 3"]
    kept = [ClipInfo(position=None, order=(n,), source=f"c{n}", speaker=name, text="Thirty letters of text, or so.",
                     seconds=2.0 + n, row_audio=f"c{n}.wav", segment=None, ref_audio=None, quality={}, flags={})
            for n, name in enumerate(names)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Glyph ... missing from font(s)" would fail the test
        data_report.plot(tmp_path / "report.png", kept, [])
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
