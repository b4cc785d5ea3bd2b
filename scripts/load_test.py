"""Loopback load test for a running `nitro-torch serve`: many streaming chats at once, some clients that go away
mid-stream, some bad bodies; then a leak check through /metrics and a liveness check through /health.

    python scripts/load_test.py --clients 256 --max-tokens 16 [--json PATH]
    python scripts/load_test.py --overload --clients 64     # against a server with a small --max-queued-requests

Load mode fails (exit 1) on any 5xx, any streaming client that should have completed and did not (error,
timeout, 429, a stream without usage or [DONE]), wrong usage, a bad body not answered 4xx with OpenAI's error
shape, running/waiting/KV usage not back to 0 within --idle-timeout, or /health not 200.
Overload mode fails on any 5xx, no 429 at all, a 429 without Retry-After, a late probe's 429 slower than
--max-refusal-s, or an admitted request that did not complete; then the same leak and liveness checks.
Both fail if /health is not 200 during the run, or if the engine's finished-request count (/metrics) differs
from what the clients saw: so run it against a server nobody else uses meanwhile.

Timings are the client's own, taken on the same machine as the server: on a small CPU they include the
client's share of the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_report import (  # noqa: E402
    CHAT_PATH,
    Options,
    Outcome,
    error_shape_problem,
    failures,
    format_report,
    percentile,
    summarize,
)
from load_server import finished_requests, still_serving, wait_idle, watch_health  # noqa: E402

TOPICS = ("the sea", "a small town", "coffee", "trains", "the moon", "winter", "a library", "bicycles")
BAD_BODIES: tuple[tuple[str, bytes], ...] = (
    ("malformed_json", b'{"messages": [{"role": "user", "content": "Hello"'),
    ("messages_not_a_list", json.dumps({"messages": "Hello"}).encode()),
    ("max_tokens_a_string", json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                                        "max_tokens": "many"}).encode()),
    ("tool_choice_without_tools", json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                                              "tool_choice": "required", "stream": True}).encode()),
    ("body_a_list", b"[1, 2, 3]"),
    ("temperature_a_string", json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                                         "temperature": "hot", "stream": True}).encode()),
    ("messages_missing", json.dumps({"model": "", "max_tokens": 4}).encode()),
    ("not_utf8", b"\xff\xfe\x00{"),
)


# --- one client ------------------------------------------------------------------------------------------------

def chat_body(index: int, max_tokens: int) -> dict[str, Any]:
    topic = TOPICS[index % len(TOPICS)]
    return {"model": "", "messages": [{"role": "user", "content": f"Write one sentence about {topic}."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}


async def stream_chat(http: httpx.AsyncClient, index: int, max_tokens: int, disconnect_after: int | None) -> Outcome:
    """One streaming chat; with `disconnect_after`, the client closes the connection after that many content
    chunks (closing a response that was not read to the end closes its connection, so the server sees it)."""
    started = time.perf_counter()
    outcome = Outcome(kind="failed")
    last: float | None = None
    try:
        async with http.stream("POST", CHAT_PATH, json=chat_body(index, max_tokens)) as response:
            outcome.status = response.status_code
            if response.status_code != 200:
                outcome.retry_after = response.headers.get("retry-after")
                outcome.error = (await response.aread()).decode(errors="replace")[:300]
                outcome.total_s = time.perf_counter() - started
                outcome.kind = "refused" if response.status_code == 429 else "failed"
                return outcome
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    outcome.error = f"error event: {event['error']}"
                    return outcome
                if event.get("usage"):
                    outcome.usage = event["usage"]
                for choice in event.get("choices") or ():
                    if choice.get("finish_reason"):
                        outcome.finish_reason = choice["finish_reason"]
                    if not choice.get("delta", {}).get("content"):
                        continue
                    now = time.perf_counter()
                    if last is None:
                        outcome.ttft_s = now - started
                    else:
                        outcome.gaps_s.append(now - last)
                    last = now
                    outcome.content_chunks += 1
                if disconnect_after is not None and outcome.content_chunks >= disconnect_after:
                    outcome.kind = "disconnected"
                    return outcome  # leaving the block closes the connection mid-stream
            outcome.total_s = time.perf_counter() - started
            if not done:
                outcome.error = "stream ended without [DONE]"
            elif outcome.usage is None:
                outcome.error = "no usage chunk"
            else:
                outcome.kind = "completed"
            return outcome
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
        return outcome


async def send_bad_body(http: httpx.AsyncClient, index: int) -> Outcome:
    name, content = BAD_BODIES[index % len(BAD_BODIES)]
    started = time.perf_counter()
    try:
        response = await http.post(CHAT_PATH, content=content, headers={"content-type": "application/json"})
    except httpx.HTTPError as exc:
        return Outcome(kind="failed", error=f"bad body {name}: {type(exc).__name__}: {exc}")
    problem = error_shape_problem(response.status_code, response.text)
    return Outcome(kind="bad_body" if problem is None else "failed", status=response.status_code,
                   total_s=time.perf_counter() - started, error=None if problem is None else f"{name}: {problem}")


# --- the run ---------------------------------------------------------------------------------------------------

def disconnecting_clients(clients: int, fraction: float) -> set[int]:
    """floor(clients * fraction) client indices, spread evenly."""
    return {i for i in range(clients) if math.floor((i + 1) * fraction) > math.floor(i * fraction)}


async def late_probes(http: httpx.AsyncClient, options: Options) -> list[Outcome]:
    """Overload: one request at a time once the burst has filled the queue, so a 429's latency is the server's
    alone and not that of opening the burst's connections."""
    await asyncio.sleep(options.probe_delay_s)
    return [await stream_chat(http, options.clients + i, options.max_tokens, None) for i in range(options.probes)]


