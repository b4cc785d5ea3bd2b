"""Paged attention plugged into any HF causal LM through transformers' attention interface.

The model runs one packed sequence [1, T] per step with `use_cache=False`; every attention layer hands us
the fresh K/V of all T tokens. We write them into the layer's KV blocks, then attend: the leading tokens
that are single-token steps (decodes) in one batched call over their block tables, each multi-token chunk
(a prefill) with causal attention over its cached prefix plus itself. Per-step metadata reaches the layers
through a step context rather than through every forward signature.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from nitro_torch.runner.kernels import triton_available
from nitro_torch.runner.kv_cache import KVCache

ATTN_IMPLEMENTATION = "nitro_paged"
Backend = Literal["auto", "triton", "torch"]


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
    prefill_block_tables: torch.Tensor | None = None
    """The chunks' block tables [N, W], cumulative query lengths [N + 1] and context lengths [N] on the device,
    for the varlen prefill kernel; `prefills` holds the same per chunk for the torch path."""
    prefill_cu_query_lens: torch.Tensor | None = None
    prefill_context_lens: torch.Tensor | None = None
    prefill_tiles: tuple[torch.Tensor, torch.Tensor] | None = None
    """The prefill kernel's query-tile map, made by the first layer and reused by the others."""
    write_kv: bool = True
    """False for cache-free forwards (embeddings): every chunk is a whole sequence attending to its own K/V."""
    single_decode_len: int | None = None
    """The context length of the only row of a one-request decode step (known on the host): the torch path then
    attends to exactly that many gathered keys, with no mask."""
    single_decode_slot: int | None = None
    """The cache slot of the step's token when the step is that one decode token alone (a single user): the torch
    path writes its K/V row there directly."""
    single_decode_first_block: int | None = None
    """That row's first block, when its blocks follow each other in the cache: its keys are then read where they
    are, with no gather copy (a request alone on a fresh server usually gets such a run)."""
    store_slots: torch.Tensor | None = None
    decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    """The torch path's per-step tensors (KV store slots; decode key masks by sliding window), made by the first
    layer that needs them and dropped when a step context opens (decode graphs reuse their metadata)."""
    _copies: dict[torch.device, AttentionMetadata] = field(default_factory=dict, repr=False)

    def on(self, device: torch.device) -> AttentionMetadata:
        """This step's metadata with its tensors on `device`: a model spread over GPUs (--device-map auto) runs
        layers on several devices; each gets one copy per step, made by its first layer."""
        if self.slot_mapping.device == device:
            return self
        copy = self._copies.get(device)
        if copy is None:
            def moved(tensor: torch.Tensor | None) -> torch.Tensor | None:
                return None if tensor is None else tensor.to(device)

            copy = dataclasses.replace(
                self, slot_mapping=self.slot_mapping.to(device), decode_block_tables=moved(self.decode_block_tables),
                decode_context_lens=moved(self.decode_context_lens),
                prefills=[dataclasses.replace(c, block_table=c.block_table.to(device)) for c in self.prefills],
                prefill_block_tables=moved(self.prefill_block_tables),
                prefill_cu_query_lens=moved(self.prefill_cu_query_lens),
                prefill_context_lens=moved(self.prefill_context_lens), prefill_tiles=None, store_slots=None,
                decode_masks={}, _copies={},
            )
            self._copies[device] = copy
        return copy


class _StepState(threading.local):
    """Per thread: a decode step compiled in the background runs its warm-up step beside the engine's steps."""

    current: AttentionMetadata | None = None


_step = _StepState()


@contextlib.contextmanager
def step_context(metadata: AttentionMetadata) -> Iterator[None]:
    metadata.store_slots = None
    metadata.decode_masks = {}
    previous, _step.current = _step.current, metadata
    try:
        yield
    finally:
        _step.current = previous


_backend: Backend = "auto"


def set_attention_backend(backend: Backend) -> None:
    """'auto': Triton kernels on CUDA, torch elsewhere; 'triton' forces the kernels (Triton's interpreter on CPU)."""
    global _backend
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown attention backend {backend!r}")
    _backend = backend


