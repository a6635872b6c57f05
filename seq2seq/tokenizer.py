"""SentencePiece subwords: training from the training data, and the vocabulary.

SentencePiece owns the vocabulary; there is no second vocabulary class. A trained
model is kept as its serialized bytes, which is what travels inside a checkpoint, so
a checkpoint alone is enough to tokenize and detokenize.

Special ids are fixed for every model we train: pad=0, unk=1, bos=2, eos=3.
"""

from __future__ import annotations

import io
import logging
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

log = logging.getLogger(__name__)

# Lone UTF-16 surrogates are not text: JSON's "\ud800" and Python's reading of invalid UTF-8 in
# command-line arguments (surrogateescape) produce them, and SentencePiece cannot encode them.
_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(line: str) -> str:
    """`line` with each lone surrogate replaced by U+FFFD, as invalid UTF-8 in files is."""
    return _SURROGATE.sub("\ufffd", line) if not line.isascii() else line

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# SentencePiece encodes a list of lines on a pool of threads it starts for each call. On an
# idle 2-core CPU that costs 0.08 ms for one line (0.007 ms alone) and wins from ~64 lines
# (measured in `git show 0e2781f:docs/RESULTS.md`, "Encoding a few lines"); on busy cores, as
# under a service's load, the threads wait for a core (~1.3 ms for one line). Fewer lines
# than this go one at a time.
THREADED_ENCODE_FROM = 64


