"""Tokenize a training corpus once into a binary, memory-mapped cache that later runs reuse.

A corpus of millions of pairs must not live as Python strings and lists: building the
cache streams both files in chunks (a chunk of lines in memory at a time), tokenizes,
filters and appends the ids to flat int32 files on disk; a run then maps those files
into memory (`numpy.memmap`), so the operating system pages in what batches touch and
several processes (DDP) share one copy.

    CACHE_DIR/<key>/src.ids      int32 ids, all source sentences back to back
    CACHE_DIR/<key>/src.offsets.npy  int64 (n + 1,): sentence i is ids[off[i]:off[i+1]]
    CACHE_DIR/<key>/tgt.ids, tgt.offsets.npy
    CACHE_DIR/<key>/cache.json   what was read, kept and dropped; written last

The key is a hash of everything the ids depend on: the bytes of both files, both
tokenizer models, the SentencePiece version, the length filter and this format's version
(bump FORMAT_VERSION when the reading or filtering code changes). Changing the data or
the tokenizer therefore selects a new entry; nothing stale is ever read. An entry is
built in a temporary directory of its own and renamed into place, so a run killed while
building leaves no half-written entry behind, and two processes building the same entry
at once both end with it. The `<key>.tmp-*` directory a killed build leaves is removed
by the next build in that cache once nothing in it has changed for STALE_BUILD_S.
Entries are never evicted: delete CACHE_DIR (or an entry) to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path

import numpy as np
import sentencepiece as spm

from .data import ParallelDataset, TokenArray
from .files import InputError, decode_lines
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STALE_BUILD_S = 3600.0   # a temporary build directory untouched this long belongs to a dead build
_MISSING = object()


def cache_key(src_path: str | Path, tgt_path: str | Path, src_tok: Tokenizer, tgt_tok: Tokenizer, *,
              max_len: int | None, drop_empty: bool) -> str:
    """Hex digest of the files' bytes, the tokenizers and the filter settings."""
    h = hashlib.sha256(f"seq2seq-token-cache/{FORMAT_VERSION}|sentencepiece={spm.__version__}|"
                       f"max_len={max_len}|drop_empty={drop_empty}".encode())
    for path in (src_path, tgt_path):
        h.update(b"|file|")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    for tok in (src_tok, tgt_tok):
        h.update(b"|tokenizer|" + hashlib.sha256(tok.model_bytes).digest())
    return h.hexdigest()[:24]


def _pairs_in_chunks(src_path: Path, tgt_path: Path, chunk: int) -> Iterator[tuple[list[str], list[str]]]:
    """Both files line by line, `chunk` pairs at a time; unequal lengths are an InputError."""
    with open(src_path, "rb") as fs, open(tgt_path, "rb") as ft:
        src_lines, tgt_lines = [], []
        n = 0
        for s, t in zip_longest(decode_lines(fs, str(src_path)), decode_lines(ft, str(tgt_path)),
                                fillvalue=_MISSING):
            if s is _MISSING or t is _MISSING:
                longer = fs if s is not _MISSING else ft
                rest = 1 + sum(1 for _ in longer)
                n_src, n_tgt = (n + rest, n) if s is not _MISSING else (n, n + rest)
                raise InputError(f"parallel files differ in length: {src_path} has {n_src} lines, "
                                 f"{tgt_path} has {n_tgt} lines")
            n += 1
            src_lines.append(s)
            tgt_lines.append(t)
            if len(src_lines) == chunk:
                yield src_lines, tgt_lines
                src_lines, tgt_lines = [], []
        if src_lines:
            yield src_lines, tgt_lines


def remove_stale_builds(cache_dir: str | Path, older_than_s: float = STALE_BUILD_S) -> list[Path]:
    """Delete `*.tmp-*` build directories in which no file changed for `older_than_s` seconds.

    A live build writes its files continuously, so only builds that died are removed.
    Returns the directories removed.
    """
    removed = []
    now = time.time()
    for tmp in Path(cache_dir).glob("*.tmp-*"):
        if not tmp.is_dir():
            continue
        try:
            newest = max([tmp.stat().st_mtime] + [f.stat().st_mtime for f in tmp.iterdir()])
        except OSError:   # vanished meanwhile: another process finished or removed it
            continue
        if now - newest > older_than_s:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("token cache: removed %s, left by a build that did not finish", tmp)
            removed.append(tmp)
    return removed


