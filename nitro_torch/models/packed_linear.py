"""Linear layers whose weights stay packed in memory on the CPU: int4 in groups of 32 (a GGUF file's own 4-bit
blocks, or weights quantized so at load) and int8 per output channel, run by torch's weight-only CPU matmuls.

A batch-1 decode step reads every weight once, so its time is the weights' bytes over the memory bandwidth: 4-bit
weights read about 7x fewer bytes than float32. torch's packed kernels are fast with bfloat16 activations only (the
float32 path is a slow reference), so the input is rounded to bfloat16 for the matmul and the result returned in the
model's float32: that rounding is why these modes are not token-identical to float32 (`EXACT` says which are).
A step of many rows (a prompt) is bound by compute instead, where the packed kernels run at about half the float32
matmul's rate: there a layer multiplies its weight converted to float32 for the step (int4_dequant.py unpacks int4).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from nitro_torch.models.gguf_quants import GROUP, Int4Groups
from nitro_torch.models.int4_dequant import TILE_ROWS, layout_is_known, unpacked_matmul

COMPUTE_DTYPE = torch.bfloat16
UNPACKED_MIN_ROWS = 128
"""From this many rows a step multiplies a packed layer's weight converted to float32 once, instead of the packed
kernel decoding it again every few rows; the crossover for SmolLM2's layers on 2 cores was ~128 rows."""
# torch's int4 packing needs whole groups of 16 output rows, and lays rows out in tiles of 64.
_INT4_ROW_MULTIPLE = 16
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
_INT8_MM = torch.ops.aten._weight_int8pack_mm.default


def int4_packable(out_features: int, in_features: int) -> bool:
    return out_features % _INT4_ROW_MULTIPLE == 0 and in_features % GROUP == 0


class Int4Linear(nn.Module):
    """y = x W^T + b with W the sum of 4-bit parts (one for 4-bit formats, two for an 8-bit one)."""

    min_unpacked_rows: ClassVar[int] = UNPACKED_MIN_ROWS
    """Steps of this many rows or more multiply the weight unpacked (a benchmark raises it for its baseline)."""

    def __init__(self, packed: list[torch.Tensor], scale_zero: list[torch.Tensor], in_features: int,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, packed[0].shape[0]
        self.num_parts = len(packed)
        for i, (weights, scales) in enumerate(zip(packed, scale_zero)):
            self.register_buffer(f"packed_{i}", weights)
            self.register_buffer(f"scale_zero_{i}", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.unpacks = self.out_features % TILE_ROWS == 0 and layout_is_known()
        """Whether steps of many rows can run a float32 matmul on the weight unpacked (int4_dequant.py)."""

    @classmethod
    def from_groups(cls, parts: list[Int4Groups], bias: torch.Tensor | None) -> Int4Linear:
        packed, scale_zero = [], []
        for part in parts:
            codes = torch.from_numpy(np.ascontiguousarray(part.codes)).to(torch.int32)
            scale = torch.from_numpy(part.scale)
            zero = torch.from_numpy(part.offset) + 8 * scale  # the kernel computes (code - 8) * scale + zero
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
            scale_zero.append(torch.stack([scale.T, zero.T], dim=-1).to(COMPUTE_DTYPE).contiguous())
        return cls(packed, scale_zero, parts[0].codes.shape[1], bias)

    def parts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(getattr(self, f"packed_{i}"), getattr(self, f"scale_zero_{i}")) for i in range(self.num_parts)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.unpacks and flat.shape[0] >= self.min_unpacked_rows and x.dtype == torch.float32:
            out = unpacked_matmul(flat, self.parts(), self.in_features)
        else:
            bf16 = flat.to(COMPUTE_DTYPE)
            out = _INT4_MM(bf16, self.packed_0, GROUP, self.scale_zero_0).to(x.dtype)
            if self.num_parts == 2:
                out += _INT4_MM(bf16, self.packed_1, GROUP, self.scale_zero_1)
        if self.bias is not None:
            out += self.bias
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        bits = 4 * self.num_parts
        return f"in_features={self.in_features}, out_features={self.out_features}, {bits}-bit in groups of {GROUP}"


def concat_int4(layers: list[Int4Linear]) -> Int4Linear | None:
    """One layer computing `layers` side by side (their outputs concatenated), for layers reading the same input;
    None when they cannot be joined. torch packs rows in tiles of 64 (a shorter last tile is laid out differently),
    so packed tensors concatenate as they are when every layer but the last fills whole tiles; the joined layer is
    checked against the separate ones before it is used."""
    if len({(layer.in_features, layer.num_parts) for layer in layers}) != 1:
        return None
    if any(layer.out_features % TILE_ROWS for layer in layers[:-1]):
        return None
    biases = [layer.bias for layer in layers]
    if any(bias is None for bias in biases) and any(bias is not None for bias in biases):
        return None
    per_part = zip(*(layer.parts() for layer in layers))
    packed, scale_zero = zip(*((torch.cat([p for p, _ in part]), torch.cat([s for _, s in part], dim=1))
                               for part in per_part))
    bias = None if biases[0] is None else torch.cat([b for b in biases if b is not None])
    joined = Int4Linear(list(packed), list(scale_zero), layers[0].in_features, bias)
    probe = torch.randn(2, joined.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        if not torch.equal(joined(probe), torch.cat([layer(probe) for layer in layers], dim=-1)):
            return None
    return joined


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 per output channel, quantized symmetrically from float weights at load."""

    min_unpacked_rows: ClassVar[int] = UNPACKED_MIN_ROWS
    """As Int4Linear's: from this many rows the weight is converted to float32 for the step."""
    weight_int8: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(COMPUTE_DTYPE))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if flat.shape[0] >= self.min_unpacked_rows and x.dtype == torch.float32:
            weight = self.weight_int8.to(torch.float32).mul_(self.scale.float()[:, None])
            out = nn.functional.linear(flat, weight)
        else:
            out = _INT8_MM(flat.to(COMPUTE_DTYPE), self.weight_int8, self.scale).to(x.dtype)
        if self.bias is not None:
            out += self.bias
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 8-bit per channel"


def quantize_int4(weight: torch.Tensor) -> Int4Groups:
    """Asymmetric 4-bit groups of 32 from float weights (the Q4_1 recipe): codes 0..15 between each group's min
    and max."""
    w = weight.detach().float().numpy()
    n, k = w.shape
    groups = w.reshape(n, k // GROUP, GROUP)
    low, high = groups.min(axis=-1), groups.max(axis=-1)
    scale = np.maximum(high - low, 1e-12) / 15
    codes = np.clip(np.rint((groups - low[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    return Int4Groups(codes.reshape(n, k), scale.astype(np.float32), low.astype(np.float32))