class Tokenizer:
    """A SentencePiece model: text <-> subword ids."""

    def __init__(self, model_bytes: bytes):
        self.model_bytes = bytes(model_bytes)
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(self.model_bytes)
        if (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (
            PAD_ID, UNK_ID, BOS_ID, EOS_ID,
        ):
            raise ValueError("SentencePiece model must use pad=0, unk=1, bos=2, eos=3")

    def __getstate__(self) -> dict:
        # the model bytes are the whole tokenizer: enough to pickle it to DDP workers
        return {"model_bytes": self.model_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_bytes"])

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, lines: Sequence[str]) -> list[list[int]]:
        """Subword ids of each line, without BOS/EOS."""
        lines = [valid_text(line) for line in lines]
        if len(lines) < THREADED_ENCODE_FROM:   # a service's few sentences: no thread pool
            return [self.sp.encode(line, out_type=int) for line in lines]
        return self.sp.encode(lines, out_type=int)

    def encode_sampled(self, line: str, alpha: float, nbest: int = -1) -> list[int]:
        """One random segmentation of `line` (subword regularization; SentencePiece draws it).

        Unigram models sample among the `nbest` best segmentations (-1: all of them), each
        weighted by its probability ** alpha (Kudo, 2018); BPE models skip each merge with
        probability alpha (BPE-dropout, Provilkov et al., 2020). The draws come from
        SentencePiece's own generator (`spm.set_random_generator_seed`).
        """
        return self.sp.encode(line, out_type=int, enable_sampling=True, alpha=alpha, nbest_size=nbest)

    def pieces(self, line: str) -> list[str]:
        return self.sp.encode(line, out_type=str)

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Ids -> text, special ids dropped: an <unk> in a model's output leaves no mark in
        the text (SentencePiece would print " ⁇ "); Translation.pieces keeps it."""
        return [self.sp.decode([i for i in seq if i > EOS_ID]) for seq in ids]

    def id_to_piece(self, ids: Iterable[int]) -> list[str]:
        return [self.sp.id_to_piece(int(i)) for i in ids]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and other.model_bytes == self.model_bytes

    __hash__ = None  # mutable-free but compared by content; not meant as dict key


def _sample_lines(paths: Sequence[Path], max_sentences: int, seed: int) -> Iterator[str]:
    """Reservoir-sample at most `max_sentences` non-empty lines from files.

    Bounded memory whatever the corpus size: SentencePiece never needs millions of
    sentences to learn an 8k vocabulary.
    """
    rng = random.Random(seed)
    reservoir: list[str] = []
    seen = 0
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                seen += 1
                if len(reservoir) < max_sentences:
                    reservoir.append(line)
                else:
                    j = rng.randrange(seen)
                    if j < max_sentences:
                        reservoir[j] = line
    return iter(reservoir)


# SentencePiece's advice: character_coverage 0.9995 for languages with a rich character set
# (Chinese, Japanese), 1.0 for the others. Alphabets, abjads and abugidas (Latin, Greek, Cyrillic,
# Arabic, Hebrew, Devanagari, Thai, ...) stay far below this many distinct characters even with
# punctuation, digits, symbols and some foreign words; Chinese and Japanese text uses thousands.
LARGE_ALPHABET = 1000
LARGE_ALPHABET_COVERAGE = 0.9995


def choose_character_coverage(sentences: Iterable[str]) -> tuple[float, int]:
    """SentencePiece's character_coverage for `character_coverage: auto`, and why.

    Returns (coverage, distinct characters): 0.9995 when the sentences use more than
    LARGE_ALPHABET distinct characters (spaces aside), else 1.0. Below 1.0 the rarest
    characters, 0.05% of the text, become <unk> instead of each taking a vocabulary entry
    that a rich script's frequent characters and words need more.
    """
    seen: set[str] = set()
    for sentence in sentences:
        seen.update(sentence)
    seen.discard(" ")
    return (LARGE_ALPHABET_COVERAGE if len(seen) > LARGE_ALPHABET else 1.0), len(seen)


def resolve_character_coverage(character_coverage: float | str, sentences: Sequence[str]) -> float:
    """A number is used as it is; "auto" applies choose_character_coverage to `sentences`."""
    if isinstance(character_coverage, str) and character_coverage.strip().lower() == "auto":
        coverage, distinct = choose_character_coverage(sentences)
        log.info("tokenizer: %d distinct characters in %d sentences (%s %d): character_coverage %g",
                 distinct, len(sentences), "more than" if coverage < 1 else "at most", LARGE_ALPHABET, coverage)
        return coverage
    try:
        coverage = float(character_coverage)
    except (TypeError, ValueError):
        coverage = float("nan")
    if not 0 < coverage <= 1:  # also rejects NaN
        raise ValueError(f"tokenizer.character_coverage must be a number in (0, 1] or 'auto' "
                         f"(from the data: {LARGE_ALPHABET_COVERAGE} beyond {LARGE_ALPHABET} distinct "
                         f"characters, else 1.0), got {character_coverage!r}")
    return coverage


def train_tokenizer(
    paths: Sequence[str | Path],
    vocab_size: int,
    *,
    model_type: str = "unigram",
    character_coverage: float | str = 1.0,
    max_sentences: int = 1_000_000,
    seed: int = 1,
) -> Tokenizer:
    """Train a SentencePiece model on the lines of `paths` and return it in memory.

    `character_coverage` is a number, or "auto": chosen from the sampled sentences
    (choose_character_coverage), so one config serves any script.
    """
    valid_types = ("unigram", "bpe", "char", "word")
    if model_type not in valid_types:
        raise ValueError(f"Unknown tokenizer model_type {model_type!r}; choose one of: {', '.join(valid_types)}")
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer training file not found: {p}")
    sentences = list(_sample_lines(paths, max_sentences, seed))
    if not sentences:
        raise ValueError(f"no text to train the tokenizer on in: {', '.join(map(str, paths))}")
    character_coverage = resolve_character_coverage(character_coverage, sentences)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # same data and seed, same vocabulary
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        # A small corpus may not support the requested size: take what it supports
        # rather than failing, and say so below.
        hard_vocab_limit=False,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=2,
        minloglevel=2,
    )
    tok = Tokenizer(model.getvalue())
    if len(tok) != vocab_size:
        log.warning("tokenizer: asked for %d pieces, the data supports %d", vocab_size, len(tok))
    return tok

