"""Scheduler unit tests: decode-first batching, token budget, chunked prefill, preemption, stop rules, leaks.

Tensor-free: no torch, no model. A fake "model" drives the scheduler exactly like the engine does:
plan = schedule(); for every scheduled item with .samples a token is produced; update(plan, {id: token}).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from nitro_torch.engine.block_manager import BlockManager
from nitro_torch.engine.outputs import FinishReason
from nitro_torch.engine.request import Request, RequestStatus
from nitro_torch.engine.scheduler import Scheduler, StepPlan
from nitro_torch.sampling import SamplingParams

BS = 4
EOS = 2
TOKEN = 7


def make_request(request_id: str, prompt: list[int], max_tokens: int | None = 8, max_total_tokens: int = 0,
                 **params) -> Request:
    return Request(
        request_id, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0, **params),
        eos_token_ids=frozenset({EOS}), max_total_tokens=max_total_tokens,
    )


def make_scheduler(num_blocks: int = 64, budget: int = 64, max_num_seqs: int = 8,
                   prefix_caching: bool = True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, prefix_caching), budget, max_num_seqs)


Model = Callable[[Request], int]


def fixed(token: int = TOKEN) -> Model:
    return lambda request: token


def step(sched: Scheduler, model: Model = fixed()) -> tuple[StepPlan, list[Request]]:
    """One engine step: schedule, check the plan, "compute", sample where the plan says so, update."""
    plan = sched.schedule()
    check_plan(sched, plan)
    plan.samples_before_update = [s.samples for s in plan.scheduled]  # .samples changes once a token is added
    sampled = {s.request.request_id: model(s.request) for s in plan.scheduled if s.samples}
    finished = sched.update(plan, sampled)
    check_invariants(sched)
    return plan, finished


def summary(plan: StepPlan) -> list[tuple[str, int, int, bool]]:
    """(id, start_position, num_tokens, samples) per scheduled item, as it was when the step ran."""
    return [(s.request.request_id, s.start_position, s.num_tokens, flag)
            for s, flag in zip(plan.scheduled, plan.samples_before_update)]


def run_to_completion(sched: Scheduler, model: Model = fixed(), max_steps: int = 500) -> list[StepPlan]:
    plans = []
    while sched.has_work:
        plans.append(step(sched, model)[0])
        assert len(plans) < max_steps, "scheduler made no progress"
    return plans


def check_plan(sched: Scheduler, plan: StepPlan) -> None:
    assert plan.num_tokens <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    ids = [s.request.request_id for s in plan.scheduled]
    assert len(ids) == len(set(ids))
    for s in plan.scheduled:
        r = s.request
        assert s.num_tokens >= 1
        assert r.status is RequestStatus.RUNNING and r in sched.running
        assert s.start_position == r.num_computed_tokens
        assert s.start_position + s.num_tokens <= r.num_tokens
        # blocks cover everything the model writes this step
        assert len(r.block_ids) == sched.block_manager.blocks_needed(s.start_position + s.num_tokens)
    for r in plan.preempted:
        assert r.status is RequestStatus.WAITING and r.block_ids == [] and r.num_computed_tokens == 0
        assert r not in ids


def check_invariants(sched: Scheduler) -> None:
    bm = sched.block_manager
    tables = [r.block_ids for r in sched.running]
    owners: dict[int, set[int]] = {}
    for table in tables:
        assert len(table) == len(set(table)), f"duplicate block within a table: {table}"
        for pos, b in enumerate(table):
            owners.setdefault(b, set()).add(pos)
    assert sum(b.ref_count for b in bm.blocks) == sum(len(t) for t in tables)
    for block in bm.blocks:
        n = sum(t.count(block.block_id) for t in tables)
        assert block.ref_count == n
        if n > 1:  # a shared block is full and computed in every table, at the same position everywhere
            assert len(owners[block.block_id]) == 1
            (pos,) = owners[block.block_id]
            assert all((pos + 1) * BS <= r.num_computed_tokens
                       for r in sched.running if block.block_id in r.block_ids)
    assert set(bm._free) == {b.block_id for b in bm.blocks if b.ref_count == 0}
    for r in sched.waiting:
        assert r.status is RequestStatus.WAITING and r.block_ids == [] and r.num_computed_tokens == 0
    for r in sched.running:
        assert r.status is RequestStatus.RUNNING
        assert r.num_computed_tokens < r.num_tokens  # there is always a next token to compute
    assert not (set(map(id, sched.waiting)) & set(map(id, sched.running)))


def assert_all_free(sched: Scheduler) -> None:
    bm = sched.block_manager
    assert not sched.running and not sched.waiting and not sched.forks_waiting
    assert bm.num_free_blocks == bm.num_blocks and bm.num_used_blocks == 0
    assert all(b.ref_count == 0 for b in bm.blocks)


# --- add -----------------------------------------------------------------------------------------


def test_add_rejects_request_that_can_never_fit():
    sched = make_scheduler(num_blocks=4)  # 16 tokens of KV
    with pytest.raises(ValueError):
        sched.add(make_request("big", list(range(10, 20)), max_tokens=7))  # 17 tokens
    with pytest.raises(ValueError):
        sched.add(make_request("huge-prompt", list(range(10, 30)), max_tokens=1))
    assert not sched.has_work
    sched.add(make_request("fits", list(range(10, 20)), max_tokens=6))  # exactly 16
    assert [r.request_id for r in sched.waiting] == ["fits"]


def test_add_puts_request_in_waiting_and_nothing_runs_until_scheduled():
    sched = make_scheduler()
    r = make_request("r", [1, 2, 3])
    sched.add(r)
    assert r.status is RequestStatus.WAITING and sched.has_work
    assert sched.block_manager.num_used_blocks == 0


def test_empty_schedule():
    sched = make_scheduler()
    plan = sched.schedule()
    assert plan.is_empty and plan.num_tokens == 0 and plan.preempted == []
    assert sched.update(plan, {}) == []


# --- prefill, chunking, decode-first -------------------------------------------------------------


def test_single_request_prefill_then_decode():
    sched = make_scheduler()
    r = make_request("r", [10, 11, 12, 13, 14], max_tokens=3)
    sched.add(r)
    plan, finished = step(sched)
    (item,) = plan.scheduled
    assert (item.num_tokens, item.start_position) == (5, 0)
    assert finished == [] and r.output_token_ids == [TOKEN] and r.num_computed_tokens == 5
    plan, _ = step(sched)
    (item,) = plan.scheduled
    assert (item.num_tokens, item.start_position) == (1, 5)
    plan, finished = step(sched)
    assert finished == [r] and r.finish_reason is FinishReason.LENGTH
    assert r.output_token_ids == [TOKEN] * 3
    assert_all_free(sched)


def test_chunked_prefill_samples_only_on_the_last_chunk():
    sched = make_scheduler(budget=4)
    r = make_request("r", list(range(20, 30)), max_tokens=2)  # 10-token prompt, budget 4
    sched.add(r)
    chunks = []
    for _ in range(3):
        plan = sched.schedule()
        check_plan(sched, plan)
        (item,) = plan.scheduled
        chunks.append((item.start_position, item.num_tokens, item.samples))
        sampled = {r.request_id: TOKEN} if item.samples else {}
        assert sched.update(plan, sampled) == []
    assert chunks == [(0, 4, False), (4, 4, False), (8, 2, True)]
    assert r.output_token_ids == [TOKEN] and r.num_computed_tokens == 10
    plan, finished = step(sched)
    assert summary(plan) == [("r", 10, 1, True)]
    assert finished == [r] and r.output_token_ids == [TOKEN, TOKEN]
    assert_all_free(sched)


def test_token_without_samples_flag_is_not_expected():
    """A prefill chunk that does not reach the last token gets no sample; update must not require one."""
    sched = make_scheduler(budget=3)
    r = make_request("r", [1, 3, 4, 5, 6])
    sched.add(r)
    plan = sched.schedule()
    assert not plan.scheduled[0].samples
    sched.update(plan, {})
    assert r.output_token_ids == [] and r.num_computed_tokens == 3


def test_decodes_are_scheduled_before_prefills():
    sched = make_scheduler(budget=8)
    d = make_request("d", [1, 3, 4], max_tokens=10)
    p = make_request("p", list(range(30, 50)), max_tokens=10)  # 20-token prompt, chunked
    sched.add(d)
    sched.add(p)
    plan, _ = step(sched)
    assert [(s.request.request_id, s.num_tokens) for s in plan.scheduled] == [("d", 3), ("p", 5)]
    late = make_request("late", [5, 6, 8], max_tokens=10)
    sched.add(late)
    plan, _ = step(sched)
    # d decodes (1 token) first, then p's next chunk takes the rest of the budget; late must wait
    assert [(s.request.request_id, s.num_tokens, s.start_position) for s in plan.scheduled] == [
        ("d", 1, 3), ("p", 7, 5)]
    assert list(sched.waiting) == [late]


def test_decode_goes_before_an_older_unfinished_prefill():
    """The running list is in admission order; a decode must still be served before an older request that is
    mid-prefill, or a long prompt would starve it. Admission order alone rarely produces this state, so the
    running list is reordered by hand to model 'p admitted before d'."""
    sched = make_scheduler(budget=4)
    d = make_request("d", [1, 3], max_tokens=10)
    p = make_request("p", list(range(30, 50)), max_tokens=10)
    sched.add(d)
    sched.add(p)
    step(sched)  # d: 2 tokens (samples), p: 2-token chunk
    assert d.num_tokens - d.num_computed_tokens == 1 and p.num_computed_tokens == 2
    sched.running.reverse()  # p is now the older one
    plan, _ = step(sched)
    assert summary(plan) == [("d", 2, 1, True), ("p", 2, 3, False)]


def test_running_decodes_get_one_token_each_before_new_prefills():
    sched = make_scheduler(budget=6)
    a, b = make_request("a", [1, 3], max_tokens=10), make_request("b", [4, 5], max_tokens=10)
    sched.add(a)
    sched.add(b)
    step(sched)
    c = make_request("c", list(range(40, 50)), max_tokens=4)
    sched.add(c)
    plan, _ = step(sched)
    assert summary(plan) == [("a", 2, 1, True), ("b", 2, 1, True), ("c", 0, 4, False)]
    assert plan.num_tokens == 6


def test_budget_is_never_exceeded_and_fully_used_with_many_prompts():
    sched = make_scheduler(budget=10, max_num_seqs=16)
    reqs = [make_request(f"r{i}", [100 + i] * 7, max_tokens=3) for i in range(6)]
    for r in reqs:
        sched.add(r)
    plans = run_to_completion(sched)
    assert all(p.num_tokens <= 10 for p in plans)
    assert max(p.num_tokens for p in plans) == 10  # the budget is actually used
    assert all(r.output_token_ids == [TOKEN] * 3 for r in reqs)
    assert_all_free(sched)


def test_max_num_seqs_is_respected():
    sched = make_scheduler(max_num_seqs=2)
    reqs = [make_request(f"r{i}", [10 + i, 20 + i], max_tokens=3) for i in range(3)]
    for r in reqs:
        sched.add(r)
    plan, _ = step(sched)
    assert [s.request.request_id for s in plan.scheduled] == ["r0", "r1"]
    assert len(sched.running) == 2 and list(sched.waiting) == [reqs[2]]
    step(sched)
    plan, finished = step(sched)  # r0 and r1 finish (3 tokens)
    assert set(finished) == {reqs[0], reqs[1]}
    plan, _ = step(sched)
    assert [s.request.request_id for s in plan.scheduled] == ["r2"]
    run_to_completion(sched)
    assert_all_free(sched)


def test_waiting_requests_are_admitted_in_arrival_order():
    sched = make_scheduler(budget=5)
    reqs = [make_request(f"r{i}", [10 + i] * 3, max_tokens=1) for i in range(4)]
    for r in reqs:
        sched.add(r)
    order = []
    for plan in run_to_completion(sched):
        order += [s.request.request_id for s in plan.scheduled if s.request.request_id not in order]
    assert order == ["r0", "r1", "r2", "r3"]


def test_prefix_hit_on_admission_skips_cached_tokens():
    sched = make_scheduler()
    prefix = list(range(1, 9))
    a = make_request("a", prefix + [50], max_tokens=1)
    sched.add(a)
    run_to_completion(sched)
    b = make_request("b", prefix + [60, 61], max_tokens=1)
    sched.add(b)
    plan = sched.schedule()
    (item,) = plan.scheduled
    assert (item.start_position, item.num_tokens, item.samples) == (8, 2, True)
    assert b.num_cached_tokens == 8
    assert sched.block_manager.stats.prefix_hit_tokens == 8
    sched.update(plan, {"b": TOKEN})
    assert b.is_finished
    assert_all_free(sched)


# --- stop rules ----------------------------------------------------------------------------------


def _generate(request: Request, tokens: list[int], **sched_kw) -> tuple[Scheduler, list[int]]:
    """Feed `tokens` one per step as the model's output until the request finishes."""
    sched = make_scheduler(**sched_kw)
    sched.add(request)
    it = iter(tokens)
    while sched.has_work:
        step(sched, lambda r: next(it))
    return sched, request.output_token_ids


