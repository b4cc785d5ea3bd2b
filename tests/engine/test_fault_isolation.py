"""A failure that belongs to one request ends that request alone; the batch around it goes on unchanged.

Faults are injected into a real engine on a tiny random model: NaN logits in one row, an exception while
sampling one request, an exception while detokenizing one request's output."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.engine.outputs import RequestOutput
from nitro_torch.models.loader import load_model
from nitro_torch.runner import sampler as sampler_module
from nitro_torch.runner.attention import register_paged_attention
from nitro_torch.sampling import SamplingParams

PROMPTS = {f"r{i}": list(range(400 + i, 420 + 3 * i)) for i in range(4)}
VICTIM = "r2"


@pytest.fixture
def engine(tiny_model_dir: str) -> LLMEngine:
    config = build_config({"model": tiny_model_dir, "device": "cpu", "num_kv_blocks": 64}, env={})
    return LLMEngine(load_model(config.model, attn_implementation=register_paged_attention()), config)


def run_all(engine: LLMEngine, params: Callable[[str], SamplingParams]) -> dict[str, list[RequestOutput]]:
    for request_id, prompt in PROMPTS.items():
        engine.add_request(request_id, prompt, params(request_id))
    outputs: dict[str, list[RequestOutput]] = {request_id: [] for request_id in PROMPTS}
    while engine.has_unfinished_requests:
        for output in engine.step():
            outputs[output.request_id].append(output)
    assert engine.block_manager.num_used_blocks == 0
    return outputs


def greedy(request_id: str) -> SamplingParams:
    return SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def tokens(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def assert_only_victim_failed(outputs: dict[str, list[RequestOutput]], clean: dict[str, list[RequestOutput]],
                              reason: str) -> None:
    final = outputs[VICTIM][-1]
    assert final.finished and final.error and reason in final.error
    for request_id in PROMPTS:
        if request_id != VICTIM:
            assert outputs[request_id][-1].error is None
            assert tokens(outputs[request_id]) == tokens(clean[request_id])


@pytest.fixture
def clean(tiny_model_dir: str) -> dict[str, list[RequestOutput]]:
    config = build_config({"model": tiny_model_dir, "device": "cpu", "num_kv_blocks": 64}, env={})
    engine = LLMEngine(load_model(config.model, attn_implementation=register_paged_attention()), config)
    return run_all(engine, greedy)


def poison_rows(engine: LLMEngine, after_tokens: int) -> None:
    """From now on the victim's logits rows are NaN once it has produced `after_tokens` tokens."""
    execute = engine.runner.execute

    def poisoned(plan, previous=None):  # noqa: ANN001, ANN202
        logits, requests = execute(plan, previous)
        if logits is not None:
            logits = logits.clone()
        for row, request in enumerate(requests):
            if request.request_id == VICTIM and request.num_output_tokens >= after_tokens:
                logits[row] = float("nan")
        return logits, requests

    engine.runner.execute = poisoned  # type: ignore[method-assign]


def test_nan_logits_fail_only_their_request(engine: LLMEngine, clean: dict[str, list[RequestOutput]]) -> None:
    poison_rows(engine, after_tokens=2)
    outputs = run_all(engine, greedy)
    assert_only_victim_failed(outputs, clean, "non-finite logits")
    assert tokens(outputs[VICTIM]) == tokens(clean[VICTIM])[:2]  # what it produced before the fault stays


def test_nan_logits_with_logprobs_and_sampling(engine: LLMEngine, clean: dict[str, list[RequestOutput]]) -> None:
    def mixed(request_id: str) -> SamplingParams:
        if request_id == "r1":
            return SamplingParams(max_tokens=6, temperature=0.8, seed=1, ignore_eos=True)
        return SamplingParams(max_tokens=6, temperature=0, logprobs=2, ignore_eos=True)

    poison_rows(engine, after_tokens=0)
    outputs = run_all(engine, mixed)
    assert outputs[VICTIM][-1].error and not tokens(outputs[VICTIM])
    for request_id in ("r0", "r3"):
        assert tokens(outputs[request_id]) == tokens(clean[request_id])


def test_a_sampling_exception_fails_only_its_request(engine: LLMEngine, clean: dict[str, list[RequestOutput]],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    apply_logit_bias = sampler_module.apply_logit_bias

    def failing(scores: torch.Tensor, requests) -> None:  # noqa: ANN001
        if any(r.request_id == VICTIM and r.num_output_tokens >= 3 for r in requests):
            raise IndexError("injected")
        apply_logit_bias(scores, requests)

    monkeypatch.setattr(sampler_module, "apply_logit_bias", failing)

    def biased(request_id: str) -> SamplingParams:  # a zero bias: the full sampling path, greedy tokens
        return SamplingParams(max_tokens=6, temperature=0, logit_bias={5: 0.0}, ignore_eos=True)

    outputs = run_all(engine, biased)
    assert_only_victim_failed(outputs, clean, "sampling failed: IndexError")
    assert len(tokens(outputs[VICTIM])) == 3


def test_a_detokenizer_exception_fails_only_its_request(engine: LLMEngine,
                                                        clean: dict[str, list[RequestOutput]]) -> None:
    for request_id, prompt in PROMPTS.items():
        engine.add_request(request_id, prompt, greedy(request_id))
    detokenizer = engine.processor.requests[VICTIM].detokenizer

    def broken(token_id: int) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

    detokenizer.add = broken  # type: ignore[method-assign]
    outputs: dict[str, list[RequestOutput]] = {request_id: [] for request_id in PROMPTS}
    while engine.has_unfinished_requests:
        for output in engine.step():
            outputs[output.request_id].append(output)
    assert_only_victim_failed(outputs, clean, "output processing failed: UnicodeDecodeError")
    assert engine.block_manager.num_used_blocks == 0 and not engine.core.requests and not engine.processor.requests


def test_out_of_memory_backs_off_and_retries(engine: LLMEngine, clean: dict[str, list[RequestOutput]]) -> None:
    """A step that runs out of device memory is dropped and retried smaller: a halved token budget and the
    newest request preempted (recomputed later). Nobody fails and the tokens are unchanged."""
    execute = engine.runner.execute
    budget = engine.scheduler.max_num_batched_tokens
    calls = {"oom": 0}

    def out_of_memory_once_decoding(step, previous=None):  # noqa: ANN001, ANN202
        if calls["oom"] == 0 and sum(n == 1 for n in step.num_scheduled_tokens.values()) >= 3:
            calls["oom"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return execute(step, previous)

    engine.runner.execute = out_of_memory_once_decoding  # type: ignore[method-assign]
    outputs = run_all(engine, greedy)
    assert calls["oom"] == 1
    assert engine.scheduler.max_num_batched_tokens == budget // 2
    assert engine.scheduler.stats.num_preemptions == 1
    for request_id in PROMPTS:
        assert outputs[request_id][-1].error is None
        assert tokens(outputs[request_id]) == tokens(clean[request_id])


def test_out_of_memory_with_nothing_left_to_shrink_raises(engine: LLMEngine) -> None:
    engine.scheduler.max_num_batched_tokens = engine.block_manager.block_size

    def always_oom(plan, previous=None):  # noqa: ANN001, ANN202
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    engine.runner.execute = always_oom  # type: ignore[method-assign]
    engine.add_request("alone", PROMPTS["r0"], greedy("alone"))
    with pytest.raises(torch.OutOfMemoryError):
        engine.step()
