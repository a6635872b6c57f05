"""Prepare public parallel corpora as aligned plain-text files.

Data path
---------
``prepare(name, out_dir, source=...)`` reads a corpus in its published format from a
local folder (``--from``) or downloads the public original first into
``OUT_DIR/download/`` (``--download``; for the IWSLT sets a pinned public mirror, each file
checked against its SHA-256). It writes ``OUT_DIR/<split>.<lang>``: UTF-8, one
sentence per line, line i of every language file of a split aligned. A summary (pairs
read / kept / dropped per reason, lines fixed per fix type) goes to stderr through
``logging`` and to ``OUT_DIR/prepare.json``.

* ``multi30k``: ``{train,val,test2016}.{en,de,fr,cs}`` -> splits ``train``, ``valid``,
  ``test2016`` in all four languages.
* ``tatoeba-en-de``: ``deu.txt`` (``English<TAB>German[<TAB>attribution]``) -> ``train``,
  ``valid``, ``test`` in ``en`` and ``de``.
* ``iwslt-ted-de-en``: ``IWSLT16.{TED,TEDX}.<set>.de-en.{de,en}`` -> one split per set,
  e.g. ``ted.tst2010``, ``tedx.dev2012``, in ``de`` and ``en``.
* ``files``: your own corpus, any language pair, streamed from a TSV or two files, plain or
  compressed, with the same policies: prepare_files.py (``seq2seq-prepare files``).

Policies
--------
* Every line of every split is *fixed*, never dropped, by: stripping leading/trailing
  whitespace, replacing internal whitespace runs (TAB, CR, NO-BREAK SPACE, ...) by one
  space, and Unicode NFC normalisation. A TAB inside a sentence would otherwise break
  any TSV built from these files, and NFC makes equal strings compare equal.
* Evaluation splits (everything but ``train``) never lose a line: scores must be
  comparable with other work on the same sets, so an empty line stays empty.
* The training split drops a line (counted per reason, first matching reason wins):
  ``empty`` side; ``placeholder`` side with no letter or digit (Multi30k marks missing
  translations with ``@@``); ``too_long`` side over ``max_len`` words; ``ratio`` when the
  longest side has more than ``max_ratio`` times the words of the shortest; and exact
  ``duplicate`` lines (optional). Words are what spaces separate, except that each
  character of a script written without spaces (Chinese, Japanese, Thai, ...) counts as one.
* Multi30k is 4-way parallel, and users pick any language pair from it. A training
  line index is therefore dropped from *all four* files if *any* side of that line fails
  a check (the length ratio is taken between the longest and shortest of the four
  sides, duplicates are duplicates of the 4-tuple), so the four train files stay
  aligned with each other.
* Tatoeba has no official split, and one English sentence often has several German
  translations. Unique (normalised) English sentences are ordered by a seeded SHA-256
  hash and assigned to ``test`` then ``valid`` until each holds at least
  ``TATOEBA_HELDOUT_PAIRS`` pairs; the rest is ``train``. An English sentence and all
  its German variants thus land in one split, and the split does not depend on the
  Python version or the order of the input file. Within a split, file order is kept.
* IWSLT 2016 TED/TEDx de-en here is dev/test data only: each set becomes one split and
  no line is dropped. When a plain-text file is missing, its ``.xml`` original from the
  official release is read instead (the ``<seg>`` contents, entities decoded).
* Inputs are validated (folders and files exist, aligned files have equal line counts)
  before anything is written; every output file is written atomically.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import html
import json
import logging
import lzma
import os
import re
import shutil
import sys
import unicodedata
import urllib.request
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .files import atomic_write
from .metrics import UNSPACED_CHAR

logger = logging.getLogger(__name__)

CORPORA = ("multi30k", "tatoeba-en-de", "iwslt-ted-de-en")
FILES_COMMAND = "files"  # seq2seq-prepare files: your own corpus (prepare_files.py)
DROP_REASONS = ("empty", "placeholder", "too_long", "ratio", "duplicate")
FIX_TYPES = ("edge_whitespace", "inner_whitespace", "nfc")
TRAIN_SPLIT = "train"
DOWNLOAD_DIR = "download"
DOWNLOAD_TIMEOUT_S = 60.0

MULTI30K_LANGS = ("en", "de", "fr", "cs")
MULTI30K_SPLITS = {"train": "train", "val": "valid", "test2016": "test2016"}  # input -> output
MULTI30K_URL = ("https://raw.githubusercontent.com/multi30k/dataset/master/"
                "data/task1/raw/{name}.{lang}.gz")
MULTI30K_REMOTE_NAMES = {"train": "train", "val": "val", "test2016": "test_2016_flickr"}

TATOEBA_URL = "https://www.manythings.org/anki/deu-eng.zip"
TATOEBA_FILE = "deu.txt"
TATOEBA_SEED = 20180513
TATOEBA_HELDOUT_PAIRS = 2000

# The IWSLT 2016 release's own host is gone; torchtext's users fall back on a public GitHub
# re-upload of the de-en archive. Pinned to one commit, and every file checked against its
# SHA-256, so a changed mirror is an error rather than a silently different test set.
IWSLT_URL = ("https://raw.githubusercontent.com/maroxtn/IWSLT-BACKUP/"
             "73a09324ed3cb15d60f489b322ea9df4b431ea43/iwslt/de-en/{name}")
IWSLT_SHA256 = {
    "IWSLT16.TED.dev2010.de-en.de": "9f2c2a4487cd329d22cb440f303920e1d368cf04c4c6e974b56149548991f6ea",
    "IWSLT16.TED.tst2010.de-en.de": "3ed4c594f00ec3052b58325218142db800e671cc5d14331254e41ebfe42d56d8",
    "IWSLT16.TED.tst2011.de-en.de": "605877ad3a8c612344f6544c77a2cbcae0ab8f73dc9dca9c041a04e2703e2bab",
    "IWSLT16.TED.tst2012.de-en.de": "9f81bb3ca9e15c40c3af665d582b0aaf8a447d01d54cb02db2eda06a5b4d1ad6",
    "IWSLT16.TED.tst2013.de-en.de": "60fa902b0bf558ff58cf38de1dc6941de706e9f58e33e92119eb64696df4bbcc",
    "IWSLT16.TED.tst2014.de-en.de": "66aa2e5c16a1c0e04b6c58e263e448edb6992f639736b57daf5c26733140c928",
    "IWSLT16.TEDX.dev2012.de-en.de": "5aac685d776bf1bfbd6a7694923e66b9fb3ccbb9575d5cba2468ca661510144b",
    "IWSLT16.TEDX.tst2013.de-en.de": "3ad948be62b7d3e76234f078e9a113b72a556c3613b385a79c5bd24fa530fab6",
    "IWSLT16.TEDX.tst2014.de-en.de": "24388aeba244b8e5643d15156234a708deb58b0d4d5de738f1f5543627cf00c6",
    "IWSLT16.TED.dev2010.de-en.en": "56989441a1a503e0718a592b31a152b944bfd707d1ee1f9305de8caf88ce9e60",
    "IWSLT16.TED.tst2010.de-en.en": "f60a0923afe861dff8be62986c4a239bfd09eee3183ad9d17af1b6d363d0ddae",
    "IWSLT16.TED.tst2011.de-en.en": "84e1e460256adfd142e9c7faf9c036d98ead475218b59784069ec3790ea16444",
    "IWSLT16.TED.tst2012.de-en.en": "1e5b82072b5947a188c669a18ee7d15cac38a75e5c2d2d9ac75efe3e911cc4b3",
    "IWSLT16.TED.tst2013.de-en.en": "9fc2d5df75a05754427a5dcea1b3cc2456e8613c878527e56713978a13bf672e",
    "IWSLT16.TED.tst2014.de-en.en": "e82bfa58d4a170573826999a4852c496162a229f405eb488b3d6d385dbabcbaa",
    "IWSLT16.TEDX.dev2012.de-en.en": "2cec1ad8e057ddeaf4028d0d8dd146bedb865e535ed3b1584ac5b1bcada6a9b8",
    "IWSLT16.TEDX.tst2013.de-en.en": "d00a11ec660025647227a612a4e4e738418437bcb5d2e2edcb131273f06b3d7f",
    "IWSLT16.TEDX.tst2014.de-en.en": "051be709c7ba1ccd521f7949af334022c12616fdd90eee29d49405ecf928862a",
}
IWSLT_FILE_RE = re.compile(r"^IWSLT16\.(TEDX?)\.((?:dev|tst)\d{4})\.de-en\.(de|en)(\.xml)?$")
_XML_SEG_RE = re.compile(r"<seg[^>]*>(.*)</seg>")
_WHITESPACE_RUN = re.compile(r"\s+")
# Readers for compressed inputs, by file name suffix (lower case).
DECOMPRESSORS: dict[str, Callable] = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}


class CorpusError(Exception):
    """A problem with the input data or the request, reported to the user without a traceback."""


@dataclass(frozen=True)
class CleaningConfig:
    """Filters for the training split (evaluation splits are never filtered)."""

    max_len: int = 250  # words per side
    max_ratio: float = 9.0  # longest side / shortest side, in words
    drop_duplicates: bool = True

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if self.max_ratio < 1:
            raise ValueError(f"max_ratio must be >= 1, got {self.max_ratio}")


@dataclass
class RawSplit:
    name: str
    columns: dict[str, list[str]]  # language -> lines, all of equal length
    origin: str  # where the lines came from, for error messages and the summary


# --------------------------------------------------------------------------- cleaning


def normalise_line(text: str) -> tuple[str, list[str]]:
    """Return the fixed line and the fix types that changed it."""
    fixes = []
    stripped = text.strip()
    if stripped != text:
        fixes.append("edge_whitespace")
    collapsed = _WHITESPACE_RUN.sub(" ", stripped)
    if collapsed != stripped:
        fixes.append("inner_whitespace")
    composed = unicodedata.normalize("NFC", collapsed)
    if composed != collapsed:
        fixes.append("nfc")
    return composed, fixes


def sentence_length(text: str) -> int:
    """Words of a normalised line, for the length checks: space-separated words, plus one per
    character of a script written without spaces, so that a Chinese or Japanese sentence is
    not one 'word' whose translation fails the ratio check."""
    return len(text.split(" ")) + len(UNSPACED_CHAR.findall(text))


def drop_reason(sides: Sequence[str], config: CleaningConfig) -> str | None:
    """Why a normalised training line should be dropped, or None to keep it."""
    if any(not side for side in sides):
        return "empty"
    if any(not any(ch.isalnum() for ch in side) for side in sides):
        return "placeholder"
    lengths = [sentence_length(side) for side in sides]
    if max(lengths) > config.max_len:
        return "too_long"
    if max(lengths) > config.max_ratio * min(lengths):
        return "ratio"
    return None


def clean_split(split: RawSplit, config: CleaningConfig) -> tuple[dict[str, list[str]], dict]:
    """Fix every line; on the training split also drop bad lines. Returns (columns, stats)."""
    fixed = {lang: Counter({fix: 0 for fix in FIX_TYPES}) for lang in split.columns}
    normalised: dict[str, list[str]] = {}
    for lang, lines in split.columns.items():
        normalised[lang] = []
        for line in lines:
            text, fixes = normalise_line(line)
            fixed[lang].update(fixes)
            normalised[lang].append(text)

    rows = list(zip(*normalised.values()))
    dropped = Counter({reason: 0 for reason in DROP_REASONS})
    kept: list[tuple[str, ...]] = []
    seen: set[tuple[str, ...]] = set()
    for index, row in enumerate(rows, start=1):
        reason = None
        if split.name == TRAIN_SPLIT:
            reason = drop_reason(row, config)
            if reason is None and config.drop_duplicates:
                reason = "duplicate" if row in seen else None
                seen.add(row)
        if reason is not None:
            dropped[reason] += 1
            logger.debug("%s line %d dropped: %s", split.origin, index, reason)
            continue
        kept.append(row)

    columns = {lang: [row[i] for row in kept] for i, lang in enumerate(normalised)}
    stats = {"read": len(rows), "kept": len(kept), "dropped": dict(dropped),
             "fixed": {lang: dict(counter) for lang, counter in fixed.items()}}
    return columns, stats


# --------------------------------------------------------------------------- reading


class TextLines:
    """The lines of a UTF-8 text file, read as a stream: plain, or compressed by name
    (``.gz``, ``.xz``, ``.bz2``).

    Lines end at LF only, so a stray CR or U+2028 cannot shift alignment; a byte-order mark
    at the start of the file is dropped. Invalid UTF-8 is an error naming the file and
    line: training data is not guessed at. Use as a context manager, then iterate.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lines_read = 0
        self._raw = None
        self._stream = None

    def __enter__(self) -> TextLines:
        if self.path.is_dir():
            raise CorpusError(f"Expected a file, got a folder: {self.path}")
        try:
            self._raw = self.path.open("rb")
        except FileNotFoundError:
            raise CorpusError(f"Missing input file: {self.path}") from None
        opener = DECOMPRESSORS.get(self.path.suffix.lower())
        self._stream = opener(self._raw, "rb") if opener else self._raw
        return self

    def __exit__(self, *exc_info) -> None:
        self._stream.close()
        self._raw.close()

    def bytes_read(self) -> int:
        """How far into the file (on disk, compressed or not) reading has got, for progress."""
        return self._raw.tell()

    def __iter__(self) -> Iterator[str]:
        try:
            for raw in self._stream:
                self.lines_read += 1
                yield self._decode(raw)
        except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:  # a truncated or corrupt archive
            raise CorpusError(f"{self.path}: cannot read past line {self.lines_read} ({exc})") from None

    def _decode(self, raw: bytes) -> str:
        # the line feed is decoded with the line: a sequence cut short by it reads as
        # 'invalid continuation byte', as in the whole file
        try:
            text = raw.decode("utf-8-sig" if self.lines_read == 1 else "utf-8")
        except UnicodeDecodeError as exc:  # name the line: a byte offset into a corpus helps no one
            raise CorpusError(f"{self.path}:{self.lines_read}: invalid UTF-8 ({exc.reason}, byte "
                              f"0x{raw[exc.start]:02x}); training data is not guessed at: fix or remove "
                              "that line") from None
        return text[:-1] if text.endswith("\n") else text


