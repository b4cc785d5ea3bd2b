"""What the load test asks the server itself: Prometheus gauges and counters from /metrics, /health while the
load runs, and whether it still answers afterwards. Used by scripts/load_test.py."""

from __future__ import annotations

import asyncio
import time

import httpx
from load_report import CHAT_PATH, Outcome


def parse_gauges(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sum of each named gauge over its series (one per model_name) in Prometheus' text format."""
    values = {name: 0.0 for name in names}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        metric, _, value = line.rpartition(" ")
        name = metric.split("{", 1)[0]
        if name in values:
            values[name] += float(value)
    return values


def finished_by_reason(text: str) -> dict[str, float]:
    """nitro:request_success_total by finished_reason (abort, length, stop), over all models."""
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("nitro:request_success_total{"):
            metric, _, value = line.rpartition(" ")
            reason = metric.split('finished_reason="', 1)[1].split('"', 1)[0]
            counts[reason] = counts.get(reason, 0.0) + float(value)
    return counts


async def finished_requests(http: httpx.AsyncClient) -> dict[str, float]:
    return finished_by_reason((await http.get("/metrics")).text)


IDLE_GAUGES = ("nitro:num_requests_running", "nitro:num_requests_waiting", "nitro:kv_cache_usage_perc")


async def wait_idle(http: httpx.AsyncClient, timeout_s: float) -> tuple[bool, dict[str, float], float]:
    """Polls /metrics until the running, waiting and KV-usage gauges are all 0: (idle, last gauges, seconds)."""
    started = time.perf_counter()
    gauges: dict[str, float] = {}
    while True:
        try:
            response = await http.get("/metrics")
            gauges = parse_gauges(response.text, IDLE_GAUGES)
            if response.status_code == 200 and not any(gauges.values()):
                return True, gauges, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        if time.perf_counter() - started > timeout_s:
            return False, gauges, time.perf_counter() - started
        await asyncio.sleep(0.1)


async def watch_health(http: httpx.AsyncClient, stop: asyncio.Event, every_s: float = 1.0) -> list[Outcome]:
    """GET /health once a second while the load runs: a liveness probe that times out gets the pod restarted."""
    seen = []
    while not stop.is_set():
        started = time.perf_counter()
        try:
            response = await http.get("/health")
            seen.append(Outcome(kind="health", status=response.status_code, total_s=time.perf_counter() - started))
        except httpx.HTTPError as exc:
            seen.append(Outcome(kind="failed", error=f"/health: {type(exc).__name__}: {exc}"))
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass
    return seen


async def still_serving(http: httpx.AsyncClient) -> tuple[bool, str]:
    try:
        health = await http.get("/health")
        chat = await http.post(CHAT_PATH, json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    except httpx.HTTPError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    detail = f"/health {health.status_code}, chat {chat.status_code}"
    return health.status_code == 200 and chat.status_code == 200, detail
