"""Label-smoothed cross-entropy over the vocabulary, computed a cache-sized block of rows at a time.

The value is `nn.CrossEntropyLoss(label_smoothing=eps, reduction="sum")`'s (the tests hold
it to that, value and gradient). That module materialises float32 log-probabilities of
every (token, vocabulary) cell, then a gradient buffer, a smoothing term and a copy,
each a pass over tens of megabytes: on a 2-core CPU those passes cost as much as the
output layer's matrix products in bfloat16. Here each block of rows is read, turned
into float32, reduced and, in the backward pass, turned into its gradient while it is
still in cache; only the per-row log-sum-exp is kept between the passes, and the
gradient is written straight in the logits' dtype.

`output_layer_nll` also makes the output layer's product, a chunk of rows at a time, and
turns each chunk of logits into its gradient in place. The logits of a batch (2,000
tokens x 8,000 words, 64 MB in float32) are then never one tensor: a tensor over glibc's
largest mmap threshold (32 MiB) comes from the kernel as fresh pages at every step, and
faulting them in cost the float32 output product a fifth of its time on a Xeon.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from . import matmul
from .matmul import add_mm_tn_, mm_t, mm_tn, pad_rows, transposed

BLOCK_BYTES = 4 << 20   # float32 bytes of one block of rows: fits the last-level cache of a small CPU
CHUNK_BYTES = 16 << 20  # float32 bytes of one chunk of output_layer_nll's logits: under 32 MiB


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
    _check(logits.size(1), bias, smoothing)
    return _LabelSmoothedNLL.apply(logits, bias, target, float(smoothing))


def output_layer_nll(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                     smoothing: float = 0.0) -> torch.Tensor:
    """`label_smoothed_nll(x @ weight.T, target, smoothing, bias)`, the product made here.

    Args:
        x: (tokens, in) the output layer's input, one row per target token.
        weight: (vocab, in) and bias (vocab,) or None: the output layer.
        target: (tokens,) class indices.
    The logits exist a chunk of rows at a time (CHUNK_BYTES); the backward pass overwrites
    each chunk with its gradient and forms the layer's gradients from it (the weight's
    accumulated over chunks). For float32 and float64; bfloat16 autocast products go
    through `matmul.linear` and `label_smoothed_nll` instead.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.size(1) != weight.size(1) or target.shape != x.shape[:1]:
        raise ValueError(f"x must be (tokens, in), weight (vocab, in) and target (tokens,), got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)} and {tuple(target.shape)}")
    if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must both be float32 or float64, got {x.dtype} and {weight.dtype}")
    _check(weight.size(0), bias, smoothing)
    # without a backward pass to come (validation), each chunk goes as soon as it is scored
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return _OutputLayerNLL.apply(x, weight, bias, target, float(smoothing), keep)


def _check(vocab: int, bias: torch.Tensor | None, smoothing: float) -> None:
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must be (vocab,) = ({vocab},), got {tuple(bias.shape)}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")


def _rows_per(vocab: int, nbytes: int) -> int:
    """How many float32 rows of `vocab` fit in nbytes (at least one)."""
    return max(1, nbytes // (4 * max(vocab, 1)))


def _spans(rows: int, vocab: int, nbytes: int, multiple: int = 1):
    """Slices of at most nbytes of float32 rows of `vocab`, each a multiple of `multiple` rows where it can be."""
    step = _rows_per(vocab, nbytes)
    if step >= multiple:
        step -= step % multiple
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


class _LabelSmoothedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bias, target, smoothing):
        acc = torch.promote_types(logits.dtype, torch.float32)
        rows, vocab = target.size(0), logits.size(1)
        lse = torch.empty(rows, dtype=acc, device=logits.device)       # (rows,) log-sum-exp
        total = torch.zeros((), dtype=acc, device=logits.device)
        buf = torch.empty(min(rows, _rows_per(vocab, BLOCK_BYTES)), vocab, dtype=acc,
                          device=logits.device)                        # (block, vocab), reused
        for block in _spans(rows, vocab, BLOCK_BYTES):
            x = _block(logits[block], bias, buf[:block.stop - block.start])  # (block, vocab)
            # the sums of exp go into lse[block] and the log-sum-exp over them
            loss, lse[block] = _block_loss(x, target[block], x.mean(1), smoothing, lse[block])
            total += loss
        ctx.save_for_backward(logits, bias, target, lse)
        ctx.smoothing = smoothing
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, bias, target, lse = ctx.saved_tensors
        rows, vocab = target.size(0), logits.size(1)
        out = torch.empty_like(logits)                                 # (rows, vocab) in the logits' dtype
        out[rows:].zero_()                                             # padding rows
        d_bias = torch.zeros(vocab, dtype=lse.dtype, device=lse.device) if bias is not None else None
        eps, scale = ctx.smoothing, float(grad)
        # d/dx = scale * (softmax(x) - (1 - eps) * onehot(target) - eps / vocab); a positive scale
        # goes into the exponent
        shift = lse - math.log(scale) if scale > 0 else lse
        factor = 1.0 if scale > 0 else scale
        # float32 gradients are made where they go; others in a float32 block, then converted
        buf = None if out.dtype == lse.dtype else torch.empty(
            min(rows, _rows_per(vocab, BLOCK_BYTES)), vocab, dtype=lse.dtype, device=lse.device)
        for block in _spans(rows, vocab, BLOCK_BYTES):
            p = _block(logits[block], bias, out[block] if buf is None else buf[:block.stop - block.start])
            p.sub_(shift[block].unsqueeze(1)).exp_()                         # (block, vocab)
            if factor != 1.0:
                p.mul_(factor)
            p.scatter_add_(1, target[block].unsqueeze(1), p.new_full((p.size(0), 1), -(1.0 - eps) * scale))
            p.sub_(eps * scale / vocab)
            if d_bias is not None:
                d_bias.add_(p.sum(0))
            if buf is not None:
                out[block] = p
        return out, (d_bias.to(bias.dtype) if d_bias is not None else None), None, None


