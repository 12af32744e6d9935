"""prepare_codes.py on the tiny speech tokenizer: every input layout, bad audio of each kind, a kill
and a rerun, sharding and merging. Clips are under a second, so each run encodes in a second or two."""

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from qwen3_tts_sft import audio
import prepare_codes
from qwen3_tts_sft.data_report import ClipInfo
from qwen3_tts_sft.dataset_layouts import AudioChecks, Limits, PlannedClip, Processing, detect_layout
from helpers import ROOT, read_jsonl, run_script, write_jsonl
from qwen3_tts_sft.tiny_model import synthetic_voice

CODEBOOK_SIZE = 2048
NUM_CODE_GROUPS = 16


@pytest.fixture(scope="module")
def speech_tokenizer(tiny_model):
    return tiny_model / "speech_tokenizer"


def voice(seconds: float, rate: int = 24000, seed: int = 0) -> np.ndarray:
    return synthetic_voice(seconds, rate, 140.0, np.random.default_rng(seed))


def write_audio(path, samples, rate, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, rate, **options)
    return path


def prepare(speech_tokenizer, input_path, output, *flags):
    """prepare_codes.main in this process, on CPU; returns the summary."""
    return prepare_codes.main(["--tokenizer_model_path", str(speech_tokenizer), "--input", str(input_path),
                               "--output_jsonl", str(output), "--device", "cpu", "--num_workers", "1",
                               *map(str, flags)])


def rejects_by_source(output) -> dict:
    return {reject["source"]: reject["reason"] for reject in read_jsonl(f"{output}.rejects.jsonl")}


def expected_frames(seconds: float) -> int:
    return math.ceil(round(seconds * 12.5, 6))


def check_codes(row, seconds: float):
    codes = np.array(row["audio_codes"])
    assert codes.shape == (expected_frames(seconds), NUM_CODE_GROUPS)
    assert codes.min() >= 0 and codes.max() < CODEBOOK_SIZE


# ---------------------------------------------------------------------------------------------
# Audio reading
# ---------------------------------------------------------------------------------------------

def test_stereo_48k_and_8k_come_out_mono_at_24k(tmp_path):
    t48, t8, t24 = (np.arange(int(0.5 * rate)) / rate for rate in (48000, 8000, 24000))
    tone48, tone8 = np.sin(2 * np.pi * 440 * t48), np.sin(2 * np.pi * 200 * t8)
    stereo = write_audio(tmp_path / "stereo.flac", 0.5 * np.stack([tone48, 0.5 * tone48], axis=1), 48000)
    narrow = write_audio(tmp_path / "narrow.wav", 0.5 * tone8, 8000)

    decoded = audio.decode(stereo, 24000)
    assert decoded.samples.dtype == np.float32 and decoded.samples.shape == (12000,)
    # mean of the channels, resampled: the same tone at 24 kHz (the ends carry the filter's edge)
    np.testing.assert_allclose(decoded.samples[200:-200], 0.375 * np.sin(2 * np.pi * 440 * t24)[200:-200], atol=2e-3)
    upsampled = audio.load_mono(narrow, 24000)
    np.testing.assert_allclose(upsampled[200:-200], 0.5 * np.sin(2 * np.pi * 200 * t24)[200:-200], atol=2e-3)
    assert decoded.clipped_fraction == 0 and -20 < decoded.level_dbfs < -5


def test_clipping_and_silence_are_measured(tmp_path):
    loud = write_audio(tmp_path / "loud.wav", np.clip(4 * voice(0.5), -1, 1), 24000, subtype="PCM_16")
    silent = write_audio(tmp_path / "silent.wav", np.zeros(12000), 24000)
    assert audio.decode(loud, 24000).clipped_fraction > 0.05
    assert audio.decode(silent, 24000).level_dbfs == -math.inf


def test_a_float_file_past_full_scale_is_clipped_only_where_it_is_flattened(tmp_path):
    """A float WAV may peak past 1.0 unharmed (loudness normalisation scales it down); one held at a
    ceiling is clipped, as is a 16-bit file at full scale."""
    loud = 4 * voice(0.6)
    assert np.abs(loud).max() > 1.5
    peaks = write_audio(tmp_path / "peaks.wav", loud, 24000, subtype="FLOAT")
    flattened = write_audio(tmp_path / "flattened.wav", np.clip(loud, -1.2, 1.2), 24000, subtype="FLOAT")
    integer = write_audio(tmp_path / "integer.wav", np.clip(loud, -1, 1), 24000, subtype="PCM_16")
    assert audio.decode(peaks, 24000).clipped_fraction == 0
    assert audio.decode(flattened, 24000).clipped_fraction > 0.05 and audio.decode(integer, 24000).clipped_fraction > 0.05

    # More than 1 % of the samples flattened is distorted throughout: rejected unless --max_clipped_fraction 1.
    clips = [PlannedClip(str(path), dict(audio=str(path), text="Loud."), None, 0.6) for path in (peaks, flattened)]
    processing = Processing(False, 0.2, 15, 0.4, None)
    [[kept_whole], [rejected]] = AudioChecks(Limits(0.5, 30), -50, 0.001, False, processing).process(clips, 24000, 1920)
    assert kept_whole.reject is None and "clipped" not in kept_whole.flags and kept_whole.clipped_fraction is None
    assert rejected.reject.reason == "clipped" and "--max_clipped_fraction 0.01" in rejected.reject.problem
    keep_all = AudioChecks(Limits(0.5, 30), -50, 0.001, False, processing, max_clipped_fraction=1.0)
    [_, [flagged]] = keep_all.process(clips, 24000, 1920)
    assert "full scale" in flagged.flags["clipped"] and flagged.clipped_fraction > 0.05


