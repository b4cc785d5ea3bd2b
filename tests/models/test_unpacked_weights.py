"""Steps of many rows multiply packed CPU layers unpacked to float32 (models/int4_dequant.py): the same weights as
the packed kernel computes, read from torch's own packing."""

from __future__ import annotations

import statistics

import pytest
import torch
from gguf import GGMLQuantizationType

import nitro_torch.models.int4_dequant as int4_dequant
from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.models.gguf_quants import Int4Groups, int4_parts
from nitro_torch.models.int4_dequant import dequantize_transposed, layout_is_known
from nitro_torch.models.packed_linear import UNPACKED_MIN_ROWS, Int4Linear, Int8Linear, quantize_int4
from tests.models.test_cpu_weights import random_blocks
from tests.runner.test_kv_cache_dtype import embedded_packed, logprob_differences, logprob_trails  # noqa: F401


def _kernel_weight(parts: list[Int4Groups]) -> torch.Tensor:
    """W as the packed kernel defines it from the parts' codes: (code - 8) * scale + zero, scale and zero in bf16."""
    weight = torch.zeros(parts[0].codes.shape)
    for part in parts:
        scale = torch.from_numpy(part.scale).to(torch.bfloat16).float()
        zero = (torch.from_numpy(part.offset) + 8 * torch.from_numpy(part.scale)).to(torch.bfloat16).float()
        codes = torch.from_numpy(part.codes).float().view(*part.scale.shape, -1)
        weight += ((codes - 8) * scale[..., None] + zero[..., None]).view(weight.shape)
    return weight


def test_torch_packs_int4_as_the_unpacking_reads_it() -> None:
    assert layout_is_known()


@pytest.mark.parametrize("kind", [GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0])  # one 4-bit part; two
def test_unpacked_weights_are_the_kernels_weights(kind: GGMLQuantizationType) -> None:
    parts = int4_parts(kind, random_blocks(kind, rows=192, inputs=256, seed=2), 256)
    assert parts is not None and len(parts) == (2 if kind == GGMLQuantizationType.Q8_0 else 1)
    layer = Int4Linear.from_groups(parts, torch.randn(192))
    unpacked = sum(dequantize_transposed(packed, scale_zero, 256).T for packed, scale_zero in layer.parts())
    torch.testing.assert_close(unpacked, _kernel_weight(parts), rtol=1e-6, atol=1e-6)
    x = torch.randn(UNPACKED_MIN_ROWS + 3, 256)
    assert layer.unpacks
    with torch.inference_mode():
        rows = layer(x)
        torch.testing.assert_close(rows, x @ unpacked.T + layer.bias, rtol=1e-5, atol=1e-5)
        few = layer(x[:UNPACKED_MIN_ROWS - 1])  # the packed kernel, bf16 activations
        assert (few - rows[:UNPACKED_MIN_ROWS - 1]).abs().max() < 0.02 * rows.abs().max()


def test_large_layers_unpack_a_block_of_rows_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = Int4Linear.from_groups([quantize_int4(torch.randn(320, 128))], None)
    x = torch.randn(UNPACKED_MIN_ROWS, 128)
    with torch.inference_mode():
        whole = layer(x)
        monkeypatch.setattr(int4_dequant, "_MAX_UNPACKED_BYTES", 128 * 4 * 128)  # 128 rows of weights a block
        assert torch.equal(layer(x), whole)


def test_layers_out_of_whole_tiles_keep_the_packed_kernel() -> None:
    layer = Int4Linear.from_groups([quantize_int4(torch.randn(48, 64))], None)  # 48 rows: a partial tile
    assert not layer.unpacks
    with torch.inference_mode():
        x = torch.randn(UNPACKED_MIN_ROWS, 64)
        in_eights = torch.cat([layer(x[i:i + 8]) for i in range(0, UNPACKED_MIN_ROWS, 8)])  # the packed kernel
        torch.testing.assert_close(layer(x), in_eights, rtol=1e-6, atol=1e-6)


def test_int8_layers_convert_their_weight_for_many_rows() -> None:
    weight = torch.randn(96, 64)
    layer = Int8Linear(weight, torch.randn(96))
    x = torch.randn(UNPACKED_MIN_ROWS, 64)
    with torch.inference_mode():
        many = layer(x)
        expected = x @ (layer.weight_int8.float() * layer.scale.float()[:, None]).T + layer.bias
        torch.testing.assert_close(many, expected, rtol=1e-5, atol=1e-5)
        assert (layer(x[:4]) - many[:4]).abs().max() < 0.02 * many.abs().max()


def test_a_prompt_in_one_chunk_scores_as_in_small_chunks(embedded_packed) -> None:  # noqa: F811
    """Prompts of ~300 tokens in one step run the embedded model's layers unpacked; in 64-token chunks, packed.
    Their greedy logprobs agree up to the packed kernel's bf16 rounding of the activations."""
    tokenizer = embedded_packed.tokenizer
    story = " ".join(f"Day {n}: the baker sold {3 * n + 1} loaves and {n % 7} cakes." for n in range(1, 25))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"{story}\n{question}"}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
               for question in ("How many cakes on day 9?", "Summarize the week.", "What sold best?")]
    assert min(len(p) for p in prompts) > 2 * UNPACKED_MIN_ROWS
    options = {"device": "cpu", "cpu_decode_compile": "off", "max_step_time": 0, "num_kv_blocks": 128}
    whole = LLMEngine(embedded_packed, build_config({**options, "max_num_batched_tokens": 1024}, env={}))
    chunked = LLMEngine(embedded_packed, build_config({**options, "max_num_batched_tokens": 64}, env={}))
    in_one_step = [logprob_trails(whole, [prompt], 8)[0] for prompt in prompts]
    in_chunks = [logprob_trails(chunked, [prompt], 8)[0] for prompt in prompts]
    differences, confident = logprob_differences(in_one_step, in_chunks)
    assert len(differences) >= 16 and confident >= 8
    assert max(differences) < 0.25 and statistics.median(differences) < 0.05
