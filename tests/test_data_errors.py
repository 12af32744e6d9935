"""Bad training data is named by file, line and field, before any training starts."""

import json
import unicodedata

import pytest

from helpers import read_jsonl, train
from qwen3_tts_sft.sequence_layout import SpecialIds
from qwen3_tts_sft.training_data import DataError, apply_length_limits, read_clips


class Config:
    """The few config fields read_clips needs, as in the published 1.7B config."""

    tts_pad_token_id, tts_bos_token_id, tts_eos_token_id = 151671, 151672, 151673

    class talker_config:
        codec_pad_id, codec_bos_id, codec_eos_token_id = 2148, 2149, 2150
        codec_think_id, codec_nothink_id, codec_think_bos_id, codec_think_eos_id = 2154, 2155, 2156, 2157
        codec_language_id = {"english": 2050, "chinese": 2055}
        num_code_groups = 16

        class code_predictor_config:
            vocab_size = 2048


IDS = SpecialIds.from_config(Config)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture
def good_row(coded_clips):
    return read_jsonl(coded_clips)[0]


def test_each_bad_field_is_reported_with_file_line_and_field(good_row, tmp_path):
    def variant(**changes):
        row = dict(good_row)
        for key, value in changes.items():
            if value is None:
                row.pop(key, None)
            else:
                row[key] = value
        return json.dumps(row)

    lines = [
        variant(),                                          # 1 good
        "{not json",                                        # 2
        variant(text=None),                                 # 3
        variant(text="   "),                                # 4
        variant(audio_codes=[[1] * 15] * 4),                # 5 wrong group count
        variant(audio_codes=[[1] * 16, [1] * 15]),          # 6 ragged
        variant(audio_codes=[[5000] * 16] * 3),             # 7 outside the codebook
        variant(audio_codes=[]),                            # 8 no frames
        variant(ref_audio=str(tmp_path / "missing.wav")),   # 9
        variant(language="klingon"),                        # 10
        variant(speaker=None),                              # 11 no speaker and no default
        "[1, 2, 3]",                                        # 12 not an object
        variant(text="...!?"),                              # 13 no words to speak
        variant(text="<speak>Hi.</speak>"),                 # 14 markup, not the words spoken
    ]
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as raised:
        read_clips(path, IDS)
    report = str(raised.value)
    expected = {2: "(json)", 3: "text", 4: "text", 5: "audio_codes", 6: "audio_codes", 7: "audio_codes",
                8: "audio_codes", 9: "ref_audio", 10: "language", 11: "speaker", 12: "(row)", 13: "text", 14: "text"}
    for line, field in expected.items():
        assert f"{path}:{line}: {field}: " in report, f"line {line} ({field}) not reported:\n{report}"
    assert f"{path}:1:" not in report
    assert "13 of 14 rows" in report
    assert "'...!?' has no letters or digits" in report
    assert "holds markup (<speak>, </speak>)" in report


def test_rows_made_by_hand_say_what_to_fix(good_row, tmp_path):
    """Mistakes of a JSONL written by hand: a field under another name (the row's fields are named),
    codes written as a string, a text far longer than its audio could say, a missing reference (what
    it is and who writes it), and absolute paths from another machine."""
    codes = good_row["audio_codes"]
    rows = [dict(good_row, codes=codes, audio_codes=None),
            dict(good_row, audio_codes=json.dumps(codes)),
            dict(good_row, text="word " * (13 * len(codes))),
            {key: value for key, value in good_row.items() if key != "ref_audio"},
            dict(good_row, ref_audio="/home/someone/elsewhere/ref.wav"),
            dict(good_row, speaker=1088)]  # LibriTTS's speaker ids, as pandas writes them
    path = write_lines(tmp_path / "by_hand.jsonl", [json.dumps(row) for row in rows])
    with pytest.raises(DataError) as raised:
        read_clips(path, IDS)
    report = str(raised.value)
    assert f"{path}:1: audio_codes: missing (the row has " in report and "'codes'" in report
    assert f"{path}:2: audio_codes: is a string: it must be a JSON list of frames" in report
    assert f"{path}:3: text: " in report and "characters/s, faster than anyone speaks (60)" in report
    assert f"{path}:4: ref_audio: missing (the row has " in report and "prepare_codes.py writes" in report
    assert "nor its folder /home/someone/elsewhere: was the JSONL written on another machine?" in report
    assert f'{path}:6: speaker: is the number 1088, not a name: write it as a string ("1088")' in report