def _block_loss(e: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, smoothing: float,
                sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed loss of a block of logits e (n, vocab) whose rows' mean logits are `mean` (n,),
    and its rows' log-sum-exp (n,). e is overwritten with exp(e - max e) and its row sums go into sums (n,)."""
    picked = e.gather(1, target.unsqueeze(1)).squeeze(1)                      # (n,)
    top = e.amax(1, keepdim=True)                                              # (n, 1)
    log_sum = torch.sum(e.sub_(top).exp_(), 1, out=sums).log().add_(top.squeeze(1))  # (n,)
    return (log_sum - (1.0 - smoothing) * picked - smoothing * mean).sum(), log_sum


def _block(logits: torch.Tensor, bias: torch.Tensor | None, dst: torch.Tensor) -> torch.Tensor:
    """logits (n, vocab) (+ bias) written into dst (n, vocab), in dst's dtype: ours to overwrite."""
    if bias is None:
        return dst.copy_(logits)
    if logits.dtype == dst.dtype and bias.dtype == dst.dtype:
        return torch.add(logits, bias, out=dst)
    return dst.copy_(logits).add_(bias)                                # the sum in dst's float32


class _OutputLayerNLL(torch.autograd.Function):
    """Each chunk of logits z is kept as e = exp(z - max z) with its row sums: the softmax the
    backward pass needs, one scaling away. The mean logit is x @ mean(W) + mean(b), and the
    smoothing's constant -eps * scale / vocab in every cell of the logits' gradient is left out
    of the chunks and put back into the layer's gradients afterwards (through a column sum of
    W, of x, a row count): the backward pass scales each chunk in place (and sums it for the bias's
    gradient) before its two products."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, smoothing, keep):
        rows, vocab = x.size(0), weight.size(0)
        sums = x.new_empty(rows)                                       # (rows,) sum of e
        mean = x @ weight.mean(0)                                      # (rows,) mean logit, bias aside
        if bias is not None:
            mean += bias.mean()
        total = x.new_zeros(())
        chunks = []
        for span in _spans(rows, vocab, CHUNK_BYTES, matmul.ROW_MULTIPLE):
            n = span.stop - span.start
            xc = pad_rows(x[span])                 # (n' >= n, in): rows padded where oneDNN multiplies
            z = mm_t(xc, weight)                       # (n', vocab) logits; padding rows are zeros
            e = z[:n]
            if bias is not None:
                e.add_(bias)
            total += _block_loss(e, target[span], mean[span], smoothing, sums[span])[0]
            if keep:
                chunks.append((span, xc, z))
        ctx.save_for_backward(x, weight, target, sums)
        ctx.chunks, ctx.smoothing, ctx.has_bias = chunks, smoothing, bias is not None
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.chunks is None:
            raise RuntimeError("output_layer_nll's backward pass turns the logits into their gradient "
                               "in place: it runs once (retain_graph cannot repeat it)")
        x, weight, target, sums = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        eps, scale = ctx.smoothing, float(grad)
        vocab = weight.size(0)
        # d/dz = scale * (softmax(z) - (1 - eps) * onehot(target)) - constant
        constant = eps * scale / vocab
        factor = scale / sums                                          # (rows,)
        d_x = torch.empty_like(x) if need_x else None                  # (tokens, in)
        d_w = None                                                     # (vocab, in)
        d_b = x.new_zeros(vocab) if ctx.has_bias and need_b else None
        w_t = transposed(weight) if need_x else None
        for span, xc, z in ctx.chunks:
            n = span.stop - span.start
            p = z[:n].mul_(factor[span].unsqueeze(1))                  # (n, vocab)
            p.scatter_add_(1, target[span].unsqueeze(1), p.new_full((n, 1), -(1.0 - eps) * scale))
            if d_b is not None:
                d_b.add_(p.sum(0))
            if need_x:
                if z.size(0) == n:
                    mm_t(z, w_t, out=d_x[span])
                else:
                    d_x[span] = mm_t(z, w_t)[:n]
            if need_w:
                d_w = mm_tn(z, xc) if d_w is None else add_mm_tn_(d_w, z, xc)
        ctx.chunks = None
        if need_w:
            if d_w is None:                                            # no rows
                d_w = torch.zeros_like(weight)
            d_w.sub_(x.sum(0), alpha=constant)                         # every row: - constant * sum of x
        if need_x:
            d_x.sub_(weight.sum(0), alpha=constant)                    # every row: - constant * sum of W
        if d_b is not None:
            d_b.sub_(constant * x.size(0))
        return d_x, d_w, d_b, None, None, None
