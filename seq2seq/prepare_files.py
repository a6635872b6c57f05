"""``seq2seq-prepare files``: your own parallel corpus, any language pair, as training files.

Data path
---------
``prepare_files(out_dir, src_lang, tgt_lang, tsv=...)`` (or ``source_file=..., target_file=...``)
reads one TSV (``SOURCE<TAB>TARGET``, further columns ignored) or two line-aligned files,
each plain or compressed (``.gz``, ``.xz``, ``.bz2``), and writes
``OUT/{train,valid,test}.{SRC,TGT}``: what ``seq2seq-train data=files data.dir=OUT
data.src_lang=SRC data.tgt_lang=TGT`` reads. A summary (pairs read / kept / dropped per
reason, lines fixed per fix type, throughput) goes to stderr and ``OUT/prepare.json``, as
for the public corpora (corpora.py).

Policies
--------
* The public corpora's cleaning (corpora.py): every line is fixed (whitespace, NFC;
  ``normalise_line``) and training pairs are dropped and counted per reason
  (``drop_reason``: empty, placeholder, too_long, ratio; then duplicate), with two more
  reasons: ``malformed``, a TSV row with no TAB (a blank line too), dropped in place so
  the rows after it keep their pairing; and ``overlap``, a training pair whose source
  sentence is also a source sentence of your validation or test files. The first
  matching reason of ``FILES_DROP_REASONS`` is the one counted.
* Held-out splits given as files (``--valid-files``, ``--test-files``) are kept whole:
  every line is fixed, none is dropped, so scores stay comparable with other work on them.
* Otherwise they are drawn from the cleaned corpus, as the Tatoeba split is: normalised
  source sentences are ordered by a seeded hash (``corpora.split_rank``) and test, then
  valid, take sentences with all their pairs until each holds at least its size. A source
  sentence and all its translations land in one split, so no source sentence of valid or
  test occurs in train, and the split does not depend on the order of the file. Drops are
  counted under train, the split the file stands for.
* Any script: the length checks count each character of a script written without spaces
  (Chinese, Japanese, Thai, ...) as a word (``corpora.sentence_length``).
* Streaming, in two passes: the input is read once, line by line, into a scratch file of
  normalised pairs beside the output, keeping 18 bytes per pair in memory (two hashes, the
  drop reason, the fixes); the splits are then decided on those arrays (about 45 bytes per
  pair at the peak: some 450 MB for 10 million pairs) and the scratch file is copied out.
  Exact duplicates are found by a 64-bit hash of the pair: for 10 million pairs the chance
  that two different pairs share one is about 1 in 370,000.
* Nothing is renamed into place until every input has been read and checked: an error
  (invalid UTF-8, unequal line counts, a corpus too small to draw from) leaves earlier
  outputs as they were.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from itertools import zip_longest
from pathlib import Path
from typing import IO

import numpy as np
from tqdm import tqdm

from .corpora import (DROP_REASONS, FIX_TYPES, TRAIN_SPLIT, CleaningConfig, CorpusError, TextLines,
                      _positive_int, _write_atomic, add_cleaning_options, cleaning_from_args,
                      drop_reason, format_summary, normalise_line, split_rank)
from .files import atomic_write

logger = logging.getLogger(__name__)

FILES_DROP_REASONS = ("malformed", *DROP_REASONS, "overlap")
HELDOUT_SPLITS = ("test", "valid")      # drawn in this order, as Tatoeba's are
SPLIT_CODES = {TRAIN_SPLIT: 0, "valid": 1, "test": 2}
DEFAULT_HELDOUT_PAIRS = 1000
DEFAULT_SEED = 1
DEFAULT_OUT = Path("data") / "files"
_LANG_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_REASON_CODE = {reason: code for code, reason in enumerate(FILES_DROP_REASONS, start=1)}  # 0: kept
_FIX_BIT = {fix: 1 << i for i, fix in enumerate(FIX_TYPES)}  # source side; target side << 3
_NO_KEY = b"\xff" * 8  # the key of a malformed row: it has no source sentence
_PROGRESS_EVERY = 8192  # rows between progress-bar updates
_DROPPED = 255  # pass 2's destination code of a dropped row


@dataclass(frozen=True)
class PairFiles:
    """Pairs in one TSV (``SOURCE<TAB>TARGET[<TAB>...]``) or in two line-aligned files."""

    paths: tuple[Path, ...]

    @classmethod
    def of(cls, paths: Sequence[str | Path], flag: str) -> PairFiles:
        if len(paths) not in (1, 2):
            raise CorpusError(f"{flag} takes one TSV or two files (source, target), got {len(paths)}: "
                              f"{' '.join(map(str, paths))}")
        for path in map(Path, paths):
            if not path.is_file():
                raise CorpusError(f"{flag}: " + (f"expected a file, got a folder: {path}" if path.is_dir()
                                                 else f"missing input file: {path}"))
        return cls(tuple(Path(p) for p in paths))

    def __str__(self) -> str:
        return " + ".join(map(str, self.paths))

    def size(self) -> int:
        """Bytes on disk (compressed or not): what the progress bar counts."""
        return sum(path.stat().st_size for path in self.paths)


def read_pairs(files: PairFiles, held_out: bool = False,
               on_progress: Callable[[int], None] | None = None) -> Iterator[tuple[str, str] | None]:
    """Raw ``(source, target)`` pairs in file order, streamed; ``None`` for a TSV row with no TAB.

    A held-out file never loses a line, so there such a row is an error naming it.
    ``on_progress`` is called now and then with the bytes read so far.
    """
    if len(files.paths) == 1:
        with TextLines(files.paths[0]) as lines:
            for line in lines:
                if lines.lines_read % _PROGRESS_EVERY == 0 and on_progress:
                    on_progress(lines.bytes_read())
                fields = line.split("\t", 2)
                if len(fields) >= 2:
                    yield fields[0], fields[1]
                elif held_out:
                    raise CorpusError(f"{lines.path}:{lines.lines_read}: expected SOURCE<TAB>TARGET, found no TAB; "
                                      "held-out files never lose a line: fix that line")
                else:
                    yield None
        return
    with TextLines(files.paths[0]) as sources, TextLines(files.paths[1]) as targets:
        source_lines, target_lines = iter(sources), iter(targets)
        for source, target in zip_longest(source_lines, target_lines):
            if source is None or target is None:
                for _ in source_lines if target is None else target_lines:  # count the rest
                    pass
                raise CorpusError(f"Line counts differ: {sources.path} has {sources.lines_read} lines "
                                  f"but {targets.path} has {targets.lines_read} lines")
            if sources.lines_read % _PROGRESS_EVERY == 0 and on_progress:
                on_progress(sources.bytes_read() + targets.bytes_read())
            yield source, target


def split_key(source: str, seed: int) -> bytes:
    """8 bytes of the seeded hash of a normalised source sentence; as a big-endian uint64
    they sort as corpora.split_rank does (the Tatoeba split's order)."""
    return split_rank(source, seed)[:8]


def fix_mask(source_fixes: Sequence[str], target_fixes: Sequence[str]) -> int:
    """One byte for a pair's fixes (corpora.normalise_line): source bits low, target bits high."""
    return sum(_FIX_BIT[f] for f in source_fixes) | (sum(_FIX_BIT[f] for f in target_fixes) << len(FIX_TYPES))


# --------------------------------------------------------------------------- the passes


def copy_heldout(files: PairFiles, writers: tuple[IO, IO], keys: bytearray, seed: int,
                 langs: tuple[str, str]) -> dict:
    """Fix every line of a held-out split and write it; every line is kept. Appends each
    source sentence's key to ``keys`` (training pairs with those sources are dropped)."""
    fixes = bytearray()
    for raw in read_pairs(files, held_out=True):
        (source, source_fixes), (target, target_fixes) = normalise_line(raw[0]), normalise_line(raw[1])
        fixes.append(fix_mask(source_fixes, target_fixes))
        writers[0].write(source + "\n")
        writers[1].write(target + "\n")
        keys += split_key(source, seed)
    if not fixes:
        raise CorpusError(f"{files} has no lines: a held-out split needs pairs")
    return {"read": len(fixes), "kept": len(fixes), "dropped": dict.fromkeys(FILES_DROP_REASONS, 0),
            "fixed": _fix_counts(np.frombuffer(fixes, np.uint8), langs)}


@dataclass
class CorpusColumns:
    """What pass 1 keeps in memory per pair: 18 bytes."""

    reason: np.ndarray  # (pairs,) uint8: 0 kept, else 1 + index into FILES_DROP_REASONS
    fixes: np.ndarray   # (pairs,) uint8: fix bits, source side low, target side high
    key: np.ndarray     # (pairs,) uint64: seeded hash of the normalised source (split_key)
    pair: np.ndarray    # (pairs,) uint64: hash of the normalised pair, for duplicates


def read_corpus(files: PairFiles, scratch: IO, config: CleaningConfig, seed: int,
                progress: bool) -> CorpusColumns:
    """Pass 1: normalise every pair into ``scratch`` (one ``SOURCE<TAB>TARGET`` line per input
    row, so row i of the input is line i there) and note what pass 2 needs to decide."""
    reasons, fixes, keys, pairs = bytearray(), bytearray(), bytearray(), bytearray()
    with tqdm(total=files.size(), unit="B", unit_scale=True, desc="reading", disable=not progress,
              file=sys.stderr, leave=False) as bar:
        def on_progress(done: int) -> None:
            bar.update(done - bar.n)

        for row, raw in enumerate(read_pairs(files, on_progress=on_progress), start=1):
            if raw is None:
                reasons.append(_REASON_CODE["malformed"])
                fixes.append(0)
                keys += _NO_KEY
                pairs += _NO_KEY
                scratch.write("\t\n")
                logger.debug("%s row %d dropped: malformed", files, row)
                continue
            (source, source_fixes), (target, target_fixes) = normalise_line(raw[0]), normalise_line(raw[1])
            reason = drop_reason((source, target), config)
            if reason is not None:
                logger.debug("%s row %d dropped: %s", files, row, reason)
            reasons.append(0 if reason is None else _REASON_CODE[reason])
            fixes.append(fix_mask(source_fixes, target_fixes))
            keys += split_key(source, seed)
            # normalised lines hold no TAB or line break: the TAB is an unambiguous separator
            pair = f"{source}\t{target}"
            pairs += hashlib.blake2b(pair.encode(), digest_size=8).digest()
            scratch.write(pair + "\n")
    return CorpusColumns(reason=np.frombuffer(reasons, np.uint8).copy(), fixes=np.frombuffer(fixes, np.uint8),
                         key=np.frombuffer(keys, ">u8").astype(np.uint64),
                         pair=np.frombuffer(pairs, np.uint64))


def mark_duplicates_and_overlap(columns: CorpusColumns, drop_duplicates: bool, heldout_keys: np.ndarray) -> None:
    """Drop, in ``columns.reason``, later copies of a kept pair, then pairs whose source is held out."""
    if drop_duplicates:
        kept = np.flatnonzero(columns.reason == 0)                      # (kept,) row numbers
        # kept rows ordered by pair hash, equal hashes in file order (a stable sort): each copy
        # after the first of its run is a later occurrence of the same pair
        order = kept[np.argsort(columns.pair[kept], kind="stable")]     # (kept,)
        del kept
        hashes = columns.pair[order]                                    # (kept,) sorted
        copies = np.flatnonzero(hashes[1:] == hashes[:-1]) + 1
        columns.reason[order[copies]] = _REASON_CODE["duplicate"]
    if len(heldout_keys):
        overlap = (columns.reason == 0) & np.isin(columns.key, heldout_keys)
        columns.reason[overlap] = _REASON_CODE["overlap"]


def draw_heldout(columns: CorpusColumns, sizes: dict[str, int], files: PairFiles) -> np.ndarray:
    """Each pair's split code (SPLIT_CODES): test, then valid, take the kept pairs of the
    source sentences with the smallest keys until each holds at least its size."""
    split = np.zeros(len(columns.key), dtype=np.uint8)                # (pairs,)
    kept = columns.reason == 0                                         # (pairs,)
    keys = columns.key[kept]                                           # (kept,) in key order below
    keys.sort()
    # where each source sentence's pairs begin in `keys`: also the number of pairs before it
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))  # (sentences,)
    first = 0  # the first sentence not drawn yet
    for name in HELDOUT_SPLITS:
        if not sizes.get(name):
            continue
        end = int(np.searchsorted(starts, starts[first] + sizes[name]))  # the first sentence it leaves
        if end >= len(starts):  # it would need every sentence left: nothing to train on
            wanted = " and ".join(f"{sizes[n]} {n}" for n in HELDOUT_SPLITS if sizes.get(n))
            raise CorpusError(f"Corpus too small: {len(keys)} pairs of {files} pass the checks "
                              f"({len(starts)} distinct source sentences); cannot draw {wanted} pairs and keep "
                              "some to train on: give smaller --valid-size/--test-size, or --valid-files/--test-files")
        split[kept & (columns.key >= keys[starts[first]]) & (columns.key < keys[starts[end]])] = SPLIT_CODES[name]
        first = end
    return split


