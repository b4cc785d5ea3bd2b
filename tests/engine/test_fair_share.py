"""Fair shares between clients in the scheduler: tensor-free, driven like test_scheduler.py drives it."""

from __future__ import annotations

import random

import pytest

from nitro_torch.engine.block_manager import BlockManager
from nitro_torch.engine.fair_share import SERVICE_HALF_LIFE_S, SERVICE_MARGIN_S, AttainedService, ClientTracker
from nitro_torch.engine.outputs import FinishReason
from nitro_torch.engine.request import Request
from nitro_torch.engine.scheduler import ScheduledRequest, Scheduler, StepPlan
from nitro_torch.engine.step_time import StepLoad
from tests.engine.test_scheduler import BS, Model, check_invariants, make_request, run_to_completion, step


def fair_scheduler(num_blocks: int = 256, budget: int = 64, max_num_seqs: int = 32, fair: bool = True,
                   flat_batch_cost: bool = False) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, True), budget, max_num_seqs, fair_share=fair,
                     flat_batch_cost=flat_batch_cost)


def client_request(request_id: str, client: str, prompt_len: int = 3, max_tokens: int = 8, base: int = 10) -> Request:
    request = make_request(request_id, [base + i for i in range(prompt_len)], max_tokens=max_tokens, ignore_eos=True)
    request.client = client
    return request


def per_client(plan: StepPlan) -> dict[str, tuple[int, int]]:
    """(sequences, tokens) each client got in the step."""
    shares: dict[str, tuple[int, int]] = {}
    for item in plan.scheduled:
        seqs, tokens = shares.get(item.request.client, (0, 0))
        shares[item.request.client] = (seqs + 1, tokens + item.num_tokens)
    return shares


def heavy_running(sched: Scheduler, count: int = 8, max_tokens: int = 200) -> list[Request]:
    heavy = [client_request(f"heavy-{i}", "heavy", max_tokens=max_tokens, base=100 + 10 * i) for i in range(count)]
    for request in heavy:
        sched.add(request)
    step(sched)  # all prefilled
    assert per_client(step(sched)[0]) == {"heavy": (count, count)}  # alone, the client has the whole step
    return heavy


def test_a_light_client_runs_beside_one_heavy_sequence_and_the_heavy_client_gets_the_step_back() -> None:
    sched = fair_scheduler()
    heavy_running(sched)
    light = client_request("light", "light", prompt_len=5, max_tokens=4)
    sched.add(light)
    plans = []
    while not light.is_finished:
        plans.append(step(sched)[0])
    assert per_client(plans[0]) == {"light": (1, 5), "heavy": (1, 1)}
    for plan in plans[1:]:
        assert per_client(plan) == {"light": (1, 1), "heavy": (1, 1)}
    assert len(plans) == 4  # the light request is never held back
    assert per_client(step(sched)[0]) == {"heavy": (8, 8)}
    assert not sched.clients.live.get("light")


def test_the_heavy_clients_requests_take_turns_while_it_is_capped() -> None:
    sched = fair_scheduler()
    heavy = heavy_running(sched)
    sched.add(client_request("light", "light", max_tokens=40))
    served = [item.request.request_id for _ in range(len(heavy)) for item in step(sched)[0].scheduled
              if item.request.client == "heavy"]
    assert sorted(served) == sorted(r.request_id for r in heavy)  # each once in 8 steps, none starved


def test_where_a_big_batch_costs_what_a_small_one_does_each_client_keeps_an_equal_part_of_the_slots() -> None:
    """On a GPU (flat_batch_cost) more sequences do not slow the light client: the heavy one keeps up to half the
    slots and half the budget beside it, and only beyond that gives way."""
    sched = fair_scheduler(max_num_seqs=16, flat_batch_cost=True)
    heavy_running(sched, count=8)
    sched.add(client_request("light", "light", prompt_len=5, max_tokens=4))
    assert per_client(step(sched)[0]) == {"heavy": (8, 8), "light": (1, 5)}
    for i in range(8, 14):
        sched.add(client_request(f"heavy-{i}", "heavy", max_tokens=200, base=100 + 10 * i))
    assert max(per_client(step(sched)[0])["heavy"][0] for _ in range(3)) <= 8  # 16 slots / 2 clients


