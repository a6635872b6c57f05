"""The hand-written training pass (bptt.py) and loss (loss.py) against their plain references."""

import pytest
import torch
from torch import nn

from seq2seq.loss import label_smoothed_nll
from seq2seq.model import ModelConfig, Seq2Seq

STACKS = {"bahdanau": ([12], [10, 12], [9, 11, 12]), "dot": ([12], [10, 12]), "general": ([12], [7, 12], [9, 11, 5])}
CASES = [(att, sizes) for att, stacks in STACKS.items() for sizes in stacks]


def _model(attention: str, sizes: list[int], dropout: float = 0.0, dtype=torch.float64) -> Seq2Seq:
    torch.manual_seed(0)
    cfg = ModelConfig(src_vocab_size=30, tgt_vocab_size=31, embedding_size=8, encoder_hidden_size=6,
                      decoder_hidden_sizes=sizes, attention=attention,
                      attention_size=7 if attention == "bahdanau" else None, dropout=dropout)
    return Seq2Seq(cfg).to(dtype).train()


def _batch(batch=4, src_len=6, tgt_len=5):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, 30, (batch, src_len), generator=g)
    lengths = torch.tensor([src_len, 4, src_len, 2][:batch])
    for b in range(batch):
        src[b, lengths[b]:] = 0
    return src, lengths, torch.randint(3, 31, (batch, tgt_len), generator=g)


def _run(model: Seq2Seq, how: str, src, src_len, tgt):
    """Logits, attention and every parameter's gradient of a random projection of the logits."""
    model.zero_grad()
    memory, state = model.encode(src, src_len)
    logits, weights = getattr(model.decoder, how)(tgt, state, memory)
    probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=logits.dtype)
    (logits * probe).sum().backward()
    return logits.detach(), weights.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None}


@pytest.mark.parametrize("attention,sizes", CASES)
def test_written_out_backward_equals_autograd_through_the_step_loop(attention, sizes):
    model = _model(attention, sizes)
    batch = _batch()
    fused = _run(model, "forward", *batch)
    loop = _run(model, "forward_stepwise", *batch)
    torch.testing.assert_close(fused[0], loop[0])
    torch.testing.assert_close(fused[1], loop[1])
    assert fused[2].keys() == loop[2].keys()
    for name in fused[2]:
        torch.testing.assert_close(fused[2][name], loop[2][name], msg=name)


def test_every_parameter_but_the_source_side_padding_gets_a_gradient():
    model = _model("bahdanau", [10, 12])
    _, _, grads = _run(model, "forward", *_batch())
    assert set(grads) == {n for n, _ in model.named_parameters()}
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "embedding" not in n)


def test_dropout_between_layers_keeps_its_rate_and_scale():
    # between cell layers the written-out pass draws its masks itself: with 3 layers of dropout 0.5
    # the output differs from a dropout-free pass, and averaged over draws it matches it in expectation
    model = _model("general", [16, 16, 16], dropout=0.5)
    model.encoder.eval()
    model.decoder.dropout.p = 0.0           # keep only the dropout between cell layers
    src, src_len, tgt = _batch()
    with torch.no_grad():
        memory, state = model.encode(src, src_len)
        model.decoder.cells.train()
        draws = [model.decoder.attentional_vectors(tgt, state, memory)[0] for _ in range(200)]
        model.decoder.cells.eval()
        clean, _ = model.decoder.attentional_vectors(tgt, state, memory)
    assert not torch.allclose(draws[0], clean)
    assert not torch.allclose(draws[0], draws[1])
    # dropout moves a tanh network's mean only a little; a missing 1/(1-p) rescaling moves it a lot
    assert (torch.stack(draws).mean(0) - clean).abs().mean() < 0.1 * clean.abs().mean()


def test_bfloat16_autocast_stays_close_to_float32():
    model = _model("bahdanau", [12, 12], dtype=torch.float32)
    batch = _batch()
    ref = _run(model, "forward", *batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _run(model, "forward", *batch)
    assert low[0].dtype == torch.bfloat16
    torch.testing.assert_close(low[0].float(), ref[0], atol=0.05, rtol=0.05)
    for name, g in ref[2].items():
        assert low[2][name].dtype == torch.float32, name
        cos = torch.nn.functional.cosine_similarity(low[2][name].flatten(), g.flatten(), dim=0)
        assert cos > 0.97, (name, float(cos))


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_label_smoothed_nll_equals_cross_entropy_loss(smoothing, dtype, monkeypatch):
    monkeypatch.setattr("seq2seq.loss.BLOCK_BYTES", 4 * 37 * 7)  # several blocks, a short last one
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(50, 37, generator=g, dtype=dtype)).requires_grad_()
    target = torch.randint(0, 37, (50,), generator=g)
    ref = nn.CrossEntropyLoss(label_smoothing=smoothing, reduction="sum")(logits, target)
    (ref_grad,) = torch.autograd.grad(2.5 * ref, logits)
    ours = label_smoothed_nll(logits, target, smoothing)
    (grad,) = torch.autograd.grad(2.5 * ours, logits)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_label_smoothed_nll_reads_bfloat16_logits_and_returns_their_dtype():
    logits = torch.randn(20, 11).bfloat16().requires_grad_()
    target = torch.randint(0, 11, (20,))
    ours = label_smoothed_nll(logits, target, 0.1)
    ref = nn.CrossEntropyLoss(label_smoothing=0.1, reduction="sum")(logits.float(), target)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref)
    ours.backward()
    assert logits.grad.dtype == torch.bfloat16


def test_label_smoothed_nll_names_bad_arguments():
    with pytest.raises(ValueError, match=r"logits must be \(rows, vocab\) and target \(rows,\), got \(2, 3, 4\)"):
        label_smoothed_nll(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="label smoothing must be in \\[0, 1\\), got 1.0"):
        label_smoothed_nll(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 1.0)


def test_token_logits_score_exactly_the_real_target_tokens():
    model = _model("dot", [12]).eval()
    src, src_len, tgt = _batch()
    tgt_out = tgt.clone()
    tgt_out[1, 3:] = 0
    tgt_out[3, 1:] = 0
    with torch.no_grad():
        full, _ = model(src, src_len, tgt)
        logits, targets = model.token_logits(src, src_len, tgt, tgt_out)
    real = tgt_out != 0
    assert logits.shape == (int(real.sum()), 31)
    torch.testing.assert_close(logits, full[real])
    assert torch.equal(targets, tgt_out[real])