def read_lines(path: Path) -> list[str]:
    """All lines of a UTF-8 file (see TextLines)."""
    with TextLines(path) as lines:
        return list(lines)


def read_aligned(paths: dict[str, Path]) -> dict[str, list[str]]:
    """Read files that must be line-aligned; raise CorpusError naming both files on a mismatch."""
    columns = {lang: read_lines(path) for lang, path in paths.items()}
    (first_lang, first_path), *others = paths.items()
    for lang, path in others:
        if len(columns[lang]) != len(columns[first_lang]):
            raise CorpusError(
                f"Line counts differ: {first_path} has {len(columns[first_lang])} lines "
                f"but {path} has {len(columns[lang])} lines")
    return columns


def read_xml_segments(path: Path) -> list[str]:
    """The <seg> texts of an IWSLT .xml file (line-based, as torchtext does, because the
    official files are not guaranteed to be well-formed XML)."""
    segments = []
    for line in read_lines(path):
        match = _XML_SEG_RE.search(line)
        if match:
            segments.append(html.unescape(match.group(1)).strip())
    return segments


def read_multi30k(src: Path) -> list[RawSplit]:
    splits = []
    for in_name, out_name in MULTI30K_SPLITS.items():
        paths = {lang: src / f"{in_name}.{lang}" for lang in MULTI30K_LANGS}
        splits.append(RawSplit(out_name, read_aligned(paths), str(src / f"{in_name}.*")))
    return splits