def test_fields_the_trainer_does_not_read_are_named_once(good_row, tmp_path):
    rows = [dict(good_row, lang="chinese"), dict(good_row, lang="chinese", speaker_name="anna"), good_row]
    path = write_lines(tmp_path / "misnamed.jsonl", [json.dumps(row) for row in rows])
    said = []
    assert len(read_clips(path, IDS, log=said.append)) == 3
    assert said == [f"note: {path}: fields the trainer does not read, left as they are: 'lang' (2 rows), "
                    f"'speaker_name' (1 rows); the fields it reads are text, audio_codes, ref_audio, audio, speaker, "
                    f"language"]


def test_a_file_that_is_no_jsonl_is_named_as_what_it_is(tmp_path):
    array = tmp_path / "records.jsonl"
    array.write_text('[\n  {"text": "Hi."}\n]\n')  # pandas' to_json(orient="records"), pretty-printed
    utf16 = tmp_path / "powershell.jsonl"
    utf16.write_bytes('{"text": "Hi."}\n'.encode("utf-16"))
    with pytest.raises(DataError, match="is one JSON array, not a JSON object a line: convert it with jq"):
        read_clips(array, IDS)
    with pytest.raises(DataError, match="is UTF-16 text: save it as UTF-8"):
        read_clips(utf16, IDS)


def test_a_problem_every_row_shares_is_one_line_with_its_fix(good_row, tmp_path):
    """No --speaker_name and no speaker in any row: one line that counts the rows and names the flag,
    a wrong language with what was meant, and no advice to raise the bad-row limit."""
    rows = [dict(good_row, text=f"Row {index}.", language="en") for index in range(6)]
    for row in rows:
        row.pop("speaker")
    path = write_lines(tmp_path / "nameless.jsonl", [json.dumps(row) for row in rows])
    with pytest.raises(DataError) as raised:
        read_clips(path, IDS)
    report = str(raised.value).splitlines()
    assert report == [
        f"{path}: 6 rows (lines 1, 2, ... 6): language: 'en' is not one of ['auto', 'chinese', 'english']; "
        f"did you mean 'english'?",
        f"{path}: 6 rows (lines 1, 2, ... 6): speaker: missing, and no --speaker_name was given (pass "
        f"--speaker_name NAME, or give the row a \"speaker\")",
        f"none of the 6 rows in {path} can be trained on"]


def test_a_recordings_list_is_named_as_such_and_nothing_else(good_row, tmp_path):
    """Rows with audio but no codes (prepare_codes.py's input): one message with the command; their
    missing references and speakers are prepare_codes.py's to handle, so they are not listed."""
    rows = [dict(audio=f"wavs/{index}.wav", text=f"Row {index}.") for index in range(5)]
    path = write_lines(tmp_path / "raw.jsonl", [json.dumps(row) for row in rows])
    with pytest.raises(DataError) as raised:
        read_clips(path, IDS)
    report = str(raised.value)
    assert report.startswith(f"{path}: 5 rows (the first at {path}:1) have \"audio\" but no \"audio_codes\"")
    assert "python prepare_codes.py" in report and "ref_audio" not in report and "speaker" not in report


def test_a_few_bad_rows_are_skipped_and_no_good_row_is_lost(good_row, tmp_path):
    lines = [json.dumps(dict(good_row, text=f"clip {i}")) for i in range(199)] + ["{broken"]
    messages = []
    clips = read_clips(write_lines(tmp_path / "mostly_good.jsonl", lines), IDS, log=messages.append,
                       max_bad_fraction=0.01)
    assert [clip.text for clip in clips] == [f"clip {i}" for i in range(199)]
    assert "mostly_good.jsonl:200: (json)" in messages[0] and "skipping 1 bad rows of 200" in messages[0]


def test_strict_stops_at_the_first_bad_row(good_row, tmp_path):
    lines = [json.dumps(good_row)] * 300 + [json.dumps(dict(good_row, language="elvish")), "{broken"]
    with pytest.raises(DataError) as raised:
        read_clips(write_lines(tmp_path / "data.jsonl", lines), IDS, strict=True)
    assert "data.jsonl:301: language:" in str(raised.value) and ":302:" not in str(raised.value)


