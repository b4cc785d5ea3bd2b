"""Paged attention plugged into several HF architectures (tiny random weights): greedy equals HF generate."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.models.loader import LoadedModel
from nitro_torch.runner.attention import register_paged_attention
from nitro_torch.sampling import SamplingParams

VOCAB = 512
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, head_dim=16,
              eos_token_id=None, bos_token_id=None, pad_token_id=0)
ARCHITECTURES = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "mistral": {"sliding_window": 12},
    "phi3": {},
    "gemma": {},
    "gemma2": {"sliding_window": 12, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 30.0},
}
PROMPTS = [[5, 17, 99, 3, 250, 41, 7], list(range(100, 140)), [300, 301], list(range(7, 30, 2))]
NEW_TOKENS = [10, 6, 12, 9]


def tiny_model(model_type: str, attn_implementation: str) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **COMMON, **ARCHITECTURES[model_type])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_engine_matches_hf_generate(model_type: str, smol_tokenizer) -> None:
    model = tiny_model(model_type, register_paged_attention())
    reference = tiny_model(model_type, "eager")
    reference.load_state_dict(model.state_dict())
    loaded = LoadedModel(model=model, tokenizer=smol_tokenizer, name=model_type, source_path="",
                         device=torch.device("cpu"), dtype=torch.float32, max_model_len=256,
                         eos_token_ids=frozenset())
    config = build_config({"max_num_batched_tokens": 32, "num_kv_blocks": 64, "block_size": 16}, env={})
    engine = LLMEngine(loaded, config)
    got = engine.generate(PROMPTS, [SamplingParams(temperature=0.0, max_tokens=n) for n in NEW_TOKENS])
    for prompt, n, tokens in zip(PROMPTS, NEW_TOKENS, got):
        with torch.inference_mode():
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=n,
                                     do_sample=False, pad_token_id=0)
        assert tokens == out[0, len(prompt):].tolist(), f"{model_type}: prompt of {len(prompt)} tokens"
    assert engine.stats().kv_blocks_used == 0
