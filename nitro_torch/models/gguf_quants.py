"""A GGUF tensor's own quantized blocks as group-of-32 4-bit codes with a scale and an offset per group.

Every format here is exactly `weight = scale * code + offset` over 32 consecutive inputs, with codes 0..15, which is
what torch's packed int4 CPU matmul computes: the weights stay the numbers the file holds. 8-bit Q8_0 becomes two such
4-bit parts whose sum is the weight (`high * 16 + low`), still exact. Formats that do not fit (Q5, Q6, K-quants other
than Q4_K) return None, and their layers keep the de-quantized float weights.

Block layouts are llama.cpp's (ggml-common.h): Q4_0 {half d; u8 qs[16]}, Q4_1 {half d, m; u8 qs[16]},
Q8_0 {half d; i8 qs[32]}, Q4_K {half d, dmin; u8 scales[12]; u8 qs[128]} per 256 weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

GROUP = 32


@dataclass(frozen=True)
class Int4Groups:
    """`weight[n, k] = scale[n, g] * codes[n, k] + offset[n, g]` for g = k // 32."""

    codes: np.ndarray  # [N, K] uint8 in 0..15
    scale: np.ndarray  # [N, K / 32] float32
    offset: np.ndarray  # [N, K / 32] float32

    def dequantize(self) -> np.ndarray:
        n, k = self.codes.shape
        grouped = self.codes.reshape(n, k // GROUP, GROUP).astype(np.float32)
        return (grouped * self.scale[..., None] + self.offset[..., None]).reshape(n, k)

    def take_rows(self, order: np.ndarray) -> Int4Groups:
        return Int4Groups(self.codes[order], self.scale[order], self.offset[order])


def int4_parts(kind: GGMLQuantizationType, raw: np.ndarray, num_inputs: int) -> list[Int4Groups] | None:
    """The tensor's blocks (`raw`: [N, bytes per row] as the GGUF reader maps them) as 4-bit parts that sum to the
    weight: one part for the 4-bit formats, two for Q8_0; None for a format that cannot be computed exactly so."""
    rows = raw.shape[0]
    if kind == GGMLQuantizationType.Q4_0:
        blocks = raw.reshape(rows, -1, 18)
        scale = _halves(blocks[..., 0:2])
        return [Int4Groups(_nibbles(blocks[..., 2:18], num_inputs), scale, -8.0 * scale)]
    if kind == GGMLQuantizationType.Q4_1:
        blocks = raw.reshape(rows, -1, 20)
        codes = _nibbles(blocks[..., 4:20], num_inputs)
        return [Int4Groups(codes, _halves(blocks[..., 0:2]), _halves(blocks[..., 2:4]))]
    if kind == GGMLQuantizationType.Q8_0:
        blocks = raw.reshape(rows, -1, 34)
        scale = _halves(blocks[..., 0:2])
        values = blocks[..., 2:34].copy().view(np.int8).reshape(rows, num_inputs).astype(np.int16) + 128  # 0..255
        high = Int4Groups((values >> 4).astype(np.uint8), 16.0 * scale, -128.0 * scale)
        low = Int4Groups((values & 15).astype(np.uint8), scale, np.zeros_like(scale))
        return [high, low]
    if kind == GGMLQuantizationType.Q4_K:
        return [_q4_k(raw, num_inputs)]
    return None


def _halves(pairs: np.ndarray) -> np.ndarray:
    """[..., 2] little-endian float16 bytes -> [...] float32."""
    return np.ascontiguousarray(pairs).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(packed: np.ndarray, num_inputs: int) -> np.ndarray:
    """[N, blocks, 16] bytes -> [N, blocks * 32] codes: low nibbles are a block's first 16 weights, high its last 16."""
    low, high = packed & 15, packed >> 4
    return np.concatenate([low, high], axis=-1).reshape(packed.shape[0], num_inputs)


def _q4_k(raw: np.ndarray, num_inputs: int) -> Int4Groups:
    """Super-blocks of 256 weights: 8 groups of 32, each with 6-bit scale and min codes under two fp16 factors;
    weight = d * sc * q - dmin * m (llama.cpp's get_scale_min_k4 and dequantize_row_q4_K)."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 144)
    d, dmin = _halves(blocks[..., 0:2]), _halves(blocks[..., 2:4])
    packed_scales = blocks[..., 4:16].astype(np.uint8)
    sc = np.empty(blocks.shape[:2] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = packed_scales[..., 0:4] & 63
    mn[..., :4] = packed_scales[..., 4:8] & 63
    sc[..., 4:] = (packed_scales[..., 8:12] & 15) | ((packed_scales[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (packed_scales[..., 8:12] >> 4) | ((packed_scales[..., 4:8] >> 6) << 4)
    qs = blocks[..., 16:144].reshape(rows, -1, 4, 32)  # 4 chunks of 32 bytes: low nibbles = group 2j, high = 2j+1
    codes = np.stack([qs & 15, qs >> 4], axis=3).reshape(rows, num_inputs)
    scale = (d[..., None] * sc).reshape(rows, -1)
    offset = -(dmin[..., None] * mn).reshape(rows, -1)
    return Int4Groups(codes.astype(np.uint8), scale.astype(np.float32), offset.astype(np.float32))
