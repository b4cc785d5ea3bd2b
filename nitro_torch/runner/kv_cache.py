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
    def from_model_config(cls, config: PretrainedConfig, block_size: int, dtype: torch.dtype,
                          num_ranks: int = 1) -> KVLayout:
        """`num_ranks`: the layout of one rank of a tensor-parallel model, which holds 1/N of the KV heads."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        num_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
        return cls(text.num_hidden_layers, num_kv_heads // num_ranks, head_dim, block_size, dtype)

    @property
    def bytes_per_block(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element

    def blocks_for_bytes(self, budget_bytes: int) -> int:
        return max(0, budget_bytes // self.bytes_per_block)


class KVCache:
    """`num_blocks` blocks for requests, plus one spare block at the end that takes the writes of padding
    tokens (CUDA-graph batches) so that the store never needs a host-side filter."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device,
                 layer_devices: list[torch.device] | None = None) -> None:
        """`layer_devices`: where each layer's K/V live when the model is spread over GPUs (default: `device`)."""
        shape = (num_blocks + 1, layout.block_size, layout.num_kv_heads, layout.head_dim)
        self.layout = layout
        self.num_blocks = num_blocks
        self.layer_devices = layer_devices or [torch.device(device)] * layout.num_layers
        self.keys = [torch.zeros(shape, dtype=layout.dtype, device=d) for d in self.layer_devices]
        self.values = [torch.zeros(shape, dtype=layout.dtype, device=d) for d in self.layer_devices]
        self._gather_buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def gather(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `block_ids` (flat) as [n, block_size, kv_heads, head_dim], copied into reused buffers.

        Every layer gathers the same amount, so fresh multi-MB tensors per layer would mostly cost page
        faults; the buffers (one pair per device) grow to the largest step seen and are overwritten by the
        next gather.
        """
        k_cache, v_cache = self.keys[layer], self.values[layer]
        rows = k_cache.view(k_cache.shape[0], -1)
        n, width = block_ids.numel(), rows.shape[1]
        buffers = self._gather_buffers.get(k_cache.device)
        if buffers is None or buffers[0].numel() < n * width:
            buffers = (torch.empty(n * width, dtype=rows.dtype, device=rows.device),
                       torch.empty(n * width, dtype=rows.dtype, device=rows.device))
            self._gather_buffers[k_cache.device] = buffers
        gather_k, gather_v = buffers
        shape = (n, *k_cache.shape[1:])
        k = torch.index_select(rows, 0, block_ids, out=gather_k[: n * width].view(n, width))
        v = torch.index_select(v_cache.view(v_cache.shape[0], -1), 0, block_ids,
                               out=gather_v[: n * width].view(n, width))
        return k.view(shape), v.view(shape)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks (source -> destination) in every layer, e.g. a prompt's last block for a fork."""
        if not pairs:
            return
        indices = torch.tensor(pairs, dtype=torch.long).T  # [2, n]: sources, destinations
        on_device: dict[torch.device, torch.Tensor] = {}
        for cache in (*self.keys, *self.values):
            if cache.device not in on_device:
                on_device[cache.device] = indices.to(cache.device)
            sources, destinations = on_device[cache.device]
            cache.index_copy_(0, destinations, cache.index_select(0, sources))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.layout.block_size


def attention_layer_devices(model: torch.nn.Module, num_layers: int) -> list[torch.device] | None:
    """The device of each attention layer (by `layer_idx`) of a model spread over several devices, else None."""
    devices: dict[int, torch.device] = {}
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        if isinstance(layer, int) and layer not in devices:
            parameter = next(module.parameters(), None)
            if parameter is not None:
                devices[layer] = parameter.device
    if len(set(devices.values())) <= 1 or len(devices) != num_layers:
        return None
    return [devices[i] for i in range(num_layers)]
