"""LLMEngine: the core and the client's output processing in one object, stepped by the caller.

For offline use (benchmarks, tests, `generate`): one `step()` runs a core step and turns its token ids into text
deltas at once. The server runs the same two halves apart (engine/client.py).
"""

from __future__ import annotations

import uuid

from nitro_torch.config import Config
from nitro_torch.engine.context_length import ContextLengthExceeded, check_context_length
from nitro_torch.engine.core import EngineCore
from nitro_torch.engine.loading import load_tensor_parallel
from nitro_torch.engine.messages import CoreOutput, EngineCoreRequest, EngineStats
from nitro_torch.engine.output_processor import OutputProcessor
from nitro_torch.engine.outputs import FinishReason, RequestOutput
from nitro_torch.engine.request import Request
from nitro_torch.models.loader import LoadedModel, load_model
from nitro_torch.runner.attention import register_paged_attention
from nitro_torch.sampling import SamplingParams

__all__ = ["ContextLengthExceeded", "LLMEngine", "check_context_length"]


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: Config) -> None:
        self.core = EngineCore(loaded, config)
        self.processor = OutputProcessor(self.core.tokenizer)
        self.request_metrics = self.processor.request_metrics

    @classmethod
    def from_config(cls, config: Config) -> LLMEngine:
        if config.model.tensor_parallel_size > 1:
            return cls(load_tensor_parallel(config), config)
        return cls(load_model(config.model, attn_implementation=register_paged_attention()), config)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (a model on one device needs no closing)."""
        self.core.close()

    # the core's parts, as tests and benchmarks inspect them
    loaded = property(lambda self: self.core.loaded)
    config = property(lambda self: self.core.config)
    tokenizer = property(lambda self: self.core.tokenizer)
    model_name = property(lambda self: self.core.model_name)
    device = property(lambda self: self.core.device)
    max_model_len = property(lambda self: self.core.max_model_len)
    kv_cache = property(lambda self: self.core.kv_cache)
    block_manager = property(lambda self: self.core.block_manager)
    scheduler = property(lambda self: self.core.scheduler)
    runner = property(lambda self: self.core.runner)
    sampler = property(lambda self: self.core.sampler)
    guided = property(lambda self: self.core.guided)
    info = property(lambda self: self.core.info)
    embedding_size = property(lambda self: self.core.embedding_size)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    parent_id: str | None = None, client: str = "") -> Request:
        """Queue a request; with `parent_id` (a live request with the same prompt) it shares that prompt's KV."""
        core_request = EngineCoreRequest(request_id, list(prompt_token_ids), params, parent_id, client)
        request = self.core.add_request(core_request)
        self.processor.add(core_request, request.arrival_time)
        return request

    def abort(self, request_id: str) -> RequestOutput | None:
        self.core.finish(request_id, FinishReason.ABORT)
        return self.processor.abort(request_id)

    @property
    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests

    def step(self) -> list[RequestOutput]:
        return self._process(self.core.step())

    def expire_requests(self, now: float | None = None) -> list[RequestOutput]:
        return self._process(self.core.expire_requests(now))

    def _process(self, core_outputs: list[CoreOutput]) -> list[RequestOutput]:
        processed = self.processor.process(core_outputs)
        for request_id in processed.to_finish:
            self.core.finish(request_id, FinishReason.STOP)
        return processed.outputs

    def generate(self, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams) -> list[list[int]]:
        """Run prompts to completion in one continuous batch; returns the generated token ids per prompt."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        ids = [f"offline-{uuid.uuid4().hex}" for _ in prompts]
        requests = [self.add_request(i, p, sp) for i, p, sp in zip(ids, prompts, params)]
        while self.has_unfinished_requests:
            self.step()
        return [r.output_token_ids for r in requests]

    def stats(self) -> EngineStats:
        return self.core.stats()

    def embed(self, token_id_lists: list[list[int]]) -> list[list[float]]:
        return self.core.embed(token_id_lists)