def test_layout_detection(tmp_path):
    (tmp_path / "ljs" / "wavs").mkdir(parents=True)
    (tmp_path / "ljs" / "metadata.csv").write_text("a|b\n")
    (tmp_path / "clips").mkdir()
    (tmp_path / "raw.jsonl").write_text("")
    assert detect_layout(tmp_path / "ljs") == ("ljspeech", tmp_path / "ljs" / "metadata.csv")
    assert detect_layout(tmp_path / "ljs" / "metadata.csv")[0] == "ljspeech"
    assert detect_layout(tmp_path / "clips") == ("folder", tmp_path / "clips")
    assert detect_layout(tmp_path / "raw.jsonl") == ("jsonl", tmp_path / "raw.jsonl")
    with pytest.raises(SystemExit, match="no such file"):
        detect_layout(tmp_path / "nothing")


def test_duration_histogram_counts_each_clip_by_its_own_length():
    """A clip is padded to whole 80 ms frames, but counted in the bucket of its own length, each bucket
    holding the clips up to its upper edge: 1.95 s and 2.0 s (25 frames, 2.0 s padded) are "1-2 s"
    clips, 2.01 s (26 frames) a "2-3 s" one, 30.0 s a "20-30 s" one."""
    summary = prepare_codes.DatasetSummary()
    for number, seconds in enumerate((1.95, 2.0, 2.01, 30.0, 31.0), start=1):
        row = dict(source=f"raw.jsonl:{number}", audio="clip.wav", text="Some words.",
                   quality=dict(seconds=seconds, frames=math.ceil(seconds * audio.FRAMES_PER_SECOND)))
        summary.add(ClipInfo.of(row, ("raw.jsonl", number, None), (number,)), row)
    histogram = summary.report(Path("train.jsonl"), [], {}, prepare_codes.new_throughput(), False)["duration_histogram"]
    assert histogram == {"0-1 s": 0, "1-2 s": 2, "2-3 s": 1, "3-5 s": 0, "5-10 s": 0, "10-15 s": 0, "15-20 s": 0,
                         "20-30 s": 1, "30+ s": 1}


# ---------------------------------------------------------------------------------------------
# Input layouts, with every kind of bad row
# ---------------------------------------------------------------------------------------------

