"""The length penalty chosen on validation: the choice, where it is stored, and who uses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from seq2seq.average import average
from seq2seq.checkpoint import read_checkpoint, save_model
from seq2seq.cli import evaluate_main, tune_main
from seq2seq.info import format_card, model_card
from seq2seq.model import ModelConfig, Seq2Seq
from seq2seq.quantize import resolve_precision
from seq2seq.search import SearchOptions
from seq2seq.serve import create_app
from seq2seq.tokenizer import train_tokenizer
from seq2seq.translate import Translation, Translator
from seq2seq.tune import choose_alpha, store_decoding


class ScriptedTranslator:
    """Gives the references back for some length penalties and noise for the others."""

    def __init__(self, references: list[str], good: set[float]):
        self.references, self.good, self.calls = references, good, []

    def translate_hypotheses(self, sources, options: SearchOptions, *, batch_size: int):
        self.calls.append((options.alpha, options.beam_size, options.normalisation, batch_size))
        texts = self.references if options.alpha in self.good else ["zzz"] * len(sources)
        return [[Translation(t, 0.0, 0.0, [])] for t in texts]


REFS = ["a dog runs in the park .", "two men play chess .", "the girl reads a book ."]


def test_the_best_validation_bleu_wins_and_a_tie_goes_to_the_smaller_alpha():
    translator = ScriptedTranslator(REFS, good={0.4, 0.8})
    choice = choose_alpha(translator, ["x"] * 3, REFS, beam_size=4, alphas=[0.8, 0.0, 0.4, 0.4], batch_size=7,
                          data="valid.en")
    assert choice["alpha"] == 0.4 and choice["bleu"] == pytest.approx(100.0)
    assert choice["grid"]["0.0"] < 1 and set(choice["grid"]) == {"0.0", "0.4", "0.8"}   # each value once
    assert (choice["beam_size"], choice["normalisation"], choice["data"]) == (4, "gnmt", "valid.en")
    assert choice["bleu_signature"].startswith("nrefs:1|case:mixed|")
    assert sorted(translator.calls) == [(0.0, 4, "gnmt", 7), (0.4, 4, "gnmt", 7), (0.8, 4, "gnmt", 7)]


@pytest.mark.parametrize("alphas, sources, message", [
    ([], ["x"] * 3, "no alpha to choose from"),
    ([0.0, -0.5], ["x"] * 3, "alpha must be >= 0, got -0.5"),
    ([0.0], ["x"] * 2, "cannot tune: 2 source lines but 3 references"),
])
def test_bad_grids_are_refused(alphas, sources, message):
    with pytest.raises(ValueError, match=message):
        choose_alpha(ScriptedTranslator(REFS, set()), sources, REFS, alphas=alphas)


@pytest.fixture(scope="module")
def model_pt(toy_data, tmp_path_factory) -> Path:
    """A small untrained checkpoint (its translations are poor, which does not matter here)."""
    tok = train_tokenizer([toy_data / "train.src", toy_data / "train.tgt"], 100, model_type="word")
    torch.manual_seed(0)
    model = Seq2Seq(ModelConfig(src_vocab_size=len(tok), tgt_vocab_size=len(tok), embedding_size=8,
                                encoder_hidden_size=8, decoder_hidden_sizes=[12], dropout=0.0))
    return save_model(tmp_path_factory.mktemp("tune") / "model.pt", model, tok, tok, meta={"src_lang": "src"})


@pytest.fixture(scope="module")
def tuned(model_pt, tmp_path_factory) -> Path:
    choice = {"alpha": 1.4, "beam_size": 5, "normalisation": "gnmt", "bleu": 12.5, "data": "valid.src",
              "bleu_signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0",
              "grid": {"0.0": 11.0, "1.4": 12.5}}
    return store_decoding(model_pt, choice, tmp_path_factory.mktemp("tuned") / "tuned.pt")


def test_the_choice_is_stored_in_the_checkpoint_and_read_back_as_the_default(model_pt, tuned):
    meta = read_checkpoint(tuned)["seq2seq"]["meta"]
    assert meta["src_lang"] == "src" and meta["decoding"]["alpha"] == 1.4
    assert meta["decoding"]["grid"] == {"0.0": 11.0, "1.4": 12.5}
    assert Translator.from_checkpoint(tuned).default_alpha == 1.4
    assert Translator.from_checkpoint(model_pt).default_alpha == 0.0        # --output left the original alone
    assert Translator.from_checkpoint([tuned, tuned]).default_alpha == 0.0  # an ensemble was never tuned
    card = model_card(tuned)
    assert card["decoding"]["alpha"] == 1.4
    assert "length penalty alpha 1.4, chosen with beam 5 on valid.src (BLEU 12.50; alpha 0: 11.00)" in format_card(card)
    assert "no length penalty stored" in format_card(model_card(model_pt))
    card["decoding"]["precision"] = "bfloat16"     # recorded by seq2seq-tune since the choice depends on it
    assert "alpha 1.4, chosen with beam 5 in bfloat16 on valid.src" in format_card(card)


def test_options_without_alpha_take_the_models_everywhere_in_the_python_api(tuned, toy_data):
    lines = (toy_data / "test.src").read_text().splitlines()[:3]
    translator = Translator.from_checkpoint(tuned)
    assert translator.resolve(SearchOptions(beam_size=3)).alpha == 1.4
    assert translator.resolve(SearchOptions(beam_size=3, alpha=0.0)).alpha == 0.0
    implicit = translator.translate_hypotheses(lines, SearchOptions(beam_size=3))
    explicit = translator.translate_hypotheses(lines, SearchOptions(beam_size=3, alpha=1.4))
    untuned = translator.translate_hypotheses(lines, SearchOptions(beam_size=3, alpha=0.0))
    assert [h[0].score for h in implicit] == [h[0].score for h in explicit] != [h[0].score for h in untuned]
    stream = translator.stream(SearchOptions(beam_size=3))
    assert stream.options.alpha == 1.4
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0, got -1"):
        SearchOptions(alpha=-1)


def test_an_average_does_not_inherit_a_length_penalty_tuned_for_one_checkpoint(tuned, tmp_path):
    averaged = average([tuned, tuned], tmp_path / "avg.pt")
    assert "decoding" not in read_checkpoint(averaged)["seq2seq"]["meta"]


def test_evaluate_uses_the_stored_alpha_unless_told_otherwise(tuned, toy_data, tmp_path, capsys):
    src, ref = tmp_path / "s.txt", tmp_path / "r.txt"
    src.write_text("".join(line + "\n" for line in (toy_data / "test.src").read_text().splitlines()[:4]))
    ref.write_text("".join(line + "\n" for line in (toy_data / "test.tgt").read_text().splitlines()[:4]))
    common = ["-c", str(tuned), "-s", str(src), "-r", str(ref), "--json", "-q"]
    assert evaluate_main(common) == 0
    assert json.loads(capsys.readouterr().out)["alpha"] == 1.4
    assert evaluate_main([*common, "--alpha", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["alpha"] == 0.0


def test_the_service_ranks_with_the_stored_alpha_when_a_request_names_none(tuned, toy_data):
    lines = (toy_data / "test.src").read_text().splitlines()[:2]
    translator = Translator.from_checkpoint(tuned)
    with TestClient(create_app(tuned)) as client:
        default = client.post("/translate", json={"text": lines, "beam_size": 3}).json()
        explicit = client.post("/translate", json={"text": lines, "beam_size": 3, "alpha": 0.0}).json()
    for answer, alpha in ((default, 1.4), (explicit, 0.0)):
        expected = translator.translate_hypotheses(lines, SearchOptions(beam_size=3, alpha=alpha))
        assert answer["translations"] == [h[0].text for h in expected]
        assert answer["scores"] == pytest.approx([h[0].score for h in expected], abs=1e-4)


def test_seq2seq_tune_writes_its_choice_and_refuses_bad_values(model_pt, toy_data, tmp_path, capsys):
    src, ref = tmp_path / "s.txt", tmp_path / "r.txt"
    src.write_text("".join(line + "\n" for line in (toy_data / "valid.src").read_text().splitlines()[:6]))
    ref.write_text("".join(line + "\n" for line in (toy_data / "valid.tgt").read_text().splitlines()[:6]))
    out = tmp_path / "tuned.pt"
    args = ["-c", str(model_pt), "-s", str(src), "-r", str(ref), "--beam-size", "2", "-o", str(out), "-q"]
    assert tune_main([*args, "--alphas", "0,1.5", "--json"]) == 0
    choice = json.loads(capsys.readouterr().out)
    assert choice["alpha"] in (0.0, 1.5) and set(choice["grid"]) == {"0.0", "1.5"} and choice["beam_size"] == 2
    assert read_checkpoint(out)["seq2seq"]["meta"]["decoding"]["alpha"] == choice["alpha"]
    assert "decoding" not in read_checkpoint(model_pt)["seq2seq"]["meta"]
    assert choice["precision"] == resolve_precision("auto", "cpu")         # as seq2seq-evaluate decodes by default
    assert tune_main([*args, "--alphas", "1.5", "--precision", "float32"]) == 0   # the one value is the choice
    printed = capsys.readouterr().out
    assert "alpha 1.5  BLEU" in printed and "beam 2, float32, " in printed
    assert Translator.from_checkpoint(out).default_alpha == 1.5
    assert read_checkpoint(out)["seq2seq"]["meta"]["decoding"]["precision"] == "float32"
    assert tune_main([*args, "--alphas", "0,x"]) == 2
    assert capsys.readouterr().err == "error: --alphas must be comma-separated numbers, got '0,x'\n"
    assert tune_main([*args, "--alphas", "-1"]) == 2
    assert capsys.readouterr().err == "error: --alphas must be numbers >= 0, got '-1'\n"
    ref.write_text("one line\n")
    assert tune_main(args) == 2
    assert capsys.readouterr().err == f"error: {src} has 6 lines but {ref} has 1\n"
