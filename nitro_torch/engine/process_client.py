"""ProcessEngineClient: the served default. The core runs in a process of its own (core_process.py); this side
sends requests and aborts as messages and a reader thread turns each step's message into text deltas on the event
loop. Python work on either side no longer waits for the other, and neither shares an interpreter lock.

If the core process dies, the reader sees the pipe close at once: every in-flight request and call ends with an
EngineError, and `is_alive` turns False (/health answers 503).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import threading
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import msgspec

from nitro_torch.config import Config, ConfigError
from nitro_torch.engine.client import EngineClient, EngineDeadError, EngineError, RequestStreams, settle_soon
from nitro_torch.engine.messages import (
    CallResult,
    CompileGrammar,
    CoreFailed,
    CoreInput,
    CoreOutputs,
    CoreReady,
    CoreStaged,
    EmbedCall,
    EngineCoreRequest,
    EngineInfo,
    EngineStats,
    FinishRequests,
    Shutdown,
    StartCore,
    decode_message,
    encode,
)
from nitro_torch.engine.outputs import FinishReason, RequestOutput
from nitro_torch.sampling import SamplingParams, SamplingParamsError

logger = logging.getLogger("nitro_torch.engine")

START_TIMEOUT_S = 3600.0
"""How long staging or starting may take (a first start converts the embedded GGUF; big models load for minutes)."""
_SHUTDOWN_WAIT_S = 30.0


class CoreStartError(RuntimeError):
    """The core process failed without a known exception type to raise."""


_KNOWN_ERRORS: dict[str, type[BaseException]] = {
    cls.__name__: cls for cls in (FileNotFoundError, ConfigError, ValueError, KeyError, OSError, MemoryError,
                                  RuntimeError, NotImplementedError, TypeError)
}


def core_error(failure: CoreFailed) -> BaseException:
    """The exception the core raised, rebuilt by its class name (the server maps load errors by type)."""
    name = failure.error_types[0] if failure.error_types else "Exception"
    if name == "OutOfMemoryError":
        import torch

        return torch.OutOfMemoryError(failure.message)
    known = next((_KNOWN_ERRORS[n] for n in failure.error_types if n in _KNOWN_ERRORS), None)
    if known is None:
        return CoreStartError(f"{name}: {failure.message}")
    return known(failure.message)


class StagedCore:
    """A core process that has loaded its weights and waits to be started (or discarded)."""

    def __init__(self, config: Config, cpu_threads: int | None = None) -> None:
        from nitro_torch.engine.core_process import run_core_process

        self.config = config
        context = multiprocessing.get_context("spawn")
        self.conn, child_end = context.Pipe(duplex=True)
        self.process: BaseProcess = context.Process(target=run_core_process, args=(config, child_end, cpu_threads),
                                                    name="nitro-engine-core", daemon=True)
        self.process.start()
        child_end.close()
        try:
            self._expect(CoreStaged)
        except BaseException:
            self.discard()
            raise

    def start(self) -> ProcessEngineClient:
        try:
            self.conn.send_bytes(encode(StartCore()))
            ready = self._expect(CoreReady)
            return ProcessEngineClient(self.config, self.process, self.conn, ready.info)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        self.conn.close()  # the waiting core sees the pipe close and ends
        _stop_process(self.process)

    def _expect(self, kind: type[Any]) -> Any:
        if not self.conn.poll(START_TIMEOUT_S):
            raise CoreStartError(f"the engine core did not answer within {START_TIMEOUT_S:.0f} s")
        try:
            message = decode_message(self.conn.recv_bytes())
        except EOFError:
            raise CoreStartError(f"the engine core process exited (code {self.process.exitcode})") from None
        if isinstance(message, CoreFailed):
            raise core_error(message)
        if not isinstance(message, kind):
            raise CoreStartError(f"unexpected message from the engine core: {type(message).__name__}")
        return message


class ProcessEngineClient:
    def __init__(self, config: Config, process: BaseProcess, conn: Connection, info: EngineInfo) -> None:
        from nitro_torch.models.loader import apply_chat_template_file, load_tokenizer

        self.config = config
        self.info = info
        self.model_name = info.model_name
        self.max_model_len = info.max_model_len
        self.tokenizer = load_tokenizer(info.model_path or config.model.model, config.model.model_cache_dir)
        apply_chat_template_file(self.tokenizer, config.chat.chat_template)
        self.streams = RequestStreams(self.tokenizer)
        self.request_metrics = self.streams.processor.request_metrics
        self._process = process
        self._conn = conn
        self._send_lock = threading.Lock()
        self._stats = EngineStats(kv_blocks_total=info.kv_blocks_total,
                                  decode_compiling=info.row_decode_compile == "background")
        self._num_received = 0
        self._call_ids = itertools.count()
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}
        self._dead: BaseException | None = None
        self._closing = False
        self._reader = threading.Thread(target=self._read, name="nitro-engine-reader", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, config: Config, cpu_threads: int | None = None) -> ProcessEngineClient:
        return StagedCore(config, cpu_threads).start()

    # the EngineClient protocol ---------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       parent_id: str | None = None, client: str = "") -> AsyncIterator[RequestOutput]:
        self._check_alive()
        request = EngineCoreRequest(request_id, list(prompt_token_ids), params, parent_id, client)
        stream = self.streams.open(request)
        self._send(request)
        async for output in self.streams.follow(stream, self.abort):
            yield output

    async def prepare(self, params: SamplingParams) -> None:
        if params.guided is not None:
            await self._call(lambda call_id: CompileGrammar(call_id, params.guided))  # type: ignore[arg-type]

    def abort(self, request_id: str) -> None:
        self.streams.close(request_id)
        self._send_quietly(FinishRequests([request_id], FinishReason.ABORT))

    async def embed(self, token_id_lists: list[list[int]]) -> list[list[float]]:
        from nitro_torch.runner.embedder import pack_batches

        vectors: list[list[float]] = []
        for batch in pack_batches([len(ids) for ids in token_id_lists], self.info.max_num_batched_tokens):
            lists = [list(token_id_lists[i]) for i in batch]
            vectors.extend(await self._call(lambda call_id, lists=lists: EmbedCall(call_id, lists)))
        return vectors

    def stats(self) -> EngineStats:
        """The core's counters as of its last message; requests on their way to it count as waiting."""
        stats = msgspec.structs.replace(self._stats)
        stats.num_waiting += self.streams.num_on_the_way(self._num_received)
        return stats

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._process.is_alive()

    @property
    def num_live_requests(self) -> int:
        return self.streams.num_live

    @property
    def pid(self) -> int | None:
        """The core process's id."""
        return self._process.pid

    def shutdown(self) -> None:
        self._closing = True
        error = EngineDeadError("the server is shutting down")
        self._dead = self._dead or error
        self._send_quietly(Shutdown())
        _stop_process(self._process)
        self._reader.join(timeout=5)  # it saw the pipe close when the process ended
        self._conn.close()
        self._fail_everything(error)

    # the channel -----------------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError("the engine has stopped") from self._dead

    def _send(self, message: CoreInput) -> None:
        data = encode(message)
        with self._send_lock:
            self._conn.send_bytes(data)

    def _send_quietly(self, message: CoreInput) -> None:
        try:
            self._send(message)
        except (OSError, ValueError):
            pass  # the core is gone: the reader has failed (or will fail) everything

    def _finish_stopped(self, request_ids: list[str]) -> None:
        """On the event loop: requests that hit a stop string end in the core too."""
        self._send_quietly(FinishRequests(request_ids, FinishReason.STOP))

    async def _call(self, build: Any) -> Any:
        self._check_alive()
        loop = asyncio.get_running_loop()
        call_id = next(self._call_ids)
        future: asyncio.Future[Any] = loop.create_future()
        self._calls[call_id] = (loop, future)
        try:
            self._send(build(call_id))
        except (OSError, ValueError) as exc:
            self._calls.pop(call_id, None)
            raise EngineDeadError("the engine has stopped") from exc
        return await future

    def _read(self) -> None:
        """The reader thread: one message at a time, handed to the event loops."""
        try:
            while True:
                message = decode_message(self._conn.recv_bytes())
                if isinstance(message, CoreOutputs):
                    self._stats = message.stats
                    self._num_received = message.num_received
                    if message.outputs:
                        self.streams.dispatch(message.outputs, self._finish_stopped)
                elif isinstance(message, CallResult):
                    self._resolve(message)
                elif isinstance(message, CoreFailed):
                    raise EngineError(f"the engine core failed: {message.error_types[0]}: {message.message}")
        except (EOFError, OSError, EngineError) as exc:
            self._dead = self._dead or exc
            self._fail_everything(EngineDeadError("the engine stopped unexpectedly"))
            if not self._closing:
                self._process.join(2)  # its exit code, for the log
                logger.error("the engine core process ended (exit code %s)%s", self._process.exitcode,
                             f": {exc}" if str(exc) else "")

    def _resolve(self, result: CallResult) -> None:
        entry = self._calls.pop(result.call_id, None)
        if entry is None:
            return
        loop, future = entry
        if result.error_type is None:
            settle_soon(loop, future, result.value)
        elif result.error_type == "SamplingParamsError":
            settle_soon(loop, future, SamplingParamsError(result.error_param or "", result.error or ""))
        elif result.error_type == "ValueError":
            settle_soon(loop, future, ValueError(result.error))
        else:
            settle_soon(loop, future, EngineError(f"{result.error_type}: {result.error}"))

    def _fail_everything(self, error: EngineError) -> None:
        self.streams.fail_all(error)
        for call_id in list(self._calls):
            entry = self._calls.pop(call_id, None)
            if entry is not None:
                settle_soon(entry[0], entry[1], error)


def _stop_process(process: BaseProcess) -> None:
    """Let the process end on its own (after Shutdown or a closed pipe), then make sure it does."""
    process.join(_SHUTDOWN_WAIT_S)
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)


def _conforms(client: ProcessEngineClient) -> EngineClient:
    return client  # mypy checks that the class is an EngineClient