def read_tab_pairs(path: Path) -> tuple[list[str], list[str]]:
    """English and German columns of a manythings.org file; extra columns are ignored."""
    english, german = [], []
    for number, line in enumerate(read_lines(path), start=1):
        fields = line.split("\t")
        if len(fields) < 2:
            raise CorpusError(f"{path}, line {number}: expected 'English<TAB>German', "
                              f"found {len(fields)} field")
        english.append(fields[0])
        german.append(fields[1])
    return english, german


def split_rank(key: str, seed: int) -> bytes:
    """The seeded hash that orders sentences for drawing held-out splits: the same on every
    Python version and machine, and independent of the order of the input file."""
    return hashlib.sha256(f"{seed}\0{key}".encode()).digest()


def split_by_key(keys: Sequence[str], heldout: Sequence[tuple[str, int]], rest: str,
                 seed: int) -> list[str]:
    """Assign each item a split so that items sharing a key share a split.

    Keys are ordered by a seeded hash; each held-out split takes keys until it holds at
    least its minimum number of items, the remaining keys go to ``rest``.
    """
    counts = Counter(keys)
    order = iter(sorted(counts, key=lambda key: split_rank(key, seed)))
    split_of: dict[str, str] = {}
    for name, min_items in heldout:
        total = 0
        while total < min_items:
            key = next(order, None)
            if key is None:
                raise CorpusError(f"Corpus too small: only {len(keys)} pairs, cannot fill the "
                                  f"'{name}' split with {min_items} pairs")
            split_of[key] = name
            total += counts[key]
    split_of.update((key, rest) for key in order)
    return [split_of[key] for key in keys]


