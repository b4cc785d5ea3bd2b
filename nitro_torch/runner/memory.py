"""How many KV blocks fit: on CUDA, what --gpu-memory-utilization leaves after the weights and the activations
of the largest step (measured by running it once); on CPU, --kv-cache-memory GiB."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from nitro_torch.config import Config
from nitro_torch.runner.attention import AttentionMetadata, PrefillChunk, step_context
from nitro_torch.runner.guided import logits_vocab_size
from nitro_torch.runner.kv_cache import GIB, KVCache, KVLayout, attention_layer_devices

if TYPE_CHECKING:
    from nitro_torch.runner.parallel.group import RankGroup

logger = logging.getLogger("nitro_torch.runner")

SAMPLER_COPIES = 4
"""float32 [rows, vocab] tensors the sampler may hold at once (scores, probabilities, noise, a sort)."""


def warmup_chunks(num_tokens: int, max_model_len: int) -> list[int]:
    """Lengths of the prefill chunks of the heaviest step: num_tokens tokens in sequences of <= max_model_len."""
    chunks = [max_model_len] * (num_tokens // max_model_len)
    if num_tokens % max_model_len:
        chunks.append(num_tokens % max_model_len)
    return chunks


@torch.inference_mode()
def run_largest_step(model: PreTrainedModel, device: torch.device, num_tokens: int, num_seqs: int,
                     max_model_len: int, vocab_size: int) -> None:
    """One forward of `num_tokens` packed tokens keeping `num_seqs` logits rows, as the heaviest step would.

    It runs cache-free (each chunk attends to its own K/V), since no KV cache exists yet.
    """
    lengths = warmup_chunks(num_tokens, max_model_len)
    chunks, start = [], 0
    no_blocks = torch.empty(0, dtype=torch.long, device=device)
    for length in lengths:
        chunks.append(PrefillChunk(start, length, length, no_blocks))
        start += length
    empty_cache = KVCache(KVLayout(0, 1, 1, 1, torch.float32), 0, device)
    metadata = AttentionMetadata(kv_cache=empty_cache, slot_mapping=no_blocks, prefills=chunks, write_kv=False)
    input_ids = torch.zeros(1, num_tokens, dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    rows = min(num_seqs, num_tokens)
    keep = torch.arange(num_tokens - rows, num_tokens, device=device)
    with step_context(metadata):
        logits = model(input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=keep).logits
    scratch = [torch.empty(rows, vocab_size, dtype=torch.float32, device=device) for _ in range(SAMPLER_COPIES)]
    del logits, scratch


def gpu_kv_budgets(model: PreTrainedModel, devices: list[torch.device], utilization: float, num_tokens: int,
                   num_seqs: int, max_model_len: int, vocab_size: int) -> dict[torch.device, int]:
    """Per GPU: total x utilization - memory in use now (weights, other processes) - the largest step's
    activation peak there. One device normally; each device a model spread with --device-map auto uses."""
    devices = list(dict.fromkeys(devices))
    resting = {}
    for device in devices:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resting[device] = torch.cuda.memory_allocated(device)
    torch.cuda.empty_cache()
    run_largest_step(model, devices[0], num_tokens, num_seqs, max_model_len, vocab_size)
    budgets = {}
    for device in devices:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - resting[device]
        with torch.cuda.device(device):
            torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        in_use = total - free
        budgets[device] = int(total * utilization - in_use - peak)
        logger.info("GPU memory on %s: %.1f GiB total, %.1f GiB in use after loading, %.2f GiB activation peak of "
                    "the largest step (%d tokens); KV budget %.1f GiB at utilization %.2f", device, total / GIB,
                    in_use / GIB, peak / GIB, num_tokens, budgets[device] / GIB, utilization)
    return budgets


def blocks_for_budgets(layout: KVLayout, budgets: dict[torch.device, int], layer_devices: list[torch.device]) -> int:
    """The block count every device can hold for the layers it carries."""
    per_layer_block = layout.bytes_per_block // layout.num_layers
    return min(max(0, budget) // (per_layer_block * layer_devices.count(device))
               for device, budget in budgets.items())


def num_kv_blocks(model: PreTrainedModel, layout: KVLayout, layer_devices: list[torch.device], config: Config,
                  max_model_len: int, num_ranks: int = 1) -> int:
    """The KV blocks this rank can hold: --num-kv-blocks, else what the GPU budget leaves, else its share of
    --kv-cache-memory on the CPU (the ranks of a tensor-parallel model split the budget: each holds 1/N of the KV
    heads, so N ranks hold the same blocks as one would)."""
    cache, sched = config.cache, config.scheduler
    if cache.num_kv_blocks:
        return cache.num_kv_blocks
    if layer_devices[0].type == "cuda":
        budgets = gpu_kv_budgets(model, layer_devices, cache.gpu_memory_utilization, sched.max_num_batched_tokens,
                                 sched.max_num_seqs, max_model_len, logits_vocab_size(model))
        blocks = blocks_for_budgets(layout, budgets, layer_devices)
    else:
        blocks = layout.blocks_for_bytes(int(cache.kv_cache_memory * GIB / num_ranks))
    if blocks < 1:
        raise RuntimeError("no memory left for the KV cache; lower the model size or raise the budget")
    return blocks


def kv_cache_dtype(choice: str, model_dtype: torch.dtype, device: torch.device, packed_weights: bool) -> torch.dtype:
    """--kv-cache-dtype: `auto` is the model's dtype, except float16 for a float32 model whose packed CPU weights
    round their activations to bfloat16 anyway: attention there is bound by the bytes of K/V it reads."""
    if choice != "auto":
        return getattr(torch, choice)  # type: ignore[no-any-return]  # one of the config's dtype names
    if device.type == "cpu" and packed_weights and model_dtype == torch.float32:
        return torch.float16
    return model_dtype


def build_kv_cache(model: PreTrainedModel, device: torch.device, dtype: torch.dtype, max_model_len: int,
                   config: Config, ranks: RankGroup | None = None) -> KVCache:
    """The paged KV cache of this process's model: each layer's K/V where that layer lives (--device-map auto), of
    its rank's KV heads under tensor parallelism (the ranks agree on the block count)."""
    num_ranks = ranks.world_size if ranks is not None else 1
    layout = KVLayout.from_model_config(model.config, config.cache.block_size, dtype, num_ranks)
    layer_devices = attention_layer_devices(model, layout.num_layers) if config.model.device_map == "auto" else None
    blocks = num_kv_blocks(model, layout, layer_devices or [device] * layout.num_layers, config, max_model_len,
                           num_ranks)
    if ranks is not None:
        blocks = ranks.agree_min(blocks)
    return KVCache(layout, blocks, device, layer_devices)


def describe_capacity(num_blocks: int, block_size: int, max_model_len: int, max_num_seqs: int) -> str:
    tokens = num_blocks * block_size
    full_context = tokens // max_model_len
    blocks_per_1k = -(-1000 // block_size)
    return (f"{tokens} tokens: {full_context} requests at the full {max_model_len}-token context, or "
            f"{num_blocks // blocks_per_1k} of 1000 tokens, at once (max_num_seqs {max_num_seqs})")