def build(src_path: str | Path, tgt_path: str | Path, src_tok: Tokenizer, tgt_tok: Tokenizer, entry: Path, *,
          max_len: int | None, drop_empty: bool, chunk: int = 20_000) -> dict:
    """Write the cache entry `entry` (a directory); returns its summary (cache.json)."""
    src_path, tgt_path = Path(src_path), Path(tgt_path)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f"{entry.name}.tmp-"))
    start = time.perf_counter()
    stats = {"pairs_read": 0, "dropped_empty": 0, "dropped_too_long": 0, "pairs": 0,
             "src_tokens": 0, "tgt_tokens": 0}
    lengths: dict[str, list[np.ndarray]] = {"src": [], "tgt": []}
    try:
        with open(tmp / "src.ids", "wb") as out_src, open(tmp / "tgt.ids", "wb") as out_tgt:
            for src_lines, tgt_lines in _pairs_in_chunks(src_path, tgt_path, chunk):
                src = TokenArray.from_lists(src_tok.encode(src_lines))
                tgt = TokenArray.from_lists(tgt_tok.encode(tgt_lines))
                keep = np.ones(len(src), dtype=bool)
                if drop_empty:
                    empty = (src.lengths == 0) | (tgt.lengths == 0)
                    stats["dropped_empty"] += int(empty.sum())
                    keep &= ~empty
                if max_len is not None:
                    long = keep & ((src.lengths > max_len) | (tgt.lengths > max_len))
                    stats["dropped_too_long"] += int(long.sum())
                    keep &= ~long
                stats["pairs_read"] += len(src)
                if not keep.all():
                    idx = np.flatnonzero(keep)
                    src, tgt = src.select(idx), tgt.select(idx)
                for side, arr, out in (("src", src, out_src), ("tgt", tgt, out_tgt)):
                    out.write(arr.data.astype(np.int32, copy=False).tobytes())
                    lengths[side].append(arr.lengths)
                    stats[f"{side}_tokens"] += len(arr.data)
            for out in (out_src, out_tgt):
                out.flush()
                os.fsync(out.fileno())
        for side in ("src", "tgt"):
            lens = np.concatenate(lengths[side]) if lengths[side] else np.zeros(0, np.int64)
            offsets = np.zeros(len(lens) + 1, dtype=np.int64)
            np.cumsum(lens, out=offsets[1:])
            with open(tmp / f"{side}.offsets.npy", "wb") as out:
                np.save(out, offsets)
                out.flush()
                os.fsync(out.fileno())
        stats["pairs"] = stats["pairs_read"] - stats["dropped_empty"] - stats["dropped_too_long"]
        if stats["pairs_read"] == 0:
            raise InputError(f"empty corpus: {src_path} and {tgt_path} have no lines")
        if stats["pairs"] == 0:
            raise InputError(f"no usable sentence pairs in {src_path} / {tgt_path} after filtering")
        summary = {"format_version": FORMAT_VERSION, "source": str(src_path), "target": str(tgt_path),
                   "max_len": max_len, "drop_empty": drop_empty, **stats,
                   "build_seconds": round(time.perf_counter() - start, 3)}
        with open(tmp / "cache.json", "w") as out:
            out.write(json.dumps(summary, indent=2))
            out.flush()
            os.fsync(out.fileno())
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / "cache.json").is_file():  # not another process finishing the same entry first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _map(path: Path, n_tokens: int) -> np.ndarray:
    if n_tokens == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=np.int32)
    return np.memmap(path, dtype=np.int32, mode="r", shape=(n_tokens,))


def load(entry: Path) -> ParallelDataset:
    """The dataset of a built entry, ids and offsets memory-mapped (read-only)."""
    broken = InputError(f"token cache entry {entry} is damaged or incomplete; delete it and run again")
    try:
        summary = json.loads((entry / "cache.json").read_text())
        sides = []
        for side in ("src", "tgt"):
            offsets = np.load(entry / f"{side}.offsets.npy", mmap_mode="r")
            n_tokens = int(summary[f"{side}_tokens"])
            if len(offsets) != summary["pairs"] + 1 or int(offsets[-1]) != n_tokens or \
                    (entry / f"{side}.ids").stat().st_size != 4 * n_tokens:
                raise broken
            sides.append(TokenArray(_map(entry / f"{side}.ids", n_tokens), offsets))
    except (OSError, ValueError, KeyError, TypeError):  # unreadable, truncated or garbled files
        raise broken from None
    return ParallelDataset(*sides)


def cached_dataset(src_path: str | Path, tgt_path: str | Path, src_tok: Tokenizer, tgt_tok: Tokenizer,
                   cache_dir: str | Path, *, max_len: int | None = None, drop_empty: bool = True) -> ParallelDataset:
    """The tokenized, filtered corpus from CACHE_DIR, built there first if it is not yet.

    Equal, pair for pair, to `ParallelDataset.from_files` with the same arguments.
    """
    for p in (src_path, tgt_path):
        if Path(p).is_dir():
            raise InputError(f"expected a file, got a directory: {p}")
        if not Path(p).is_file():
            raise InputError(f"file not found: {p}")
    entry = Path(cache_dir) / cache_key(src_path, tgt_path, src_tok, tgt_tok, max_len=max_len,
                                        drop_empty=drop_empty)
    if (entry / "cache.json").is_file():
        log.info("token cache: reusing %s", entry)
    else:
        if entry.parent.is_dir():
            remove_stale_builds(entry.parent)
        summary = build(src_path, tgt_path, src_tok, tgt_tok, entry, max_len=max_len, drop_empty=drop_empty)
        log.info("token cache: %s -> %s: %d pairs kept of %d (%d with an empty side, %d longer than %s "
                 "subwords) in %.1f s", src_path, entry, summary["pairs"], summary["pairs_read"],
                 summary["dropped_empty"], summary["dropped_too_long"], max_len, summary["build_seconds"])
    return load(entry)
