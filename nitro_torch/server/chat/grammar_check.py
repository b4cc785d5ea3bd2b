"""Every grammar a client sends is checked off the event loop, with limits, before the engine sees it.

xgrammar needs seconds for some specs (a JSON schema nested a few hundred levels deep, an object with
thousands of properties), and the engine compiles each new spec once more. So, in order:
1. cheap limits on the request's event loop: the spec's length, and the nesting of a JSON spec sent as a
   string (the same cap as request bodies, which a string escapes);
2. a verdict cache: a spec seen before (valid, invalid or too slow) is answered at once;
3. the full check (xgrammar's parse, the finite-output check, a compile against the vocabulary) in one of
   CHECK_THREADS worker threads; a check that runs past CHECK_TIME_LIMIT_S is a 400 `grammar_too_complex`.

A thread cannot be stopped: an overrunning check finishes in its worker (xgrammar releases the GIL and
compiles on one core there), and its late result is dropped. The pool bounds how many run at once, so a flood
of distinct slow specs costs at most CHECK_THREADS cores; MAX_QUEUED_CHECKS bounds the waiting ones (503
beyond), and identical specs in flight share one check.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from nitro_torch.runner.guided import check_compiles, checking_compiler, grammar_of
from nitro_torch.sampling import GuidedDecoding, SamplingParamsError
from nitro_torch.server.chat.response_format import constraint
from nitro_torch.server.chat.tools import check_each_forced_tool, explain_unenforceable
from nitro_torch.server.http.errors import APIError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from nitro_torch.sampling import SamplingParams
    from nitro_torch.server.chat.protocol import ChatCompletionRequest
    from nitro_torch.server.chat.tool_parsers import ToolFormat

MAX_SPEC_CHARS = 256 * 1024
MAX_SPEC_DEPTH = 128
"""The request bodies' cap (context.MAX_JSON_DEPTH), for JSON specs sent as strings."""
CHECK_TIME_LIMIT_S = 5.0
CHECK_THREADS = 2
MAX_QUEUED_CHECKS = 64
QUEUE_WAIT_S = 30.0
MAX_VERDICTS = 4096
SLOW_VERDICT_TTL_S = 300.0
"""A spec found too slow is refused for this long: the time limit may have tripped on a busy machine."""

GRAMMAR_TOO_COMPLEX = "grammar_too_complex"


def too_complex(param: str, why: str) -> APIError:
    return APIError(400, f"The grammar of '{param}' is too complex: {why}.", param=param, code=GRAMMAR_TOO_COMPLEX)


def check_size(guided: GuidedDecoding, param: str) -> None:
    if len(guided.spec) > MAX_SPEC_CHARS:
        raise too_complex(param, f"its spec has {len(guided.spec)} characters, more than {MAX_SPEC_CHARS}")


def check_depth(guided: GuidedDecoding, param: str) -> None:
    """Linear in the spec. Tool schemas arrive as JSON in the body, which has the same cap already."""
    if guided.kind in ("json_schema", "structural_tag"):
        try:
            value = json.loads(guided.spec)
        except (json.JSONDecodeError, RecursionError):
            return  # xgrammar words the error (json.loads recurses past ~1000 levels only)
        if _nests_deeper_than(value, MAX_SPEC_DEPTH):
            raise too_complex(param, f"it nests arrays and objects more than {MAX_SPEC_DEPTH} levels deep")


def _nests_deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


_Verdict = SamplingParamsError | APIError | None