def test_jsonl_layout_keeps_good_rows_and_rejects_each_bad_one(speech_tokenizer, tmp_path, capsys):
    data = tmp_path / "data"
    write_audio(data / "stereo48k.flac", np.stack([voice(0.8, 48000, 1), 0.5 * voice(0.8, 48000, 1)], axis=1), 48000)
    write_audio(data / "narrow8k.wav", voice(0.7, 8000, 2), 8000)
    write_audio(data / "vorbis.ogg", voice(0.6, 24000, 3), 24000)
    # Mildly clipped: 0.3 % of its samples at full scale, flagged and kept.
    write_audio(data / "clipped.wav", np.clip(2.15 * voice(0.6, 24000, 4), -1, 1), 24000, subtype="PCM_16")
    write_audio(data / "ref.wav", voice(2.0, 24000, 5), 24000)
    write_audio(data / "silent.wav", np.zeros(24000), 24000)
    write_audio(data / "hiss.wav", 1e-4 * np.random.default_rng(6).standard_normal(24000), 24000)
    write_audio(data / "forty_seconds.wav", voice(40.0, 8000, 7), 8000)
    write_audio(data / "blip.wav", voice(0.2, 24000, 8), 24000)
    write_audio(data / "no_samples.wav", np.zeros(0), 24000)
    (data / "corrupt.wav").write_bytes(np.random.default_rng(9).bytes(5000))
    (data / "empty.wav").write_bytes(b"")
    lines = [
        dict(audio="stereo48k.flac", text="Stereo at forty-eight.", ref_audio="ref.wav", speaker="alice"),  # 1
        dict(audio="narrow8k.wav", text="Eight kilohertz.", language="english"),                             # 2
        dict(audio="vorbis.ogg", text="  Vorbis.  "),                                                          # 3
        dict(audio="clipped.wav", text="Too loud."),                                                           # 4
        dict(audio="silent.wav", text="Nothing."),                                                             # 5
        dict(audio="hiss.wav", text="Only hiss."),                                                             # 6
        dict(audio="forty_seconds.wav", text="A very long read."),                                             # 7
        dict(audio="blip.wav", text="Hm."),                                                                    # 8
        dict(audio="no_samples.wav", text="Empty wav."),                                                       # 9
        dict(audio="corrupt.wav", text="Random bytes."),                                                       # 10
        dict(audio="empty.wav", text="Zero bytes."),                                                           # 11
        dict(audio="vorbis.ogg"),                                                                              # 12
        dict(audio="vorbis.ogg", text="   "),                                                                  # 13
        dict(audio="not_there.wav", text="Missing file."),                                                     # 14
        dict(audio="vorbis.ogg", text="Bad reference.", ref_audio="not_there.wav"),                            # 15
        dict(audio="vorbis.ogg", text="Bad speaker.", speaker=7),                                              # 16
    ]
    raw = data / "raw.jsonl"
    raw.write_text("".join(json.dumps(line) + "\n" for line in lines) + "{not json\n")          # 17
    output = tmp_path / "out" / "train.jsonl"

    summary = prepare(speech_tokenizer, raw, output, "--ref_audio", data / "ref.wav", "--speaker", "narrator",
                      "--batch_size", 2)

    rows = read_jsonl(output)
    assert [row["source"] for row in rows] == [f"{raw}:{n}" for n in (1, 2, 3, 4)]  # input order
    for row, seconds in zip(rows, (0.8, 0.7, 0.6, 0.6)):
        check_codes(row, seconds)
        assert os.path.isabs(row["audio"]) and os.path.isabs(row["ref_audio"])
    assert rows[0]["ref_audio"] == str(data / "ref.wav") and rows[0]["speaker"] == "alice"
    assert rows[1]["speaker"] == "narrator" and rows[1]["language"] == "english" and "language" not in rows[0]
    assert rows[2]["text"] == "Vorbis."
    assert 0.001 < rows[3]["clipped_fraction"] < 0.01 and "clipped_fraction" not in rows[0]

    expected = {7: "too_long", 8: "too_short", 9: "empty_audio", 10: "unreadable_audio", 11: "empty_audio",
                12: "missing_transcript", 13: "empty_transcript", 14: "missing_audio", 15: "bad_ref_audio",
                16: "bad_row", 17: "bad_row", 5: "silent", 6: "silent"}
    assert rejects_by_source(output) == {f"{raw}:{n}": reason for n, reason in expected.items()}
    rejects = read_jsonl(f"{output}.rejects.jsonl")
    assert [reject["source"] for reject in rejects] == sorted((r["source"] for r in rejects),
                                                              key=lambda s: int(s.rsplit(":", 1)[1]))
    assert next(r for r in rejects if r["source"] == f"{raw}:17")["input"] == "{not json"
    assert f"{raw}:13: text: is empty" in capsys.readouterr().err

    assert summary == json.loads((output.parent / "train.jsonl.summary.json").read_text())
    assert summary["clips"] == 4 and summary["rejected"] == 13 and summary["clipped_clips"] == 1
    assert summary["rejects_by_reason"]["silent"] == 2 and summary["rejects_by_reason"]["unreadable_audio"] == 1
    assert summary["rejects_by_reason"]["empty_audio"] == 2  # no samples, and no bytes at all
    assert sum(summary["duration_histogram"].values()) == 4 and summary["duration_histogram"]["0-1 s"] == 4
    seconds = sum(len(row["audio_codes"]) for row in rows) / 12.5
    assert summary["characters_per_second"] == pytest.approx(sum(len(r["text"]) for r in rows) / seconds, abs=1e-3)
    assert summary["speakers"]["alice"]["clips"] == 1 and summary["speakers"]["narrator"]["clips"] == 3
    assert summary["throughput"]["encoded_clips"] == 4 and summary["throughput"]["audio_seconds_per_wall_second"] > 0
    assert not (output.parent / "train.jsonl.partial").exists()


def test_relative_paths_are_read_beside_the_jsonl_from_any_folder(speech_tokenizer, tmp_path, monkeypatch):
    """Two data sets with the same file names: run from one, prepare the other, and get the other's audio."""
    here, there = tmp_path / "here", tmp_path / "there"
    write_audio(here / "wavs" / "0.wav", voice(0.6, 24000, 1), 24000)
    write_audio(there / "wavs" / "0.wav", voice(1.1, 24000, 2), 24000)
    raw = write_jsonl(there / "raw.jsonl", [dict(audio="wavs/0.wav", text="From over there.", speaker="x")])
    monkeypatch.chdir(here)

    prepare(speech_tokenizer, raw, tmp_path / "out" / "train.jsonl")

    [row] = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert row["audio"] == str(there / "wavs" / "0.wav")
    check_codes(row, 1.1)


