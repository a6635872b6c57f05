"""The training corpus's token cache: equal to tokenizing in memory, reused, invalidated, atomic."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest

from seq2seq import token_cache
from seq2seq.data import ParallelDataset
from seq2seq.files import InputError
from seq2seq.token_cache import cache_key, cached_dataset
from seq2seq.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok(toy_data):
    return train_tokenizer([toy_data / "train.src", toy_data / "train.tgt"], 100, model_type="word")


@pytest.fixture
def corpus(tmp_path, toy_data):
    """Toy pairs plus an empty source line and a pair too long for max_len=12."""
    src = (toy_data / "train.src").read_text().splitlines()[:500]
    tgt = (toy_data / "train.tgt").read_text().splitlines()[:500]
    src[7], tgt[300] = "", " ".join([tgt[300]] * 8)
    s, t = tmp_path / "c.src", tmp_path / "c.tgt"
    s.write_text("\n".join(src) + "\n")
    t.write_text("\n".join(tgt) + "\n")
    return s, t


def _pairs(ds: ParallelDataset) -> list[tuple[list[int], list[int]]]:
    return [(ds[i][1].tolist(), ds[i][2].tolist()) for i in range(len(ds))]


def test_cache_equals_in_memory_tokenization_and_is_memory_mapped(corpus, tok, tmp_path):
    expected = ParallelDataset.from_files(*corpus, tok, tok, max_len=12)
    cached = cached_dataset(*corpus, tok, tok, tmp_path / "cache", max_len=12)
    assert len(cached) == len(expected) == 498          # one empty side, one too long
    assert _pairs(cached) == _pairs(expected)
    assert np.array_equal(cached.lengths, expected.lengths)
    assert isinstance(cached.src.data, np.memmap) and isinstance(cached.tgt.data, np.memmap)


def test_second_run_reuses_the_entry_without_tokenizing(corpus, tok, tmp_path, monkeypatch, caplog):
    first = cached_dataset(*corpus, tok, tok, tmp_path / "cache", max_len=12)
    monkeypatch.setattr(token_cache, "build", lambda *a, **k: pytest.fail("rebuilt an existing entry"))
    with caplog.at_level(logging.INFO, logger="seq2seq.token_cache"):
        again = cached_dataset(*corpus, tok, tok, tmp_path / "cache", max_len=12)
    assert "reusing" in caplog.text
    assert _pairs(again) == _pairs(first)


def test_changed_data_tokenizer_or_filter_selects_a_new_entry(corpus, tok, toy_data, tmp_path):
    src, tgt = corpus
    key = cache_key(src, tgt, tok, tok, max_len=12, drop_empty=True)
    other_tok = train_tokenizer([toy_data / "train.src", toy_data / "train.tgt"], 60, model_type="word")
    assert cache_key(src, tgt, other_tok, tok, max_len=12, drop_empty=True) != key
    assert cache_key(src, tgt, tok, tok, max_len=13, drop_empty=True) != key
    before = cached_dataset(src, tgt, tok, tok, tmp_path / "cache", max_len=12)
    lines = tgt.read_text().splitlines()
    lines[0] = " ".join(reversed(lines[0].split()))   # one target sentence changes its words
    tgt.write_text("\n".join(lines) + "\n")
    assert cache_key(src, tgt, tok, tok, max_len=12, drop_empty=True) != key
    after = cached_dataset(src, tgt, tok, tok, tmp_path / "cache", max_len=12)
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2
    assert after[0][2].tolist() == list(reversed(before[0][2].tolist())) != before[0][2].tolist()
    assert _pairs(after) == _pairs(ParallelDataset.from_files(src, tgt, tok, tok, max_len=12))


@pytest.mark.parametrize("max_len,drop_empty", [(None, False), (5, True)])
def test_awkward_files_in_many_chunks_equal_in_memory_reading(tmp_path, tok, toy_data, max_len, drop_empty, caplog):
    """CRLF endings, invalid UTF-8, whitespace-only lines, no final newline; chunks of 7 lines."""
    src = (toy_data / "train.src").read_text().splitlines()[:60]
    tgt = (toy_data / "train.tgt").read_text().splitlines()[:60]
    src[3], tgt[10], src[20] = "   ", "", src[20] + " " + src[21]
    s, t = tmp_path / "a.src", tmp_path / "a.tgt"
    s.write_bytes("\r\n".join(src).encode().replace(b"\r\n", b"\xff\xfe\r\n", 1) + b"\r\n")
    t.write_bytes("\n".join(tgt).encode())   # no newline at the end
    entry = tmp_path / "cache" / "e"
    with caplog.at_level(logging.WARNING):
        token_cache.build(s, t, tok, tok, entry, max_len=max_len, drop_empty=drop_empty, chunk=7)
    assert f"{s}:1: invalid UTF-8" in caplog.text
    expected = ParallelDataset.from_files(s, t, tok, tok, max_len=max_len, drop_empty=drop_empty)
    assert _pairs(token_cache.load(entry)) == _pairs(expected)


def test_memory_mapped_corpus_travels_to_workers_as_a_file_reference(corpus, tok, tmp_path):
    import pickle

    ds = cached_dataset(*corpus, tok, tok, tmp_path / "cache", max_len=12)
    blob = pickle.dumps(ds)
    assert len(blob) < 2000 < ds.src.data.nbytes + ds.tgt.data.nbytes   # references, not the ids
    again = pickle.loads(blob)
    assert isinstance(again.src.data, np.memmap) and _pairs(again) == _pairs(ds)


def test_a_damaged_entry_names_itself(corpus, tok, tmp_path):
    cached_dataset(*corpus, tok, tok, tmp_path / "cache", max_len=12)
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    with open(entry / "tgt.ids", "r+b") as f:
        f.truncate(100)
    with pytest.raises(InputError, match=f"token cache entry {entry} is damaged"):
        cached_dataset(*corpus, tok, tok, tmp_path / "cache", max_len=12)
    (entry / "cache.json").write_text("")
    with pytest.raises(InputError, match=f"token cache entry {entry} is damaged"):
        cached_dataset(*corpus, tok, tok, tmp_path / "cache", max_len=12)


def test_unequal_line_counts_name_both_files_and_counts(corpus, tok, tmp_path):
    src, tgt = corpus
    tgt.write_text(tgt.read_text() + "one more line\nand another\n")
    with pytest.raises(InputError, match=rf"{src} has 500 lines, {tgt} has 502 lines"):
        cached_dataset(src, tgt, tok, tok, tmp_path / "cache")
    src.write_text(src.read_text() + "x\n" * 5)
    with pytest.raises(InputError, match=rf"{src} has 505 lines, {tgt} has 502 lines"):
        cached_dataset(src, tgt, tok, tok, tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())   # nothing left behind


def test_a_build_that_dies_leaves_no_entry(corpus, tok, tmp_path, monkeypatch):
    calls = []

    class Failing:
        model_bytes = tok.model_bytes

        def encode(self, lines):
            calls.append(len(lines))
            if len(calls) == 3:
                raise KeyboardInterrupt  # killed in the middle of the corpus
            return tok.encode(lines)

    with pytest.raises(KeyboardInterrupt):
        token_cache.build(*corpus, Failing(), Failing(), tmp_path / "cache" / "entry", max_len=None,
                          drop_empty=True, chunk=100)
    assert list((tmp_path / "cache").iterdir()) == []
    # the next run builds the entry whole
    assert len(cached_dataset(*corpus, tok, tok, tmp_path / "cache")) == 499


def test_a_build_killed_outright_is_cleaned_up_by_a_later_build_once_stale(corpus, tok, tmp_path, caplog):
    cache = tmp_path / "cache"
    dead, live = cache / "abc.tmp-dead", cache / "abc.tmp-live"   # SIGKILL leaves such directories
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "src.ids").write_bytes(b"\0" * 8)
    old = time.time() - token_cache.STALE_BUILD_S - 60
    for path in (dead / "src.ids", dead):
        os.utime(path, (old, old))
    with caplog.at_level(logging.WARNING, logger="seq2seq.token_cache"):
        assert len(cached_dataset(*corpus, tok, tok, cache)) == 499
    assert not dead.exists() and live.is_dir()      # a build still writing is left alone
    assert f"removed {dead}, left by a build that did not finish" in caplog.text


def test_empty_corpus_is_an_error_naming_the_files(tmp_path, tok):
    s, t = tmp_path / "e.src", tmp_path / "e.tgt"
    s.write_text("")
    t.write_text("")
    with pytest.raises(InputError, match="empty corpus: .*e.src and .*e.tgt"):
        cached_dataset(s, t, tok, tok, tmp_path / "cache")
