"""A lean forward for Llama-family models whose linear layers are packed for the CPU (--cpu-weights int4 / int8).

At batch 1 on a CPU the packed matmuls take about a third of transformers' forward; the rest is Python and small
ops around them. This forward walks the same modules and weights with fewer of both: q/k/v and gate/up each become
one packed matmul, the norms are torch's fused rms_norm, and no masks or output records are built. Attention goes
through the model's registered attention function (the engine's paged attention), exactly as transformers calls it.
It is used only for packed weights (already not token-identical, see cpu_weights.py); float weights keep
transformers' own forward.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from nitro_torch.models.packed_linear import Int4Linear, Int8Linear, concat_int4

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
PACKED = (Int4Linear, Int8Linear)
AttentionFunction = Callable[..., tuple[torch.Tensor, Any]]
"""transformers' attention interface: (module, q, k, v, mask, scaling=, sliding_window=) -> (out, weights)."""


@dataclass
class LeanOutput:
    logits: torch.Tensor  # [1, rows, vocab], like transformers' CausalLMOutput.logits


@dataclass
class LeanLayer:
    attention: nn.Module
    input_norm: _Norm
    post_attention_norm: _Norm
    qkv: nn.Module
    qkv_sizes: list[int]
    q_norm: _Norm | None
    k_norm: _Norm | None
    o_proj: nn.Module
    gate_up: nn.Module
    down: nn.Module
    act: nn.Module
    sliding_window: int | None


class LeanDecoder:
    """Callable like the HF model for the runner's forward: (input_ids [1, T], position_ids [1, T],
    logits_to_keep) -> .logits [1, rows, V]."""

    def __init__(self, model: PreTrainedModel) -> None:
        inner = model.model
        config = model.config
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = _Norm(inner.norm)
        self.lm_head = model.lm_head
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.attention_fn: AttentionFunction = ALL_ATTENTION_FUNCTIONS[config._attn_implementation]
        self.layers = [_lean_layer(layer) for layer in inner.layers[: config.num_hidden_layers]]

    def with_attention(self, attention_fn: AttentionFunction) -> LeanDecoder:
        """The same forward and weights, attending through `attention_fn` (one traced into the compiled step)."""
        other = copy.copy(self)
        other.attention_fn = attention_fn
        return other

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_to_keep: Any = 0,
                 **_: object) -> LeanOutput:
        return LeanOutput(self.logits(input_ids, position_ids, logits_to_keep)[None])

    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_to_keep: Any = 0,
               **attention_inputs: Any) -> torch.Tensor:
        """[rows, V] for input_ids and position_ids [1, T]; `attention_inputs` go to every call of the attention."""
        hidden = self.embed(input_ids[0])  # [T, hidden]
        rotary = _Rotary(*self.rotary(hidden[None], position_ids=position_ids))
        tokens = hidden.shape[0]
        for layer in self.layers:
            hidden += self._attend(layer, layer.input_norm(hidden), rotary, tokens, attention_inputs)
            gate, up = layer.gate_up(layer.post_attention_norm(hidden)).chunk(2, dim=-1)
            hidden += layer.down(layer.act(gate).mul_(up))
        if isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden.index_select(0, logits_to_keep)
        elif logits_to_keep:
            hidden = hidden[-logits_to_keep:]
        return self.lm_head(self.norm(hidden))

    def _attend(self, layer: LeanLayer, normed: torch.Tensor, rotary: _Rotary, tokens: int,
                attention_inputs: dict[str, Any]) -> torch.Tensor:
        qkv = layer.qkv(normed).view(tokens, -1, self.head_dim)
        num_q, num_k, _ = (size // self.head_dim for size in layer.qkv_sizes)
        if layer.q_norm is not None and layer.k_norm is not None:
            q, k, v = qkv.split([num_q, num_k, num_k], dim=1)
            q, k = rotary.apply(layer.q_norm(q)), rotary.apply(layer.k_norm(k))
        else:  # q and k rotated in one go
            qk = rotary.apply(qkv[:, : num_q + num_k])
            q, k, v = qk[:, :num_q], qk[:, num_q:], qkv[:, num_q + num_k:]
        attention = layer.attention
        out, _ = self.attention_fn(
            attention, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None,
            scaling=attention.scaling, sliding_window=layer.sliding_window, **attention_inputs,
        )
        return layer.o_proj(out.reshape(tokens, -1))


_decoders: weakref.WeakKeyDictionary[nn.Module, LeanDecoder] = weakref.WeakKeyDictionary()
"""One per model: engines made again on the same loaded model (the bench's runs) share its joined layers and its
compiled step."""


def lean_decoder_for(model: nn.Module) -> LeanDecoder | None:
    """The LeanDecoder of a supported model whose linear layers are all packed; None otherwise."""
    if not isinstance(model, PreTrainedModel) or model.config.model_type not in SUPPORTED_MODEL_TYPES:
        return None
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, *PACKED))]
    if not linears or not all(isinstance(m, PACKED) for m in linears):
        return None
    if model.config._attn_implementation not in ALL_ATTENTION_FUNCTIONS:
        return None
    decoder = _decoders.get(model)
    if decoder is None:
        try:
            decoder = _decoders[model] = LeanDecoder(model)
        except (AttributeError, TypeError, ValueError):  # a variant with other module names or shapes
            return None
    return decoder


