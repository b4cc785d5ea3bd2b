"""Paged attention against a dense per-sequence reference: GQA ratios, block sizes, ragged lengths, windows."""

from __future__ import annotations

import pytest
import torch

from nitro_torch.runner.attention import paged_decode_attention, prefill_attention, store_kv
from nitro_torch.runner.kv_cache import KVCache, KVLayout


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q [q, H, D] are the last q positions of a sequence whose keys/values are k, v [ctx, KV, D]."""
    q_len, num_heads, _ = q.shape
    ctx = k.shape[0]
    groups = num_heads // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(ctx - q_len, ctx)[:, None]
    k_pos = torch.arange(ctx)[None, :]
    allowed = k_pos <= q_pos
    if window:
        allowed &= k_pos > q_pos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v.double()).float()


def fill_cache(lengths: list[int], block_size: int, kv_heads: int, head_dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lengths) + 3
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(num_blocks, generator=gen).tolist()  # scattered blocks, not contiguous
    tables, keys, values = [], [], []
    for n in lengths:
        table = [free.pop() for _ in range(-(-n // block_size))]
        k = torch.randn(n, kv_heads, head_dim, generator=gen)
        v = torch.randn(n, kv_heads, head_dim, generator=gen)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(n)])
        store_kv(k_cache, v_cache, k, v, slots)
        tables.append(table)
        keys.append(k)
        values.append(v)
    return k_cache, v_cache, tables, keys, values


@pytest.mark.parametrize("num_heads,kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window,softcap", [(None, None), (7, None), (None, 30.0)])
def test_decode_matches_dense(num_heads: int, kv_heads: int, block_size: int, window: int | None,
                              softcap: float | None) -> None:
    lengths = [1, 5, 16, 17, 40, 33]
    head_dim = 32
    k_cache, v_cache, tables, keys, values = fill_cache(lengths, block_size, kv_heads, head_dim)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(lengths), num_heads, head_dim)
    cache = KVCache(KVLayout(1, kv_heads, head_dim, block_size, torch.float32), k_cache.shape[0], torch.device("cpu"))
    cache.keys[0][:-1].copy_(k_cache)  # the cache has one spare block at the end, for padding writes
    cache.values[0][:-1].copy_(v_cache)
    gathered_k, gathered_v = cache.gather(0, block_tables.flatten())
    shape = (len(lengths), -1, kv_heads, head_dim)
    out = paged_decode_attention(q, gathered_k.view(shape), gathered_v.view(shape), torch.tensor(lengths), 0.2,
                                 window, softcap)
    for i in range(len(lengths)):
        expected = dense_reference(q[i:i + 1], keys[i], values[i], 0.2, window, softcap)
        torch.testing.assert_close(out[i:i + 1], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("num_heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("q_len,ctx", [(9, 9), (5, 37), (16, 16), (1, 20)])
@pytest.mark.parametrize("window,softcap", [(None, None), (6, None), (None, 20.0)])
def test_prefill_with_cached_prefix_matches_dense(num_heads: int, kv_heads: int, q_len: int, ctx: int,
                                                  window: int | None, softcap: float | None) -> None:
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(ctx, kv_heads, 16, generator=gen)
    v = torch.randn(ctx, kv_heads, 16, generator=gen)
    q = torch.randn(q_len, num_heads, 16, generator=gen)
    out = prefill_attention(q, k, v, 0.25, window, softcap)
    torch.testing.assert_close(out, dense_reference(q, k, v, 0.25, window, softcap), atol=1e-5, rtol=1e-4)


def test_store_kv_writes_only_mapped_slots() -> None:
    k_cache = torch.zeros(4, 16, 2, 8)
    v_cache = torch.zeros_like(k_cache)
    k = torch.ones(3, 2, 8)
    store_kv(k_cache, v_cache, k, 2 * k, torch.tensor([17, 18, 63]))
    assert k_cache[1, 1].eq(1).all() and k_cache[1, 2].eq(1).all() and k_cache[3, 15].eq(1).all()
    assert v_cache[3, 15].eq(2).all()
    assert k_cache.ne(0).sum() == 3 * 2 * 8
