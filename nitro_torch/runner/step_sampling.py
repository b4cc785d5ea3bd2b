"""A step's logits -> its sampled tokens (`ModelRunnerOutput`, keyed by request id: plain data for the core).

The grammar mask, the sampler and the non-finite check run here, in the runner. One failure belongs to one request:
when the batch fails to sample, each row is sampled alone, so one bad request cannot fail the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from nitro_torch.runner.guided import GuidedDecoder
from nitro_torch.runner.sampler import INVALID_TOKEN, SampledToken, Sampler
from nitro_torch.runner.sequence import SequenceState

logger = logging.getLogger("nitro_torch.runner")

NON_FINITE_LOGITS = "the model produced non-finite logits (NaN or inf)"


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, SampledToken] = field(default_factory=dict)
    """Request id -> the token it sampled this step."""
    grammar_complete: set[str] = field(default_factory=set)
    """Requests whose grammar is complete with this token: they end with it."""
    failed: dict[str, str] = field(default_factory=dict)
    """Request id -> why it could not sample (it ends alone)."""

    def merge(self, other: ModelRunnerOutput) -> None:
        self.sampled.update(other.sampled)
        self.grammar_complete |= other.grammar_complete
        self.failed.update(other.failed)


class StepSampler:
    def __init__(self, sampler: Sampler, guided: GuidedDecoder) -> None:
        self.sampler = sampler
        self.guided = guided

    def sample(self, logits: torch.Tensor | None, rows: list[SequenceState],
               all_plain_greedy: bool | None = None) -> ModelRunnerOutput:
        if logits is None or not rows:
            return ModelRunnerOutput()
        try:
            return self._sample_rows(logits, rows, all_plain_greedy)
        except Exception:
            logger.exception("sampling a batch of %d failed; sampling its requests one by one", len(rows))
        output = ModelRunnerOutput()
        for row, request in enumerate(rows):
            try:
                output.merge(self._sample_rows(logits[row:row + 1], [request]))
            except Exception as exc:
                logger.exception("sampling %s failed; ending it", request.request_id)
                output.failed[request.request_id] = f"sampling failed: {type(exc).__name__}"
        return output

    def _sample_rows(self, logits: torch.Tensor, rows: list[SequenceState],
                     all_plain_greedy: bool | None = None) -> ModelRunnerOutput:
        grammar = self.guided.token_mask(rows) if self.guided.active else None
        tokens = self.sampler.sample(logits, rows, grammar, all_plain_greedy)
        output = ModelRunnerOutput()
        for request, token in zip(rows, tokens):
            if token.token_id == INVALID_TOKEN:
                logger.error("non-finite logits for %s; ending it", request.request_id)
                output.failed[request.request_id] = NON_FINITE_LOGITS
            else:
                output.sampled[request.request_id] = token
        if grammar is not None:
            token_ids = [t.token_id for t in tokens]
            output.grammar_complete = {rows[row].request_id for row in self.guided.accept(grammar, token_ids)
                                       if rows[row].request_id not in output.failed}
        return output
