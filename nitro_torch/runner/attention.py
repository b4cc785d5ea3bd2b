"""Paged attention plugged into any HF causal LM through transformers' attention interface.

The model runs one packed sequence [1, T] per step with `use_cache=False`; every attention layer hands us
the fresh K/V of all T tokens. We write them into the layer's KV blocks, then attend: the leading tokens
that are single-token steps (decodes) in one batched call over their block tables, each multi-token chunk
(a prefill) with causal attention over its cached prefix plus itself. Per-step metadata reaches the layers
through a step context rather than through every forward signature.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from nitro_torch.runner.kv_cache import KVCache

ATTN_IMPLEMENTATION = "nitro_paged"


@dataclass
class PrefillChunk:
    query_start: int
    query_len: int
    context_len: int
    """Tokens of this request in the cache after this step (cached prefix + this chunk)."""
    block_table: torch.Tensor


@dataclass
class AttentionMetadata:
    kv_cache: KVCache
    slot_mapping: torch.Tensor
    num_decode_tokens: int = 0
    decode_block_tables: torch.Tensor | None = None
    decode_context_lens: torch.Tensor | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    write_kv: bool = True
    """False for cache-free forwards (embeddings): every chunk is a whole sequence attending to its own K/V."""


_current: AttentionMetadata | None = None


@contextlib.contextmanager
def step_context(metadata: AttentionMetadata) -> Iterator[None]:
    global _current
    previous, _current = _current, metadata
    try:
        yield
    finally:
        _current = previous


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter K/V [T, KV, D] into the blocks at flat slot = block_id * block_size + offset."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value)


def paged_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One query token per request [R, H, D] against its gathered blocks [R, L, KV, D] (L >= context).

    The query heads of one KV head form the "sequence" axis of a non-causal SDPA call, so grouped
    queries share one read of their K/V and no repeat_interleave copy is made.
    """
    num_reqs, num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[2]
    keys = keys.transpose(1, 2)  # [R, KV, L, D]
    values = values.transpose(1, 2)
    grouped = query.view(num_reqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    positions = torch.arange(keys.shape[2], device=query.device)
    valid = positions[None, :] < context_lens[:, None]
    if sliding_window:
        valid &= positions[None, :] >= (context_lens[:, None] - sliding_window)
    mask = valid[:, None, None, :]
    if softcap:
        out = _softcapped_attention(grouped, keys, values, mask, scale, softcap)
    else:
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(num_reqs, num_heads, head_dim)


def prefill_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of the last q_len positions [q, H, D] over all ctx positions [ctx, KV, D]."""
    q_len, ctx_len = query.shape[0], keys.shape[0]
    q = query.transpose(0, 1).unsqueeze(0)
    k = keys.transpose(0, 1).unsqueeze(0)
    v = values.transpose(0, 1).unsqueeze(0)
    mask = None
    if q_len != ctx_len or sliding_window or softcap:
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=query.device)[:, None]
        k_pos = torch.arange(ctx_len, device=query.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window:
            mask &= k_pos > q_pos - sliding_window
    if softcap:
        out = _softcapped_attention(q, k, v, mask, scale, softcap)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
        )
    return out[0].transpose(0, 1)


def _softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                          scale: float, softcap: float) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores.masked_fill_(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    meta = _current
    if meta is None:
        raise RuntimeError("nitro_paged attention called outside an engine step")
    layer = module.layer_idx
    k_cache, v_cache = meta.kv_cache.keys[layer], meta.kv_cache.values[layer]
    q = query[0].transpose(0, 1)  # [T, H, D]
    k = key[0].transpose(0, 1)  # [T, KV, D]
    v = value[0].transpose(0, 1)
    if meta.write_kv:
        store_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if nd:
        tables = meta.decode_block_tables
        keys, values = meta.kv_cache.gather(layer, tables.flatten())
        num_reqs = tables.shape[0]
        out[:nd] = paged_decode_attention(
            q[:nd], keys.view(num_reqs, -1, *keys.shape[2:]), values.view(num_reqs, -1, *values.shape[2:]),
            meta.decode_context_lens, scale, sliding_window, softcap,
        )
    for chunk in meta.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        if chunk.context_len == chunk.query_len:
            keys, values = k[rows], v[rows]
        else:
            keys, values = meta.kv_cache.gather(layer, chunk.block_table)
            keys = keys.flatten(0, 1)[: chunk.context_len]
            values = values.flatten(0, 1)[: chunk.context_len]
        out[rows] = prefill_attention(q[rows], keys, values, scale, sliding_window, softcap)
    return out.unsqueeze(0), None


def _no_mask(*args: object, **kwargs: object) -> None:
    """Block tables replace the dense mask; returning None stops HF from building a [T, T] mask."""
    return None


def register_paged_attention() -> str:
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
    return ATTN_IMPLEMENTATION
