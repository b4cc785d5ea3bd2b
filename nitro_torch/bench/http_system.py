"""`server`: a running OpenAI-compatible server, benchmarked over HTTP with the workload's requests (`--url`).

Every request is a streaming request with `stream_options.include_usage`, temperature 0 and `ignore_eos` (vLLM's
and nitro_torch's extension), so the server generates exactly each request's `max_tokens`, as the in-process
systems do. Token-id requests go to /v1/completions (`prompt` as a list of token ids), chat requests (the ones
that carry `messages`) to /v1/chat/completions, where the server applies its own chat template.

All requests are sent at once (a thread per request, as the in-process systems get them all at once);
`--concurrency N` caps the requests in flight. Measured per run, client side: output tok/s (completion tokens
from the usage chunks / wall time), requests/s, TTFT (time to the first streamed text) median/p90, inter-token
latency (median gap between successive text chunks), end-to-end latency median/p90, and failed requests.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nitro_torch.bench.context import SERVER, BenchContext
from nitro_torch.bench.http_client import Server, ServerError, StreamResult, probe, stream_request
from nitro_torch.bench.systems import Outputs, System
from nitro_torch.bench.workloads import BenchRequest

WARMUP_TOKENS = 4
COMPILE_WAIT_S = 300.0
"""How long a run waits for a nitro_torch server's background decode compile (its first one takes about a minute
on two cores): measured before it ends, a lone request would time the eager step."""


class ServerSystem(System):
    name = SERVER
    token_outputs = False  # a stream carries text, not token ids: `generate` returns placeholders of their count

    def __init__(self, ctx: BenchContext) -> None:
        super().__init__(ctx)
        self._last: list[StreamResult] = []
        self._wall = 0.0
        self.first_error: str | None = None

    @classmethod
    def unavailable(cls, ctx: BenchContext) -> str | None:
        return None if ctx.args.url else "needs --url (the running server to benchmark)"

    def load(self) -> None:
        args = self.ctx.args
        models = probe(args.url, args.api_key)
        self.model = args.model or (models[0] if models else None)
        self.ctx.server_model = self.model
        self.server = Server(args.url, args.api_key, read_timeout_s=args.request_timeout)
        limit = f"at most {args.concurrency} in flight" if args.concurrency else "all at once"
        self.notes.append(f"{args.url}, model {self.model or '(not named)'}, requests {limit}")

    def model_module(self) -> None:
        return None

    def start(self) -> None:
        """Once the server's decode step is compiled, one tiny untimed request: the connection path, and the
        server's first-request costs, warmed."""
        waited = wait_for_decode_compile(self.server, COMPILE_WAIT_S)
        if waited:
            self.notes.append(f"waited {waited:.0f} s for the server's background decode compile (/health)")
        first = self.requests[0]
        warm = BenchRequest(first.prompt_token_ids[:8], WARMUP_TOKENS, first.messages)
        result = self._send(warm)
        if not result.ok:
            hint = ""
            if warm.messages is None and "vocabulary" in (result.error or ""):
                hint = " (random token ids are drawn below the --shape's vocabulary: try --shape tiny)"
            raise ServerError(f"the warm-up request failed: {result.error}{hint}")

    def payload(self, request: BenchRequest) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "max_tokens": request.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.model:
            body["model"] = self.model
        if request.messages is not None:
            return "/chat/completions", {**body, "messages": request.messages}
        return "/completions", {**body, "prompt": list(request.prompt_token_ids)}

    def _send(self, request: BenchRequest) -> StreamResult:
        path, body = self.payload(request)
        return stream_request(self.server, path, body)

    def generate(self, requests: Sequence[BenchRequest]) -> Outputs:
        workers = self.ctx.args.concurrency or (1 if self.ctx.workload.one_at_a_time else len(requests))
        workers = min(workers, len(requests))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-http") as pool:
            results = list(pool.map(self._send, requests))
        self._wall = time.perf_counter() - t0
        self._last = results
        failed = [r.error for r in results if not r.ok]
        if failed and self.first_error is None:
            self.first_error = failed[0]
            self.notes.append(f"first failed request: {failed[0]}")
        if any(r.ok and r.completion_tokens is None for r in results):
            note = "the server sent no usage chunk: completion tokens counted as streamed text chunks"
            if note not in self.notes:
                self.notes.append(note)
        return [[-1] * _completion_tokens(r) if r.ok else [] for r in results]

    def run_stats(self) -> dict[str, float]:
        return latency_stats(self._last, self._wall)


def wait_for_decode_compile(server: Server, timeout_s: float, poll_s: float = 1.0) -> float:
    """Seconds spent waiting until the server's /health stops saying `decode_compiling` (nitro_torch's
    --cpu-decode-compile background); 0 at once for a server whose /health says nothing of it or answers no JSON."""
    started = time.monotonic()
    waited = 0.0
    while True:
        try:
            health = server.get_json("/health", under_v1=False)
        except ServerError:
            return 0.0
        if not (isinstance(health, dict) and health.get("decode_compiling")):
            return time.monotonic() - started if waited else 0.0
        waited = time.monotonic() - started
        if waited > timeout_s:
            raise ServerError(f"the server's decode step was still compiling after {timeout_s:.0f} s (/health)")
        time.sleep(poll_s)


def _completion_tokens(result: StreamResult) -> int:
    return result.completion_tokens if result.completion_tokens is not None else result.text_chunks


def latency_stats(results: Sequence[StreamResult], wall_s: float) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    gaps = [g for r in ok for g in r.gaps_s]
    e2e = [r.e2e_s for r in ok]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "completion_tokens": sum(_completion_tokens(r) for r in ok),
        "req_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "ttft_p50_ms": _quantile(ttft, 0.5) * 1e3,
        "ttft_p90_ms": _quantile(ttft, 0.9) * 1e3,
        "itl_p50_ms": _quantile(gaps, 0.5) * 1e3,
        "e2e_p50_s": _quantile(e2e, 0.5),
        "e2e_p90_s": _quantile(e2e, 0.9),
    }


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks; NaN when there is nothing to measure."""
    if not values:
        return math.nan
    if len(values) == 1:
        return float(values[0])
    if q == 0.5:
        return float(statistics.median(values))
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_table(stats: dict[str, dict[str, float]]) -> str:
    """Per system that measured latencies (medians over the runs)."""
    head = (f"{'system':<10} {'requests':>8} {'errors':>6} {'req/s':>8} {'TTFT p50/p90 (ms)':>19} "
            f"{'ITL p50 (ms)':>12} {'e2e p50/p90 (s)':>17}")
    rows = [head]
    for name, s in stats.items():
        rows.append(
            f"{name:<10} {s['requests']:>8.0f} {s['errors']:>6.0f} {s['req_s']:>8.2f} "
            f"{_pair(s['ttft_p50_ms'], s['ttft_p90_ms'], 0):>19} {_num(s['itl_p50_ms'], 1):>12} "
            f"{_pair(s['e2e_p50_s'], s['e2e_p90_s'], 2):>17}"
        )
    return "\n".join(rows)


def _num(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _pair(a: float, b: float, digits: int) -> str:
    return f"{_num(a, digits)} / {_num(b, digits)}"