def test_bytes_that_are_not_utf8_spoil_their_row_only(good_row, tmp_path):
    good = json.dumps(good_row).encode()
    latin1 = json.dumps(dict(good_row, text="caf\u00e9")).encode().replace(b"\\u00e9", "\u00e9".encode("latin-1"))
    assert b"caf\xe9" in latin1  # what an editor saving in Latin-1 writes
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([good] * 150 + [latin1] + [good] * 49) + b"\n")
    messages = []
    assert len(read_clips(path, IDS, log=messages.append, max_bad_fraction=0.01)) == 199
    column = latin1.index(b"\xe9") + 1
    assert f"mixed.jsonl:151: (encoding): byte {column} of the line (0xe9) is not UTF-8" in messages[0]
    assert "skipping 1 bad rows of 200" in messages[0]
    with pytest.raises(DataError) as raised:
        read_clips(path, IDS, strict=True)
    assert "mixed.jsonl:151: (encoding):" in str(raised.value) and "--strict" in str(raised.value)


def test_a_line_cut_short_is_named_at_its_own_line_and_end(good_row, tmp_path):
    whole = json.dumps(good_row)
    cut = whole[:whole.index('"audio_codes"') + len('"audio_codes": [[1, 2],')]
    path = write_lines(tmp_path / "cut.jsonl", [whole, cut] + [whole] * 198)
    messages = []
    read_clips(path, IDS, log=messages.append)
    assert f"cut.jsonl:2: (json): not valid JSON (Expecting value at column {len(cut) + 1}); the line ends " \
           f"inside the JSON (cut short?)" in messages[0]
    assert ":3:" not in messages[0]

    # Cut inside a string: the parser names where the string starts, which is still a line cut short.
    in_text = whole[:whole.index('"text"') + len('"text": "Hel')]
    path = write_lines(tmp_path / "cut_text.jsonl", [in_text] + [whole] * 199)
    read_clips(path, IDS, log=messages.append)
    column = in_text.index('"Hel') + 1
    assert f"cut_text.jsonl:1: (json): not valid JSON (Unterminated string starting at column {column}); the line " \
           f"ends inside the JSON (cut short?)" in messages[1]


def test_a_byte_order_mark_does_not_spoil_the_first_row(good_row, tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(good_row) + "\r\n").encode() * 2)  # as Windows Notepad saves
    assert len(read_clips(path, IDS, strict=True)) == 2


def test_a_dialect_is_no_language_a_row_can_name(good_row, tmp_path):
    """A CustomVoice model's dialects (sichuan_dialect) have language ids, but generate_custom_voice
    refuses them as languages: the row is told so, not that the model has no id for it."""
    path = write_lines(tmp_path / "dialect.jsonl", [json.dumps(dict(good_row, language="sichuan_dialect"))])
    with pytest.raises(DataError) as raised:
        read_clips(path, IDS)
    assert (f"{path}:1: language: 'sichuan_dialect' is not one of ['auto', 'chinese', 'english']: a dialect is "
            f"spoken by a built-in dialect speaker") in str(raised.value)
    assert "has no id for" not in str(raised.value)


def test_default_speaker_name_and_language_case(good_row, tmp_path):
    row = {key: value for key, value in good_row.items() if key != "speaker"}
    clips = read_clips(write_lines(tmp_path / "d.jsonl", [json.dumps(dict(row, language="English"))]), IDS,
                       default_speaker="My_Voice")
    assert (clips[0].speaker, clips[0].language) == ("my_voice", "english")
    # null, as pandas writes a missing value, is the field left out
    clips = read_clips(write_lines(tmp_path / "null.jsonl", [json.dumps(dict(row, speaker=None, language=None))]),
                       IDS, default_speaker="My_Voice")
    assert (clips[0].speaker, clips[0].language) == ("my_voice", "auto")
    # A name decomposed (NFD, as a macOS file name holds it) is stored as typed (NFC): generate() compares
    # strings, and generate_custom_voice(speaker="Nguyễn") must find it.
    decomposed = unicodedata.normalize("NFD", "Nguyễn")
    clips = read_clips(write_lines(tmp_path / "nfd.jsonl", [json.dumps(dict(row, speaker=decomposed))]), IDS)
    assert clips[0].speaker == "nguyễn" == unicodedata.normalize("NFC", "Nguyễn").lower()