def test_eos_stops():
    r = make_request("r", [1, 3], max_tokens=10)
    sched, out = _generate(r, [7, 8, EOS, 9, 9])
    assert out == [7, 8, EOS] and r.finish_reason is FinishReason.STOP and r.is_finished
    assert_all_free(sched)


def test_eos_as_first_token_stops_immediately():
    r = make_request("r", [1, 3], max_tokens=10)
    _, out = _generate(r, [EOS])
    assert out == [EOS] and r.finish_reason is FinishReason.STOP


def test_ignore_eos_runs_to_length():
    r = make_request("r", [1, 3], max_tokens=4, ignore_eos=True)
    sched, out = _generate(r, [EOS, EOS, EOS, EOS, EOS])
    assert out == [EOS] * 4 and r.finish_reason is FinishReason.LENGTH
    assert_all_free(sched)


def test_stop_token_ids_stop_even_with_ignore_eos():
    r = make_request("r", [1, 3], max_tokens=10, stop_token_ids=[42], ignore_eos=True)
    _, out = _generate(r, [7, EOS, 42, 9])
    assert out == [7, EOS, 42] and r.finish_reason is FinishReason.STOP


def test_min_tokens_defers_eos_and_stop_tokens():
    r = make_request("r", [1, 3], max_tokens=10, min_tokens=3, stop_token_ids=[42])
    _, out = _generate(r, [EOS, 42, EOS, 9])
    # outputs 1 and 2 are below min_tokens; the 3rd output reaches it and EOS then stops
    assert out == [EOS, 42, EOS] and r.finish_reason is FinishReason.STOP


