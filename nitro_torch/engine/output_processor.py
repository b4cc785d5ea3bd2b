"""The client's side of each step: token ids from the core -> text deltas (RequestOutput), stop strings, timings.

It runs where the HTTP side runs (the API process), never in the core's step. A request whose text reached a
stop string is finished here and named in `ProcessedStep.to_finish`, so the client ends it in the core (which
may have sampled a token or two more by then: they are dropped).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nitro_torch.engine.detokenizer import IncrementalDetokenizer
from nitro_torch.engine.messages import CoreOutput, EngineCoreRequest
from nitro_torch.engine.metrics_hooks import RequestMetrics
from nitro_torch.engine.outputs import FinishReason, RequestOutput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("nitro_torch.engine")


@dataclass(slots=True)
class _RequestState:
    request_id: str
    num_prompt_tokens: int
    detokenizer: IncrementalDetokenizer
    include_stop_str: bool
    arrival_time: float
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None


@dataclass
class ProcessedStep:
    outputs: list[RequestOutput] = field(default_factory=list)
    to_finish: list[str] = field(default_factory=list)
    """Requests that ended on a stop string here while the core still runs them: finish them there."""


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestState] = {}
        self.request_metrics = RequestMetrics()
        """Finished requests' token counts and latencies, for the server's /metrics."""

    def add(self, request: EngineCoreRequest, arrival_time: float | None = None) -> None:
        params = request.params
        self.requests[request.request_id] = _RequestState(
            request.request_id, len(request.prompt_token_ids),
            IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params),
            params.include_stop_str_in_output, time.monotonic() if arrival_time is None else arrival_time,
        )

    def forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    def process(self, core_outputs: list[CoreOutput]) -> ProcessedStep:
        step = ProcessedStep()
        now = time.monotonic()
        for core_output in core_outputs:
            state = self.requests.get(core_output.request_id)
            if state is None:
                continue  # ended here already (a stop string); the core's late tokens are dropped
            try:
                output = self._process_one(state, core_output, now)
            except Exception as exc:
                logger.exception("processing the output of %s failed; ending it", state.request_id)
                output = self._finish(state, core_output, "", [], FinishReason.ABORT, now)
                output.error = f"output processing failed: {type(exc).__name__}"
            if output.finished and core_output.finish_reason is None:
                step.to_finish.append(state.request_id)
            step.outputs.append(output)
        return step

    def _process_one(self, state: _RequestState, core_output: CoreOutput, now: float) -> RequestOutput:
        token_ids = core_output.new_token_ids
        state.num_cached_tokens = core_output.num_cached_tokens
        if state.first_scheduled_time is None:
            state.first_scheduled_time = core_output.first_scheduled_time
        if token_ids:
            if state.first_token_time is None:
                state.first_token_time = now
            state.last_token_time = now
            state.num_output_tokens += len(token_ids)
        detokenizer = state.detokenizer
        reason = core_output.finish_reason
        text = ""
        for position, token_id in enumerate(token_ids):
            last = position == len(token_ids) - 1
            if last and core_output.ended_on_stop_token and not state.include_stop_str:
                break
            text += detokenizer.add(token_id)
            if detokenizer.stopped:
                break
        if detokenizer.stopped:
            reason = FinishReason.STOP  # a stop string wins over a length limit hit at once
        elif reason is not None:
            text += detokenizer.finish()
        if reason is None:
            return RequestOutput(state.request_id, text, token_ids, False, None, state.num_prompt_tokens,
                                 state.num_output_tokens, state.num_cached_tokens, core_output.logprobs)
        output = self._finish(state, core_output, text, token_ids, reason, now)
        output.error = core_output.error
        return output

    def _finish(self, state: _RequestState, core_output: CoreOutput, text: str, token_ids: list[int],
                reason: FinishReason, now: float) -> RequestOutput:
        self.requests.pop(state.request_id, None)
        output = RequestOutput(
            state.request_id, text, token_ids, True, reason, state.num_prompt_tokens, state.num_output_tokens,
            state.num_cached_tokens, core_output.logprobs,
            arrival_time=state.arrival_time, first_scheduled_time=state.first_scheduled_time,
            first_token_time=state.first_token_time, last_token_time=state.last_token_time, finished_time=now,
            stop_string=state.detokenizer.stop_string,
        )
        self.request_metrics.observe(output)
        return output

    def abort(self, request_id: str) -> RequestOutput | None:
        """The final output of a request the client aborted (None if it already ended)."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        return self._finish(state, CoreOutput(request_id, [], num_cached_tokens=state.num_cached_tokens), "", [],
                            FinishReason.ABORT, time.monotonic())
