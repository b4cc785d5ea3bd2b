"""--async-scheduling on a real (tiny, random) model: each step is planned and launched while the previous one runs,
and every request still gets the tokens of the synchronous engine, whatever it asks for."""

from __future__ import annotations

import pytest
import torch

from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.models.loader import load_model
from nitro_torch.runner.attention import register_paged_attention
from nitro_torch.sampling import SamplingParams

PROMPTS = {f"r{i}": list(range(300 + 7 * i, 312 + 9 * i)) for i in range(8)}


def make_engine(model_dir: str, async_scheduling: bool, **options: object) -> LLMEngine:
    config = build_config({"model": model_dir, "device": "cpu", "num_kv_blocks": 8, "max_num_seqs": 6,
                           "max_num_batched_tokens": 40, "async_scheduling": async_scheduling, **options}, env={})
    return LLMEngine(load_model(config.model, attn_implementation=register_paged_attention()), config)


def params_for(request_id: str) -> SamplingParams:
    """Mostly plain greedy (those steps overlap), with rows that make a step run in step: penalties, a seeded
    draw, logprobs, min_tokens, stop tokens."""
    special = {
        "r1": SamplingParams(temperature=0, max_tokens=14, repetition_penalty=1.3, presence_penalty=0.5),
        "r3": SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12),
        "r5": SamplingParams(temperature=0, max_tokens=9, logprobs=2),
        "r6": SamplingParams(temperature=0, max_tokens=16, min_tokens=6, stop_token_ids=[5, 9, 11]),
    }
    return special.get(request_id, SamplingParams(temperature=0, max_tokens=10 + int(request_id[1:]) * 3,
                                                  ignore_eos=True))


def run(engine: LLMEngine, abort_after: int | None = None,
        two_clients: bool = False) -> dict[str, tuple[list[int], str | None]]:
    def client(request_id: str) -> str:
        return "light" if two_clients and request_id in ("r2", "r5") else "heavy"

    for request_id, prompt in PROMPTS.items():
        engine.add_request(request_id, prompt, params_for(request_id), client=client(request_id))
    engine.add_request("r0-fork", PROMPTS["r0"], params_for("r0"), parent_id="r0",  # n > 1: shares r0's prefill
                       client=client("r0"))
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str | None] = {}
    steps = 0
    while engine.has_unfinished_requests:
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
            if output.finished:
                reasons[output.request_id] = output.finish_reason
        steps += 1
        if steps == abort_after:
            aborted = engine.abort("r2")
            assert aborted is not None and aborted.finished
            reasons["r2"] = aborted.finish_reason
    assert engine.block_manager.num_used_blocks == 0
    return {request_id: (tokens.get(request_id, []), reasons.get(request_id)) for request_id in reasons}


def count_overlaps(engine: LLMEngine) -> list[bool]:
    launches: list[bool] = []
    launch = engine.runner.launch

    def counted(step, overlap, previous=None):  # noqa: ANN001, ANN202
        launches.append(overlap)
        return launch(step, overlap, previous)

    engine.runner.launch = counted  # type: ignore[method-assign]
    return launches


def test_every_request_gets_the_synchronous_tokens(tiny_model_dir: str) -> None:
    expected = run(make_engine(tiny_model_dir, async_scheduling=False))
    overlapped = make_engine(tiny_model_dir, async_scheduling=True)
    launches = count_overlaps(overlapped)
    assert run(overlapped) == expected
    assert overlapped.stats().num_preemptions > 0  # 8 blocks of 16 for 9 requests: some are recomputed
    assert launches.count(True) > 10 and launches.count(False) > 0  # greedy steps overlapped, the others did not