def test_min_tokens_equal_to_max_tokens_ends_by_length():
    r = make_request("r", [1, 3], max_tokens=3, min_tokens=3)
    _, out = _generate(r, [EOS, EOS, 7, 7])
    assert out == [EOS, EOS, 7] and r.finish_reason is FinishReason.LENGTH


def test_length_at_max_total_tokens():
    # max_total_tokens below prompt + max_tokens (the context window) wins
    r = make_request("r", [1, 3, 4], max_tokens=10, max_total_tokens=6)
    sched, out = _generate(r, [7] * 10)
    assert out == [7, 7, 7] and r.num_tokens == 6 and r.finish_reason is FinishReason.LENGTH
    assert_all_free(sched)


def test_max_tokens_sets_default_max_total_tokens():
    r = make_request("r", [1, 3, 4], max_tokens=5)
    assert r.max_total_tokens == 8
    _, out = _generate(r, [7] * 10)
    assert len(out) == 5 and r.finish_reason is FinishReason.LENGTH


def test_eos_at_the_length_limit_reports_stop():
    r = make_request("r", [1, 3], max_tokens=2)
    _, out = _generate(r, [7, EOS])
    assert out == [7, EOS] and r.finish_reason is FinishReason.STOP


def test_update_returns_only_finished_requests():
    sched = make_scheduler()
    a, b = make_request("a", [1, 3], max_tokens=5), make_request("b", [4, 5], max_tokens=5)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    finished = sched.update(plan, {"a": EOS, "b": 7})
    assert finished == [a]
    assert sched.running == [b] and a.status is RequestStatus.FINISHED


