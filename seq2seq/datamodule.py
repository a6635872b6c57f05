"""Lightning DataModule: files of one corpus -> train and validation batches."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from .data import BucketBatchSampler, ParallelDataset, SubwordSampling, collate
from .token_cache import cached_dataset
from .tokenizer import Tokenizer


class ResumableDataLoader(DataLoader):
    """A DataLoader that knows how far into the epoch it is.

    Lightning saves `state_dict()` of a stateful loader in every checkpoint and hands it
    back on resume, so a run killed mid-epoch continues with the next unseen batch.
    It draws no numbers from torch's global generator (it has its own), so resuming
    does not shift the dropout random stream.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, generator=torch.Generator().manual_seed(0), **kwargs)
        self._consumed = 0

    def __iter__(self):
        # the epoch's batches first: drawing them may change the dataset (subword sampling),
        # and worker processes started below must see it
        self.batch_sampler.batches()
        self._consumed = self.batch_sampler.resume_offset
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.batch_sampler.epoch, "batches_done": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


class TranslationDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_src: str | Path,
        train_tgt: str | Path,
        valid_src: str | Path,
        valid_tgt: str | Path,
        src_tokenizer: Tokenizer,
        tgt_tokenizer: Tokenizer,
        *,
        batch_size: int = 128,
        max_tokens: int | None = None,
        max_len: int | None = 100,
        valid_batch_size: int = 128,
        seed: int = 1,
        num_workers: int = 0,
        cache_dir: str | Path | None = None,
        subword_alpha: float = 0.0,
        subword_nbest: int = -1,
    ):
        super().__init__()
        self.paths = (train_src, train_tgt, valid_src, valid_tgt)
        self.src_tokenizer, self.tgt_tokenizer = src_tokenizer, tgt_tokenizer
        self.batch_size, self.max_tokens, self.max_len = batch_size, max_tokens, max_len
        self.valid_batch_size, self.seed, self.num_workers = valid_batch_size, seed, num_workers
        self.cache_dir = cache_dir  # training pairs tokenized once into a memory-mapped cache there
        self.subword_alpha, self.subword_nbest = subword_alpha, subword_nbest  # > 0: sampled segmentations
        self.train_set: ParallelDataset | None = None
        self.train_data: ParallelDataset | SubwordSampling | None = None   # what training batches read
        self.valid_set: ParallelDataset | None = None
        self.train_sampler: BucketBatchSampler | None = None

    def _cached_train_set(self) -> ParallelDataset:
        ts, tt, _, _ = self.paths
        return cached_dataset(ts, tt, self.src_tokenizer, self.tgt_tokenizer, self.cache_dir, max_len=self.max_len)

    def prepare_data(self) -> None:
        # Lightning runs this in one process per machine before `setup` on every rank:
        # a large corpus is tokenized once, not once per rank. This process keeps the
        # (memory-mapped) result, so its `setup` does not hash the corpus a second time;
        # the other ranks find the cache entry in theirs.
        if self.cache_dir is not None and self.train_set is None:
            self.train_set = self._cached_train_set()

    def setup(self, stage: str | None = None) -> None:
        ts, tt, vs, vt = self.paths
        if self.train_set is None:
            if self.cache_dir is not None:
                self.train_set = self._cached_train_set()
            else:
                self.train_set = ParallelDataset.from_files(ts, tt, self.src_tokenizer, self.tgt_tokenizer,
                                                            max_len=self.max_len)
        if self.valid_set is None:
            # validation is never filtered: BLEU is over every reference line
            self.valid_set = ParallelDataset.from_files(vs, vt, self.src_tokenizer, self.tgt_tokenizer,
                                                        max_len=None, drop_empty=False)
        world, rank = 1, 0
        if self.trainer is not None:
            world, rank = self.trainer.world_size, self.trainer.global_rank
        # Training pairs of equal length stay in random order: ordering them by source length
        # (`ties`, as validation does) skews batches' target/source length ratios, and the one
        # full recipe trained so learned slower (docs/RESULTS.md, "Why the recipes are set as they are").
        self.train_data, draw = self.train_set, None
        if self.subword_alpha > 0:  # segmented anew each epoch, bucketed by the lengths drawn
            self.train_data = SubwordSampling(self.train_set, self.src_tokenizer, self.tgt_tokenizer,
                                              self.subword_alpha, nbest=self.subword_nbest,
                                              max_len=self.max_len, seed=self.seed)
            draw = self.train_data.draw
        self.train_sampler = BucketBatchSampler(
            self.train_set.lengths, self.batch_size, max_tokens=self.max_tokens, shuffle=True,
            seed=self.seed, num_replicas=world, rank=rank, split_batches=True, draw=draw)
        self.valid_sampler = BucketBatchSampler(
            self.valid_set.lengths, self.valid_batch_size, ties=self.valid_set.ties, shuffle=False,
            num_replicas=world, rank=rank, drop_uneven=False)

    def train_dataloader(self) -> DataLoader:
        # workers kept between epochs would keep the first epoch's segmentations
        persistent = self.num_workers > 0 and self.subword_alpha == 0
        return ResumableDataLoader(self.train_data, batch_sampler=self.train_sampler, collate_fn=collate,
                                   num_workers=self.num_workers, persistent_workers=persistent)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.valid_set, batch_sampler=self.valid_sampler, collate_fn=collate)
