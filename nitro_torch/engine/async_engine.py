"""AsyncEngine: the LLMEngine loop in a background thread, bridged to asyncio with one queue per request.

The HTTP event loop never waits on the model: it only posts commands (add, abort) to the engine thread and
reads deltas from per-request asyncio queues, filled through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from nitro_torch.config import Config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.engine.outputs import RequestOutput
from nitro_torch.sampling import SamplingParams

logger = logging.getLogger("nitro_torch.engine")


class EngineError(RuntimeError):
    """The engine failed while serving a request."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sink: "_Sink"
    parent_id: str | None = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Embed:
    """One packed embedding forward, run on the engine thread between steps."""

    token_id_lists: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[list[float]]]

    def resolve(self, result: list[list[float]] | BaseException) -> None:
        def settle() -> None:
            if self.future.done():  # the caller went away
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self._commands: queue.SimpleQueue[_Add | _Abort | _Embed | None] = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nitro-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: Config) -> "AsyncEngine":
        return cls(LLMEngine.from_config(config))

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, parent_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's deltas; leaving the iteration early aborts the request.

        `parent_id` names a request with the same prompt whose computed prompt this one shares (n > 1).
        """
        if self._dead is not None:
            raise EngineError("the engine has stopped") from self._dead
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(_Add(request_id, list(prompt_token_ids), params, sink, parent_id))
        finished = False
        try:
            while not finished:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    async def prepare(self, params: SamplingParams) -> None:
        """Compile the request's grammar in a worker thread, so a slow schema never stalls the engine's steps
        (add_request then finds it cached); SamplingParamsError if it is invalid."""
        if params.guided is not None:
            await asyncio.to_thread(self.engine.guided.compile, params.guided)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    @property
    def embedding_size(self) -> int:
        return self.engine.embedding_size

    async def embed(self, token_id_lists: list[list[int]]) -> list[list[float]]:
        """Unit-length embeddings, one per input. Each packed forward is its own engine-thread command, so
        generation steps run between the forwards of a large request."""
        from nitro_torch.runner.embedder import pack_batches

        loop = asyncio.get_running_loop()
        vectors: list[list[float]] = []
        budget = self.engine.config.scheduler.max_num_batched_tokens
        for batch in pack_batches([len(ids) for ids in token_id_lists], budget):
            if self._dead is not None:
                raise EngineError("the engine has stopped") from self._dead
            command = _Embed([list(token_id_lists[i]) for i in batch], loop, loop.create_future())
            self._commands.put(command)
            vectors.extend(await command.future)
        return vectors

    def stats(self) -> dict[str, int | float]:
        return self.engine.stats()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    @property
    def num_live_requests(self) -> int:
        """Requests the engine thread still streams to (a read of a dict's size: safe from any thread)."""
        return len(self._sinks)

    def shutdown(self) -> None:
        """Stop the loop; requests still in flight end with an error instead of hanging."""
        error = EngineError("the server is shutting down")
        self._dead = self._dead or error
        self._commands.put(None)
        self._thread.join(timeout=30)
        while not self._commands.empty():
            command = self._commands.get_nowait()
            if isinstance(command, _Add):
                command.sink.put(error)
            elif isinstance(command, _Embed):
                command.resolve(error)
        self._fail_all(error)

    # engine thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                block = not self.engine.has_unfinished_requests
                if not self._apply_commands(block):
                    return
                if self.engine.has_unfinished_requests:
                    self._step()
        except BaseException as exc:  # the loop itself broke: fail everyone rather than hang them
            logger.exception("engine loop died")
            self._dead = exc
            self._fail_all(EngineError("the engine stopped unexpectedly"))

    def _fail_all(self, error: EngineError) -> None:
        for sink in list(self._sinks.values()):
            sink.put(error)
        self._sinks.clear()

    def _apply_commands(self, block: bool) -> bool:
        """Drain pending commands (waiting for one when idle); False on shutdown."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if command is None:
                return False
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _Embed):
                self._embed(command)
            else:
                self._abort(command.request_id)

    def _add(self, command: _Add) -> None:
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.params,
                                    parent_id=command.parent_id)
        except Exception as exc:
            command.sink.put(exc)
            return
        self._sinks[command.request_id] = command.sink

    def _embed(self, command: _Embed) -> None:
        try:
            command.resolve(self.engine.embed(command.token_id_lists))
        except Exception as exc:
            logger.exception("embedding forward failed")
            command.resolve(EngineError(f"embedding failed: {type(exc).__name__}"))

    def _abort(self, request_id: str) -> None:
        output = self.engine.abort(request_id)
        sink = self._sinks.pop(request_id, None)
        if sink is not None and output is not None:
            sink.put(output)

    def _step(self) -> None:
        self._deliver(self.engine.expire_requests())
        try:
            outputs = self.engine.step()
        except Exception as exc:
            if is_fatal_device_error(exc):
                raise  # the device is unusable: the loop ends, /health turns 503 and every request gets an error
            logger.exception("engine step failed; failing its requests")
            self._fail_running(exc)
            return
        self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            sink = self._sinks.get(output.request_id)
            if sink is None:
                continue
            sink.put(EngineError(f"inference failed: {output.error}") if output.error else output)
            if output.finished:
                del self._sinks[output.request_id]

    def _fail_running(self, exc: Exception) -> None:
        for request in list(self.engine.scheduler.running):
            self.engine.abort(request.request_id)
            sink = self._sinks.pop(request.request_id, None)
            if sink is not None:
                sink.put(EngineError(f"inference failed: {type(exc).__name__}"))


def is_fatal_device_error(exc: BaseException) -> bool:
    """A CUDA error (illegal address, device-side assert, ECC...) poisons the context: no later step can work."""
    return isinstance(exc, torch.AcceleratorError) or "CUDA error" in str(exc)
