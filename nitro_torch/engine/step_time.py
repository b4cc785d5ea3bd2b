"""How long an engine step will take, learned from the steps before it, and a time limit per step. No tensors.

A forward cannot be interrupted, so a request that arrives waits for the step in flight. On a CPU a decode step
of 64 sequences at 3,000-token contexts takes over a second (each sequence reads its whole KV cache), so a chat
that arrives then waits that long before its own prefill can start. The scheduler therefore fills a step only up to
`--max-step-time`, as predicted here: decodes take turns (least recently served first) and prompt chunks are cut.
That costs little: a long-context step's time is almost all per-sequence work, so eight steps of 8 sequences do
about what one step of 64 does (on the 2-core CPU, 45.7 vs 46.5 tokens/s; an n=64 job whose sequences take turns
under the 0.25 s limit kept 0.88-0.94x of its rate, scripts/bench_step_time.py).

The prediction is a least-squares fit of a step's wall time on what it computes: a fixed cost, another fixed cost
when it holds a prompt chunk (prompt steps run another forward path), tokens computed, KV tokens read, and
query-key pairs of attention; coefficients are kept non-negative. The steps it learns from are kept by kind (prompt
or not, and the binary order of magnitude of tokens and of KV read), the last `PER_KIND` of each: a regime that
lasts (a light client holding a heavy one to a single sequence for seconds) then does not wash out what bigger steps
cost, and a one-off stall (a first forward, the machine's other work) is gone once its kind runs a few times more.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

CPU_MAX_STEP_TIME_S = 0.25
"""--max-step-time's default on a CPU: a step of decodes stays within about a short chat's own time there."""
MIN_PREFILL_TOKENS = 512
"""A prompt chunk is not cut below this: each step re-reads the prompt's cached KV and pays a forward's fixed costs,
so on the 2-core CPU 64-token chunks made a 2,400-token prompt's first token about a third slower, and 256-token
ones up to 15 %; 512 tokens take about 1.5 s there."""
PER_KIND = 4
MAX_KINDS = 64
REBUILD_EVERY = 4096
REFIT_AFTER_S = 0.05
"""Seconds of observed steps after which a prediction refits: a fit is ~0.1 ms of Python, so refitting after every
short step (a few ms of decodes) would cost the engine several percent, while any step this long refits at once."""
MIN_OBSERVATIONS = 6
"""Steps seen before the limit applies: until then a step is filled as if there were none."""
_SCALES = (1.0, 1.0, 1e-2, 1e-4, 1e-6)
"""Features scaled to similar magnitudes, so that the normal equations stay well conditioned."""
_RIDGE = 1e-9
_SIZE = len(_SCALES)
_NUM_TERMS = _SIZE * _SIZE + _SIZE


def max_step_time_s(configured: float | None, device_type: str) -> float:
    """--max-step-time, or its default for the device: off where a step of many sequences costs little more than
    one (a GPU decodes 64 long sequences in tens of milliseconds)."""
    if configured is not None:
        return configured
    return CPU_MAX_STEP_TIME_S if device_type == "cpu" else 0.0


@dataclass
class StepLoad:
    """What one step computes, summed over its scheduled requests."""

    num_tokens: int = 0
    kv_tokens: int = 0
    """KV entries attention reads: every scheduled request's context up to its last computed token."""
    attention_pairs: int = 0
    """Query-key pairs of attention (a decode row reads its context once; a prefill chunk's rows each read theirs)."""
    has_prefill: bool = False

    def add(self, start: int, num_tokens: int) -> None:
        self.num_tokens += num_tokens
        self.kv_tokens += start + num_tokens
        self.attention_pairs += num_tokens * start + num_tokens * (num_tokens + 1) // 2
        self.has_prefill = self.has_prefill or num_tokens > 1

    def features(self) -> tuple[float, ...]:
        raw = (1.0, float(self.has_prefill), self.num_tokens, self.kv_tokens, self.attention_pairs)
        return tuple(value * scale for value, scale in zip(raw, _SCALES))

    @staticmethod
    def total(loads: Iterable[StepLoad]) -> StepLoad:
        load = StepLoad()
        for part in loads:
            load.num_tokens += part.num_tokens
            load.kv_tokens += part.kv_tokens
            load.attention_pairs += part.attention_pairs
            load.has_prefill = load.has_prefill or part.has_prefill
        return load


