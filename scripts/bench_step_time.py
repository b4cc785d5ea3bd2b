"""What --max-step-time costs and bounds, in one engine (no HTTP), each case against no limit in the same run.

    python scripts/bench_step_time.py                 # default model, 0.25 s against 0 (no limit)
    python scripts/bench_step_time.py --limit 0.1 --windows 3

- n=64 decoding at long contexts (one ~2,400-token prompt, shared) and at short ones (a 5-word prompt): the job
  runs once, and windows of `--window` s alternate between the two settings; tokens/s and the longest step.
- A lone long prompt's time to first token (`--prompt-words`), alternating.
Medians over the windows and tries; the ratio is limited / unlimited.
"""

from __future__ import annotations

import argparse
import statistics
import time

from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.sampling import SamplingParams


def prompt_ids(engine: LLMEngine, words: int) -> list[int]:
    return engine.tokenizer(" ".join(["Write a very long story"] * max(1, words // 5)))["input_ids"]


def decode_windows(engine: LLMEngine, words: int, limits: list[float], windows: int,
                   window_s: float) -> dict[float, list[tuple[float, float]]]:
    """(tokens/s, longest step) per window, for each limit in turn, while one n=64 job decodes."""
    prompt = prompt_ids(engine, words)
    params = SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)
    engine.add_request("heavy", prompt, params)
    for i in range(63):
        engine.add_request(f"heavy-{i}", prompt, params, parent_id="heavy")
    while len(engine.scheduler.running) < 64 or engine.scheduler.forks_waiting:
        engine.step()
    results: dict[float, list[tuple[float, float]]] = {limit: [] for limit in limits}
    for _ in range(windows):
        for limit in limits:
            engine.scheduler.max_step_time_s = limit
            engine.step()  # the first step under the new setting is not counted
            tokens, longest, start = 0, 0.0, time.perf_counter()
            while time.perf_counter() - start < window_s:
                step_start = time.perf_counter()
                tokens += len(engine.step())
                longest = max(longest, time.perf_counter() - step_start)
            results[limit].append((tokens / (time.perf_counter() - start), longest))
    for request_id in ["heavy", *(f"heavy-{i}" for i in range(63))]:
        engine.abort(request_id)
    return results


def first_token_seconds(engine: LLMEngine, words: int, limits: list[float], tries: int) -> dict[float, list[float]]:
    prompt = prompt_ids(engine, words)
    results: dict[float, list[float]] = {limit: [] for limit in limits}
    for _ in range(tries):
        for limit in limits:
            engine.scheduler.max_step_time_s = limit
            start = time.perf_counter()
            engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
            results[limit].append(time.perf_counter() - start)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--limit", type=float, default=0.25, help="--max-step-time to measure against none")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--window", type=float, default=10.0, help="seconds per decode window")
    parser.add_argument("--prompt-words", type=int, default=2400)
    parser.add_argument("--tries", type=int, default=3, help="first-token runs per setting")
    args = parser.parse_args()
    engine = LLMEngine.from_config(build_config({"model": args.model, "max_model_len": 8192,
                                                 "prefix_caching": False}))
    limits = [0.0, args.limit]
    rows = []
    for label, words in (("n=64 decode, ~2,400-token contexts", args.prompt_words), ("n=64 decode, short contexts", 5)):
        windows = decode_windows(engine, words, limits, args.windows, args.window)
        rate = {limit: statistics.median(r for r, _ in windows[limit]) for limit in limits}
        longest = {limit: max(s for _, s in windows[limit]) for limit in limits}
        rows.append((f"{label}: tokens/s (longest step)", f"{rate[0.0]:.1f} ({longest[0.0] * 1000:.0f} ms)",
                     f"{rate[args.limit]:.1f} ({longest[args.limit] * 1000:.0f} ms)", rate[args.limit] / rate[0.0]))
    ttft = {limit: statistics.median(t) for limit, t in first_token_seconds(engine, args.prompt_words, limits,
                                                                            args.tries).items()}
    rows.append((f"lone {args.prompt_words}-word prompt: first token, s", f"{ttft[0.0]:.2f}",
                 f"{ttft[args.limit]:.2f}", ttft[args.limit] / ttft[0.0]))
    print(f"\n{'case':<58} {'no limit':>18} {f'--max-step-time {args.limit:g}':>22} {'ratio':>7}")
    for label, base, limited, ratio in rows:
        print(f"{label:<58} {base:>18} {limited:>22} {ratio:>6.2f}x")


if __name__ == "__main__":
    main()