def test_ljspeech_layout(speech_tokenizer, tmp_path):
    ljs = tmp_path / "LJSpeech"
    for clip_id, seconds in (("LJ001", 0.6), ("LJ003", 0.7), ("LJ004", 0.6), ("LJ005", 0.6), ("LJ007", 0.6),
                             ("LJ008", 0.6)):
        write_audio(ljs / "wavs" / f"{clip_id}.wav", voice(seconds, 22050, int(clip_id[2:])), 22050)
    write_audio(ljs / "wavs" / "LJ002.flac", voice(0.8, 22050, 2), 22050)
    ref = write_audio(tmp_path / "ref.wav", voice(2.0, 24000, 9), 24000)
    (ljs / "metadata.csv").write_text(
        'LJ001|Raw "text" 1869.|Raw "text" eighteen sixty-nine.\n'
        "LJ002|Only raw text.\n"
        "LJ003|Raw text, no normalized.|\n"
        "\n"
        "LJ004|\n"
        "LJ005\n"
        "LJ006|Its audio is missing.|Its audio is missing.\n"
        "LJ007|It was 20|C.|It was twenty C.\n"  # a "|" inside the text: which column is it?
        "wavs/LJ008.wav|A path as some tools write the id.\n")
    output = tmp_path / "ljs.jsonl"

    summary = prepare(speech_tokenizer, ljs, output, "--ref_audio", ref, "--speaker", "Linda", "--language", "english")

    rows = read_jsonl(output)
    metadata = ljs / "metadata.csv"
    assert [row["text"] for row in rows] == ['Raw "text" eighteen sixty-nine.', "Only raw text.",
                                             "Raw text, no normalized.", "A path as some tools write the id."]
    assert [row["audio"] for row in rows] == [str(ljs / "wavs" / name)
                                              for name in ("LJ001.wav", "LJ002.flac", "LJ003.wav", "LJ008.wav")]
    for row, seconds in zip(rows, (0.6, 0.8, 0.7, 0.6)):
        check_codes(row, seconds)
        assert (row["ref_audio"], row["speaker"], row["language"]) == (str(ref), "Linda", "english")
    assert rejects_by_source(output) == {f"{metadata}:5": "missing_transcript", f"{metadata}:6": "missing_transcript",
                                         f"{metadata}:7": "missing_audio", f"{metadata}:8": "bad_row"}
    assert list(summary["speakers"]) == ["linda"]  # grouped as the trainer does and summary["clips"] == 4


def test_folder_layout_with_txt_and_lab_transcripts(speech_tokenizer, tmp_path):
    clips = tmp_path / "clips"
    write_audio(clips / "a.wav", voice(0.6, 24000, 1), 24000)
    (clips / "a.txt").write_text("First line,\nsecond line.\n")
    write_audio(clips / "sub" / "b.flac", voice(0.7, 44100, 2), 44100)
    (clips / "sub" / "b.lab").write_text("From a lab file.")
    write_audio(clips / "c.wav", voice(0.6, 24000, 3), 24000)
    write_audio(clips / "d.wav", voice(0.6, 24000, 4), 24000)
    (clips / "d.txt").write_text("\n")
    write_audio(clips / "e.wav", voice(0.6, 24000, 5), 24000)
    (clips / "e.TXT").write_text("Upper-case extension.")
    write_audio(clips / "f.wav", voice(0.6, 24000, 6), 24000)
    (clips / "f.wav.txt").write_text("Named after the whole file name.")
    (clips / "notes.md").write_text("not audio")
    output = tmp_path / "folder.jsonl"

    prepare(speech_tokenizer, clips, output)

    rows = read_jsonl(output)
    assert [(row["source"], row["text"]) for row in rows] == [(str(clips / "a.wav"), "First line, second line."),
                                                              (str(clips / "e.wav"), "Upper-case extension."),
                                                              (str(clips / "f.wav"), "Named after the whole file name."),
                                                              (str(clips / "sub" / "b.flac"), "From a lab file.")]
    # No --ref_audio: the speaker's cleanest clips are its references, in turn.
    assert {row["ref_audio"] for row in rows} <= {row["audio"] for row in rows}
    check_codes(rows[3], 0.7)
    assert rejects_by_source(output) == {str(clips / "c.wav"): "missing_transcript",
                                         str(clips / "d.wav"): "empty_transcript"}


# ---------------------------------------------------------------------------------------------
# Kill and rerun, shards: all compared with one uninterrupted run
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_set(tmp_path_factory):
    """Nine short clips of two speakers at three rates, a silent clip (the longest: in the first batch, so
    a rejected line is written before the kill) and a row whose audio is missing."""
    folder = tmp_path_factory.mktemp("clip_set")
    rows = [dict(audio="silent.wav", text="Silence.", speaker="bob")]
    write_audio(folder / "silent.wav", np.zeros(int(1.2 * 24000)), 24000)
    for index in range(9):
        rate = (24000, 44100, 16000)[index % 3]
        name = f"clip_{index}.wav"
        write_audio(folder / name, voice(0.55 + 0.05 * index, rate, index), rate)
        rows.append(dict(audio=name, text=f"Sentence number {index}.", speaker=("alice", "bob")[index % 2]))
        if index == 4:
            rows.append(dict(audio="missing.wav", text="No audio."))
    return write_jsonl(folder / "raw.jsonl", rows)


@pytest.fixture(scope="module")
def reference_run(speech_tokenizer, clip_set, tmp_path_factory):
    output = tmp_path_factory.mktemp("reference") / "train.jsonl"
    prepare(speech_tokenizer, clip_set, output, "--batch_size", 2)
    return output


@pytest.fixture(scope="module")
def killed_partial(speech_tokenizer, clip_set, tmp_path_factory):
    return run_killed_after_two_batches(speech_tokenizer, clip_set, tmp_path_factory.mktemp("killed") / "train.jsonl")


def run_killed_after_two_batches(speech_tokenizer, clip_set, output):
    """The progress file of a run SIGKILLed after its second batch (a child process, as a user runs it)."""
    result = run_script(ROOT / "prepare_codes.py", "--tokenizer_model_path", speech_tokenizer, "--input", clip_set,
                        "--output_jsonl", output, "--device", "cpu", "--batch_size", 2, check=False, timeout=180,
                        env=dict(os.environ, **{prepare_codes.KILL_HOOK: "2"}))
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert not output.exists()
    partial = output.with_name("train.jsonl.partial")
    assert len(partial.read_text().splitlines()) == 1 + 4  # settings, then two batches of two
    return partial


