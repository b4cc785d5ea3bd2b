"""Triton paged-attention kernels against their torch references, and the references against dense float64.

Without a GPU the Triton kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET),
so shapes stay small. Cache slots that hold no token are NaN: a kernel reading past a context fails loudly.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from nitro_torch.runner.kernels import (
    paged_decode_reference,
    paged_decode_triton,
    prefill_paged_reference,
    prefill_paged_triton,
    store_kv_reference,
    store_kv_triton,
    use_triton,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)), reason="triton cannot run here")
FP32_TOL = {"atol": 1e-4, "rtol": 1e-4}
BF16_TOL = {"atol": 3e-2, "rtol": 3e-2}


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q [q, H, D] are the last q positions of a sequence whose keys/values are k, v [ctx, KV, D]."""
    q_len, num_heads, _ = q.shape
    ctx = k.shape[0]
    groups = num_heads // k.shape[1]
    k = k.double().repeat_interleave(groups, dim=1)
    v = v.double().repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
    k_pos = torch.arange(ctx, device=q.device)[None, :]
    allowed = k_pos <= q_pos
    if window:
        allowed &= k_pos > q_pos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v).float()


@dataclass
class PagedSequences:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    slot_lists: list[torch.Tensor]


def paged_sequences(lengths: list[int], block_size: int, kv_heads: int, head_dim: int,
                    dtype: torch.dtype = torch.float32, seed: int = 0) -> PagedSequences:
    """Random K/V per sequence, stored in shuffled blocks of a NaN-filled cache; tables padded with block 0."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in lengths]
    num_blocks = sum(blocks_per_seq) + 3
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    free = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(max(blocks_per_seq), 1)
    tables, keys, values, slot_lists = [], [], [], []
    for n, num in zip(lengths, blocks_per_seq):
        table = [free.pop() for _ in range(num)]
        k = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(n)],
                             dtype=torch.int64)
        store_kv_reference(k_cache, v_cache, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE))
        tables.append(table + [0] * (width - num))
        keys.append(k)
        values.append(v)
        slot_lists.append(slots)
    block_tables = torch.tensor(tables, dtype=torch.int32, device=DEVICE)
    return PagedSequences(k_cache, v_cache, block_tables, keys, values, slot_lists)


def _head_major_query(num_tokens: int, num_heads: int, head_dim: int, gen: torch.Generator,
                      dtype: torch.dtype) -> torch.Tensor:
    """[T, H, D] as attention.py passes it: a transposed view of HF's [H, T, D], not contiguous."""
    return torch.randn(num_heads, num_tokens, head_dim, generator=gen).to(dtype).to(DEVICE).transpose(0, 1)


# --- store ---------------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("kv_heads,head_dim,dtype", [(2, 64, torch.float32), (1, 80, torch.float32),
                                                     (4, 32, torch.bfloat16)])
