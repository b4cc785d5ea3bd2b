"""--max-step-time through the real server: a heavy client's n=64 job at long contexts alone on the engine, and a
light client's first chat after it has run alone for a while (real sockets from two addresses, the OpenAI client).

Without a limit each of the heavy job's steps decodes all 64 sequences, over a second on two cores at these
contexts, and a chat that arrives waits for the step in flight; with it, steps of a few sequences take turns."""

from __future__ import annotations

import statistics
import threading
import time

import httpx

from .conftest import private_server
from .helpers import wait_until, wait_until_idle
from .test_request_budget import light_client, light_latency

LIMIT_S = 0.25
HOLD_S = 0.5
HEAVY_N = 64


class StreamGaps:
    """The heavy job's stream from 127.0.0.1: when its chunks arrive."""

    def __init__(self, base_url: str, body: dict) -> None:
        self.arrivals: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(base_url, body), daemon=True)
        self.thread.start()

    def _run(self, base_url: str, body: dict) -> None:
        with httpx.Client(timeout=300) as http, http.stream("POST", base_url + "/v1/chat/completions",
                                                            json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data:"):
                    self.arrivals.append(time.perf_counter())
                if self.stop.is_set():
                    return  # leaving the stream aborts every choice

    def silences(self, since: float) -> list[float]:
        """Gaps longer than 20 ms between chunks after `since` (chunks of one step arrive together)."""
        times = [t for t in self.arrivals if t >= since]
        return [b - a for a, b in zip(times, times[1:]) if b - a > 0.02]


def test_a_heavy_job_at_long_contexts_runs_in_short_steps_and_a_first_chat_waits_little() -> None:
    with private_server(max_model_len=4096, kv_cache_memory=2.0, max_num_seqs=HEAVY_N + 4, max_step_time=LIMIT_S,
                        fair_share_hold=HOLD_S, max_request_tokens=0) as server:
        engine = server.engine
        assert engine is not None
        light = light_client(server.base_url)
        light_latency(light, tries=1)  # warm
        idle = light_latency(light, tries=3)
        prompt = " ".join(["Write a very long story."] * 360)  # about 2,200 tokens
        heavy = StreamGaps(server.base_url, {
            "model": "", "messages": [{"role": "user", "content": prompt}], "n": HEAVY_N, "max_tokens": 1500,
            "ignore_eos": True, "temperature": 0, "stream": True})
        try:
            assert wait_until(lambda: len(heavy.arrivals) >= 2 * HEAVY_N, timeout_s=120)  # every choice decodes
            decoding_since = time.perf_counter()
            first = []
            for _ in range(3):
                time.sleep(HOLD_S + 2.5)  # the light client's held share has run out: the heavy job is alone
                first.append(light_latency(light, tries=1))
            alone = heavy.silences(decoding_since)
            assert engine.stats().num_running == HEAVY_N  # the heavy job ran all along
        finally:
            heavy.stop.set()
            heavy.thread.join(timeout=60)
        longest = sorted(alone)[int(0.9 * len(alone))]
        print(f"light chat: idle {idle * 1000:.0f} ms, first chats beside the heavy job "
              f"{' '.join(f'{t * 1000:.0f}' for t in first)} ms; the heavy stream's silences: "
              f"{len(alone)}, 90th percentile {longest * 1000:.0f} ms")
        assert len(alone) >= 20
        assert longest <= 2 * LIMIT_S, f"90% of the heavy job's silences within {longest:.3f} s"
        assert statistics.median(first) <= idle + 2 * LIMIT_S, f"idle {idle:.3f} s, first chats {first}"
        assert statistics.median(first) <= 2 * idle, f"idle {idle:.3f} s, first chats {first}"  # runs alone
        stats = wait_until_idle(engine, timeout_s=60)
        assert stats.num_running == 0 and stats.kv_blocks_used == 0
