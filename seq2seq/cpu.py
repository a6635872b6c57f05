"""Process-level settings that make PyTorch on a CPU faster.

glibc hands every allocation above its mmap threshold (128 KiB at first) straight back
to the kernel when it is freed. A training step allocates and frees tensors of tens of
megabytes (the (tokens, vocabulary) logits and their gradients), so each step would
page-fault all of that memory in again: measured here, that made a training step about
2.5x slower. Raising the mmap and trim thresholds keeps the memory in the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_done = False


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Tell glibc malloc to reuse freed memory instead of returning it to the kernel.

    32 MiB is glibc's largest allowed mmap threshold on 64-bit. Returns whether the
    setting took effect (False on other C libraries and systems, where it is a no-op).
    """
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    mallopt(_M_TOP_PAD, 64 << 20)
    if not _done:
        log.debug("mallopt not accepted; allocator left as it is")
    return _done


# Kernels kept for translation: a beam search meets a new row count at most steps, and each
# bfloat16 output-layer kernel there holds its own weight copy (8 MB at the peer size).
TRANSLATION_KERNELS = 16
# Kernels kept for training: a step meets about twenty shapes (the decoder's step products, the
# output layer's, the encoder's segments, the attention's); with too few kept, every step
# compiles them again.
TRAINING_KERNELS = 1024
KERNEL_CACHE_VAR = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"  # oneDNN's own setting; a value set there wins


def limit_kernel_cache(capacity: int = TRANSLATION_KERNELS) -> None:
    """Keep at most `capacity` compiled oneDNN kernels (16 by default, `TRANSLATION_KERNELS`;
    training passes `TRAINING_KERNELS`, 1,024).

    oneDNN compiles a kernel for every matrix or LSTM shape it meets and keeps the last
    `capacity`. Translation (`TRANSLATION_KERNELS`): decoding test2016 (beam 5, batch 64) in
    bfloat16 peaked at 726 MB with 1,024 kernels and 581 MB with 16, at the same speed.
    Training (`TRAINING_KERNELS`) needs a step's worth and more: with 16, a step compiled
    most of its kernels again. The measurements are in docs/RESULTS.md. Takes effect only
    before oneDNN's first kernel; a value set in the environment wins.
    """
    os.environ.setdefault(KERNEL_CACHE_VAR, str(capacity))


def cpu_fields() -> dict[str, str] | None:
    """The first processor's fields in /proc/cpuinfo ("model name", "flags", ...); None where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break   # the end of the first processor's block
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_flags() -> set[str] | None:
    """The first processor's instruction-set flags ("avx512f", "amx_bf16", ...); None where unreadable."""
    fields = cpu_fields()
    return None if fields is None else set(fields.get("flags", "").split())
