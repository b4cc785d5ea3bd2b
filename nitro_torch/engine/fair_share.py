"""Fair shares of an engine step between clients (API key, else address): no tensors, no I/O.

While more than one client has work, no client gets more of a step than the busiest *other* client asks for:
each client's sequences and tokens in one step are capped at the largest demand among the others (at least one
sequence and `min_tokens` tokens). A light client with one chat therefore runs beside one sequence of a heavy
client's n=64 job, not beside all 64 — its tokens come about as fast as when it is alone — while two heavy clients
still share the step evenly, and a client alone keeps the whole step. Within a client, its least recently
served requests go first, so its own requests take turns.

That is for a device whose step costs about as much per sequence as a sequence alone (a CPU). Where a step of
many sequences costs little more than a step of one (a GPU at decode), more sequences do not slow the light client,
so there every client may also have an equal part of the sequence slots and of the token budget
(`flat_batch_cost`), whatever the others ask for.

A client's share outlives its last request by `hold_s` (anticipation, as disk schedulers wait for the next read
of the process they just served): a chat user or an agent loop sends its next request within moments, and it then
finds the heavy client already held to its share instead of waiting behind a step of all its sequences.

On such a device a client also runs *alone* while it is well behind the others in engine time lately (least
attained service, as a CPU scheduler's virtual runtime): every step's seconds are charged to its clients by their
part of its work (as the step time model predicts it: a row at a long context costs more than a short one; else
by tokens), halving every `SERVICE_HALF_LIFE_S`. A chat that arrives beside a job that has had the engine
for seconds then runs in steps of its own, about as fast as on an idle server, until it has had about as much time
as the job; from there on both share steps as above. (One of the job's rows beside the chat would cost each of the
chat's tokens a long-context attention and the uncompiled path of a batch of two.) Only clients with more sequences
than those behind sit out: a chat user ahead of a job that has just started keeps its place in the shared steps.

Requests of a client that is over its share simply sit out the step with their KV blocks kept; the waiting queue
is served client by client (fewest running first), and when every sequence slot is taken, the busiest client
gives up its newest request to a client that has fewer.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, zip_longest
from typing import Protocol, TypeVar

from nitro_torch.engine.step_time import StepCost, StepLoad


class ClientRequest(Protocol):
    client: str
    last_served: int

    @property
    def num_tokens_with_pending(self) -> int: ...

    @property
    def num_computed_tokens(self) -> int: ...

    @property
    def num_tokens(self) -> int: ...


R = TypeVar("R", bound=ClientRequest)

SERVICE_HALF_LIFE_S = 4.0
"""How long a client's engine time counts: half of it after this many seconds (a chat beside a long job stays
ahead for about that long)."""
SERVICE_MARGIN_S = 0.5
"""How far behind the least served client another must be to sit out (less: both share steps); more than a few
steps, so that two busy clients do not take turns step by step."""
_FORGOTTEN_S = 1e-3


def tokens_wanted(request: ClientRequest) -> int:
    return request.num_tokens_with_pending - request.num_computed_tokens


def _caps(demand: Counter[str], floor: int) -> dict[str, int]:
    """Each client's cap: the largest demand among the other clients, at least `floor`."""
    top = demand.most_common(2)
    largest = top[0][1] if top else 0
    second = top[1][1] if len(top) > 1 else 0
    busiest = top[0][0] if top else None
    return {client: max(floor, second if client == busiest else largest) for client in demand}


def _ahead_and_busier(seqs: Counter[str], service: AttainedService) -> frozenset[str]:
    """The clients that sit out: well ahead in engine time and with more sequences than any client behind (their
    rows would slow the step; a client with fewer would barely, and sitting out would cost it its latency)."""
    if len(seqs) < 2:
        return frozenset()
    behind = service.behind(seqs)
    most = max(seqs[c] for c in behind)
    return frozenset(c for c, n in seqs.items() if c not in behind and n > most)


def work_per_client(loads: Mapping[str, StepLoad], cost: StepCost | None) -> dict[str, float]:
    """Each client's part of a step: what `cost` (the step time model, once it predicts) says its requests cost
    beyond the step's fixed costs (a decode at a long context costs more than one at a short one), else its tokens."""
    if cost is not None:
        work = {client: cost.variable(load) for client, load in loads.items()}
        if sum(work.values()) > 0:
            return work
    return {client: float(load.num_tokens) for client, load in loads.items()}


