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


def limit_kernel_cache(capacity: int = 16) -> None:
    """Keep at most `capacity` compiled oneDNN kernels (1,024 by default).

    oneDNN keeps a kernel, with its own copy of the weights in its layout, for every matrix
    shape it has met. A beam search meets a new row count at most steps, and in bfloat16 each
    output-layer kernel of the peer-sized model holds an 8 MB weight copy: decoding test2016
    (beam 5, batch 64) peaked at 726 MB instead of 426 MB in float32, and at 581 MB with 16
    kernels, at the same speed. Training meets a new token count, so new output-layer shapes,
    at almost every batch. Takes effect only before oneDNN's first kernel; a value set in the
    environment wins.
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


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
