"""Parallel text -> subword ids -> length-bucketed, padded batches.

Sentences are stored as one flat int32 array per side plus offsets, never as one
Python list per sentence, so a corpus of millions of pairs costs a few bytes per
token, not hundreds of bytes per sentence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import sentencepiece as spm
import torch
from torch.utils.data import Dataset, Sampler

from .files import InputError, read_lines
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

log = logging.getLogger(__name__)


class Batch(NamedTuple):
    """A padded batch. Lightning moves NamedTuples of tensors to the device."""

    src: torch.Tensor      # (batch, src_len) source ids + EOS, PAD-padded
    src_len: torch.Tensor  # (batch,) int64, on CPU-friendly dtype for packing
    tgt_in: torch.Tensor   # (batch, tgt_len) BOS + target ids
    tgt_out: torch.Tensor  # (batch, tgt_len) target ids + EOS
    index: torch.Tensor    # (batch,) position of each pair in its dataset


class TokenArray:
    """Variable-length id sequences in one flat array: sequence i is data[off[i]:off[i+1]]."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data = data          # (total_tokens,) int32
        self.offsets = offsets    # (n + 1,) int64

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]]) -> TokenArray:
        offsets = _offsets(seqs)
        data = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
        return cls(data, offsets)

    @classmethod
    def from_arrays(cls, seqs: Sequence[np.ndarray]) -> TokenArray:
        """`from_lists` for id arrays: one concatenation, no Python loop over the ids."""
        data = np.concatenate(seqs).astype(np.int32, copy=False) if seqs else np.zeros(0, np.int32)
        return cls(data, _offsets(seqs))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getstate__(self) -> dict:
        # a memory-mapped array (token cache) is sent to DataLoader workers as its file,
        # reopened there: pickling the np.memmap itself would copy every id into each worker
        return {name: _file_ref(arr) for name, arr in (("data", self.data), ("offsets", self.offsets))}

    def __setstate__(self, state: dict) -> None:
        self.data, self.offsets = _from_ref(state["data"]), _from_ref(state["offsets"])

    def __getitem__(self, i: int) -> np.ndarray:
        return self.data[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def select(self, keep: np.ndarray) -> TokenArray:
        """Only the sequences at indices `keep` (sorted), as a new compact array."""
        return TokenArray.from_lists([self[int(i)] for i in keep])


def _offsets(seqs: Sequence) -> np.ndarray:
    """(n + 1,) int64 start of each sequence in the flat array, then the total."""
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs)), out=offsets[1:])
    return offsets


def _file_ref(arr: np.ndarray):
    if isinstance(arr, np.memmap) and arr.filename is not None:
        return ("memmap", str(arr.filename), arr.dtype.str, arr.shape, arr.offset)
    return ("array", np.asarray(arr))


