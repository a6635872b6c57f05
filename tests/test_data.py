"""Data path: files -> ids -> length-bucketed padded batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seq2seq.data import BucketBatchSampler, ParallelDataset, SubwordSampling, TokenArray, collate, read_parallel
from seq2seq.datamodule import ResumableDataLoader, TranslationDataModule
from seq2seq.files import InputError
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, THREADED_ENCODE_FROM, UNK_ID, train_tokenizer


@pytest.fixture(scope="module")
def toy_tokenizer(toy_data):
    return train_tokenizer([toy_data / "train.src", toy_data / "train.tgt"], 100, model_type="word")


def test_tokenizer_round_trip(toy_data, toy_tokenizer):
    lines = (toy_data / "valid.tgt").read_text().splitlines()[:20]
    assert toy_tokenizer.decode(toy_tokenizer.encode(lines)) == lines
    assert toy_tokenizer.sp.pad_id() == PAD_ID and toy_tokenizer.sp.eos_id() == EOS_ID
    # special ids leave no text: an <unk> (id 1) in an output is dropped, not printed as " ⁇ "
    ids = toy_tokenizer.encode(lines[:1])[0]
    assert toy_tokenizer.decode([[2, *ids[:1], 1, *ids[1:], 3, 0]]) == lines[:1]


def test_tokenizer_encodes_few_and_many_lines_alike(toy_data, toy_tokenizer):
    # a few lines go one at a time, many through SentencePiece's threads: the same ids
    lines = (toy_data / "valid.src").read_text().splitlines()
    many = (lines * (THREADED_ENCODE_FROM // len(lines) + 1))[:THREADED_ENCODE_FROM]
    assert toy_tokenizer.encode(many) == [toy_tokenizer.encode([line])[0] for line in many]
    assert toy_tokenizer.encode(many[:3]) == toy_tokenizer.encode(many)[:3]
    assert toy_tokenizer.encode([]) == []


def test_collate_adds_specials_and_pads():
    batch = collate([(0, np.array([5, 6, 7]), np.array([8, 9])), (1, np.array([5]), np.array([8, 9, 10, 11]))])
    assert batch.src.tolist() == [[5, 6, 7, EOS_ID], [5, EOS_ID, PAD_ID, PAD_ID]]
    assert batch.src_len.tolist() == [4, 2]
    assert batch.tgt_in.tolist() == [[BOS_ID, 8, 9, PAD_ID, PAD_ID], [BOS_ID, 8, 9, 10, 11]]
    assert batch.tgt_out.tolist() == [[8, 9, EOS_ID, PAD_ID, PAD_ID], [8, 9, 10, 11, EOS_ID]]
    assert batch.index.tolist() == [0, 1]


def test_token_array_holds_sequences_flat():
    arr = TokenArray.from_lists([[1, 2], [], [3, 4, 5]])
    assert arr.data.dtype == np.int32 and len(arr) == 3
    assert arr[2].tolist() == [3, 4, 5] and arr[1].tolist() == []
    assert arr.select(np.array([0, 2]))[1].tolist() == [3, 4, 5]


def test_sampler_covers_each_pair_once_and_is_reproducible():
    lengths = np.random.default_rng(0).integers(1, 40, size=1000)
    s = BucketBatchSampler(lengths, 32, seed=3)
    epoch0 = list(s)
    assert sorted(i for b in epoch0 for i in b) == list(range(1000))
    assert list(BucketBatchSampler(lengths, 32, seed=3)) == epoch0
    s.set_epoch(1)
    assert list(s) != epoch0
    # batches group similar lengths: padding is small
    padded = sum(len(b) * lengths[b].max() for b in epoch0)
    assert 1 - lengths.sum() / padded < 0.1


def test_sampler_orders_equal_lengths_by_ties():
    # 400 pairs of one length whose source lengths take 4 values: a pool cut into 4 batches
    # gives each batch one source length (the CPU encoder makes one kernel call per length)
    rng = np.random.default_rng(0)
    lengths = np.full(400, 20)
    src_lengths = rng.integers(5, 9, size=400)
    ties = np.stack([src_lengths, rng.integers(1, 20, size=400)], axis=1)
    for shuffle in (True, False):
        batches = list(BucketBatchSampler(lengths, 100, ties=ties, shuffle=shuffle, seed=2, pool_factor=4))
        assert sorted(i for b in batches for i in b) == list(range(400))
        for b in batches:
            assert [tuple(ties[i]) for i in b] == sorted(tuple(ties[i]) for i in b)
        assert sum(len(set(src_lengths[b])) for b in batches) <= 4 + 3  # at most one boundary per cut
    untied = list(BucketBatchSampler(lengths, 100, seed=2, pool_factor=4))
    assert sum(len(set(src_lengths[b])) for b in untied) == 16
    # the length still comes first: ties never put a longer pair before a shorter one
    lengths = rng.integers(1, 30, size=400)
    for b in BucketBatchSampler(lengths, 50, ties=ties, shuffle=False):
        assert (np.diff(lengths[b]) >= 0).all()


def test_dataset_ties_are_source_then_target_lengths():
    ds = ParallelDataset(TokenArray.from_lists([[1, 2], [3]]), TokenArray.from_lists([[4], [5, 6, 7]]))
    assert ds.ties.tolist() == [[2, 1], [1, 3]] and ds.lengths.tolist() == [3, 4]


def test_loader_resumes_mid_epoch():
    lengths = np.arange(1, 301) % 17 + 1
    pairs = [(np.ones(n, dtype=np.int32), np.ones(n, dtype=np.int32)) for n in lengths]
    ds = ParallelDataset(TokenArray.from_lists([p[0] for p in pairs]), TokenArray.from_lists([p[1] for p in pairs]))

    def loader():
        return ResumableDataLoader(ds, batch_sampler=BucketBatchSampler(ds.lengths, 10, seed=5), collate_fn=collate)

    first_run = loader()
    first_run.batch_sampler.set_epoch(2)
    full = [b.index.tolist() for b in first_run]
    it = iter(first_run)
    seen = [next(it).index.tolist() for _ in range(4)]
    state = first_run.state_dict()
    assert state == {"epoch": 2, "batches_done": 4}
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.batch_sampler.set_epoch(2)
    assert seen + [b.index.tolist() for b in resumed] == full


def test_sampler_shards_for_ddp_without_overlap():
    lengths = np.ones(100, dtype=int)
    shards = [list(BucketBatchSampler(lengths, 7, seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 7
    assert not {i for b in shards[0] for i in b} & {i for b in shards[1] for i in b}
    # one process's 15 batches, dealt alternately; the 15th is dropped so both ranks take 7 steps
    one = [list(b) for b in BucketBatchSampler(lengths, 7, seed=1)]
    assert len(one) == 15
    assert [list(b) for b in shards[0]] == one[0:14:2] and [list(b) for b in shards[1]] == one[1:14:2]


def test_sampler_deals_each_batch_to_the_ranks_for_ddp_training():
    # training under DDP: the same batches as one process, each dealt out row by row in length
    # order, so the ranks' shares are equally long and together make the one-process batch
    lengths = np.random.default_rng(0).integers(1, 40, 101)
    one = list(BucketBatchSampler(lengths, 8, seed=3))
    shards = [list(BucketBatchSampler(lengths, 8, seed=3, num_replicas=2, rank=r, split_batches=True))
              for r in (0, 1)]
    whole = [b for b in one if len(b) >= 2]                                  # a batch of one row is left out
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for b, s0, s1 in zip(whole, *shards):
        assert sorted(s0 + s1) == sorted(b) and len(s0) - len(s1) in (0, 1)
        assert abs(int(lengths[s0].sum()) - int(lengths[s1].sum())) <= int(lengths[b].max())


def test_sampler_token_budget():
    lengths = np.array([10] * 50 + [50] * 50)
    for b in BucketBatchSampler(lengths, 64, max_tokens=200, shuffle=False):
        assert len(b) * lengths[b].max() <= 200


def test_mismatched_parallel_files_name_both(tmp_path):
    (tmp_path / "a.src").write_text("x\ny\nz\n")
    (tmp_path / "a.tgt").write_text("x\ny\n")
    with pytest.raises(InputError, match=r"a\.src has 3 lines.*a\.tgt has 2 lines"):
        read_parallel(tmp_path / "a.src", tmp_path / "a.tgt")


def test_empty_training_split_is_an_error(tmp_path, toy_tokenizer):
    (tmp_path / "e.src").write_text("")
    (tmp_path / "e.tgt").write_text("")
    with pytest.raises(InputError, match="empty corpus"):
        ParallelDataset.from_files(tmp_path / "e.src", tmp_path / "e.tgt", toy_tokenizer, toy_tokenizer)


def test_training_filter_drops_long_and_empty_pairs(tmp_path, toy_data, toy_tokenizer):
    src = (toy_data / "train.src").read_text().splitlines()[:50]
    tgt = (toy_data / "train.tgt").read_text().splitlines()[:50]
    src[3], tgt[7] = "", " ".join([tgt[7]] * 20)
    (tmp_path / "f.src").write_text("\n".join(src) + "\n")
    (tmp_path / "f.tgt").write_text("\n".join(tgt) + "\n")
    ds = ParallelDataset.from_files(tmp_path / "f.src", tmp_path / "f.tgt", toy_tokenizer, toy_tokenizer, max_len=30)
    assert len(ds) == 48
    assert int(torch.tensor(ds.lengths).max()) <= 31


SENTENCES = ["the quick brown fox jumps over the lazy dog", "a dog runs through the snow",
             "two men are playing football in a green field", "people walk along the river at night",
             "a woman reads a book under a large tree", "children play with a red ball on the beach"] * 20


@pytest.fixture(scope="module")
def subword_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "text.txt"
    path.write_text("\n".join(SENTENCES) + "\n")
    return train_tokenizer([path], 60, model_type="unigram")


def test_subword_sampling_draws_other_segmentations_of_the_same_text(subword_tokenizer):
    tok = subword_tokenizer
    ids = TokenArray.from_lists(tok.encode(SENTENCES[:6]))
    base = ParallelDataset(ids, ids)
    sampled = SubwordSampling(base, tok, tok, 0.5, seed=3)
    assert len(sampled) == 6 and np.array_equal(sampled.lengths, base.lengths)
    seen = set()
    for _ in range(10):
        for i in range(6):
            j, src, tgt = sampled[i]
            assert j == i and src.dtype == np.int32
            assert tok.decode([src.tolist()]) == tok.decode([tgt.tolist()]) == [SENTENCES[i]]  # same text
            seen.add(tuple(src.tolist()))
    assert len(seen) > 6                        # not always the usual segmentation
    # the same seed draws the same segmentations again
    first = [SubwordSampling(base, tok, tok, 0.5, seed=3)[i][1].tolist() for i in range(6)]
    again = [SubwordSampling(base, tok, tok, 0.5, seed=3)[i][1].tolist() for i in range(6)]
    assert first == again


def test_subword_sampling_draws_an_epoch_at_once_and_serves_what_it_drew(subword_tokenizer):
    tok = subword_tokenizer
    ids = TokenArray.from_lists(tok.encode(SENTENCES[:8]))
    base = ParallelDataset(ids, ids)
    sampled = SubwordSampling(base, tok, tok, 0.5, seed=5)
    draws = []
    for _ in range(4):
        lengths = sampled.draw()
        items = [sampled[i] for i in range(8)]
        assert [j for j, _, _ in items] == list(range(8))
        assert [tok.decode([s.tolist()])[0] for _, s, _ in items] == SENTENCES[:8]   # the same text
        # what the batches are bucketed by is what the items are
        assert lengths.tolist() == [max(len(s), len(t)) + 1 for _, s, t in items] == sampled.lengths.tolist()
        assert all(np.array_equal(sampled[i][1], items[i][1]) for i in range(8))    # stable within the epoch
        draws.append([s.tolist() for _, s, _ in items])
    assert any(d != draws[0] for d in draws[1:])                                     # anew each epoch


def test_batch_sampler_buckets_each_epoch_by_the_lengths_drawn_for_it():
    calls = []

    def draw():
        calls.append(1)
        return rng.integers(1, 40, size=64)

    rng = np.random.default_rng(0)
    sampler = BucketBatchSampler(np.full(64, 5), 8, shuffle=True, seed=1, pool_factor=8, draw=draw)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert list(sampler) == batches and len(calls) == epoch + 1   # one draw an epoch
        drawn = sampler.lengths
        # one pool of 64: consecutive batches in length order, so no two batches overlap in length
        spans = sorted((drawn[b].min(), drawn[b].max()) for b in batches)
        assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(spans, spans[1:]))


def test_datamodule_pads_sampled_batches_to_what_they_hold(tmp_path, subword_tokenizer):
    dm = TranslationDataModule(*_split_files(tmp_path), subword_tokenizer, subword_tokenizer, batch_size=3,
                               subword_alpha=0.5, max_len=100)
    dm.setup("fit")
    loader = dm.train_dataloader()
    for epoch in range(2):
        dm.train_sampler.set_epoch(epoch)
        seen = []
        for batch in loader:
            drawn = dm.train_data.lengths[batch.index.numpy()]
            # a batch is as wide as its longest pair: bucketed by these very segmentations
            assert max(batch.src.size(1), batch.tgt_in.size(1)) == drawn.max()
            seen += batch.index.tolist()
        assert sorted(seen) == list(range(12))


def test_subword_sampling_keeps_unknown_pieces_and_respects_max_len(subword_tokenizer):
    tok = subword_tokenizer
    usual = tok.encode([SENTENCES[0]])[0]
    with_unk = [*usual[:3], UNK_ID, *usual[3:]]
    base = ParallelDataset(TokenArray.from_lists([with_unk]), TokenArray.from_lists([usual]))
    sampled = SubwordSampling(base, tok, tok, 1.0, seed=0, max_len=len(usual))
    for _ in range(20):
        _, src, tgt = sampled[0]
        assert src.tolist() == with_unk                 # its text would not come back from decoding
        assert len(tgt) <= len(usual)                   # longer samples fall back to the usual ids
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\], got 0"):
        SubwordSampling(base, tok, tok, 0.0)
    with pytest.raises(ValueError, match="nbest must be -1 .* got 0"):
        SubwordSampling(base, tok, tok, 0.1, nbest=0)


def _split_files(tmp_path) -> list:
    """train.src/.tgt and valid.src/.tgt of 12 sentences each: a datamodule's four paths."""
    for split in ("train", "valid"):
        (tmp_path / f"{split}.src").write_text("\n".join(SENTENCES[:12]) + "\n")
        (tmp_path / f"{split}.tgt").write_text("\n".join(SENTENCES[:12]) + "\n")
    return [tmp_path / name for name in ("train.src", "train.tgt", "valid.src", "valid.tgt")]