def write_splits(scratch: IO, destination: bytes, writers: dict[int, tuple[IO, IO]], progress: bool) -> None:
    """Pass 2: copy each kept pair of the scratch file to its split's files."""
    scratch.seek(0)
    with tqdm(total=len(destination), unit=" pairs", unit_scale=True, desc="writing", disable=not progress,
              file=sys.stderr, leave=False) as bar:
        for row, (line, code) in enumerate(zip(scratch, destination), start=1):
            if row % _PROGRESS_EVERY == 0:
                bar.update(_PROGRESS_EVERY)
            if code == _DROPPED:
                continue
            source, target = line[:-1].split("\t")
            source_out, target_out = writers[code]
            source_out.write(source + "\n")
            target_out.write(target + "\n")


def _fix_counts(masks: np.ndarray, langs: tuple[str, str]) -> dict:
    """Lines fixed per language and fix type, from fix masks (fix_mask)."""
    return {lang: {fix: int(np.count_nonzero(masks & (_FIX_BIT[fix] << side * len(FIX_TYPES))))
                   for fix in FIX_TYPES}
            for side, lang in enumerate(langs)}


def _corpus_stats(columns: CorpusColumns, split: np.ndarray, code: int, langs: tuple[str, str]) -> dict:
    here = split == code
    dropped = {reason: int(np.count_nonzero(here & (columns.reason == rcode)))
               for reason, rcode in _REASON_CODE.items()}
    return {"read": int(here.sum()), "kept": int(np.count_nonzero(here & (columns.reason == 0))),
            "dropped": dropped, "fixed": _fix_counts(columns.fixes[here], langs)}