def test_a_speaker_name_in_decomposed_unicode_is_the_name_as_typed(good_row, tmp_path):
    """"zoë" from a macOS folder name is "zoe" + U+0308; typed, it is one character. Both are one voice,
    known by the typed form: else a voice added so would be a second "zoë" beside an existing one, and
    generate_custom_voice(speaker="zoë") would speak the other."""
    rows = [json.dumps(dict(good_row, speaker=name)) for name in ("Zoe\u0308", "zo\u00eb")]
    clips = read_clips(write_lines(tmp_path / "z.jsonl", rows), IDS)
    assert [clip.speaker for clip in clips] == ["zo\u00eb", "zo\u00eb"]


def test_the_trainer_refuses_bad_data_before_training(tiny_model, good_row, tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(good_row), json.dumps(dict(good_row, audio_codes="x"))])
    with pytest.raises(SystemExit) as raised:
        train(tiny_model, path, tmp_path / "out")
    assert "bad.jsonl:2: audio_codes:" in str(raised.value)
    assert not (tmp_path / "out").exists()
    path.write_bytes(json.dumps(good_row).encode() + b"\n" + json.dumps(dict(good_row, text="\u00e9")).encode()
                     .replace(b"\\u00e9", b"\xe9") + b"\n")
    with pytest.raises(SystemExit) as raised:
        train(tiny_model, path, tmp_path / "out", strict=True)
    assert "bad.jsonl:2: (encoding):" in str(raised.value)


def test_length_limits_drop_and_count_long_clips(good_row, tmp_path):
    frames = len(good_row["audio_codes"])
    long_row = dict(good_row, audio_codes=good_row["audio_codes"] * 3)
    clips = read_clips(write_lines(tmp_path / "d.jsonl", [json.dumps(good_row), json.dumps(long_row)]), IDS,
                       prompter=lambda text: list(range(20)))
    messages = []
    kept = apply_length_limits(clips, max_audio_seconds=(frames + 1) / 12.5, max_text_tokens=0, log=messages.append)
    assert len(kept) == 1 and kept[0].num_frames == frames
    assert messages == [f"dropped 1 clips longer than {(frames + 1) / 12.5} s (--max_audio_seconds): "
                        f"{tmp_path / 'd.jsonl'}:2 ({3 * frames / 12.5:.1f} s)"]
    messages.clear()
    assert apply_length_limits(clips, max_audio_seconds=0, max_text_tokens=25, log=messages.append) == clips
    with pytest.raises(DataError):
        apply_length_limits(clips, max_audio_seconds=0, max_text_tokens=10, log=messages.append)


def test_a_clip_longer_than_the_model_takes_is_named(good_row, tmp_path):
    long = dict(good_row, text="x" * 500, audio_codes=good_row["audio_codes"] * 30)  # speakable: 500 characters in 26 s
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(good_row)] * 3 + [json.dumps(long)])
    with pytest.raises(DataError) as raised:
        read_clips(path, IDS, prompter=lambda text: [0] * (len(text) + 8), max_positions=300)
    assert f"{path}:4: text: text and audio need" in str(raised.value) and "the model takes 300" in str(raised.value)


def test_reference_audio_at_any_rate_and_channel_count_is_used(good_row, tmp_path):
    import numpy as np
    import soundfile as sf

    from qwen3_tts_sft.speakers import reference_mel

    mono, rate = sf.read(good_row["ref_audio"], dtype="float32")
    stereo_48k = np.repeat(np.interp(np.arange(len(mono) * 2) / 2, np.arange(len(mono)), mono)[:, None], 2, axis=1)
    sf.write(tmp_path / "ref_48k_stereo.flac", stereo_48k, 48000)
    clips = read_clips(write_lines(tmp_path / "d.jsonl", [json.dumps(dict(good_row, ref_audio=str(tmp_path / "ref_48k_stereo.flac")))]), IDS)
    original, resampled = reference_mel(good_row["ref_audio"], 24000), reference_mel(clips[0].ref_audio, 24000)
    assert abs(original.shape[1] - resampled.shape[1]) <= 1
    frames = min(original.shape[1], resampled.shape[1])
    assert (original[:, :frames] - resampled[:, :frames]).abs().mean() < 0.5  # log-mel: same audio, resampled


