"""Label-smoothed cross-entropy over the vocabulary, computed a cache-sized block of rows at a time.

The value is `nn.CrossEntropyLoss(label_smoothing=eps, reduction="sum")`'s (the tests hold
it to that, value and gradient). That module materialises float32 log-probabilities of
every (token, vocabulary) cell, then a gradient buffer, a smoothing term and a copy,
each a pass over tens of megabytes: on a 2-core CPU those passes cost as much as the
output layer's matrix products in bfloat16. Here each block of rows is read, turned
into float32, reduced and, in the backward pass, turned into its gradient while it is
still in cache; only the per-row log-sum-exp is kept between the passes, and the
gradient is written straight in the logits' dtype.
"""

from __future__ import annotations

import math

import torch

BLOCK_BYTES = 4 << 20  # float32 bytes of one block of rows: fits the last-level cache of a small CPU


def label_smoothed_nll(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over rows of (1 - eps) * -log p(target) + eps * mean over the vocabulary of -log p.

    Args:
        logits: (rows, vocab), any float dtype (bfloat16 logits are read as float32).
        target: (tokens,) class indices of the first `tokens` <= rows rows; every one counts
            (select real tokens beforehand). Rows after them are padding (a product padded to
            a shape its kernel is compiled for, `matmul.pad_rows`): they add nothing and get a
            zero gradient.
        smoothing: eps in [0, 1).
        bias: optional (vocab,) added to every row in float32 here, block by block: the
            output layer's bias, whose gradient (a sum over all rows of the logits'
            gradient) then also comes block by block instead of from another full pass.
    Returns:
        a float32 scalar (float64 for float64 logits).
    """
    if logits.dim() != 2 or target.dim() != 1 or target.size(0) > logits.size(0):
        raise ValueError(f"logits must be (rows, vocab) and target (tokens,) with tokens <= rows, got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    if bias is not None and bias.shape != logits.shape[1:]:
        raise ValueError(f"bias must be (vocab,) = ({logits.size(1)},), got {tuple(bias.shape)}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    return _LabelSmoothedNLL.apply(logits, bias, target, float(smoothing))


def _blocks(rows: int, vocab: int):
    step = max(1, BLOCK_BYTES // (4 * max(vocab, 1)))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _block(logits: torch.Tensor, bias: torch.Tensor | None, rows: slice, dtype: torch.dtype) -> torch.Tensor:
    """Rows `rows` of logits (+ bias) as a new (block, vocab) tensor of `dtype`: ours to overwrite."""
    x = logits[rows].to(dtype, copy=True)
    return x if bias is None else x.add_(bias)


class _LabelSmoothedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bias, target, smoothing):
        acc = torch.promote_types(logits.dtype, torch.float32)
        rows, vocab = target.size(0), logits.size(1)
        lse = torch.empty(rows, dtype=acc, device=logits.device)       # (rows,) log-sum-exp
        per_row = torch.empty(rows, dtype=acc, device=logits.device)   # (rows,) loss of each row
        for block in _blocks(rows, vocab):
            x = _block(logits, bias, block, acc)                        # (block, vocab)
            z = torch.logsumexp(x, 1, out=lse[block])
            picked = x.gather(1, target[block].unsqueeze(1)).squeeze(1)
            per_row[block] = z - (1.0 - smoothing) * picked - smoothing * x.mean(1)
        ctx.save_for_backward(logits, bias, target, lse)
        ctx.smoothing = smoothing
        return per_row.sum()

    @staticmethod
    def backward(ctx, grad):
        logits, bias, target, lse = ctx.saved_tensors
        eps = ctx.smoothing
        rows, vocab = target.size(0), logits.size(1)
        out = torch.empty_like(logits)                                 # (rows, vocab) in the logits' dtype
        out[rows:].zero_()                                             # padding rows
        d_bias = torch.zeros(vocab, dtype=lse.dtype, device=lse.device) if bias is not None else None
        scale = float(grad)
        # d/dx = scale * (softmax(x) - (1 - eps) * onehot(target) - eps / vocab); a positive scale
        # goes into the exponent
        shift = lse - math.log(scale) if scale > 0 else lse
        factor = 1.0 if scale > 0 else scale
        for block in _blocks(rows, vocab):
            p = _block(logits, bias, block, lse.dtype).sub_(shift[block].unsqueeze(1)).exp_()  # (block, vocab)
            if factor != 1.0:
                p.mul_(factor)
            p.scatter_add_(1, target[block].unsqueeze(1), p.new_full((p.size(0), 1), -(1.0 - eps) * scale))
            p.sub_(eps * scale / vocab)
            if d_bias is not None:
                d_bias.add_(p.sum(0))
            out[block] = p
        return out, (d_bias.to(bias.dtype) if d_bias is not None else None), None, None