def test_store_kv_triton_matches_reference_and_skips_padding(kv_heads: int, head_dim: int,
                                                             dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    # Shaped like attention.py's input: a [KV, T, D] tensor viewed as [T, KV, D] (not contiguous).
    key = torch.randn(kv_heads, 6, head_dim, generator=gen).to(dtype).to(DEVICE).transpose(0, 1)
    value = torch.randn(kv_heads, 6, head_dim, generator=gen).to(dtype).to(DEVICE).transpose(0, 1)
    slots = torch.tensor([17, -1, 63, 0, -1, 40], device=DEVICE)
    caches = [torch.zeros(4, 16, kv_heads, head_dim, dtype=dtype, device=DEVICE) for _ in range(4)]
    store_kv_reference(caches[0], caches[1], key, value, slots)
    store_kv_triton(caches[2], caches[3], key, value, slots)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    flat_k = caches[2].view(-1, kv_heads, head_dim)
    written = [17, 63, 0, 40]
    assert torch.equal(flat_k[written], key[[0, 2, 3, 5]])
    assert torch.equal(caches[3].view(-1, kv_heads, head_dim)[written], value[[0, 2, 3, 5]])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[written] = False
    assert flat_k[untouched].eq(0).all()


# --- decode --------------------------------------------------------------------------------------------------

DECODE_LENGTHS = [1, 5, 0, 16, 17, 40]  # 0 is a padding row


def _decode_case(num_heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype = torch.float32):
    seqs = paged_sequences(DECODE_LENGTHS, block_size, kv_heads, head_dim, dtype)
    gen = torch.Generator().manual_seed(7)
    query = _head_major_query(len(DECODE_LENGTHS), num_heads, head_dim, gen, dtype)
    lens = torch.tensor(DECODE_LENGTHS, dtype=torch.int32, device=DEVICE)
    return seqs, query, lens


@pytest.mark.parametrize("num_heads,kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window,softcap", [(None, None), (7, None), (None, 30.0)])
def test_decode_reference_matches_dense(num_heads: int, kv_heads: int, block_size: int, window: int | None,
                                        softcap: float | None) -> None:
    seqs, query, lens = _decode_case(num_heads, kv_heads, 32, block_size)
    out = paged_decode_reference(query, seqs.k_cache, seqs.v_cache, seqs.block_tables, lens, 0.2, window, softcap)
    for i, n in enumerate(DECODE_LENGTHS):
        if n == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i]))
            continue
        expected = dense_reference(query[i:i + 1], seqs.keys[i].to(DEVICE), seqs.values[i].to(DEVICE), 0.2,
                                   window, softcap)
        torch.testing.assert_close(out[i:i + 1], expected, **FP32_TOL)


@needs_triton
@pytest.mark.parametrize("num_heads,kv_heads,head_dim,block_size,window,softcap", [
    (4, 4, 64, 16, None, None),
    (8, 2, 64, 32, None, None),
    (8, 1, 80, 16, None, None),
    (8, 2, 96, 32, 7, None),
    (4, 1, 64, 16, None, 30.0),
])
def test_decode_triton_matches_reference(num_heads: int, kv_heads: int, head_dim: int, block_size: int,
                                         window: int | None, softcap: float | None) -> None:
    seqs, query, lens = _decode_case(num_heads, kv_heads, head_dim, block_size)
    args = (query, seqs.k_cache, seqs.v_cache, seqs.block_tables, lens, 0.2, window, softcap)
    out = paged_decode_triton(*args)
    torch.testing.assert_close(out, paged_decode_reference(*args), **FP32_TOL)
    assert torch.equal(out[DECODE_LENGTHS.index(0)], torch.zeros_like(out[0]))


@needs_triton
def test_decode_triton_bf16() -> None:
    seqs, query, lens = _decode_case(8, 2, 64, 16, torch.bfloat16)
    args = (query, seqs.k_cache, seqs.v_cache, seqs.block_tables, lens, 0.2)
    out = paged_decode_triton(*args)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), paged_decode_reference(*args).float(), **BF16_TOL)
    for i, n in enumerate(DECODE_LENGTHS):
        if n:
            expected = dense_reference(query[i:i + 1], seqs.keys[i].to(DEVICE), seqs.values[i].to(DEVICE), 0.2)
            torch.testing.assert_close(out[i:i + 1].float(), expected, **BF16_TOL)


# --- prefill -------------------------------------------------------------------------------------------------

# (query rows, context) per chunk: fresh prompts, prefix hits (context > rows), an empty chunk, a multi-tile one.
PREFILL_CHUNKS = [(5, 5), (3, 20), (0, 4), (17, 17), (1, 40), (70, 75)]
FEW_PREFILL_CHUNKS = [(3, 20), (0, 4), (17, 17)]  # for many heads: the interpreter's time grows with tiles x heads


def _prefill_case(num_heads: int, kv_heads: int, head_dim: int, block_size: int,
                  chunks: list[tuple[int, int]], dtype: torch.dtype = torch.float32):
    seqs = paged_sequences([ctx for _, ctx in chunks], block_size, kv_heads, head_dim, dtype, seed=1)
    gen = torch.Generator().manual_seed(11)
    q_lens = [q for q, _ in chunks]
    query = _head_major_query(sum(q_lens), num_heads, head_dim, gen, dtype)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    lens = torch.tensor([ctx for _, ctx in chunks], dtype=torch.int32, device=DEVICE)
    return seqs, query, cu, lens


