"""int8 decoding: which modules change, how close it stays to float32, and its errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seq2seq import cpu, quantize
from seq2seq.ensemble import Ensemble
from seq2seq.metrics import corpus_scores
from seq2seq.model import ModelConfig, Seq2Seq
from seq2seq.quantize import Int8Linear, Int8LSTMCell, check_precision, for_precision, quantize_int8
from seq2seq.translate import SearchOptions, Translator

from .conftest import random_sources, run_cli


def _is_int8(module: nn.Module) -> bool:
    return isinstance(module, (Int8Linear, Int8LSTMCell))


STEP_MATRICES = ["decoder.cells.cells.0", "decoder.cells.cells.1", "decoder.combine", "decoder.output_layer",
                 "decoder.attention.query_layer"]


def test_int8_replaces_the_decoder_step_matrices_of_a_copy(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    q = quantize_int8(tiny_model)
    modules = dict(q.named_modules())
    names = STEP_MATRICES
    assert all(_is_int8(modules[n]) for n in names)
    # everything else stays float32 (an int8 cell's own products aside): the encoder, the embeddings,
    # keys and energies, the bridge
    outside = {n for n, m in modules.items() if _is_int8(m) and not any(n.startswith(f"{s}.") for s in names)}
    assert outside == set(names)
    others = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.LSTM, nn.LSTMCell, nn.Embedding))]
    assert {"encoder.lstm", "encoder.embedding", "decoder.embedding", "decoder.attention.key_layer",
            "decoder.attention.energy_layer", "bridge.h_proj.0"} <= set(others)
    # the original is untouched
    assert all(isinstance(m, (nn.Linear, nn.LSTMCell)) and not _is_int8(m)
               for n, m in tiny_model.named_modules() if n in names)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("attention", ["bahdanau", "dot", "general"])
def test_int8_decoder_step_stays_close_to_float32(attention):
    torch.manual_seed(0)
    cfg = ModelConfig(src_vocab_size=40, tgt_vocab_size=50, embedding_size=32, encoder_hidden_size=16,
                      decoder_hidden_sizes=[24, 32], attention=attention, dropout=0.0, tie_embeddings=True)
    model = Seq2Seq(cfg).eval()
    q = quantize_int8(model)
    assert _is_int8(q.decoder.output_layer) and isinstance(q.decoder.cells.cells[1], Int8LSTMCell)
    assert _is_int8(getattr(q.decoder.attention, "query_layer", None)) == (attention == "bahdanau")
    src, src_len = random_sources([7, 3, 5], vocab=40)
    prev = torch.tensor([5, 6, 7])
    with torch.inference_mode():
        outs = []
        for m in (model, q):
            memory, state = m.encode(src, src_len)
            for _ in range(4):  # a few steps, so quantization error can build up in the state
                log_probs, state, weights = m.decode_step(prev, state, memory)
            outs.append((log_probs, weights))
    (lp32, w32), (lp8, w8) = outs
    assert not torch.equal(lp32, lp8)                       # it did run in int8
    assert (lp32 - lp8).abs().max() < 0.05                  # log-probabilities barely move
    assert (w32 - w8).abs().max() < 0.02
    assert torch.allclose(w8.sum(-1), torch.ones(3)) and (w8[1, 3:] == 0).all()  # still masked


def test_int8_translations_of_the_trained_toy_model(toy):
    fp32 = Translator.from_checkpoint(toy["model"])
    int8 = Translator.from_checkpoint(toy["model"], precision="int8")
    assert int8.precision == "int8" and fp32.precision == "float32"
    lines = toy["lines"][:60] + ["", "   "]
    for beam in (1, 4):
        a = [h[0].text for h in fp32.translate_hypotheses(lines, SearchOptions(beam_size=beam))]
        b = [h[0].text for h in int8.translate_hypotheses(lines, SearchOptions(beam_size=beam))]
        assert len(b) == len(lines) and b[-2:] == ["", ""]
        same = sum(x == y for x, y in zip(a, b)) / len(lines)
        assert same >= 0.9, f"beam {beam}: only {same:.0%} of int8 translations equal float32's"
        refs = toy["refs"][:60]
        assert abs(corpus_scores(a[:60], refs).bleu - corpus_scores(b[:60], refs).bleu) < 2.0


def test_bfloat16_translations_of_the_trained_toy_model(toy):
    """A bfloat16 copy decodes (scores still float32) and mostly agrees with float32; the
    loaded float32 model is left untouched."""
    fp32 = Translator.from_checkpoint(toy["model"])
    bf16 = Translator(fp32.model, fp32.src_tokenizer, fp32.tgt_tokenizer, fp32.info, precision="bfloat16")
    assert bf16.model is not fp32.model
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    lines = toy["lines"][:60] + ["", "   "]
    for beam in (1, 4):
        a = fp32.translate_hypotheses(lines, SearchOptions(beam_size=beam))
        b = bf16.translate_hypotheses(lines, SearchOptions(beam_size=beam))
        assert len(b) == len(lines) and [h[0].text for h in b[-2:]] == ["", ""]
        assert all(h[0].log_prob <= 0 and isinstance(h[0].log_prob, float) for h in b[:60])
        same = sum(x[0].text == y[0].text for x, y in zip(a, b)) / len(lines)
        assert same >= 0.9, f"beam {beam}: only {same:.0%} of bfloat16 translations equal float32's"


def test_int8_quantizes_every_member_of_an_ensemble(tiny_model):
    other = Seq2Seq(tiny_model.config).eval()
    ens = for_precision(Ensemble([tiny_model, other]), "int8")
    assert isinstance(ens, Ensemble) and len(ens.models) == 2
    assert all(_is_int8(m.decoder.output_layer) for m in ens.models)
    assert for_precision(tiny_model, "float32") is tiny_model


def test_precision_errors_name_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"'fp16'.*float32, bfloat16, int8"):
        check_precision("fp16")
    with pytest.raises(ValueError, match=r"CPU only.*'cuda:1'"):
        check_precision("int8", "cuda:1")
    check_precision("float32", "cuda")  # float32 goes anywhere


def test_translate_and_evaluate_command_lines_take_precision(toy):
    lines = toy["lines"][:5]
    proc = run_cli(["seq2seq-translate", "-c", toy["model"], "--precision", "int8", "--quiet", *lines])
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(proc.stdout.decode().splitlines()) == 5
    proc = run_cli(["seq2seq-evaluate", "-c", toy["model"], "--source", str(toy["src"]), "--reference",
                    str(toy["tgt"]), "--precision", "int8", "--beam-size", "2", "--quiet"])
    assert proc.returncode == 0, proc.stderr.decode()
    assert "BLEU = " in proc.stdout.decode()
    proc = run_cli(["seq2seq-translate", "-c", toy["model"], "--precision", "int8", "--device", "cuda", "x"])
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert "--precision int8 --device cuda" in err and "CPU only" in err and "Traceback" not in err


def test_int8_lstm_cell_reproduces_the_cell_and_splits_inputs_by_bound():
    torch.manual_seed(1)
    cell = nn.LSTMCell(10 + 6, 8)
    q = Int8LSTMCell(cell, [(10, 3.0), (6, 1.0)])
    assert q.groups == [[(0, 10)], [(10, 24)]]  # the embedding alone; [feed; h] together (both bound 1)
    x = torch.cat([torch.rand(5, 10) * 6 - 3, torch.rand(5, 6) * 2 - 1], dim=1)
    h, c = torch.rand(5, 8) * 2 - 1, torch.randn(5, 8)
    with torch.inference_mode():
        (h32, c32), (h8, c8) = cell(x, (h, c)), q(x, (h, c))
    assert (h32 - h8).abs().max() < 0.03 and (c32 - c8).abs().max() < 0.05
    with pytest.raises(ValueError, match="do not add up to the cell's input size 16"):
        Int8LSTMCell(cell, [(10, 1.0)])


def test_int8_results_do_not_depend_on_the_rest_of_the_batch(tiny_model):
    """Inputs are quantized with fixed scales, not per batch: a row's result is its own."""
    q = quantize_int8(tiny_model)
    src, src_len = random_sources([6, 4, 5, 3, 6])
    prev = torch.tensor([4, 5, 6, 7, 8])
    with torch.inference_mode():
        memory, state = q.encode(src, src_len)
        full, _, _ = q.decode_step(prev, state, memory)
        keep = torch.tensor([1, 3])
        alone, _, _ = q.decode_step(prev[keep], state.index_select(keep), memory.index_select(keep))
        layer = q.decoder.output_layer
        x = torch.rand(7, layer.in_features) * 2 - 1
        assert torch.equal(layer(x)[2:4], layer(x[2:4]))  # the int8 product itself: bit for bit
    assert torch.allclose(full[keep], alone, atol=1e-5)


