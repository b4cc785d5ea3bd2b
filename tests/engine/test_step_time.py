"""The step time model and --max-step-time in the scheduler: tensor-free, with step times from a known cost."""

from __future__ import annotations

from collections import Counter

import pytest

from nitro_torch.engine.block_manager import BlockManager
from nitro_torch.engine.scheduler import Scheduler, StepPlan
from nitro_torch.engine.step_time import (
    CPU_MAX_STEP_TIME_S,
    MIN_OBSERVATIONS,
    MIN_PREFILL_TOKENS,
    PER_KIND,
    REFIT_AFTER_S,
    StepLoad,
    StepTimeLimit,
    StepTimeModel,
    max_step_time_s,
)
from tests.engine.test_scheduler import BS, check_invariants, check_plan, make_request


def cpu_like_cost(load: StepLoad) -> float:
    """A 2-core CPU's shape: a fixed cost, more for a prompt chunk, per token, and per KV token read."""
    return 0.018 + 0.05 * load.has_prefill + 0.0025 * load.num_tokens + 8e-6 * load.kv_tokens


def load_of(*items: tuple[int, int]) -> StepLoad:
    load = StepLoad()
    for start, num_tokens in items:
        load.add(start, num_tokens)
    return load


def decodes(count: int, context: int) -> StepLoad:
    return load_of(*[(context, 1)] * count)


def trained_model(cost=cpu_like_cost) -> StepTimeModel:
    model = StepTimeModel()
    for load in [decodes(1, 100), decodes(8, 2000), decodes(64, 3000), load_of((0, 256)), load_of((512, 256)),
                 decodes(16, 500), load_of((0, 31), (3000, 1)), decodes(1, 3000)]:
        model.observe(load, cost(load))
    return model


def test_the_model_learns_a_linear_cost_from_varied_steps() -> None:
    model = trained_model()
    for load in [decodes(10, 2500), decodes(3, 40), load_of((1000, 300)), load_of((0, 16), *[(2400, 1)] * 5)]:
        assert model.predict(load) == pytest.approx(cpu_like_cost(load), rel=1e-3)


def test_the_model_is_not_ready_before_it_has_seen_a_few_steps() -> None:
    model = StepTimeModel()
    for _ in range(MIN_OBSERVATIONS - 1):
        model.observe(decodes(4, 100), 0.05)
        assert not model.ready
    model.observe(decodes(4, 100), 0.05)
    assert model.ready
    model.observe(StepLoad(), 1.0)  # an empty step teaches nothing
    assert model.predict(decodes(4, 100)) == pytest.approx(0.05, rel=1e-3)


def test_a_one_off_stall_is_forgotten_once_its_kind_of_step_runs_again() -> None:
    model = trained_model()
    stall = decodes(8, 2000)
    model.observe(stall, 5.0)  # a first forward, the machine's other work
    assert model.predict(stall) > 2 * cpu_like_cost(stall)
    for _ in range(PER_KIND):
        model.observe(stall, cpu_like_cost(stall))
    assert model.predict(stall) == pytest.approx(cpu_like_cost(stall), rel=1e-3)


def test_a_long_run_of_small_steps_does_not_wash_out_what_big_steps_cost() -> None:
    """A light client holds a heavy one to one sequence for seconds: the 64-sequence cost must survive it."""
    model = trained_model()
    for _ in range(500):
        model.observe(decodes(1, 3000), cpu_like_cost(decodes(1, 3000)) * 1.2)  # and a noisier machine
    assert model.predict(decodes(64, 3000)) == pytest.approx(cpu_like_cost(decodes(64, 3000)), rel=0.1)


def test_coefficients_stay_non_negative() -> None:
    model = StepTimeModel()
    for tokens in range(1, 9):  # nonsense: bigger steps faster
        model.observe(decodes(tokens, 100), 0.1 - 0.005 * tokens)
    assert all(model.predict(decodes(n, c)) >= 0 for n in (1, 64, 1000) for c in (1, 10_000))