def test_two_heavy_clients_share_evenly_and_a_single_client_is_not_capped() -> None:
    sched = fair_scheduler()
    for i in range(6):
        sched.add(client_request(f"a-{i}", "a", base=100 + i))
    for i in range(3):
        sched.add(client_request(f"b-{i}", "b", base=200 + i))
    plan = step(sched)[0]
    assert per_client(plan) == {"a": (3, 9), "b": (3, 9)}  # a is capped at what b asks for
    plan = step(sched)[0]
    assert per_client(plan)["b"] == (3, 3)


def test_without_fair_share_the_light_request_waits_behind_every_heavy_one() -> None:
    sched = fair_scheduler(fair=False)
    heavy_running(sched)
    sched.add(client_request("light", "light", prompt_len=5, max_tokens=4))
    assert per_client(step(sched)[0]) == {"heavy": (8, 8), "light": (1, 5)}


def test_a_heavy_prefill_is_chunked_down_while_a_light_client_decodes() -> None:
    sched = fair_scheduler(budget=64)
    light = client_request("light", "light", max_tokens=10)
    sched.add(light)
    step(sched)
    sched.add(client_request("heavy", "heavy", prompt_len=200, max_tokens=4))
    plan = step(sched)[0]
    assert per_client(plan) == {"light": (1, 1), "heavy": (1, BS)}  # at least a block a step: it progresses
    while not light.is_finished:
        step(sched)
    assert per_client(step(sched)[0])["heavy"][1] > BS


def test_when_every_slot_is_taken_the_busiest_client_gives_one_up() -> None:
    sched = fair_scheduler(max_num_seqs=4)
    heavy = heavy_running(sched, count=4, max_tokens=30)
    light = client_request("light", "light", max_tokens=3)
    sched.add(light)
    plan = step(sched)[0]
    assert light in sched.running and [r.request_id for r in plan.preempted] == []
    assert heavy[-1] in sched.waiting  # the newest heavy request went back to the queue, its tokens kept
    plans = run_to_completion(sched)
    assert all(len(p.scheduled) <= 4 for p in plans)
    assert all(r.num_output_tokens == 30 for r in heavy) and light.num_output_tokens == 3
    assert not sched.clients.live


def run(sched: Scheduler, arrivals: dict[int, list[Request]], model: Model) -> None:
    tick = 0
    while sched.has_work or any(t >= tick for t in arrivals):
        for request in arrivals.get(tick, []):
            sched.add(request)
        if sched.has_work:
            step(sched, model)
        tick += 1
        assert tick < 3000, "no progress"


def test_random_clients_get_the_same_tokens_as_first_come_first_served_and_nothing_leaks() -> None:
    def model(request: Request) -> int:
        return (sum(request.all_token_ids[-3:]) * 31 + request.num_tokens) % 97 + 3

    for seed in range(12):
        outputs = []
        for fair in (False, True):
            rng = random.Random(seed)
            sched = fair_scheduler(num_blocks=rng.choice([24, 64]), budget=rng.choice([6, 16, 64]),
                                   max_num_seqs=rng.choice([3, 8]), fair=fair)
            arrivals: dict[int, list[Request]] = {}
            requests = []
            for i in range(14):
                request = client_request(f"r{i}", rng.choice(["a", "b", "c"]), prompt_len=rng.randint(1, 20),
                                         max_tokens=rng.randint(1, 12), base=rng.randint(3, 50))
                arrivals.setdefault(rng.randint(0, 30), []).append(request)
                requests.append(request)
            run(sched, arrivals, model)
            check_invariants(sched)
            assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
            assert not sched.clients.live and not sched.running and not sched.waiting
            outputs.append({r.request_id: r.output_token_ids for r in requests})
        assert outputs[0] == outputs[1]


