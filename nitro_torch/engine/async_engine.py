"""AsyncEngine: an EngineClient whose core runs in a thread of this process (`--engine-core thread`: debugging,
and tests that reach into the core). The served default runs the core in a process of its own (process_client.py).

The core thread only steps: each step's token ids go to the event loop as one batch (one `call_soon_threadsafe`
a step, not one a request), where the output processor detokenizes them and fills the per-request queues.
Commands (add, finish, embed) reach the thread through a queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nitro_torch.config import Config
from nitro_torch.engine.client import (
    EngineClient,
    EngineDeadError,
    EngineError,
    RequestStreams,
    is_fatal_device_error,
    settle_soon,
)
from nitro_torch.engine.core import EngineCore
from nitro_torch.engine.messages import CoreOutput, EngineCoreRequest, EngineInfo, EngineStats
from nitro_torch.engine.outputs import FinishReason, RequestOutput
from nitro_torch.models.loader import LoadedModel
from nitro_torch.sampling import SamplingParams

logger = logging.getLogger("nitro_torch.engine")


class StagedThreadCore:
    """Weights loaded in this process (StagedEngine for `--engine-core thread`)."""

    def __init__(self, config: Config, cpu_threads: int | None = None) -> None:
        from nitro_torch.engine.loading import stage_weights

        self.config = config
        self.cpu_threads = cpu_threads
        self.loaded: LoadedModel | None = stage_weights(config)

    def start(self) -> AsyncEngine:
        from nitro_torch.engine.loading import place_on_device

        loaded, self.loaded = self.loaded, None
        assert loaded is not None, "started twice"
        return AsyncEngine(EngineCore(place_on_device(loaded, self.config, self.cpu_threads), self.config))

    def discard(self) -> None:
        self.loaded = None


@dataclass
class _Add:
    request: EngineCoreRequest


@dataclass
class _Finish:
    request_id: str
    reason: FinishReason


@dataclass
class _Embed:
    """One packed embedding forward, run on the core thread between steps."""

    token_id_lists: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[list[float]]]

    def resolve(self, result: list[list[float]] | BaseException) -> None:
        settle_soon(self.loop, self.future, result)


class AsyncEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.info: EngineInfo = core.info
        self.config = core.config
        self.tokenizer = core.tokenizer
        self.model_name = core.model_name
        self.max_model_len = core.max_model_len
        self.streams = RequestStreams(core.tokenizer)
        self.request_metrics = self.streams.processor.request_metrics
        self._commands: queue.SimpleQueue[_Add | _Finish | _Embed | None] = queue.SimpleQueue()
        self._num_received = 0
        """Requests the core thread has taken in (written by it only)."""
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nitro-engine-core", daemon=True)
        self._thread.start()

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, parent_id: str | None = None,
        client: str = "",
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's deltas; leaving the iteration early aborts the request.

        `parent_id` names a request with the same prompt whose computed prompt this one shares (n > 1).
        """
        if self._dead is not None:
            raise EngineDeadError("the engine has stopped") from self._dead
        request = EngineCoreRequest(request_id, list(prompt_token_ids), params, parent_id, client)
        stream = self.streams.open(request)
        self._commands.put(_Add(request))
        async for output in self.streams.follow(stream, self.abort):
            yield output

    async def prepare(self, params: SamplingParams) -> None:
        """Compile the request's grammar in a worker thread, so a slow schema never stalls the core's steps
        (add then finds it cached); SamplingParamsError if it is invalid."""
        if params.guided is not None:
            await asyncio.to_thread(self.core.guided.compile, params.guided)

    def abort(self, request_id: str) -> None:
        self.streams.close(request_id)
        self._commands.put(_Finish(request_id, FinishReason.ABORT))

    async def embed(self, token_id_lists: list[list[int]]) -> list[list[float]]:
        """Unit-length embeddings, one per input. Each packed forward is its own core command, so generation
        steps run between the forwards of a large request."""
        from nitro_torch.runner.embedder import pack_batches

        loop = asyncio.get_running_loop()
        vectors: list[list[float]] = []
        for batch in pack_batches([len(ids) for ids in token_id_lists], self.info.max_num_batched_tokens):
            if self._dead is not None:
                raise EngineDeadError("the engine has stopped") from self._dead
            command = _Embed([list(token_id_lists[i]) for i in batch], loop, loop.create_future())
            self._commands.put(command)
            vectors.extend(await command.future)
        return vectors

    def stats(self) -> EngineStats:
        """The core's counters; requests on their way to the core count as waiting."""
        stats = self.core.stats()
        stats.num_waiting += self.streams.num_on_the_way(self._num_received)
        return stats

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    @property
    def num_live_requests(self) -> int:
        return self.streams.num_live

    def shutdown(self) -> None:
        """Stop the loop; requests still in flight end with an error instead of hanging."""
        error = EngineDeadError("the server is shutting down")
        self._dead = self._dead or error
        self._commands.put(None)
        self._thread.join(timeout=30)
        while not self._commands.empty():
            command = self._commands.get_nowait()
            if isinstance(command, _Embed):
                command.resolve(error)
        self.streams.fail_all(error)

    # core thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                block = not self.core.has_unfinished_requests
                if not self._apply_commands(block):
                    return
                if self.core.has_unfinished_requests:
                    self._step()
        except BaseException as exc:  # the loop itself broke: fail everyone rather than hang them
            logger.exception("engine loop died")
            self._dead = exc
            self.streams.fail_all(EngineDeadError("the engine stopped unexpectedly"))

    def _apply_commands(self, block: bool) -> bool:
        """Drain pending commands (waiting for one when idle); False on shutdown."""
        outputs: list[CoreOutput] = []
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                break
            block = False
            if command is None:
                return False
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _Embed):
                self._embed(command)
            else:
                output = self.core.finish(command.request_id, command.reason)
                if output is not None:
                    outputs.append(output)
        self._deliver(outputs)
        return True

    def _add(self, command: _Add) -> None:
        request_id = command.request.request_id
        self._num_received += 1
        try:
            self.core.add_request(command.request)
        except Exception as exc:
            self.streams.fail(request_id, exc)

    def _embed(self, command: _Embed) -> None:
        try:
            command.resolve(self.core.embed(command.token_id_lists))
        except Exception as exc:
            logger.exception("embedding forward failed")
            command.resolve(EngineError(f"embedding failed: {type(exc).__name__}"))

    def _step(self) -> None:
        expired = self.core.expire_requests()
        try:
            outputs = self.core.step()
        except Exception as exc:
            if is_fatal_device_error(exc):
                raise  # the device is unusable: the loop ends, /health turns 503 and every request gets an error
            logger.exception("engine step failed; failing its requests")
            self._deliver(expired + self.core.fail_running(exc))
            return
        self._deliver(expired + outputs if expired else outputs)

    def _deliver(self, outputs: list[CoreOutput]) -> None:
        if outputs:
            self.streams.dispatch(outputs, self._finish_stopped)

    def _finish_stopped(self, request_ids: list[str]) -> None:
        """On the event loop: requests that hit a stop string end in the core too."""
        for request_id in request_ids:
            self._commands.put(_Finish(request_id, FinishReason.STOP))


def _conforms(client: AsyncEngine) -> EngineClient:
    return client  # mypy checks that the class is an EngineClient