# --- finish / abort ------------------------------------------------------------------------------


def test_abort_waiting_request():
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_request("a", [1, 3]), make_request("b", [4, 5])
    sched.add(a)
    sched.add(b)
    step(sched)
    assert list(sched.waiting) == [b]
    sched.finish(b, FinishReason.ABORT)
    assert b.is_finished and b.finish_reason is FinishReason.ABORT
    assert list(sched.waiting) == [] and sched.running == [a]
    sched.finish(a, FinishReason.ABORT)
    assert_all_free(sched)


def test_abort_running_request_frees_its_blocks():
    sched = make_scheduler(num_blocks=8)
    a = make_request("a", list(range(10, 19)), max_tokens=5)
    sched.add(a)
    step(sched)
    assert sched.block_manager.num_used_blocks == 3
    sched.finish(a, FinishReason.ABORT)
    assert a.status is RequestStatus.FINISHED and a.finish_reason is FinishReason.ABORT
    assert a.block_ids == []
    assert_all_free(sched)
    sched.finish(a, FinishReason.STOP)  # finishing twice is a no-op
    assert a.finish_reason is FinishReason.ABORT
    assert sched.schedule().is_empty


def test_abort_while_step_in_flight_is_ignored_by_update():
    sched = make_scheduler()
    a, b = make_request("a", [1, 3], max_tokens=5), make_request("b", [4, 5], max_tokens=5)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    sched.finish(a, FinishReason.ABORT)  # the API aborts while the model runs
    finished = sched.update(plan, {"a": 7, "b": 7})
    assert finished == []
    assert a.output_token_ids == [] and a.block_ids == []
    assert b.output_token_ids == [7]
    check_invariants(sched)
    sched.finish(b, FinishReason.ABORT)
    assert_all_free(sched)