def _lean_layer(layer: Any) -> LeanLayer:
    """`layer`: a transformers decoder layer (Any: its submodules are found by name)."""
    attention, mlp = layer.self_attn, layer.mlp
    projections = [attention.q_proj, attention.k_proj, attention.v_proj]
    if getattr(mlp, "gate_proj", None) is None or getattr(layer, "pre_feedforward_layernorm", None) is not None:
        raise TypeError("not a Llama-style block")
    return LeanLayer(
        attention=attention, input_norm=_Norm(layer.input_layernorm),
        post_attention_norm=_Norm(layer.post_attention_layernorm),
        qkv=_fused(projections), qkv_sizes=[p.out_features for p in projections],
        q_norm=_optional_norm(attention, "q_norm"), k_norm=_optional_norm(attention, "k_norm"),
        o_proj=attention.o_proj, gate_up=_fused([mlp.gate_proj, mlp.up_proj]), down=mlp.down_proj, act=mlp.act_fn,
        sliding_window=_sliding_window(attention),
    )


def _sliding_window(attention: Any) -> int | None:
    """As transformers passes it: Qwen2/3 keep a per-layer attribute (None on full-attention layers), Mistral reads
    its config."""
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(attention.config, "sliding_window", None)


def _fused(layers: list[nn.Module]) -> nn.Module:
    """One packed matmul for several layers reading the same input, where their formats allow."""
    int4 = [layer for layer in layers if isinstance(layer, Int4Linear)]
    fused = concat_int4(int4) if len(int4) == len(layers) else None
    return fused if fused is not None else _Concatenated(layers)


class _Concatenated(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in self.parts], dim=-1)


class _Norm:
    """An RMSNorm module's weight and epsilon, read once: torch's fused rms_norm takes them directly."""

    def __init__(self, norm: Any) -> None:
        self.weight: torch.Tensor = norm.weight
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
        self.eps = 1e-6 if eps is None else float(eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)


def _optional_norm(attention: Any, name: str) -> _Norm | None:
    norm = getattr(attention, name, None)
    return None if norm is None else _Norm(norm)


class _Rotary:
    """transformers' apply_rotary_pos_emb (rotate_half convention) on [T, heads, D], in its exact arithmetic: the
    packed modes are not token-identical to float32 already, and bit-equal logits to transformers' forward over the
    same packed layers keep this forward testable."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos = cos[0][:, None, :]  # [T, 1, D]: broadcast over heads
        self.sin = sin[0][:, None, :]
        self.half = cos.shape[-1] // 2

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        rotated = torch.cat((-x[..., self.half:], x[..., : self.half]), dim=-1)
        return x * self.cos + rotated * self.sin
