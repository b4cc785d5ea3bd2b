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

Requests of a client that is over its share simply sit out the step with their KV blocks kept; the waiting queue
is served client by client (fewest running first), and when every sequence slot is taken, the busiest client
gives up its newest request to a client that has fewer.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain, zip_longest
from typing import Protocol, TypeVar


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


def tokens_wanted(request: ClientRequest) -> int:
    return request.num_tokens_with_pending - request.num_computed_tokens


def _caps(demand: Counter[str], floor: int) -> dict[str, int]:
    """Each client's cap: the largest demand among the other clients, at least `floor`."""
    top = demand.most_common(2)
    largest = top[0][1] if top else 0
    second = top[1][1] if len(top) > 1 else 0
    busiest = top[0][0] if top else None
    return {client: max(floor, second if client == busiest else largest) for client in demand}


class ClientTracker:
    """Requests added and not finished, per client, and the clients whose share is still held after their last."""

    def __init__(self, hold_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.live: Counter[str] = Counter()
        self.hold_s = hold_s
        self.clock = clock
        self._held_until: dict[str, float] = {}

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

    @classmethod
    def of(cls, running: Sequence[ClientRequest], waiting: Iterable[ClientRequest], budget: int,
           min_seqs: int, min_tokens: int) -> StepShares:
        """`min_seqs`, `min_tokens`: what every client may have whatever the others ask for."""
        seqs: Counter[str] = Counter()
        tokens: Counter[str] = Counter()
        for request in chain(running, waiting):
            wanted = tokens_wanted(request)
            if wanted > 0:
                seqs[request.client] += 1
                tokens[request.client] += min(wanted, budget)
        return cls(_caps(seqs, min_seqs), _caps(tokens, min_tokens), Counter(r.client for r in running))

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
