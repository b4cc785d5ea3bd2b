"""The engine on the real SmolLM2 model: greedy tokens equal HF generate, alone, batched, preempted, cached."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.models.loader import load_model
from nitro_torch.runner.attention import register_paged_attention
from nitro_torch.sampling import SamplingParams

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are a pirate. Answer like one."}, {"role": "user", "content": "How are you today?"}],
    [{"role": "user", "content": "List three fruits and their colours."}],
    [{"role": "user", "content": "What is 12 times 12? Explain step by step."}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Who won the world series in 2020?"},
        {"role": "assistant", "content": "The Los Angeles Dodgers won the World Series in 2020."},
        {"role": "user", "content": "Where was it played?"},
    ],
    [{"role": "user", "content": "Give me a short tip for learning Python."}],
    [{"role": "user", "content": "Describe a cat in one sentence."}],
    [{"role": "system", "content": "Reply in French."}, {"role": "user", "content": "Good morning! What's the weather like on the moon?"}],
]
MAX_TOKENS = [20, 8, 24, 12, 28, 16, 22, 10, 18]


def make_engine(**options: object) -> LLMEngine:
    """Float weights: the mode that is token-identical to transformers (packed CPU weights are not)."""
    config = build_config({"model": "default", "device": "cpu", "cpu_weights": "fp32", **options}, env={})
    return LLMEngine(load_model(config.model, attn_implementation=register_paged_attention()), config)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return make_engine(max_num_seqs=16, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def prompts(engine: LLMEngine) -> list[list[int]]:
    return [engine.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
            for c in CHATS]


@pytest.fixture(scope="module")
def expected(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    """HF generate, one chat at a time, greedy, stopping at EOS like the engine."""
    model = AutoModelForCausalLM.from_pretrained(engine.loaded.source_path, dtype=torch.float32).eval()
    outputs = []
    for prompt, n in zip(prompts, MAX_TOKENS):
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                 eos_token_id=sorted(engine.loaded.eos_token_ids), pad_token_id=2)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n)


def test_one_at_a_time_matches_hf(engine: LLMEngine, prompts: list[list[int]], expected: list[list[int]]) -> None:
    got = [engine.generate([p], greedy(n))[0] for p, n in zip(prompts, MAX_TOKENS)]
    assert got == expected
    assert any(len(e) < n for e, n in zip(expected, MAX_TOKENS)), "some answer should end with EOS"


def test_one_continuous_batch_matches_hf(engine: LLMEngine, prompts: list[list[int]],
                                         expected: list[list[int]]) -> None:
    got = engine.generate(prompts, [greedy(n) for n in MAX_TOKENS])
    assert got == expected
    assert engine.stats().kv_blocks_used == 0


def test_chunked_prefill_matches_hf(prompts: list[list[int]], expected: list[list[int]]) -> None:
    small_budget = make_engine(max_num_batched_tokens=24, max_num_seqs=4)
    assert max(len(p) for p in prompts) > 24
    assert small_budget.generate(prompts, [greedy(n) for n in MAX_TOKENS]) == expected


def test_preemption_recomputes_same_tokens(prompts: list[list[int]], expected: list[list[int]]) -> None:
    need = max(len(p) + n for p, n in zip(prompts, MAX_TOKENS))
    tight = make_engine(num_kv_blocks=-(-need // 16) + 2, max_num_seqs=8, prefix_caching=False)
    got = tight.generate(prompts, [greedy(n) for n in MAX_TOKENS])
    assert tight.stats().num_preemptions > 0
    assert got == expected
    assert tight.stats().kv_blocks_used == 0


@pytest.mark.parametrize("options", [{"max_num_seqs": 16, "max_num_batched_tokens": 256},
                                     {"max_num_batched_tokens": 24, "max_num_seqs": 4, "prefix_caching": False}],
                         ids=["batched", "chunked+preempted"])
def test_asynchronous_scheduling_matches_hf(prompts: list[list[int]], expected: list[list[int]],
                                            options: dict[str, object]) -> None:
    """Each step is planned while the previous one runs (the sampled ids come back one step behind)."""
    if options.get("prefix_caching") is False:
        need = max(len(p) + n for p, n in zip(prompts, MAX_TOKENS))
        options = {**options, "num_kv_blocks": -(-need // 16) + 2}
    overlapped = make_engine(async_scheduling=True, **options)
    assert overlapped.generate(prompts, [greedy(n) for n in MAX_TOKENS]) == expected
    assert overlapped.stats().kv_blocks_used == 0
    if "num_kv_blocks" in options:
        assert overlapped.stats().num_preemptions > 0


def test_prefix_cache_reuses_shared_system_prompt(engine: LLMEngine) -> None:
    system = {"role": "system", "content": "You are a meticulous travel agent. " * 12}
    chats = [[system, {"role": "user", "content": q}] for q in ("Plan a day in Rome.", "Plan a day in Oslo.")]
    prompts = [engine.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
               for c in chats]
    cached = make_engine(max_num_seqs=4)
    first = cached.generate([prompts[0]], greedy(12))
    hits_before = cached.stats().prefix_cache_hit_tokens
    second = cached.generate([prompts[1]], greedy(12))
    hit_tokens = cached.stats().prefix_cache_hit_tokens - hits_before
    assert hit_tokens >= 64
    uncached = make_engine(max_num_seqs=4, prefix_caching=False)
    assert uncached.generate(prompts, greedy(12)) == first + second
    assert uncached.stats().prefix_cache_hit_tokens == 0


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_forked_choices_share_one_prefill_and_match_hf(prompts: list[list[int]], expected: list[list[int]],
                                                      prefix_caching: bool) -> None:
    engine = make_engine(max_num_seqs=8, prefix_caching=prefix_caching)
    computed: list[int] = []
    execute = engine.runner.execute
    engine.runner.execute = lambda step, previous=None: (computed.append(step.total_num_scheduled_tokens),
                                                         execute(step, previous))[1]
    prompt, n = prompts[2], MAX_TOKENS[2]
    parent = engine.add_request("choice-0", prompt, greedy(n))
    children = [engine.add_request(f"choice-{i}", prompt, greedy(n), parent_id="choice-0") for i in (1, 2)]
    while engine.has_unfinished_requests:
        engine.step()
    assert [r.output_token_ids for r in (parent, *children)] == [expected[2]] * 3
    assert sum(computed) == len(prompt) + 2 + 3 * (len(expected[2]) - 1)
    assert engine.stats().kv_blocks_used == 0
