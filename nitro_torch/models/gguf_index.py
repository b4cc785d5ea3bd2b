"""The tensors of a GGUF file as memory-mapped raw blocks, found in milliseconds.

gguf's own GGUFReader decodes every metadata value first (a 49k-token vocabulary is ~4 s of Python); packing the
weights needs only the architecture and the tensor table, so this reads the header and skips the rest.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (versions 2 and 3).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    kind: GGMLQuantizationType
    rows: int
    raw: np.ndarray
    """[rows, bytes per row] uint8, memory-mapped."""


@dataclass(frozen=True)
class GGUFIndex:
    architecture: str
    tensors: dict[str, GGUFTensor]


class GGUFFormatError(ValueError):
    pass


class _Cursor:
    def __init__(self, data: memoryview) -> None:
        self.data, self.at = data, 0

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        text = bytes(self.data[self.at:self.at + length]).decode("utf-8", errors="replace")
        self.at += length
        return text

    def skip_value(self, value_type: int) -> None:
        if value_type == _STRING:
            length = self.unpack("Q")  # read before `self.at +=` takes its value
            self.at += length
        elif value_type == _ARRAY:
            element_type, count = self.unpack("I"), self.unpack("Q")
            if element_type in _SCALAR_SIZES:
                self.at += _SCALAR_SIZES[element_type] * count
            else:
                for _ in range(count):
                    self.skip_value(element_type)
        elif value_type in _SCALAR_SIZES:
            self.at += _SCALAR_SIZES[value_type]
        else:
            raise GGUFFormatError(f"unknown metadata value type {value_type}")


def read_gguf_index(path: Path) -> GGUFIndex:
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(mapped.data))
    if bytes(mapped[:4]) != _MAGIC:
        raise GGUFFormatError(f"{path} is not a GGUF file")
    cursor.at = 4
    version = cursor.unpack("I")
    if version < 2:
        raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    num_tensors, num_values = cursor.unpack("Q"), cursor.unpack("Q")
    architecture, alignment = "", _DEFAULT_ALIGNMENT
    for _ in range(num_values):
        key, value_type = cursor.string(), cursor.unpack("I")
        if key == "general.architecture" and value_type == _STRING:
            architecture = cursor.string()
        elif key == "general.alignment" and value_type == 4:
            alignment = cursor.unpack("I")
        else:
            cursor.skip_value(value_type)
    infos = []
    for _ in range(num_tensors):
        name = cursor.string()
        dims = [cursor.unpack("Q") for _ in range(cursor.unpack("I"))]
        infos.append((name, dims, GGMLQuantizationType(cursor.unpack("I")), cursor.unpack("Q")))
    data_start = -(-cursor.at // alignment) * alignment
    tensors = {}
    for name, dims, kind, offset in infos:
        block_size, type_size = GGML_QUANT_SIZES[kind]
        row_bytes = dims[0] // block_size * type_size
        rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
        start = data_start + offset
        tensors[name] = GGUFTensor(name, kind, rows, mapped[start:start + rows * row_bytes].reshape(rows, row_bytes))
    return GGUFIndex(architecture, tensors)
