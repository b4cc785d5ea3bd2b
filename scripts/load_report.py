"""The load test's data and verdict: what each client saw, the checks on one answer, and the summary and
failure list of a run (pure functions; no I/O). Used by scripts/load_test.py."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BASE_URL = "http://127.0.0.1:3928"
CHAT_PATH = "/v1/chat/completions"


@dataclass
class Options:
    base_url: str = DEFAULT_BASE_URL
    clients: int = 256
    max_tokens: int = 16
    disconnect_fraction: float = 0.2
    disconnect_after: int = 3
    bad_bodies: int = 16
    timeout_s: float = 600.0
    idle_timeout_s: float = 60.0
    overload: bool = False
    max_refusal_s: float = 1.0
    probes: int = 4
    probe_delay_s: float = 1.0
    api_key: str | None = None


@dataclass
class Outcome:
    """What one client saw. `kind`: completed, disconnected, bad_body, refused (429), failed."""

    kind: str
    status: int | None = None
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    total_s: float | None = None
    content_chunks: int = 0
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    retry_after: str | None = None
    error: str | None = None


def usage_problem(outcome: Outcome, max_tokens: int) -> str | None:
    """Why a completed stream's usage is wrong, or None. Content chunks may carry more than one token each."""
    usage, reason = outcome.usage or {}, outcome.finish_reason
    prompt, completion, total = (usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens"))
    if not isinstance(prompt, int) or prompt <= 0:
        return f"prompt_tokens {prompt!r}"
    if not isinstance(completion, int) or total != prompt + completion:
        return f"usage {usage}"
    if reason == "length" and completion != max_tokens:
        return f"finish length with completion_tokens {completion} != {max_tokens}"
    if reason == "stop" and not 1 <= completion <= max_tokens:
        return f"finish stop with completion_tokens {completion}"
    if reason not in ("length", "stop"):
        return f"finish_reason {reason!r}"
    if outcome.content_chunks > completion:
        return f"{outcome.content_chunks} content chunks for {completion} tokens"
    return None


def error_shape_problem(status: int, text: str) -> str | None:
    """Why a bad body's answer is not a 4xx with OpenAI's error object, or None."""
    if not 400 <= status < 500:
        return f"status {status}"
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return f"not an error object: {text[:120]}"
    if not (isinstance(error.get("message"), str) and isinstance(error.get("type"), str)
            and "param" in error and "code" in error):
        return f"error object lacks message/type/param/code: {error}"
    return None


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summarize(outcomes: list[Outcome], probes: list[Outcome], disconnecting: set[int], options: Options,
              wall_s: float) -> dict[str, Any]:
    completed = [o for o in outcomes if o.kind == "completed"]
    refused = [o for o in outcomes if o.kind == "refused"]
    gaps = [gap for o in completed for gap in o.gaps_s]
    ttfts = [o.ttft_s for o in completed if o.ttft_s is not None]
    stats = {
        "clients": options.clients, "max_tokens": options.max_tokens, "bad_bodies_sent": options.bad_bodies,
        "wall_s": wall_s,
        "requests_per_s": len(completed) / wall_s if wall_s else 0.0,
        "completion_tokens_per_s": sum((o.usage or {}).get("completion_tokens", 0) for o in completed) / wall_s,
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99),
        "e2e_p50_s": percentile([o.total_s for o in completed if o.total_s], 50),
        "e2e_p99_s": percentile([o.total_s for o in completed if o.total_s], 99),
        "completed": len(completed),
        "disconnected": sum(o.kind == "disconnected" for o in outcomes),
        "disconnect_planned": len(disconnecting),
        "bad_body_4xx": sum(o.kind == "bad_body" for o in outcomes),
        "status_4xx": sum(o.status is not None and 400 <= o.status < 500 for o in outcomes),
        "status_429": len(refused),
        "status_5xx": sum(o.status is not None and o.status >= 500 for o in outcomes),
        "other_errors": sum(o.kind == "failed" and (o.status is None or o.status < 400) for o in outcomes),
        "usage_problems": [],
        "errors": [o.error for o in outcomes if o.kind == "failed" and o.error][:20],
    }
    stats["usage_problems"] = [p for p in (usage_problem(o, options.max_tokens) for o in completed) if p][:20]
    if refused:
        latencies = [o.total_s for o in refused if o.total_s is not None]
        stats.update({"refusal_p50_s": percentile(latencies, 50), "refusal_p99_s": percentile(latencies, 99),
                      "refusal_max_s": max(latencies, default=None),
                      "refusals_without_retry_after": sum(not o.retry_after for o in refused)})
    stats["probes_sent"] = len(probes)
    if probes:
        stats["probe_429_s"] = [o.total_s for o in probes if o.kind == "refused"]
        stats["probes_admitted"] = sum(o.status == 200 for o in probes)
    return stats