def _uses_kernels(tensor: torch.Tensor) -> bool:
    if _backend == "torch":
        return False
    if _backend == "triton":
        return True
    return tensor.is_cuda and triton_available()


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter K/V [T, KV, D] into the blocks at flat slot = block_id * block_size + offset."""
    store_at_slots(k_cache, v_cache, key, value, storable_slots(slot_mapping, k_cache))


def storable_slots(slot_mapping: torch.Tensor, k_cache: torch.Tensor) -> torch.Tensor:
    """Padding rows (slot < 0) go to the spare last block of the cache tensors, which no request owns: a
    `torch.where` rather than a filter, so the store stays free of host syncs (and capturable)."""
    spare_slot = (k_cache.shape[0] - 1) * k_cache.shape[1]
    return torch.where(slot_mapping < 0, spare_slot, slot_mapping)


def store_at_slots(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   slots: torch.Tensor) -> None:
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value)


def paged_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    mask: torch.Tensor | None = None,
    all_keys: bool = False,
) -> torch.Tensor:
    """One query token per request [R, H, D] against its gathered blocks [R, L, KV, D] (L >= context); `mask`:
    `decode_key_mask` of the same arguments, when the caller has it already; `all_keys`: every gathered key is
    in every row's context (no mask; not with softcap).

    The query heads of one KV head form the "sequence" axis of a non-causal SDPA call, so grouped
    queries share one read of their K/V and no repeat_interleave copy is made.
    """
    num_reqs, num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[2]
    keys = keys.transpose(1, 2)  # [R, KV, L, D]
    values = values.transpose(1, 2)
    grouped = query.view(num_reqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    if mask is None and not all_keys:
        mask = decode_key_mask(context_lens, keys.shape[2], sliding_window)
    if softcap:
        assert mask is not None, "softcapped attention needs the key mask"
        out = _softcapped_attention(grouped, keys, values, mask, scale, softcap)
    else:
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(num_reqs, num_heads, head_dim)


def decode_key_mask(context_lens: torch.Tensor, num_keys: int, sliding_window: int | None) -> torch.Tensor:
    """[R, 1, 1, L]: which gathered keys each decode row attends to."""
    positions = torch.arange(num_keys, device=context_lens.device)
    context_lens = context_lens.clamp(min=1)  # padding rows (length 0) attend one slot rather than yield NaN
    valid = positions[None, :] < context_lens[:, None]
    if sliding_window:
        valid &= positions[None, :] >= (context_lens[:, None] - sliding_window)
    return valid[:, None, None, :]


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
        assert mask is not None  # built above whenever softcap is set
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
    current = _step.current
    if current is None:
        raise RuntimeError("nitro_paged attention called outside an engine step")
    meta = current.on(query.device)
    layer: int = module.layer_idx  # type: ignore[assignment]  # torch types Module attributes as Tensor | Module
    q = query[0].transpose(0, 1)  # [T, H, D]
    k = key[0].transpose(0, 1)  # [T, KV, D]
    v = value[0].transpose(0, 1)
    cache_dtype = meta.kv_cache.layout.dtype
    if meta.write_kv and q.dtype != cache_dtype:  # --kv-cache-dtype: attend in the cache's dtype, fresh K/V too
        q, k, v = q.to(cache_dtype), k.to(cache_dtype), v.to(cache_dtype)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if _uses_kernels(q):
        out = _attend_with_kernels(meta, layer, q, k, v, scale, sliding_window, softcap)
    else:
        out = _attend_with_torch(meta, layer, q, k, v, scale, sliding_window, softcap)
    return out.to(query.dtype).unsqueeze(0), None


def _attend_with_torch(meta: AttentionMetadata, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float, sliding_window: int | None, softcap: float | None) -> torch.Tensor:
    if meta.write_kv:
        k_cache, v_cache = meta.kv_cache.keys[layer], meta.kv_cache.values[layer]
        if meta.single_decode_slot is not None:  # one token: a plain row write, no slot tensor to build
            k_cache.view(-1, *k_cache.shape[2:])[meta.single_decode_slot] = k[0]
            v_cache.view(-1, *v_cache.shape[2:])[meta.single_decode_slot] = v[0]
        else:
            if meta.store_slots is None:
                meta.store_slots = storable_slots(meta.slot_mapping, k_cache)
            store_at_slots(k_cache, v_cache, k, v, meta.store_slots)
    nd = meta.num_decode_tokens
    decoded = _decode_with_torch(meta, layer, q[:nd], scale, sliding_window, softcap) if nd else None
    if decoded is not None and not meta.prefills:
        return decoded
    out = torch.empty_like(q)
    if decoded is not None:
        out[:nd] = decoded
    for chunk in meta.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        if chunk.context_len == chunk.query_len:
            keys, values = k[rows], v[rows]
        else:
            keys, values = meta.kv_cache.gather(layer, chunk.block_table)
            keys = keys.flatten(0, 1)[: chunk.context_len]
            values = values.flatten(0, 1)[: chunk.context_len]
        out[rows] = prefill_attention(q[rows], keys, values, scale, sliding_window, softcap)
    return out


def _decode_with_torch(meta: AttentionMetadata, layer: int, q: torch.Tensor, scale: float,
                       sliding_window: int | None, softcap: float | None) -> torch.Tensor:
    tables, context_lens = meta.decode_block_tables, meta.decode_context_lens
    assert tables is not None and context_lens is not None  # set whenever there are decode rows
    length = meta.single_decode_len
    if length is not None and not softcap:
        start = max(0, length - sliding_window) if sliding_window else 0
        keys, values = _single_row_keys(meta, layer, tables)
        return paged_decode_attention(q, keys[:, start:length], values[:, start:length], context_lens, scale,
                                      all_keys=True)
    keys, values = meta.kv_cache.gather(layer, tables.flatten())
    num_reqs = tables.shape[0]
    keys, values = keys.view(num_reqs, -1, *keys.shape[2:]), values.view(num_reqs, -1, *values.shape[2:])
    mask = meta.decode_masks.get(sliding_window)
    if mask is None:
        mask = meta.decode_masks[sliding_window] = decode_key_mask(context_lens, keys.shape[1], sliding_window)
    return paged_decode_attention(q, keys, values, context_lens, scale, sliding_window, softcap, mask=mask)


def _single_row_keys(meta: AttentionMetadata, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lone decode row's K and V [1, L, KV, D] (L: its blocks' slots): a view of the cache when its blocks
    are consecutive, else gathered."""
    first = meta.single_decode_first_block
    if first is None:
        keys, values = meta.kv_cache.gather(layer, tables.flatten())
    else:
        k_cache, v_cache = meta.kv_cache.keys[layer], meta.kv_cache.values[layer]
        keys, values = k_cache[first: first + tables.shape[1]], v_cache[first: first + tables.shape[1]]
    return keys.flatten(0, 1)[None], values.flatten(0, 1)[None]


