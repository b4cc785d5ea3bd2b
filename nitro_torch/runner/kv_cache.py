"""The paged KV cache: one K and one V tensor per layer, [num_blocks, block_size, num_kv_heads, head_dim]."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

GIB = 1 << 30


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def from_model_config(cls, config: PretrainedConfig, block_size: int, dtype: torch.dtype) -> "KVLayout":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        num_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
        return cls(text.num_hidden_layers, num_kv_heads, head_dim, block_size, dtype)

    @property
    def bytes_per_block(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element

    def blocks_for_bytes(self, budget_bytes: int) -> int:
        return max(0, budget_bytes // self.bytes_per_block)


class KVCache:
    """`num_blocks` blocks for requests, plus one spare block at the end that takes the writes of padding
    tokens (CUDA-graph batches) so that the store never needs a host-side filter."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device) -> None:
        shape = (num_blocks + 1, layout.block_size, layout.num_kv_heads, layout.head_dim)
        self.layout = layout
        self.num_blocks = num_blocks
        self.keys = [torch.zeros(shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)]
        self.values = [torch.zeros(shape, dtype=layout.dtype, device=device) for _ in range(layout.num_layers)]
        self._gather_k = torch.empty(0, dtype=layout.dtype, device=device)
        self._gather_v = torch.empty(0, dtype=layout.dtype, device=device)

    def gather(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `block_ids` (flat) as [n, block_size, kv_heads, head_dim], copied into reused buffers.

        Every layer gathers the same amount, so fresh multi-MB tensors per layer would mostly cost page
        faults; the buffers grow to the largest step seen and are overwritten by the next gather.
        """
        k_cache, v_cache = self.keys[layer], self.values[layer]
        rows = k_cache.view(k_cache.shape[0], -1)
        n, width = block_ids.numel(), rows.shape[1]
        if self._gather_k.numel() < n * width:
            self._gather_k = torch.empty(n * width, dtype=rows.dtype, device=rows.device)
            self._gather_v = torch.empty(n * width, dtype=rows.dtype, device=rows.device)
        shape = (n, *k_cache.shape[1:])
        k = torch.index_select(rows, 0, block_ids, out=self._gather_k[: n * width].view(n, width))
        v = torch.index_select(v_cache.view(v_cache.shape[0], -1), 0, block_ids,
                               out=self._gather_v[: n * width].view(n, width))
        return k.view(shape), v.view(shape)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks (source -> destination) in every layer, e.g. a prompt's last block for a fork."""
        if not pairs:
            return
        device = self.keys[0].device
        sources = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=device)
        destinations = torch.tensor([d for _, d in pairs], dtype=torch.long, device=device)
        for cache in (*self.keys, *self.values):
            cache.index_copy_(0, destinations, cache.index_select(0, sources))

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.layout.block_size
