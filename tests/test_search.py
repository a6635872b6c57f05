"""Search truths: beam 1 is greedy, batching changes nothing, beams never lose to greedy."""

from __future__ import annotations

import pytest
import torch

from seq2seq.ensemble import Ensemble
from seq2seq.model import Seq2Seq
from seq2seq.search import BeamSearch, beam_search, greedy_search, length_penalty, max_lengths, normalise
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


@pytest.mark.parametrize("min_len", [0, 3])
def test_greedy_shortcut_equals_the_full_log_softmax_path(tiny_model, monkeypatch, min_len):
    """Seq2Seq.greedy_step (vocabulary-major logits, no full log-softmax) picks the same tokens
    with the same log-probabilities as decode_step + argmax, with and without a minimum length;
    an output layer that is not a plain nn.Linear falls back to decode_step."""
    import seq2seq.search as search_module

    src, src_len = random_sources([6, 2, 9, 4, 1])
    limits = max_lengths(src_len, 1.5, 3, 50)
    fast = greedy_search(tiny_model, src, src_len, limits, min_len=min_len)
    monkeypatch.setattr(search_module, "FAST_GREEDY", False)
    full = greedy_search(tiny_model, src, src_len, limits, min_len=min_len)
    assert [h[0].tokens for h in fast] == [h[0].tokens for h in full]
    assert [h[0].log_prob for h in fast] == pytest.approx([h[0].log_prob for h in full], abs=1e-5)
    assert all(len(h[0].tokens) >= min_len for h in fast)

    class Wrapped(torch.nn.Module):   # e.g. the int8 layer: not an nn.Linear
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    assert tiny_model.has_greedy_shortcut
    monkeypatch.setattr(tiny_model.decoder, "output_layer", Wrapped(tiny_model.decoder.output_layer))
    assert not tiny_model.has_greedy_shortcut
    monkeypatch.setattr(search_module, "FAST_GREEDY", True)
    wrapped = greedy_search(tiny_model, src, src_len, limits, min_len=min_len)   # the full path again
    assert [h[0].tokens for h in wrapped] == [h[0].tokens for h in full]


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


class _Rows:
    """The state and memory of `_Looping`: nothing but a row count."""

    def __init__(self, rows: int):
        self.rows = rows

    def index_select(self, index):
        return _Rows(len(index))

    def cat(self, other):
        return _Rows(self.rows + other.rows)


class _Looping:
    """A model that at every step gives subword 4 probability 0.9 and EOS 0.05: a repetition loop."""

    PROBS = torch.tensor([0.0125, 0.0125, 0.0125, 0.05, 0.9, 0.0125])   # EOS_ID is 3

    def encode(self, src, src_len):
        return _Rows(src.size(0)), _Rows(src.size(0))

    def decode_step(self, prev, state, memory):
        rows = prev.size(0)
        return self.PROBS.log().expand(rows, -1).clone(), _Rows(rows), torch.ones(rows, 1)


def test_an_output_cut_at_the_limit_pays_for_its_eos():
    """An output that reaches its length limit ends with EOS like any other, and EOS's
    log-probability counts: a loop cut off at the limit must not outrank a finished output."""
    model, src, src_len, limits = _Looping(), torch.tensor([[5, 3]]), torch.tensor([2]), torch.tensor([20])
    log_p, log_eos = (float(p) for p in _Looping.PROBS.log()[[4, 3]])
    cut = 20 * log_p + log_eos                       # 20 subwords of the loop, then EOS
    (greedy,) = greedy_search(model, src, src_len, limits)
    assert greedy[0].tokens == [4] * 20 and greedy[0].log_prob == pytest.approx(cut, abs=1e-4)
    hyps = beam_search(model, src, src_len, limits, 4, nbest=4, normalisation="none")[0]
    assert hyps[0].tokens == [] and hyps[0].log_prob == pytest.approx(log_eos, abs=1e-5)   # EOS at once wins
    beam = beam_search(model, src, src_len, limits, 4, nbest=4, alpha=0.6)[0]
    longest = max(beam, key=lambda h: len(h.tokens))
    assert len(longest.tokens) == 20 and longest.log_prob == pytest.approx(cut, abs=1e-4)
    assert all(len(h.tokens) <= 20 for h in beam)


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


# ---- continuous batching: sentences join and leave a running search ----------------------