def test_abort_a_chunked_prefill_midway():
    sched = make_scheduler(budget=4)
    r = make_request("r", list(range(10, 30)))
    sched.add(r)
    step(sched)
    step(sched)
    assert r.num_computed_tokens == 8
    sched.finish(r, FinishReason.ABORT)
    assert_all_free(sched)


# --- preemption ----------------------------------------------------------------------------------


def test_preemption_of_most_recent_request_and_resume():
    sched = make_scheduler(num_blocks=4, budget=64)
    a = make_request("a", [10, 11, 12, 13], max_tokens=8)  # up to 12 tokens -> 3 blocks
    b = make_request("b", [20, 21, 22, 23], max_tokens=8)
    sched.add(a)
    sched.add(b)
    step(sched)  # both prefill: 1 block each
    c = make_request("c", [30], max_tokens=1)
    sched.add(c)  # waits behind; the pool cannot hold it while a and b grow
    preempted_plan = None
    for _ in range(10):
        plan, _ = step(sched)
        if plan.preempted:
            preempted_plan = plan
            break
    assert preempted_plan is not None, "expected a preemption when the pool ran dry"
    assert preempted_plan.preempted == [b]  # the most recently admitted one
    assert [s.request for s in preempted_plan.scheduled] == [a]
    assert b.status is RequestStatus.WAITING and b.block_ids == [] and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and sched.stats.num_preemptions == 1
    assert sched.waiting[0] is b  # back at the FRONT of the queue, ahead of c
    assert list(sched.waiting) == [b, c]
    outputs_at_preemption = list(b.output_token_ids)
    # 4 prompt + 5 outputs = 9 tokens, 8 computed in 2 blocks: computing the 9th needs a 3rd block
    assert len(outputs_at_preemption) == 5
    assert b.prompt_token_ids == [20, 21, 22, 23]

    # no admission in a step that preempted; the next plans resume b by recomputing prompt + outputs
    resumed = None
    while sched.has_work:
        plan, _ = step(sched)
        for rid, start, num, samples in summary(plan):
            if rid == "b" and resumed is None:
                resumed = (start, num)
                assert samples  # recomputing up to the last known token yields the next one
                assert start + num == 4 + len(outputs_at_preemption)
    assert resumed is not None
    assert a.output_token_ids == [TOKEN] * 8 and a.finish_reason is FinishReason.LENGTH
    assert b.output_token_ids == [TOKEN] * 8 and b.finish_reason is FinishReason.LENGTH
    assert b.output_token_ids[:5] == outputs_at_preemption  # kept across the preemption
    assert c.output_token_ids == [TOKEN]
    assert_all_free(sched)


