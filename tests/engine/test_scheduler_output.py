"""The scheduler's messages to the runner (SchedulerOutput): data only, and enough for the runner's own request
states to stay equal to the scheduler's requests through preemption, aborts, forks and back-off. No torch."""

from __future__ import annotations

import random

import pytest

from nitro_torch.engine.block_manager import BlockManager
from nitro_torch.engine.outputs import FinishReason
from nitro_torch.engine.request import Request
from nitro_torch.engine.scheduler import Scheduler, StepPlan
from nitro_torch.runner.persistent_batch import PersistentBatch
from nitro_torch.sampling import SamplingParams

BS = 4
EOS = 2


def make_request(request_id: str, prompt: list[int], max_tokens: int = 8, parent: Request | None = None) -> Request:
    request = Request(request_id, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0),
                      eos_token_ids=frozenset({EOS}))
    request.parent = parent
    return request


class Mirror:
    """A runner without a model: its PersistentBatch fed only by the plans' `for_runner` messages."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.states = PersistentBatch(BS)

    def schedule(self) -> StepPlan:
        plan = self.scheduler.schedule()
        if not plan.is_empty:  # as the engine core: an empty plan never reaches the runner
            self.states.apply(plan.for_runner)
            self.check(plan)
        return plan

    def finish_step(self, plan: StepPlan, token_of=lambda request: 7) -> None:  # noqa: ANN001
        sampled = {s.request.request_id: token_of(s.request) for s in plan.scheduled if s.samples}
        self.states.record(plan.for_runner, sampled)
        self.scheduler.update(plan, sampled)

    def check(self, plan: StepPlan) -> None:
        step = plan.for_runner
        assert list(step.num_scheduled_tokens) == [s.request.request_id for s in plan.scheduled]
        for item in plan.scheduled:
            request, state = item.request, self.states[item.request.request_id]
            assert step.num_scheduled_tokens[request.request_id] == item.num_tokens
            assert state.all_token_ids.tolist() == request.all_token_ids
            assert state.block_ids == request.block_ids
            assert state.num_computed_tokens == request.num_computed_tokens == item.start_position
            assert state.num_prompt_tokens == request.num_prompt_tokens and state.params is request.params
        held = {r.request_id for r in self.scheduler.running if r.num_blocks_in_runner is not None}
        assert set(self.states) == held  # nothing stale: every request that left was dropped


def test_a_request_is_sent_in_full_once_then_only_its_new_blocks() -> None:
    scheduler = Scheduler(BlockManager(32, BS, True), max_num_batched_tokens=64, max_num_seqs=4)
    mirror = Mirror(scheduler)
    scheduler.add(make_request("a", list(range(10, 16)), max_tokens=8))  # 6 prompt tokens: 2 blocks
    plan = mirror.schedule()
    (new,) = plan.for_runner.new_requests
    assert new.token_ids == list(range(10, 16)) and new.num_computed_tokens == 0 and len(new.block_ids) == 2
    mirror.finish_step(plan)
    plan = mirror.schedule()  # decode of token 7 (position 6): fits in block 2
    assert not plan.for_runner.new_requests and not plan.for_runner.new_block_ids
    assert plan.for_runner.num_scheduled_tokens == {"a": 1}
    mirror.finish_step(plan)
    mirror.finish_step(mirror.schedule())
    plan = mirror.schedule()  # position 8: a third block
    assert list(plan.for_runner.new_block_ids) == ["a"] and len(plan.for_runner.new_block_ids["a"]) == 1


def test_an_abort_reaches_the_runner_once_with_the_next_step() -> None:
    scheduler = Scheduler(BlockManager(32, BS, True), max_num_batched_tokens=64, max_num_seqs=4)
    mirror = Mirror(scheduler)
    first, second = make_request("a", [10, 11, 12]), make_request("b", [20, 21])
    scheduler.add(first)
    scheduler.add(second)
    mirror.finish_step(mirror.schedule())
    scheduler.finish(first, FinishReason.ABORT)
    plan = mirror.schedule()
    assert plan.for_runner.finished_request_ids == ["a"] and "a" not in mirror.states
    mirror.finish_step(plan)
    assert mirror.schedule().for_runner.finished_request_ids == []


def test_a_preempted_request_leaves_and_comes_back_in_full_with_its_outputs() -> None:
    scheduler = Scheduler(BlockManager(4, BS, False), max_num_batched_tokens=64, max_num_seqs=4)
    mirror = Mirror(scheduler)
    scheduler.add(make_request("old", [10, 11, 12], max_tokens=9))
    scheduler.add(make_request("new", [20, 21, 22], max_tokens=9))
    left_with: list[int] | None = None
    while scheduler.has_work:
        plan = mirror.schedule()
        if left_with is None and plan.preempted:
            (victim,) = plan.preempted
            assert victim.request_id == "new" and plan.for_runner.finished_request_ids == ["new"]
            left_with = victim.all_token_ids
        back = [r for r in plan.for_runner.new_requests if r.request_id == "new"]
        if left_with is not None and back:
            assert back[0].token_ids == left_with and len(left_with) > 3  # its outputs come back with it
            return
        mirror.finish_step(plan)
    pytest.fail("the pool of 4 blocks never forced a preemption and a resume")


@pytest.mark.parametrize("seed", range(10))
def test_runner_states_follow_the_scheduler_through_random_runs(seed: int) -> None:
    rng = random.Random(seed)
    scheduler = Scheduler(BlockManager(10, BS, rng.random() < 0.5), max_num_batched_tokens=rng.choice([4, 7, 16]),
                          max_num_seqs=rng.choice([2, 3, 5]))
    mirror = Mirror(scheduler)
    live: list[Request] = []

    def token_of(request: Request) -> int:
        return EOS if rng.random() < 0.08 else rng.randint(20, 30)

    for n in range(150):
        op = rng.random()
        if op < 0.25:
            parent = rng.choice(live) if live and rng.random() < 0.3 else None
            prompt = parent.prompt_token_ids if parent else [rng.randint(20, 24) for _ in range(rng.randint(1, 12))]
            request = make_request(f"r{n}", prompt, max_tokens=rng.randint(1, 10), parent=parent)
            try:
                scheduler.add(request)
            except ValueError:
                continue
            live.append(request)
        elif op < 0.85 and scheduler.has_work:
            plan = mirror.schedule()
            if rng.random() < 0.1 and scheduler.running:  # a failed forward: no update, the scheduler backs off
                scheduler.back_off()
                continue
            mirror.finish_step(plan, token_of)
        elif live:
            scheduler.finish(rng.choice(live), FinishReason.ABORT)
        live = [r for r in live if not r.is_finished]
    while scheduler.has_work:
        mirror.finish_step(mirror.schedule(), token_of)
    scheduler.add(make_request("last", [20, 21]))
    mirror.schedule()  # the leavers of the idle steps reach the runner with the next step that runs
    assert set(mirror.states) == {"last"}


def _run_to_the_end(seed: int, pipelined: bool) -> dict[str, tuple[list[int], FinishReason | None]]:
    """Requests with chosen EOS positions in a pool small enough to preempt; every step scheduled either after the
    previous one's tokens are known, or (pipelined, asynchronous scheduling) while they are still pending."""
    rng = random.Random(seed)
    scheduler = Scheduler(BlockManager(12, BS, seed % 2 == 0), max_num_batched_tokens=rng.choice([6, 16]),
                          max_num_seqs=rng.choice([3, 5]))
    mirror = Mirror(scheduler)
    requests = []
    for n in range(14):
        prompt = [rng.randint(20, 24) for _ in range(rng.randint(1, 14))]
        request = make_request(f"r{n}", prompt, max_tokens=rng.randint(1, 12))
        eos_at = rng.randint(1, 14)
        scheduler.add(request)
        requests.append((request, eos_at))
    eos_of = {request.request_id: eos_at for request, eos_at in requests}

    def token_of(request: Request) -> int:  # the token after its known and pending outputs
        index = request.num_output_tokens + request.num_pending_tokens + 1
        return EOS if index == eos_of[request.request_id] else 30 + index

    in_flight: tuple[StepPlan, dict[str, int]] | None = None
    for _ in range(2000):
        if not scheduler.has_work and in_flight is None:
            break
        plan = mirror.schedule()
        if not pipelined:
            if not plan.is_empty:
                mirror.finish_step(plan, token_of)
            continue
        launched = None
        if not plan.is_empty:
            sampled = {s.request.request_id: token_of(s.request) for s in plan.scheduled if s.samples}
            scheduler.assume_progress(plan)
            mirror.states.advance(plan.for_runner, pending=list(sampled))
            launched = (plan, sampled)
        if in_flight is not None:
            previous, tokens = in_flight
            mirror.states.append(tokens, were_pending=True)
            scheduler.update(previous, tokens, assumed=True)
        in_flight = launched
    assert not scheduler.has_work and scheduler.block_manager.num_used_blocks == 0
    return {r.request_id: (r.output_token_ids, r.finish_reason) for r, _ in requests}


@pytest.mark.parametrize("seed", range(12))
def test_pipelined_steps_give_every_request_the_same_tokens(seed: int) -> None:
    assert _run_to_the_end(seed, pipelined=True) == _run_to_the_end(seed, pipelined=False)