def test_unusable_reference_clips_are_left_out_of_the_voice_and_named(tiny_model, coded_clips, tmp_path, capsys):
    """A hand-made JSONL may name a silent or a 40 s reference: the trainer leaves it out of the
    speaker's vector and names it (file, line, field); a voice with no usable reference is refused."""
    import numpy as np
    import soundfile as sf

    from qwen3_tts_sft import checkpoint

    rows = [row for row in read_jsonl(coded_clips) if row["speaker"] == "alice"]
    silent, long_take = tmp_path / "silent.wav", tmp_path / "long_take.wav"
    sf.write(silent, np.zeros(48000, dtype=np.float32), 24000)
    sf.write(long_take, 0.1 * np.sin(np.arange(24000 * 40) / 10).astype(np.float32), 24000)
    data = tmp_path / "train.jsonl"
    write_lines(data, [json.dumps(dict(rows[0], ref_audio=str(silent)))]
                + [json.dumps(row) for row in rows[1:]])
    output = train(tiny_model, data, tmp_path / "out", max_steps=1)
    printed = capsys.readouterr().out
    assert (f"{data}:1: ref_audio: {silent}: silent: level -inf dBFS is below -50 dBFS; left out of alice's "
            "voice vector") in printed
    references = checkpoint.read_trainer_state(output / "checkpoint-step-1").speakers[0]["reference_audio"]
    assert references == [rows[1]["ref_audio"]]

    write_lines(data, [json.dumps(dict(row, ref_audio=str(long_take))) for row in rows])
    with pytest.raises(SystemExit) as raised:
        train(tiny_model, data, tmp_path / "out2", max_steps=1)
    message = str(raised.value)
    assert "speaker 'alice' has no usable reference clip" in message
    assert f"{data}:1: ref_audio: {long_take}: 40.0 s long, over --max_audio_seconds 30" in message


def test_a_reference_too_short_for_a_voice_is_named_for_every_speaker_that_uses_it(tmp_path):
    """A 0.05 s reference would crash the speaker encoder; two speakers naming the same bad file each
    hear about it."""
    from types import SimpleNamespace

    import numpy as np
    import soundfile as sf

    from qwen3_tts_sft.speakers import assign_speakers, reference_problem

    blip, good = tmp_path / "blip.wav", tmp_path / "good.wav"
    sf.write(blip, 0.3 * np.sin(np.arange(1200) * 0.3).astype(np.float32), 24000)
    sf.write(good, 0.3 * np.sin(np.arange(48000) * 0.05).astype(np.float32), 24000)
    assert reference_problem(blip) == "0.05 s long, under 0.5 s: too short to give a voice"
    clips = [SimpleNamespace(source=f"d.jsonl:{line}", speaker=speaker, ref_audio=ref)
             for line, (speaker, ref) in enumerate([("alice", blip), ("alice", good), ("bob", blip), ("bob", good)], 1)]
    ids = dict(codec_pad_id=4, codec_bos_id=5, codec_eos_token_id=6, codec_think_id=7, codec_nothink_id=8,
               codec_think_bos_id=9, codec_think_eos_id=10)
    config = SimpleNamespace(spk_id={}, codec_language_id={}, vocab_size=4096, **ids)
    alice, bob = assign_speakers(clips, config, reference_problem=reference_problem)
    assert alice.reference_audio == bob.reference_audio == [good]
    assert [source for source, _, _ in alice.unusable_references + bob.unusable_references] == ["d.jsonl:1", "d.jsonl:3"]


def test_an_eval_split_that_leaves_nothing_to_train_on_is_an_error_not_a_traceback(tiny_model, good_row, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(good_row)] * 3)
    with pytest.raises(SystemExit, match=r"--eval_split 0.9 of 3 clips holds out 3, leaving none to train on"):
        train(tiny_model, data, tmp_path / "out", eval_split=0.9, max_steps=1)
