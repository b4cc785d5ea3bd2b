"""Several engine streams of one HTTP request (n choices, several prompts) merged into one, as items arrive."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import TypeVar

_T = TypeVar("_T")
_END = object()


async def interleave(streams: Sequence[AsyncIterator[_T]]) -> AsyncIterator[tuple[int, _T]]:
    """(stream index, item) from all streams in arrival order; closing this closes (aborts) every stream.

    Streams start in order, so a parent request reaches the engine before the forks that name it.
    """
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[_T]) -> None:
        try:
            async with aclosing(stream) as items:
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