class GrammarChecker:
    """The worker threads, the verdicts so far and the checks in flight (shared by every request)."""

    def __init__(self, threads: int = CHECK_THREADS) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="nitro-grammar-check")
        self._lock = threading.Lock()
        self._verdicts: OrderedDict[str, _Verdict] = OrderedDict()
        self._expires: dict[str, float] = {}
        """Keys of verdicts that expire (too slow), and when."""
        self._in_flight: dict[str, tuple[Future[float], Future[None]]] = {}

    async def check(self, key: str, param: str, work: Callable[[], None],
                    warm_up: Callable[[], object] = lambda: None) -> None:
        """Runs `work` (which raises SamplingParamsError for a bad spec) in a worker; remembers the verdict.
        `warm_up` runs first, outside the time limit (building the vocabulary's compiler, once per model)."""
        limit = CHECK_TIME_LIMIT_S
        found, verdict = self._verdict(key)
        if found:
            _raise(verdict)
            return
        started, done = self._start(key, work, warm_up)
        try:
            started_at = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(started)), QUEUE_WAIT_S)
        except TimeoutError:
            raise APIError(503, "The server is busy checking other grammars; retry shortly.",
                           code="grammar_checks_busy") from None
        remaining = max(0.0, limit - (time.monotonic() - started_at))
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(done)), remaining)
        except TimeoutError:
            error = too_complex(param, f"checking it took more than {limit:g} s")
            self._remember(key, error, expires_at=time.monotonic() + SLOW_VERDICT_TTL_S)
            raise error from None

    def _verdict(self, key: str) -> tuple[bool, _Verdict]:
        with self._lock:
            if key not in self._verdicts:
                return False, None
            if self._expires.get(key, float("inf")) < time.monotonic():
                del self._verdicts[key], self._expires[key]
                return False, None
            self._verdicts.move_to_end(key)
            return True, self._verdicts[key]

    def _remember(self, key: str, verdict: _Verdict, overwrite: bool = True,
                  expires_at: float | None = None) -> None:
        with self._lock:
            if not overwrite and key in self._verdicts:
                return
            self._verdicts[key] = verdict
            self._verdicts.move_to_end(key)
            self._expires.pop(key, None)
            if expires_at is not None:
                self._expires[key] = expires_at
            while len(self._verdicts) > MAX_VERDICTS:
                oldest, _ = self._verdicts.popitem(last=False)
                self._expires.pop(oldest, None)

    def _start(self, key: str, work: Callable[[], None],
               warm_up: Callable[[], object]) -> tuple[Future[float], Future[None]]:
        with self._lock:
            running = self._in_flight.get(key)
            if running is not None:
                return running
            if len(self._in_flight) >= MAX_QUEUED_CHECKS:
                raise APIError(503, "The server is busy checking other grammars; retry shortly.",
                               code="grammar_checks_busy")
            started: Future[float] = Future()
            done = self._pool.submit(self._run, key, work, warm_up, started)
            self._in_flight[key] = (started, done)
            return started, done

    def _run(self, key: str, work: Callable[[], None], warm_up: Callable[[], object],
             started: Future[float]) -> None:
        try:
            try:
                warm_up()
            except BaseException as exc:
                started.set_exception(exc)
                raise
            started.set_result(time.monotonic())
            work()
            self._remember(key, None, overwrite=False)
        except SamplingParamsError as exc:
            self._remember(key, exc, overwrite=False)
            raise
        finally:
            with self._lock:
                self._in_flight.pop(key, None)


def _raise(verdict: _Verdict) -> None:
    if isinstance(verdict, APIError):
        raise APIError(verdict.status, verdict.message, param=verdict.param, code=verdict.code)
    if isinstance(verdict, SamplingParamsError):
        raise SamplingParamsError(verdict.param, str(verdict))


CHECKER = GrammarChecker()


def _key(tokenizer: Any, guided: GuidedDecoding, param: str) -> str:
    model = getattr(tokenizer, "name_or_path", "") or str(id(tokenizer))
    text = json.dumps([model, param, guided.kind, guided.spec])
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


async def check_chat_grammar(tokenizer: PreTrainedTokenizerBase, body: ChatCompletionRequest,
                             params: SamplingParams, tools_forced: bool, tool_format: ToolFormat) -> None:
    """400 naming the field unless the request's grammar (response_format, guided_*, structured_outputs, or
    the tool calls a forced tool_choice makes, in `tool_format`) is valid and compiles within the limits."""
    guided = params.guided
    if guided is None:
        return
    found = constraint(body.response_format, body.guided_json, body.guided_regex, body.guided_choice,
                       body.guided_grammar, body.structured_outputs)
    param = "tools" if tools_forced or found is None else found[0]
    check_size(guided, param)
    if not tools_forced:
        check_depth(guided, param)
    tools, choice = body.tools or [], body.resolved_tool_choice()

    def work() -> None:
        if tools_forced:  # each function's grammar alone first (milliseconds): it names the culprit
            check_each_forced_tool(tool_format, tools, choice, lambda one: grammar_of(one, param))
        try:
            check_compiles(guided, param, tokenizer)
        except SamplingParamsError as exc:
            if not tools_forced:
                raise
            raise explain_unenforceable(tool_format, tools, choice, exc,
                                        lambda one: check_compiles(one, param, tokenizer)) from None

    await CHECKER.check(_key(tokenizer, guided, param), param, work, warm_up=lambda: checking_compiler(tokenizer))
