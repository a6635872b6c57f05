"""Search truths: beam 1 is greedy, batching changes nothing, beams never lose to greedy."""

from __future__ import annotations

import pytest
import torch

from seq2seq.search import beam_search, greedy_search, length_penalty, max_lengths, normalise
from seq2seq.translate import SearchOptions, Translator

from .conftest import random_sources


def test_beam_size_one_is_greedy(tiny_model):
    src, src_len = random_sources([6, 2, 9, 4])
    limits = max_lengths(src_len, 1.5, 3, 50)
    greedy = greedy_search(tiny_model, src, src_len, limits)
    beam = beam_search(tiny_model, src, src_len, limits, beam_size=1)
    for g, b in zip(greedy, beam):
        assert g[0].tokens == b[0].tokens
        assert g[0].log_prob == pytest.approx(b[0].log_prob, abs=1e-4)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_sentence_alone_equals_sentence_in_a_batch_of_longer_ones(tiny_model, beam_size):
    src, src_len = random_sources([3, 11, 8, 12])
    limits = max_lengths(src_len, 1.5, 3, 50)
    batched = beam_search(tiny_model, src, src_len, limits, beam_size=beam_size, nbest=beam_size)
    alone = beam_search(tiny_model, src[:1, :3], src_len[:1], limits[:1], beam_size=beam_size, nbest=beam_size)
    assert [h.tokens for h in alone[0]] == [h.tokens for h in batched[0]]
    assert [h.score for h in alone[0]] == pytest.approx([h.score for h in batched[0]], abs=1e-4)


def test_nbest_is_sorted_and_complete(tiny_model):
    src, src_len = random_sources([5, 7])
    hyps = beam_search(tiny_model, src, src_len, max_lengths(src_len, 1.5, 3, 50), beam_size=5, nbest=3)
    for sentence in hyps:
        assert len(sentence) == 3
        scores = [h.score for h in sentence]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in sentence}) == 3


def test_output_never_exceeds_the_length_limit(tiny_model):
    src, src_len = random_sources([4, 9])
    limits = torch.tensor([2, 5])
    for hyps in (greedy_search(tiny_model, src, src_len, limits),
                 beam_search(tiny_model, src, src_len, limits, beam_size=3)):
        assert len(hyps[0][0].tokens) <= 2 and len(hyps[1][0].tokens) <= 5


def test_penalties_are_pure_functions():
    assert length_penalty(1.0, 0.0) == 1.0
    assert length_penalty(7.0, 1.0) == pytest.approx(2.0)
    assert normalise(-4.0, 4, 0.0, "average") == -1.0
    assert normalise(-4.0, 7, 1.0, "gnmt") == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="choose one of: gnmt, average, none"):
        normalise(-1.0, 1, 0.0, "bogus")


def test_beam_best_score_is_never_below_greedy(toy_run):
    translator = Translator.from_checkpoint(toy_run["model"])
    sources = (toy_run["data"] / "test.src").read_text().splitlines()[:100]
    greedy = translator.translate_hypotheses(sources, SearchOptions(beam_size=1))
    beam = translator.translate_hypotheses(sources, SearchOptions(beam_size=5, alpha=0.0, normalisation="none"))
    for g, b in zip(greedy, beam):
        assert b[0].log_prob >= g[0].log_prob - 1e-4


def test_batched_translation_matches_one_by_one(toy_run):
    translator = Translator.from_checkpoint(toy_run["model"])
    sources = (toy_run["data"] / "test.src").read_text().splitlines()[:12]
    together = translator.translate(sources, beam_size=5, batch_size=12)
    alone = [translator.translate(s, beam_size=5) for s in sources]
    assert together == alone