def copy_partial(partial, output):
    output.parent.mkdir(parents=True, exist_ok=True)
    return shutil.copy(partial, output.with_name(output.name + ".partial"))


def assert_same_dataset(output, reference):
    rows = read_jsonl(output)
    assert rows == read_jsonl(reference)
    assert len({row["source"] for row in rows}) == len(rows)
    assert read_jsonl(f"{output}.rejects.jsonl") == read_jsonl(f"{reference}.rejects.jsonl")
    summary, expected = (json.loads(Path(f"{path}.summary.json").read_text()) for path in (output, reference))
    for key in ("clips", "hours", "characters_per_second", "speakers", "duration_histogram", "rejects_by_reason"):
        assert summary[key] == expected[key], key


def test_rerun_after_kill_finishes_the_same_dataset(speech_tokenizer, clip_set, reference_run, killed_partial,
                                                    tmp_path):
    output = tmp_path / "train.jsonl"
    copy_partial(killed_partial, output)
    done = [json.loads(line) for line in killed_partial.read_text().splitlines()[1:]]
    assert any(entry["rejected"] for entry in done)

    # Another batch size on the rerun: a clip's codes do not depend on its batch.
    summary = prepare(speech_tokenizer, clip_set, output, "--batch_size", 3)

    assert_same_dataset(output, reference_run)
    assert summary["throughput"]["encoded_clips"] == 9 - sum(len(entry["kept"]) for entry in done)
    assert not output.with_name("train.jsonl.partial").exists()