def _alone(model, src, src_len, limits, **options):
    return [beam_search(model, src[i:i + 1, :int(src_len[i])], src_len[i:i + 1], limits[i:i + 1], **options)[0]
            for i in range(src.size(0))]


def _joining(model, src, src_len, limits, joins: dict[int, list[int]], drop: dict[int, list[int]] | None = None,
             **options) -> tuple[dict[int, list], list[int]]:
    """Run one BeamSearch; before step s, sentences joins[s] join and drop[s] leave. Returns
    the results by sentence and the memory width seen at each step."""
    beams = BeamSearch(model, **options)
    results, widths, step = {}, [], 0
    while beams.live or any(s >= step for s in joins):
        for i in drop.get(step, []) if drop else []:
            beams.drop([i])
        if joins.get(step):
            idx = torch.tensor(joins[step])
            width = int(src_len[idx].max())
            beams.add(src[idx, :width], src_len[idx], limits[idx], tags=joins[step])
        widths.append(beams.width)
        for tag, hyps in beams.step():
            assert tag not in results
            results[tag] = hyps
        step += 1
    return results, widths


def _same_hyps(a, b, attention: bool = False):
    assert [h.tokens for h in a] == [h.tokens for h in b]
    assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)
    assert [h.log_prob for h in a] == pytest.approx([h.log_prob for h in b], abs=1e-4)
    if attention:
        for x, y in zip(a, b):
            assert x.attention.shape == y.attention.shape
            assert torch.allclose(x.attention, y.attention, atol=1e-5)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_sentences_joining_a_running_search_get_what_they_get_alone(tiny_model, beam_size):
    src, src_len = random_sources([5, 12, 3, 9, 7, 4], seed=3)
    limits = max_lengths(src_len, 1.5, 3, 50)
    options = dict(beam_size=beam_size, nbest=beam_size)
    alone = _alone(tiny_model, src, src_len, limits, **options)
    # a longer source joins (memory padded), then shorter ones, one of them while the first have finished
    results, widths = _joining(tiny_model, src, src_len, limits, {0: [0], 2: [1], 3: [2, 3], 5: [4], 30: [5]},
                               **options)
    assert sorted(results) == list(range(6))
    for i in range(6):
        _same_hyps(results[i], alone[i])
    assert widths[0] == 5 and widths[2] == 12          # padded to the longest source in flight ...
    assert widths[-1] == 4                              # ... and cropped once it has left


def test_joining_keeps_constraints_penalties_and_attention_per_sentence(tiny_model):
    src, src_len = random_sources([6, 10, 4], seed=5)
    limits = max_lengths(src_len, 1.5, 3, 50)
    options = dict(beam_size=4, nbest=2, alpha=0.6, min_len=3, no_repeat_ngram=2, coverage_beta=0.2,
                   return_attention=True)
    alone = _alone(tiny_model, src, src_len, limits, **options)
    results, _ = _joining(tiny_model, src, src_len, limits, {0: [0], 1: [1], 4: [2]}, **options)
    for i in range(3):
        _same_hyps(results[i], alone[i], attention=True)
        assert all(len(h.tokens) >= 3 for h in results[i])


def test_a_dropped_sentence_leaves_and_the_others_are_unchanged(tiny_model):
    src, src_len = random_sources([7, 9, 5], seed=7)
    limits = max_lengths(src_len, 1.5, 3, 50)
    alone = _alone(tiny_model, src, src_len, limits, beam_size=3)
    results, _ = _joining(tiny_model, src, src_len, limits, {0: [0, 1, 2]}, drop={2: [1], 3: [42]}, beam_size=3)
    assert sorted(results) == [0, 2]                    # an unknown tag is ignored
    _same_hyps(results[0], alone[0])
    _same_hyps(results[2], alone[2])


def test_an_ensemble_runs_a_joined_search_too(tiny_model):
    torch.manual_seed(1)
    other = Seq2Seq(tiny_model.config).eval()
    ensemble = Ensemble([tiny_model, other]).eval()
    src, src_len = random_sources([4, 11], seed=9)
    limits = max_lengths(src_len, 1.5, 3, 50)
    alone = _alone(ensemble, src, src_len, limits, beam_size=2)
    results, _ = _joining(ensemble, src, src_len, limits, {0: [0], 2: [1]}, beam_size=2)
    _same_hyps(results[0], alone[0])
    _same_hyps(results[1], alone[1])