def _from_ref(ref) -> np.ndarray:
    if ref[0] == "memmap":
        _, filename, dtype, shape, offset = ref
        return np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=shape, offset=offset)
    return ref[1]


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> tuple[list[str], list[str]]:
    """Both sides of a parallel corpus; different line counts are an error naming both."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise InputError(
            f"parallel files differ in length: {src_path} has {len(src)} lines, "
            f"{tgt_path} has {len(tgt)} lines"
        )
    return src, tgt


def encode_lines(tokenizer: Tokenizer, lines: Sequence[str], chunk: int = 20_000) -> TokenArray:
    """Tokenize in chunks so a huge corpus never holds all id lists at once."""
    arrays = [TokenArray.from_lists(tokenizer.encode(lines[i:i + chunk])) for i in range(0, len(lines), chunk)]
    if not arrays:
        return TokenArray(np.zeros(0, np.int32), np.zeros(1, np.int64))
    data = np.concatenate([a.data for a in arrays])
    offsets = np.concatenate([[0]] + [a.offsets[1:] + base for a, base in
                                      zip(arrays, np.cumsum([0] + [len(a.data) for a in arrays[:-1]]))])
    return TokenArray(data, offsets.astype(np.int64))


class ParallelDataset(Dataset):
    """Tokenized sentence pairs. Item i is (source ids, target ids) without specials."""

    def __init__(self, src: TokenArray, tgt: TokenArray):
        if len(src) != len(tgt):
            raise ValueError(f"source has {len(src)} sentences, target {len(tgt)}")
        self.src, self.tgt = src, tgt

    @classmethod
    def from_files(
        cls,
        src_path: str | Path,
        tgt_path: str | Path,
        src_tokenizer: Tokenizer,
        tgt_tokenizer: Tokenizer,
        *,
        max_len: int | None = None,
        drop_empty: bool = True,
    ) -> ParallelDataset:
        """Read, tokenize and (for training) filter a parallel corpus.

        `max_len` drops pairs with a side longer than that many subwords (training
        only: evaluation sets are never filtered, they are decoded from raw text).
        """
        src_lines, tgt_lines = read_parallel(src_path, tgt_path)
        if not src_lines:
            raise InputError(f"empty corpus: {src_path} and {tgt_path} have no lines")
        src, tgt = encode_lines(src_tokenizer, src_lines), encode_lines(tgt_tokenizer, tgt_lines)
        keep = np.ones(len(src), dtype=bool)
        if drop_empty:
            keep &= (src.lengths > 0) & (tgt.lengths > 0)
        if max_len is not None:
            keep &= (src.lengths <= max_len) & (tgt.lengths <= max_len)
        dropped = int((~keep).sum())
        if dropped:
            log.info("%s: dropped %d of %d pairs (empty side or longer than %s subwords)",
                     src_path, dropped, len(src), max_len)
            idx = np.flatnonzero(keep)
            src, tgt = src.select(idx), tgt.select(idx)
        if len(src) == 0:
            raise InputError(f"no usable sentence pairs in {src_path} / {tgt_path} after filtering")
        return cls(src, tgt)

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, np.ndarray]:
        return i, self.src[i], self.tgt[i]

    @property
    def lengths(self) -> np.ndarray:
        """(n,) the longer side of each pair, plus one for EOS/BOS: what batches pad to."""
        return np.maximum(self.src.lengths, self.tgt.lengths) + 1

    @property
    def ties(self) -> np.ndarray:
        """(n, 2) source and target lengths: the order of pairs of equal `lengths` in a bucket.

        Grouping equal source lengths gives the CPU encoder fewer distinct lengths per batch
        (one LSTM kernel call per length and direction, encoder.py) and less source padding.
        Validation batches use it; training batches do not (datamodule.py).
        """
        return np.stack([self.src.lengths, self.tgt.lengths], axis=1)


class SubwordSampling(Dataset):
    """Training pairs segmented anew, at random, every epoch (subword regularization).

    Wraps a dataset of the usual (most probable) segmentations, memory-mapped or not:
    `draw()` decodes every pair back to its text and encodes it again with SentencePiece
    sampling (`Tokenizer.encode_sampled`), so the model sees the same sentence split into
    different subwords from epoch to epoch. The batch sampler calls it before it makes an
    epoch's batches and buckets them by the lengths drawn: bucketed by the usual lengths,
    the samples' own lengths spread within a batch (Multi30k En→De, batch 64: padding 21%
    of the real target tokens instead of 9%, 25% of the source tokens instead of 14%). One
    epoch's samples are held in memory, about as large as the corpus's ids. A side keeps
    its usual ids when they contain an unknown piece (its text would not come back from
    decoding) or when the sample is longer than `max_len`. Before the first draw, items
    are sampled as they are read.

    The draws come from SentencePiece's generator, seeded here: a fresh run is reproducible
    and every DDP rank draws the same segmentations (so their batches stay disjoint); a run
    resumed mid-epoch draws that epoch anew, so its remaining batches hold other pairs.
    """

    def __init__(self, base: Dataset, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer, alpha: float, *,
                 nbest: int = -1, max_len: int | None = None, seed: int = 1):
        if not 0 < alpha <= 1:
            raise ValueError(f"subword sampling alpha must be in (0, 1], got {alpha}")
        if nbest == 0 or nbest < -1:
            raise ValueError(f"subword sampling nbest must be -1 (all segmentations) or >= 1, got {nbest}")
        self.base, self.alpha, self.nbest, self.max_len = base, alpha, nbest, max_len
        self.src_tokenizer, self.tgt_tokenizer = src_tokenizer, tgt_tokenizer
        self.drawn: ParallelDataset | None = None   # the current epoch's segmentations
        spm.set_random_generator_seed(seed)

    def __len__(self) -> int:
        return len(self.base)

    @property
    def lengths(self) -> np.ndarray:
        return (self.base if self.drawn is None else self.drawn).lengths

    def draw(self) -> np.ndarray:
        """Segment every pair anew for the coming epoch; returns their `lengths` (n,)."""
        src, tgt = [], []
        for i in range(len(self.base)):
            _, s, t = self.base[i]
            src.append(self._sample(self.src_tokenizer, s))
            tgt.append(self._sample(self.tgt_tokenizer, t))
        self.drawn = ParallelDataset(TokenArray.from_arrays(src), TokenArray.from_arrays(tgt))
        return self.drawn.lengths

    def _sample(self, tokenizer: Tokenizer, ids: np.ndarray) -> np.ndarray:
        if len(ids) == 0 or (ids == UNK_ID).any():
            return ids
        sampled = tokenizer.encode_sampled(tokenizer.decode([ids.tolist()])[0], self.alpha, self.nbest)
        if not sampled or (self.max_len is not None and len(sampled) > self.max_len):
            return ids
        return np.asarray(sampled, dtype=np.int32)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, np.ndarray]:
        if self.drawn is not None:
            return self.drawn[i]
        j, src, tgt = self.base[i]
        return j, self._sample(self.src_tokenizer, src), self._sample(self.tgt_tokenizer, tgt)


def collate(items: Sequence[tuple[int, np.ndarray, np.ndarray]]) -> Batch:
    """Pad (index, src ids, tgt ids) items into a Batch; source gets EOS, target BOS/EOS."""
    n = len(items)
    src_len = torch.tensor([len(s) + 1 for _, s, _ in items], dtype=torch.long)
    tgt_len = max(len(t) for _, _, t in items) + 1
    src = torch.full((n, int(src_len.max())), PAD_ID, dtype=torch.long)   # (batch, src_len)
    tgt_in = torch.full((n, tgt_len), PAD_ID, dtype=torch.long)           # (batch, tgt_len)
    tgt_out = torch.full((n, tgt_len), PAD_ID, dtype=torch.long)          # (batch, tgt_len)
    for i, (_, s, t) in enumerate(items):
        s, t = torch.from_numpy(s.astype(np.int64)), torch.from_numpy(t.astype(np.int64))
        src[i, :len(s)] = s
        src[i, len(s)] = EOS_ID
        tgt_in[i, 0] = BOS_ID
        tgt_in[i, 1:len(t) + 1] = t
        tgt_out[i, :len(t)] = t
        tgt_out[i, len(t)] = EOS_ID
    index = torch.tensor([i for i, _, _ in items], dtype=torch.long)
    return Batch(src, src_len, tgt_in, tgt_out, index)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar-length pairs, reshuffled each epoch, reproducibly.

    Each epoch draws a permutation from (seed, epoch), cuts it into pools of
    `pool_factor` batches, sorts each pool by length and cuts it into batches, then
    shuffles the batch order. Similar lengths keep padding small; the pools keep the
    randomness. `ties` (n, k), when given, orders pairs of equal length by its columns,
    first column first (ParallelDataset.ties: source, then target length). `draw`, when
    given, is called before each epoch's batches are made and returns the lengths to bucket
    by (SubwordSampling.draw: that epoch's segmentations). With several
    processes (DDP) all ranks see disjoint data and take the same number of steps: with
    `split_batches` (training) each batch's rows, sorted by length, are dealt to the ranks
    in turn, so the ranks' shares are equally long and one optimiser step sees `batch_size`
    sentences, as in one process (batches with fewer rows than ranks are left out);
    otherwise each rank takes every `num_replicas`-th batch.

    `load_state_dict({"epoch": e, "batches_done": n})` makes the next iteration skip
    the first n batches of epoch e, so a run resumed mid-epoch continues with the next
    batch instead of replaying the epoch (see datamodule.ResumableDataLoader).
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        *,
        max_tokens: int | None = None,
        ties: np.ndarray | None = None,
        shuffle: bool = True,
        seed: int = 0,
        pool_factor: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
        drop_uneven: bool = True,
        split_batches: bool = False,
        draw: Callable[[], np.ndarray] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = np.asarray(lengths)
        self.ties = None if ties is None else np.asarray(ties).reshape(len(self.lengths), -1)
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.shuffle, self.seed, self.pool_factor = shuffle, seed, pool_factor
        self.num_replicas, self.rank, self.drop_uneven = num_replicas, rank, drop_uneven
        self.split_batches = split_batches
        self.draw = draw    # called before each epoch's batches are made: the lengths to bucket by
        self.epoch = 0
        self._resume_from = 0   # batches of `epoch` already consumed before a restart
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._resume_from = 0
        self.epoch = epoch

    def _cut(self, order: np.ndarray) -> list[np.ndarray]:
        """Cut length-sorted indices into batches by sentence count and token budget."""
        batches, start = [], 0
        lengths = self.lengths[order]
        while start < len(order):
            end = min(start + self.batch_size, len(order))
            if self.max_tokens is not None:
                # padded size of a batch is count * longest; shrink until it fits
                while end - start > 1 and (end - start) * lengths[start:end].max() > self.max_tokens:
                    end -= 1
            batches.append(order[start:end])
            start = end
        return batches

    def _sorted(self, idx: np.ndarray) -> np.ndarray:
        """idx ordered by length, then by the columns of `ties`; stable."""
        columns = 0 if self.ties is None else self.ties.shape[1]
        keys = [self.ties[idx, k] for k in reversed(range(columns))]  # lexsort: the last key sorts first
        return idx[np.lexsort(keys + [self.lengths[idx]])]

    def batches(self) -> list[np.ndarray]:
        """All batches of the current epoch for this rank, in order."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._make_batches())
        return self._cache[1]

    def _make_batches(self) -> list[np.ndarray]:
        if self.draw is not None:
            self.lengths = np.asarray(self.draw())
        n = len(self.lengths)
        if not self.shuffle:
            batches = self._cut(self._sorted(np.arange(n)))
        else:
            rng = np.random.default_rng([self.seed, self.epoch])
            perm = rng.permutation(n)
            pool = self.batch_size * self.pool_factor
            batches = []
            for i in range(0, n, pool):
                chunk = perm[i:i + pool]
                batches += self._cut(self._sorted(chunk))
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.num_replicas > 1 and self.split_batches:
            batches = [b[self.rank::self.num_replicas] for b in batches if len(b) >= self.num_replicas]
        elif self.num_replicas > 1:
            # training: every rank must take the same number of steps, so drop the few
            # batches that do not divide evenly; validation keeps them all
            usable = len(batches) - len(batches) % self.num_replicas if self.drop_uneven else len(batches)
            batches = batches[self.rank:usable:self.num_replicas]
        return batches

    @property
    def resume_offset(self) -> int:
        return self._resume_from

    def __iter__(self) -> Iterator[list[int]]:
        start, self._resume_from = self._resume_from, 0
        for b in self.batches()[start:]:
            yield b.tolist()

    def __len__(self) -> int:
        return len(self.batches())

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._resume_from = int(state["batches_done"])