def failures(stats: dict[str, Any], options: Options, streams: list[Outcome], bad: list[Outcome],
             disconnecting: set[int]) -> list[str]:
    """What makes the run fail: the checks named in the module docstring."""
    found = []
    if stats["status_5xx"]:
        found.append(f"{stats['status_5xx']} responses were 5xx")
    if stats["usage_problems"]:
        found.append(f"wrong usage: {stats['usage_problems'][:3]}")
    # a disconnecting client may also finish before its disconnect point; anything else it does is a loss
    lost = [o for i, o in enumerate(streams)
            if o.kind != "completed" and not (i in disconnecting and o.kind == "disconnected")]
    if options.overload:
        lost = [o for o in lost if o.status == 200]
        if not stats["status_429"]:
            found.append("no request was refused with 429")
        if stats.get("refusals_without_retry_after"):
            found.append(f"{stats['refusals_without_retry_after']} 429s lack Retry-After")
        # the burst's own 429s also time the client opening all its connections at once; the late probes don't
        timed = stats.get("probe_429_s") if options.probes else [stats.get("refusal_max_s") or 0.0]
        if max(timed or [0.0]) > options.max_refusal_s:
            found.append(f"a 429 took {max(timed):.3f} s > {options.max_refusal_s} s")
        other = [o for o in streams if o.status not in (200, 429)]
        if other:
            found.append(f"{len(other)} requests neither admitted nor refused: {[o.error for o in other[:3]]}")
    if lost:
        found.append(f"{len(lost)} requests lost: {[o.error for o in lost[:3]]}")
    if any(o.kind != "bad_body" for o in bad):
        found.append(f"bad bodies not answered 4xx with an error object: {[o.error for o in bad if o.error][:3]}")
    # every request the engine took ended exactly once (assumes nobody else uses the server meanwhile); which way
    # a client that goes away ends is a race with its last tokens, so only the sum is checked
    ended = sum(stats["server_finished"].values())
    if ended != stats["completed"] + stats["disconnected"]:
        found.append(f"the engine ended {ended:.0f} requests ({stats['server_finished']}), the clients saw "
                     f"{stats['completed']} complete and {stats['disconnected']} go away")
    if stats["health_failures"]:
        found.append(f"/health failed during the run: {stats['health_failures'][:3]}")
    if not stats["idle"]:
        found.append(f"not idle after {options.idle_timeout_s} s: {stats['idle_gauges']}")
    if not stats["still_serving"]:
        found.append(f"server not answering after the run: {stats['still_serving_detail']}")
    return found


def format_report(stats: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        return "-" if stats.get(key) is None else f"{stats[key] * 1000:.0f} ms"

    lines = [
        f"{stats['mode']}: {stats['clients']} clients, max_tokens {stats['max_tokens']}, {stats['wall_s']:.1f} s",
        (f"  completed {stats['completed']}  disconnected {stats['disconnected']}/{stats['disconnect_planned']}  "
         f"bad-body 4xx {stats['bad_body_4xx']}/{stats['bad_bodies_sent']}  429 {stats['status_429']}  "
         f"5xx {stats['status_5xx']}  other errors {stats['other_errors']}"),
        f"  {stats['requests_per_s']:.2f} req/s  {stats['completion_tokens_per_s']:.1f} completion tok/s",
        (f"  TTFT p50 {ms('ttft_p50_s')} p99 {ms('ttft_p99_s')}   ITL p50 {ms('itl_p50_s')} p99 {ms('itl_p99_s')}"
         f"   e2e p50 {ms('e2e_p50_s')} p99 {ms('e2e_p99_s')}"),
    ]
    if stats["status_429"]:
        lines.append(f"  429 latency p50 {ms('refusal_p50_s')} p99 {ms('refusal_p99_s')} max {ms('refusal_max_s')}, "
                     f"without Retry-After: {stats['refusals_without_retry_after']}")
    if "probe_429_s" in stats:
        probes = ", ".join(f"{s * 1000:.0f} ms" for s in stats["probe_429_s"]) or "-"
        lines.append(f"  late probes: 429 in {probes}; admitted {stats['probes_admitted']}")
    lines.append(f"  /health during the run: {stats['health_checks']} checks, p50 {ms('health_p50_s')}, "
                 f"max {ms('health_max_s')}, failures {len(stats['health_failures'])}")
    lines.append(f"  engine finished (from /metrics): {stats['server_finished']}")
    lines.append(f"  idle: {stats['idle']} after {stats['idle_after_s']:.1f} s {stats['idle_gauges']}; "
                 f"still serving: {stats['still_serving_detail']}")
    lines.append("  PASS" if stats["ok"] else "  FAIL: " + "; ".join(stats["failures"]))
    return "\n".join(lines)
