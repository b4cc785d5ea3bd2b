"""LLMEngine: one synchronous step = schedule -> forward -> sample -> update -> detokenize."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import torch


from nitro_torch.config import Config
from nitro_torch.engine.block_manager import BlockManager
from nitro_torch.engine.detokenizer import IncrementalDetokenizer
from nitro_torch.engine.metrics_hooks import RequestMetrics
from nitro_torch.engine.outputs import FinishReason, RequestOutput, TokenLogprob
from nitro_torch.engine.request import Request
from nitro_torch.engine.scheduler import Scheduler
from nitro_torch.models.loader import LoadedModel, apply_chat_template_file, load_model
from nitro_torch.runner.attention import register_paged_attention, set_attention_backend
from nitro_torch.runner.guided import GuidedDecoder, logits_vocab_size
from nitro_torch.runner.kv_cache import GIB, KVCache, KVLayout, attention_layer_devices
from nitro_torch.runner.memory import blocks_for_budgets, describe_capacity, gpu_kv_budgets
from nitro_torch.runner.model_runner import ModelRunner
from nitro_torch.runner.sampler import INVALID_TOKEN, SampledToken, Sampler
from nitro_torch.sampling import SamplingParams

logger = logging.getLogger("nitro_torch.engine")


class ContextLengthExceeded(ValueError):
    """Prompt plus requested completion do not fit in the model's context window."""


