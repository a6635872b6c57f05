"""Float32 matrix products through oneDNN on CPUs where the default BLAS leaves half the vector width idle.

PyTorch's CPU build hands float32 products to MKL. On AMD CPUs MKL runs its AVX2 kernels even
where the CPU has AVX-512, while oneDNN (in the same build, and what bfloat16 products already
use) picks its kernels by the instruction set. On an AMD EPYC (family 26, AVX-512, 2 threads)
a 2048^3 product ran at 424 GFLOP/s through oneDNN against MKL's 168, the output layer's
(2000 x 512 @ 512 x 8000) at 276 against 148, a decoder step's gates (128 x 1024 @ 1024 x 2048)
at 365 against 127. Either way the products are float32 with float32 accumulation; only the
order of the additions differs.

What a training step multiplies, each in the layout it already has:

- `mm_t(a, w)` = a @ w.T and `addmm_t(c, a, w)` = c + a @ w.T (the forward products; the
  backward ones with `transposed(w)`, a copy made once per pass, on either path);
- `mm_tn(a, b)` = a.T @ b (weight gradients, through oneDNN's weight-gradient kernel, which
  reads both operands as laid out: the forward kernel would need copies of both transposed);
- `linear(x, w)` = F.linear(x, w) with autograd (the output layer);
- `bmm_t(a, prepare_t(w))` = a[d] @ w[d].T and `bmm_tn(a, b)` = a[d].T @ b[d] for a stack of d
  matrices (an encoder layer's directions): one batch product on the plain path, one product
  per matrix on the oneDNN path.

Each takes the oneDNN path when `enabled()` and every operand multiplied is a dense float32 CPU
tensor outside autocast, and is the plain torch product otherwise (bfloat16 products already run in
oneDNN). The choice is made once per process:

- `SEQ2SEQ_FLOAT32_MATMUL=auto` (default): oneDNN on a non-Intel CPU with AVX-512, where it was
  measured faster; MKL elsewhere (on Intel CPUs MKL uses AVX-512 and AMX itself).
- `SEQ2SEQ_FLOAT32_MATMUL=onednn` or `blas`: either, on any CPU.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .cpu import cpu_fields

CHOICES = ("auto", "onednn", "blas")
ENV = "SEQ2SEQ_FLOAT32_MATMUL"


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def choose(setting: str, vendor: str, flags: set[str], available: bool) -> bool:
    """Whether float32 products go through oneDNN, for `setting` on a CPU with `vendor` and `flags`."""
    if setting not in CHOICES:
        raise ValueError(f"{ENV}={setting!r} is not a choice; choose one of: {', '.join(CHOICES)}")
    if not available:
        return False
    if setting == "auto":
        return vendor not in ("", "GenuineIntel") and "avx512f" in flags
    return setting == "onednn"


@functools.cache
def enabled() -> bool:
    """Whether this process sends float32 CPU products to oneDNN (decided once)."""
    fields = cpu_fields() or {}
    return choose(os.environ.get(ENV, "auto").strip().lower() or "auto", fields.get("vendor_id", ""),
                  set(fields.get("flags", "").split()), _onednn_available())


def _routed(*tensors: torch.Tensor) -> bool:
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.layout != torch.strided:
            return False
    return not torch.is_autocast_enabled("cpu") and enabled()


def _lp(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (rows, k) @ w (n, k)^T through oneDNN's inner product; w must be contiguous."""
    if x.size(-1) != w.size(1):  # oneDNN would only say it has no kernel for these shapes
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({x.size(0)}x{x.size(1)} and "
                           f"{w.size(1)}x{w.size(0)})")
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def mm_t(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a (m, k) @ w (n, k)^T -> (m, n), into `out` if given; no autograd on the oneDNN path
    (for hand-written backward passes).

    Give `w` contiguous (a weight as stored, or `transposed(weight)` made once): a strided `w`
    is copied at every call on the oneDNN path.
    """
    if _routed(a, w):
        y = _lp(a, w.contiguous())
        return y if out is None else out.copy_(y)
    return torch.mm(a, w.t(), out=out)


def addmm_t(c: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """c + a (m, k) @ w (n, k)^T, c (n,) or (m, n): `torch.addmm(c, a, w.T)`."""
    if _routed(a, w, c):
        return _lp(a, w.contiguous()).add_(c)
    return torch.addmm(c, a, w.t())


def transposed(w: torch.Tensor) -> torch.Tensor:
    """w.T as `mm_t` wants it, so that mm_t(a, transposed(w)) = a @ w: a contiguous copy (make it
    once, use it many times). oneDNN needs it; MKL, on one thread, multiplies a decoder step's
    input gradient (128 x 2048 @ 2048 x 1024) faster by the transpose of a contiguous matrix than
    by the matrix itself (Xeon family 6 model 207: 119 against 90 GFLOP/s; equal on two threads)."""
    return w.t().contiguous()


def mm_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (n, m)^T @ b (n, k) -> (m, k): a weight gradient, the sum over n rows of outer products."""
    if _routed(a, b):
        gw, _ = torch.ops.aten.mkldnn_linear_backward_weights(a.contiguous().to_mkldnn(),
                                                              b.contiguous().to_mkldnn(), b, False)
        return gw
    return torch.mm(a.t(), b)


def add_mm_tn_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c += a (n, m)^T @ b (n, k), in place: a weight gradient accumulated over blocks of rows."""
    if _routed(a, b, c):
        return c.add_(mm_tn(a, b))
    return c.addmm_(a.t(), b)


class Prepared(NamedTuple):
    """A stack of matrices (d, n, k) in the layout `bmm_t` multiplies by: made once per pass."""

    w: torch.Tensor  # (d, n, k) as given where oneDNN multiplies, else its transpose (d, k, n), contiguous
    onednn: bool


def prepare_t(w: torch.Tensor) -> Prepared:
    """w (d, n, k) for `bmm_t`: the BLAS batch product runs fastest with a contiguous right operand
    (d, k, n); oneDNN multiplies by each w[d] as laid out."""
    if _routed(w):
        return Prepared(w.contiguous(), True)
    return Prepared(w.transpose(1, 2).contiguous(), False)


def bmm_t(a: torch.Tensor, w: Prepared, c: torch.Tensor | None = None,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """c + a[d] (m, k) @ W[d]^T for each d, into `out` if given, where w = prepare_t(W); c broadcasts
    to (d, m, n).

    On the plain path one batch product for all d: for an encoder step's two directions
    (64 x 256 @ 256 x 1024 each, Xeon, 2 threads) 221 us against 410 us for two
    `torch.addmm(c, a, W.T)`. oneDNN multiplies each matrix on its own.
    """
    k = w.w.size(2) if w.onednn else w.w.size(1)
    if a.dim() != 3 or a.size(0) != w.w.size(0) or a.size(2) != k:
        raise RuntimeError(f"bmm_t: a must be (d, m, {k}) for {w.w.size(0)} prepared matrices, got {tuple(a.shape)}")
    if w.onednn:
        y = torch.stack([_lp(a[d], w.w[d]) for d in range(a.size(0))])          # (d, m, n)
        if c is not None:
            y.add_(c)
        return y if out is None else out.copy_(y)
    if c is None:
        return torch.bmm(a, w.w, out=out)
    return torch.baddbmm(c, a, w.w, out=out)


def bmm_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a[d] (r, m)^T @ b[d] (r, k) for each d -> (d, m, k): a stack of weight gradients."""
    if a.size(0) != b.size(0):
        raise RuntimeError(f"bmm_tn: a and b must hold as many matrices, got {tuple(a.shape)} and {tuple(b.shape)}")
    if _routed(a, b):
        return torch.stack([mm_tn(a[d], b[d]) for d in range(a.size(0))])
    return torch.bmm(a.transpose(1, 2), b)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _lp(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        d_x = _lp(grad, transposed(weight)) if ctx.needs_input_grad[0] else None       # (rows, in)
        d_w = mm_tn(grad, x) if ctx.needs_input_grad[1] else None                      # (out, in)
        return d_x, d_w


# oneDNN compiles a kernel for each matrix shape it meets: about 2 ms for an output-layer product
# of the peer-sized model on an AMX Xeon, three such products a training step, and the row count
# (the batch's target tokens) is new at almost every batch
ROW_MULTIPLE = 128


def product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a product of x runs in: the autocast dtype for a float32 x under autocast on its
    device, else x's own."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def onednn_multiplies(x: torch.Tensor) -> bool:
    """Whether a CPU product of x runs in oneDNN, which compiles a kernel for each shape it meets:
    in bfloat16 or float16, or in float32 routed here (`enabled()`). (PyTorch sends bfloat16 and
    float16 products to oneDNN where the CPU has instructions for them; elsewhere padding rows
    for it only costs their share of the product.)"""
    if x.device.type != "cpu" or x.layout != torch.strided:
        return False
    return product_dtype(x) in (torch.bfloat16, torch.float16) or _routed(x)


def pad_rows(x: torch.Tensor) -> torch.Tensor:
    """x (rows, k) with zero rows appended up to a multiple of ROW_MULTIPLE where oneDNN multiplies it
    (`onednn_multiplies`); x itself elsewhere."""
    if x.dim() != 2 or x.size(0) % ROW_MULTIPLE == 0 or not onednn_multiplies(x):
        return x
    return F.pad(x, (0, 0, 0, -x.size(0) % ROW_MULTIPLE))                              # (rows', k)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` for x (rows, in) and weight (out, in), with autograd, through oneDNN when routed."""
    if x.dim() == 2 and weight.is_contiguous() and _routed(x, weight):
        return _Linear.apply(x, weight)
    return F.linear(x, weight)
