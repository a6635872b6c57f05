"""Decoding precision: auto, float32, bfloat16 weights, or the decoder's matrices in int8 on CPU.

`auto` (the command lines' default) is bfloat16 where the device multiplies bfloat16
matrices in hardware (a CPU with AVX512_BF16 or AMX, a GPU that supports it) and
float32 elsewhere; training's `trainer.precision=auto` follows the same rule
(`auto_precision`).

`bfloat16` casts a copy of the whole model to bfloat16: every matrix product and LSTM
runs in bfloat16 (on CPUs with bfloat16 dot-product instructions, AVX512_BF16 or AMX,
several times the float32 rate), while the search still takes log-softmax and adds
scores in float32 (Seq2Seq.step casts the logits). On a CPU without those instructions
bfloat16 is emulated and much slower than float32; a warning says so.

`int8` stores the weights of every matrix product a decoder step makes (the
LSTMCells, Bahdanau's query layer, the combine layer and the output layer) as int8
with one scale per output row, and runs them through PyTorch's quantized x86 kernels
(fbgemm), about twice as fast as float32 matrix products on a CPU without bfloat16.
The encoder, the embeddings, the attention keys and energies and the bridge stay
float32: they run once per sentence or are too small to gain.

Inputs are quantized with a fixed scale taken from a bound known in advance, not
from the batch (as dynamic quantization does): every input of these products is an
LSTM hidden state, a tanh output or a convex combination of encoder LSTM outputs,
all within [-1, 1], except the target embeddings, whose bound is the table's largest
entry. So a sentence's translation does not depend on which other sentences share
its batch (the service's results equal the command line's), as in float32.
Activations use 7 of the 8 bits: without VNNI instructions the x86 kernels add
products in pairs in 16 bits, which full 8-bit inputs could overflow.

Quantization happens when a model is loaded for translation; checkpoints always hold
float32 weights, and the model given is left untouched (a copy is quantized).

The kernels are torch's `quantized` operators, which PyTorch has marked for removal in
a future release (its warning about quantized tensors is silenced here); on a torch
without them, precision int8 is refused with a message saying so, and float32 works.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

from .cpu import cpu_flags
from .ensemble import Ensemble
from .model import Seq2Seq

PRECISIONS = ("auto", "float32", "bfloat16", "int8")
_HALF_RANGE = 63  # inputs map to quint8 64 +- 63: 7 bits
log = logging.getLogger(__name__)


def check_precision(precision: str, device: str | torch.device = "cpu") -> None:
    """A ValueError naming the value and the choices for a precision this device cannot use."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "int8" and torch.device(device).type != "cpu":
        raise ValueError(f"precision int8 runs on the CPU only, got device {str(device)!r}; "
                         f"use precision float32 there")
    if precision == "int8" and not int8_kernels_available():
        raise ValueError(f"precision int8 needs torch's quantized CPU operators, which torch {torch.__version__} "
                         f"lacks; use precision float32")


def int8_kernels_available() -> bool:
    try:
        torch.ops.quantized.linear_prepack  # noqa: B018 - looking the operators up is the check
        torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


class Int8Linear(nn.Module):
    """x W^T + b with W in int8 (a scale per output row) and x, |x| <= bound, in 7-bit
    integers of the fixed scale bound/63; float32 in and out, any leading dimensions."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bound: float):
        super().__init__()
        weight = weight.detach().float()
        self.in_features, self.out_features = weight.size(1), weight.size(0)
        scales = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12)                  # (out,)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
            qweight = torch.quantize_per_channel(weight, scales.double(), torch.zeros_like(scales, dtype=torch.long),
                                                 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(
                qweight, None if bias is None else bias.detach().float().contiguous())
        self.bound = float(bound)
        self.input_scale = self.bound / _HALF_RANGE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()                         # (rows, in)
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            flat, self.input_scale, _HALF_RANGE + 1, self._packed)                  # (rows, out)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, input_bound={self.bound:g}"


class Int8LSTMCell(nn.Module):
    """nn.LSTMCell with its matrices in int8.

    The cell's input is given as parts of known widths and bounds (e.g. a target
    embedding, then an attentional vector); parts and the hidden state that share a
    bound share one int8 product. gates = sum of the products + biases, in the order
    i, f, g, o of nn.LSTMCell.
    """

    def __init__(self, cell: nn.LSTMCell, input_parts: list[tuple[int, float]]):
        super().__init__()
        if sum(w for w, _ in input_parts) != cell.input_size:
            raise ValueError(f"input parts {input_parts} do not add up to the cell's input size {cell.input_size}")
        weight = torch.cat([cell.weight_ih, cell.weight_hh], dim=1).detach()   # (4H, in + H)
        bias = (cell.bias_ih + cell.bias_hh).detach() if cell.bias else None
        ranges: dict[float, list[tuple[int, int]]] = {}  # bound -> column ranges of [x; h] it covers
        start = 0
        for width, bound in [*input_parts, (cell.hidden_size, 1.0)]:
            spans = ranges.setdefault(float(bound), [])
            if spans and spans[-1][1] == start:   # adjacent to the last range of the same bound: extend it
                spans[-1] = (spans[-1][0], start + width)
            else:
                spans.append((start, start + width))
            start += width
        self.groups = list(ranges.values())
        self.products = nn.ModuleList(
            Int8Linear(torch.cat([weight[:, a:b] for a, b in spans], dim=1), bias if k == 0 else None, bound)
            for k, (bound, spans) in enumerate(ranges.items()))
        self.input_size, self.hidden_size = cell.input_size, cell.hidden_size

    def _columns(self, x: torch.Tensor, h: torch.Tensor, a: int, b: int) -> list[torch.Tensor]:
        """Columns a..b of [x; h], as slices of x and h (no concatenated copy of both)."""
        n = self.input_size
        return ([x[:, a:min(b, n)]] if a < n else []) + ([h[:, max(a, n) - n:b - n]] if b > n else [])

    def forward(self, x: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (rows, input_size), hidden (h, c) each (rows, H) -> new (h, c)."""
        h, c = hidden
        gates = None
        for spans, product in zip(self.groups, self.products):
            pieces = [piece for a, b in spans for piece in self._columns(x, h, a, b)]
            part = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)     # (rows, group width)
            out = product(part)                                                  # (rows, 4H)
            gates = out if gates is None else gates.add_(out)
        i, f, g, o = gates.chunk(4, dim=1)                                       # (rows, H) each
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