@dataclass(frozen=True)
class StepCost:
    """A fitted step time model as seconds per unit of each part of a step's load."""

    fixed: float = 0.0
    prefill: float = 0.0
    """Added once when the step holds a prompt chunk."""
    per_token: float = 0.0
    per_kv_token: float = 0.0
    per_pair: float = 0.0

    def of(self, load: StepLoad) -> float:
        return self.fixed + self.prefill * load.has_prefill + self.variable(load)

    def variable(self, load: StepLoad) -> float:
        """The seconds of `load` beyond a step's fixed costs."""
        return (self.per_token * load.num_tokens + self.per_kv_token * load.kv_tokens
                + self.per_pair * load.attention_pairs)

    def decodes(self, count: int, sum_of_starts: int) -> float:
        """The seconds that `count` decodes add to a step, from positions that sum to `sum_of_starts` (each reads its
        context and the token it adds)."""
        return self.per_token * count + (self.per_kv_token + self.per_pair) * (sum_of_starts + count)

    def added(self, start: int, num_tokens: int, has_prefill: bool) -> float:
        """The seconds that `num_tokens` more tokens from position `start` add to a step (which `has_prefill`
        already or not), without building the bigger load: the scheduler asks this for every request of every step."""
        if num_tokens == 1:
            return self.decodes(1, start)
        extra = (self.per_token * num_tokens + self.per_kv_token * (start + num_tokens)
                 + self.per_pair * (num_tokens * start + num_tokens * (num_tokens + 1) // 2))
        return extra if has_prefill else extra + self.prefill


class StepTimeModel:
    """Seconds per step as a non-negative linear function of `StepLoad.features`, refit as steps are observed.

    The normal equations' sums are kept up to date as observations come and go, so a fit is a 5x5 solve; it runs
    when a prediction is asked for after `REFIT_AFTER_S` of newly observed steps (or before any fit). Each kept
    observation holds its own terms of those sums (`_terms`), made once, so coming and going is one flat add."""

    def __init__(self) -> None:
        self._kinds: OrderedDict[tuple[bool, int, int], deque[tuple[float, ...]]] = OrderedDict()
        self._observed = 0
        self._sums = [0.0] * _NUM_TERMS
        self._cost: StepCost | None = None
        self._seconds_since_fit = 0.0

    @property
    def ready(self) -> bool:
        return self._observed >= MIN_OBSERVATIONS

    def observe(self, load: StepLoad, seconds: float) -> None:
        if load.num_tokens <= 0 or seconds < 0:
            return
        kind = (load.has_prefill, load.num_tokens.bit_length(), (load.kv_tokens >> 8).bit_length())
        kept = self._kinds.get(kind)
        if kept is None:
            if len(self._kinds) >= MAX_KINDS:
                for old in self._kinds.popitem(last=False)[1]:
                    self._sums = [total - term for total, term in zip(self._sums, old)]
            kept = self._kinds[kind] = deque()
        self._kinds.move_to_end(kind)
        terms = _terms(load.features(), seconds)
        if len(kept) == PER_KIND:
            old = kept.popleft()
            self._sums = [total - gone + new for total, gone, new in zip(self._sums, old, terms)]
        else:
            self._sums = [total + new for total, new in zip(self._sums, terms)]
        kept.append(terms)
        self._observed += 1
        self._seconds_since_fit += seconds
        if self._observed % REBUILD_EVERY == 0:
            self._rebuild()

    def _rebuild(self) -> None:
        """The sums afresh from what is kept (subtracting what left them accumulates rounding)."""
        kept_terms = [terms for kept in self._kinds.values() for terms in kept]
        self._sums = [sum(column) for column in zip(*kept_terms)] if kept_terms else [0.0] * _NUM_TERMS

    def cost(self) -> StepCost:
        """The current fit (refit first when enough has been observed since the last one)."""
        if self._cost is None or self._seconds_since_fit >= REFIT_AFTER_S:
            coefficients = [c * scale for c, scale in zip(self._fit(), _SCALES)]
            self._cost = StepCost(*coefficients)
            self._seconds_since_fit = 0.0
        return self._cost

    def predict(self, load: StepLoad) -> float:
        return self.cost().of(load)

    def _fit(self) -> list[float]:
        """Least squares with an active set: a feature whose coefficient comes out negative is dropped and the
        rest refit, until all are non-negative."""
        active = list(range(_SIZE))
        coefficients = [0.0] * _SIZE
        sums = self._sums
        while active:
            matrix = [[sums[a * _SIZE + b] + (_RIDGE if a == b else 0.0) for b in active] for a in active]
            solution = _solve(matrix, [sums[_SIZE * _SIZE + a] for a in active])
            worst = min(range(len(active)), key=lambda i: solution[i])
            if solution[worst] >= 0:
                for i, value in zip(active, solution):
                    coefficients[i] = value
                break
            del active[worst]
        return coefficients


def _terms(features: tuple[float, ...], seconds: float) -> tuple[float, ...]:
    """One observation's terms of the normal equations' sums: x x^T (row by row), then x * seconds."""
    return tuple([a * b for a in features for b in features] + [a * seconds for a in features])


def _solve(matrix: list[list[float]], vector: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting; a singular direction gets 0."""
    n = len(vector)
    rows = [matrix[i][:] + [vector[i]] for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(rows[r][col]))
        rows[col], rows[pivot] = rows[pivot], rows[col]
        if abs(rows[col][col]) < 1e-15:
            continue
        for r in range(n):
            if r != col and rows[r][col]:
                factor = rows[r][col] / rows[col][col]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col])]
    return [rows[i][n] / rows[i][i] if abs(rows[i][i]) >= 1e-15 else 0.0 for i in range(n)]


class StepTimeLimit:
    """One step's time budget while the scheduler fills it: how much of a request's work still fits.

    The step's first request always gets its tokens, and so does, with at least `min_prefill_tokens` of them (the
    rest of its prompt, if less), the first prompt chunk or joining request of a step: so decodes that fill every
    step cannot starve a prompt or keep a waiting request out, and a long prompt is not cut into chunks so small
    that per-step costs (a forward's fixed work, re-reading the prompt's cached KV) slow its first token down more
    than the limit helps anyone. A step holding such a chunk may therefore run longer than the limit; one of decodes
    alone does not (as far as the prediction goes)."""

    def __init__(self, model: StepTimeModel, limit_s: float, min_prefill_tokens: int) -> None:
        self.limit_s = limit_s
        self.min_prefill_tokens = min_prefill_tokens
        self._cost = model.cost()
        self._predicted_s = self._cost.fixed
        self._has_prefill = False
        self._is_empty = True
        self._has_prompt_or_joiner = False

    def grant(self, start: int, wanted: int, joining: bool = False) -> int:
        """How many of `wanted` tokens (from position `start`) may run in this step: all, a prompt chunk cut to
        fit, or 0 (the request takes its turn in a later step). `joining`: a waiting request, not yet running."""
        if self._fits(start, wanted):
            return wanted
        if wanted == 1 and not joining:  # a decode
            return 1 if self._is_empty else 0
        floor = min(wanted, self.min_prefill_tokens)
        chunk = self._largest_fit(start, wanted)
        if chunk >= floor:
            return chunk
        return 0 if self._has_prompt_or_joiner else floor

    def take(self, start: int, num_tokens: int, joining: bool = False) -> None:
        self._predicted_s += self._cost.added(start, num_tokens, self._has_prefill)
        self._is_empty = False
        if num_tokens > 1:
            self._has_prefill = True
        self._has_prompt_or_joiner = self._has_prompt_or_joiner or joining or num_tokens > 1

    def fits_decodes(self, count: int, sum_of_starts: int) -> bool:
        """Whether `count` decodes (positions summing to `sum_of_starts`) all fit: then none needs a `grant`."""
        return self._predicted_s + self._cost.decodes(count, sum_of_starts) <= self.limit_s

    def take_decodes(self, count: int, sum_of_starts: int) -> None:
        """`take` of `count` decodes at once."""
        self._predicted_s += self._cost.decodes(count, sum_of_starts)
        self._is_empty = self._is_empty and count == 0

    def _fits(self, start: int, num_tokens: int) -> bool:
        return self._predicted_s + self._cost.added(start, num_tokens, self._has_prefill) <= self.limit_s

    def _largest_fit(self, start: int, wanted: int) -> int:
        low, high = 0, wanted  # fits(low) or low == 0; not fits(high)
        while high - low > 1:
            middle = (low + high) // 2
            if self._fits(start, middle):
                low = middle
            else:
                high = middle
        return low
