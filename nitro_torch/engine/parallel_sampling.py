"""n > 1: several choices of one request (and of several prompts) as one stream, the prefill computed once.

The first choice of each prompt computes its prefill; the others fork it in the core (they share its KV blocks and
compute only the last prompt token themselves). Chat and text completions both fan out here.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, TypeVar, cast

from nitro_torch.engine.outputs import RequestOutput
from nitro_torch.sampling import SamplingParams

if TYPE_CHECKING:
    from nitro_torch.engine.client import EngineClient

SEED_MAX = 2**64 - 1
"""The largest seed a request may carry (OpenAI's seeds are 64-bit, signed or not)."""

_T = TypeVar("_T")
_END = object()


async def interleave(streams: Sequence[AsyncIterator[_T]]) -> AsyncGenerator[tuple[int, _T], None]:
    """(stream index, item) from all streams in arrival order; closing this closes (aborts) every stream.

    Streams start in order, so a parent request reaches the engine before the forks that name it. Each stream
    must be closable (an async generator, as the engine's `generate` is).
    """
    if len(streams) == 1:
        async with aclosing(cast(AsyncGenerator[_T, None], streams[0])) as only:
            async for first in only:
                yield 0, first
        return
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[_T]) -> None:
        try:
            async with aclosing(cast(AsyncGenerator[_T, None], stream)) as items:
                async for item in items:
                    queue.put_nowait((index, item))
        except Exception as exc:  # handed to the consumer, which raises it in the request's task
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, _END))

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(pumps)
        while running:
            index, item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item  # type: ignore[misc]
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


def choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice i of a seeded n > 1 request samples with seed + i: reproducible, yet the choices differ."""
    if seed is None or choice == 0:
        return seed
    shifted = seed + choice
    return shifted if shifted <= SEED_MAX else shifted - 2**64


def choice_params(params: SamplingParams, choice: int) -> SamplingParams:
    seed = choice_seed(params.seed, choice)
    return params if seed == params.seed else dataclasses.replace(params, seed=seed)


async def generate_choices(engine: EngineClient, prompts: Sequence[list[int]], params: SamplingParams, n: int,
                           request_id: Callable[[int], str],
                           client: str = "") -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """(choice, delta) of every choice as it arrives. Choice i is choice i % n of prompt i // n, with engine request
    id `request_id(i)`; `client` sent them all. Closing this aborts every unfinished choice."""
    streams = []
    for i in range(len(prompts) * n):
        first = i - i % n
        parent = None if i == first else request_id(first)
        streams.append(engine.generate(request_id(i), prompts[i // n], choice_params(params, i % n), parent_id=parent,
                                       client=client))
    async with aclosing(interleave(streams)) as merged:
        async for item in merged:
            yield item
