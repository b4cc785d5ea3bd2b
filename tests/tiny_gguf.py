"""Tiny random-weight llama GGUF files with SmolLM2's tokenizer and chat template (copied from the embedded GGUF),
as llama.cpp's converter lays them out, optionally split into parts as gguf-split does. Megabytes, a second."""

from __future__ import annotations

import functools
from pathlib import Path

import gguf
import numpy as np

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128


def write_tiny_gguf(path: Path, tokenizer_source: Path, quant: str = "Q8_0", seed: int = 0,
                    split_max_tensors: int = 0) -> list[Path]:
    """A 2-layer llama at `path` (2-D weights in `quant`: Q8_0, Q4_0 or F32); the parts written, in order."""
    source = _reader(str(tokenizer_source))
    tokens = source.fields["tokenizer.ggml.tokens"]
    vocab = len(tokens.data)
    writer = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    writer.add_name("tiny-llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    for name, field in source.fields.items():
        if name.startswith("tokenizer."):
            _copy_field(writer, name, field)

    rng = np.random.default_rng(seed)
    kind = gguf.GGMLQuantizationType[quant]

    def matrix(name: str, rows: int, columns: int) -> None:
        values = (rng.standard_normal((rows, columns)) * 0.02).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(HIDDEN, dtype=np.float32))

    matrix("token_embd.weight", vocab, HIDDEN)
    head_dim = HIDDEN // HEADS
    for block in range(LAYERS):
        norm(f"blk.{block}.attn_norm.weight")
        matrix(f"blk.{block}.attn_q.weight", HIDDEN, HIDDEN)
        matrix(f"blk.{block}.attn_k.weight", KV_HEADS * head_dim, HIDDEN)
        matrix(f"blk.{block}.attn_v.weight", KV_HEADS * head_dim, HIDDEN)
        matrix(f"blk.{block}.attn_output.weight", HIDDEN, HIDDEN)
        norm(f"blk.{block}.ffn_norm.weight")
        matrix(f"blk.{block}.ffn_gate.weight", FFN, HIDDEN)
        matrix(f"blk.{block}.ffn_up.weight", FFN, HIDDEN)
        matrix(f"blk.{block}.ffn_down.weight", HIDDEN, FFN)
    norm("output_norm.weight")
    parts = writer.format_shard_names(path)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return parts


@functools.cache
def _reader(path: str) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)  # reading a 49k-token vocabulary takes seconds: once per session


def _copy_field(writer: gguf.GGUFWriter, name: str, field: gguf.ReaderField) -> None:
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        item = field.types[-1]
        if item == gguf.GGUFValueType.STRING:
            value: object = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        else:
            value = [v for i in field.data for v in field.parts[i].tolist()]
        writer.add_key_value(name, value, kind, sub_type=item)
    elif kind == gguf.GGUFValueType.STRING:
        writer.add_key_value(name, bytes(field.parts[-1]).decode("utf-8"), kind)
    else:
        writer.add_key_value(name, field.parts[-1].tolist()[0], kind)