async def no_probes() -> list[Outcome]:
    return []


async def run_async(options: Options) -> dict[str, Any]:
    disconnecting = set() if options.overload else disconnecting_clients(options.clients, options.disconnect_fraction)
    bad_bodies = 0 if options.overload else options.bad_bodies
    options = Options(**{**asdict(options), "bad_bodies": bad_bodies})
    total = options.clients + bad_bodies
    limits = httpx.Limits(max_connections=total + 8, max_keepalive_connections=total + 8)
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else None
    async with httpx.AsyncClient(base_url=options.base_url, limits=limits, timeout=options.timeout_s,
                                 headers=headers) as http:
        tasks = [stream_chat(http, i, options.max_tokens, options.disconnect_after if i in disconnecting else None)
                 for i in range(options.clients)]
        tasks += [send_bad_body(http, i) for i in range(bad_bodies)]
        finished_before = await finished_requests(http)
        stop = asyncio.Event()
        health = asyncio.create_task(watch_health(http, stop))
        started = time.perf_counter()
        outcomes, probes = await asyncio.gather(asyncio.gather(*tasks),
                                                late_probes(http, options) if options.overload else no_probes())
        wall_s = time.perf_counter() - started
        stop.set()
        health_checks = await health
        stats = summarize([*outcomes, *probes], probes, disconnecting, options, wall_s)
        idle, gauges, idle_after_s = await wait_idle(http, options.idle_timeout_s)
        finished_after = await finished_requests(http)
        serving, detail = await still_serving(http)
    health_s = [o.total_s for o in health_checks if o.total_s is not None]
    stats.update({"health_checks": len(health_checks), "health_p50_s": percentile(health_s, 50),
                  "health_max_s": max(health_s, default=None),
                  "health_failures": [o.error or f"status {o.status}" for o in health_checks if o.status != 200]})
    stats.update({"mode": "overload" if options.overload else "load", "idle": idle, "idle_gauges": gauges,
                  "idle_after_s": idle_after_s, "still_serving": serving, "still_serving_detail": detail,
                  "server_finished": {reason: finished_after[reason] - finished_before.get(reason, 0.0)
                                      for reason in sorted(finished_after)}})
    streams, bad = [*outcomes[:options.clients], *probes], outcomes[options.clients:]
    stats["failures"] = failures(stats, options, streams, bad, disconnecting)
    stats["ok"] = not stats["failures"]
    return stats


def run(options: Options) -> dict[str, Any]:
    """Runs the load (or overload) test against `options.base_url`; the report's `ok` says whether it passed."""
    return asyncio.run(run_async(options))


def parse_args(argv: list[str] | None) -> tuple[Options, str | None]:
    defaults = Options()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default=defaults.base_url)
    parser.add_argument("--clients", type=int, default=defaults.clients, help="concurrent streaming chats")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--disconnect-fraction", type=float, default=defaults.disconnect_fraction,
                        help="share of clients that close the connection mid-stream")
    parser.add_argument("--disconnect-after", type=int, default=defaults.disconnect_after,
                        help="content chunks those clients read first")
    parser.add_argument("--bad-bodies", type=int, default=defaults.bad_bodies, help="requests with bad bodies")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s, help="per-request timeout, seconds")
    parser.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout_s,
                        help="seconds to wait for /metrics to show no running/waiting request and no KV in use")
    parser.add_argument("--overload", action="store_true",
                        help="expect 429 + Retry-After beyond the server's --max-queued-requests")
    parser.add_argument("--max-refusal-s", type=float, default=defaults.max_refusal_s,
                        help="overload: the slowest 429 allowed (of the late probes, if any), seconds")
    parser.add_argument("--probes", type=int, default=defaults.probes,
                        help="overload: requests sent one at a time after the burst, to time a 429 alone")
    parser.add_argument("--probe-delay", type=float, default=defaults.probe_delay_s,
                        help="overload: seconds after the burst before the first probe")
    parser.add_argument("--api-key", help="sent as a Bearer token, for a server started with --api-key")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    args = parser.parse_args(argv)
    options = Options(base_url=args.base_url.rstrip("/"), clients=args.clients, max_tokens=args.max_tokens,
                      disconnect_fraction=args.disconnect_fraction, disconnect_after=args.disconnect_after,
                      bad_bodies=args.bad_bodies, timeout_s=args.timeout, idle_timeout_s=args.idle_timeout,
                      overload=args.overload, max_refusal_s=args.max_refusal_s, probes=args.probes,
                      probe_delay_s=args.probe_delay, api_key=args.api_key)
    return options, args.json


def main(argv: list[str] | None = None) -> int:
    options, json_path = parse_args(argv)
    stats = run(options)
    print(format_report(stats))
    if json_path:
        with open(json_path, "w") as out:
            json.dump(stats, out, indent=2)
    return 0 if stats["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