def test_what_a_request_adds_to_a_step_is_the_difference_of_the_predictions() -> None:
    cost = trained_model().cost()
    for items, start, num_tokens in [((), 2000, 1), (((3000, 1),), 100, 1), (((3000, 1),), 512, 256),
                                     (((0, 300),), 512, 256), (((0, 300), (40, 1)), 7, 1)]:
        load = load_of(*items)
        bigger = load_of(*items, (start, num_tokens))
        assert cost.added(start, num_tokens, load.has_prefill) == pytest.approx(cost.of(bigger) - cost.of(load))


def test_the_model_refits_after_enough_newly_observed_step_time() -> None:
    model = trained_model()
    before = model.predict(decodes(8, 2000))
    model.observe(decodes(8, 2000), 0.001)  # a short step: the fit waits for more
    assert model.predict(decodes(8, 2000)) == before
    model.observe(decodes(8, 2000), REFIT_AFTER_S)
    assert model.predict(decodes(8, 2000)) != before


def test_the_default_is_a_quarter_second_on_a_cpu_and_off_on_cuda() -> None:
    assert max_step_time_s(None, "cpu") == CPU_MAX_STEP_TIME_S == 0.25
    assert max_step_time_s(None, "cuda") == 0.0
    assert max_step_time_s(0.1, "cuda") == 0.1 and max_step_time_s(0.0, "cpu") == 0.0


def test_the_limit_takes_decodes_until_the_step_is_full() -> None:
    limit = StepTimeLimit(trained_model(), 0.25, MIN_PREFILL_TOKENS)
    granted = 0
    while limit.grant(3000, 1):
        limit.take(3000, 1)
        granted += 1
    assert cpu_like_cost(decodes(granted, 3000)) <= 0.25 < cpu_like_cost(decodes(granted + 1, 3000))


def test_decodes_taken_at_once_leave_the_limit_where_taking_each_does() -> None:
    """The scheduler takes a step's decodes at once when all of them fit: what is left must be the same."""
    one_by_one, at_once = (StepTimeLimit(trained_model(), 0.25, MIN_PREFILL_TOKENS) for _ in range(2))
    starts = [2900, 10, 3000, 700]
    assert at_once.fits_decodes(len(starts), sum(starts))
    assert not at_once.fits_decodes(64, 64 * 3000)
    for start in starts:
        one_by_one.take(start, 1)
    at_once.take_decodes(len(starts), sum(starts))
    for start, wanted in [(0, 4000), (3000, 1), (512, 600)]:
        assert at_once.grant(start, wanted, joining=True) == one_by_one.grant(start, wanted, joining=True)
    assert at_once.grant(3000, 1) == one_by_one.grant(3000, 1) == 1  # neither is empty, and one more fits


def test_the_first_request_of_a_step_always_runs() -> None:
    limit = StepTimeLimit(trained_model(), 0.001, MIN_PREFILL_TOKENS)
    assert limit.grant(3000, 1) == 1
    limit.take(3000, 1)
    assert limit.grant(3000, 1) == 0


def test_a_prompt_chunk_is_cut_to_fit_but_not_below_the_floor() -> None:
    model = trained_model()
    roomy = cpu_like_cost(load_of((0, 2 * MIN_PREFILL_TOKENS)))
    limit = StepTimeLimit(model, roomy, MIN_PREFILL_TOKENS)
    chunk = limit.grant(0, 4 * MIN_PREFILL_TOKENS)
    assert MIN_PREFILL_TOKENS < chunk < 4 * MIN_PREFILL_TOKENS
    assert cpu_like_cost(load_of((0, chunk))) <= roomy < cpu_like_cost(load_of((0, chunk + 1)))
    tight = StepTimeLimit(model, 0.25, MIN_PREFILL_TOKENS)
    assert tight.grant(0, 2000) == MIN_PREFILL_TOKENS  # the first prompt chunk of a step gets the floor
    assert tight.grant(0, 100) == 100  # a short prompt whole
    tight.take(0, MIN_PREFILL_TOKENS)
    assert tight.grant(0, 2000) == 0  # a second one waits for a later step


