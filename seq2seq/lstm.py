"""An encoder LSTM layer's directions over rows sorted by length, backward pass written out;
and the gate helpers the decoder's written-out pass (bptt.py) shares.

The encoder's CPU path (encoder.py) can run each direction as fused LSTM kernels over
length segments: one kernel call per distinct length in the batch (7 or 8 at batch 128 on
Multi30k, 9 or 10 at 64), each with a fixed cost, most of it in its backward pass.
`sorted_lstm` runs the same recurrence as one autograd node, for float32 training:

- the input's share of the gates is one product for all steps, biases included;
- step t multiplies only the rows still going (rows come sorted, longest first), and a
  row's final state is the one after its own last step;
- the directions step together: one batch product (where MKL multiplies) and one set of
  elementwise operations a step for both (the backward direction reads each row reversed within its length, so
  the same rows are going at each step);
- the backward pass keeps each step's gate gradients and forms the weight and input
  gradients with one product each over all steps; the gates' derivatives are formed for
  all steps at once before it (`cell_derivatives`), leaving five elementwise operations a
  step (and a zero fill where rows have ended).

tests/test_model.py holds it, value and every gradient, to `nn.LSTM` over packed sequences.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from .matmul import bmm_t, bmm_tn, prepare_t


def sorted_lstm(x: torch.Tensor, lengths: list[int], w_ih: torch.Tensor, w_hh: torch.Tensor,
                b_ih: torch.Tensor, b_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stack of LSTMs (an encoder layer's directions), each from zero states over each row's
    first lengths[b] steps.

    Args:
        x: (dirs, batch, width, in), each direction's input; rows sorted by length, longest first.
        lengths: (batch,) non-increasing, each <= width.
        w_ih (dirs, 4h, in), w_hh (dirs, 4h, h), b_ih and b_hh (dirs, 4h): each direction's
            `nn.LSTM` weights, gates in the order i, f, g, o.
    Returns:
        outputs (dirs, batch, width, h), zero past each row's length; h and c (dirs, batch, h)
        after each row's last step (zero for a row of length 0).
    """
    if (x.dim() != 4 or w_ih.dim() != 3 or w_hh.dim() != 3 or b_ih.dim() != 2 or b_hh.dim() != 2
            or not x.size(0) == w_ih.size(0) == w_hh.size(0) == b_ih.size(0) == b_hh.size(0)):
        raise ValueError(f"x must be (dirs, batch, width, in), w_ih (dirs, 4h, in), w_hh (dirs, 4h, h), b_ih "
                         f"and b_hh (dirs, 4h), got {tuple(x.shape)}, {tuple(w_ih.shape)}, {tuple(w_hh.shape)}, "
                         f"{tuple(b_ih.shape)} and {tuple(b_hh.shape)}")
    if len(lengths) != x.size(1):
        raise ValueError(f"lengths must give one length per row of x ({x.size(1)}), got {len(lengths)}")
    if any(a < b for a, b in zip(lengths, lengths[1:])) or (lengths and lengths[0] > x.size(2)):
        raise ValueError(f"lengths must be non-increasing and at most the width {x.size(2)}, got {lengths}")
    if not lengths or lengths[0] == 0:                                     # nothing to run
        zeros = x.new_zeros(x.size(0), x.size(1), w_hh.size(2))            # (dirs, batch, h)
        return x.new_zeros(*x.shape[:3], w_hh.size(2)), zeros, zeros.clone()
    return _SortedLSTM.apply(x, tuple(lengths), w_ih, w_hh, b_ih, b_hh)


def rows_going(lengths: Sequence[int], steps: int) -> tuple[int, ...]:
    """For lengths sorted longest first: how many rows are still going at each of `steps` steps."""
    return tuple(sum(1 for n in lengths if n > t) for t in range(steps))


def roll_gates(w: torch.Tensor, shift: int, *, dim: int) -> torch.Tensor:
    """w's gate blocks along `dim` rolled by `shift`: nn.LSTM's i, f, g, o become o, i, f, g with 1
    (and back with -1), so that one sigmoid covers the gates o, i, f in the forward pass and one
    product the gates i, f, g (all scaled by dc) in the backward pass."""
    if shift not in (1, -1):
        raise ValueError(f"roll_gates: shift must be 1 (to o, i, f, g) or -1 (back to i, f, g, o), got {shift}")
    dim = dim % w.dim()
    return w.unflatten(dim, (4, -1)).roll(shift, dim).flatten(dim, dim + 1)


def cell_derivatives(acts: torch.Tensor, c_before: torch.Tensor, tanh_c: torch.Tensor):
    """For a cell's steps, all at once: what each gate's gradient is dh (gate o) or dc (gates i, f,
    g) times, the gate's partner in the cell update times the gate's own derivative; and what dc
    gets per unit of dh through h = o tanh(c), o (1 - tanh(c)^2).

    acts: (..., 4h) the gates o, i, f, g after their nonlinearities; c_before (..., h) the cell
    state before the step, tanh_c (..., h) tanh of the one after. Returns (..., 4h) and (..., h).
    """
    h = tanh_c.size(-1)
    sig = acts[..., :3 * h]                                                # o, i, f: partners tanh(c), g, c before
    d_sig = sig * (1 - sig)                                                # sigmoid' = s (1 - s)
    g = acts[..., 3 * h:]                                                  # g: partner i
    partner = torch.empty_like(acts)
    torch.mul(tanh_c, d_sig[..., :h], out=partner[..., :h])
    torch.mul(g, d_sig[..., h:2 * h], out=partner[..., h:2 * h])
    torch.mul(c_before, d_sig[..., 2 * h:], out=partner[..., 2 * h:3 * h])
    torch.mul(acts[..., h:2 * h], 1 - g * g, out=partner[..., 3 * h:])     # tanh' = 1 - g^2
    return partner, (1 - tanh_c * tanh_c).mul_(acts[..., :h])             # o (1 - tanh(c)^2)