def _attend_with_kernels(meta: AttentionMetadata, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float, sliding_window: int | None, softcap: float | None) -> torch.Tensor:
    """Triton: the KV store, then paged decode over the leading decode rows and one varlen prefill launch over
    all chunks, both reading K/V through block tables (so cached prefixes cost no gather copy)."""
    if not meta.write_kv:  # cache-free forwards attend to their own K/V, which are not in the cache
        return _attend_with_torch(meta, layer, q, k, v, scale, sliding_window, softcap)
    # Triton launches on the current device, which must be the layer's when the model spans several GPUs.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        return _launch_kernels(meta, layer, q, k, v, scale, sliding_window, softcap)


def _launch_kernels(meta: AttentionMetadata, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float, sliding_window: int | None, softcap: float | None) -> torch.Tensor:
    from nitro_torch.runner.kernels import paged_decode_triton, prefill_paged_triton, store_kv_triton
    from nitro_torch.runner.kernels.prefill import query_tiles

    k_cache, v_cache = meta.kv_cache.keys[layer], meta.kv_cache.values[layer]
    store_kv_triton(k_cache, v_cache, k, v, meta.slot_mapping)
    nd = meta.num_decode_tokens
    decode_out: torch.Tensor | None = None
    prefill_out: torch.Tensor | None = None
    if nd:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        decode_out = paged_decode_triton(q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                         meta.decode_context_lens, scale, sliding_window, softcap)
    if meta.prefills:
        assert meta.prefill_block_tables is not None and meta.prefill_cu_query_lens is not None
        assert meta.prefill_context_lens is not None  # the model runner fills these with the chunks
        if meta.prefill_tiles is None:
            meta.prefill_tiles = query_tiles(meta.prefill_cu_query_lens, q.shape[0] - nd)
        prefill_out = prefill_paged_triton(q[nd:], k_cache, v_cache, meta.prefill_block_tables,
                                           meta.prefill_cu_query_lens, meta.prefill_context_lens, scale,
                                           sliding_window, softcap, meta.prefill_tiles)
    if prefill_out is None:
        assert decode_out is not None  # a step has decode rows, prefill chunks or both
        return decode_out
    if decode_out is None:
        return prefill_out
    return torch.cat([decode_out, prefill_out])


def _no_mask(*args: object, **kwargs: object) -> None:
    """Block tables replace the dense mask; returning None stops HF from building a [T, T] mask."""
    return None


def register_paged_attention() -> str:
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
    return ATTN_IMPLEMENTATION
