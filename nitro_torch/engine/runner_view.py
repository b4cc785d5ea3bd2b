"""What the runner learns of each step: plain data (a SchedulerOutput), never the scheduler's requests.

A request goes over in full the first time it is scheduled (again after a preemption), then only the blocks it
gained; requests that left the runner's batch (ended or preempted) are named once, with the next step."""

from __future__ import annotations

from nitro_torch.engine.request import Request
from nitro_torch.engine.step_plan import StepPlan
from nitro_torch.runner.scheduler_output import NewRequest, SchedulerOutput


class RunnerView:
    def __init__(self) -> None:
        self._left: list[str] = []
        """Requests the runner holds that ended or were preempted since the last step: it drops them."""

    def leave(self, request: Request) -> None:
        if request.num_blocks_in_runner is not None:
            self._left.append(request.request_id)
            request.num_blocks_in_runner = None

    def step(self, plan: StepPlan) -> SchedulerOutput:
        step = SchedulerOutput(finished_request_ids=self._left, block_copies=plan.block_copies)
        self._left = []
        counts = step.num_scheduled_tokens
        for item in plan.scheduled:
            request = item.request
            counts[request.request_id] = item.num_tokens
            known, num_blocks = request.num_blocks_in_runner, len(request.block_ids)
            if known is None:
                step.new_requests.append(NewRequest(
                    request.request_id, request.all_token_ids, request.num_prompt_tokens, request.params,
                    request.eos_token_ids, list(request.block_ids), request.num_computed_tokens))
            elif num_blocks > known:
                step.new_block_ids[request.request_id] = request.block_ids[known:]
            request.num_blocks_in_runner = num_blocks
        return step
