"""Per-request metrics the engine accumulates as requests finish: token counters, finish reasons and latency
histograms. Tensor-free and cheap (one `observe` per finished request, under a lock); the server's /metrics
collector reads a `snapshot()` at scrape time.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

from nitro_torch.engine.outputs import RequestOutput

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       20.0, 40.0, 80.0)


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    """Per bucket (not cumulative); the last entry is the +Inf bucket."""
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total, self.count)

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.total += other.total
        self.count += other.count

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: (upper bound, cumulative count), ending with +Inf."""
        out, running = [], 0
        for bound, n in zip((*map(repr, map(float, self.bounds)), "+Inf"), self.counts):
            running += n
            out.append((bound, running))
        return out


@dataclass
class MetricsSnapshot:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    inter_token_latency: Histogram = field(default_factory=lambda: Histogram(INTER_TOKEN_BUCKETS))
    e2e_latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    queue_time: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))

    HISTOGRAMS = ("time_to_first_token", "inter_token_latency", "e2e_latency", "queue_time")

    def merge(self, other: MetricsSnapshot) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.generation_tokens += other.generation_tokens
        for reason, n in other.finished.items():
            self.finished[reason] = self.finished.get(reason, 0) + n
        for name in self.HISTOGRAMS:
            getattr(self, name).merge(getattr(other, name))


class RequestMetrics:
    """Accumulates finished requests; `observe` runs on the event loop (the output processor), `snapshot` on any
    thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data = MetricsSnapshot()

    def observe(self, output: RequestOutput) -> None:
        """One finished request. Every request counts its own prompt (n > 1 choices each count it)."""
        with self._lock:
            data = self._data
            data.prompt_tokens += output.num_prompt_tokens
            data.generation_tokens += output.num_output_tokens
            reason = output.finish_reason.value if output.finish_reason is not None else "unknown"
            data.finished[reason] = data.finished.get(reason, 0) + 1
            arrival, finished = output.arrival_time, output.finished_time
            if arrival is None or finished is None:
                return
            data.e2e_latency.observe(max(0.0, finished - arrival))
            if output.first_scheduled_time is not None:
                data.queue_time.observe(max(0.0, output.first_scheduled_time - arrival))
            first_token = output.first_token_time
            if first_token is not None:
                data.time_to_first_token.observe(max(0.0, first_token - arrival))
                last_token = output.last_token_time
                if last_token is not None and output.num_output_tokens > 1:  # mean gap between its tokens
                    data.inter_token_latency.observe(
                        max(0.0, last_token - first_token) / (output.num_output_tokens - 1))

    def reset(self) -> None:
        """Forget everything observed so far (a warm-up request is not traffic)."""
        with self._lock:
            self._data = MetricsSnapshot()

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            data = self._data
            copy = MetricsSnapshot(data.prompt_tokens, data.generation_tokens, dict(data.finished))
            for name in MetricsSnapshot.HISTOGRAMS:
                setattr(copy, name, getattr(data, name).copy())
            return copy
