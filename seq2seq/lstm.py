"""One direction of one encoder LSTM layer over rows sorted by length, backward pass written out.

The encoder's CPU path (encoder.py) can run each direction as fused LSTM kernels over
length segments: one kernel call per distinct length in the batch (7 or 8 at batch 128 on
Multi30k, 9 or 10 at 64), each with a fixed cost, most of it in its backward pass.
`sorted_lstm` runs the same recurrence as one autograd node, for float32 training:

- the input's share of the gates is one product for all steps, biases included;
- step t multiplies only the rows still going (rows come sorted, longest first), so a
  finished row's state stays where its last real token left it;
- the backward pass keeps each step's gate gradients and forms the weight and input
  gradients with one product each over all steps.

tests/test_model.py holds it, value and every gradient, to `nn.LSTM` over packed sequences.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from .matmul import addmm_t, mm_t, mm_tn, transposed


def sorted_lstm(x: torch.Tensor, lengths: list[int], w_ih: torch.Tensor, w_hh: torch.Tensor,
                b_ih: torch.Tensor, b_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An LSTM from zero states over each row's first lengths[b] steps.

    Args:
        x: (batch, width, in), rows sorted by length, longest first.
        lengths: (batch,) non-increasing, each <= width.
        w_ih (4h, in), w_hh (4h, h), b_ih and b_hh (4h,): `nn.LSTM`'s, gates in the order i, f, g, o.
    Returns:
        outputs (batch, width, h), zero past each row's length; h and c (batch, h) after each
        row's last step (zero for a row of length 0).
    """
    if len(lengths) != x.size(0):
        raise ValueError(f"lengths must give one length per row of x ({x.size(0)}), got {len(lengths)}")
    if any(a < b for a, b in zip(lengths, lengths[1:])) or (lengths and lengths[0] > x.size(1)):
        raise ValueError(f"lengths must be non-increasing and at most the width {x.size(1)}, got {lengths}")
    if not lengths or lengths[0] == 0:                                     # nothing to run
        zeros = x.new_zeros(x.size(0), w_hh.size(1))                       # (batch, h)
        return x.new_zeros(x.size(0), x.size(1), w_hh.size(1)), zeros, zeros.clone()
    return _SortedLSTM.apply(x, tuple(lengths), w_ih, w_hh, b_ih, b_hh)


def rows_going(lengths: Sequence[int], steps: int) -> tuple[int, ...]:
    """For lengths sorted longest first: how many rows are still going at each of `steps` steps."""
    return tuple(sum(1 for n in lengths if n > t) for t in range(steps))


class _SortedLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lengths, w_ih, w_hh, b_ih, b_hh):
        batch, width, _ = x.shape
        hidden = w_hh.size(1)
        steps = lengths[0]
        active = rows_going(lengths, steps)                                # rows still going at step t
        x_t = x[:, :steps].transpose(0, 1).contiguous()                    # (steps, batch, in)
        pre = addmm_t(b_ih + b_hh, x_t.view(steps * batch, -1), w_ih).view(steps, batch, -1)  # (steps, batch, 4h)
        hs = x.new_empty(steps + 1, batch, hidden)                         # h before step t (and after the last)
        cs = x.new_empty(steps + 1, batch, hidden)
        hs[0], cs[0] = 0, 0
        acts = x.new_empty(steps, batch, 4 * hidden)                       # i, f, g, o after their nonlinearities
        tanh_c = x.new_empty(steps, batch, hidden)
        for t, n in enumerate(active):
            gates = addmm_t(pre[t, :n], hs[t, :n], w_hh)                   # (n, 4h)
            act = acts[t, :n]
            torch.sigmoid(gates[:, :2 * hidden], out=act[:, :2 * hidden])
            torch.tanh(gates[:, 2 * hidden:3 * hidden], out=act[:, 2 * hidden:3 * hidden])
            torch.sigmoid(gates[:, 3 * hidden:], out=act[:, 3 * hidden:])
            i, f, g, o = act.split(hidden, 1)
            c = torch.mul(f, cs[t, :n], out=cs[t + 1, :n]).addcmul_(i, g)  # (n, h)
            torch.mul(o, torch.tanh(c, out=tanh_c[t, :n]), out=hs[t + 1, :n])
            if n < batch:                                                  # finished rows keep their state
                hs[t + 1, n:] = hs[t, n:]
                cs[t + 1, n:] = cs[t, n:]
        outputs = torch.zeros(batch, width, hidden, dtype=x.dtype, device=x.device)
        for t, n in enumerate(active):
            outputs[:n, t] = hs[t + 1, :n]
        ctx.save_for_backward(x_t, w_ih, w_hh, hs, cs, acts, tanh_c)
        ctx.active, ctx.width = active, width
        return outputs, hs[steps].clone(), cs[steps].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_h_end, d_c_end):
        x_t, w_ih, w_hh, hs, cs, acts, tanh_c = ctx.saved_tensors
        active = ctx.active
        steps, batch, _ = x_t.shape
        hidden = w_hh.size(1)
        dh = d_h_end.clone()                                               # (batch, h) into the state after step t
        dc = d_c_end.clone()
        d_gates = x_t.new_zeros(steps, batch, 4 * hidden)
        w_hh_t = transposed(w_hh)
        for t in reversed(range(steps)):
            n = active[t]
            dh_n = dh[:n].add_(d_out[:n, t])                               # (n, h)
            i, f, g, o = acts[t, :n].split(hidden, 1)
            tc = tanh_c[t, :n]
            dc_n = dc[:n].addcmul_(dh_n * o, 1 - tc * tc)                  # (n, h)
            dg = d_gates[t, :n]
            torch.mul(dc_n * g, i * (1 - i), out=dg[:, :hidden])
            torch.mul(dc_n * cs[t, :n], f * (1 - f), out=dg[:, hidden:2 * hidden])
            torch.mul(dc_n * i, 1 - g * g, out=dg[:, 2 * hidden:3 * hidden])
            torch.mul(dh_n * tc, o * (1 - o), out=dg[:, 3 * hidden:])
            dc_n.mul_(f)                                                   # into the state before step t
            mm_t(dg, w_hh_t, out=dh[:n])
        flat = d_gates.view(steps * batch, -1)                             # (steps*batch, 4h)
        d_w_hh = mm_tn(flat, hs[:steps].view(steps * batch, hidden))       # (4h, h)
        d_w_ih = mm_tn(flat, x_t.view(steps * batch, -1))                  # (4h, in)
        d_b = flat.sum(0)                                                  # (4h,)
        d_x = None
        if ctx.needs_input_grad[0]:
            d_x = x_t.new_zeros(batch, ctx.width, x_t.size(2))
            d_x[:, :steps] = mm_t(flat, transposed(w_ih)).view(steps, batch, -1).transpose(0, 1)
        return d_x, None, d_w_ih, d_w_hh, d_b, d_b.clone()
