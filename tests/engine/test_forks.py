"""n > 1 choices as forks: the children share the parent's computed prompt (one prefill) and compute only the
last prompt token themselves. Tensor-free, driven like the engine drives the scheduler."""

from __future__ import annotations

import pytest

from nitro_torch.engine.outputs import FinishReason
from nitro_torch.engine.request import Request, RequestStatus
from tests.engine.test_scheduler import (
    BS,
    assert_all_free,
    make_request,
    make_scheduler,
    run_to_completion,
    step,
    summary,
)


def family(prompt: list[int], n: int, max_tokens: int = 6) -> list[Request]:
    parent = make_request("c0", prompt, max_tokens=max_tokens)
    children = [make_request(f"c{i}", prompt, max_tokens=max_tokens) for i in range(1, n)]
    for child in children:
        child.parent = parent
    return [parent, *children]


@pytest.mark.parametrize("prompt_len", [1, BS, BS + 1, 2 * BS + 3, 3 * BS + 1])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_children_wait_for_the_prompt_then_compute_one_token(prompt_len: int, prefix_caching: bool) -> None:
    sched = make_scheduler(prefix_caching=prefix_caching)
    requests = family(list(range(10, 10 + prompt_len)), n=3)
    for r in requests:
        sched.add(r)
    assert list(sched.waiting) == requests[:1] and sched.num_waiting == 3

    first, _ = step(sched)
    assert summary(first) == [("c0", 0, prompt_len, True)]
    second, _ = step(sched)
    parent = requests[0]
    assert summary(second) == [("c0", prompt_len, 1, True), ("c1", prompt_len - 1, 1, True),
                               ("c2", prompt_len - 1, 1, True)]
    num_shared, partial = divmod(prompt_len - 1, BS)
    for child in requests[1:]:
        assert child.block_ids[:num_shared] == parent.block_ids[:num_shared]
        assert child.num_cached_tokens == prompt_len - 1
    expected_copies = [(parent.block_ids[num_shared], c.block_ids[num_shared]) for c in requests[1:]] if partial else []
    assert second.block_copies == expected_copies
    run_to_completion(sched)
    assert all(r.num_output_tokens == 6 for r in requests)
    assert_all_free(sched)


def test_prompt_is_prefilled_once() -> None:
    sched = make_scheduler(budget=8)  # the parent's 21-token prompt takes three chunks
    requests = family(list(range(10, 31)), n=4, max_tokens=3)
    for r in requests:
        sched.add(r)
    plans = run_to_completion(sched)
    computed = sum(p.num_tokens for p in plans)
    assert computed == 21 + 3 * 1 + 4 * 2  # one prefill, one token per child, two decodes per choice
    assert_all_free(sched)


def test_child_added_after_the_parent_ran_forks_at_once() -> None:
    sched = make_scheduler()
    parent, child = family(list(range(10, 19)), n=2)
    sched.add(parent)
    step(sched)
    step(sched)
    sched.add(child)
    assert child.status is RequestStatus.RUNNING and child.num_computed_tokens == 8
    run_to_completion(sched)
    assert child.num_output_tokens == 6
    assert_all_free(sched)


def test_parent_finishing_in_its_prefill_step_still_shares() -> None:
    sched = make_scheduler()
    requests = family(list(range(10, 20)), n=3, max_tokens=1)
    for r in requests:
        sched.add(r)
    _, finished = step(sched)
    assert finished == requests[:1]
    assert all(c.status is RequestStatus.RUNNING and c.num_computed_tokens == 9 for c in requests[1:])
    plans = run_to_completion(sched)
    assert sum(p.num_tokens for p in plans) == 2
    assert_all_free(sched)


def test_parent_aborted_before_prefill_releases_children_as_ordinary_requests() -> None:
    sched = make_scheduler()
    requests = family(list(range(10, 20)), n=3)
    for r in requests:
        sched.add(r)
    sched.finish(requests[0], FinishReason.ABORT)
    assert [r.request_id for r in sched.waiting] == ["c1", "c2"]
    assert all(r.parent is None for r in requests[1:])
    run_to_completion(sched)
    assert all(r.num_output_tokens == 6 for r in requests[1:])
    assert_all_free(sched)


def test_child_aborted_while_waiting_for_its_parent() -> None:
    sched = make_scheduler()
    requests = family(list(range(10, 20)), n=2)
    for r in requests:
        sched.add(r)
    sched.finish(requests[1], FinishReason.ABORT)
    assert not sched.forks_waiting and sched.num_waiting == 1
    run_to_completion(sched)
    assert requests[1].num_output_tokens == 0
    assert_all_free(sched)


def test_children_that_do_not_fit_queue_as_ordinary_requests() -> None:
    sched = make_scheduler(max_num_seqs=2)
    requests = family(list(range(10, 20)), n=4)
    for r in requests:
        sched.add(r)
    step(sched)
    assert [r.request_id for r in sched.running] == ["c0", "c1"]
    assert [r.request_id for r in sched.waiting] == ["c2", "c3"]
    run_to_completion(sched)
    assert all(r.num_output_tokens == 6 for r in requests)
    assert_all_free(sched)


def test_forks_survive_preemption_under_memory_pressure() -> None:
    sched = make_scheduler(num_blocks=9)  # 36 tokens: three 10-token prompts + outputs cannot all stay
    requests = family(list(range(10, 20)), n=3, max_tokens=12)
    for r in requests:
        sched.add(r)
    run_to_completion(sched)
    assert all(r.num_output_tokens == 12 for r in requests)
    assert sched.stats.num_preemptions > 0
    assert_all_free(sched)