def quantize_int8(model: Seq2Seq) -> Seq2Seq:
    """A copy of `model` in eval mode whose decoder step runs its matrix products in int8."""
    model = copy.deepcopy(model).eval()
    dec = model.decoder
    emb_bound = max(float(dec.embedding.weight.detach().abs().max()), 1e-6)
    cells = dec.cells.cells
    for i, cell in enumerate(cells):
        if i == 0:  # [target embedding; attentional vector (input feeding)]
            parts = [(dec.embedding.embedding_dim, emb_bound)]
            if dec.input_feeding:
                parts.append((dec.output_size, 1.0))
        else:       # the hidden state of the layer below
            parts = [(cell.input_size, 1.0)]
        cells[i] = Int8LSTMCell(cell, parts)
    for name in ("combine", "output_layer"):  # read [context; top hidden] and a tanh output: within [-1, 1]
        layer = getattr(dec, name)
        setattr(dec, name, Int8Linear(layer.weight, layer.bias, 1.0))
    attention = dec.attention
    if hasattr(attention, "query_layer"):     # reads the top hidden state
        attention.query_layer = Int8Linear(attention.query_layer.weight, None, 1.0)
    return model


# /proc/cpuinfo flags of x86 bfloat16 instructions: dot products (avx512_bf16, amx_bf16) and the
# AVX2-level conversions (avx_ne_convert). A CPU with any of them is not refused; one with none
# of them has no bfloat16 kernels for the LSTM at all. Only the dot products make bfloat16
# faster than float32, so only they make `auto` choose it.
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert")
BF16_COMPUTE_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bfloat16() -> bool | None:
    """Whether this CPU has any of the bfloat16 instructions in BF16_FLAGS; None where /proc/cpuinfo is unreadable."""
    flags = cpu_flags()
    return None if flags is None else any(f in flags for f in BF16_FLAGS)


def auto_precision(device: str | torch.device = "cpu") -> str:
    """"bfloat16" where `device` multiplies bfloat16 matrices in hardware, else "float32"."""
    device = torch.device(device)
    if device.type == "cpu":
        flags = cpu_flags() or set()
        return "bfloat16" if any(f in flags for f in BF16_COMPUTE_FLAGS) else "float32"
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "float32"


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """`precision`, with "auto" replaced by what it means on `device`."""
    check_precision(precision, device)
    return auto_precision(device) if precision == "auto" else precision


def for_precision(model: nn.Module, precision: str, device: str | torch.device = "cpu") -> nn.Module:
    """`model` itself for float32; a bfloat16 or quantized copy otherwise (every member of an ensemble)."""
    precision = resolve_precision(precision, device)
    if precision == "float32":
        return model
    if precision == "bfloat16":
        if torch.device(device).type == "cpu" and cpu_has_bfloat16() is False:
            log.warning(f"precision bfloat16: this CPU has no bfloat16 instructions ({', '.join(BF16_FLAGS)}), "
                        "so bfloat16 is emulated and slower than float32")
        return copy.deepcopy(model).to(torch.bfloat16).eval()
    if isinstance(model, Ensemble):
        return Ensemble([quantize_int8(m) for m in model.models]).eval()
    return quantize_int8(model)