# --------------------------------------------------------------------------- driver


def check_languages(src_lang: str, tgt_lang: str) -> None:
    for flag, code in (("--src", src_lang), ("--tgt", tgt_lang)):
        if not _LANG_CODE.fullmatch(code or ""):
            raise CorpusError(f"Invalid language code {code!r} for {flag}: use letters, digits, '-' and '_', "
                              f"starting with a letter or digit (it names the files, e.g. train.en)")
    if src_lang == tgt_lang:
        raise CorpusError(f"--src and --tgt are both {src_lang!r}: give two different codes")


def corpus_files(tsv: str | Path | None, source_file: str | Path | None,
                 target_file: str | Path | None) -> PairFiles:
    if tsv is not None and (source_file is not None or target_file is not None):
        raise CorpusError("Give either --tsv FILE or --source-file FILE --target-file FILE, not both")
    if tsv is not None:
        return PairFiles.of([tsv], "--tsv")
    if source_file is None and target_file is None:
        raise CorpusError("Give your corpus as --tsv FILE, or as --source-file FILE --target-file FILE")
    if source_file is None or target_file is None:
        given, missing = ("--source-file", "--target-file") if target_file is None else ("--target-file", "--source-file")
        raise CorpusError(f"{given} needs {missing} (two line-aligned files), or give one --tsv FILE")
    return PairFiles.of([source_file, target_file], "--source-file/--target-file")


