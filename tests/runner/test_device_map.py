"""--device-map auto (a model spread over GPUs), checked on CPU where it can be: per-layer KV devices, metadata
moved once per device, block counts from per-device budgets, and the option's own errors. The "meta" device
stands in for a second GPU (shapes and dtypes only)."""

from __future__ import annotations

import pytest
import torch

from nitro_torch.config import ConfigError, build_config
from nitro_torch.models.loader import load_model
from nitro_torch.runner.attention import AttentionMetadata, PrefillChunk
from nitro_torch.runner.kv_cache import KVCache, KVLayout, attention_layer_devices
from nitro_torch.runner.memory import blocks_for_budgets

CPU, OTHER = torch.device("cpu"), torch.device("meta")
LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)


def test_each_layer_keeps_its_kv_on_its_device() -> None:
    cache = KVCache(LAYOUT, num_blocks=6, device=CPU, layer_devices=[CPU, OTHER, OTHER])
    assert [k.device for k in cache.keys] == [CPU, OTHER, OTHER] == [v.device for v in cache.values]
    cache.keys[0][2].fill_(1.0)
    cache.copy_blocks([(2, 5)])  # every device gets its own copy of the indices
    assert cache.keys[0][5].eq(1.0).all() and cache.keys[1].device == OTHER
    k, _ = cache.gather(1, torch.tensor([5, 2], device=OTHER))
    assert k.device == OTHER and k.shape == (2, 4, 2, 8)
    k, _ = cache.gather(0, torch.tensor([5, 2]))
    assert k[0].eq(1.0).all() and k.device == CPU


def test_metadata_moves_once_per_device() -> None:
    cache = KVCache(LAYOUT, num_blocks=6, device=CPU)
    meta = AttentionMetadata(kv_cache=cache, slot_mapping=torch.tensor([3, 9]), num_decode_tokens=1,
                             decode_block_tables=torch.tensor([[0]]), decode_context_lens=torch.tensor([4]),
                             prefills=[PrefillChunk(1, 1, 5, torch.tensor([1, 2]))],
                             prefill_cu_query_lens=torch.tensor([0, 1]))
    assert meta.on(CPU) is meta
    moved = meta.on(OTHER)
    assert moved is meta.on(OTHER)  # made by the first layer on that device, reused by the others
    assert moved.slot_mapping.device == OTHER and moved.decode_block_tables.device == OTHER
    assert moved.prefills[0].block_table.device == OTHER and moved.prefill_cu_query_lens.device == OTHER
    assert moved.prefill_block_tables is None and moved.kv_cache is cache and moved.num_decode_tokens == 1


def test_block_count_is_what_every_device_holds_for_its_layers() -> None:
    per_layer_block = LAYOUT.bytes_per_block // LAYOUT.num_layers
    budgets = {CPU: 100 * per_layer_block, OTHER: 90 * per_layer_block}
    assert blocks_for_budgets(LAYOUT, budgets, [CPU, OTHER, OTHER]) == 45  # two layers share the second budget
    assert blocks_for_budgets(LAYOUT, {CPU: 30 * LAYOUT.bytes_per_block}, [CPU] * 3) == 30
    assert blocks_for_budgets(LAYOUT, {CPU: -5}, [CPU] * 3) == 0


def test_layer_devices_come_from_the_attention_modules(tiny_model_dir: str) -> None:
    loaded = load_model(build_config({"model": tiny_model_dir, "device": "cpu"}, env={}).model)
    assert attention_layer_devices(loaded.model, 2) is None
    loaded.model.model.layers[1].to(OTHER)  # what accelerate's "auto" does across GPUs
    assert attention_layer_devices(loaded.model, 2) == [CPU, OTHER]


def test_device_map_auto_needs_gpus(tiny_model_dir: str) -> None:
    config = build_config({"model": tiny_model_dir, "device": "cpu", "device_map": "auto"}, env={})
    with pytest.raises(ConfigError, match="device-map auto"):
        load_model(config.model)
