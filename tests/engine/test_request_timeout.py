"""--request-timeout: a request older than the limit ends with finish_reason 'length' and what it produced."""

from __future__ import annotations

from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.engine.outputs import FinishReason
from nitro_torch.models.loader import load_model
from nitro_torch.runner.attention import register_paged_attention
from nitro_torch.sampling import SamplingParams


def make_engine(model_dir: str, timeout: float) -> LLMEngine:
    config = build_config({"model": model_dir, "device": "cpu", "num_kv_blocks": 64, "max_num_seqs": 1,
                           "request_timeout": timeout}, env={})
    return LLMEngine(load_model(config.model, attn_implementation=register_paged_attention()), config)


def test_running_and_waiting_requests_end_at_the_timeout(tiny_model_dir: str) -> None:
    engine = make_engine(tiny_model_dir, timeout=30.0)
    long = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
    running = engine.add_request("running", list(range(300, 310)), long)
    waiting = engine.add_request("waiting", list(range(400, 410)), long)  # max_num_seqs 1: it waits
    produced = []
    for _ in range(4):
        produced += [o for o in engine.step() if o.request_id == "running"]
    assert not engine.expire_requests(now=running.arrival_time + 29.0)

    outputs = {o.request_id: o for o in engine.expire_requests(now=running.arrival_time + 31.0)}
    assert set(outputs) == {"running", "waiting"}
    assert outputs["running"].finished and outputs["running"].finish_reason is FinishReason.LENGTH
    assert outputs["running"].num_output_tokens == len(produced) == 4
    assert outputs["waiting"].num_output_tokens == 0 and waiting.is_finished
    assert not engine.has_unfinished_requests and engine.block_manager.num_used_blocks == 0
    assert engine.expire_requests(now=running.arrival_time + 60.0) == []


def test_no_timeout_by_default(tiny_model_dir: str) -> None:
    engine = make_engine(tiny_model_dir, timeout=0.0)
    request = engine.add_request("r", [300, 301], SamplingParams(max_tokens=5, temperature=0))
    assert engine.expire_requests(now=request.arrival_time + 1e9) == []
