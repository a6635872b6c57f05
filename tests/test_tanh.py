"""tanh_ (tanh.py): bfloat16 CPU tensors through float32 blocks, the values and gradients of torch's tanh."""

import pytest
import torch

from seq2seq import tanh


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(tanh, "BLOCK", 100)  # several blocks and a short last one


@pytest.mark.parametrize("shape", [(7, 3, 11), (250,), (3, 0)])
def test_bfloat16_values_are_float32_tanh_rounded_once(shape):
    x = (3 * torch.randn(*shape)).bfloat16()
    expected = x.float().tanh().bfloat16()
    y = tanh.tanh_(x)
    assert y is x
    assert torch.equal(x, expected)


def test_a_strided_bfloat16_view_is_tanh_in_place_too():
    base = torch.randn(20, 30).bfloat16()
    view = base.t()[:, :10]                                      # not contiguous
    expected = view.float().tanh().bfloat16()
    untouched = base[10:].clone()
    tanh.tanh_(view)
    assert torch.equal(view, expected)
    assert torch.equal(base[10:], untouched)


def test_float32_keeps_torchs_own_tanh():
    x = torch.randn(50)
    assert torch.equal(tanh.tanh_(x.clone()), x.tanh())


def test_the_gradient_is_torchs_tanh_gradient():
    x = torch.randn(9, 40).bfloat16()
    grad = torch.randn(9, 40).bfloat16()
    a = x.clone().requires_grad_()
    (a * 1).tanh_().backward(grad)
    b = x.clone().requires_grad_()
    out = tanh.tanh_(b * 1)
    assert torch.equal(out, x.float().tanh().bfloat16())
    out.backward(grad)
    torch.testing.assert_close(b.grad, a.grad, atol=1e-2, rtol=1e-2)
