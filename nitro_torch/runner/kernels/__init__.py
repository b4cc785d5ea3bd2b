"""Triton kernels for the paged KV cache, each beside a pure-torch reference with the same signature.

The references define the semantics (and serve CPU-only machines); the Triton versions run on CUDA tensors,
or on CPU tensors through Triton's interpreter when TRITON_INTERPRET=1 (tests on machines without a GPU).
"""

from __future__ import annotations

import os

import torch

from nitro_torch.runner.kernels import paged_decode
from nitro_torch.runner.kernels.kv_store import store_kv_reference, store_kv_triton
from nitro_torch.runner.kernels.paged_decode import paged_decode_reference, paged_decode_triton
from nitro_torch.runner.kernels.prefill import prefill_paged_reference, prefill_paged_triton


def triton_available() -> bool:
    """Whether `import triton` succeeded (it is optional: CPU-only installs use the references)."""
    return paged_decode.triton is not None


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton path can run on `t`: CUDA tensors, or any tensor under Triton's interpreter."""
    return triton_available() and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


__all__ = [
    "paged_decode_reference",
    "paged_decode_triton",
    "prefill_paged_reference",
    "prefill_paged_triton",
    "store_kv_reference",
    "store_kv_triton",
    "triton_available",
    "use_triton",
]
