"""Timing the systems (round-robin, fresh state per run) and cross-checking their greedy tokens."""

from __future__ import annotations

import os
import statistics
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field

from nitro_torch.bench.context import REFERENCE_SYSTEM, BenchContext
from nitro_torch.bench.http_client import ServerError
from nitro_torch.bench.models import release_device_memory
from nitro_torch.bench.roofline import weight_bytes_read
from nitro_torch.bench.systems import Outputs, System, system_class
from nitro_torch.bench.workloads import BenchRequest


@dataclass
class Run:
    wall_s: float
    tokens: int
    load_avg_1m: float = float("nan")
    """1-minute load average when the run started (this machine is shared: a high value means contention)."""
    latency: dict[str, float] | None = None
    """Client-side measurements of a system that has them (`server`: TTFT, ITL, end-to-end, errors, ...)."""

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class SystemResult:
    name: str
    runs: list[Run] = field(default_factory=list)
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)
    outputs: Outputs | None = None
    num_requests: int = 0

    @property
    def median_tok_s(self) -> float | None:
        return statistics.median(r.tok_s for r in self.runs) if self.runs else None

    @property
    def median_latency(self) -> dict[str, float] | None:
        """Each latency measurement's median over the runs (None for systems that do not measure latency)."""
        stats = [r.latency for r in self.runs if r.latency]
        if not stats:
            return None
        return {key: statistics.median(s[key] for s in stats) for key in stats[0]}


def count_tokens(outputs: Outputs, requests: Sequence[BenchRequest]) -> tuple[int, int]:
    """(useful generated tokens: each request's output up to its own max_tokens, requests that came up short)."""
    if len(outputs) != len(requests):
        raise RuntimeError(f"got {len(outputs)} outputs for {len(requests)} requests")
    useful = [min(len(o), r.max_tokens) for o, r in zip(outputs, requests, strict=True)]
    short = sum(u < r.max_tokens for u, r in zip(useful, requests, strict=True))
    return sum(useful), short


def benchmark(names: Sequence[str], ctx: BenchContext, repeats: int) -> dict[str, SystemResult]:
    """Load every system, then time them round-robin (repeat 1 of each, then repeat 2 of each, ...) so that a
    change in background load during the run hits all systems alike. A system that fails is reported and dropped."""
    results = {name: SystemResult(name, num_requests=len(ctx.requests_for(name))) for name in names}
    systems: dict[str, System] = {}
    try:
        for name in names:
            system = _load(system_class(name), ctx, results[name])
            if system is not None:
                systems[name] = system
        for i in range(repeats):
            for name, system in list(systems.items()):
                if not _run_once(system, ctx, results[name], f"run {i + 1}/{repeats}"):
                    systems.pop(name).close()
    finally:
        for system in systems.values():
            system.close()
        release_device_memory()
    for name, result in results.items():
        for note in result.notes:
            print(f"[{name}] {note}")
    return results


def _load(cls: type[System], ctx: BenchContext, result: SystemResult) -> System | None:
    reason = cls.unavailable(ctx)
    if reason is not None:
        result.skipped = reason
        print(f"[{cls.name}] skipped: {reason}", flush=True)
        return None
    system = cls(ctx)
    result.notes = system.notes
    t0 = time.perf_counter()
    try:
        system.load()
    except Exception as exc:  # noqa: BLE001 - report and go on with the other systems
        _fail(result, "load", exc)
        return None
    model = system.model_module()
    if model is not None:
        ctx.weight_bytes[cls.name] = weight_bytes_read(model)
    print(f"[{cls.name}] loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    return system


def _run_once(system: System, ctx: BenchContext, result: SystemResult, label: str) -> bool:
    """start (untimed) -> generate (timed) -> stop; False when it failed."""
    requests = system.requests
    try:
        release_device_memory()
        system.start()
        load = load_avg()
        t0 = time.perf_counter()
        outputs = system.generate(requests)
        wall = time.perf_counter() - t0
        latency = system.run_stats()
        system.stop()
        release_device_memory()
        tokens, short = count_tokens(outputs, requests)
    except Exception as exc:  # noqa: BLE001
        _fail(result, label, exc)
        return False
    if short:
        note = f"{short} requests produced fewer than max_tokens (EOS not ignored?): counted what was produced"
        if note not in result.notes:
            result.notes.append(note)
    run = Run(wall, tokens, load, latency)
    result.runs.append(run)
    result.outputs = outputs
    print(
        f"[{result.name}] {label}: {len(requests)} requests, {run.tokens} tokens in {run.wall_s:.2f} s -> "
        f"{run.tok_s:.1f} tok/s (load avg {load:.1f})" + (f", {latency['errors']:g} errors" if latency else ""),
        flush=True,
    )
    return True


def _fail(result: SystemResult, stage: str, exc: Exception) -> None:
    if not isinstance(exc, ServerError):  # a server's refusal is one line; anything else gets its traceback
        traceback.print_exc()
    result.skipped = f"failed in {stage}: {type(exc).__name__}: {exc}"
    print(f"[{result.name}] {result.skipped}", flush=True)


def load_avg() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# correctness cross-check
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    system: str
    reference: str
    identical: int
    total: int
    first_divergence: list[int]
    """Per request: index of the first differing token, or -1 when identical."""
    lengths: list[int] = field(default_factory=list)
    """Per request: the reference's tokens compared."""

    @property
    def compared_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def leading_matches(self) -> int:
        """Tokens equal to the reference's up to each request's first difference (greedy answers part there)."""
        return sum(n if d < 0 else d for d, n in zip(self.first_divergence, self.lengths, strict=True))


def compare_outputs(name: str, outputs: Outputs, ref_name: str, ref: Outputs,
                    requests: Sequence[BenchRequest]) -> CheckResult:
    """Over the requests both ran (the baselines may have run only the first --baseline-limit)."""
    divergence, lengths = [], []
    for out, expected, r in zip(outputs, ref, requests, strict=False):
        a, b = out[: r.max_tokens], expected[: r.max_tokens]
        lengths.append(len(b))
        diff = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), -1)
        if diff < 0 and len(a) != len(b):
            diff = min(len(a), len(b))
        divergence.append(diff)
    identical = sum(d < 0 for d in divergence)
    return CheckResult(name, ref_name, identical, len(divergence), divergence, lengths)


def run_checks(results: dict[str, SystemResult], requests: Sequence[BenchRequest]) -> list[CheckResult]:
    ref = results.get(REFERENCE_SYSTEM)
    if ref is None or ref.outputs is None:
        print(f"check: no {REFERENCE_SYSTEM} outputs to compare against")
        return []
    checks = []
    for name, res in results.items():
        if name == REFERENCE_SYSTEM:
            continue
        if res.outputs is None:
            print(f"check: {name} has no outputs ({res.skipped or 'not run'})")
            continue
        if not system_class(name).token_outputs:
            print(f"check: {name} does not return token ids (only their count): not compared")
            continue
        check = compare_outputs(name, res.outputs, REFERENCE_SYSTEM, ref.outputs, requests)
        diverged = [d for d in check.first_divergence if d >= 0]
        detail = f"; diverging requests split at token {sorted(diverged)}" if diverged else ""
        print(f"check: {name} vs {REFERENCE_SYSTEM}: {check.identical}/{check.total} requests identical, "
              f"{check.leading_matches}/{check.compared_tokens} tokens before the first difference{detail}")
        checks.append(check)
    return checks
