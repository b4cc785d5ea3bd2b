"""A light client's chat latency, idle and beside a heavy client's n=64 job, against a running server.

    nitro-torch serve --max-request-tokens 0 &          # (or --no-fair-share to see the first-come order)
    python scripts/fair_share.py --url http://127.0.0.1:3928

The light client connects from 127.0.0.2 and the heavy one from 127.0.0.1 (both reach loopback), so the server
sees two clients. Prints medians of `--tries` short greedy chats (back to back, as a chat or an agent loop sends
them) and their ratio, and the first chat after `--pause` s of the heavy job alone on its own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import httpx

HELLO = [{"role": "user", "content": "Hello"}]


def chat_seconds(http: httpx.Client, url: str, max_tokens: int) -> float:
    start = time.perf_counter()
    response = http.post(url + "/v1/chat/completions", json={"model": "", "messages": HELLO, "temperature": 0,
                                                             "max_tokens": max_tokens, "ignore_eos": True})
    response.raise_for_status()
    return time.perf_counter() - start


def latencies(http: httpx.Client, url: str, tries: int, max_tokens: int) -> list[float]:
    return [chat_seconds(http, url, max_tokens) for _ in range(tries)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:3928")
    parser.add_argument("--tries", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=4, help="of each light chat")
    parser.add_argument("--heavy-n", type=int, default=64)
    parser.add_argument("--heavy-prompt-words", type=int, default=5, help="words in the heavy client's prompt")
    parser.add_argument("--heavy-max-tokens", type=int, default=1500)
    parser.add_argument("--pause", type=float, default=5.0, help="seconds the heavy job runs alone first")
    args = parser.parse_args()
    light = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=600)
    chat_seconds(light, args.url, args.max_tokens)  # warm
    idle = statistics.median(latencies(light, args.url, args.tries, args.max_tokens))
    started, stop = threading.Event(), threading.Event()
    prompt = " ".join(["Write", "a", "very", "long", "story"] * (args.heavy_prompt_words // 5 + 1))
    body = {"model": "", "messages": [{"role": "user", "content": prompt}], "n": args.heavy_n,
            "max_tokens": args.heavy_max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}

    def heavy() -> None:
        with httpx.Client(timeout=600) as http, http.stream("POST", args.url + "/v1/chat/completions",
                                                            json=body) as response:
            response.raise_for_status()
            for count, _ in enumerate(response.iter_lines()):
                if count == 2 * args.heavy_n:  # every choice has started
                    started.set()
                if stop.is_set():
                    return

    thread = threading.Thread(target=heavy, daemon=True)
    thread.start()
    started.wait(timeout=600)
    time.sleep(args.pause)  # the heavy job alone for a while: the first light chat meets its full steps
    loaded_each = latencies(light, args.url, args.tries, args.max_tokens)
    loaded = statistics.median(loaded_each)
    stop.set()
    thread.join(timeout=60)
    print(f"load average {os.getloadavg()[0]:.2f}; light chat ({args.max_tokens} tokens, median of {args.tries}): "
          f"idle {idle * 1000:.0f} ms, beside n={args.heavy_n} ({args.heavy_prompt_words}-word prompt) "
          f"{loaded * 1000:.0f} ms = {loaded / idle:.2f}x; the first chat after {args.pause:g} s of the heavy job "
          f"alone {loaded_each[0] * 1000:.0f} ms = {loaded_each[0] / idle:.2f}x")


if __name__ == "__main__":
    main()
