"""Load against a real `nitro-torch serve` process on the default model, through scripts/load_test.py: hundreds of
streaming chats at once with clients going away mid-stream and bad bodies among them, and overload beyond
--max-queued-requests. Nothing is lost, nothing is 5xx, nothing leaks, and the server still answers."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import LIVE_MAX_MODEL_LEN, server_process

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "load_test.py"
CLIENTS = 256
MAX_TOKENS = 8
OVERLOAD_MAX_TOKENS = 64
"""Long enough that the admitted requests still fill the queue when the late probes arrive, on any machine."""
BAD_BODIES = 16


def _load_test_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("load_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


load_test = _load_test_module()


def _run(base_url: str, **options) -> dict:
    started = time.monotonic()
    stats = load_test.run(load_test.Options(base_url=base_url, timeout_s=300, idle_timeout_s=60, **options))
    print(f"\n{load_test.format_report(stats)}\n  (run took {time.monotonic() - started:.1f} s)")
    return stats


def test_many_streams_with_disconnects_and_bad_bodies():
    with server_process("--max-num-seqs", "64", "--max-num-batched-tokens", "1024", "--max-model-len",
                        str(LIVE_MAX_MODEL_LEN), "--log-level", "warning") as (process, base, log):
        stats = _run(base, clients=CLIENTS, max_tokens=MAX_TOKENS, disconnect_fraction=0.2, disconnect_after=3,
                     bad_bodies=BAD_BODIES)
        assert stats["status_5xx"] == 0
        assert stats["disconnect_planned"] == CLIENTS // 5
        # a client meant to go away may see its stream end first; every other one completes
        assert stats["completed"] + stats["disconnected"] == CLIENTS
        assert stats["completed"] >= CLIENTS - stats["disconnect_planned"]
        assert stats["usage_problems"] == []
        assert stats["bad_body_4xx"] == BAD_BODIES
        assert stats["idle"], stats["idle_gauges"]
        assert stats["still_serving"], stats["still_serving_detail"]
        assert stats["ok"], stats["failures"]
        assert process.poll() is None
        assert "Traceback" not in log.read_text()


def test_overload_is_429_and_every_admitted_request_completes():
    with server_process("--max-num-seqs", "8", "--max-queued-requests", "8", "--max-model-len",
                        str(LIVE_MAX_MODEL_LEN), "--log-level", "warning") as (process, base, log):
        stats = _run(base, clients=64, max_tokens=OVERLOAD_MAX_TOKENS, overload=True, max_refusal_s=1.0,
                     probe_delay_s=1.0)
        assert stats["status_5xx"] == 0
        assert stats["status_429"] > 0
        assert stats["refusals_without_retry_after"] == 0
        assert stats["probe_429_s"], "the late probes found room: the queue was not full"
        assert max(stats["probe_429_s"]) < 1.0  # a 429 alone, on a full queue
        assert stats["completed"] + stats["status_429"] == 64 + stats["probes_sent"]  # every admitted one completed
        assert stats["completed"] >= 8  # at least the running slots were admitted
        assert stats["idle"], stats["idle_gauges"]
        assert stats["ok"], stats["failures"]
        assert "Traceback" not in log.read_text()