def heldout_plan(valid_files: Sequence | None, test_files: Sequence | None, valid_size: int | None,
                 test_size: int | None) -> tuple[dict[str, PairFiles], dict[str, int]]:
    """The held-out splits given as files, and the sizes of those to draw (0: none)."""
    given, sizes = {}, {}
    for name, files, size in (("valid", valid_files, valid_size), ("test", test_files, test_size)):
        if files:
            if size is not None:
                raise CorpusError(f"--{name}-size draws {name} pairs from the corpus, but --{name}-files "
                                  f"gives them: drop one of the two")
            given[name] = PairFiles.of(files, f"--{name}-files")
        else:
            sizes[name] = DEFAULT_HELDOUT_PAIRS if size is None else int(size)
    if sizes.get("valid", 1) < 1:
        raise CorpusError(f"--valid-size must be >= 1 (training validates on it), got {sizes['valid']}")
    if sizes.get("test", 0) < 0:
        raise CorpusError(f"--test-size must be >= 0 (0: no test split), got {sizes['test']}")
    return given, sizes


def prepare_files(out_dir: str | Path, src_lang: str, tgt_lang: str, *, tsv: str | Path | None = None,
                  source_file: str | Path | None = None, target_file: str | Path | None = None,
                  valid_files: Sequence[str | Path] | None = None, test_files: Sequence[str | Path] | None = None,
                  valid_size: int | None = None, test_size: int | None = None, seed: int = DEFAULT_SEED,
                  cleaning: CleaningConfig | None = None, progress: bool | None = None) -> dict:
    """Prepare your corpus into ``out_dir`` (module docstring). Returns the summary that is
    also written to ``out_dir/prepare.json``. ``progress``: show progress bars (default: when
    stderr is a terminal)."""
    start = time.monotonic()
    check_languages(src_lang, tgt_lang)
    corpus = corpus_files(tsv, source_file, target_file)
    given, sizes = heldout_plan(valid_files, test_files, valid_size, test_size)
    config, out, langs = cleaning or CleaningConfig(), Path(out_dir), (src_lang, tgt_lang)
    show = sys.stderr.isatty() if progress is None else progress
    splits = [TRAIN_SPLIT, "valid", *(["test"] if "test" in given or sizes.get("test") else [])]

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        # every output is a temporary file until the whole block succeeds (files.atomic_write)
        with ExitStack() as stack:
            writers = {SPLIT_CODES[name]: tuple(stack.enter_context(atomic_write(out / f"{name}.{lang}", "w"))
                                                for lang in langs) for name in splits}
            stats, heldout_keys = {}, bytearray()
            for name, files in given.items():
                stats[name] = copy_heldout(files, writers[SPLIT_CODES[name]], heldout_keys, seed, langs)
            scratch = stack.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8", newline="\n",
                                                                 dir=out, prefix=".prepare-", suffix=".tmp"))
            columns = read_corpus(corpus, scratch, config, seed, show)
            mark_duplicates_and_overlap(columns, config.drop_duplicates,
                                        np.frombuffer(heldout_keys, ">u8").astype(np.uint64))
            split = draw_heldout(columns, {n: s for n, s in sizes.items() if n in splits}, corpus)
            if not np.any((columns.reason == 0) & (split == SPLIT_CODES[TRAIN_SPLIT])):
                raise CorpusError(f"No training pairs left in {corpus} after cleaning "
                                  f"({len(columns.reason)} rows read): see the drop reasons with -v")
            destination = np.where(columns.reason == 0, split, _DROPPED).astype(np.uint8).tobytes()
            write_splits(scratch, destination, writers, show)
            for name in splits:
                if name not in given:
                    stats[name] = _corpus_stats(columns, split, SPLIT_CODES[name], langs)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # leave no trace of a failed first try
        raise
    if "test" not in splits:   # a test split from an earlier preparation would be scored after training
        for lang in langs:
            stale = out / f"test.{lang}"
            if stale.exists():
                stale.unlink()
                logger.info("removed %s from an earlier preparation (--test-size 0: no test split)", stale)

    seconds = time.monotonic() - start
    pairs = len(columns.reason) + sum(stats[name]["read"] for name in given)
    summary = {
        "corpus": "files", "source": str(corpus), "out_dir": str(out), "languages": list(langs),
        "cleaning": asdict(config), "seed": seed,
        "heldout": {name: str(given[name]) if name in given else f"drawn: at least {sizes[name]} pairs"
                    for name in splits if name != TRAIN_SPLIT},
        "splits": {name: stats[name] for name in splits},
        "throughput": {"pairs": pairs, "input_bytes": corpus.size() + sum(f.size() for f in given.values()),
                       "seconds": round(seconds, 3), "pairs_per_second": round(pairs / max(seconds, 1e-9))},
    }
    text = json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
    _write_atomic(out / "prepare.json", lambda handle: handle.write(text.encode("utf-8")))
    for line in format_summary(summary):
        logger.info("%s", line)
    rate = summary["throughput"]
    logger.info("  %s pairs (%.1f MB on disk) in %.1f s: %s pairs/s", f"{rate['pairs']:,}",
                rate["input_bytes"] / 1e6, seconds, f"{rate['pairs_per_second']:,}")
    return summary


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seq2seq-prepare files",
        description="Prepare your own parallel corpus, any language pair, as OUT/{train,valid,test}.{SRC,TGT} "
                    "for: seq2seq-train data=files data.dir=OUT data.src_lang=SRC data.tgt_lang=TGT. "
                    "Inputs may be plain or compressed (.gz, .xz, .bz2). Guide: docs/your-data.md.")
    corpus = parser.add_argument_group("the corpus: one TSV, or two line-aligned files")
    corpus.add_argument("--tsv", metavar="FILE", help="SOURCE<TAB>TARGET per line; further columns are ignored")
    corpus.add_argument("--source-file", metavar="FILE", help="source sentences, one per line")
    corpus.add_argument("--target-file", metavar="FILE", help="their translations, line i to line i")
    parser.add_argument("--src", required=True, metavar="LANG",
                        help="source language code, e.g. en: names the files (OUT/train.LANG)")
    parser.add_argument("--tgt", required=True, metavar="LANG", help="target language code, e.g. cs")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    held = parser.add_argument_group(
        "held-out splits: your files, kept whole; or drawn from the corpus by a seeded hash of the source sentence")
    held.add_argument("--valid-files", nargs="+", metavar="FILE",
                      help="validation pairs: one TSV, or source and target files")
    held.add_argument("--test-files", nargs="+", metavar="FILE", help="test pairs: one TSV, or source and target files")
    held.add_argument("--valid-size", type=_positive_int, metavar="N",
                      help=f"without --valid-files: draw at least N pairs (default {DEFAULT_HELDOUT_PAIRS})")
    held.add_argument("--test-size", type=_non_negative_int, metavar="N",
                      help=f"without --test-files: draw at least N pairs (default {DEFAULT_HELDOUT_PAIRS}; 0: no test split)")
    held.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of the draw (default {DEFAULT_SEED})")
    add_cleaning_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``seq2seq-prepare files ...`` (corpora.main hands it the arguments after ``files``)."""
    args = _parser().parse_args(argv)
    cleaning = cleaning_from_args(args)
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        prepare_files(args.out, args.src, args.tgt, tsv=args.tsv, source_file=args.source_file,
                      target_file=args.target_file, valid_files=args.valid_files, test_files=args.test_files,
                      valid_size=args.valid_size, test_size=args.test_size, seed=args.seed, cleaning=cleaning)
    except (CorpusError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
