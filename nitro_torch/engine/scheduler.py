"""One engine step = how many tokens each request computes, under a token budget. No tensors.

Running requests are served first (decodes, then unfinished prefills), then waiting requests in arrival
order; a prompt longer than the remaining budget is prefilled in chunks over several steps. When the KV
pool runs dry the most recently admitted running request is preempted: its blocks are freed and it goes
back to the front of the queue to be recomputed (its cached full blocks usually make that cheap).

What the runner gets is plain data (`StepPlan.for_runner`, made by engine/runner_view.py).

With `fair_share`, while several clients have work, each step is shared between them (engine/fair_share.py): no
client gets more of a step than the busiest other client asks for, and on a CPU a client well behind the others in
engine time lately runs while busier ones sit out (each step's time is charged to its clients in `observe_step`).

With `max_step_time_s`, a step is filled only as far as it is predicted to run within that time (engine/step_time.py):
decodes take turns and prefill chunks are cut, so a request that arrives never waits long for the step in flight.

Choices 2..n of one prompt are forks: they wait until choice 1 (their parent) has computed the prompt,
then share its KV blocks and compute only the last prompt token themselves, so the prompt is prefilled once.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass
from operator import attrgetter

from nitro_torch.engine.block_manager import BlockManager, PrefixHit
from nitro_torch.engine.fair_share import ClientTracker, StepShares, tokens_wanted, work_per_client
from nitro_torch.engine.outputs import FinishReason
from nitro_torch.engine.request import Request, RequestStatus
from nitro_torch.engine.runner_view import RunnerView
from nitro_torch.engine.step_plan import ScheduledRequest, StepPlan
from nitro_torch.engine.step_time import MIN_PREFILL_TOKENS, StepLoad, StepTimeLimit, StepTimeModel

__all__ = ["ScheduledRequest", "Scheduler", "SchedulerStats", "StepPlan"]


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_steps: int = 0


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int,
                 fair_share: bool = False, flat_batch_cost: bool = False, fair_share_hold_s: float = 0.0,
                 max_step_time_s: float = 0.0) -> None:
        self.block_manager = block_manager
        self.fair_share = fair_share
        self.flat_batch_cost = flat_batch_cost
        """A step of many sequences costs about what one costs (a GPU): fair shares then keep an equal part of
        the slots and budget for every client (engine/fair_share.py)."""
        self.clients = ClientTracker(fair_share_hold_s)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_step_time_s = max_step_time_s
        self._num_served = 0
        self.step_time = StepTimeModel()
        """Learns how long steps take from `observe_step`; with `max_step_time_s` it bounds each step."""
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.forks_waiting: dict[str, list[Request]] = {}
        """Parent request id -> forks that wait for the parent's prompt to be computed."""
        self.stats = SchedulerStats()
        self.runner_view = RunnerView()

    def add(self, request: Request) -> None:
        if self.block_manager.blocks_needed(request.max_total_tokens) > self.block_manager.num_blocks:
            raise ValueError(
                f"request {request.request_id} needs {request.max_total_tokens} tokens of KV cache, "
                f"more than the whole cache holds ({self.block_manager.num_blocks * self.block_manager.block_size})"
            )
        request.status = RequestStatus.WAITING
        self.clients.add(request.client)
        parent = request.parent
        if parent is not None and not parent.is_finished:
            if parent.num_computed_tokens < request.num_prompt_tokens:
                self.forks_waiting.setdefault(parent.request_id, []).append(request)
                return
            if self._fork(parent, request):
                return
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.forks_waiting)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + sum(len(forks) for forks in self.forks_waiting.values())

    def _fork(self, parent: Request, child: Request) -> bool:
        """Start `child` on its running parent's computed prompt; False if there is no room now."""
        if (parent.status is not RequestStatus.RUNNING or len(self.running) >= self.max_num_seqs
                or parent.num_computed_tokens < child.num_prompt_tokens):
            return False
        hit = self.block_manager.fork_hit(parent, child)
        if not self.block_manager.can_allocate(child, 1, hit):
            return False
        self.block_manager.allocate(child, 1, hit)
        child.num_cached_tokens = hit.num_tokens
        child.status = RequestStatus.RUNNING
        if child.first_scheduled_time is None:
            child.first_scheduled_time = time.monotonic()
        self.running.append(child)
        return True

    def _release_forks(self, parent: Request) -> None:
        """Fork the parent's waiting children now; those that do not fit queue up as ordinary requests."""
        unplaced = [c for c in self.forks_waiting.pop(parent.request_id, []) if not self._fork(parent, c)]
        for child in reversed(unplaced):
            child.parent = None
            self.waiting.appendleft(child)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        if len(self.clients.live) == 1:
            plan.only_client = next(iter(self.clients.live))
        shares = self._step_shares()
        limit = self._step_time_limit()
        self._fill(plan, shares, limit)
        if not plan.scheduled and shares is not None and shares.excluded:
            # the clients behind could not run now (no room, no slot): the others have the step rather than no one
            self._fill(plan, self._step_shares(least_served_first=False), limit)
        if plan.scheduled:  # the runner runs no empty step: copies and leavers wait for the next one
            plan.block_copies, self.block_manager.pending_copies = self.block_manager.pending_copies, []
            plan.for_runner = self.runner_view.step(plan)
        self.stats.num_steps += 1
        return plan

    def _fill(self, plan: StepPlan, shares: StepShares | None, limit: StepTimeLimit | None) -> None:
        """Running requests first, then waiting ones, within the step's token budget, shares and time limit."""
        budget = self.max_num_batched_tokens
        order, limit_each = self._running_order(shares, limit)
        for request in order:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            with_pending = request.num_tokens_with_pending
            if request.num_pending_tokens and with_pending >= request.max_total_tokens:
                continue  # its pending token is its last: it ends with it
            start = request.num_computed_tokens
            num_new = min(with_pending - start, budget)
            if shares is not None:
                num_new = shares.grant(request.client, num_new)
                if num_new == 0:
                    continue  # the client has had its share of this step
            if limit_each is not None:
                num_new = limit_each.grant(start, num_new)
                if num_new == 0:
                    continue  # it takes its turn in a later step
            if not self._make_room(request, num_new, plan, shares):
                continue
            plan.scheduled.append(ScheduledRequest(request, num_new, start))
            if limit_each is not None:
                limit_each.take(start, num_new)
            if shares is not None:
                shares.take(request.client, num_new)
            request.last_served = self._serve_ticket()
            budget -= num_new
        if limit is not None and limit_each is None:  # every running decode fitted: count them in at once
            limit.take_decodes(len(plan.scheduled), sum(item.start_position for item in plan.scheduled))
        if not plan.preempted:
            if shares is None:
                self._admit_waiting(plan, budget, limit)
            else:
                self._admit_waiting_fairly(plan, budget, shares, limit)

    def _running_order(self, shares: StepShares | None, limit: StepTimeLimit | None
                       ) -> tuple[list[Request], StepTimeLimit | None]:
        """The order running requests are offered the step in, and the time limit each must ask (None when there
        is none, or when every running request is a decode and all of them fit: the usual step)."""
        if shares is not None:
            return shares.running_order(self.running), limit
        decodes = [r for r in self.running if tokens_wanted(r) <= 1]
        others = [r for r in self.running if tokens_wanted(r) > 1] if len(decodes) < len(self.running) else []
        if limit is None:  # decodes first
            return decodes + others, None
        if not others and limit.fits_decodes(len(decodes), sum(r.num_computed_tokens for r in decodes)):
            return decodes, None
        served = attrgetter("last_served")  # not all may fit: each least recently served first
        return sorted(decodes, key=served) + sorted(others, key=served), limit

    def _step_shares(self, least_served_first: bool = True) -> StepShares | None:
        """This step's fair shares, or None while at most one client has work (the whole step is its). Where a
        bigger batch costs more (a CPU), clients well ahead in engine time sit out while others are behind."""
        num_clients = self.clients.num_active() if self.fair_share else 0
        if num_clients < 2 or not self.clients.live:
            return None
        budget = self.max_num_batched_tokens
        if self.flat_batch_cost:
            min_seqs, min_tokens = self.max_num_seqs // num_clients, budget // num_clients
        else:
            min_seqs, min_tokens = 1, self.block_manager.block_size
        service = self.clients.service if least_served_first and not self.flat_batch_cost else None
        return StepShares.of(self.running, self.waiting, budget, max(1, min_seqs),
                             max(self.block_manager.block_size, min_tokens), service)

    def _serve_ticket(self) -> int:
        self._num_served += 1
        return self._num_served

    def _step_time_limit(self) -> StepTimeLimit | None:
        """This step's time budget, once the model has seen enough steps to predict one."""
        if self.max_step_time_s <= 0 or not self.step_time.ready:
            return None
        return StepTimeLimit(self.step_time, self.max_step_time_s, MIN_PREFILL_TOKENS)

    def observe_step(self, plan: StepPlan, seconds: float) -> None:
        """How long the plan's forward and sampling took: the step time model learns from it (when steps are
        limited in time), and under fair shares on a CPU each client is charged its part (a GPU pays for neither)."""
        charged = self.fair_share and not self.flat_batch_cost
        if self.max_step_time_s <= 0 and not charged:
            return
        loads = plan.loads_per_client()
        if self.max_step_time_s > 0:
            self.step_time.observe(StepLoad.total(loads.values()), seconds)
        if charged:
            cost = self.step_time.cost() if self.step_time.ready else None
            self.clients.service.charge(work_per_client(loads, cost), seconds)

    def _make_room(self, request: Request, num_new: int, plan: StepPlan, shares: StepShares | None = None) -> bool:
        """Allocate blocks for `request`, preempting newer requests if needed; False if it was preempted itself.
        Under fair shares the victim is the newest request of the client with the most running."""
        while not self.block_manager.can_allocate(request, num_new):
            victim = self.running[-1]
            if shares is not None:
                busiest = Counter(r.client for r in self.running).most_common(1)[0][0]
                victim = next(r for r in reversed(self.running) if r.client == busiest)
            self._preempt(victim, plan)
            if victim is request:
                return False
        self.block_manager.allocate(request, num_new)
        return True

    def _admit_waiting(self, plan: StepPlan, budget: int, limit: StepTimeLimit | None) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            hit = self.block_manager.find_prefix_hit(request)
            num_new = min(request.num_tokens - hit.num_tokens, budget)
            if limit is not None:
                num_new = limit.grant(hit.num_tokens, num_new, joining=True)
                if num_new == 0:
                    break
            if not self.block_manager.can_allocate(request, num_new, hit):
                break
            self.waiting.popleft()
            self._start_running(request, num_new, hit, plan, limit)
            budget -= num_new

    def _start_running(self, request: Request, num_new: int, hit: PrefixHit, plan: StepPlan,
                       limit: StepTimeLimit | None) -> None:
        self.block_manager.record_prefix_lookup(request, hit)
        self.block_manager.allocate(request, num_new, hit)
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
        self.running.append(request)
        plan.scheduled.append(ScheduledRequest(request, num_new, request.num_computed_tokens))
        request.last_served = self._serve_ticket()
        if limit is not None:
            limit.take(request.num_computed_tokens, num_new, joining=True)

    def _admit_waiting_fairly(self, plan: StepPlan, budget: int, shares: StepShares,
                              limit: StepTimeLimit | None) -> None:
        """`_admit_waiting` under fair shares: clients with the fewest running requests first, each within its
        share; when every sequence slot is taken, a client with at least two more running gives up its newest."""
        for request in shares.waiting_order(self.waiting):
            if budget == 0:
                break
            hit = self.block_manager.find_prefix_hit(request)
            num_new = shares.grant(request.client, min(request.num_tokens - hit.num_tokens, budget))
            if num_new and limit is not None:
                num_new = limit.grant(hit.num_tokens, num_new, joining=True)
            if num_new == 0:
                continue
            if len(self.running) >= self.max_num_seqs and not self._yield_slot(request.client, plan):
                continue
            if not self.block_manager.can_allocate(request, num_new, hit):
                break
            self.waiting.remove(request)
            self._start_running(request, num_new, hit, plan, limit)
            shares.take(request.client, num_new)
            shares.running[request.client] += 1
            budget -= num_new

    def _yield_slot(self, client: str, plan: StepPlan) -> bool:
        """Free a sequence slot for `client` by preempting the newest unscheduled request of a much busier one."""
        shares_running = Counter(r.client for r in self.running)
        busiest, count = shares_running.most_common(1)[0]
        if busiest == client or count <= shares_running[client] + 1:
            return False
        in_step = {id(item.request) for item in plan.scheduled}
        victim = next((r for r in reversed(self.running) if r.client == busiest and id(r) not in in_step), None)
        if victim is None:
            return False
        self._preempt(victim, plan)
        plan.preempted.remove(victim)  # a fair-share hand-over, not a shortage: admission goes on
        return True

    def back_off(self) -> bool:
        """After a step ran out of device memory: halve the step's token budget (down to one block) and preempt
        the newest running request (recomputed later). False when neither is possible any more."""
        shrunk = False
        floor = self.block_manager.block_size
        if self.max_num_batched_tokens > floor:
            self.max_num_batched_tokens = max(floor, self.max_num_batched_tokens // 2)
            shrunk = True
        if len(self.running) > 1:
            self._preempt(self.running[-1], StepPlan())
            shrunk = True
        return shrunk

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        self.runner_view.leave(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(request)
        plan.preempted.append(request)
        plan.scheduled = [s for s in plan.scheduled if s.request is not request]

    def assume_progress(self, plan: StepPlan) -> None:
        """Asynchronous scheduling: count a launched step as computed before its tokens are known, so the next step
        can be planned while it runs; each sampling request has one pending token until `update(assumed=True)`."""
        for item in plan.scheduled:
            item.request.num_computed_tokens += item.num_tokens
            if item.samples:
                item.request.num_pending_tokens += 1

    def rewind(self, plan: StepPlan) -> None:
        """Undo `assume_progress` for a step that did not run (its requests still running are as before it)."""
        for item in plan.scheduled:
            request = item.request
            if request.status is RequestStatus.RUNNING:
                request.num_computed_tokens -= item.num_tokens
            if item.samples and request.num_pending_tokens:
                request.num_pending_tokens -= 1

    def update(self, plan: StepPlan, sampled: dict[str, int], assumed: bool = False) -> list[Request]:
        """Advance computed counts, append sampled tokens, apply token-level stop rules; return finished requests.

        `assumed`: the step's progress was counted when it launched (`assume_progress`); here its pending tokens
        become known, also for a request preempted since (it keeps the token for when it resumes)."""
        finished: list[Request] = []
        for item in plan.scheduled:
            request = item.request
            if assumed and item.samples and request.num_pending_tokens:
                request.num_pending_tokens -= 1
            if request.status is not RequestStatus.RUNNING:
                if not (assumed and request.status is RequestStatus.WAITING and request.request_id in sampled):
                    continue  # aborted while the step ran
            elif assumed:
                self.block_manager.cache_full_blocks(request, item.start_position + item.num_tokens)
            else:
                request.num_computed_tokens += item.num_tokens
                self.block_manager.cache_full_blocks(request)
            if request.request_id in self.forks_waiting and request.num_computed_tokens >= request.num_prompt_tokens:
                self._release_forks(request)
            token = sampled.get(request.request_id)
            if token is None:
                continue
            request.output_token_ids.append(token)
            reason = request.stop_reason(token)
            if reason is not None:
                self.finish(request, reason)
                finished.append(request)
        return finished

    def finish(self, request: Request, reason: FinishReason) -> None:
        """End a request (stop rule, stop string, abort) and free its blocks at once."""
        if request.is_finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        elif request.parent is not None:
            forks = self.forks_waiting.get(request.parent.request_id, [])
            if request in forks:
                forks.remove(request)
                if not forks:
                    del self.forks_waiting[request.parent.request_id]
        if request.request_id in self.forks_waiting:
            self._release_forks(request)
        self.block_manager.free(request)
        self.runner_view.leave(request)
        self.clients.remove(request.client)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