def test_a_clients_share_is_held_for_a_moment_after_its_last_request() -> None:
    """Anticipation: the light client's next chat finds the heavy client still held to its share, not running a
    step of all its sequences; once the hold passes, the heavy client has the whole step again."""
    now = [100.0]
    sched = fair_scheduler()
    sched.clients = ClientTracker(hold_s=2.0, clock=lambda: now[0])
    heavy_running(sched)
    light = client_request("light", "light", max_tokens=2)
    sched.add(light)
    while not light.is_finished:
        step(sched)
    now[0] += 1.5
    assert per_client(step(sched)[0]) == {"heavy": (1, 1)}  # held: the light client may be back at any moment
    now[0] += 1.0
    assert per_client(step(sched)[0]) == {"heavy": (8, 8)}


def test_an_aborted_request_leaves_its_clients_count() -> None:
    sched = fair_scheduler()
    heavy = heavy_running(sched, count=2)
    sched.add(client_request("light", "light"))
    assert sched._step_shares() is not None
    for request in heavy:
        sched.finish(request, FinishReason.ABORT)
    assert dict(sched.clients.live) == {"light": 1} and sched._step_shares() is None  # alone again: uncapped


def test_engine_time_is_charged_by_each_clients_part_of_the_work_and_halves_every_half_life() -> None:
    now = [0.0]
    service = AttainedService(clock=lambda: now[0])
    service.charge({"a": 3.0, "b": 1.0}, 0.4)
    assert service.seconds == pytest.approx({"a": 0.3, "b": 0.1})
    now[0] += SERVICE_HALF_LIFE_S
    service.charge({"b": 1.0}, 0.1)
    assert service.seconds == pytest.approx({"a": 0.3 / 2, "b": 0.1 / 2 + 0.1})
    now[0] += 20 * SERVICE_HALF_LIFE_S
    service.charge({"c": 1.0}, 0.01)
    assert service.seconds == {"c": 0.01}  # clients gone for long are forgotten: the table stays small
    assert service.behind(["a", "b", "c"]) == {"a", "b", "c"}
    service.charge({"a": 1.0}, SERVICE_MARGIN_S + 0.1)
    assert service.behind(["a", "b", "c"]) == {"b", "c"}


def test_a_step_is_charged_by_what_each_clients_rows_cost_once_the_step_time_model_knows() -> None:
    """A decode at a 3,000-token context reads 300 times the KV of one at 10 tokens: beside each other in a step,
    the long one's client is charged most of its time (by tokens they would be charged alike)."""
    sched = fair_scheduler()
    sched.max_step_time_s = 0.25
    light = client_request("light", "light", prompt_len=10)
    heavy = client_request("heavy", "heavy", prompt_len=3000)
    plan = StepPlan([ScheduledRequest(light, 1, 9), ScheduledRequest(heavy, 1, 2999)])
    sched.observe_step(plan, 0.1)
    assert sched.clients.service.seconds == {"light": 0.05, "heavy": 0.05}  # the model knows nothing yet
    for rows in range(1, 9):  # decodes: 10 ms a step, 1 ms a row, 10 us per KV token read
        load = StepLoad(rows, rows * 1000, rows * 1000)
        sched.step_time.observe(load, 0.01 + 0.001 * rows + 1e-5 * rows * 1000)
    sched.clients = ClientTracker()
    sched.observe_step(plan, 0.1)
    charged = sched.clients.service.seconds
    assert charged["heavy"] > 20 * charged["light"] and abs(sum(charged.values()) - 0.1) < 1e-9


def charged_steps(sched: Scheduler, now: list[float], count: int, seconds: float = 0.25) -> list[StepPlan]:
    """Steps that each took `seconds` (as the engine core reports them)."""
    plans = []
    for _ in range(count):
        plan = step(sched)[0]
        now[0] += seconds
        sched.observe_step(plan, seconds)
        plans.append(plan)
    return plans


