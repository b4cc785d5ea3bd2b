"""Bringing a model up for a core in two phases, so a model switch can keep the old model serving while the new
one loads: `stage_weights` (weights + tokenizer, on the CPU when the target is a GPU) and `place_on_device`.
Both the in-process core and the core process use them."""

from __future__ import annotations

import dataclasses
import gc

import torch

from nitro_torch.config import Config, ModelConfig
from nitro_torch.models.loader import LoadedModel, load_model, resolve_device, resolve_dtype
from nitro_torch.runner.attention import register_paged_attention


def stage_weights(config: Config, cpu_threads: int | None = None) -> LoadedModel:
    """Model + tokenizer in the target dtype, on the CPU when the target is a GPU (moved in place_on_device).

    bitsandbytes weights load straight onto the GPU: they are quantized where they load, which on the CPU
    would take minutes, so a switch to such a model needs room for both models for a moment. A model spread
    over GPUs (--device-map auto) is placed by accelerate as it loads, so it too loads where it will run.
    """
    if config.model.tensor_parallel_size > 1:
        return load_tensor_parallel(config, cpu_threads)
    device = resolve_device(config.model.device)
    if device.type != "cpu" and (config.model.device_map == "auto" or uses_bitsandbytes(config.model)):
        return load_model(config.model, attn_implementation=register_paged_attention())
    dtype = str(resolve_dtype(config.model.dtype, device)).removeprefix("torch.")
    staging = dataclasses.replace(config.model, device="cpu", dtype=dtype)  # type: ignore[arg-type]
    return load_model(staging, attn_implementation=register_paged_attention())


def load_tensor_parallel(config: Config, cpu_threads: int | None = None) -> LoadedModel:
    """Rank 0's shard, on its device, after the worker ranks started (each loads its own shard meanwhile). The model
    is resolved (downloaded, converted) and checked for a split here first, so a refusal is rank 0's clear error."""
    from nitro_torch.models.loader import resolve_model_source
    from nitro_torch.models.tensor_parallel import check_splittable
    from nitro_torch.runner.parallel.group import start_ranks

    path = resolve_model_source(config.model.model, config.model.model_cache_dir, config.model.hf_token_file)[0]
    check_splittable(path, config.model.tensor_parallel_size)
    ranks = start_ranks(config, cpu_threads)
    try:
        return load_model(config.model, attn_implementation=register_paged_attention())
    except BaseException:
        ranks.close()
        raise


def uses_bitsandbytes(model: ModelConfig) -> bool:
    from nitro_torch.models.loader import resolve_model_source
    from nitro_torch.models.quantization import checkpoint_quantization

    if model.quantization != "none":
        return True
    return checkpoint_quantization(resolve_model_source(model.model, model.model_cache_dir)[0]) is not None


def place_on_device(loaded: LoadedModel, config: Config, cpu_threads: int | None = None) -> LoadedModel:
    if cpu_threads is not None and config.model.tensor_parallel_size == 1:  # the ranks share them out (group.py)
        torch.set_num_threads(cpu_threads)  # process-wide: it is the process's one model
    device = resolve_device(config.model.device)
    if device != loaded.device and config.model.tensor_parallel_size == 1:  # a rank's shard loads on its device
        loaded.model.to(device)  # type: ignore[arg-type]
        loaded.device = device
    return loaded


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