def test_decodes_cannot_keep_a_prompt_out_of_the_step() -> None:
    limit = StepTimeLimit(trained_model(), 0.25, MIN_PREFILL_TOKENS)
    while limit.grant(3000, 1):
        limit.take(3000, 1)
    assert limit.grant(0, 31) == 31  # a light client's chat joins the full step


# --- in the scheduler ---------------------------------------------------------------------------------------------


def timed_step(sched: Scheduler, cost=cpu_like_cost) -> StepPlan:
    """One engine step whose forward takes `cost(load)` seconds; every sampling request draws token 7."""
    plan = sched.schedule()
    check_plan(sched, plan)
    sched.update(plan, {s.request.request_id: 7 for s in plan.scheduled if s.samples})
    if plan.scheduled:
        sched.observe_step(plan, cost(plan.load()))
    check_invariants(sched)
    return plan


def long_context_scheduler(limit_s: float, count: int = 32, context: int = 400) -> Scheduler:
    sched = Scheduler(BlockManager(8192, BS, True), 2048, 64, max_step_time_s=limit_s)
    for i in range(count):
        sched.add(make_request(f"r{i}", [100 + i] * context, max_tokens=200, ignore_eos=True))
    while any(r.num_computed_tokens < context for r in sched.running) or sched.waiting:
        timed_step(sched)
    assert len(sched.running) == count and sched.stats.num_preemptions == 0
    return sched


def test_without_a_limit_every_decode_runs_in_every_step() -> None:
    sched = long_context_scheduler(0.0)
    for _ in range(3):
        assert len(timed_step(sched).scheduled) == 32


def test_with_a_limit_decodes_take_turns_in_steps_that_fit() -> None:
    sched = long_context_scheduler(0.1)
    served: Counter[str] = Counter()
    sizes = []
    for _ in range(40):
        plan = timed_step(sched)
        sizes.append(len(plan.scheduled))
        served.update(item.request.request_id for item in plan.scheduled)
        assert cpu_like_cost(plan.load()) <= 0.1
    assert 1 < min(sizes) and max(sizes) < 32
    assert max(served.values()) - min(served.values()) <= 1  # each in turn, least recently served first


def test_a_new_request_joins_a_step_full_of_decodes_and_its_prompt_is_chunked_at_the_floor() -> None:
    sched = long_context_scheduler(0.1)
    length = 3 * MIN_PREFILL_TOKENS + 100
    newcomer = make_request("new", [5] * length, max_tokens=4, ignore_eos=True)
    sched.add(newcomer)
    chunks = []
    while newcomer.num_computed_tokens < length:
        plan = timed_step(sched)
        chunks += [item.num_tokens for item in plan.scheduled if item.request is newcomer]
        assert any(item.request is not newcomer for item in plan.scheduled)  # the decodes go on
    assert chunks == [MIN_PREFILL_TOKENS] * 3 + [100]


def test_a_waiting_request_that_needs_one_token_is_not_kept_out_by_full_steps_of_decodes() -> None:
    """A request whose prompt is all cached but its last token (or one resuming after a preemption) asks a step
    for one token, as a decode does; steps full of running decodes must still let it in."""
    sched = long_context_scheduler(0.1)
    cached = make_request("cached", [100] * 401, max_tokens=4, ignore_eos=True)  # r0's prompt, 400 of it cached
    sched.add(cached)
    plan = timed_step(sched)
    assert [item.num_tokens for item in plan.scheduled if item.request is cached] == [1]
    assert len(plan.scheduled) > 2  # beside decodes of the others


def test_a_joining_request_and_a_prompt_chunk_share_one_guaranteed_place_per_step() -> None:
    limit = StepTimeLimit(trained_model(), 0.25, MIN_PREFILL_TOKENS)
    while limit.grant(3000, 1):
        limit.take(3000, 1)
    assert limit.grant(3000, 1) == 0  # no room for another decode like those
    assert limit.grant(3000, 1, joining=True) == 1  # but a waiting request like them gets in
    limit.take(3000, 1, joining=True)
    assert limit.grant(0, 2000) == 0 and limit.grant(3000, 1, joining=True) == 0
