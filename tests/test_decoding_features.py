"""Decoding features: ensembles, sampling, no-repeat n-grams, coverage penalty, forced scores."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from seq2seq.checkpoint import CheckpointError, load_model, save_model
from seq2seq.data import collate
from seq2seq.ensemble import Ensemble, PerModel, pack
from seq2seq.files import InputError
from seq2seq.info import format_card, model_card
from seq2seq.model import ModelConfig, Seq2Seq
from seq2seq.search import (
    SearchOptions,
    beam_search,
    coverage_penalty,
    forced_log_probs,
    greedy_search,
    max_lengths,
    repeated_ngram_mask,
    sample_search,
    top_k_filter,
    top_p_filter,
)
from seq2seq.tokenizer import train_tokenizer
from seq2seq.translate import Translator
from seq2seq.tune import store_decoding

from .conftest import random_sources, run_cli


def _other_tiny_model(seed: int = 1) -> Seq2Seq:
    """Same architecture as the `tiny_model` fixture, different weights."""
    torch.manual_seed(seed)
    cfg = ModelConfig(src_vocab_size=30, tgt_vocab_size=25, embedding_size=16, encoder_hidden_size=12,
                      encoder_layers=2, decoder_hidden_sizes=[20, 24], attention="bahdanau", dropout=0.0)
    return Seq2Seq(cfg).eval()


def _same(a, b, tol=1e-5):
    """Two search results agree in tokens, scores and log-probabilities."""
    assert [[h.tokens for h in s] for s in a] == [[h.tokens for h in s] for s in b]
    for sa, sb in zip(a, b):
        assert [h.score for h in sa] == pytest.approx([h.score for h in sb], abs=tol)
        assert [h.log_prob for h in sa] == pytest.approx([h.log_prob for h in sb], abs=tol)


def _repeats_an_ngram(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


# ---- ensembles ------------------------------------------------------------------

def test_ensemble_of_one_equals_the_model_alone(tiny_model):
    src, src_len = random_sources([6, 2, 9, 4])
    limits = max_lengths(src_len, 1.5, 3, 50)
    one = Ensemble([tiny_model]).eval()
    _same(greedy_search(one, src, src_len, limits), greedy_search(tiny_model, src, src_len, limits), tol=0)
    _same(beam_search(one, src, src_len, limits, 4, nbest=3),
          beam_search(tiny_model, src, src_len, limits, 4, nbest=3), tol=0)


def test_ensemble_of_two_identical_models_equals_one(tiny_model):
    src, src_len = random_sources([5, 8, 3])
    limits = max_lengths(src_len, 1.5, 3, 50)
    two = Ensemble([tiny_model, copy.deepcopy(tiny_model)]).eval()
    _same(beam_search(two, src, src_len, limits, 3, nbest=2),
          beam_search(tiny_model, src, src_len, limits, 3, nbest=2))
    _same(greedy_search(two, src, src_len, limits), greedy_search(tiny_model, src, src_len, limits))


def test_ensemble_step_is_the_mean_of_the_members_log_probabilities(tiny_model):
    other = _other_tiny_model()
    src, src_len = random_sources([5, 3])
    ensemble = Ensemble([tiny_model, other]).eval()
    prev = torch.tensor([2, 2])
    with torch.inference_mode():
        memory, state = ensemble.encode(src, src_len)
        log_probs, new_state, _ = ensemble.decode_step(prev, state, memory)
        members = []
        for m in (tiny_model, other):
            m_memory, m_state = m.encode(src, src_len)
            members.append(m.decode_step(prev, m_state, m_memory)[0])   # (batch, vocab)
    torch.testing.assert_close(log_probs, (members[0] + members[1]) / 2)
    assert not torch.allclose(members[0], members[1])  # the two really differ
    flipped = new_state.index_select(torch.tensor([1, 0]))
    assert isinstance(flipped, PerModel) and len(flipped) == 2
    assert torch.equal(flipped[1].feed, new_state[1].feed.flip(0))
    # search over an ensemble of different models: beam 1 still equals greedy
    limits = max_lengths(src_len, 1.5, 3, 50)
    _same(greedy_search(ensemble, src, src_len, limits), beam_search(ensemble, src, src_len, limits, 1), tol=1e-4)


@pytest.fixture(scope="module")
def tokenizer_checkpoints(toy_data, tmp_path_factory):
    """Three small checkpoints: a and b share a tokenizer, c has another one."""
    d = tmp_path_factory.mktemp("ensemble")
    files = [toy_data / "train.src", toy_data / "train.tgt"]
    shared, different = train_tokenizer(files, 100, model_type="word"), train_tokenizer(files, 60, model_type="word")
    paths = {}
    for name, tok, seed in (("a", shared, 0), ("b", shared, 1), ("c", different, 0)):
        torch.manual_seed(seed)
        model = Seq2Seq(ModelConfig(src_vocab_size=len(tok), tgt_vocab_size=len(tok), embedding_size=8,
                                    encoder_hidden_size=8, decoder_hidden_sizes=[12], dropout=0.0))
        paths[name] = save_model(d / f"{name}.pt", model.eval(), tok, tok)
    return paths


def test_an_ensemble_needs_one_tokenizer(tokenizer_checkpoints):
    a, b, c = tokenizer_checkpoints["a"], tokenizer_checkpoints["b"], tokenizer_checkpoints["c"]
    with pytest.raises(CheckpointError) as err:
        Translator.from_checkpoint([a, b, c])
    assert str(err.value) == f"checkpoints {a} and {c} use different tokenizers; an ensemble needs one vocabulary"
    both = Translator.from_checkpoints([a, b])
    assert isinstance(both.model, Ensemble) and len(both.model.models) == 2
    assert isinstance(Translator.from_checkpoint([a]).model, Seq2Seq)  # one checkpoint: no wrapper


def _hypotheses(translator: Translator, lines: list[str], alpha: float | None = None):
    return [[(h.text, h.score) for h in hyps]
            for hyps in translator.translate_hypotheses(lines, SearchOptions(beam_size=3, alpha=alpha))]


def test_an_ensemble_file_translates_as_its_members_given_together(tokenizer_checkpoints, toy_data, tmp_path):
    a, b = tokenizer_checkpoints["a"], tokenizer_checkpoints["b"]
    packed = pack([a, b], tmp_path / "ab.pt")
    from_file, together = Translator.from_checkpoint(packed), Translator.from_checkpoints([a, b])
    assert isinstance(from_file.model, Ensemble) and len(from_file.model.models) == 2
    lines = (toy_data / "valid.src").read_text().splitlines()[:8]
    assert _hypotheses(from_file, lines, alpha=0.0) == _hypotheses(together, lines, alpha=0.0)
    with pytest.raises(CheckpointError, match=f"{packed} is an ensemble of 2 models, not one model"):
        load_model(packed)  # code that needs one model says so instead of failing on a missing key


def test_a_tuned_ensemble_file_decodes_with_its_own_length_penalty(tokenizer_checkpoints, tmp_path):
    a, b = tokenizer_checkpoints["a"], tokenizer_checkpoints["b"]
    tuned_a = store_decoding(a, {"alpha": 0.6, "beam_size": 5}, tmp_path / "tuned_a.pt")
    packed = pack([tuned_a, b], tmp_path / "ab.pt")
    assert Translator.from_checkpoint(tuned_a).default_alpha == 0.6
    # a member's penalty was chosen for it alone: neither the packed file nor a -c list takes it
    assert Translator.from_checkpoint(packed).default_alpha == 0.0
    assert Translator.from_checkpoints([tuned_a, b]).default_alpha == 0.0
    store_decoding(packed, {"alpha": 1.2, "beam_size": 5})
    assert Translator.from_checkpoint(packed).default_alpha == 1.2
    assert Translator.from_checkpoints([packed, a]).default_alpha == 0.0


def test_packing_checks_its_inputs_and_flattens_ensemble_files(tokenizer_checkpoints, tmp_path):
    a, b, c = tokenizer_checkpoints["a"], tokenizer_checkpoints["b"], tokenizer_checkpoints["c"]
    with pytest.raises(InputError, match=f"cannot pack {a} and {c} into one ensemble: different tokenizers"):
        pack([a, c], tmp_path / "ac.pt")
    with pytest.raises(InputError, match="an ensemble needs at least two models, got 1"):
        pack([a], tmp_path / "a.pt")
    assert not (tmp_path / "ac.pt").exists() and not (tmp_path / "a.pt").exists()
    three = pack([pack([a, b], tmp_path / "ab.pt"), a], tmp_path / "aba.pt")
    assert len(Translator.from_checkpoint(three).model.models) == 3


def test_model_card_of_an_ensemble_file_lists_its_members(tokenizer_checkpoints, tmp_path):
    a, b = tokenizer_checkpoints["a"], tokenizer_checkpoints["b"]
    card = model_card(pack([a, b], tmp_path / "ab.pt"))
    one = model_card(a)
    assert card["format_version"] == 2 and len(card["members"]) == 2 and one["members"] is None
    assert card["parameters"] == 2 * one["parameters"]
    assert card["architecture"] == f"ensemble of 2: {one['architecture']}"
    text = format_card(card)
    assert "member 1" in text and "member 2" in text and f"{one['parameters']:,} parameters" in text


def test_ensemble_cli_writes_a_file_translate_reads(tokenizer_checkpoints, toy_data, tmp_path):
    a, b, c = tokenizer_checkpoints["a"], tokenizer_checkpoints["b"], tokenizer_checkpoints["c"]
    out = tmp_path / "ab.pt"
    proc = run_cli(["seq2seq-ensemble", "-c", str(a), "-c", str(b), "-o", str(out), "-q"])
    assert proc.returncode == 0, proc.stderr.decode()
    lines = (toy_data / "valid.src").read_text().splitlines()[:3]
    proc = run_cli(["seq2seq-translate", "-c", str(out), "-q"], stdin="\n".join(lines).encode() + b"\n")
    assert proc.returncode == 0 and len(proc.stdout.decode().splitlines()) == 3
    proc = run_cli(["seq2seq-ensemble", "-c", str(a), "-c", str(c), "-o", str(tmp_path / "ac.pt")])
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    assert b"different tokenizers" in proc.stderr


# ---- sampling -------------------------------------------------------------------

def test_top_k_one_is_greedy(tiny_model):
    src, src_len = random_sources([6, 2, 9, 4])
    limits = max_lengths(src_len, 1.5, 3, 50)
    sampled = sample_search(tiny_model, src, src_len, limits, generator=torch.Generator().manual_seed(7),
                            temperature=3.0, top_k=1)
    _same(sampled, greedy_search(tiny_model, src, src_len, limits), tol=1e-5)


def test_top_k_and_top_p_filters_are_pure_functions():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(top_k_filter(logits, 2)[0, 2:]).all() and torch.isfinite(top_k_filter(logits, 2)[0, :2]).all()
    assert torch.equal(top_k_filter(logits, 0), logits)
    # the top two hold 0.8: p=0.8 keeps them, p=0.81 needs the third, p=0.1 keeps only the best
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(top_p_filter(logits[:, [3, 1, 0, 2]], 0.1)).tolist() == [[False, False, True, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_sampling_is_reproducible_by_seed_and_leaves_the_global_rng_alone(toy_run):
    translator = Translator.from_checkpoint(toy_run["model"])
    sources = (toy_run["data"] / "test.src").read_text().splitlines()[:20]

    def sample(seed):
        options = SearchOptions(beam_size=1, sample=True, temperature=5.0, seed=seed)
        return [h[0].text for h in translator.translate_hypotheses(sources, options, batch_size=8)]

    rng_before = torch.get_rng_state()
    first, again, other = sample(1), sample(1), sample(2)
    assert first == again
    assert first != other
    assert torch.equal(rng_before, torch.get_rng_state())
    greedy = translator.translate(sources, beam_size=1)
    assert first != greedy  # temperature 5 really samples


@pytest.mark.parametrize("bad, message", [
    ({"temperature": 0.0}, "temperature must be a finite number > 0, got 0.0"),
    ({"temperature": -1.5}, "got -1.5"),
    ({"temperature": math.inf}, "got inf"),
    ({"top_k": -1}, "top_k must be >= 0 (0 = whole vocabulary), got -1"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "got 1.5"),
    ({"sample": True, "beam_size": 5}, "use beam_size 1, got 5"),
    ({"no_repeat_ngram": -2}, "no_repeat_ngram must be >= 0 (0 = off), got -2"),
    ({"coverage_penalty": -0.1}, "coverage_penalty must be >= 0, got -0.1"),
    ({"normalisation": "avg"}, "'avg'; choose one of: gnmt, average, none"),
    ({"max_len_a": math.nan}, "max_len_a must be a finite number >= 0, got nan"),
    ({"max_len_a": -1.0}, "got -1.0"),
    ({"max_output_len": 0}, "max_output_len must be >= 1, got 0"),
])
def test_search_options_name_the_bad_value(bad, message):
    with pytest.raises(ValueError) as err:
        SearchOptions(**{"beam_size": 1, **bad})
    assert message in str(err.value)


def test_cli_refuses_a_bad_temperature_before_loading_anything(tmp_path):
    proc = run_cli(["seq2seq-translate", "-c", str(tmp_path / "never-read.pt"), "--sample",
                    "--temperature", "-2", "x"])
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    assert b"temperature must be a finite number > 0, got -2.0" in proc.stderr


# ---- no repeated n-grams, minimum length ------------------------------------------

def test_repeated_ngram_mask_is_a_pure_function():
    seqs = torch.tensor([[5, 6, 5], [7, 7, 8]])

    def banned(n):
        return [torch.nonzero(row).flatten().tolist() for row in repeated_ngram_mask(seqs, n, 10)]

    assert banned(1) == [[5, 6], [7, 8]]
    assert banned(2) == [[6], []]      # "5 6" already seen and the output ends in 5
    assert banned(3) == [[], []]
    assert banned(4) == [[], []]       # shorter than n: nothing to repeat
    assert banned(0) == [[], []]


def test_no_repeat_ngram_holds_in_greedy_beam_and_sampling(tiny_model):
    src, src_len = random_sources([6, 2, 9, 4, 7])
    limits = max_lengths(src_len, 3.0, 5, 50)
    plain = greedy_search(tiny_model, src, src_len, limits)
    assert any(_repeats_an_ngram(s[0].tokens, 2) for s in plain)  # the untrained model does repeat
    generator = torch.Generator().manual_seed(0)
    for n in (2, 3):
        results = [greedy_search(tiny_model, src, src_len, limits, no_repeat_ngram=n),
                   beam_search(tiny_model, src, src_len, limits, 4, nbest=4, no_repeat_ngram=n),
                   sample_search(tiny_model, src, src_len, limits, generator=generator, no_repeat_ngram=n)]
        for sentences in results:
            for hyps in sentences:
                for h in hyps:
                    assert not _repeats_an_ngram(h.tokens, n), (n, h.tokens)


def test_beam_size_one_is_greedy_under_constraints(tiny_model):
    src, src_len = random_sources([6, 2, 9, 4])
    limits = max_lengths(src_len, 2.0, 3, 50)
    greedy = greedy_search(tiny_model, src, src_len, limits, min_len=4, no_repeat_ngram=2)
    beam = beam_search(tiny_model, src, src_len, limits, 1, min_len=4, no_repeat_ngram=2, normalisation="none")
    _same(greedy, beam, tol=1e-4)
    assert all(len(s[0].tokens) >= 4 for s in greedy)


# ---- coverage penalty -----------------------------------------------------------

def test_coverage_penalty_is_a_pure_function():
    attention = torch.tensor([[0.5, 0.2], [0.3, 0.9]])   # columns sum to 0.8 and 1.1
    assert coverage_penalty(attention, 2.0) == pytest.approx(2.0 * math.log(0.8))
    assert coverage_penalty(attention, 0.0) == 0.0
    assert coverage_penalty(torch.full((4, 3), 0.25), 1.0) == 0.0       # every word attended to once
    assert math.isfinite(coverage_penalty(torch.tensor([[1.0, 0.0]]), 1.0))  # never attended: finite


def test_coverage_penalty_zero_changes_nothing(tiny_model):
    src, src_len = random_sources([6, 2, 9])
    limits = max_lengths(src_len, 1.5, 3, 50)
    # the default (no penalty, no attention kept) against a zero penalty on the path that keeps attention
    _same(beam_search(tiny_model, src, src_len, limits, 4, nbest=3, alpha=0.6),
          beam_search(tiny_model, src, src_len, limits, 4, nbest=3, alpha=0.6, coverage_beta=0.0,
                      return_attention=True), tol=0)


def test_coverage_penalty_is_added_to_the_final_score(tiny_model):
    src, src_len = random_sources([9, 7, 8])
    limits = torch.tensor([3, 2, 4])   # short outputs cannot cover long sources: the penalty bites
    hyps = beam_search(tiny_model, src, src_len, limits, 4, nbest=3, normalisation="none", coverage_beta=0.5,
                       return_attention=True)
    for s, sentence in enumerate(hyps):
        assert [h.score for h in sentence] == sorted((h.score for h in sentence), reverse=True)
        for h in sentence:
            assert h.attention.shape[1] == int(src_len[s])  # real source positions only
            assert h.score == pytest.approx(h.log_prob + coverage_penalty(h.attention, 0.5), abs=1e-5)
            assert h.score < h.log_prob


# ---- forced scores --------------------------------------------------------------

def _forced(model, src, src_len, outputs: list[list[int]]) -> torch.Tensor:
    """Log-probability of each output token (then EOS) given its source: (batch, tgt_len)."""
    targets = collate([(i, np.zeros(0, np.int64), np.asarray(toks)) for i, toks in enumerate(outputs)])
    return forced_log_probs(model, src, src_len, targets.tgt_in, targets.tgt_out)


@pytest.mark.parametrize("ensemble", [False, True])
def test_forced_score_of_the_greedy_output_is_its_log_prob(tiny_model, ensemble):
    model = Ensemble([tiny_model, _other_tiny_model()]).eval() if ensemble else tiny_model
    src, src_len = random_sources([6, 2, 9, 4, 5])
    limits = max_lengths(src_len, 3.0, 5, 50)
    hyps = [s[0] for s in greedy_search(model, src, src_len, limits, no_repeat_ngram=2)]
    token_lp = _forced(model, src, src_len, [h.tokens for h in hyps])
    for i, h in enumerate(hyps):
        n = len(h.tokens) + 1                      # EOS included, also where the output reached its limit
        assert float(token_lp[i, :n].sum()) == pytest.approx(h.log_prob, abs=1e-4)


def test_translator_scores_its_own_translations_and_blank_lines(toy_run):
    translator = Translator.from_checkpoint(toy_run["model"])
    sources = (toy_run["data"] / "test.src").read_text().splitlines()[:16]
    greedy = [h[0] for h in translator.translate_hypotheses(sources, SearchOptions(beam_size=1), batch_size=5)]
    scores = translator.score(sources, [g.text for g in greedy], batch_size=7)
    for g, s in zip(greedy, scores):
        assert s.pieces == g.pieces + ["</s>"]
        assert s.log_prob == pytest.approx(g.log_prob, abs=1e-4)
        assert sum(s.token_log_probs) == pytest.approx(s.log_prob, abs=1e-4)
        assert s.mean_log_prob == pytest.approx(s.log_prob / (len(g.pieces) + 1))
    blank = translator.score(["", "   ", sources[0], "\u200b", "\ufeff"], ["some target", "", "", "x", "x"])
    assert blank[0] is None and blank[1] is None
    assert blank[2].pieces == ["</s>"] and len(blank[2].token_log_probs) == 1 and blank[2].log_prob < 0
    assert blank[3] is None and blank[4] is None   # no subwords (a zero-width space, a byte-order mark): blank


def test_a_line_of_characters_the_tokenizer_drops_is_blank(toy_run):
    """A zero-width space or a byte-order mark alone encodes to no subwords: such a line gets
    an empty translation, like an empty line, instead of one made up from EOS alone."""
    translator = Translator.from_checkpoint(toy_run["model"])
    source = (toy_run["data"] / "test.src").read_text().splitlines()[0]
    lines = ["\u200b", source, "\ufeff", " \u200b\ufeff "]
    assert [translator.src_tokenizer.encode([line])[0] for line in lines[::2]] == [[], []]
    for options in (SearchOptions(beam_size=1), SearchOptions(beam_size=3, nbest=2)):
        hyps = translator.translate_hypotheses(lines, options)
        assert [h[0].text for h in hyps] == ["", translator.translate(source, options=options), "", ""]
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        translator.translate(lines, batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        translator.translate(["", "\u200b"], batch_size=0)   # refused even when no line needs the model
    with pytest.raises(ValueError, match="batch_size must be >= 1, got -1"):
        translator.score(lines, lines, batch_size=-1)


# ---- the command line -----------------------------------------------------------

def test_cli_ensemble_of_two_checkpoints_translates(toy):
    lines, refs = toy["lines"][:5], toy["refs"][:5]
    proc = run_cli(["seq2seq-translate", "-c", toy["model"], "--checkpoint", toy["model"], "--json", *lines])
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    objects = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [o["translation"] for o in objects] == refs
    assert objects[0]["hypotheses"][0]["tokens"] == ["▁" + w for w in refs[0].split()]


def test_cli_sampling_is_reproducible_across_chunks(toy):
    args = ["seq2seq-translate", "-c", toy["model"], "--sample", "--temperature", "5", "--chunk-size", "3",
            *toy["lines"][:8]]
    first, again, other = (run_cli([*args, "--seed", seed]) for seed in ("1", "1", "2"))
    assert first.returncode == 0, first.stderr.decode()[-2000:]
    out = first.stdout.decode().splitlines()
    assert len(out) == 8 and first.stdout == again.stdout and first.stdout != other.stdout


def test_cli_score_tab_lines_and_target_files(toy, tmp_path):
    src, tgt = toy["lines"][:3], toy["refs"][:3]
    text = f"{src[0]}\t{tgt[0]}\n\n{src[1]}\t{tgt[1]}\n   \n{src[0]}\t\n"
    proc = run_cli(["seq2seq-translate", "-c", toy["model"], "--score", "--json"], stdin=text.encode())
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    rows = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[1]["log_prob"] is None and rows[3]["log_prob"] is None
    assert rows[4]["tokens"] == ["</s>"]               # an empty target: EOS alone
    assert rows[0]["tokens"][-1] == "</s>" and len(rows[0]["token_log_probs"]) == len(rows[0]["tokens"])
    assert sum(rows[0]["token_log_probs"]) == pytest.approx(rows[0]["log_prob"], abs=1e-4)
    assert rows[0]["log_prob"] > rows[4]["log_prob"]   # for one source, the reference beats nothing

    (tmp_path / "s.txt").write_text("\n".join(src) + "\n")
    (tmp_path / "t.txt").write_text("\n".join(tgt) + "\n")
    plain = run_cli(["seq2seq-translate", "-c", toy["model"], "--score", "--input", str(tmp_path / "s.txt"),
                     "--targets", str(tmp_path / "t.txt")])
    assert plain.returncode == 0, plain.stderr.decode()[-2000:]
    values = [float(v) for v in plain.stdout.decode().splitlines()]
    # the command line's default precision is auto: bfloat16 on a CPU with bfloat16 products
    third = Translator.from_checkpoint(toy["model"], precision="auto").score([src[2]], [tgt[2]])[0].log_prob
    assert values == pytest.approx([rows[0]["log_prob"], rows[2]["log_prob"], third], abs=1e-5)

    (tmp_path / "short.txt").write_text(tgt[0] + "\n")
    bad = run_cli(["seq2seq-translate", "-c", toy["model"], "--score", "--input", str(tmp_path / "s.txt"),
                   "--targets", str(tmp_path / "short.txt")])
    assert bad.returncode == 2 and b"Traceback" not in bad.stderr
    assert f"{tmp_path / 's.txt'} has 3 lines but {tmp_path / 'short.txt'} has 1" in bad.stderr.decode()
