"""Tensor parallelism on the CPU (gloo, 2 ranks): the engine with a model split over two processes gives the
single-process engine's greedy tokens and transformers' `generate`'s, through chunked prefills, prefix hits and
preemptions; each rank holds half of the weights and of the KV cache; a worker that dies makes the next step
raise instead of hang; what cannot be split is refused by name."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from nitro_torch.config import ConfigError, build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.models.tensor_parallel import check_splittable, has_tensor_parallel_plan, local_weight_bytes
from nitro_torch.runner.parallel.group import RanksLost, current_ranks
from nitro_torch.sampling import SamplingParams

SYSTEM = ("You are a careful assistant who answers in short sentences, names your sources, and never makes up "
          "facts you are not sure of.")
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three fruits.",
             "What is 12 times 12?", "Describe a cat in one sentence.", "Give me a tip for learning Python."]
MAX_TOKENS = [40, 24, 44, 16, 36, 40]
OPTIONS = {"device": "cpu", "max_num_batched_tokens": 24, "max_num_seqs": 6, "num_kv_blocks": 10,
           "block_size": 16}
"""A step budget below every prompt's length (chunked prefills) and too few blocks for all six at once
(preemptions); the shared system prompt gives prefix hits."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smol_tokenizer) -> str:
    from tests.tiny_models import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tp-llama"), smol_tokenizer, initializer_range=0.4))


def make_engine(model_dir: str, size: int, **options: object) -> LLMEngine:
    config = build_config({"model": model_dir, "tensor_parallel_size": size, **OPTIONS, **options}, env={})
    return LLMEngine.from_config(config)


@pytest.fixture(scope="module")
def single(model_dir: str) -> LLMEngine:
    return make_engine(model_dir, 1)


@pytest.fixture(scope="module")
def split(model_dir: str):
    engine = make_engine(model_dir, 2)
    yield engine
    engine.close()
    assert current_ranks() is None


@pytest.fixture(scope="module")
def prompts(single: LLMEngine) -> list[list[int]]:
    return [single.tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                                  {"role": "user", "content": q}],
                                                 add_generation_prompt=True, tokenize=True, return_dict=False)
            for q in QUESTIONS]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def run(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    return engine.generate(prompts, [greedy(n) for n in MAX_TOKENS])


def test_greedy_tokens_equal_one_process_and_transformers(single, split, prompts, model_dir) -> None:
    assert min(len(p) for p in prompts) > OPTIONS["max_num_batched_tokens"]  # every prompt is chunked
    before = split.stats()
    got = run(split, prompts)
    stats = split.stats()
    assert got == run(single, prompts)
    assert stats.num_preemptions > before.num_preemptions
    assert stats.prefix_cache_hit_tokens > before.prefix_cache_hit_tokens
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, n, tokens in zip(prompts, MAX_TOKENS, got):
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=2)
        assert out[0, len(prompt):].tolist() == tokens
    assert len(set(map(tuple, got))) == len(got)  # distinct answers: the comparison means something


def test_seeded_sampling_follows_rank_0(single, split, prompts) -> None:
    """Only rank 0 samples; the other rank learns its tokens with the next step."""
    params = [SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=7 + i) for i in range(3)]
    assert split.generate(prompts[:3], params) == single.generate(prompts[:3], params)


def forked(engine: LLMEngine, prompt: list[int]) -> list[list[int]]:
    """n = 3 choices of one prompt: the children share the parent's prompt KV (its last block copied per child)."""
    params = [SamplingParams(max_tokens=12, temperature=0.9, seed=i) for i in range(3)]
    requests = [engine.add_request("fork-0", prompt, params[0])]
    requests += [engine.add_request(f"fork-{i}", prompt, params[i], parent_id="fork-0") for i in (1, 2)]
    while engine.has_unfinished_requests:
        engine.step()
    return [r.output_token_ids for r in requests]


