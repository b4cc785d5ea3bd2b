"""Decode attention: one query token per request against its K/V in scattered cache blocks.

Positions attended are [0, context_len) (the current token is the last one, already stored), narrowed to
the last `sliding_window` positions when given. Rows with context_len == 0 are batch padding and yield zeros.
"""

import torch

from nitro_torch.runner.kernels.tiles import dot_settings, triton

if triton is not None:
    import triton.language as tl

    from nitro_torch.runner.kernels.tiles import load_kv_tile, online_softmax_step, triton_tanh

KEYS_PER_TILE = 32


def paged_decode_reference(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """query [R, H, D]; caches [blocks, block_size, KV, D]; block_tables [R, W]; context_lens [R]."""
    num_reqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    groups = num_heads // num_kv_heads
    tables = block_tables.long()
    positions = torch.arange(tables.shape[1] * block_size, device=query.device)
    lens = context_lens.long()[:, None]
    in_context = (positions[None, :] < lens)[:, :, None, None]
    # Slots past the context may hold anything (stale or never written); zero them so 0 * NaN cannot leak.
    keys = k_cache[tables].flatten(1, 2).float().where(in_context, 0.0)  # [R, W * block_size, KV, D]
    values = v_cache[tables].flatten(1, 2).float().where(in_context, 0.0)
    q = query.float().reshape(num_reqs, num_kv_heads, groups, head_dim)
    scores = torch.einsum("rkgd,rlkd->rkgl", q, keys) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = positions[None, :] < lens
    if sliding_window:
        allowed &= positions[None, :] >= lens - sliding_window
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked padding rows -> zeros
    out = torch.einsum("rkgl,rlkd->rkgd", probs, values)
    return out.reshape(num_reqs, num_heads, head_dim).to(query.dtype)


def paged_decode_triton(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                        sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Same contract as paged_decode_reference; grid from shapes only, no host sync (CUDA-graph safe).

    One program per (request, KV head) serves all query heads of that group, so each K/V row is read once.
    """
    if triton is None:
        raise RuntimeError("paged_decode_triton needs triton")
    num_reqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1, "caches must share a dense layout"
    assert query.stride(2) == 1, "query rows must be contiguous in head_dim"
    groups = num_heads // num_kv_heads
    out = torch.empty_like(query)
    if num_reqs == 0:
        return out
    _paged_decode_kernel[(num_reqs, num_kv_heads)](
        query, k_cache, v_cache, block_tables, context_lens, out,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        float(scale), float(softcap or 0.0), int(sliding_window or 0), groups, head_dim,
        BLOCK_SIZE=block_size, KEYS_PER_TILE=KEYS_PER_TILE,
        GROUP_PAD=max(16, triton.next_power_of_2(groups)), HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        USE_SOFTCAP=bool(softcap), USE_WINDOW=bool(sliding_window),
        **dot_settings(query.dtype),
    )
    return out


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        query, k_cache, v_cache, block_tables, context_lens, out,
        q_stride_req, q_stride_head, out_stride_req, out_stride_head,
        cache_stride_block, cache_stride_slot, cache_stride_head, table_stride_req,
        scale, softcap, sliding_window, groups, head_dim,
        BLOCK_SIZE: tl.constexpr, KEYS_PER_TILE: tl.constexpr, GROUP_PAD: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):
        req = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1).to(tl.int64)
        context_len = tl.load(context_lens + req).to(tl.int32)
        group_rows = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, HEAD_DIM_PAD)
        dim_ok = dims < head_dim
        heads = kv_head * groups + group_rows
        q_mask = (group_rows < groups)[:, None] & dim_ok[None, :]
        q = tl.load(query + req * q_stride_req + heads[:, None] * q_stride_head + dims[None, :], mask=q_mask,
                    other=0.0)
        if DOT_IN_FP32:
            q = q.to(tl.float32)

        start = 0
        if USE_WINDOW:
            start = tl.maximum(context_len - sliding_window, 0)
        # Finite floor: a tile with no allowed key leaves the running max finite, so no inf - inf = NaN.
        running_max = tl.full([GROUP_PAD], -1.0e30, tl.float32)
        running_sum = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
        table_row = block_tables + req * table_stride_req
        for tile_start in range(start, context_len, KEYS_PER_TILE):
            positions = tile_start + tl.arange(0, KEYS_PER_TILE)
            key_ok = positions < context_len
            k, v = load_kv_tile(k_cache, v_cache, table_row, positions, key_ok, kv_head, dims, dim_ok,
                                cache_stride_block, cache_stride_slot, cache_stride_head, BLOCK_SIZE, DOT_IN_FP32)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
            if USE_SOFTCAP:
                scores = softcap * triton_tanh(scores / softcap)
            scores = tl.where(key_ok[None, :], scores, float("-inf"))

            running_max, running_sum, acc = online_softmax_step(scores, v, running_max, running_sum, acc,
                                                                 DOT_PRECISION)

        running_sum = tl.where(running_sum > 0, running_sum, 1.0)  # context_len == 0: zeros, not 0/0
        result = acc / running_sum[:, None]
        tl.store(out + req * out_stride_req + heads[:, None] * out_stride_head + dims[None, :],
                 result.to(out.dtype.element_ty), mask=q_mask)