def test_a_client_far_behind_in_engine_time_runs_alone_until_it_has_caught_up() -> None:
    """On a CPU a chat beside a job that had the engine for seconds runs in steps of its own (as fast as alone), not
    beside one of the job's sequences at a long context; once it has had about as much time, they share steps."""
    now = [100.0]
    sched = fair_scheduler()
    sched.clients = ClientTracker(clock=lambda: now[0])
    heavy_running(sched)
    charged_steps(sched, now, 8)  # the heavy client alone, 2 s of engine time
    light = client_request("light", "light", prompt_len=5, max_tokens=4)
    sched.add(light)
    plans = charged_steps(sched, now, 4, seconds=0.02)
    assert [per_client(plan) for plan in plans] == [{"light": (1, 5)}] + [{"light": (1, 1)}] * 3
    assert light.is_finished
    chat = client_request("chat", "light", max_tokens=200)
    sched.add(chat)
    plans = charged_steps(sched, now, 60)
    assert per_client(plans[0]) == {"light": (1, 3)}
    shared = [i for i, plan in enumerate(plans) if "heavy" in per_client(plan)]
    assert shared and per_client(plans[shared[0]]) == {"light": (1, 1), "heavy": (1, 1)}  # caught up: shared
    served = sched.clients.service.seconds
    assert abs(served["light"] - served["heavy"]) <= SERVICE_MARGIN_S + 0.25


def test_a_chat_user_ahead_of_a_job_that_just_started_keeps_its_place_in_shared_steps() -> None:
    """Only a client busier than those behind sits out: the chat user who had the engine before the job came does
    not wait for the job's steps while the job catches up."""
    now = [100.0]
    sched = fair_scheduler()
    sched.clients = ClientTracker(clock=lambda: now[0])
    for i in range(4):
        sched.add(client_request(f"chat-{i}", "light", max_tokens=4))
        charged_steps(sched, now, 4)
    heavy_running(sched)
    sched.add(client_request("chat", "light", max_tokens=4))
    assert sched.clients.service.behind(["light", "heavy"]) == {"heavy"}
    assert per_client(charged_steps(sched, now, 1)[0]) == {"heavy": (1, 1), "light": (1, 3)}


def test_a_client_ahead_keeps_the_step_while_the_clients_behind_cannot_run() -> None:
    """A light request that finds no free KV block cannot start: the heavy client, though far ahead, has the step
    rather than no one (no empty steps), and the light request starts once blocks are free."""
    now = [100.0]
    sched = fair_scheduler(num_blocks=8, max_num_seqs=8)
    sched.clients = ClientTracker(clock=lambda: now[0])
    heavy = heavy_running(sched, count=2, max_tokens=13)
    charged_steps(sched, now, 9)
    assert sched.block_manager.num_free_blocks == 0  # 4 blocks each
    light = client_request("light", "light", prompt_len=4, max_tokens=2)
    sched.add(light)
    plans = charged_steps(sched, now, 3)
    assert [per_client(plan) for plan in plans] == [{"heavy": (1, 1)}] * 3 and light in sched.waiting
    run_to_completion(sched)
    assert [r.num_output_tokens for r in heavy] == [13, 13] and light.num_output_tokens == 2


def test_where_a_big_batch_costs_what_a_small_one_does_no_client_sits_out() -> None:
    now = [100.0]
    sched = fair_scheduler(max_num_seqs=16, flat_batch_cost=True)
    sched.clients = ClientTracker(clock=lambda: now[0])
    heavy_running(sched, count=8)
    charged_steps(sched, now, 20)
    sched.add(client_request("light", "light", prompt_len=5, max_tokens=4))
    assert per_client(step(sched)[0]) == {"heavy": (8, 8), "light": (1, 5)}
    assert not sched.clients.service.seconds  # a GPU's steps are not even charged
