"""EngineCore: one step = schedule -> forward -> sample -> update, in token ids only.

Text never enters the core: detokenizing and stop strings are the client's (output_processor.py), which ends a
request that hit a stop string with `finish`. What goes in and out is plain data (messages.py), so the same
core runs in the server's process (a thread) or in a process of its own (core_process.py).
"""

from __future__ import annotations

import logging
import time

import torch

from nitro_torch.config import Config
from nitro_torch.engine.block_manager import BlockManager
from nitro_torch.engine.context_length import check_context_length
from nitro_torch.engine.messages import CoreOutput, EngineCoreRequest, EngineInfo, EngineStats
from nitro_torch.engine.outputs import FinishReason
from nitro_torch.engine.request import Request
from nitro_torch.engine.scheduler import Scheduler, StepPlan
from nitro_torch.engine.step_time import max_step_time_s
from nitro_torch.models.embedded import nitro_cache_dir
from nitro_torch.models.loader import LoadedModel, apply_chat_template_file
from nitro_torch.runner.attention import set_attention_backend
from nitro_torch.runner.guided import GuidedDecoder, logits_vocab_size
from nitro_torch.runner.host_memory import reuse_large_allocations
from nitro_torch.runner.kv_cache import GIB
from nitro_torch.runner.memory import build_kv_cache, describe_capacity, kv_cache_dtype
from nitro_torch.runner.model_runner import LaunchedStep, ModelRunner
from nitro_torch.runner.parallel.group import current_ranks
from nitro_torch.runner.parallel.messages import RunEmbed, rank_report
from nitro_torch.runner.row_decode import use_inductor_cache_in
from nitro_torch.runner.sampler import Sampler
from nitro_torch.runner.step_sampling import ModelRunnerOutput, StepSampler

logger = logging.getLogger("nitro_torch.engine")