def test_preempted_request_is_readmitted_before_older_waiting_ones():
    sched = make_scheduler(num_blocks=4, budget=64, max_num_seqs=2)
    a = make_request("a", [10, 11, 12, 13], max_tokens=8)
    b = make_request("b", [20, 21, 22, 23], max_tokens=8)
    c = make_request("c", [30, 31], max_tokens=1)
    for r in (a, b, c):
        sched.add(r)
    admissions: list[str] = []
    while sched.has_work:
        waiting_before = list(sched.waiting)
        plan, _ = step(sched)
        admissions += [s.request.request_id for s in plan.scheduled if s.request in waiting_before]
    assert b.num_preemptions == 1
    # c waited since the start, but the preempted b goes back in front of it
    assert admissions == ["a", "b", "b", "c"]
    assert [len(r.output_token_ids) for r in (a, b, c)] == [8, 8, 1]
    assert_all_free(sched)


def test_request_that_fills_the_whole_cache_alone_completes():
    """Also covers resuming a self-preempted request from its own cached prefix while the pool is tight;
    BUG (see report): that re-admission currently crashes in allocate() with KeyError (can_allocate undercount)."""
    sched = make_scheduler(num_blocks=3, budget=64)
    a = make_request("a", [1, 3, 4, 5], max_tokens=8)  # up to 12 tokens = the whole pool
    b = make_request("b", [9, 10, 11, 12], max_tokens=8)
    sched.add(a)
    sched.add(b)
    plan, _ = step(sched)  # both fit for the prompt (1 block each)
    assert [s.request for s in plan.scheduled] == [a, b]
    plan, _ = step(sched)  # a takes the last block; b (the newest) must preempt itself
    assert [s.request for s in plan.scheduled] == [a] and plan.preempted == [b]
    assert list(sched.waiting) == [b] and b.output_token_ids == [TOKEN]
    run_to_completion(sched)
    assert a.output_token_ids == [TOKEN] * 8 and b.output_token_ids == [TOKEN] * 8
    assert b.num_preemptions == 1 and a.num_preemptions == 0
    assert_all_free(sched)


def test_preempted_request_reuses_its_cached_blocks():
    sched = make_scheduler(num_blocks=6, budget=64)
    a = make_request("a", list(range(10, 18)), max_tokens=12)  # 8 + 12 = 20 tokens = 5 blocks
    b = make_request("b", list(range(30, 38)), max_tokens=8)   # 8 + 8 = 16 tokens = 4 blocks
    sched.add(a)
    sched.add(b)
    for _ in range(20):
        step(sched)
        if b.num_preemptions:
            break
    assert b.num_preemptions == 1 and not b.is_finished
    hit_before = sched.block_manager.stats.prefix_hit_tokens
    run_to_completion(sched)
    assert sched.block_manager.stats.prefix_hit_tokens > hit_before  # b's prompt blocks were still cached
    assert b.num_cached_tokens > 0
    assert [len(a.output_token_ids), len(b.output_token_ids)] == [12, 8]
    assert_all_free(sched)


def test_prefix_admission_does_not_overcommit_the_pool():
    """BUG (see report): can_allocate undercounts a prefix-hit admission by len(hit) blocks, so the scheduler
    admits b while a holds the whole pool and allocate() crashes with KeyError('dictionary is empty')."""
    sched = make_scheduler(num_blocks=4, budget=64)
    a = make_request("a", list(range(1, 13)), max_tokens=4)  # 12 + 4 = 16 tokens = 4 blocks
    sched.add(a)
    step(sched)  # a: 12 tokens computed, 3 full blocks cached, 1 free block
    b = make_request("b", list(range(1, 9)) + [50, 51, 52, 53, 54], max_tokens=3)  # 8 shared + 5 = 16 max
    sched.add(b)
    plan, _ = step(sched)  # a's decode takes the last block; b (2 hit + 2 fresh) must wait
    assert [s.request for s in plan.scheduled] == [a]
    assert list(sched.waiting) == [b]
    run_to_completion(sched)
    assert len(a.output_token_ids) == 4 and len(b.output_token_ids) == 3
    assert_all_free(sched)


