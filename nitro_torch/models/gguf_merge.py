"""Split GGUF files (`X-00001-of-00003.gguf`, llama.cpp's gguf-split) joined into one file.

transformers reads one GGUF file only, and so does the conversion cache; the parts are joined once into
$NITRO_HOME/merged (the metadata of the first part, every part's tensors as stored), atomically like a conversion.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from nitro_torch.models.embedded import nitro_cache_dir, report_progress

MERGED_SUBDIR = "merged"
_SPLIT_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")
_NOT_COPIED = ("GGUF.", "split.")
_WRITER_KEYS = ("general.architecture", "general.alignment")  # GGUFWriter writes these itself


def merged_gguf_path(parts: list[Path], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the joined file of `parts` is kept: keyed by the first part's name, size and mtime."""
    first = parts[0].stat()
    stem = _SPLIT_SUFFIX.sub("", parts[0].name.removesuffix(".gguf"))
    return nitro_cache_dir(cache_dir) / MERGED_SUBDIR / f"{stem}-{first.st_size}-{first.st_mtime_ns}.gguf"


def single_gguf(parts: list[Path], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The one .gguf file of a model: itself, or its parts joined (once)."""
    if len(parts) == 1:
        return parts[0]
    target = merged_gguf_path(parts, cache_dir)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    report_progress(f"joining the {len(parts)} parts of {parts[0].name} into one GGUF file (one-time) ...")
    handle, temp_name = tempfile.mkstemp(prefix=target.name + ".tmp-", dir=target.parent)
    os.close(handle)
    try:
        merge_gguf_parts(parts, Path(temp_name))
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
    return target


def merge_gguf_parts(parts: list[Path], out_path: Path) -> None:
    import gguf

    readers = [gguf.GGUFReader(str(part)) for part in parts]
    first = readers[0]
    architecture = _field_value(first.fields["general.architecture"])[0]
    writer = gguf.GGUFWriter(str(out_path), architecture, endianess=first.endianess)
    for name, field in first.fields.items():
        if name.startswith(_NOT_COPIED) or name in _WRITER_KEYS:
            continue
        value, sub_type = _field_value(field)
        writer.add_key_value(name, value, field.types[0], sub_type=sub_type)
    tensors = [tensor for reader in readers for tensor in reader.tensors]
    for tensor in tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()


def _field_value(field: Any) -> tuple[Any, Any]:
    """(value, array item type) of a GGUFReader field, from its raw parts (as ReaderField.contents() reads them;
    written out here because older gguf releases lack that method)."""
    import gguf

    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        item = field.types[-1]
        if item == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data], item
        return [value for i in field.data for value in field.parts[i].tolist()], item
    if kind == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8"), None
    return field.parts[-1].tolist()[0], None