def read_tatoeba(src: Path) -> list[RawSplit]:
    path = src / TATOEBA_FILE
    english, german = read_tab_pairs(path)
    # Split on the *normalised* English, so two spellings that clean to the same
    # sentence cannot end up on both sides of the split.
    keys = [normalise_line(text)[0] for text in english]
    heldout = [("test", TATOEBA_HELDOUT_PAIRS), ("valid", TATOEBA_HELDOUT_PAIRS)]
    assignment = split_by_key(keys, heldout, TRAIN_SPLIT, TATOEBA_SEED)
    splits = []
    for name in (TRAIN_SPLIT, "valid", "test"):
        rows = [i for i, split in enumerate(assignment) if split == name]
        columns = {"en": [english[i] for i in rows], "de": [german[i] for i in rows]}
        splits.append(RawSplit(name, columns, f"{path} ({name} part)"))
    return splits


def read_iwslt(src: Path) -> list[RawSplit]:
    found: dict[tuple[str, str], dict[str, dict[bool, Path]]] = {}
    for path in src.iterdir():
        match = IWSLT_FILE_RE.match(path.name)
        if match:
            kind, test_set, lang, xml = match.groups()
            found.setdefault((kind, test_set), {}).setdefault(lang, {})[bool(xml)] = path
    if not found:
        raise CorpusError(f"No IWSLT16.{{TED,TEDX}}.<set>.de-en.{{de,en}} files in {src}")
    splits = []
    for (kind, test_set), by_lang in sorted(found.items()):
        name = f"{kind.lower()}.{test_set}"
        columns, paths = {}, {}
        for lang in ("de", "en"):
            variants = by_lang.get(lang)
            if not variants:
                missing = src / f"IWSLT16.{kind}.{test_set}.de-en.{lang}"
                raise CorpusError(f"Missing input file: {missing}")
            # Prefer plain text; fall back to the release's XML.
            paths[lang] = variants.get(False) or variants[True]
            reader = read_xml_segments if paths[lang].suffix == ".xml" else read_lines
            columns[lang] = reader(paths[lang])
        if len(columns["de"]) != len(columns["en"]):
            raise CorpusError(f"Line counts differ: {paths['de']} has {len(columns['de'])} lines "
                              f"but {paths['en']} has {len(columns['en'])} lines")
        splits.append(RawSplit(name, columns, f"{src / f'IWSLT16.{kind}.{test_set}.de-en'}.*"))
    return splits