@dataclass
class _Tracked:
    request: Request
    detokenizer: IncrementalDetokenizer


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: Config) -> None:
        self.loaded = loaded
        self.config = config
        apply_chat_template_file(loaded.tokenizer, config.chat.chat_template)
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.device = loaded.device
        set_attention_backend(config.runner.attention_backend)
        layout = KVLayout.from_model_config(loaded.model.config, config.cache.block_size, loaded.dtype)
        layer_devices = attention_layer_devices(loaded.model, layout.num_layers) \
            if config.model.device_map == "auto" else None
        num_blocks = self._num_kv_blocks(layout, layer_devices or [self.device] * layout.num_layers)
        self.kv_cache = KVCache(layout, num_blocks, self.device, layer_devices)
        self.max_model_len = min(loaded.max_model_len, self.kv_cache.capacity_tokens)
        if self.max_model_len < loaded.max_model_len:
            logger.warning("context window limited to %d tokens by the KV cache size", self.max_model_len)
        sched = config.scheduler
        self.block_manager = BlockManager(num_blocks, layout.block_size, config.cache.prefix_caching)
        self.scheduler = Scheduler(self.block_manager, sched.max_num_batched_tokens, sched.max_num_seqs)
        self.runner = ModelRunner(loaded.model, self.kv_cache, self.device)
        self.sampler = Sampler(self.device)
        self.guided = GuidedDecoder(self.tokenizer, logits_vocab_size(loaded.model), loaded.eos_token_ids,
                                    self.device)
        self._tracked: dict[str, _Tracked] = {}
        self.request_metrics = RequestMetrics()
        """Finished requests' token counts and latencies, for the server's /metrics."""
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB) = %s", num_blocks, layout.block_size,
                    num_blocks * layout.bytes_per_block / GIB,
                    describe_capacity(num_blocks, layout.block_size, self.max_model_len, sched.max_num_seqs))
        if self._use_decode_graphs():
            self.runner.enable_decode_graphs(sched.max_num_seqs, self.max_model_len)

    def _use_decode_graphs(self) -> bool:
        runner = self.config.runner
        if self.device.type != "cuda" or not runner.cuda_graphs:
            return False
        if self.config.model.device_map == "auto":  # a step spans several devices: no single-device capture
            logger.info("decode CUDA graphs are off with --device-map auto")
            return False
        if runner.attention_backend == "torch":  # its decode gathers whole padded block tables: eager only
            logger.info("decode CUDA graphs are off with attention_backend torch")
            return False
        if self.loaded.quantization.startswith("bnb-8bit"):  # LLM.int8's outlier split syncs with the host
            logger.info("decode CUDA graphs are off for bitsandbytes 8-bit weights")
            return False
        return True

    @classmethod
    def from_config(cls, config: Config) -> "LLMEngine":
        impl = register_paged_attention()
        return cls(load_model(config.model, attn_implementation=impl), config)

    def _num_kv_blocks(self, layout: KVLayout, layer_devices: list[torch.device]) -> int:
        cache = self.config.cache
        if cache.num_kv_blocks:
            return cache.num_kv_blocks
        if self.device.type == "cuda":
            sched = self.config.scheduler
            budgets = gpu_kv_budgets(
                self.loaded.model, layer_devices, cache.gpu_memory_utilization, sched.max_num_batched_tokens,
                sched.max_num_seqs, self.loaded.max_model_len, logits_vocab_size(self.loaded.model),
            )
            blocks = blocks_for_budgets(layout, budgets, layer_devices)
        else:
            blocks = layout.blocks_for_bytes(int(cache.kv_cache_memory * GIB))
        if blocks < 1:
            raise RuntimeError("no memory left for the KV cache; lower the model size or raise the budget")
        return blocks

    # requests -------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    parent_id: str | None = None) -> Request:
        """Queue a request; with `parent_id` (a live request with the same prompt) it shares that prompt's KV."""
        if request_id in self._tracked:
            raise ValueError(f"duplicate request id {request_id}")
        check_context_length(len(prompt_token_ids), params.max_tokens, self.max_model_len)
        if params.guided is not None:
            self.guided.compile(params.guided)  # an invalid grammar is a SamplingParamsError before anything is queued
        limit = self.max_model_len
        if params.max_tokens is not None:
            limit = min(limit, len(prompt_token_ids) + params.max_tokens)
        request = Request(
            request_id, list(prompt_token_ids), params,
            eos_token_ids=self.loaded.eos_token_ids, max_total_tokens=limit,
        )
        parent = self._tracked.get(parent_id) if parent_id is not None else None
        if parent is not None:
            if parent.request.prompt_token_ids != request.prompt_token_ids:
                raise ValueError(f"request {request_id} has another prompt than its parent {parent_id}")
            request.parent = parent.request
        self.scheduler.add(request)
        self.guided.attach(request)
        detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params)
        self._tracked[request_id] = _Tracked(request, detokenizer)
        return request

    def abort(self, request_id: str) -> RequestOutput | None:
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return None
        self.scheduler.finish(tracked.request, FinishReason.ABORT)
        self._forget(request_id)
        return self._output(tracked.request, "", [], None)

    @property
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work

    # the step -------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One step. A failure that belongs to one request (its sampling, non-finite logits, its stop check or
        detokenizing) ends that request alone with an error output; a failed forward raises for the caller."""
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        try:
            logits, sampling_requests = self.runner.execute(plan)
        except torch.OutOfMemoryError:
            if not self._back_off_after_oom():
                raise
            return []  # nothing of the step was kept (no request advanced): it runs again, smaller
        sampled, grammar_ended, failed = self._sample(logits, sampling_requests)
        for request, error in failed.items():
            self.scheduler.finish(request, FinishReason.ABORT)
        self.scheduler.update(plan, {r.request_id: s.token_id for r, s in sampled.items()})
        outputs = [self._fail(request, error) for request, error in failed.items()]
        now = time.monotonic()
        for request, token in sampled.items():
            if request.first_token_time is None:
                request.first_token_time = now
            request.last_token_time = now
            try:
                output = self._process(request, token, request in grammar_ended)
            except Exception as exc:
                logger.exception("processing the output of %s failed; ending it", request.request_id)
                self.scheduler.finish(request, FinishReason.ABORT)
                output = self._fail(request, f"output processing failed: {type(exc).__name__}")
            if output is not None:
                outputs.append(output)
        return outputs

    def expire_requests(self, now: float | None = None) -> list[RequestOutput]:
        """End the requests older than --request-timeout with finish_reason 'length' and what they produced.
        The server's engine loop calls it before every step."""
        timeout = self.config.server.request_timeout
        if not timeout:
            return []
        now = time.monotonic() if now is None else now
        outputs = []
        for request_id, tracked in list(self._tracked.items()):
            request = tracked.request
            if now - request.arrival_time <= timeout:
                continue
            self.scheduler.finish(request, FinishReason.LENGTH)
            outputs.append(self._output(request, tracked.detokenizer.finish(), [], None))
            self._forget(request_id)
        if outputs:
            logger.warning("%d requests ended by the %.0f s request timeout", len(outputs), timeout)
        return outputs

    def _back_off_after_oom(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if not self.scheduler.back_off():
            return False
        logger.warning("out of device memory in a step; retrying with a step budget of %d tokens and %d running "
                       "requests", self.scheduler.max_num_batched_tokens, len(self.scheduler.running))
        return True

    def _sample(self, logits: torch.Tensor | None, requests: list[Request]
                ) -> tuple[dict[Request, SampledToken], set[Request], dict[Request, str]]:
        """Tokens of the sampling rows, the rows whose grammar is complete, and the rows that failed (with why).

        When the batch fails to sample, each row is sampled alone, so one bad request cannot fail the others."""
        if logits is None or not requests:
            return {}, set(), {}
        try:
            return self._sample_rows(logits, requests)
        except Exception:
            logger.exception("sampling a batch of %d failed; sampling its requests one by one", len(requests))
        sampled: dict[Request, SampledToken] = {}
        ended: set[Request] = set()
        failed: dict[Request, str] = {}
        for row, request in enumerate(requests):
            try:
                one_sampled, one_ended, one_failed = self._sample_rows(logits[row:row + 1], [request])
            except Exception as exc:
                logger.exception("sampling %s failed; ending it", request.request_id)
                failed[request] = f"sampling failed: {type(exc).__name__}"
                continue
            sampled.update(one_sampled)
            ended |= one_ended
            failed.update(one_failed)
        return sampled, ended, failed

    def _sample_rows(self, logits: torch.Tensor, requests: list[Request]
                     ) -> tuple[dict[Request, SampledToken], set[Request], dict[Request, str]]:
        grammar = self.guided.token_mask(requests) if self.guided.active else None
        tokens = self.sampler.sample(logits, requests, grammar)
        failed = {r: "the model produced non-finite logits (NaN or inf)"
                  for r, t in zip(requests, tokens) if t.token_id == INVALID_TOKEN}
        for request in failed:
            logger.error("non-finite logits for %s; ending it", request.request_id)
        ended: set[Request] = set()
        if grammar is not None:
            token_ids = [t.token_id for t in tokens]
            ended = {requests[row] for row in self.guided.accept(grammar, token_ids) if requests[row] not in failed}
        sampled = {r: t for r, t in zip(requests, tokens) if r not in failed}
        return sampled, ended, failed

    def _process(self, request: Request, token: SampledToken, grammar_ended: bool) -> RequestOutput | None:
        """Detokenize one sampled token, apply stop strings and grammar completion; the request's output."""
        tracked = self._tracked.get(request.request_id)
        if tracked is None:
            return None
        detokenizer = tracked.detokenizer
        ended_on_stop_token = request.finish_reason is FinishReason.STOP
        text = "" if ended_on_stop_token and not request.params.include_stop_str_in_output \
            else detokenizer.add(token.token_id)
        if grammar_ended:  # complete structure; a no-op when its stop token already ended it
            self.scheduler.finish(request, FinishReason.STOP)
        if detokenizer.stopped:
            self.scheduler.finish(request, FinishReason.STOP)
            request.finish_reason = FinishReason.STOP  # a stop string wins over a length limit hit at once
        elif request.is_finished:
            text += detokenizer.finish()
        logprobs = [token.logprob] if token.logprob is not None else None
        output = self._output(request, text, [token.token_id], logprobs)
        if request.is_finished:
            self._forget(request.request_id)
        return output

    def _fail(self, request: Request, error: str) -> RequestOutput:
        output = self._output(request, "", [], None)
        output.error = error
        self._forget(request.request_id)
        return output

    def _forget(self, request_id: str) -> None:
        self._tracked.pop(request_id, None)
        self.sampler.release(request_id)
        self.guided.release(request_id)

    def _output(self, request: Request, text: str, token_ids: list[int],
                logprobs: list[TokenLogprob] | None) -> RequestOutput:
        output = RequestOutput(
            request_id=request.request_id,
            new_text=text,
            new_token_ids=token_ids,
            finished=request.is_finished,
            finish_reason=request.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens,
            logprobs=logprobs,
        )
        if output.finished:
            output.arrival_time = request.arrival_time
            output.first_scheduled_time = request.first_scheduled_time
            output.first_token_time = request.first_token_time
            output.last_token_time = request.last_token_time
            output.finished_time = time.monotonic()
            self.request_metrics.observe(output)
        return output

    # offline use ----------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams) -> list[list[int]]:
        """Run prompts to completion in one continuous batch; returns the generated token ids per prompt."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        ids = [f"offline-{uuid.uuid4().hex}" for _ in prompts]
        requests = [self.add_request(i, p, sp) for i, p, sp in zip(ids, prompts, params)]
        while self.has_unfinished_requests:
            self.step()
        return [r.output_token_ids for r in requests]

    def stats(self) -> dict[str, int | float]:
        bm, sched = self.block_manager, self.scheduler
        return {
            "num_running": len(sched.running),
            "num_waiting": sched.num_waiting,
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_block_size": self.kv_cache.layout.block_size,
            "kv_capacity_tokens": self.kv_cache.capacity_tokens,
            "max_num_seqs": sched.max_num_seqs,
            "max_model_len": self.max_model_len,
            "prefix_cache_query_tokens": bm.stats.prefix_query_tokens,
            "prefix_cache_hit_tokens": bm.stats.prefix_hit_tokens,
            "num_preemptions": sched.stats.num_preemptions,
            "num_steps": sched.stats.num_steps,
        }

    # embeddings -----------------------------------------------------------------------------------

    @property
    def embedding_size(self) -> int:
        config = self.loaded.model.config
        return (config.get_text_config() if hasattr(config, "get_text_config") else config).hidden_size

    def embed(self, token_id_lists: list[list[int]]) -> list[list[float]]:
        """One unit-length vector per input: its mean-pooled final hidden states. No KV cache is read or written,
        so running requests are untouched; call it on the engine's thread, between steps."""
        from nitro_torch.runner.embedder import Embedder

        for ids in token_id_lists:
            if not ids or len(ids) > self.max_model_len:
                raise ValueError(f"embedding inputs need 1 to {self.max_model_len} tokens, not {len(ids)}")
        embedder = getattr(self, "_embedder", None)
        if embedder is None:
            embedder = self._embedder = Embedder(self.loaded.model, self.kv_cache, self.device,
                                                 self.config.scheduler.max_num_batched_tokens)
        return embedder.embed(token_id_lists).tolist()


def check_context_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    if num_prompt_tokens >= max_model_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{num_prompt_tokens} tokens, which leaves no room for a completion."
        )
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, {max_tokens} in "
            "the completion). Please reduce the length of the messages or completion."
        )