class AttainedService:
    """Seconds of engine time each client had lately, halving every `half_life_s`."""

    def __init__(self, clock: Callable[[], float], half_life_s: float = SERVICE_HALF_LIFE_S) -> None:
        self.clock = clock
        self.half_life_s = half_life_s
        self.seconds: dict[str, float] = {}
        self._at = clock()

    def charge(self, work: Mapping[str, float], seconds: float) -> None:
        """A step of `seconds` did `work` per client (any unit): each is charged its part of the seconds."""
        now = self.clock()
        kept = 0.5 ** ((now - self._at) / self.half_life_s)
        self._at = now
        if kept < 1.0:  # old clients fade out, so the table holds only the recent ones
            self.seconds = {c: s * kept for c, s in self.seconds.items() if s * kept > _FORGOTTEN_S}
        total = sum(work.values())
        if total <= 0:
            return
        for client, part in work.items():
            if part > 0:
                self.seconds[client] = self.seconds.get(client, 0.0) + seconds * part / total

    def behind(self, clients: Collection[str], margin_s: float = SERVICE_MARGIN_S) -> set[str]:
        """Of `clients`, those within `margin_s` of the least served."""
        least = min((self.seconds.get(c, 0.0) for c in clients), default=0.0)
        return {c for c in clients if self.seconds.get(c, 0.0) <= least + margin_s}


class ClientTracker:
    """Requests added and not finished, per client, the clients whose share is still held after their last, and
    the engine time each had lately."""

    def __init__(self, hold_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.live: Counter[str] = Counter()
        self.hold_s = hold_s
        self.clock = clock
        self._held_until: dict[str, float] = {}
        self.service = AttainedService(clock)

    def add(self, client: str) -> None:
        self.live[client] += 1

    def remove(self, client: str) -> None:
        self.live[client] -= 1
        if self.live[client] <= 0:
            del self.live[client]
            if self.hold_s > 0:
                self._held_until[client] = self.clock() + self.hold_s

    def num_active(self) -> int:
        """Clients with requests, and those whose share is still held."""
        if not self._held_until:
            return len(self.live)
        now = self.clock()
        self._held_until = {c: until for c, until in self._held_until.items() if until > now and c not in self.live}
        return len(self.live) + len(self._held_until)


@dataclass
class StepShares:
    """One step's caps per client and what each has taken so far."""

    max_seqs: dict[str, int]
    max_tokens: dict[str, int]
    running: Counter[str]
    """Running requests per client at the start of the step."""
    seqs: Counter[str] = field(default_factory=Counter)
    tokens: Counter[str] = field(default_factory=Counter)
    excluded: frozenset[str] = frozenset()
    """Clients that sit out the step: well ahead in engine time, and busier than the clients behind."""

    @classmethod
    def of(cls, running: Sequence[ClientRequest], waiting: Iterable[ClientRequest], budget: int,
           min_seqs: int, min_tokens: int, service: AttainedService | None = None) -> StepShares:
        """`min_seqs`, `min_tokens`: what every client may have whatever the others ask for. With `service`, the
        clients well ahead in engine time and busier than those behind sit out (the others share the step)."""
        seqs: Counter[str] = Counter()
        tokens: Counter[str] = Counter()
        for request in chain(running, waiting):
            wanted = tokens_wanted(request)
            if wanted > 0:
                seqs[request.client] += 1
                tokens[request.client] += min(wanted, budget)
        on_engine = Counter(r.client for r in running)
        excluded = _ahead_and_busier(seqs, service) if service is not None else frozenset()
        if not excluded:
            return cls(_caps(seqs, min_seqs), _caps(tokens, min_tokens), on_engine)
        seqs_kept = Counter({c: n for c, n in seqs.items() if c not in excluded})
        tokens_kept = Counter({c: n for c, n in tokens.items() if c not in excluded})
        max_seqs, max_tokens = (_caps(seqs_kept, min_seqs), _caps(tokens_kept, min_tokens)) if len(seqs_kept) > 1 \
            else (dict(seqs_kept), dict(tokens_kept))
        return cls(max_seqs | dict.fromkeys(excluded, 0), max_tokens | dict.fromkeys(excluded, 0), on_engine,
                   excluded=excluded)

    def grant(self, client: str, wanted: int) -> int:
        """How many of `wanted` tokens the client may still schedule in this step (0: it has had its share)."""
        if self.seqs[client] >= self.max_seqs.get(client, 1):
            return 0
        return max(0, min(wanted, self.max_tokens.get(client, wanted) - self.tokens[client]))

    def take(self, client: str, num_tokens: int) -> None:
        self.seqs[client] += 1
        self.tokens[client] += num_tokens

    def running_order(self, running: Sequence[R]) -> list[R]:
        """Clients in turn; within a client decodes first, then the least recently served."""
        per_client: dict[str, list[R]] = {}
        for request in running:
            per_client.setdefault(request.client, []).append(request)
        queues = [sorted(requests, key=lambda r: (tokens_wanted(r) > 1, r.last_served))
                  for requests in per_client.values()]
        return [r for turn in zip_longest(*queues) for r in turn if r is not None]

    def waiting_order(self, waiting: Iterable[R]) -> list[R]:
        """The clients with the fewest running requests first, each client's requests in arrival order."""
        return sorted(waiting, key=lambda r: self.running[r.client])