# --- whole runs, no leaks ------------------------------------------------------------------------


def test_whole_run_with_eos_at_chosen_steps_leaks_nothing():
    sched = make_scheduler(num_blocks=12, budget=12, max_num_seqs=3)
    eos_after = {"r0": 2, "r1": 5, "r2": 1, "r3": 9, "r4": 3}
    reqs = [make_request(rid, [40 + i] * (3 + 2 * i), max_tokens=10) for i, rid in enumerate(eos_after)]
    for r in reqs:
        sched.add(r)

    def model(r: Request) -> int:
        return EOS if r.num_output_tokens + 1 == eos_after[r.request_id] else TOKEN

    run_to_completion(sched, model)
    for r in reqs:
        assert r.output_token_ids == [TOKEN] * (eos_after[r.request_id] - 1) + [EOS]
        assert r.finish_reason is FinishReason.STOP
    assert_all_free(sched)


PROMPT_PREFIXES = [list(range(1, 13)), [1, 2, 3, 4, 90, 91, 92, 93], [60, 61, 62, 63, 64]]


def _random_run(seed: int, prefix_caching: bool) -> None:
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=10, budget=rng.choice([4, 7, 16]), max_num_seqs=rng.choice([2, 3, 5]),
                           prefix_caching=prefix_caching)
    eos_at: dict[str, int] = {}
    all_reqs: list[Request] = []
    aborted: set[str] = set()

    def model(r: Request) -> int:
        return EOS if r.num_output_tokens + 1 == eos_at[r.request_id] else TOKEN

    def abort_random() -> None:
        live = list(sched.waiting) + sched.running
        if live:
            r = rng.choice(live)
            sched.finish(r, FinishReason.ABORT)
            aborted.add(r.request_id)
            assert r.block_ids == [] and r.is_finished

    for n in range(120):
        op = rng.random()
        if op < 0.25:
            tail = [rng.randint(20, 24) for _ in range(rng.randint(0, 5))]
            prompt = rng.choice(PROMPT_PREFIXES)[: rng.randint(1, 12)] + tail
            r = make_request(f"r{n}", prompt, max_tokens=rng.randint(1, 10))
            eos_at[r.request_id] = rng.randint(1, 12)
            try:
                sched.add(r)
            except ValueError:
                assert sched.block_manager.blocks_needed(r.max_total_tokens) > sched.block_manager.num_blocks
                continue
            all_reqs.append(r)
        elif op < 0.85:
            plan = sched.schedule()
            check_plan(sched, plan)
            if rng.random() < 0.1:
                abort_random()  # abort while the model "runs"
            sampled = {s.request.request_id: model(s.request) for s in plan.scheduled if s.samples}
            sched.update(plan, sampled)
        else:
            abort_random()
        check_invariants(sched)

    run_to_completion(sched, model)
    assert_all_free(sched)
    for r in all_reqs:
        assert r.is_finished
        if r.request_id in aborted:
            continue
        expected = min(eos_at[r.request_id], r.params.max_tokens)
        assert r.num_output_tokens == expected, r
        assert r.output_token_ids[:-1] == [TOKEN] * (expected - 1)
        assert r.finish_reason is (FinishReason.STOP if r.output_token_ids[-1] == EOS else FinishReason.LENGTH)


@pytest.mark.parametrize("seed", range(12))
def test_random_runs_without_prefix_caching_keep_invariants(seed):
    _random_run(seed, prefix_caching=False)


@pytest.mark.parametrize("seed", range(12))
def test_random_runs_with_prefix_caching_keep_invariants(seed):
    _random_run(seed, prefix_caching=True)


def test_sampling_params_reject_min_tokens_above_max_tokens():
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=2, min_tokens=3)
    SamplingParams(max_tokens=None, min_tokens=3)  # no upper bound: fine