# --------------------------------------------------------------------------- downloading


def download_file(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch ``url`` to ``dest`` unless it is already there (the download folder is a cache)."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s", url)
    # Some hosts refuse urllib's default User-Agent.
    request = urllib.request.Request(url, headers={"User-Agent": "seq2seq-prepare"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            _write_atomic(dest, lambda handle: shutil.copyfileobj(response, handle))
    except OSError as exc:  # URLError, HTTPError and timeouts are all OSErrors
        raise CorpusError(f"Download of {url} failed: {exc}") from None
    return dest


def fetch_multi30k(cache: Path) -> Path:
    for local, remote in MULTI30K_REMOTE_NAMES.items():
        for lang in MULTI30K_LANGS:
            target = cache / f"{local}.{lang}"
            if not target.is_file():
                archive = download_file(MULTI30K_URL.format(name=remote, lang=lang),
                                        cache / f"{remote}.{lang}.gz")
                with gzip.open(archive, "rb") as source:
                    _write_atomic(target, lambda handle: shutil.copyfileobj(source, handle))
    return cache


def fetch_tatoeba(cache: Path) -> Path:
    target = cache / TATOEBA_FILE
    if not target.is_file():
        archive = download_file(TATOEBA_URL, cache / "deu-eng.zip")
        with zipfile.ZipFile(archive) as bundle:
            members = [m for m in bundle.namelist() if Path(m).name == TATOEBA_FILE]
            if not members:
                raise CorpusError(f"{archive} holds no {TATOEBA_FILE}")
            with bundle.open(members[0]) as source:
                _write_atomic(target, lambda handle: shutil.copyfileobj(source, handle))
    return cache


def fetch_iwslt(cache: Path) -> Path:
    for name, digest in IWSLT_SHA256.items():
        target = cache / name
        if target.is_file() and sha256_of(target) == digest:
            continue
        target.unlink(missing_ok=True)  # a cached file that fails the check is fetched again
        download_file(IWSLT_URL.format(name=name), target)
        found = sha256_of(target)
        if found != digest:
            target.unlink()
            raise CorpusError(f"Download of {IWSLT_URL.format(name=name)} has SHA-256 {found}, expected {digest}: "
                              "the mirror changed; get the IWSLT 2016 de-en release elsewhere and use --from")
    return cache


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- writing


def _write_atomic(path: Path, write: Callable) -> None:
    """Write bytes through files.atomic_write, so readers never see half a file."""
    with atomic_write(path, "wb") as handle:
        write(handle)


def write_lines(path: Path, lines: Iterable[str]) -> None:
    data = "".join(f"{line}\n" for line in lines).encode("utf-8")
    _write_atomic(path, lambda handle: handle.write(data))


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class _Corpus:
    languages: tuple[str, ...]
    read: Callable[[Path], list[RawSplit]]
    fetch: Callable[[Path], Path]


_CORPUS_SPECS = {
    "multi30k": _Corpus(MULTI30K_LANGS, read_multi30k, fetch_multi30k),
    "tatoeba-en-de": _Corpus(("en", "de"), read_tatoeba, fetch_tatoeba),
    "iwslt-ted-de-en": _Corpus(("de", "en"), read_iwslt, fetch_iwslt),
}


def prepare(name: str, out_dir: str | os.PathLike, source: str | os.PathLike | None = None,
            download: bool = False, cleaning: CleaningConfig | None = None) -> dict:
    """Prepare corpus ``name`` from folder ``source`` (or a download) into ``out_dir``.

    Returns the summary that is also written to ``out_dir/prepare.json``.
    """
    if name not in _CORPUS_SPECS:
        raise CorpusError(f"Unknown corpus {name!r}; choose one of: {', '.join(CORPORA)}")
    if download == (source is not None):
        raise CorpusError("Give exactly one of a source folder (--from) or --download")
    spec, config, out = _CORPUS_SPECS[name], cleaning or CleaningConfig(), Path(out_dir)
    src = spec.fetch(out / DOWNLOAD_DIR) if download else Path(source)
    if not src.is_dir():
        raise CorpusError(f"Input folder not found: {src}")

    raw_splits = spec.read(src)  # everything is read and checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"corpus": name, "source": str(src), "out_dir": str(out),
                     "languages": list(spec.languages), "cleaning": asdict(config), "splits": {}}
    for split in raw_splits:
        columns, stats = clean_split(split, config)
        for lang, lines in columns.items():
            write_lines(out / f"{split.name}.{lang}", lines)
        summary["splits"][split.name] = stats
    text = json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
    _write_atomic(out / "prepare.json", lambda handle: handle.write(text.encode("utf-8")))
    for line in format_summary(summary):
        logger.info("%s", line)
    return summary


def format_summary(summary: dict) -> list[str]:
    lines = [f"{summary['corpus']}: {summary['source']} -> {summary['out_dir']}"]
    for split, stats in summary["splits"].items():
        dropped = ", ".join(f"{r} {n}" for r, n in stats["dropped"].items() if n) or "none"
        fixed = "; ".join(f"{lang} {fix} {n}" for lang, fixes in stats["fixed"].items()
                          for fix, n in fixes.items() if n) or "none"
        lines.append(f"  {split}: read {stats['read']}, kept {stats['kept']}, "
                     f"dropped {stats['read'] - stats['kept']} ({dropped}); fixed: {fixed}")
    return lines


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not value >= 1:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def add_cleaning_options(parser: argparse.ArgumentParser) -> None:
    """The training-split filters and the log level, shared by every corpus and by ``files``."""
    parser.add_argument("--max-len", type=_positive_int, default=CleaningConfig.max_len,
                        help="drop training pairs with a side longer than this many words")
    parser.add_argument("--max-ratio", type=_ratio, default=CleaningConfig.max_ratio,
                        help="drop training pairs whose word-count ratio exceeds this")
    parser.add_argument("--keep-duplicates", action="store_true",
                        help="keep exact duplicate training pairs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every dropped line")


def cleaning_from_args(args: argparse.Namespace) -> CleaningConfig:
    """The CleaningConfig the options of add_cleaning_options ask for; sets up logging too."""
    logging.basicConfig(stream=sys.stderr, format="%(message)s")
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    return CleaningConfig(max_len=args.max_len, max_ratio=args.max_ratio,
                          drop_duplicates=not args.keep_duplicates)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seq2seq-prepare",
        description="Prepare a parallel corpus as OUT/<split>.<lang> plain-text files. "
                    f"Your own corpus, any language pair: seq2seq-prepare {FILES_COMMAND} --help.")
    parser.add_argument("corpus", help=f"one of: {', '.join(CORPORA)} (or {FILES_COMMAND}: your own files)")
    origin = parser.add_mutually_exclusive_group(required=True)
    origin.add_argument("--from", dest="source", metavar="DIR",
                        help="folder with the corpus files")
    origin.add_argument("--download", action="store_true", help="download the corpus first")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: data/<corpus>)")
    add_cleaning_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``seq2seq-prepare``; returns 0 on success, 2 on bad input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == FILES_COMMAND:  # your own corpus: its own options (prepare_files.py)
        from .prepare_files import main as files_main
        return files_main(argv[1:])
    if argv and not argv[0].startswith("-") and argv[0] not in CORPORA:
        # before parsing: the other subcommand's options would hide the real mistake
        print(f"error: Unknown corpus {argv[0]!r}; choose one of: {', '.join((*CORPORA, FILES_COMMAND))}",
              file=sys.stderr)
        return 2
    args = _parser().parse_args(argv)
    cleaning = cleaning_from_args(args)
    out = args.out if args.out is not None else Path("data") / args.corpus
    try:
        prepare(args.corpus, out, source=args.source, download=args.download, cleaning=cleaning)
    except (CorpusError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