class _SortedLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lengths, w_ih, w_hh, b_ih, b_hh):
        dirs, batch, width, _ = x.shape
        hidden = w_hh.size(2)
        steps = lengths[0]
        active = rows_going(lengths, steps)                                # rows still going at step t
        w_ih, w_hh = roll_gates(w_ih, 1, dim=1), roll_gates(w_hh, 1, dim=1)    # gates o, i, f, g from here on
        x_t = x[:, :, :steps].transpose(1, 2).contiguous()                 # (dirs, steps, batch, in)
        pre = bmm_t(x_t.view(dirs, steps * batch, -1), prepare_t(w_ih),
                    roll_gates(b_ih + b_hh, 1, dim=1).unsqueeze(1)).view(dirs, steps, batch, -1)  # (dirs, steps, batch, 4h)
        # a row's states stay zero past its length: the outputs are hs[:, 1:], and the weight
        # gradients may read them (their gate gradients are zero)
        hs = x.new_zeros(dirs, steps + 1, batch, hidden)                   # h before step t (and after the last)
        cs = x.new_zeros(dirs, steps + 1, batch, hidden)
        acts = x.new_empty(dirs, steps, batch, 4 * hidden)                 # o, i, f, g after their nonlinearities
        tanh_c = x.new_empty(dirs, steps, batch, hidden)
        w = prepare_t(w_hh)
        for t, n in enumerate(active):
            gates = bmm_t(hs[:, t, :n], w, pre[:, t, :n])                  # (dirs, n, 4h)
            act = acts[:, t, :n]
            torch.sigmoid(gates[..., :3 * hidden], out=act[..., :3 * hidden])
            torch.tanh(gates[..., 3 * hidden:], out=act[..., 3 * hidden:])
            o, i, f, g = act.split(hidden, -1)
            c = torch.mul(f, cs[:, t, :n], out=cs[:, t + 1, :n]).addcmul_(i, g)  # (dirs, n, h)
            torch.mul(o, torch.tanh(c, out=tanh_c[:, t, :n]), out=hs[:, t + 1, :n])
        outputs = x.new_zeros(dirs, batch, width, hidden)
        outputs[:, :, :steps] = hs[:, 1:].transpose(1, 2)
        ends = torch.tensor(lengths, device=x.device)                      # (batch,) where each row's state ends
        rows = torch.arange(batch, device=x.device)
        ctx.save_for_backward(x_t, w_ih, w_hh, cs, acts, tanh_c, hs)
        ctx.active, ctx.width = active, width
        return outputs, hs[:, ends, rows], cs[:, ends, rows]

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_h_end, d_c_end):
        x_t, w_ih, w_hh, cs, acts, tanh_c, hs = ctx.saved_tensors
        active = ctx.active
        dirs, steps, batch, _ = x_t.shape
        hidden = w_hh.size(2)
        partner, d_c_of_h = cell_derivatives(acts, cs[:, :steps], tanh_c)  # (dirs, steps, batch, 4h), (..., h)
        dh = d_h_end.clone()                                               # (dirs, batch, h) into the state after step t
        dc = d_c_end.clone()
        d_gates = x_t.new_empty(dirs, steps, batch, 4 * hidden)            # rows past their ends set to zero below
        w = prepare_t(w_hh.transpose(1, 2))
        for t in reversed(range(steps)):
            n = active[t]
            dh_n = dh[:, :n].add_(d_out[:, :n, t])                         # (dirs, n, h)
            dc_n = dc[:, :n].addcmul_(dh_n, d_c_of_h[:, t, :n])            # (dirs, n, h)
            if n < batch:
                d_gates[:, t, n:] = 0
            dg = d_gates[:, t, :n]                                         # (dirs, n, 4h): o, i, f, g
            p = partner[:, t, :n]
            torch.mul(dh_n, p[..., :hidden], out=dg[..., :hidden])
            torch.mul(dc_n.unsqueeze(2), p[..., hidden:].unflatten(-1, (3, hidden)),
                      out=dg[..., hidden:].unflatten(-1, (3, hidden)))
            dc_n.mul_(acts[:, t, :n, 2 * hidden:3 * hidden])               # into the state before step t: times f
            bmm_t(dg, w, out=dh[:, :n])
        flat = d_gates.view(dirs, steps * batch, -1)                       # (dirs, steps*batch, 4h)
        d_w_hh = bmm_tn(flat, hs[:, :steps].reshape(dirs, steps * batch, hidden))  # (dirs, 4h, h)
        d_w_ih = bmm_tn(flat, x_t.view(dirs, steps * batch, -1))          # (dirs, 4h, in)
        d_b = roll_gates(flat.sum(1), -1, dim=1)                           # (dirs, 4h), back to i, f, g, o
        d_x = None
        if ctx.needs_input_grad[0]:
            d_x = x_t.new_zeros(dirs, batch, ctx.width, x_t.size(3))
            d_x[:, :, :steps] = bmm_t(flat, prepare_t(w_ih.transpose(1, 2))).view(
                dirs, steps, batch, -1).transpose(1, 2)
        return d_x, None, roll_gates(d_w_ih, -1, dim=1), roll_gates(d_w_hh, -1, dim=1), d_b, d_b.clone()
