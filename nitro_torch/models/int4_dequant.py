"""torch's CPU int4 packing, unpacked: a packed layer's weight as float32, for steps of many rows (prompts), where a
float32 matmul outruns the packed kernel.

torch's weight-only int4 CPU kernel decodes the weights again for every few rows, so past a handful of rows it costs
the same per row: on a 2-core AVX-512 machine about 29 us a row for a 576 x 3072 layer, at half the float32 GEMM's
rate. A prompt of hundreds of tokens is worth decoding the weight once instead: unpacking SmolLM2's gate/up layer to
float32 takes ~1.3 ms, and with it 256 rows took 7.0 ms against 10.1 ms through the packed kernel. Over SmolLM2's
layer shapes that was 0.63-0.77x of the packed time at 256 rows, 0.51-0.61x at 512, about even at 128
(packed_linear.UNPACKED_MIN_ROWS). The unpacked weight is a step's temporary; the packed one stays the copy in
memory.

The layout is torch's `_convert_weight_to_int4pack_for_cpu`: rows in tiles of 64, each tile k-major, a byte holding
row d (low nibble) and row d + 32 (high nibble) of its tile at one input column. `layout_is_known` checks that on
the running torch once; where it does not hold, layers keep the packed kernel for every step.
"""

from __future__ import annotations

import functools

import torch

TILE_ROWS = 64
_MAX_UNPACKED_BYTES = 64 << 20
"""Larger layers (an 8B model's MLP, an untied head) unpack a block of rows at a time, each multiplied at once."""
_LOW_NIBBLES = 0x0F0F0F0F


def dequantize_transposed(packed: torch.Tensor, scale_zero: torch.Tensor, in_features: int, start: int = 0,
                          stop: int | None = None) -> torch.Tensor:
    """W[start:stop]^T as float32 [in_features, stop - start] from one packed part ([N, K/2] uint8, with [K/32, N, 2]
    bf16 scale and zero: w = (code - 8) * scale + zero). start and stop are multiples of TILE_ROWS."""
    stop = packed.shape[0] if stop is None else stop
    rows, tiles = stop - start, (stop - start) // TILE_ROWS
    words = packed[start:stop].view(tiles, in_features, TILE_ROWS // 2).view(torch.int32)
    low = (words & _LOW_NIBBLES).view(torch.uint8)
    high = (words.bitwise_right_shift(4) & _LOW_NIBBLES).view(torch.uint8)
    weight = torch.empty(in_features, tiles, 2, TILE_ROWS // 2)
    weight[:, :, 0].copy_(low.transpose(0, 1))
    weight[:, :, 1].copy_(high.transpose(0, 1))
    groups = weight.view(scale_zero.shape[0], -1, rows)  # [K/32, 32, rows]
    scale = scale_zero[:, start:stop, 0].float()[:, None]
    zero = scale_zero[:, start:stop, 1].float()[:, None]
    groups.mul_(scale).add_(zero - 8 * scale)
    return weight.view(in_features, rows)


def unpacked_matmul(x: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]], in_features: int
                    ) -> torch.Tensor:
    """x [M, K] float32 times the sum of the packed parts' weights, transposed: [M, N]."""
    out_features = parts[0][0].shape[0]
    block = max(TILE_ROWS, _MAX_UNPACKED_BYTES // (4 * in_features) // TILE_ROWS * TILE_ROWS)
    if block >= out_features:
        return torch.mm(x, _unpacked(parts, in_features, 0, out_features))
    out = x.new_empty(x.shape[0], out_features)
    for start in range(0, out_features, block):
        stop = min(out_features, start + block)
        out[:, start:stop] = torch.mm(x, _unpacked(parts, in_features, start, stop))
    return out


def _unpacked(parts: list[tuple[torch.Tensor, torch.Tensor]], in_features: int, start: int, stop: int
              ) -> torch.Tensor:
    weight = dequantize_transposed(*parts[0], in_features, start, stop)
    for packed, scale_zero in parts[1:]:
        weight += dequantize_transposed(packed, scale_zero, in_features, start, stop)
    return weight


@functools.cache
def layout_is_known() -> bool:
    """Whether this torch packs int4 CPU weights as `dequantize_transposed` reads them (codes packed and read back)."""
    rows, inputs = 2 * TILE_ROWS, 64
    codes = torch.randint(0, 16, (rows, inputs), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    except RuntimeError:
        return False
    if packed.shape != (rows, inputs // 2) or packed.dtype != torch.uint8:
        return False
    unit = torch.stack([torch.ones(inputs // 32, rows), torch.full((inputs // 32, rows), 8.0)], dim=-1)
    unpacked = dequantize_transposed(packed, unit.to(torch.bfloat16), inputs)  # (code - 8) * 1 + 8 = code
    return torch.equal(unpacked.T, codes.float())
