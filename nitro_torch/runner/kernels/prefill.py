"""Prefill attention over packed variable-length chunks whose K/V (cached prefix + the chunk) sit in paged blocks.

Chunk s owns query rows cu_query_lens[s]:cu_query_lens[s+1]; its context_lens[s] tokens are already in the
cache, the chunk's own K/V included, so row i sits at position context_lens[s] - q_len + i and attends
causally to every cached position up to it. A context longer than the chunk is a prefix-cache hit.

Not used here, to be measured on GPU: torch >= 2.11 offers `torch.nn.attention.varlen` (varlen flash
attention on CUDA) and flex attention. Varlen wants K/V packed contiguously per sequence, so paged prefixes
would first be gathered into a copy; flex attention can read the paged layout only through a BlockMask
built per step. This kernel reads the blocks in place.
"""

import torch

from nitro_torch.runner.kernels.tiles import dot_settings, triton

if triton is not None:
    import triton.language as tl

    from nitro_torch.runner.kernels.tiles import load_kv_tile, online_softmax_step, triton_tanh

QUERY_ROWS_PER_TILE = 64
KEYS_PER_TILE = 32


def prefill_paged_reference(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_query_lens: torch.Tensor, context_lens: torch.Tensor,
                            scale: float, sliding_window: int | None = None,
                            softcap: float | None = None) -> torch.Tensor:
    """query [T, H, D] packs N chunks; block_tables [N, W]; cu_query_lens [N + 1]; context_lens [N]."""
    num_heads, head_dim = query.shape[1:]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros_like(query)
    bounds, lens = cu_query_lens.tolist(), context_lens.tolist()
    for s, ctx in enumerate(lens):
        rows = slice(bounds[s], bounds[s + 1])
        q_len = bounds[s + 1] - bounds[s]
        if q_len == 0:
            continue
        positions = torch.arange(ctx, device=query.device)
        blocks = block_tables[s].long()[positions // block_size]
        keys = k_cache[blocks, positions % block_size].float()  # [ctx, KV, D]
        values = v_cache[blocks, positions % block_size].float()
        q = query[rows].float().reshape(q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
        scores = torch.einsum("qkgd,ckd->kgqc", q, keys) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        q_pos = torch.arange(ctx - q_len, ctx, device=query.device)[:, None]
        allowed = positions[None, :] <= q_pos
        if sliding_window:
            allowed &= positions[None, :] > q_pos - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        chunk_out = torch.einsum("kgqc,ckd->qkgd", torch.softmax(scores, dim=-1), values)
        out[rows] = chunk_out.reshape(q_len, num_heads, head_dim).to(query.dtype)
    return out


def prefill_paged_triton(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, cu_query_lens: torch.Tensor, context_lens: torch.Tensor,
                         scale: float, sliding_window: int | None = None, softcap: float | None = None,
                         tiles: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Same contract as prefill_paged_reference, flash-attention style over (query tile, head) programs.

    `tiles`: `query_tiles(cu_query_lens, T)` when the caller computed it once for all layers of a step."""
    if triton is None:
        raise RuntimeError("prefill_paged_triton needs triton")
    num_tokens, num_heads, head_dim = query.shape
    num_chunks = context_lens.shape[0]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1, "caches must share a dense layout"
    assert query.stride(2) == 1, "query rows must be contiguous in head_dim"
    out = torch.empty_like(query)
    if num_tokens == 0 or num_chunks == 0:
        return out
    tile_chunk, tile_row_start = tiles if tiles is not None else query_tiles(cu_query_lens, num_tokens)
    _prefill_paged_kernel[(tile_chunk.shape[0], num_heads)](
        query, k_cache, v_cache, block_tables, cu_query_lens, context_lens, tile_chunk, tile_row_start, out,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        float(scale), float(softcap or 0.0), int(sliding_window or 0), num_heads // num_kv_heads, head_dim,
        BLOCK_SIZE=block_size, QUERY_ROWS=QUERY_ROWS_PER_TILE, KEYS_PER_TILE=KEYS_PER_TILE,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        USE_SOFTCAP=bool(softcap), USE_WINDOW=bool(sliding_window),
        **dot_settings(query.dtype),
    )
    return out


def query_tiles(cu_query_lens: torch.Tensor, num_tokens: int,
                rows_per_tile: int = QUERY_ROWS_PER_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Map each program's tile to (chunk, first row inside the chunk), computed on device without a sync.

    The grid is the upper bound ceil(T / rows) + N (each chunk wastes at most one partial tile); tiles past
    the last real one get a row start beyond their chunk's length and do nothing.
    """
    num_chunks = cu_query_lens.shape[0] - 1
    q_lens = (cu_query_lens[1:] - cu_query_lens[:-1]).long()
    tiles_per_chunk = (q_lens + rows_per_tile - 1) // rows_per_tile
    tile_ends = torch.cumsum(tiles_per_chunk, 0)
    tile_ids = torch.arange(-(-num_tokens // rows_per_tile) + num_chunks, device=cu_query_lens.device)
    chunk = torch.searchsorted(tile_ends, tile_ids, right=True).clamp_(max=num_chunks - 1)
    first_tile = tile_ends[chunk] - tiles_per_chunk[chunk]
    return chunk.to(torch.int32), ((tile_ids - first_tile) * rows_per_tile).to(torch.int32)


if triton is not None:

    @triton.jit
    def _prefill_paged_kernel(
        query, k_cache, v_cache, block_tables, cu_query_lens, context_lens, tile_chunk, tile_row_start, out,
        q_stride_token, q_stride_head, out_stride_token, out_stride_head,
        cache_stride_block, cache_stride_slot, cache_stride_head, table_stride_chunk,
        scale, softcap, sliding_window, groups, head_dim,
        BLOCK_SIZE: tl.constexpr, QUERY_ROWS: tl.constexpr, KEYS_PER_TILE: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):
        tile = tl.program_id(0)
        head = tl.program_id(1).to(tl.int64)
        chunk = tl.load(tile_chunk + tile).to(tl.int64)
        row_start = tl.load(tile_row_start + tile)
        q_begin = tl.load(cu_query_lens + chunk).to(tl.int32)
        q_len = tl.load(cu_query_lens + chunk + 1).to(tl.int32) - q_begin
        context_len = tl.load(context_lens + chunk).to(tl.int32)
        kv_head = head // groups

        rows = row_start + tl.arange(0, QUERY_ROWS)
        row_ok = rows < q_len
        q_positions = context_len - q_len + rows
        dims = tl.arange(0, HEAD_DIM_PAD)
        dim_ok = dims < head_dim
        q_mask = row_ok[:, None] & dim_ok[None, :]
        tokens = (q_begin + rows).to(tl.int64)
        q = tl.load(query + tokens[:, None] * q_stride_token + head * q_stride_head + dims[None, :], mask=q_mask,
                    other=0.0)
        if DOT_IN_FP32:
            q = q.to(tl.float32)

        first_position = context_len - q_len + row_start
        # Keys up to the tile's last real row; a tile past its chunk's end (grid upper bound) reads none.
        kv_end = tl.minimum(first_position + QUERY_ROWS, context_len) * (row_start < q_len).to(tl.int32)
        kv_start = 0
        if USE_WINDOW:
            kv_start = tl.maximum(first_position - sliding_window + 1, 0)
        # Finite floor: rows whose window starts later keep a finite max, so no inf - inf = NaN.
        running_max = tl.full([QUERY_ROWS], -1.0e30, tl.float32)
        running_sum = tl.zeros([QUERY_ROWS], tl.float32)
        acc = tl.zeros([QUERY_ROWS, HEAD_DIM_PAD], tl.float32)
        table_row = block_tables + chunk * table_stride_chunk
        for tile_start in range(kv_start, kv_end, KEYS_PER_TILE):
            positions = tile_start + tl.arange(0, KEYS_PER_TILE)
            key_ok = positions < kv_end
            k, v = load_kv_tile(k_cache, v_cache, table_row, positions, key_ok, kv_head, dims, dim_ok,
                                cache_stride_block, cache_stride_slot, cache_stride_head, BLOCK_SIZE, DOT_IN_FP32)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
            if USE_SOFTCAP:
                scores = softcap * triton_tanh(scores / softcap)
            allowed = key_ok[None, :] & (positions[None, :] <= q_positions[:, None])
            if USE_WINDOW:
                allowed = allowed & (positions[None, :] > q_positions[:, None] - sliding_window)
            scores = tl.where(allowed, scores, float("-inf"))

            running_max, running_sum, acc = online_softmax_step(scores, v, running_max, running_sum, acc,
                                                                 DOT_PRECISION)

        running_sum = tl.where(running_sum > 0, running_sum, 1.0)
        result = acc / running_sum[:, None]
        tl.store(out + tokens[:, None] * out_stride_token + head * out_stride_head + dims[None, :],
                 result.to(out.dtype.element_ty), mask=q_mask)
