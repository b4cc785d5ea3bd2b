"""Loading one rank's shard of a model with transformers' tensor-parallel plan, and refusing clearly what cannot
be split. The process group must exist before loading (runner/parallel starts it)."""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from nitro_torch.config import ConfigError


def check_splittable(path: str, size: int) -> None:
    """Raise ConfigError naming why the model at `path` cannot be split over `size` ranks."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not has_tensor_parallel_plan(config):
        architecture = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
        raise ConfigError(f"{architecture} has no tensor-parallel plan in transformers; serve it on one device or "
                          "spread its layers with --device-map auto")
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    for name, count in (("attention heads", heads), ("KV heads", kv_heads)):
        if count % size:
            raise ConfigError(f"the model has {count} {name}, which do not divide by --tensor-parallel-size {size}")


def has_tensor_parallel_plan(config: PretrainedConfig) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "base_model_tp_plan", None):
        return True
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)  # type: ignore[attr-defined]
    return bool(getattr(model_class, "_tp_plan", None))


def tensor_parallel_arguments(size: int) -> dict[str, object]:
    """from_pretrained's arguments for a shard of a model split over `size` ranks (transformers >= 5.18 takes a
    DistributedConfig, 5.17 a tp_plan); transformers binds the rank's GPU from LOCAL_RANK, which RankGroup.join set."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        DistributedConfig = None  # type: ignore[assignment,misc]  # noqa: N806
    if DistributedConfig is not None and "tp_size" in {f.name for f in dataclasses.fields(DistributedConfig)}:
        return {"distributed_config": DistributedConfig(tp_size=size)}
    return {"tp_plan": "auto", "tp_size": size}


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly distributed) tensor."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def local_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers this rank holds (its shards, not the global sizes)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(local_tensor(t).numel() * t.element_size() for t in tensors)