@pytest.mark.parametrize("num_heads,kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window,softcap", [(None, None), (6, None), (None, 20.0)])
def test_prefill_reference_matches_dense(num_heads: int, kv_heads: int, block_size: int, window: int | None,
                                         softcap: float | None) -> None:
    seqs, query, cu, lens = _prefill_case(num_heads, kv_heads, 32, block_size, PREFILL_CHUNKS)
    out = prefill_paged_reference(query, seqs.k_cache, seqs.v_cache, seqs.block_tables, cu, lens, 0.25, window,
                                  softcap)
    for s, (q_len, _) in enumerate(PREFILL_CHUNKS):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        expected = dense_reference(query[rows], seqs.keys[s].to(DEVICE), seqs.values[s].to(DEVICE), 0.25, window,
                                   softcap)
        torch.testing.assert_close(out[rows], expected, **FP32_TOL)


@needs_triton
@pytest.mark.parametrize("num_heads,kv_heads,head_dim,block_size,window,softcap,chunks", [
    (2, 2, 64, 16, None, None, PREFILL_CHUNKS),
    (4, 1, 64, 32, None, None, PREFILL_CHUNKS),
    (8, 1, 80, 16, None, None, FEW_PREFILL_CHUNKS),
    (4, 1, 96, 32, 6, None, PREFILL_CHUNKS),
    (2, 1, 64, 16, None, 20.0, PREFILL_CHUNKS),
])
def test_prefill_triton_matches_reference(num_heads: int, kv_heads: int, head_dim: int, block_size: int,
                                          window: int | None, softcap: float | None,
                                          chunks: list[tuple[int, int]]) -> None:
    seqs, query, cu, lens = _prefill_case(num_heads, kv_heads, head_dim, block_size, chunks)
    args = (query, seqs.k_cache, seqs.v_cache, seqs.block_tables, cu, lens, 0.25, window, softcap)
    torch.testing.assert_close(prefill_paged_triton(*args), prefill_paged_reference(*args), **FP32_TOL)


@needs_triton
def test_prefill_triton_bf16() -> None:
    chunks = [(4, 4), (6, 30), (20, 20)]
    seqs, query, cu, lens = _prefill_case(4, 2, 64, 16, chunks, torch.bfloat16)
    args = (query, seqs.k_cache, seqs.v_cache, seqs.block_tables, cu, lens, 0.25)
    out = prefill_paged_triton(*args)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), prefill_paged_reference(*args).float(), **BF16_TOL)
    for s in range(len(chunks)):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        expected = dense_reference(query[rows], seqs.keys[s].to(DEVICE), seqs.values[s].to(DEVICE), 0.25)
        torch.testing.assert_close(out[rows].float(), expected, **BF16_TOL)


@needs_triton
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefix_hit_through_triton_store_then_prefill(block_size: int) -> None:
    """A request whose first 37 tokens are cached: store its 9 new tokens with the kernel, then attend over all 46."""
    prefix, new, kv_heads, head_dim = 37, 9, 2, 64
    seqs = paged_sequences([prefix + new], block_size, kv_heads, head_dim, seed=5)
    k_all, v_all, slots = seqs.keys[0].to(DEVICE), seqs.values[0].to(DEVICE), seqs.slot_lists[0].to(DEVICE)
    seqs.k_cache.view(-1, kv_heads, head_dim)[slots[prefix:]] = float("nan")  # the step's tokens not yet stored
    seqs.v_cache.view(-1, kv_heads, head_dim)[slots[prefix:]] = float("nan")
    store_kv_triton(seqs.k_cache, seqs.v_cache, k_all[prefix:], v_all[prefix:], slots[prefix:])
    query = torch.randn(new, 8, head_dim, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    cu = torch.tensor([0, new], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([prefix + new], dtype=torch.int32, device=DEVICE)
    out = prefill_paged_triton(query, seqs.k_cache, seqs.v_cache, seqs.block_tables, cu, lens, 0.125)
    torch.testing.assert_close(out, dense_reference(query, k_all, v_all, 0.125), **FP32_TOL)
