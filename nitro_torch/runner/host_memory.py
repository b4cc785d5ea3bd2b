"""Keep the big per-step host allocations (logits, activations) in the heap instead of fresh pages every step.

glibc serves an allocation above its mmap threshold (at most 32 MiB) with a new mapping and unmaps it when freed,
so a step's [rows, vocab] float logits (50 MB at 256 rows of a 49,152-token vocabulary) page-fault on every write
and pay an munmap on every free: measured on this 2-core CPU, 5 ms of a 39 ms tiny-model step, plus 5 ms inside the
forward. Raising the mmap and trim thresholds keeps freed blocks for the next step, as llama.cpp keeps its buffers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger("nitro_torch.runner")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD_BYTES = 1 << 30
_applied = False


def reuse_large_allocations() -> bool:
    """Once per process, on glibc; False where it does not apply (another C library)."""
    global _applied
    if _applied:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD_BYTES))
    if _applied:
        logger.debug("glibc keeps freed blocks up to %d MiB for reuse", _THRESHOLD_BYTES >> 20)
    return _applied
