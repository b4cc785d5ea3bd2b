"""--cpu-weights: GGUF blocks read as the file holds them, packed layers that compute them, and the modes on the
embedded model and on an HF folder."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from nitro_torch.config import ConfigError, build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.models.cpu_weights import pack_cpu_weights
from nitro_torch.models.embedded import embedded_gguf_path
from nitro_torch.models.gguf_index import read_gguf_index
from nitro_torch.models.gguf_quants import int4_parts
from nitro_torch.models.loader import load_model
from nitro_torch.models.packed_linear import Int4Linear, Int8Linear, concat_int4, quantize_int4
from nitro_torch.runner.attention import register_paged_attention
from nitro_torch.sampling import SamplingParams

CPU = torch.device("cpu")
# Byte ranges of each block's fp16 factors: random bytes there could be NaN or huge.
HALF_FIELDS = {
    GGMLQuantizationType.Q4_0: [(0, 2)],
    GGMLQuantizationType.Q4_1: [(0, 2), (2, 4)],
    GGMLQuantizationType.Q8_0: [(0, 2)],
    GGMLQuantizationType.Q4_K: [(0, 2), (2, 4)],
}


def random_blocks(kind: GGMLQuantizationType, rows: int, inputs: int, seed: int = 0) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, inputs // block_size, type_size), dtype=np.uint8)
    for start, end in HALF_FIELDS[kind]:
        halves = rng.uniform(-0.05, 0.05, (rows, inputs // block_size)).astype(np.float16)
        raw[..., start:end] = halves[..., None].view(np.uint8).reshape(rows, -1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", sorted(HALF_FIELDS, key=lambda k: k.name))
def test_block_formats_read_as_gguf_dequantizes_them(kind: GGMLQuantizationType) -> None:
    raw = random_blocks(kind, rows=32, inputs=256)
    parts = int4_parts(kind, raw, 256)
    assert parts is not None and all(p.codes.max() <= 15 for p in parts)
    expected = gguf.quants.dequantize(raw, kind)
    np.testing.assert_allclose(sum(p.dequantize() for p in parts), expected, rtol=0, atol=1e-6)


def test_formats_without_an_exact_4_bit_form_are_left_alone() -> None:
    assert int4_parts(GGMLQuantizationType.Q6_K, np.zeros((16, 210), np.uint8), 256) is None


def test_packed_layers_compute_the_blocks_with_bf16_activations() -> None:
    x = torch.randn(5, 256)
    for kind in (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0):  # one 4-bit part; two
        raw = random_blocks(kind, rows=64, inputs=256, seed=1)
        weight = torch.from_numpy(gguf.quants.dequantize(raw, kind))
        layer = Int4Linear.from_groups(int4_parts(kind, raw, 256), None)
        expected = x @ weight.T
        error = (layer(x) - expected).abs().max() / expected.abs().max()
        assert error < 0.02, f"{kind.name}: relative error {error:.4f}"


def test_joined_layers_equal_the_separate_ones() -> None:
    torch.manual_seed(0)
    layers = [Int4Linear.from_groups([quantize_int4(torch.randn(rows, 128))], None) for rows in (128, 64, 32)]
    joined = concat_int4(layers)
    assert joined is not None and joined.out_features == 224
    x = torch.randn(3, 128)
    assert torch.equal(joined(x), torch.cat([layer(x) for layer in layers], dim=-1))
    # A partial tile of 64 rows before another layer cannot be joined as it is packed.
    assert concat_int4([layers[2], layers[1]]) is None


def test_int8_layer_is_close_to_float() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    x = torch.randn(4, 256)
    error = (Int8Linear(linear.weight, linear.bias)(x) - linear(x)).abs().max() / linear(x).abs().max()
    assert error < 0.02


def test_gguf_index_reads_the_tensor_table_as_gguf_does() -> None:
    path = embedded_gguf_path()
    index = read_gguf_index(path)
    reader = gguf.GGUFReader(str(path))
    assert index.architecture == "llama"
    assert set(index.tensors) == {t.name for t in reader.tensors}
    for tensor in reader.tensors:
        ours = index.tensors[tensor.name]
        assert ours.kind == tensor.tensor_type
        assert np.array_equal(ours.raw.reshape(-1), np.asarray(tensor.data).view(np.uint8).reshape(-1))


def _load(cpu_weights: str, model: str = "default"):
    config = build_config({"model": model, "device": "cpu", "cpu_weights": cpu_weights}, env={})
    return load_model(config.model, attn_implementation=register_paged_attention())


def test_embedded_model_runs_its_own_gguf_blocks() -> None:
    loaded = _load("auto")
    linears = [m for m in loaded.model.modules() if isinstance(m, (nn.Linear, Int4Linear))]
    assert linears and all(isinstance(m, Int4Linear) for m in linears)
    assert loaded.cpu_weights.mode == "int4" and not loaded.cpu_weights.exact
    assert "210 GGUF Q4_1" in loaded.cpu_weights.description and "1 GGUF Q8_0" in loaded.cpu_weights.description
    head = loaded.model.lm_head.packed  # tied: on its float32 embedding for batches (test_tied_head.py)
    assert isinstance(head, Int4Linear) and head.num_parts == 2  # Q8_0: 2 x 4 bits
    engine = LLMEngine(loaded, build_config({"device": "cpu", "cpu_decode_compile": "off"}, env={}))
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    [answer] = engine.generate([prompt], [SamplingParams(temperature=0.0, max_tokens=12)])
    assert "Paris" in loaded.tokenizer.decode(answer)


def test_fp32_keeps_the_float_weights() -> None:
    loaded = _load("fp32")
    assert loaded.cpu_weights.exact
    assert not any(isinstance(m, (Int4Linear, Int8Linear)) for m in loaded.model.modules())


def test_folder_models_keep_float_weights_unless_asked(tiny_model_dir: str) -> None:
    assert _load("auto", tiny_model_dir).cpu_weights.exact
    int4 = _load("int4", tiny_model_dir)
    assert int4.cpu_weights.mode == "int4" and "quantized at load" in int4.cpu_weights.description
    int8 = _load("int8", tiny_model_dir)
    assert int8.cpu_weights.mode == "int8"
    assert any(isinstance(m, Int8Linear) for m in int8.model.modules())


def test_packed_modes_need_float_weights_on_the_cpu() -> None:
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ConfigError, match="--device cpu"):
        pack_cpu_weights(model, "int4", torch.device("cuda"), None, "none")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--quantization none"):
        pack_cpu_weights(model, "int8", CPU, None, "bnb-4bit")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown --cpu-weights"):
        pack_cpu_weights(model, "int3", CPU, None, "none")  # type: ignore[arg-type]
