"""The engine core in a process of its own: a busy loop that takes messages from the client, steps, and sends
each step's outputs back as one message (MessagePack over a pipe, see messages.py).

Lifecycle: stage the weights -> CoreStaged -> (StartCore) -> device + KV cache -> CoreReady -> loop. A failure in
a phase is sent as CoreFailed and the process ends. The process ends too when the client closes its end (the
server went away) or sends Shutdown. SIGINT is ignored: the server decides when the core stops.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from nitro_torch.config import Config
from nitro_torch.engine.messages import (
    CallResult,
    CompileGrammar,
    CoreFailed,
    CoreOutput,
    CoreOutputs,
    CoreReady,
    CoreStaged,
    EmbedCall,
    EngineCoreRequest,
    FinishRequests,
    Shutdown,
    StartCore,
    decode_input,
    encode,
)
from nitro_torch.engine.outputs import FinishReason

logger = logging.getLogger("nitro_torch.engine")


def run_core_process(config: Config, conn: Connection, cpu_threads: int | None) -> None:
    """The process's entry point (multiprocessing, spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=config.server.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [engine core]: %(message)s")
    channel = _Channel(conn)
    from nitro_torch.engine.core import EngineCore
    from nitro_torch.engine.loading import place_on_device, stage_weights

    phase = "load"
    try:
        loaded = stage_weights(config, cpu_threads)
        channel.send(CoreStaged())
        if not isinstance(channel.receive(), StartCore):
            return
        phase = "start"
        core = EngineCore(place_on_device(loaded, config, cpu_threads), config)
        del loaded
        channel.send(CoreReady(core.info))
        phase = "run"
        if core.ranks is not None:
            core.ranks.exit_on_worker_death()
        CoreLoop(core, channel).run()
        core.close()
    except _CHANNEL_CLOSED as exc:
        if phase != "run":
            logger.info("engine core ends: the server closed the channel (%s)", type(exc).__name__)
    except BaseException as exc:
        if phase != "load":  # a load failure is the user's to read, in the server's answer
            logger.exception("engine core failed (%s)", phase)
        try:
            channel.send(CoreFailed(phase, str(exc) or type(exc).__name__, [c.__name__ for c in type(exc).__mro__]))
        except _CHANNEL_CLOSED:
            pass


_CHANNEL_CLOSED = (EOFError, BrokenPipeError, ConnectionResetError)
"""What reading or writing the pipe raises once the server's end is gone."""
COMPILE_POLL_S = 0.5
"""While idle with a background compilation running, the loop looks this often whether it ended, so that the
client's stats (/health's `decode_compiling`) turn false without waiting for a request."""


class _Channel:
    """The core's end of the pipe; sends may come from the grammar thread too, so they are serialized."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._send_lock = threading.Lock()

    def send(self, message: Any) -> None:
        data = encode(message)
        with self._send_lock:
            self.conn.send_bytes(data)

    def receive(self) -> Any:
        return decode_input(self.conn.recv_bytes())

    def ready(self, timeout: float = 0.0) -> bool:
        return self.conn.poll(timeout)


class CoreLoop:
    def __init__(self, core: Any, channel: _Channel) -> None:
        self.core = core
        self.channel = channel
        self.num_received = 0
        self.pending: list[CoreOutput] = []
        self.dirty = False
        """Commands changed the core since the last message (the client's stats are stale)."""
        self.compiling = core.info.row_decode_compile == "background"
        """What the client believes of the background compilation (until told, what it assumed from CoreReady)."""
        self.grammars = ThreadPoolExecutor(1, thread_name_prefix="nitro-grammar")
        """Grammars compile here, off the loop: a slow schema never stalls the steps."""

    def run(self) -> None:
        from nitro_torch.engine.client import is_fatal_device_error
        from nitro_torch.runner.parallel.group import RanksLost

        while True:
            if not self._apply_inputs(block=not self.core.has_unfinished_requests):
                return
            outputs, self.pending = self.pending, []
            if self.core.has_unfinished_requests:
                outputs.extend(self.core.expire_requests())
                try:
                    outputs.extend(self.core.step())
                except Exception as exc:
                    if is_fatal_device_error(exc) or isinstance(exc, RanksLost):
                        raise  # the device (or a rank) is gone: the process ends and the client fails every request
                    logger.exception("engine step failed; failing its requests")
                    outputs.extend(self.core.fail_running(exc))
            if outputs or self.dirty:
                self.dirty = False
                self.channel.send(CoreOutputs(outputs, self.core.stats(), self.num_received))

    def _apply_inputs(self, block: bool) -> bool:
        """Apply every waiting message (waiting for one when idle); False on Shutdown."""
        while block or self.channel.ready():
            if block and self.compiling and not self.channel.ready(COMPILE_POLL_S):
                if not self.core.stats().decode_compiling:
                    self.compiling, self.dirty = False, True  # the client hears it with the next message
                    return True
                continue
            message = self.channel.receive()
            block = False
            self.dirty = True
            if isinstance(message, EngineCoreRequest):
                self._add(message)
            elif isinstance(message, FinishRequests):
                for request_id in message.request_ids:
                    output = self.core.finish(request_id, message.reason)
                    if output is not None:
                        self.pending.append(output)
            elif isinstance(message, (EmbedCall, CompileGrammar)):
                self._call(message)
            elif isinstance(message, Shutdown):
                self.grammars.shutdown(wait=False, cancel_futures=True)
                return False
        return True

    def _add(self, request: EngineCoreRequest) -> None:
        self.num_received += 1
        try:
            self.core.add_request(request)
        except Exception as exc:
            self.pending.append(CoreOutput(request.request_id, [], FinishReason.ABORT,
                                           error=f"{type(exc).__name__}: {exc}"))

    def _call(self, call: EmbedCall | CompileGrammar) -> None:
        if isinstance(call, CompileGrammar):
            self.grammars.submit(self._answer, call.call_id, lambda: self.core.guided.compile(call.guided) and None)
        else:
            self._answer(call.call_id, lambda: self.core.embed(call.token_id_lists))

    def _answer(self, call_id: int, compute: Any) -> None:
        try:
            value = compute()
        except Exception as exc:
            logger.warning("engine call failed: %s: %s", type(exc).__name__, exc)
            self.channel.send(CallResult(call_id, error=str(exc), error_type=type(exc).__name__,
                                         error_param=getattr(exc, "param", None)))
            return
        self.channel.send(CallResult(call_id, value))