class EngineCore:
    def __init__(self, loaded: LoadedModel, config: Config) -> None:
        self.loaded = loaded
        self.config = config
        apply_chat_template_file(loaded.tokenizer, config.chat.chat_template)
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.device = loaded.device
        set_attention_backend(config.runner.attention_backend)
        reuse_large_allocations()
        self.ranks = current_ranks() if config.model.tensor_parallel_size > 1 else None
        """The tensor-parallel group, when this core's runner is rank 0 of several."""
        if config.model.tensor_parallel_size > 1 and self.ranks is None:
            raise RuntimeError("a tensor-parallel model needs its ranks started first (engine/loading.py)")
        kv_dtype = kv_cache_dtype(config.cache.kv_cache_dtype, loaded.dtype, self.device,
                                  packed_weights=not loaded.cpu_weights.exact)
        self.kv_cache = build_kv_cache(loaded.model, self.device, kv_dtype, loaded.max_model_len, config, self.ranks)
        layout, num_blocks = self.kv_cache.layout, self.kv_cache.num_blocks
        self.max_model_len = min(loaded.max_model_len, self.kv_cache.capacity_tokens)
        if self.max_model_len < loaded.max_model_len:
            logger.warning("context window limited to %d tokens by the KV cache size", self.max_model_len)
        sched = config.scheduler
        self.block_manager = BlockManager(num_blocks, layout.block_size, config.cache.prefix_caching)
        self.scheduler = Scheduler(self.block_manager, sched.max_num_batched_tokens, sched.max_num_seqs,
                                   fair_share=sched.fair_share, flat_batch_cost=self.device.type == "cuda",
                                   fair_share_hold_s=sched.fair_share_hold,
                                   max_step_time_s=max_step_time_s(sched.max_step_time, self.device.type))
        self.sampler = Sampler(self.device)
        self.guided = GuidedDecoder(self.tokenizer, logits_vocab_size(loaded.model), loaded.eos_token_ids,
                                    self.device)
        self.runner = ModelRunner(loaded.model, self.kv_cache, self.device, StepSampler(self.sampler, self.guided),
                                  self.ranks)
        self.rank_reports = self.ranks.gather(rank_report(0, loaded.model, self.kv_cache)) if self.ranks else []
        self.requests: dict[str, Request] = {}
        self._in_flight: tuple[StepPlan, LaunchedStep, float] | None = None
        """Asynchronous scheduling: the launched step whose tokens are not collected yet, and its launch's seconds."""
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB) = %s", num_blocks, layout.block_size,
                    num_blocks * layout.bytes_per_block / GIB,
                    describe_capacity(num_blocks, layout.block_size, self.max_model_len, sched.max_num_seqs))
        if self._use_decode_graphs():
            self.runner.enable_decode_graphs(sched.max_num_seqs, self.max_model_len,
                                             compile=config.runner.compile_decode)
        elif config.runner.compile_decode and self.ranks is None:  # the padded decode path, compiled, no graphs
            self.runner.enable_decode_graphs(sched.max_num_seqs, self.max_model_len, capture=False, compile=True)
        if self.ranks is not None:
            self._log_ranks()
        if config.runner.cpu_decode_compile != "off":
            use_inductor_cache_in(nitro_cache_dir(config.model.model_cache_dir))
        self.row_decode = self.runner.enable_row_decode(config.runner.cpu_decode_compile)
        self.info = self._describe()

    def _use_decode_graphs(self) -> bool:
        runner = self.config.runner
        if self.device.type != "cuda" or not runner.cuda_graphs:
            return False
        if self.ranks is not None:  # every rank would have to replay its own graph in step: eager for now
            logger.info("decode CUDA graphs are off with --tensor-parallel-size")
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

    def _log_ranks(self) -> None:
        for report in self.rank_reports:
            logger.info("rank %d on %s: %s", report.rank, report.device, report.describe())
        logger.info("KV cache over %d ranks: %.2f GiB in all, each holding %d of the %d KV heads",
                    len(self.rank_reports), sum(r.kv_cache_bytes for r in self.rank_reports) / GIB,
                    self.kv_cache.layout.num_kv_heads, self.kv_cache.layout.num_kv_heads * len(self.rank_reports))
        if self.config.runner.async_scheduling:
            logger.info("asynchronous scheduling is off with --tensor-parallel-size (the ranks step in lockstep)")

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do for a model on one device)."""
        if self.ranks is not None:
            self.ranks.close()

    def _describe(self) -> EngineInfo:
        if self.device.type == "cuda":
            name = f"{self.device} ({torch.cuda.get_device_name(self.device)})"
            if self.config.model.device_map == "auto":
                name += " (layers spread with --device-map auto)"
        else:
            name = f"cpu ({torch.get_num_threads()} threads{' per rank' if self.ranks else ''})"
        if self.ranks is not None:
            name += f"; rank 0 of {self.ranks.world_size}"
        return EngineInfo(
            model_name=self.model_name, model_path=self.loaded.source_path, device=str(self.device),
            device_name=name, dtype=str(self.loaded.dtype).removeprefix("torch."),
            kv_cache_dtype=str(self.kv_cache.layout.dtype).removeprefix("torch."),
            quantization=self.loaded.quantization, kv_capacity_tokens=self.kv_cache.capacity_tokens,
            kv_blocks_total=self.kv_cache.num_blocks, kv_block_size=self.kv_cache.layout.block_size,
            max_num_seqs=self.scheduler.max_num_seqs, max_model_len=self.max_model_len,
            max_num_batched_tokens=self.config.scheduler.max_num_batched_tokens,
            embedding_size=self.embedding_size, eos_token_ids=self.loaded.eos_token_ids,
            packed_weights="" if self.loaded.cpu_weights.exact else self.loaded.cpu_weights.description,
            row_decode_compile="off" if self.row_decode is None else self.config.runner.cpu_decode_compile,
            tensor_parallel_size=self.config.model.tensor_parallel_size,
            ranks=[f"rank {r.rank} on {r.device}: {r.describe()}" for r in self.rank_reports],
            kv_cache_bytes=sum(r.kv_cache_bytes for r in self.rank_reports) or self.kv_cache.nbytes,
            max_step_time_s=self.scheduler.max_step_time_s,
        )

    # requests -------------------------------------------------------------------------------------

    def add_request(self, core_request: EngineCoreRequest) -> Request:
        """Queue a request; with a parent (a live request with the same prompt) it shares that prompt's KV."""
        request_id, params = core_request.request_id, core_request.params
        prompt = core_request.prompt_token_ids
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id}")
        check_context_length(len(prompt), params.max_tokens, self.max_model_len)
        if params.guided is not None:
            self.guided.compile(params.guided)  # an invalid grammar is a SamplingParamsError before anything is queued
        limit = self.max_model_len
        if params.max_tokens is not None:
            limit = min(limit, len(prompt) + params.max_tokens)
        request = Request(request_id, list(prompt), params, eos_token_ids=self.loaded.eos_token_ids,
                          max_total_tokens=limit, client=core_request.client)
        parent = self.requests.get(core_request.parent_id) if core_request.parent_id is not None else None
        if parent is not None:
            if parent.prompt_token_ids != request.prompt_token_ids:
                raise ValueError(f"request {request_id} has another prompt than its parent {parent.request_id}")
            request.parent = parent
        self.scheduler.add(request)
        self.guided.attach(request)
        self.requests[request_id] = request
        return request

    def finish(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> CoreOutput | None:
        """End a request now (an abort, or a stop string the client found); None if it is not live."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self.scheduler.finish(request, reason)
        self._forget(request_id)
        return self._output(request, [])

    @property
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    # the step -------------------------------------------------------------------------------------

    def step(self) -> list[CoreOutput]:
        """One step. A failure that belongs to one request (its sampling, non-finite logits) ends that request
        alone with an error output; a failed forward raises for the caller."""
        if self.config.runner.async_scheduling and self.ranks is None:
            return self._step_overlapped()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        started = time.perf_counter()
        try:
            result = self.runner.execute_and_sample(plan.for_runner)
        except torch.OutOfMemoryError:
            if not self._back_off_after_oom():
                raise
            return []  # nothing of the step was kept (no request advanced): it runs again, smaller
        self.scheduler.observe_step(plan, time.perf_counter() - started)
        return self._outputs(plan, result, assumed=False)

    def _step_overlapped(self) -> list[CoreOutput]:
        """Asynchronous scheduling: plan and launch step N+1 while step N runs, then collect N's tokens. The plan
        counts N's tokens as pending; N+1 reads them on the device. A step with a row that is not a plain argmax
        (penalties, grammars, logprobs, sampling...) first collects N and samples at once."""
        outputs: list[CoreOutput] = []
        previous = self._in_flight
        self._in_flight = None
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return self._collect(previous) if previous is not None else []
        overlap = self._can_overlap(plan)
        if previous is not None and not overlap:
            outputs += self._collect(previous)
            previous = None
        self.scheduler.assume_progress(plan)
        started = time.perf_counter()
        try:
            launched = self.runner.launch(plan.for_runner, overlap, previous[1] if previous is not None else None)
        except torch.OutOfMemoryError:
            if previous is not None:
                outputs += self._collect(previous)
            self.scheduler.rewind(plan)
            if not self._back_off_after_oom():
                raise
            return outputs
        launch_s = time.perf_counter() - started
        if previous is not None:
            outputs += self._collect(previous)
        if launched.output is None:
            self._in_flight = (plan, launched, launch_s)
        else:
            self.scheduler.observe_step(plan, launch_s)
            outputs += self._outputs(plan, launched.output, assumed=True)
        return outputs

    def _collect(self, in_flight: tuple[StepPlan, LaunchedStep, float]) -> list[CoreOutput]:
        """A step's time is its launch (the whole forward on a CPU) plus the wait for its tokens (a GPU's rest)."""
        plan, launched, launch_s = in_flight
        started = time.perf_counter()
        result = self.runner.collect(launched)
        self.scheduler.observe_step(plan, launch_s + time.perf_counter() - started)
        return self._outputs(plan, result, assumed=True)

    @staticmethod
    def _can_overlap(plan: StepPlan) -> bool:
        for item in plan.scheduled:
            if not item.samples:
                continue
            request = item.request
            start = request.params.plain_greedy_from
            if (start is None or request.params.guided is not None
                    or request.num_output_tokens + request.num_pending_tokens < start):
                return False
        return True

    def _outputs(self, plan: StepPlan, result: ModelRunnerOutput, assumed: bool) -> list[CoreOutput]:
        """The scheduler learns the step's tokens; one output per request that sampled, failed or ended."""
        failed = [(self.requests[request_id], error) for request_id, error in result.failed.items()
                  if request_id in self.requests]
        for request, _ in failed:
            self.scheduler.finish(request, FinishReason.ABORT)
        self.scheduler.update(plan, {request_id: token.token_id for request_id, token in result.sampled.items()},
                              assumed)
        outputs = [self._fail(request, error) for request, error in failed]
        for request_id, token in result.sampled.items():
            if request_id not in self.requests:
                continue  # ended while its step was in flight: the token is dropped
            request = self.requests[request_id]
            ended_on_stop_token = request.finish_reason is FinishReason.STOP
            if request_id in result.grammar_complete:  # complete structure; a no-op when a stop token ended it
                self.scheduler.finish(request, FinishReason.STOP)
            logprobs = [token.logprob] if token.logprob is not None else None
            outputs.append(self._output(request, [token.token_id], logprobs, ended_on_stop_token))
            if request.is_finished:
                self._forget(request_id)
        return outputs

    def expire_requests(self, now: float | None = None) -> list[CoreOutput]:
        """End the requests older than --request-timeout with finish_reason 'length' and what they produced."""
        timeout = self.config.server.request_timeout
        if not timeout:
            return []
        now = time.monotonic() if now is None else now
        outputs = []
        for request_id, request in list(self.requests.items()):
            if now - request.arrival_time <= timeout:
                continue
            self.scheduler.finish(request, FinishReason.LENGTH)
            outputs.append(self._output(request, []))
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

    def fail_running(self, exc: Exception) -> list[CoreOutput]:
        """A step failed as a whole (not a device error): every running request ends with an error output."""
        self._in_flight = None
        failed = list(self.scheduler.running)
        for request in failed:
            self.scheduler.finish(request, FinishReason.ABORT)
        return [self._fail(request, type(exc).__name__) for request in failed]

    def _fail(self, request: Request, error: str) -> CoreOutput:
        output = self._output(request, [])
        output.error = error
        self._forget(request.request_id)
        return output

    def _forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        self.sampler.release(request_id)
        self.guided.release(request_id)

    @staticmethod
    def _output(request: Request, token_ids: list[int], logprobs: list | None = None,
                ended_on_stop_token: bool = False) -> CoreOutput:
        reason = request.finish_reason if request.is_finished else None
        return CoreOutput(request.request_id, token_ids, reason, ended_on_stop_token, request.num_cached_tokens,
                          logprobs, None, request.first_scheduled_time)

    def stats(self) -> EngineStats:
        bm, sched = self.block_manager, self.scheduler
        return EngineStats(
            num_running=len(sched.running), num_waiting=sched.num_waiting, kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used_blocks, prefix_cache_query_tokens=bm.stats.prefix_query_tokens,
            prefix_cache_hit_tokens=bm.stats.prefix_hit_tokens, num_preemptions=sched.stats.num_preemptions,
            num_steps=sched.stats.num_steps, decode_compiling=self.row_decode is not None and self.row_decode.compiling,
        )

    # embeddings -----------------------------------------------------------------------------------

    @property
    def embedding_size(self) -> int:
        config = self.loaded.model.config
        return (config.get_text_config() if hasattr(config, "get_text_config") else config).hidden_size

    def embed(self, token_id_lists: list[list[int]]) -> list[list[float]]:
        """One unit-length vector per input: its mean-pooled final hidden states. No KV cache is read or written,
        so running requests are untouched; call it between steps."""
        from nitro_torch.runner.embedder import Embedder

        for ids in token_id_lists:
            if not ids or len(ids) > self.max_model_len:
                raise ValueError(f"embedding inputs need 1 to {self.max_model_len} tokens, not {len(ids)}")
        embedder = getattr(self, "_embedder", None)
        if embedder is None:
            embedder = self._embedder = Embedder(self.loaded.model, self.kv_cache, self.device,
                                                 self.config.scheduler.max_num_batched_tokens)
        if self.ranks is not None:  # every rank runs the same forwards (their collectives must meet)
            self.ranks.broadcast(RunEmbed(token_id_lists))
        return embedder.embed(token_id_lists).tolist()
