"""Pieces shared by the paged attention kernels: Triton import, tl.dot settings, and the two steps of their
inner loop (load one tile of K/V through a block table; fold one tile of scores into an online softmax)."""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: CPU-only installs use the references
    triton = None


def dot_settings(dtype: torch.dtype) -> dict[str, object]:
    """tl.dot options: exact products for fp32 models (no TF32 rounding), the backend default for 16-bit.

    Triton's interpreter multiplies bfloat16 dot operands as their raw uint16 bits, so there they go in fp32.
    """
    upcast = os.environ.get("TRITON_INTERPRET") == "1" and dtype == torch.bfloat16
    exact = dtype == torch.float32 or upcast
    return {"DOT_PRECISION": "ieee" if exact else None, "DOT_IN_FP32": upcast}


if triton is not None:

    @triton.jit
    def triton_tanh(x):
        # 1 - 2 / (e^{2x} + 1) saturates cleanly to +-1 where e^{2x} overflows or underflows.
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def load_kv_tile(k_cache, v_cache, table_row, positions, key_ok, kv_head, dims, dim_ok,
                     cache_stride_block, cache_stride_slot, cache_stride_head,
                     BLOCK_SIZE: tl.constexpr, DOT_IN_FP32: tl.constexpr):
        """K and V [keys, head_dim] of `positions` of one sequence, found through its block-table row."""
        block_ids = tl.load(table_row + positions // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        rows = block_ids * cache_stride_block + (positions % BLOCK_SIZE) * cache_stride_slot \
            + kv_head * cache_stride_head
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if DOT_IN_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        return k, v

    @triton.jit
    def online_softmax_step(scores, v, running_max, running_sum, acc, DOT_PRECISION: tl.constexpr):
        """Fold one tile of masked scores [rows, keys] and its V into the running max, sum and output."""
        tile_max = tl.maximum(running_max, tl.max(scores, axis=1))
        probs = tl.exp(scores - tile_max[:, None])
        rescale = tl.exp(running_max - tile_max)
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
        return tile_max, running_sum, acc