def test_cpu_flags_come_from_the_first_processor_of_cpuinfo(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(cpu, "Path", lambda _: cpuinfo)
    assert cpu.cpu_fields() is None and cpu.cpu_flags() is None            # unreadable: unknown
    assert quantize.cpu_has_bfloat16() is None
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2\n\n"
                       "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert cpu.cpu_fields()["model name"] == "Some CPU"
    assert cpu.cpu_flags() == {"fpu", "avx2"}                              # the first processor's
    assert quantize.cpu_has_bfloat16() is False
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert quantize.cpu_has_bfloat16() is True


@pytest.mark.parametrize("flags,expected", [
    ("fpu sse2 avx2 fma", "float32"),                         # AVX2 only: bfloat16 would be emulated
    ("avx2 avx_ne_convert", "float32"),                       # conversions only, no bfloat16 products
    ("avx2 avx512f avx512_bf16", "bfloat16"),                 # AVX-512 EPYC or Xeon
    ("avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "bfloat16"),  # Xeon with AMX
])
def test_auto_precision_follows_the_cpu_flags(monkeypatch, tiny_model, flags, expected):
    monkeypatch.setattr(cpu, "cpu_fields", lambda: {"model name": "mock", "flags": flags})
    assert quantize.auto_precision("cpu") == expected
    assert quantize.resolve_precision("auto", "cpu") == expected
    assert quantize.resolve_precision("float32", "cpu") == "float32"       # explicit values stay
    translator = Translator(tiny_model, None, None, precision="auto")
    assert translator.precision == expected
    dtype = next(translator.model.parameters()).dtype
    assert dtype == (torch.bfloat16 if expected == "bfloat16" else torch.float32)


def test_auto_precision_without_proc_cpuinfo_is_float32(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_fields", lambda: None)
    assert quantize.auto_precision("cpu") == "float32"


def test_command_lines_default_to_auto_precision():
    from seq2seq.cli import evaluate_parser, translate_parser
    from seq2seq.serve import serve_parser
    assert translate_parser().parse_args(["-c", "m.pt"]).precision == "auto"
    assert evaluate_parser().parse_args(["-c", "m.pt", "--source", "s", "--reference", "r"]).precision == "auto"
    assert serve_parser().parse_args(["-c", "m.pt"]).precision == "auto"
