"""StepPlan -> packed tensors -> one HF forward -> logits of the requests that sample this step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from nitro_torch.engine.request import Request
from nitro_torch.engine.scheduler import ScheduledRequest, StepPlan
from nitro_torch.runner.attention import AttentionMetadata, PrefillChunk, step_context
from nitro_torch.runner.kv_cache import KVCache


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    logits_indices: torch.Tensor
    sampling_requests: list[Request]


class ModelRunner:
    def __init__(self, model: PreTrainedModel, kv_cache: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.layout.block_size

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> tuple[torch.Tensor | None, list[Request]]:
        """Run the step; return logits [R, V] of the requests that sample, in the returned order."""
        self.kv_cache.copy_blocks(plan.block_copies)
        inputs = self.prepare(plan)
        with step_context(inputs.metadata):
            keep = inputs.logits_indices if inputs.sampling_requests else 1
            out = self.model(
                input_ids=inputs.input_ids[None],
                position_ids=inputs.positions[None],
                use_cache=False,
                logits_to_keep=keep,
            )
        if not inputs.sampling_requests:
            return None, []
        return out.logits[0], inputs.sampling_requests

    def prepare(self, plan: StepPlan) -> StepInputs:
        decodes = [s for s in plan.scheduled if s.num_tokens == 1]
        prefills = [s for s in plan.scheduled if s.num_tokens > 1]
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_rows: list[int] = []
        sampling: list[Request] = []
        for item in decodes:
            pos = item.start_position
            request = item.request
            token_ids.append(request.token_at(pos))
            positions.append(pos)
            slots.append(request.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size)
            if item.samples:
                last_rows.append(len(token_ids) - 1)
                sampling.append(request)
        chunks: list[PrefillChunk] = []
        for item in prefills:
            chunks.append(self._add_prefill(item, token_ids, positions, slots))
            if item.samples:
                last_rows.append(len(token_ids) - 1)
                sampling.append(item.request)
        metadata = AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=self._tensor(slots),
            num_decode_tokens=len(decodes),
            prefills=chunks,
        )
        if decodes:
            metadata.decode_block_tables = self._block_table_tensor([d.request for d in decodes])
            metadata.decode_context_lens = self._tensor([d.start_position + 1 for d in decodes])
        return StepInputs(self._tensor(token_ids), self._tensor(positions), metadata,
                          self._tensor(last_rows), sampling)

    def _add_prefill(self, item: ScheduledRequest, token_ids: list[int], positions: list[int],
                     slots: list[int]) -> PrefillChunk:
        request, start, count = item.request, item.start_position, item.num_tokens
        query_start = len(token_ids)
        all_ids = request.all_token_ids
        token_ids.extend(all_ids[start:start + count])
        bs = self.block_size
        blocks = request.block_ids
        for pos in range(start, start + count):
            positions.append(pos)
            slots.append(blocks[pos // bs] * bs + pos % bs)
        num_blocks = -(-(start + count) // bs)
        return PrefillChunk(query_start, count, start + count, self._tensor(blocks[:num_blocks]))

    def _block_table_tensor(self, requests: list[Request]) -> torch.Tensor:
        width = max(len(r.block_ids) for r in requests)
        rows = [r.block_ids + [0] * (width - len(r.block_ids)) for r in requests]
        return self._tensor(rows)

    def _tensor(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