def test_half_written_last_line_is_cut_and_redone(speech_tokenizer, clip_set, reference_run, killed_partial,
                                                   tmp_path, capsys):
    output = tmp_path / "train.jsonl"
    partial = copy_partial(killed_partial, output)
    last = partial.read_text().splitlines()[-1]
    with open(partial, "a") as handle:
        handle.write(last[: len(last) // 2])  # a kill in the middle of a write

    prepare(speech_tokenizer, clip_set, output, "--batch_size", 2)

    assert "cut off a half-written last line" in capsys.readouterr().out
    assert_same_dataset(output, reference_run)


def test_the_trainer_reads_or_knows_every_field_prepare_codes_writes(reference_run):
    """A field prepare_codes.py adds must be one the trainer reads or knows it need not: else the
    trainer would call it unread in every row."""
    from qwen3_tts_sft.training_data import PREPARE_CODES_FIELDS, READ_FIELDS

    fields = {name for row in read_jsonl(reference_run) for name in row}
    assert fields <= set(READ_FIELDS + PREPARE_CODES_FIELDS)


def test_damaged_lines_inside_the_progress_file_are_left_out_and_redone(speech_tokenizer, clip_set, reference_run,
                                                                       killed_partial, tmp_path, capsys):
    """A line in the middle of OUTPUT.partial that is not JSON (two writers, a disk fault) costs only its
    own rows, encoded again; the rest of the progress is kept and the dataset comes out whole."""
    output = tmp_path / "train.jsonl"
    partial = copy_partial(killed_partial, output)
    lines = partial.read_text().splitlines(keepends=True)
    lines[2] = lines[2][: len(lines[2]) // 2] + lines[3]  # line 3 cut short and run into line 4
    del lines[3]
    partial.write_text("".join(lines))

    summary = prepare(speech_tokenizer, clip_set, output, "--batch_size", 2)

    assert "left out 1 damaged lines (line 3); their rows are encoded again" in capsys.readouterr().out
    assert_same_dataset(output, reference_run)
    assert summary["throughput"]["encoded_clips"] < 9  # the other finished rows were not encoded again


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(speech_tokenizer, clip_set, tmp_path):
    output = tmp_path / "train.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "import prepare_codes; from pathlib import Path\n"
                               "with prepare_codes.lock_output(Path(sys.argv[2])):\n"
                               "    print('locked', flush=True); time.sleep(60)", str(ROOT), str(output)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"another prepare_codes.py run \(process {holder.pid} on .*\) is "
                                             rf"writing {output}"):
            prepare(speech_tokenizer, clip_set, output)
    finally:
        holder.kill()
        holder.wait()
    prepare(speech_tokenizer, clip_set, output)  # the lock goes with its process
    assert output.exists()


def test_a_file_system_without_locks_runs_unlocked(speech_tokenizer, clip_set, tmp_path, monkeypatch):
    """Lustre mounted without `flock` (ENOSYS) or NFS without its lock service (ENOLCK): nobody holds the
    lock, so the run is not refused as if another one wrote the output."""
    import fcntl

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    prepare(speech_tokenizer, clip_set, tmp_path / "train.jsonl")
    assert (tmp_path / "train.jsonl").exists()


def test_an_output_folder_that_cannot_be_written_or_is_a_folder_is_named_first(speech_tokenizer, clip_set,
                                                                                tmp_path):
    with pytest.raises(SystemExit, match="is a folder: give the file to write, e.g. .*train.jsonl"):
        prepare(speech_tokenizer, clip_set, tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    # As root (CI, containers), without the capability that ignores permissions, as any user runs.
    as_a_user = [] if os.getuid() else ["setpriv", "--inh-caps", "-dac_override", "--bounding-set", "-dac_override"]
    if as_a_user and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: every folder is writable")
    result = subprocess.run(as_a_user + [sys.executable, str(ROOT / "prepare_codes.py"), "--tokenizer_model_path",
                                         str(speech_tokenizer), "--input", str(clip_set), "--output_jsonl",
                                         str(locked / "new" / "train.jsonl"), "--device", "cpu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"cannot write in {locked}/new (Permission denied); choose a folder you can write to" in result.stderr


def test_rerun_encodes_again_a_recording_replaced_since_it_was_done(speech_tokenizer, clip_set, tmp_path, capsys):
    """A user re-records a clip the killed run had already encoded, then carries on: the new recording's
    codes are published, not the old ones, and no row is written twice."""
    folder = tmp_path / "clip_set"
    shutil.copytree(clip_set.parent, folder)
    output = tmp_path / "out" / "train.jsonl"
    partial = run_killed_after_two_batches(speech_tokenizer, folder / "raw.jsonl", output)
    done = [json.loads(line) for line in partial.read_text().splitlines()[1:]]
    replaced = next(entry for entry in done if entry["kept"])["audio"]
    write_audio(Path(replaced), voice(1.5, 24000, seed=99), 24000)  # longer than any clip before: other codes

    prepare(speech_tokenizer, folder / "raw.jsonl", output, "--batch_size", 2)

    assert "1 rows or their recordings changed since the earlier run encoded them" in capsys.readouterr().out
    fresh = tmp_path / "fresh" / "train.jsonl"
    prepare(speech_tokenizer, folder / "raw.jsonl", fresh, "--batch_size", 2)
    assert_same_dataset(output, fresh)
    check_codes(next(row for row in read_jsonl(output) if row["audio"] == replaced), 1.5)


def test_rerun_with_other_settings_is_refused(speech_tokenizer, clip_set, killed_partial, tmp_path):
    output = tmp_path / "train.jsonl"
    copy_partial(killed_partial, output)
    with pytest.raises(SystemExit, match=r"--max_seconds 30.0 \(now 20.0\)"):
        prepare(speech_tokenizer, clip_set, output, "--max_seconds", 20)


def test_rerun_after_rows_were_fixed_encodes_them_again(speech_tokenizer, clip_set, tmp_path, capsys):
    """Interrupted, then rows fixed (another speaker, language, text) before carrying on: the result
    is the fixed input's, as if the run had never stopped."""
    shutil.copytree(clip_set.parent, tmp_path / "clip_set")
    raw, output = tmp_path / "clip_set" / "raw.jsonl", tmp_path / "out" / "train.jsonl"
    partial = run_killed_after_two_batches(speech_tokenizer, raw, output)
    done_lines = [int(json.loads(line)["source"].rpartition(":")[2]) for line in partial.read_text().splitlines()[1:]]
    rows = read_jsonl(raw)
    fixed_line = min(line for line in done_lines if rows[line - 1]["audio"].startswith("clip_"))
    rows[fixed_line - 1].update(speaker="carol", language="german", text="Ein anderer Satz.")
    write_jsonl(raw, rows)

    prepare(speech_tokenizer, raw, output, "--batch_size", 2)

    assert "1 rows or their recordings changed since the earlier run encoded them" in capsys.readouterr().out
    fresh = tmp_path / "fresh" / "train.jsonl"
    prepare(speech_tokenizer, raw, fresh, "--batch_size", 2)
    assert_same_dataset(output, fresh)
    carol = [row for row in read_jsonl(output) if row["speaker"] == "carol"]
    assert [(row["source"], row["language"], row["text"]) for row in carol] == [
        (f"{raw}:{fixed_line}", "german", "Ein anderer Satz.")]


def test_rerun_of_a_complete_output_does_nothing(speech_tokenizer, clip_set, reference_run, capsys):
    before = reference_run.stat().st_mtime_ns
    prepare(speech_tokenizer, clip_set, reference_run, "--batch_size", 2)
    assert "already complete" in capsys.readouterr().out
    assert reference_run.stat().st_mtime_ns == before


def test_rows_added_after_a_complete_run_are_encoded_on_the_next(speech_tokenizer, tmp_path, capsys):
    """Fixing rejected rows or adding recordings, then running the same command again, encodes them,
    and only them (OUTPUT.encoded keeps what the run before encoded); without that file, all."""
    rows = [dict(audio=str(write_audio(tmp_path / f"clip_{index}.wav", voice(0.6, 24000, index), 24000)),
                 text=f"Sentence number {index}.", speaker="alice") for index in range(3)]
    raw, output = write_jsonl(tmp_path / "raw.jsonl", rows[:2]), tmp_path / "out" / "train.jsonl"
    prepare(speech_tokenizer, raw, output)
    assert len(read_jsonl(output)) == 2
    write_jsonl(raw, rows)

    summary = prepare(speech_tokenizer, raw, output)
    assert "the input has changed since" in capsys.readouterr().out
    assert [row["text"] for row in read_jsonl(output)] == [row["text"] for row in rows]
    assert summary["throughput"]["encoded_clips"] == 1  # the added one
    prepare(speech_tokenizer, raw, output)
    assert "already complete and the input (its rows and the recordings they name) is unchanged" in capsys.readouterr().out
    codes_before = [row["audio_codes"] for row in read_jsonl(output)]
    write_audio(Path(rows[1]["audio"]), voice(0.9, 24000, 7), 24000)  # a recording replaced, the JSONL as it was
    summary = prepare(speech_tokenizer, raw, output)
    assert "the input has changed since" in capsys.readouterr().out
    codes_after = [row["audio_codes"] for row in read_jsonl(output)]
    assert codes_after[0] == codes_before[0] and codes_after[1] != codes_before[1]
    assert summary["throughput"]["encoded_clips"] == 1
    write_jsonl(raw, rows[:2])  # a row taken out: left out, nothing encoded
    summary = prepare(speech_tokenizer, raw, output)
    assert summary["throughput"]["encoded_clips"] == 0 and len(read_jsonl(output)) == 2
    output.with_name("train.jsonl.encoded").unlink()  # deleted to save disk: the next change encodes all
    write_audio(Path(rows[0]["audio"]), voice(0.7, 24000, 8), 24000)
    summary = prepare(speech_tokenizer, raw, output)
    assert summary["throughput"]["encoded_clips"] == 2 and len(read_jsonl(output)) == 2


def test_inputs_read_twice_or_an_output_inside_a_folder_input_are_refused_at_once(speech_tokenizer, tmp_path):
    folder = tmp_path / "clips"
    write_audio(folder / "take.wav", voice(0.6, 24000, 0), 24000)
    (folder / "take.txt").write_text("A sentence.")
    raw = write_jsonl(tmp_path / "raw.jsonl", [dict(audio=str(folder / "take.wav"), text="A sentence.")])
    (tmp_path / "link.jsonl").symlink_to(raw)
    (folder / "more").mkdir()
    for inputs, refusal in (([raw, tmp_path / "link.jsonl"], "is given twice"),
                            ([folder, folder / "more"], "lies inside the --input folder")):
        with pytest.raises(SystemExit, match=refusal):
            prepare_codes.main(["--tokenizer_model_path", str(speech_tokenizer), "--input", *map(str, inputs),
                                "--output_jsonl", str(tmp_path / "out" / "train.jsonl"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="--output_jsonl .* lies inside the --input folder"):
        prepare(speech_tokenizer, folder, folder / "train.jsonl")
    assert not (folder / "train.jsonl.partial").exists()


def test_an_output_that_is_an_input_or_not_ours_is_refused(speech_tokenizer, clip_set, tmp_path):
    with pytest.raises(SystemExit, match="is also an --input"):
        prepare(speech_tokenizer, clip_set, clip_set)
    stranger = tmp_path / "train.jsonl"
    stranger.write_text("{}\n")
    with pytest.raises(SystemExit, match="not as prepare_codes.py's output"):
        prepare(speech_tokenizer, clip_set, stranger)


def test_languages_are_checked_before_encoding_with_what_was_meant(speech_tokenizer, tiny_model, clip_set, tmp_path):
    with pytest.raises(SystemExit, match=r"--language 'en' is not one of .*; did you mean 'english'\?"):
        prepare(speech_tokenizer, clip_set, tmp_path / "a.jsonl", "--language", "en")
    recorded = [row for row in read_jsonl(clip_set)[1:] if row["audio"] != "missing.wav"]
    rows = [dict(row, language=language) for row, language in
            zip(recorded, ("English", "de-DE", "klingon", "danish", "vietnamese", "zh-HK"))]
    raw = write_jsonl(clip_set.with_name("languages.jsonl"), rows)
    output = tmp_path / "b.jsonl"
    prepare(tiny_model, raw, output)  # a model folder: its own config names the languages
    assert [row["language"] for row in read_jsonl(output)] == ["english"]
    problems = [reject["problem"] for reject in read_jsonl(f"{output}.rejects.jsonl")]
    assert problems[0].endswith("did you mean 'german'?") and "'klingon' is not one of" in problems[1]
    # Another language is no typo of the model's ("danish" is not "spanish", Hong Kong's Cantonese is not
    # Mandarin): its id would teach that language's accent; auto speaks a language the model has no id for.
    assert len(problems) == 5
    for problem in problems[1:]:
        assert "did you mean" not in problem and "use 'auto'" in problem


def test_shards_merge_into_the_same_dataset(speech_tokenizer, clip_set, reference_run, tmp_path):
    output = tmp_path / "train.jsonl"
    for index in range(2):
        prepare(speech_tokenizer, clip_set, output, "--shard_index", index, "--num_shards", 2, "--batch_size", 2)
    shards = [read_jsonl(tmp_path / f"train.shard-{index}-of-2.jsonl") for index in range(2)]
    assert shards[0] and shards[1] and not output.exists()

    summary = prepare_codes.main(["--merge_shards", "--num_shards", "2", "--output_jsonl", str(output)])

    assert_same_dataset(output, reference_run)
    assert summary["settings"]["num_shards"] == 2
    assert summary["throughput"]["encoded_clips"] == 9


def test_shards_of_an_input_fixed_between_their_runs_are_not_merged(speech_tokenizer, clip_set, tmp_path):
    """A row fixed after both shards ran, then only one shard run again: the merge names the stale
    one, and a launcher's rank 0 waits for it rather than merging the old file."""
    import threading

    shutil.copytree(clip_set.parent, tmp_path / "clip_set")
    raw, output = tmp_path / "clip_set" / "raw.jsonl", tmp_path / "out" / "train.jsonl"
    for index in range(2):
        prepare(speech_tokenizer, raw, output, "--shard_index", index, "--num_shards", 2, "--batch_size", 2)
    rows = read_jsonl(raw)
    rows[1]["text"] = "A fixed transcript."
    write_jsonl(raw, rows)
    fixed_shard = next(index for index in range(2) if f"{raw}:2" in
                       {row["source"] for row in read_jsonl(output.with_name(f"train.shard-{index}-of-2.jsonl"))})
    prepare(speech_tokenizer, raw, output, "--shard_index", fixed_shard, "--num_shards", 2, "--batch_size", 2)
    stale = 1 - fixed_shard
    with pytest.raises(SystemExit, match=f"shards {stale} were made from the input as it was before it changed"):
        prepare_codes.main(["--merge_shards", "--num_shards", "2", "--output_jsonl", str(output)])

    fingerprint = prepare_codes.shard_fingerprint(output.with_name(f"train.shard-{fixed_shard}-of-2.jsonl"))
    waiting = threading.Thread(target=prepare_codes.wait_for_shards, args=(output, 2, fingerprint), daemon=True)
    waiting.start()
    waiting.join(timeout=3)
    assert waiting.is_alive()  # the stale shard's old output does not count
    prepare(speech_tokenizer, raw, output, "--shard_index", stale, "--num_shards", 2, "--batch_size", 2)
    waiting.join(timeout=10)
    assert not waiting.is_alive()
    prepare_codes.main(["--merge_shards", "--num_shards", "2", "--output_jsonl", str(output)])
    assert "A fixed transcript." in {row["text"] for row in read_jsonl(output)}


def test_shards_made_with_other_flags_are_not_merged(speech_tokenizer, clip_set, tmp_path):
    """One shard job given --no_trim: its clips would be cut unlike the rest. The merge names the flag, which
    shard has which value, and what to run."""
    output = tmp_path / "train.jsonl"
    prepare(speech_tokenizer, clip_set, output, "--shard_index", 0, "--num_shards", 2)
    prepare(speech_tokenizer, clip_set, output, "--shard_index", 1, "--num_shards", 2, "--no_trim")
    with pytest.raises(SystemExit) as refused:
        prepare_codes.main(["--merge_shards", "--num_shards", "2", "--output_jsonl", str(output)])
    assert (f"{tmp_path}/train.shard-1-of-2.jsonl was written with other settings than "
            f"{tmp_path}/train.shard-0-of-2.jsonl: --trim False there, True in train.shard-0-of-2.jsonl. Every shard "
            f"needs the same flags: delete the one made with the flags you did not mean") in str(refused.value)
    assert not output.exists()


def test_merge_refuses_incomplete_shards(tmp_path):
    with pytest.raises(SystemExit, match="shard-1-of-2"):
        prepare_codes.main(["--merge_shards", "--num_shards", "2", "--output_jsonl", str(tmp_path / "train.jsonl")])


def test_merge_says_which_shards_to_run_and_names_shards_of_another_count(tmp_path):
    """A shard job killed (its progress file left), another never run, and a job that was given another
    --num_shards: the merge says what became of each and the command that finishes them."""
    (tmp_path / "train.shard-0-of-3.jsonl").write_text("")  # a job started with --num_shards 3
    (tmp_path / "train.shard-1-of-3.jsonl").write_text("")  # a job started with --num_shards 3
    (tmp_path / "train.shard-0-of-2.jsonl.partial").write_text("")  # killed mid-run
    with pytest.raises(SystemExit) as refused:
        prepare_codes.main(["--merge_shards", "--num_shards", "2", "--output_jsonl", str(tmp_path / "train.jsonl")])
    message = str(refused.value)
    assert (f"missing {tmp_path}/train.shard-0-of-2.jsonl (stopped before it finished; its run carries on from "
            f"train.shard-0-of-2.jsonl.partial); {tmp_path}/train.shard-1-of-2.jsonl (not made)") in message
    assert "Run the same command with --shard_index 0 / 1 --num_shards 2, then merge" in message
    assert f"{tmp_path} also holds shards made with --num_shards 3: every shard job" in message


def test_launcher_ranks_are_shards_and_rank_0_merges(speech_tokenizer, clip_set, reference_run, tmp_path):
    """As under `accelerate launch`: WORLD_SIZE and RANK set, no shard flags."""
    output = tmp_path / "train.jsonl"
    command = [sys.executable, str(ROOT / "prepare_codes.py"), "--tokenizer_model_path", str(speech_tokenizer),
               "--input", str(clip_set), "--output_jsonl", str(output), "--device", "cpu", "--batch_size", "2",
               "--num_workers", "0"]
    ranks = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)))
             for rank in range(2)]
    logs = [rank.communicate(timeout=300)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], logs
    assert_same_dataset(output, reference_run)
