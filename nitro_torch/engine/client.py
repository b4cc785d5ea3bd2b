"""The engine boundary as the server sees it: the `EngineClient` protocol, the one factory that starts one, and
the per-request streams both kinds of client share.

The server imports this module and nothing else of the engine. Behind it the core runs in a process of its own
(process_client.py, the served default) or in a thread of this process (async_engine.py); either way the core
hands back token ids, and the text is made here, on the event loop, by the output processor.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from nitro_torch.config import Config
from nitro_torch.engine.context_length import ContextLengthExceeded, check_context_length
from nitro_torch.engine.messages import CoreOutput, EngineCoreRequest, EngineInfo, EngineStats
from nitro_torch.engine.metrics_hooks import RequestMetrics
from nitro_torch.engine.output_processor import OutputProcessor
from nitro_torch.engine.outputs import RequestOutput
from nitro_torch.engine.parallel_sampling import generate_choices
from nitro_torch.sampling import SamplingParams

__all__ = ["ContextLengthExceeded", "EngineClient", "EngineDeadError", "EngineError", "EngineInfo", "EngineStats",
           "check_context_length", "generate_choices", "stage_engine",
           "start_engine_client"]

CoreMode = Literal["process", "thread"]


class EngineError(RuntimeError):
    """The engine failed while serving a request."""


class EngineDeadError(EngineError):
    """The engine has stopped (shut down, or its core died): nothing more will be served by it."""


class EngineClient(Protocol):
    """What the server may ask of a serving engine."""

    info: EngineInfo
    config: Config
    """What the engine was started with."""
    tokenizer: Any
    model_name: str
    max_model_len: int
    request_metrics: RequestMetrics

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 parent_id: str | None = None, client: str = "") -> AsyncIterator[RequestOutput]:
        """The request's deltas; leaving the iteration early aborts it. `parent_id`: a live request with the same
        prompt whose prefill this one shares (choices 2..n). `client`: who sent it, for fair shares."""
        ...

    async def prepare(self, params: SamplingParams) -> None:
        """Check and compile what the request needs before it is queued (its grammar), off the event loop."""
        ...

    def abort(self, request_id: str) -> None: ...

    async def embed(self, token_id_lists: list[list[int]]) -> list[list[float]]: ...

    def stats(self) -> EngineStats: ...

    @property
    def is_alive(self) -> bool: ...

    @property
    def num_live_requests(self) -> int:
        """Requests the client still streams to."""
        ...

    def shutdown(self) -> None:
        """Stop the core; requests still in flight end with an error instead of hanging."""
        ...


class StagedEngine(Protocol):
    """An engine whose weights are loaded (on the CPU when the target is a GPU) but not yet serving."""

    def start(self) -> EngineClient:
        """Move to the device, build the KV cache, serve."""
        ...

    def discard(self) -> None: ...


def stage_engine(config: Config, *, cpu_threads: int | None = None, mode: CoreMode | None = None) -> StagedEngine:
    """Phase one of starting an engine: load the weights. A model switch stages the new model while the old one
    still serves. `mode` (default `config.runner.engine_core`): "process" runs the core in a process of its own,
    "thread" in a thread of this one (for debugging, and tests that reach into the core)."""
    if (mode or config.runner.engine_core) == "process":
        from nitro_torch.engine.process_client import StagedCore

        return StagedCore(config, cpu_threads)
    from nitro_torch.engine.async_engine import StagedThreadCore

    return StagedThreadCore(config, cpu_threads)


def start_engine_client(config: Config, *, cpu_threads: int | None = None,
                        mode: CoreMode | None = None) -> EngineClient:
    """The one way an engine is started (serve, the app's lifespan, a model switch, bench, tests)."""
    return stage_engine(config, cpu_threads=cpu_threads, mode=mode).start()


def is_fatal_device_error(exc: BaseException) -> bool:
    """A CUDA error (illegal address, device-side assert, ECC...) poisons the context: no later step can work."""
    import torch

    return isinstance(exc, torch.AcceleratorError) or "CUDA error" in str(exc)


@dataclass(eq=False)
class RequestStream:
    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)


class RequestStreams:
    """The live requests of one client, on the API side: their queues and the output processor.

    `open`, `close` and `deliver` run on the event loop; `fail` and `fail_all` may run on any thread."""

    def __init__(self, tokenizer: Any) -> None:
        self.processor = OutputProcessor(tokenizer)
        self._streams: dict[str, RequestStream] = {}
        self._num_opened = 0
        """Requests ever opened (written on the event loop only)."""

    @property
    def num_live(self) -> int:
        return len(self._streams)

    def open(self, request: EngineCoreRequest) -> RequestStream:
        if request.request_id in self._streams:
            raise ValueError(f"duplicate request id {request.request_id}")
        stream = RequestStream(request.request_id, asyncio.get_running_loop())
        self._streams[request.request_id] = stream
        self.processor.add(request)
        self._num_opened += 1
        return stream

    def num_on_the_way(self, num_received_by_core: int) -> int:
        """Requests opened here that the core has not taken in yet: they count as waiting."""
        return max(0, self._num_opened - num_received_by_core)

    async def follow(self, stream: RequestStream, abort: Callable[[str], None]) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                abort(stream.request_id)
            elif self._streams.get(stream.request_id) is stream:
                del self._streams[stream.request_id]

    def close(self, request_id: str) -> None:
        """The caller went away: no more deliveries; the request counts as aborted."""
        self._streams.pop(request_id, None)
        self.processor.abort(request_id)

    def deliver(self, outputs: list[CoreOutput]) -> list[str]:
        """Detokenize one step's outputs into the queues; the ids that ended on a stop string here."""
        processed = self.processor.process(outputs)
        for output in processed.outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            stream.queue.put_nowait(EngineError(f"inference failed: {output.error}") if output.error else output)
        return processed.to_finish

    def dispatch(self, outputs: list[CoreOutput], finish: Callable[[list[str]], None]) -> None:
        """From any thread: hand a step's outputs to their requests' event loops (one callback per loop, normally
        one); `finish` then gets, on the loop, the requests that ended on a stop string, to end them in the core."""
        by_loop: dict[asyncio.AbstractEventLoop, list[CoreOutput]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append(output)
        for loop, batch in by_loop.items():
            _call_soon(loop, self._deliver_then_finish, batch, finish)

    def _deliver_then_finish(self, outputs: list[CoreOutput], finish: Callable[[list[str]], None]) -> None:
        stopped = self.deliver(outputs)
        if stopped:
            finish(stopped)

    def fail(self, request_id: str, error: BaseException) -> None:
        """End one request with `error` (from any thread)."""
        stream = self._streams.get(request_id)
        if stream is not None:
            _call_soon(stream.loop, self._fail_now, request_id, error)

    def _fail_now(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        self.processor.forget(request_id)
        if stream is not None:
            stream.queue.put_nowait(error)

    def fail_all(self, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            _call_soon(stream.loop, self._fail_now, request_id, error)


def settle_soon(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], value: Any) -> None:
    """From any thread: resolve `future` on its loop with `value` (an exception is raised in the caller)."""
    def settle() -> None:
        if future.done():  # the caller went away
            return
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)

    _call_soon(loop, settle)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass  # the event loop is closed: nobody is listening any more
