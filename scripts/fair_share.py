"""A light client's chat latency, idle and beside a heavy client's n=64 job, against a running server.

    nitro-torch serve --max-request-tokens 0 &          # (or --no-fair-share, --max-step-time 0 to compare)
    python scripts/fair_share.py --url http://127.0.0.1:3928

The light client connects from 127.0.0.2 and the heavy one from 127.0.0.1 (both reach loopback), so the server
sees two clients. Prints medians of short greedy chats: idle; "first" chats, each after the heavy job has run alone
for `--pause` s (longer than --fair-share-hold, so the chat meets the heavy client's full steps); then `--tries`
chats back to back (as a chat or an agent loop sends them), and the heavy job's token rate alone and during them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import httpx

from nitro_torch.bench.http_system import COMPILE_WAIT_S, wait_for_decode_compile
from nitro_torch.sse_client import Server

HELLO = [{"role": "user", "content": "Hello"}]


def chat_seconds(http: httpx.Client, url: str, max_tokens: int) -> float:
    start = time.perf_counter()
    response = http.post(url + "/v1/chat/completions", json={"model": "", "messages": HELLO, "temperature": 0,
                                                             "max_tokens": max_tokens, "ignore_eos": True})
    response.raise_for_status()
    return time.perf_counter() - start


def latencies(http: httpx.Client, url: str, tries: int, max_tokens: int) -> list[float]:
    return [chat_seconds(http, url, max_tokens) for _ in range(tries)]


class HeavyJob:
    """One streamed request with n choices from 127.0.0.1."""

    def __init__(self, url: str, body: dict) -> None:
        self.url, self.body = url, body
        self.started, self.stop = threading.Event(), threading.Event()
        self.chunks = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=600) as http, http.stream("POST", self.url + "/v1/chat/completions",
                                                            json=self.body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data:"):
                    self.chunks += 1
                if self.chunks == 2 * self.body["n"]:  # every choice has started
                    self.started.set()
                if self.stop.is_set():
                    return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:3928")
    parser.add_argument("--tries", type=int, default=5, help="idle chats and back-to-back chats")
    parser.add_argument("--first-chats", type=int, default=3, help="chats each after --pause s of the heavy job alone")
    parser.add_argument("--max-tokens", type=int, default=4, help="of each light chat")
    parser.add_argument("--heavy-n", type=int, default=64)
    parser.add_argument("--heavy-prompt-words", type=int, default=5, help="words in the heavy client's prompt")
    parser.add_argument("--heavy-max-tokens", type=int, default=1500)
    parser.add_argument("--pause", type=float, default=5.0,
                        help="seconds the heavy job runs alone before each first chat (more than --fair-share-hold)")
    args = parser.parse_args()
    waited = wait_for_decode_compile(Server(args.url), COMPILE_WAIT_S)  # the idle chats time the compiled step
    if waited:
        print(f"waited {waited:.0f} s for the server's background decode compile")
    light = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=600)
    chat_seconds(light, args.url, args.max_tokens)  # warm
    idle = statistics.median(latencies(light, args.url, args.tries, args.max_tokens))
    prompt = " ".join(["Write", "a", "very", "long", "story"] * (args.heavy_prompt_words // 5 + 1))
    heavy = HeavyJob(args.url, {"model": "", "messages": [{"role": "user", "content": prompt}], "n": args.heavy_n,
                                "max_tokens": args.heavy_max_tokens, "ignore_eos": True, "temperature": 0,
                                "stream": True})
    heavy.thread.start()
    heavy.started.wait(timeout=600)
    first, alone_rates = [], []
    for _ in range(args.first_chats):
        chunks, start = heavy.chunks, time.perf_counter()
        time.sleep(args.pause)  # longer than the light client's held share: the heavy job runs alone
        alone_rates.append((heavy.chunks - chunks) / (time.perf_counter() - start))
        first.append(chat_seconds(light, args.url, args.max_tokens))
    chunks, start = heavy.chunks, time.perf_counter()
    loaded = statistics.median(latencies(light, args.url, args.tries, args.max_tokens))
    beside_rate = (heavy.chunks - chunks) / (time.perf_counter() - start)
    heavy.stop.set()
    heavy.thread.join(timeout=60)
    first_median = statistics.median(first)
    print(f"load average {os.getloadavg()[0]:.2f}; light chat ({args.max_tokens} tokens): idle {idle * 1000:.0f} ms; "
          f"beside n={args.heavy_n} ({args.heavy_prompt_words}-word prompt): first chats "
          f"{' '.join(f'{t * 1000:.0f}' for t in first)} ms, median {first_median / idle:.2f}x, "
          f"worst {max(first) / idle:.2f}x; back to back {loaded * 1000:.0f} ms = {loaded / idle:.2f}x; the heavy "
          f"job's tokens/s: alone {statistics.median(alone_rates):.1f} (the pauses), during the back-to-back chats "
          f"{beside_rate:.1f}")


if __name__ == "__main__":
    main()
