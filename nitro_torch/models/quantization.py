"""--quantization: bitsandbytes 4/8-bit weights quantized at load, and checkpoints saved already quantized."""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import BitsAndBytesConfig, PreTrainedModel

from nitro_torch.config import ConfigError, ModelConfig

logger = logging.getLogger("nitro_torch.models")

BNB_METHOD = "bitsandbytes"
# bitsandbytes' int8 matmul logs this on every call when activations are not float16.
_INT8_CAST_WARNING = "MatMul8bitLt: inputs will be cast"


@dataclass(frozen=True)
class QuantizationPlan:
    """How to load one checkpoint: `config` goes to from_pretrained (None: plain or already quantized)."""

    config: BitsAndBytesConfig | None
    description: str  # "none", "bnb-4bit nf4", "bnb-8bit", "bnb-4bit nf4 (pre-quantized checkpoint)"
    bitsandbytes: bool = False  # bnb quantizes as it places weights: load onto the device with device_map


def plan_quantization(config: ModelConfig, path: str, dtype: torch.dtype, device: torch.device) -> QuantizationPlan:
    """Decide from --quantization and the checkpoint's own quantization_config; conflicts are a ConfigError."""
    saved = checkpoint_quantization(path)
    if saved is not None:
        return _plan_saved(config, path, saved)
    if config.quantization == "none":
        return QuantizationPlan(None, "none")
    _require_bitsandbytes(config.quantization)
    quiet_int8_cast_warning()
    bnb_config = bnb_config_for(config, dtype, device)
    return QuantizationPlan(bnb_config, describe_bnb(bnb_config), bitsandbytes=True)


def _plan_saved(config: ModelConfig, path: str, saved: dict[str, Any]) -> QuantizationPlan:
    kind, description = saved_kind(saved), describe_saved(saved)
    if config.quantization not in ("none", kind):
        raise ConfigError(
            f"--quantization {config.quantization} conflicts with {path}: that checkpoint is already quantized "
            f"as {description}; leave --quantization at none to load it as it is"
        )
    if kind == "bnb-4bit" and config.quantization == kind and description != f"{kind} {config.bnb_4bit_quant_type}":
        logger.warning("%s is saved as %s; --bnb-4bit-quant-type %s is ignored", path, description,
                       config.bnb_4bit_quant_type)
    is_bnb = saved.get("quant_method") == BNB_METHOD
    if is_bnb:
        _require_bitsandbytes(description)
        quiet_int8_cast_warning()
    return QuantizationPlan(None, f"{description} (pre-quantized checkpoint)", bitsandbytes=is_bnb)


def bnb_config_for(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> BitsAndBytesConfig:
    if config.quantization == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if config.quantization == "bnb-4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(dtype, device),
        )
    raise ConfigError(f"no bitsandbytes config for quantization {config.quantization!r}")


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """bf16 on CUDA (bnb's fast 4-bit kernels); elsewhere the model's dtype, so CPU matmuls stay float32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return dtype


def checkpoint_quantization(path: str) -> dict[str, Any] | None:
    """The `quantization_config` a checkpoint was saved with, if any."""
    config_file = Path(path) / "config.json"
    try:
        saved = json.loads(config_file.read_text()).get("quantization_config")
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def saved_kind(saved: dict[str, Any]) -> str:
    """'bnb-4bit' / 'bnb-8bit' for bitsandbytes checkpoints (the --quantization names), else the quant_method."""
    method = str(saved.get("quant_method", "unknown"))
    if method != BNB_METHOD:
        return method
    if saved.get("load_in_4bit") or saved.get("_load_in_4bit"):
        return "bnb-4bit"
    if saved.get("load_in_8bit") or saved.get("_load_in_8bit"):
        return "bnb-8bit"
    return method


def describe_saved(saved: dict[str, Any]) -> str:
    kind = saved_kind(saved)
    return f"{kind} {saved.get('bnb_4bit_quant_type', 'fp4')}" if kind == "bnb-4bit" else kind


def describe_bnb(bnb_config: BitsAndBytesConfig) -> str:
    if bnb_config.load_in_4bit:
        return f"bnb-4bit {bnb_config.bnb_4bit_quant_type}"
    return "bnb-8bit"


def activation_dtype(model: PreTrainedModel, fallback: torch.dtype) -> torch.dtype:
    """The float dtype hidden states (and so the KV cache) have; quantized weights are uint8/int8."""
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.is_floating_point():
        return weight.dtype
    floats = (p.dtype for p in model.parameters() if p.is_floating_point())
    return next(floats, fallback)


def quiet_int8_cast_warning() -> None:
    target = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in target.filters):
        target.addFilter(_DropInt8CastWarning())


class _DropInt8CastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_INT8_CAST_WARNING)


def _require_bitsandbytes(what: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{what} needs bitsandbytes: pip install 'nitro_torch[quant]' (or bitsandbytes)")
