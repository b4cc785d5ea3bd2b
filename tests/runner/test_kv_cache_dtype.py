"""--kv-cache-dtype: packed CPU weights keep a float16 cache by default (half the bytes attention reads), which
attends as the float32 cache does up to float16 rounding; float models keep their own dtype."""

from __future__ import annotations

import statistics

import pytest
import torch

from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.models.loader import load_model
from nitro_torch.runner.attention import register_paged_attention, set_attention_backend
from nitro_torch.runner.memory import kv_cache_dtype
from nitro_torch.sampling import SamplingParams
from tests.runner.test_architectures import PROMPTS
from tests.runner.test_cuda_graphs import run_in_lockstep
from tests.runner.test_lean_decoder import packed_engine

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_float16_only_for_a_float32_model_with_packed_cpu_weights() -> None:
    assert kv_cache_dtype("auto", torch.float32, CPU, packed_weights=True) == torch.float16
    assert kv_cache_dtype("auto", torch.float32, CPU, packed_weights=False) == torch.float32  # token-identical mode
    assert kv_cache_dtype("auto", torch.bfloat16, CPU, packed_weights=True) == torch.bfloat16
    assert kv_cache_dtype("auto", torch.bfloat16, CUDA, packed_weights=False) == torch.bfloat16
    assert kv_cache_dtype("float32", torch.float32, CPU, packed_weights=True) == torch.float32
    assert kv_cache_dtype("bfloat16", torch.float32, CPU, packed_weights=False) == torch.bfloat16


QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
             "Explain in one sentence what a KV cache stores in a transformer model."]


@pytest.fixture(scope="module")
def embedded_packed():
    """The embedded model with its default packed weights (its answers are peaked, unlike a random model's)."""
    config = build_config({"model": "default", "device": "cpu", "cpu_weights": "auto"}, env={})
    return load_model(config.model, attn_implementation=register_paged_attention())


def logprob_trails(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[tuple[int, float]]]:
    """Per prompt, its greedy tokens with their logprobs, all prompts in one batch (decodes beside prefills)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True)
    trails: dict[str, list[tuple[int, float]]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
        trails[f"r{i}"] = []
    while engine.has_unfinished_requests:
        for output in engine.step():
            assert output.logprobs is not None and output.error is None
            trails[output.request_id] += [(lp.token_id, lp.logprob) for lp in output.logprobs]
    return list(trails.values())


def logprob_differences(got: list[list[tuple[int, float]]], want: list[list[tuple[int, float]]]
                        ) -> tuple[list[float], int]:
    """|logprob - wanted| at each position of each trail up to its first differing token (a near tie broken the
    other way: later positions see other contexts), and how many wanted logprobs were confident (> -0.5)."""
    differences, confident = [], 0
    for got_trail, want_trail in zip(got, want, strict=True):
        assert len(got_trail) == len(want_trail)
        for (token, logprob), (want_token, want_logprob) in zip(got_trail, want_trail):
            differences.append(abs(logprob - want_logprob))
            confident += want_logprob > -0.5
            if token != want_token:
                break
    return differences, confident


def test_a_float16_cache_attends_as_the_float32_cache_does(embedded_packed) -> None:
    # Prompts in chunks; no step time limit, so both engines batch alike (packed weights' bf16 rounding of the
    # activations depends on the batch).
    options = {"device": "cpu", "cpu_decode_compile": "off", "max_num_batched_tokens": 64, "max_step_time": 0,
               "num_kv_blocks": 64}  # not the 1 GiB default per engine
    half = LLMEngine(embedded_packed, build_config(options, env={}))
    full = LLMEngine(embedded_packed, build_config({**options, "kv_cache_dtype": "float32"}, env={}))
    assert half.core.kv_cache.keys[0].dtype == torch.float16 and half.info.kv_cache_dtype == "float16"
    assert full.core.kv_cache.keys[0].dtype == torch.float32 and full.info.kv_cache_dtype == "float32"
    assert half.core.kv_cache.layout.bytes_per_block * 2 == full.core.kv_cache.layout.bytes_per_block
    tokenizer = embedded_packed.tokenizer
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for q in QUESTIONS]
    got, want = logprob_trails(half, prompts, 16), logprob_trails(full, prompts, 16)
    assert [len(trail) for trail in got] == [16] * len(prompts)
    differences, confident = logprob_differences(got, want)
    # float16 K/V perturb the bf16-rounded activations after them: logprobs move by ~0.01 (at most 0.1 seen); a
    # wrong attention moves them by whole units.
    assert len(differences) >= 40 and confident >= 20
    assert max(differences) < 0.25 and statistics.median(differences) < 0.03
    assert half.stats().kv_blocks_used == 0


def test_a_bfloat16_cache_serves_a_float32_model(smol_tokenizer) -> None:
    engine = packed_engine("qwen2", "int4", smol_tokenizer, kv_cache_dtype="bfloat16")
    assert engine.core.kv_cache.values[0].dtype == torch.bfloat16
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert [len(tokens) for tokens in outputs] == [8] * len(PROMPTS)


def test_the_triton_kernels_attend_over_a_float16_cache_as_torch_does(tiny_model_dir: str) -> None:
    """A float32 model over a float16 cache: queries and fresh K/V go to the kernels in the cache's dtype (Triton's
    interpreter on CPU), and their logits agree with the torch path's at every step."""
    config = build_config({"model": tiny_model_dir, "device": "cpu", "max_num_seqs": 8, "max_num_batched_tokens": 32,
                           "num_kv_blocks": 64, "kv_cache_dtype": "float16"}, env={})
    engine = LLMEngine(load_model(config.model, attn_implementation=register_paged_attention()), config)
    assert engine.core.kv_cache.keys[0].dtype == torch.float16
    try:
        steps = run_in_lockstep(engine, {"torch": lambda: set_attention_backend("torch"),
                                         "triton": lambda: set_attention_backend("triton")}, max_tokens=3)
    finally:
        set_attention_backend("auto")
    assert steps >= 4
