"""A step as plain data (SchedulerOutput) -> the runner's request states -> packed tensors -> one HF forward (or a
decode-graph replay) -> logits of the requests that sample -> their sampled tokens (`execute_and_sample`).

The runner keeps its own state of each request it runs (`requests`): the scheduler sends a request in full once,
then only its new blocks; the runner appends the tokens it samples itself.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from nitro_torch.models.lean_decoder import LeanDecoder, lean_decoder_for
from nitro_torch.runner.attention import AttentionMetadata, PrefillChunk, step_context
from nitro_torch.runner.cuda_graphs import DecodeGraphs, DecodeInputs, capture_sizes
from nitro_torch.runner.input_batch import HostBatch
from nitro_torch.runner.kv_cache import KVCache
from nitro_torch.runner.parallel.group import RankGroup
from nitro_torch.runner.parallel.messages import RunStep
from nitro_torch.runner.persistent_batch import PersistentBatch
from nitro_torch.runner.row_decode import RowDecode, RowDecodeMode, key_slots
from nitro_torch.runner.sampler import INVALID_TOKEN, SampledToken
from nitro_torch.runner.scheduler_output import SchedulerOutput
from nitro_torch.runner.sequence import SequenceState
from nitro_torch.runner.staging import InputStaging
from nitro_torch.runner.step_sampling import NON_FINITE_LOGITS, ModelRunnerOutput, StepSampler

logger = logging.getLogger("nitro_torch.runner")


@dataclass
class TokensInFlight:
    device_ids: torch.Tensor
    """[R] sampled ids on the device, for the next step's inputs."""
    host: torch.Tensor
    """Their copy in host memory, valid once `copied` has passed."""
    copied: torch.cuda.Event | None

    def host_ids(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.tolist()


@dataclass
class LaunchedStep:
    request_ids: list[str]
    """The requests that sample in the step, in row order."""
    tokens: TokensInFlight | None
    output: ModelRunnerOutput | None = None
    """Set once the tokens are known on the host."""


def _fill_pending(token_ids: torch.Tensor, batch: HostBatch, previous: LaunchedStep | None) -> None:
    """Write into the step's input ids, on the device, the tokens the step in flight sampled for its rows."""
    if previous is None or previous.tokens is None:
        raise RuntimeError("a step reads tokens of a step in flight, but none was given")
    sampled = previous.tokens.device_ids.clamp_min(0)  # a broken row's flag must not reach the embedding
    rows = batch.pending_rows
    if batch.pending_ids == previous.request_ids and rows == list(range(len(rows))):
        token_ids[:len(rows)] = sampled  # the same requests in the same order (most decode steps)
        return
    index_of = {request_id: i for i, request_id in enumerate(previous.request_ids)}
    sources = torch.tensor([index_of[request_id] for request_id in batch.pending_ids], device=sampled.device)
    token_ids[torch.tensor(rows, device=token_ids.device)] = sampled[sources]


class ModelRunner:
    def __init__(self, model: PreTrainedModel, kv_cache: KVCache, device: torch.device,
                 sampling: StepSampler | None = None, peers: RankGroup | None = None) -> None:
        self.model = model
        self.peers = peers
        """The other ranks of a tensor-parallel model (this runner is rank 0): each step goes to them first."""
        self._sampled_for_peers: dict[str, int] = {}
        self.forward = lean_decoder_for(model) or model
        """What runs a step: the lean forward for CPU-packed weights, else the model itself."""
        self.sampling = sampling
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.layout.block_size
        self.staging = InputStaging(device)
        self.graphs: DecodeGraphs | None = None
        self.row_decode: RowDecode | None = None
        """The compiled step of a request decoding alone on a CPU (packed weights), once it is ready."""
        self.requests = PersistentBatch(self.block_size)
        self.last_inputs: HostBatch | None = None
        """The inputs `execute` ran last (what the sampler may know of them without asking each row)."""
        self._pinned: list[torch.Tensor | None] = [None, None]
        """Two pinned buffers for sampled ids, taken in turn: one step's copy is in flight while the other's is read."""
        self._pinned_turn = 0

    def enable_decode_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool = True,
                             compile: bool = False) -> None:
        """Run pure-decode steps through DecodeGraphs (captured on CUDA; `capture=False`: same path, eager).

        `compile`: the decode forward is torch.compile'd (fixed shapes: one compilation per padded batch size, all
        paid here, at start-up), and on CUDA the graphs are captured from the compiled code (gpt-fast's recipe)."""
        max_blocks = -(-max_model_len // self.block_size)
        forward = self._logits_of_all_rows
        if compile:
            sizes = len(capture_sizes(max_num_seqs))
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * sizes + 2)
            torch._dynamo.config.accumulated_cache_size_limit = max(
                torch._dynamo.config.accumulated_cache_size_limit, 4 * sizes + 4)
            forward = torch.compile(forward, dynamic=False)  # type: ignore[assignment]
        graphs = DecodeGraphs(forward, self.kv_cache, max_num_seqs, max_blocks, self.device, capture=capture)
        if capture or compile:
            started = time.monotonic()
            try:
                with torch.inference_mode():
                    if capture:
                        graphs.capture_all()
                    else:  # twice: the first pass also allocates what the attention keeps between steps
                        graphs.warm_all()
                        graphs.warm_all()
            except Exception:  # a model op that cannot be captured or compiled: serve eagerly rather than not at all
                logger.exception("decode %s failed; decode steps run eagerly", "graph capture" if capture else
                                 "compilation")
                return
            logger.info("%s decode steps for batch sizes %s in %.1f s",
                        "captured" + (" compiled" if compile else "") if capture else "compiled", graphs.sizes,
                        time.monotonic() - started)
        self.graphs = graphs

    def enable_row_decode(self, mode: RowDecodeMode) -> RowDecode | None:
        """Compile the one-request decode step (CPU, lean forward of packed weights only)."""
        if mode == "off" or self.device.type != "cpu" or not isinstance(self.forward, LeanDecoder):
            return None
        self.row_decode = RowDecode(self.forward, self.kv_cache)
        self.row_decode.start(mode)
        return self.row_decode

    def execute_and_sample(self, step: SchedulerOutput) -> ModelRunnerOutput:
        """Apply the step's changes, run its forward, sample, and advance the states by what was computed and
        sampled: what each sampling request drew, by request id. A forward that raises leaves the states as the
        scheduler sees them (applied, not advanced), so the step can be planned again."""
        output = self.launch(step, overlap=False).output
        assert output is not None  # a step that does not overlap samples at once
        return output

    def launch(self, step: SchedulerOutput, overlap: bool, previous: LaunchedStep | None = None) -> LaunchedStep:
        """Asynchronous scheduling: queue the step's forward and, with `overlap` (every sampling row a plain
        argmax), its greedy pick on the device, and return without waiting; `collect` gets the tokens. Rows whose
        token `previous` (the step still in flight) sampled read it on the device. Without `overlap` the step
        samples at once on the host (`previous` must have been collected)."""
        assert self.sampling is not None, "a runner that samples needs a StepSampler"
        if self.peers is not None:
            self.peers.broadcast(RunStep(step, self._sampled_for_peers))
        self.requests.apply(step)
        self.last_inputs = None
        try:
            logits, rows = self.execute(step, previous)
        except Exception as exc:
            if self.peers is not None:  # the ranks are out of step: no later step can work
                raise self.peers.check_step(exc) from exc
            raise
        if overlap and logits is not None:
            request_ids = [row.request_id for row in rows]
            with torch.inference_mode():
                launched = LaunchedStep(request_ids, self._tokens_to_host(self.sampling.sampler.greedy_ids(logits)))
            self.requests.advance(step, pending=request_ids)
            return launched
        hint = self.last_inputs.all_plain_greedy if self.last_inputs is not None else None
        with torch.inference_mode():
            output = self.sampling.sample(logits, rows, hint)
        sampled = {request_id: token.token_id for request_id, token in output.sampled.items()}
        self.requests.record(step, sampled)
        self._sampled_for_peers = sampled
        return LaunchedStep([row.request_id for row in rows], None, output)

    def collect(self, launched: LaunchedStep) -> ModelRunnerOutput:
        """Wait for a launched step's tokens; they join their requests."""
        if launched.output is not None:
            return launched.output
        assert launched.tokens is not None
        output = ModelRunnerOutput()
        sampled: dict[str, int] = {}
        for request_id, token_id in zip(launched.request_ids, launched.tokens.host_ids()):
            if token_id == INVALID_TOKEN:
                logger.error("non-finite logits for %s; ending it", request_id)
                output.failed[request_id] = NON_FINITE_LOGITS
            else:
                sampled[request_id] = token_id
                output.sampled[request_id] = SampledToken(token_id, None)
        self.requests.append(sampled, were_pending=True)
        launched.output = output
        return output

    def _tokens_to_host(self, token_ids: torch.Tensor) -> TokensInFlight:
        """Start copying a step's sampled ids to (pinned) host memory behind the step's kernels."""
        if token_ids.device.type != "cuda":
            return TokensInFlight(token_ids, token_ids, None)
        self._pinned_turn ^= 1
        buffer = self._pinned[self._pinned_turn]
        if buffer is None or buffer.numel() < token_ids.numel():
            buffer = torch.empty(max(256, token_ids.numel()), dtype=token_ids.dtype, pin_memory=True)
            self._pinned[self._pinned_turn] = buffer
        host = buffer[:token_ids.numel()]
        host.copy_(token_ids, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return TokensInFlight(token_ids, host, copied)

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput, previous: LaunchedStep | None = None
                ) -> tuple[torch.Tensor | None, list[SequenceState]]:
        """Run the step on the applied states; return logits [R, V] of the requests that sample, in the returned
        order. It changes no state, so a step can be run more than once (tests compare kernels that way)."""
        self.kv_cache.copy_blocks(step.block_copies)
        batch = self.last_inputs = self.requests.inputs(step)
        tensors = self.upload(batch)
        if batch.pending_rows:
            _fill_pending(tensors["token_ids"], batch, previous)
        if self._fits_graph(batch):
            decode = DecodeInputs(tensors["token_ids"], tensors["positions"], tensors["slots"],
                                  tensors["decode_tables"], tensors["decode_context_lens"])
            logits = self.graphs.run(decode)  # type: ignore[union-attr]
            if not batch.sampling:
                return None, []
            return logits.index_select(0, tensors["logits_rows"]), batch.sampling
        if self.row_decode is not None and self.row_decode.ready and batch.is_pure_decode and batch.num_decodes == 1:
            context = key_slots(batch.decode_tables[0], int(batch.decode_context_lens[0]), batch.decode_first_block,
                                self.block_size)
            row_logits = self.row_decode.logits(tensors["token_ids"], tensors["positions"], tensors["slots"], context)
            if row_logits is not None:
                return (row_logits, batch.sampling) if batch.sampling else (None, [])
        with step_context(self.metadata(batch, tensors)):
            keep = tensors["logits_rows"] if batch.sampling else 1
            out = self.forward(
                input_ids=tensors["token_ids"][None],
                position_ids=tensors["positions"][None],
                use_cache=False,
                logits_to_keep=keep,
            )
        if not batch.sampling:
            return None, []
        return out.logits[0], batch.sampling

    def _fits_graph(self, batch: HostBatch) -> bool:
        if self.graphs is None or not batch.is_pure_decode:
            return False
        return self.graphs.can_run(batch.num_decodes, batch.decode_tables.shape[1])

    def _logits_of_all_rows(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.forward(input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=0)
        return out.logits[0]

    def upload(self, batch: HostBatch) -> dict[str, torch.Tensor]:
        arrays: dict[str, object] = {"token_ids": batch.token_ids, "positions": batch.positions, "slots": batch.slots,
                                     "logits_rows": batch.logits_rows}
        if batch.num_decodes:
            arrays["decode_tables"] = batch.decode_tables
            arrays["decode_context_lens"] = batch.decode_context_lens
        if batch.prefill_query_lens:
            arrays["prefill_tables"] = batch.prefill_tables
            arrays["prefill_cu_query_lens"] = batch.prefill_cu_query_lens
            arrays["prefill_context_lens"] = batch.prefill_context_lens
        return self.staging.upload(arrays)  # type: ignore[arg-type]

    def metadata(self, batch: HostBatch, tensors: dict[str, torch.Tensor]) -> AttentionMetadata:
        metadata = AttentionMetadata(kv_cache=self.kv_cache, slot_mapping=tensors["slots"],
                                     num_decode_tokens=batch.num_decodes)
        if batch.num_decodes:
            metadata.decode_block_tables = tensors["decode_tables"]
            metadata.decode_context_lens = tensors["decode_context_lens"]
            if batch.num_decodes == 1:
                metadata.single_decode_len = max(1, int(batch.decode_context_lens[0]))
                metadata.single_decode_first_block = batch.decode_first_block
                if batch.num_tokens == 1:
                    metadata.single_decode_slot = int(batch.slots[0])
        if batch.prefill_query_lens:
            tables = tensors["prefill_tables"]
            metadata.prefills = [
                PrefillChunk(start, length, context, tables[i, : -(-context // self.block_size)])
                for i, (start, length, context) in enumerate(zip(
                    batch.prefill_query_starts, batch.prefill_query_lens, batch.prefill_context_lens))
            ]
            metadata.prefill_block_tables = tables
            metadata.prefill_cu_query_lens = tensors["prefill_cu_query_lens"]
            metadata.prefill_context_lens = tensors["prefill_context_lens"]
        return metadata
