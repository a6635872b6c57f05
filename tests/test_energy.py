"""Bahdanau's energies in tiles (energy.py) against the plain tensor expression and its autograd."""

import pytest
import torch

from seq2seq import energy


@pytest.mark.parametrize("block", [1 << 18, 50, 7, 1])  # one tile; whole sentences; one sentence's steps; one step
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (1, 1, 1, 1), (4, 0, 3, 2), (5, 3, 2, 4)])
def test_all_scores_and_their_gradients_equal_the_plain_expression(block, shape, monkeypatch):
    monkeypatch.setattr(energy, "BLOCK", block)
    batch, steps, src_len, att = shape
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(batch, src_len, att, dtype=torch.float64, generator=g, requires_grad=True)
    q = torch.randn(batch, steps, att, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(att, dtype=torch.float64, generator=g, requires_grad=True)
    ref = torch.tanh(keys.unsqueeze(1) + q.unsqueeze(2)) @ v                     # (batch, steps, src_len)
    ours = energy.all_scores(keys, q, v)
    torch.testing.assert_close(ours, ref)
    probe = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    if ref.numel():
        for a, b in zip(torch.autograd.grad((ours * probe).sum(), [keys, q, v]),
                        torch.autograd.grad((ref * probe).sum(), [keys, q, v])):
            torch.testing.assert_close(a, b)


def test_bfloat16_inputs_give_float32_scores_and_gradients_in_their_own_dtypes():
    keys = torch.randn(2, 3, 8).bfloat16().requires_grad_()
    q = torch.randn(2, 4, 8).bfloat16().requires_grad_()
    v = torch.randn(8, requires_grad=True)
    scores = energy.all_scores(keys, q, v)
    assert scores.dtype == torch.float32
    ref = torch.tanh(keys.float().unsqueeze(1) + q.float().unsqueeze(2)) @ v
    torch.testing.assert_close(scores, ref)
    scores.sum().backward()
    assert (keys.grad.dtype, q.grad.dtype, v.grad.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)


def test_one_step_scores_and_gradient_pieces_match_all_scores():
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(4, 5, 6, generator=g)
    q = torch.randn(4, 6, generator=g)
    v = torch.randn(6, generator=g)
    torch.testing.assert_close(energy.scores(keys, q, v), energy.all_scores(keys, q.unsqueeze(1), v).squeeze(1))
    ds = torch.randn(4, 5, generator=g)
    d_v, acc = torch.zeros(6), torch.zeros(4, 5, 6)
    sq_weighted = energy.backward(keys, q, v, ds, d_v, acc)
    e = torch.tanh(keys + q.unsqueeze(1))
    torch.testing.assert_close(d_v, (ds.unsqueeze(2) * e).sum((0, 1)))
    torch.testing.assert_close(acc, ds.unsqueeze(2) * e * e)
    torch.testing.assert_close(sq_weighted, (ds.unsqueeze(2) * e * e).sum(1))


def test_the_attention_scores_the_same_in_training_and_in_decoding():
    from seq2seq.attention import BahdanauAttention

    torch.manual_seed(0)
    attention = BahdanauAttention(query_size=5, value_size=4, attention_size=6).double()
    values = torch.randn(3, 7, 4, dtype=torch.float64)
    query = torch.randn(3, 2, 5, dtype=torch.float64)
    keys = attention.project_keys(values)
    trained = attention.score(query, keys)                       # grad enabled: the tiles of energy.py
    with torch.no_grad():
        decoded = attention.score(query, keys)                   # the decoding path
    assert trained.requires_grad
    torch.testing.assert_close(trained, decoded)
