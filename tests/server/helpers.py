"""What the tests compare the HTTP answers with: the tokenizer's own template and the real engine driven
directly, plus waiting for the engine to go idle."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nitro_torch.sampling import SamplingParams

if TYPE_CHECKING:
    from nitro_torch.engine.client import EngineClient, EngineStats

HELLO = [{"role": "user", "content": "Hello"}]
ENGINE_OPTIONS = {"model": "default", "device": "cpu", "max_num_seqs": 16, "max_model_len": 2048,
                  "cpu_weights": "fp32"}  # token-identical answers (see tests/conftest.py)


def template_ids(tokenizer, messages: list[dict]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


@dataclass
class Reference:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


def engine_reference(engine: EngineClient, prompt_ids: list[int], **params) -> Reference:
    """Runs one request straight through `engine.generate` (no HTTP) and collects what it produced."""

    async def run() -> Reference:
        texts, ids, last = [], [], None
        async for output in engine.generate(f"reference-{uuid.uuid4().hex}", prompt_ids, SamplingParams(**params)):
            texts.append(output.new_text)
            ids.extend(output.new_token_ids)
            last = output
        assert last is not None and last.finished
        reason = last.finish_reason.value if last.finish_reason else None
        return Reference("".join(texts), ids, reason, last.num_prompt_tokens, last.num_output_tokens)

    return asyncio.run(run())


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def is_idle(stats: EngineStats) -> bool:
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_used == 0


def wait_until_idle(engine: EngineClient, timeout_s: float = 10.0) -> EngineStats:
    wait_until(lambda: is_idle(engine.stats()), timeout_s)
    return engine.stats()


def token_counts(usage) -> tuple[int, int, int]:
    """(prompt, completion, total) of a usage dict or client object; cached_tokens depends on earlier requests."""
    if not isinstance(usage, dict):
        usage = usage.model_dump()
    return usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]
