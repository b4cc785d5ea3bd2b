"""Scatter fresh K/V rows into the paged cache at flat slots (block_id * block_size + offset)."""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: CPU-only installs use the reference
    triton = None


def store_kv_reference(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """key/value [T, KV, D] into caches [blocks, block_size, KV, D]; rows whose slot is < 0 are padding."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value[keep].to(v_cache.dtype))


def store_kv_triton(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Same contract as store_kv_reference, without a host sync: safe inside CUDA graphs."""
    if triton is None:
        raise RuntimeError("store_kv_triton needs triton")
    num_tokens, num_kv_heads, head_dim = key.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1, "caches must share a dense layout"
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens, num_kv_heads)](
        k_cache, v_cache, key, value, slot_mapping,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        head_dim, BLOCK_SIZE=k_cache.shape[1], HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
    )


if triton is not None:

    @triton.jit
    def _store_kv_kernel(
        k_cache, v_cache, key, value, slot_mapping,
        cache_stride_block, cache_stride_slot, cache_stride_head,
        key_stride_token, key_stride_head, key_stride_dim,
        value_stride_token, value_stride_head, value_stride_dim,
        head_dim,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    ):
        token = tl.program_id(0)
        head = tl.program_id(1)
        slot = tl.load(slot_mapping + token).to(tl.int64)
        dims = tl.arange(0, HEAD_DIM_PAD)
        mask = dims < tl.where(slot >= 0, head_dim, 0)  # padding tokens (slot < 0) write nothing
        safe_slot = tl.maximum(slot, 0)
        block = safe_slot // BLOCK_SIZE
        offset = safe_slot % BLOCK_SIZE
        cache_row = block * cache_stride_block + offset * cache_stride_slot + head * cache_stride_head
        k = tl.load(key + token * key_stride_token + head * key_stride_head + dims * key_stride_dim, mask=mask)
        v = tl.load(value + token * value_stride_token + head * value_stride_head + dims * value_stride_dim,
                    mask=mask)
        tl.store(k_cache + cache_row + dims, k.to(k_cache.dtype.element_ty), mask=mask)
        tl.store(v_cache + cache_row + dims, v.to(v_cache.dtype.element_ty), mask=mask)
