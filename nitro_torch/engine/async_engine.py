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


@dataclass
class _Abort:
    request_id: str


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
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nitro-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: Config) -> "AsyncEngine":
        return cls(LLMEngine.from_config(config))

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's deltas; leaving the iteration early aborts the request."""
        if self._dead is not None:
            raise EngineError("the engine has stopped") from self._dead
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(_Add(request_id, list(prompt_token_ids), params, sink))
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

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stats(self) -> dict[str, int | float]:
        return self.engine.stats()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None

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
            else:
                self._abort(command.request_id)

    def _add(self, command: _Add) -> None:
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.params)
        except Exception as exc:
            command.sink.put(exc)
            return
        self._sinks[command.request_id] = command.sink

    def _abort(self, request_id: str) -> None:
        output = self.engine.abort(request_id)
        sink = self._sinks.pop(request_id, None)
        if sink is not None and output is not None:
            sink.put(output)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            logger.exception("engine step failed; failing its requests")
            self._fail_running(exc)
            return
        for output in outputs:
            sink = self._sinks.get(output.request_id)
            if sink is None:
                continue
            sink.put(output)
            if output.finished:
                del self._sinks[output.request_id]

    def _fail_running(self, exc: Exception) -> None:
        for request in list(self.engine.scheduler.running):
            self.engine.abort(request.request_id)
            sink = self._sinks.pop(request.request_id, None)
            if sink is not None:
                sink.put(EngineError(f"inference failed: {type(exc).__name__}"))
