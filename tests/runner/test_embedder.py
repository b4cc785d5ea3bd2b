"""Embeddings through the engine (tiny random-weight models): packed cache-free forwards equal HF's own forward
of each input alone, chunking and packing do not change results, and the KV cache and running requests are
left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.models.loader import LoadedModel
from nitro_torch.runner.attention import register_paged_attention
from nitro_torch.runner.embedder import Embedder, pack_batches
from nitro_torch.sampling import SamplingParams

VOCAB = 512
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "head_dim": 16,
          "eos_token_id": None, "bos_token_id": None, "pad_token_id": 0}
ARCHITECTURES = {
    "llama": {},
    "mistral": {"sliding_window": 12},
    "gemma2": {"sliding_window": 12, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 30.0},
}
INPUTS = [[5, 17, 99, 3, 250, 41, 7], list(range(100, 140)), [300], list(range(7, 30, 2)), [8, 9, 10, 11]]


def tiny_model(model_type: str, attn_implementation: str) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **COMMON, **ARCHITECTURES[model_type])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


def make_engine(model: torch.nn.Module, tokenizer, max_num_batched_tokens: int = 64) -> LLMEngine:
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name="tiny", source_path="", device=torch.device("cpu"),
                         dtype=torch.float32, max_model_len=256, eos_token_ids=frozenset())
    config = build_config({"max_num_batched_tokens": max_num_batched_tokens, "num_kv_blocks": 64,
                           "block_size": 16}, env={})
    return LLMEngine(loaded, config)


@pytest.fixture(scope="module")
def llama_engine(smol_tokenizer) -> LLMEngine:
    return make_engine(tiny_model("llama", register_paged_attention()), smol_tokenizer)


def hf_embedding(reference: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        hidden = reference.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    return F.normalize(hidden.double().mean(dim=0), dim=-1)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_packed_embeddings_match_hf_forward_of_each_input(model_type: str, smol_tokenizer) -> None:
    model = tiny_model(model_type, register_paged_attention())
    reference = tiny_model(model_type, "eager")
    reference.load_state_dict(model.state_dict())
    got = torch.tensor(make_engine(model, smol_tokenizer).embed(INPUTS))
    assert got.shape == (len(INPUTS), COMMON["hidden_size"])
    for ids, vector in zip(INPUTS, got):
        torch.testing.assert_close(vector.double(), hf_embedding(reference, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(INPUTS)))


def test_one_by_one_equals_packed_and_repeats_are_identical(llama_engine) -> None:
    packed = llama_engine.embed(INPUTS)
    alone = [llama_engine.embed([ids])[0] for ids in INPUTS]
    torch.testing.assert_close(torch.tensor(alone), torch.tensor(packed), atol=1e-6, rtol=1e-6)
    assert llama_engine.embed(INPUTS) == packed  # same request, same bits
    assert len({tuple(v) for v in packed}) == len(INPUTS)  # different inputs, different vectors


def test_pack_batches_respects_the_token_budget() -> None:
    assert pack_batches([10, 10, 15, 40, 5, 5], 32) == [[0, 1], [2], [3], [4, 5]]
    assert pack_batches([32, 1], 32) == [[0], [1]]
    assert pack_batches([], 32) == []


def test_small_budget_splits_forwards_without_changing_results(llama_engine, smol_tokenizer, monkeypatch) -> None:
    small = make_engine(llama_engine.loaded.model, smol_tokenizer, max_num_batched_tokens=16)
    forwards: list[int] = []
    original = Embedder.forward

    def counting(self: Embedder, token_id_lists: list[list[int]]) -> torch.Tensor:
        forwards.append(sum(len(ids) for ids in token_id_lists))
        return original(self, token_id_lists)

    monkeypatch.setattr(Embedder, "forward", counting)
    got = small.embed(INPUTS)
    assert forwards == [7, 40, 1 + 12, 4]  # the 40-token input exceeds the budget and runs alone
    torch.testing.assert_close(torch.tensor(got), torch.tensor(llama_engine.embed(INPUTS)), atol=1e-6, rtol=1e-6)


def test_embedding_between_steps_leaves_generation_and_cache_alone(llama_engine) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompt = list(range(40, 75))
    expected = llama_engine.generate([prompt], params)[0]

    request = llama_engine.add_request("gen", prompt, params)
    for _ in range(4):
        llama_engine.step()
    cache_before = [t.clone() for t in (*llama_engine.kv_cache.keys, *llama_engine.kv_cache.values)]
    llama_engine.embed(INPUTS)
    cache_after = (*llama_engine.kv_cache.keys, *llama_engine.kv_cache.values)
    assert all(torch.equal(a, b) for a, b in zip(cache_before, cache_after))
    while llama_engine.has_unfinished_requests:
        llama_engine.step()
    assert request.output_token_ids == expected


def test_inputs_outside_the_context_are_refused(llama_engine) -> None:
    with pytest.raises(ValueError):
        llama_engine.embed([[1, 2], []])
    with pytest.raises(ValueError):
        llama_engine.embed([[1] * (llama_engine.max_model_len + 1)])
