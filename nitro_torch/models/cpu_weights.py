"""--cpu-weights: swap a loaded model's linear layers for packed int4 / int8 ones on the CPU (gpt-fast's module swap).

- `auto`: a model from a GGUF file runs its linear layers from the file's own 4-bit (or 8-bit) blocks, unchanged
  (`gguf_quants`); any other model keeps its float weights.
- `int4`: the same for a GGUF file; layers without such blocks (and every layer of other models) are quantized to
  4-bit groups of 32 at load.
- `int8`: every linear layer quantized to int8 per output channel at load.
- `fp32`: the float weights as loaded (the only token-identical mode against transformers).

Every packed mode computes its matmuls with bfloat16 activations (packed_linear.py says why), so none is
token-identical to float32; the start-up block says so.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from nitro_torch.config import ConfigError
from nitro_torch.models.gguf_index import read_gguf_index
from nitro_torch.models.gguf_quants import Int4Groups, int4_parts
from nitro_torch.models.packed_linear import Int4Linear, Int8Linear, int4_packable, quantize_int4
from nitro_torch.models.tied_head import FLOAT_MIN_ROWS, tied_embedding_of, tied_packed_head

logger = logging.getLogger("nitro_torch.models")

CPU_WEIGHT_MODES = ("auto", "fp32", "int8", "int4")


@dataclass(frozen=True)
class PackedWeights:
    mode: str  # what ran: "fp32", "int4", "int8"
    description: str  # for the start-up block, e.g. "int4 (GGUF Q4_1 blocks as stored; 211 layers)"

    @property
    def exact(self) -> bool:
        return self.mode == "fp32"


FP32 = PackedWeights("fp32", "float weights as loaded")


def pack_cpu_weights(model: PreTrainedModel, mode: str, device: torch.device, gguf_path: Path | None,
                     quantization: str) -> PackedWeights:
    """Swap the model's linear layers in place as `mode` asks; the float weights they replace are freed."""
    if mode not in CPU_WEIGHT_MODES:
        raise ConfigError(f"unknown --cpu-weights {mode!r}; choose one of {', '.join(CPU_WEIGHT_MODES)}")
    if mode in ("int4", "int8") and (device.type != "cpu" or quantization != "none"):
        raise ConfigError(f"--cpu-weights {mode} packs float weights for the CPU: it needs --device cpu and "
                          "--quantization none")
    if device.type != "cpu" or quantization != "none" or mode == "fp32" or (mode == "auto" and gguf_path is None):
        return FP32
    tied_embedding = tied_embedding_of(model)
    if mode == "int8":
        count = _swap_all(model, lambda linear: Int8Linear(linear.weight, linear.bias))
        return PackedWeights("int8", f"int8 per channel, quantized at load ({count} layers"
                            f"{_batched_head(model, tied_embedding)})")
    blocks = _gguf_blocks(model, gguf_path) if gguf_path is not None else {}
    kinds: Counter[str] = Counter()
    for name, linear in _linear_layers(model):
        if not int4_packable(linear.out_features, linear.in_features):
            continue
        found = blocks.get(name)
        if found is not None:
            source, parts = f"GGUF {found[0]}", found[1]
        elif mode == "int4":
            source, parts = "quantized at load", [quantize_int4(linear.weight)]
        else:
            continue
        kinds[source] += 1
        _replace(model, name, Int4Linear.from_groups(parts, linear.bias))
    if not kinds:
        return FP32
    return PackedWeights("int4", "int4 groups of 32 (" + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
                         + f" layers; bf16 activations{_batched_head(model, tied_embedding)})")


def _batched_head(model: nn.Module, tied_embedding: nn.Embedding | None) -> str:
    """Put the tied head on its float32 weight for batches (tied_head.py); what the start-up block says of it."""
    head = tied_packed_head(model, tied_embedding)
    if head is None:
        return ""
    _replace(model, "lm_head", head)
    return f"; the tied LM head in float32 from {FLOAT_MIN_ROWS} rows"


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]


def _swap_all(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    layers = _linear_layers(model)
    for name, linear in layers:
        _replace(model, name, make(linear))
    return len(layers)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _gguf_blocks(model: PreTrainedModel, gguf_path: Path) -> dict[str, tuple[str, list[Int4Groups]]]:
    """For each linear layer of `model` whose weight the GGUF file holds in a block format torch can compute in
    4 bits: (format name, parts), with rows in the model's order. Each is checked against the float weight that
    transformers de-quantized from the same blocks; one that differs is skipped (with a warning)."""
    import gguf

    index = read_gguf_index(gguf_path)
    by_name = {value: key for key, value in gguf.MODEL_ARCH_NAMES.items()}
    if index.architecture not in by_name:
        return {}
    config = model.config.get_text_config()
    name_map = gguf.get_tensor_name_map(by_name[index.architecture], config.num_hidden_layers)
    found: dict[str, tuple[str, list[Int4Groups]]] = {}
    for name, linear in _linear_layers(model):
        tensor = index.tensors.get(f"{name_map.get_name(name)}.weight")
        if tensor is None and name == "lm_head" and getattr(config, "tie_word_embeddings", False):
            tensor = index.tensors.get(f"{name_map.get_name('model.embed_tokens')}.weight")
        if tensor is None or tensor.rows != linear.out_features:
            continue
        parts = int4_parts(tensor.kind, tensor.raw, linear.in_features)
        if parts is None:
            continue
        ordered = _match_rows(parts, linear.weight, config)
        if ordered is None:
            logger.warning("%s: the GGUF blocks of %s do not match its de-quantized weight; it stays float",
                           gguf_path.name, name)
            continue
        found[name] = (tensor.kind.name, ordered)
    return found


def _match_rows(parts: list[Int4Groups], weight: torch.Tensor, config: object) -> list[Int4Groups] | None:
    """The parts with rows in the model's order: as stored, or un-permuted the way transformers un-permutes llama's
    q/k rows for rotary embeddings (per attention head, or per KV head). Compared on a sample of rows that spans
    every head: a wrong order or format differs on almost every row."""
    rows = weight.shape[0]
    sample = np.unique(np.concatenate([np.arange(min(rows, 256)), np.linspace(0, rows - 1, 64).astype(np.int64)]))
    expected = weight.detach()[torch.from_numpy(sample)].float().numpy()
    orders = [np.arange(rows)]
    for heads in {getattr(config, "num_attention_heads", 0), getattr(config, "num_key_value_heads", 0)}:
        if heads and rows % (2 * heads) == 0:
            orders.append(np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(rows))
    tolerance = 1e-6 * float(np.abs(expected).max() or 1.0)
    for order in orders:
        picked = [part.take_rows(order[sample]) for part in parts]
        if np.allclose(sum(part.dequantize() for part in picked), expected, rtol=0, atol=tolerance):
            return [part.take_rows(order) for part in parts]
    return None
