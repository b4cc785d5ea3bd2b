"""The tied LM head on packed CPU weights: the packed matmul for a few rows, the embedding's float32 weight for a
batch (models/tied_head.py), the same head both ways."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn
from torch.nn import functional
from transformers import AutoModelForCausalLM, LlamaConfig

from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.models.cpu_weights import pack_cpu_weights
from nitro_torch.models.lean_decoder import LeanDecoder
from nitro_torch.models.packed_linear import Int4Linear, Int8Linear
from nitro_torch.models.tied_head import FLOAT_MIN_ROWS, TiedPackedHead
from nitro_torch.runner.attention import register_paged_attention
from tests.runner.test_kv_cache_dtype import embedded_packed, logprob_differences, logprob_trails  # noqa: F401

CPU = torch.device("cpu")


def test_few_rows_run_packed_and_a_batch_runs_the_float_weight(embedded_packed) -> None:  # noqa: F811
    head = embedded_packed.model.lm_head
    assert isinstance(head, TiedPackedHead) and isinstance(head.packed, Int4Linear) and head.packed.num_parts == 2
    embedding = embedded_packed.model.get_input_embeddings().weight
    assert head.float_weight.data_ptr() == embedding.data_ptr()  # shared, not a copy
    assert "the tied LM head in float32 from 16 rows" in embedded_packed.cpu_weights.description
    torch.manual_seed(0)
    with torch.inference_mode():
        for rows in (1, FLOAT_MIN_ROWS - 1):
            x = torch.randn(rows, embedding.shape[1])
            assert torch.equal(head(x), head.packed(x))
        for rows in (FLOAT_MIN_ROWS, 40, 64, 80):  # by blocks below 64 rows, torch's linear from 64
            x = torch.randn(1, rows, embedding.shape[1])
            logits = head(x)
            assert logits.shape == (1, rows, embedding.shape[0]) and logits[0].is_contiguous()
            torch.testing.assert_close(logits[0], functional.linear(x[0], embedding), rtol=1e-4, atol=1e-4)
            # the packed path differs only by rounding its input to bfloat16
            assert (logits - head.packed(x)).abs().max() < 0.25


def _tiny_llama(tied: bool) -> nn.Module:
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    config._attn_implementation = register_paged_attention()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_only_a_head_tied_to_a_float32_embedding_is_replaced(mode: str) -> None:
    tied, untied = _tiny_llama(tied=True), _tiny_llama(tied=False)
    described = pack_cpu_weights(tied, mode, CPU, None, "none").description
    assert isinstance(tied.lm_head, TiedPackedHead) and "tied LM head" in described
    assert isinstance(tied.lm_head.packed, Int4Linear if mode == "int4" else Int8Linear)
    described = pack_cpu_weights(untied, mode, CPU, None, "none").description
    assert isinstance(untied.lm_head, (Int4Linear, Int8Linear)) and "tied LM head" not in described
    fp32 = _tiny_llama(tied=True)
    pack_cpu_weights(fp32, "fp32", CPU, None, "none")
    assert type(fp32.lm_head) is nn.Linear


def test_a_batch_decodes_as_its_requests_do_alone(embedded_packed) -> None:  # noqa: F811
    """20 requests decoding together run the float32 head (and their prompts, prefilled in one step, the unpacked
    layers); each alone runs the packed head. Their greedy logprobs agree up to the packed path's rounding (a wrong
    float head, transposed or a block off, moves them by units)."""
    engine = LLMEngine(embedded_packed, build_config({"device": "cpu", "cpu_decode_compile": "off",
                                                      "max_step_time": 0, "num_kv_blocks": 256}, env={}))
    assert isinstance(engine.runner.forward, LeanDecoder)
    tokenizer = embedded_packed.tokenizer
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Name {n} fruits and one colour."}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
               for n in range(2, 2 + FLOAT_MIN_ROWS + 4)]
    together = logprob_trails(engine, prompts, 10)
    alone = [logprob_trails(engine, [prompt], 10)[0] for prompt in prompts]
    differences, confident = logprob_differences(together, alone)
    assert len(differences) >= 100 and confident >= 50
    assert max(differences) < 0.25 and statistics.median(differences) < 0.03
    assert engine.stats().kv_blocks_used == 0