def test_fair_shares_between_two_clients_keep_the_synchronous_tokens(tiny_model_dir: str) -> None:
    """Under fair shares the heavy client's requests sit out steps (and take turns); in step or overlapped, every
    request still gets the tokens it gets first come, first served."""
    expected = run(make_engine(tiny_model_dir, async_scheduling=False, fair_share=False), two_clients=True)
    for async_scheduling in (False, True):
        engine = make_engine(tiny_model_dir, async_scheduling=async_scheduling)
        skipped = []
        schedule = engine.scheduler.schedule

        def counting_schedule():  # noqa: ANN202
            plan = schedule()
            scheduled = {item.request.request_id for item in plan.scheduled}
            skipped.append(sum(r.client == "heavy" and r.request_id not in scheduled
                               for r in engine.scheduler.running))
            return plan

        engine.scheduler.schedule = counting_schedule  # type: ignore[method-assign]
        assert run(engine, two_clients=True) == expected
        assert sum(skipped) >= 5, skipped  # heavy requests sat out steps while light ones ran


def test_an_abort_while_a_step_is_in_flight_drops_its_token(tiny_model_dir: str) -> None:
    expected = run(make_engine(tiny_model_dir, async_scheduling=False), abort_after=6)
    got = run(make_engine(tiny_model_dir, async_scheduling=True), abort_after=6)
    assert got["r2"][1] == "abort"
    assert {k: v for k, v in got.items() if k != "r2"} == {k: v for k, v in expected.items() if k != "r2"}


def test_broken_logits_end_one_request_and_never_reach_the_next_steps_input(tiny_model_dir: str) -> None:
    engine = make_engine(tiny_model_dir, async_scheduling=True, max_num_seqs=8, num_kv_blocks=64)
    execute = engine.runner.execute

    def poisoned(step, previous=None):  # noqa: ANN001, ANN202
        logits, rows = execute(step, previous)
        if logits is not None:
            logits = logits.clone()
            for row, state in enumerate(rows):
                if state.request_id == "r4" and state.num_output_tokens >= 2:
                    logits[row] = float("nan")
        return logits, rows

    engine.runner.execute = poisoned  # type: ignore[method-assign]
    clean = run(make_engine(tiny_model_dir, async_scheduling=False, max_num_seqs=8, num_kv_blocks=64))
    got = run(engine)
    assert got["r4"][1] == "abort" and len(got["r4"][0]) <= 3
    assert {k: v for k, v in got.items() if k != "r4"} == {k: v for k, v in clean.items() if k != "r4"}


def test_out_of_memory_in_a_launch_rewinds_and_retries(tiny_model_dir: str) -> None:
    expected = run(make_engine(tiny_model_dir, async_scheduling=False))
    engine = make_engine(tiny_model_dir, async_scheduling=True)
    execute = engine.runner.execute
    calls = {"n": 0}

    def out_of_memory_once(step, previous=None):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 8:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return execute(step, previous)

    engine.runner.execute = out_of_memory_once  # type: ignore[method-assign]
    assert run(engine) == expected
    assert calls["n"] > 8


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_the_runner_holds_only_live_requests_after_a_run(tiny_model_dir: str, async_scheduling: bool) -> None:
    engine = make_engine(tiny_model_dir, async_scheduling=async_scheduling)
    run(engine)
    engine.add_request("after", PROMPTS["r0"], SamplingParams(temperature=0, max_tokens=2))
    engine.step()
    assert set(engine.runner.requests) == {"after"}


def test_a_step_time_limit_keeps_the_synchronous_tokens(tiny_model_dir: str) -> None:
    """--max-step-time far below any step: once the engine has timed a few steps, each runs one decode (they take
    turns) and at most one prompt chunk; in step or overlapped, every request still gets the tokens of unlimited
    steps."""
    expected = run(make_engine(tiny_model_dir, async_scheduling=False, max_step_time=0))
    for async_scheduling in (False, True):
        engine = make_engine(tiny_model_dir, async_scheduling=async_scheduling, max_step_time=1e-9)
        sizes = []
        schedule = engine.scheduler.schedule

        def counting_schedule():  # noqa: ANN202
            plan = schedule()
            sizes.append((sum(item.num_tokens == 1 for item in plan.scheduled),
                          sum(item.num_tokens > 1 for item in plan.scheduled)))
            return plan

        engine.scheduler.schedule = counting_schedule  # type: ignore[method-assign]
        assert run(engine) == expected
        assert engine.scheduler.step_time.ready
        assert all(decodes <= 1 and prompts <= 1 for decodes, prompts in sizes[10:]), sizes
        assert sum(decodes for decodes, _ in sizes[10:]) > 50
