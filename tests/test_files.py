"""Reading user text and checking where output goes: the policies of seq2seq/files.py and friends."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from seq2seq.files import InputError, check_output_path, decode_lines, read_lines
from seq2seq.metrics import corpus_scores
from seq2seq.tokenizer import train_tokenizer, valid_text
from seq2seq.train import check_test_split


def test_a_byte_order_mark_opening_a_file_is_dropped_and_nowhere_else(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfEin Hund.\r\n\xef\xbb\xbfzwei\n")
    assert read_lines(path) == ["Ein Hund.", "\ufeffzwei"]
    assert list(decode_lines([b"a\n", b"b"], "x")) == ["a", "b"]


def test_a_carriage_return_inside_a_line_is_a_space_with_a_warning_naming_the_line(caplog):
    # classic Mac line ends: the file is one line to `wc -l`, and so to us, but not silently
    assert list(decode_lines([b"ok\r\n", b"eins\rzwei\rdrei\r"], "mac.txt")) == ["ok", "eins zwei drei"]
    assert "mac.txt:2: 2 carriage return(s) inside the line read as spaces" in caplog.text
    assert "mac.txt:1" not in caplog.text


def test_an_output_path_that_is_a_directory_is_refused_before_any_work(tmp_path):
    with pytest.raises(InputError, match=f"--output {tmp_path} is a directory"):
        check_output_path(tmp_path)
    check_output_path(tmp_path / "new" / "out.txt")      # its folder is made
    assert (tmp_path / "new").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="cannot create its folder"):
        check_output_path(tmp_path / "file" / "out.txt")


def test_nothing_to_score_is_an_error_not_a_crash_inside_sacrebleu():
    with pytest.raises(ValueError, match="cannot score: refs.txt has no lines"):
        corpus_scores([], [], ref_name="refs.txt")


def test_lone_surrogates_become_the_replacement_character_and_encode(tmp_path):
    # what JSON's "\ud800" and Python's reading of invalid UTF-8 in argv (surrogateescape) give
    assert valid_text("a\ud800b\udcff") == "a\ufffdb\ufffd"
    assert valid_text("plain") == "plain" and valid_text("Straße") == "Straße"
    path = tmp_path / "text.txt"
    path.write_text("ein Hund läuft\nzwei Hunde laufen\n" * 20)
    tok = train_tokenizer([path], 30, model_type="word")
    assert tok.encode(["Hund\ud800"]) == tok.encode(["Hund\ufffd"])


def split_config(tmp_path) -> object:
    return OmegaConf.create({"data": {"dir": str(tmp_path), "test": "test", "src_lang": "en", "tgt_lang": "de"}})


@pytest.mark.parametrize("files,expected", [
    ({"en": "a\nb\n", "de": "a\n"}, r"test files differ in length: .*test.en has 2 lines, .*test.de has 1"),
    ({"en": "a\n"}, r"test split: .*test.en exists but .*test.de does not"),
    ({"en": "", "de": ""}, "test split is empty"),
])
def test_a_broken_test_split_fails_before_training(tmp_path, files, expected):
    for lang, text in files.items():
        (tmp_path / f"test.{lang}").write_text(text)
    with pytest.raises(InputError, match=expected):
        check_test_split(split_config(tmp_path))


def test_no_test_split_or_a_sound_one_passes(tmp_path):
    check_test_split(split_config(tmp_path))                     # none: scored nowhere, said in the log
    (tmp_path / "test.en").write_text("a\nb")                     # no final newline: still 2 lines
    (tmp_path / "test.de").write_text("x\ny\n")
    check_test_split(split_config(tmp_path))