def test_forks_copy_blocks_on_every_rank(single, split, prompts, monkeypatch) -> None:
    prompt = prompts[0][:-5]  # a partial last block: each child gets a copy of it
    assert len(prompt) % OPTIONS["block_size"]
    copies: list[tuple[int, int]] = []
    execute = split.runner.execute

    def counting_execute(step, previous=None):  # type: ignore[no-untyped-def]
        copies.extend(step.block_copies)
        return execute(step, previous)

    monkeypatch.setattr(split.runner, "execute", counting_execute)
    assert forked(split, prompt) == forked(single, prompt)
    assert len(copies) == 2


def test_each_rank_holds_half_of_the_weights_and_of_the_kv_cache(single, split) -> None:
    reports = split.core.rank_reports
    assert [r.rank for r in reports] == [0, 1]
    whole = local_weight_bytes(single.loaded.model)
    for report in reports:
        assert abs(report.weight_bytes - whole / 2) < 0.01 * whole  # norms are replicated: a sliver more
        assert report.kv_cache_bytes * 2 == single.kv_cache.nbytes
    assert split.kv_cache.num_blocks == single.kv_cache.num_blocks
    assert split.kv_cache.layout.num_kv_heads * 2 == single.kv_cache.layout.num_kv_heads
    assert split.info.tensor_parallel_size == 2 and len(split.info.ranks) == 2
    assert split.info.kv_cache_bytes == single.kv_cache.nbytes


def test_embeddings_run_on_every_rank(single, split, prompts) -> None:
    vectors = torch.tensor(split.core.embed(prompts[:3]))
    assert torch.allclose(vectors, torch.tensor(single.core.embed(prompts[:3])), atol=1e-5)


def test_a_dead_worker_fails_the_next_step_instead_of_hanging(model_dir, prompts, split) -> None:
    split.close()  # one group per process: the module's engine makes room (its tests ran above)
    engine = make_engine(model_dir, 2, num_kv_blocks=64)
    try:
        ranks = engine.core.ranks
        assert ranks is not None
        engine.add_request("r", prompts[0], greedy(200))
        engine.step()
        os.kill(ranks.worker_pids[0], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(RanksLost, match="rank 1"):
            while engine.has_unfinished_requests:
                engine.step()
        assert time.monotonic() - started < 10
    finally:
        engine.close()
    assert current_ranks() is None


def test_the_default_model_over_three_ranks_answers_as_transformers(default_model_dir, split) -> None:
    """A real model: SmolLM2-135M-Instruct's 9 heads and 3 KV heads split over 3 ranks."""
    split.close()
    engine = LLMEngine.from_config(build_config({"model": "default", "device": "cpu", "cpu_weights": "fp32",
                                                 "tensor_parallel_size": 3, "max_num_batched_tokens": 64}, env={}))
    try:
        assert [r.rank for r in engine.core.rank_reports] == [0, 1, 2]
        prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                        tokenize=True, return_dict=False) for q in QUESTIONS[:3]]
        got = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0))
        eos = sorted(engine.loaded.eos_token_ids)
    finally:
        engine.close()
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    for prompt, tokens in zip(prompts, got):
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=eos,
                                 pad_token_id=2)
        assert out[0, len(prompt):].tolist() == tokens


def test_heads_that_do_not_divide_are_refused_by_name(default_model_dir) -> None:
    with pytest.raises(ConfigError, match="9 attention heads.*--tensor-parallel-size 2"):
        check_splittable(default_model_dir, 2)
    check_splittable(default_model_dir, 3)  # 9 heads and 3 KV heads split over 3 ranks


def test_a_model_without_a_plan_is_refused(tmp_path: Path) -> None:
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    assert not has_tensor_parallel_plan(GPT2Config())
    with pytest.raises(ConfigError, match="GPT2.*no tensor-parallel plan.*--device-map auto"):
        check_splittable(str(tmp_path), 2)


@pytest.mark.parametrize(("options", "message"), [
    ({"quantization": "bnb-4bit"}, "bitsandbytes weights have no tensor-parallel path"),
    ({"device_map": "auto"}, "--device-map auto"),
    ({"cpu_weights": "int4"}, "packed CPU weights cannot be split"),
    ({"engine_core": "thread"}, "its own process"),
    ({"tensor_parallel_size": 0}, "at least 1"),
])
def test_options_that_cannot_be_split_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({"tensor_parallel_size": 2, **options}, env={})
