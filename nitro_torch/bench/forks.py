"""n > 1 choices: forks that share one prefill vs n independent requests of the same prompt, measured in one run.

    python scripts/bench_forks.py [--n 4] [--prompt-tokens 1000] [--max-tokens 16] [--repeats 5]

The prefix cache is off so the baseline really recomputes the prompt; the engine is driven directly (no HTTP).
Prints the median wall time of each, the tokens each computed, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.sampling import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    engine = LLMEngine.from_config(build_config(
        {"model": args.model, "device": args.device, "prefix_caching": False,
         "max_num_batched_tokens": max(4096, args.prompt_tokens)}, env={}))
    text = "The quick brown fox jumps over the lazy dog. " * (args.prompt_tokens // 5)
    prompt = engine.tokenizer(text)["input_ids"][: args.prompt_tokens]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    computed: list[int] = []
    execute = engine.runner.execute

    def counting_execute(plan):
        computed.append(plan.num_tokens)
        return execute(plan)

    engine.runner.execute = counting_execute

    def run(forked: bool) -> tuple[float, int]:
        computed.clear()
        ids = [uuid.uuid4().hex for _ in range(args.n)]
        start = time.perf_counter()
        for i, request_id in enumerate(ids):
            engine.add_request(request_id, prompt, params, parent_id=ids[0] if forked and i else None)
        while engine.has_unfinished_requests:
            engine.step()
        return time.perf_counter() - start, sum(computed)

    run(True)  # warm-up
    results = {mode: [run(mode == "forks") for _ in range(args.repeats)] for mode in ("independent", "forks")}
    medians = {mode: statistics.median(t for t, _ in rows) for mode, rows in results.items()}
    for mode, rows in results.items():
        print(f"{mode:12s} median {medians[mode]:6.2f} s   tokens computed {rows[0][1]}")
    print(f"n={args.n}, {len(prompt)}-token prompt: forks {medians['independent'] / medians['forks']:.2f}x faster")


if __name__ == "__main__":
    main()
