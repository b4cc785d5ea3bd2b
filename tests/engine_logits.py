"""The logits an engine chose its tokens from, for tests that compare them with HF's forward."""

from __future__ import annotations

import torch

from nitro_torch.engine.engine import LLMEngine
from nitro_torch.sampling import SamplingParams


def greedy_with_logits(engine: LLMEngine, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of one request (EOS ignored) and the float32 CPU logits [n, V] that chose them."""
    produced: list[torch.Tensor] = []
    execute = engine.runner.execute

    def keep_logits(plan, previous=None):  # noqa: ANN001, ANN202
        logits, requests = execute(plan, previous)
        if logits is not None:
            produced.append(logits.float().cpu())
        return logits, requests

    engine.runner.execute = keep_logits  # type: ignore[method-assign]
    try:
        [tokens] = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    finally:
        engine.runner.execute = execute  # type: ignore[method-assign]
    return tokens, torch.cat(produced)