def test_datamodule_samples_training_pairs_only_when_asked(tmp_path, subword_tokenizer):
    paths = _split_files(tmp_path)
    plain = TranslationDataModule(*paths, subword_tokenizer, subword_tokenizer, batch_size=4)
    sampling = TranslationDataModule(*paths, subword_tokenizer, subword_tokenizer, batch_size=4, subword_alpha=0.3)
    for dm in (plain, sampling):
        dm.setup("fit")
    assert isinstance(plain.train_dataloader().dataset, ParallelDataset)
    assert isinstance(sampling.train_dataloader().dataset, SubwordSampling)
    assert isinstance(sampling.val_dataloader().dataset, ParallelDataset)   # validation: usual segmentation


def test_training_batches_keep_equal_lengths_in_random_order_and_validation_orders_them(tmp_path, subword_tokenizer):
    # a full recipe trained with pairs of equal length ordered by source length learned slower
    # (RESULTS): only validation batches are ordered by `ties`
    dm = TranslationDataModule(*_split_files(tmp_path), subword_tokenizer, subword_tokenizer, batch_size=4)
    dm.setup("fit")
    assert dm.train_sampler.ties is None
    assert dm.valid_sampler.ties is not None
    assert dm.valid_sampler.ties.tolist() == dm.valid_set.ties.tolist()
