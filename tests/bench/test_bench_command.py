"""`nitro-torch bench`: against a real `nitro-torch serve` over HTTP (--url), in-process, the scripts/ wrappers,
and an unreachable server. Every run is a real subprocess on the real default model (or a tiny random init)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nitro_torch.bench.http_client import StreamResult
from nitro_torch.bench.http_system import latency_stats
from tests.server.conftest import free_port, server_process

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SERVE_OPTIONS = ("--max-num-seqs", "8", "--max-model-len", "1024", "--log-level", "warning")
WARMUP_REQUESTS, WARMUP_TOKENS = 1, 4  # http_system.ServerSystem.start: one untimed request of 4 tokens
RUN_TIMEOUT_S = 240


def bench(*args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, script] if script else [sys.executable, "-m", "nitro_torch.cli", "bench"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=REPO, timeout=RUN_TIMEOUT_S,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def metric_sum(base_url: str, name: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=30).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with server_process(*SERVE_OPTIONS) as (_, base_url, _):
        yield base_url


def test_url_chat_workload_streams_exactly_max_tokens(server: str, tmp_path: Path) -> None:
    requests_before = metric_sum(server, "nitro:request_success_total")
    tokens_before = metric_sum(server, "nitro:generation_tokens_total")
    out = tmp_path / "server.json"
    result = bench("--url", server, "--workload", "chat-64", "--limit", "4", "--max-tokens", "8", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(r"^server\s+4\s+[\d.]+", result.stdout, re.M), result.stdout  # the tok/s table
    assert "TTFT p50/p90 (ms)" in result.stdout and "ITL p50 (ms)" in result.stdout
    assert "no baseline in this run" in result.stdout

    doc = json.loads(out.read_text())
    assert doc["requests"]["count"] == 4
    requested = doc["requests"]["max_tokens"]
    assert requested == 4 * 8  # every chat-64 request asks for at least 16 tokens: all capped at 8
    server_result = doc["systems"]["server"]
    assert server_result["skipped"] is None
    (run,) = server_result["runs"]
    assert run["tokens"] == requested
    latency = run["latency"]
    assert latency["errors"] == 0 and latency["requests"] == 4
    assert latency["completion_tokens"] == requested  # ignore_eos: exactly max_tokens each, from the usage chunks
    assert latency["prompt_tokens"] > 0
    assert 0 < latency["ttft_p50_ms"] <= latency["ttft_p90_ms"]
    assert 0 < latency["e2e_p50_s"] <= latency["e2e_p90_s"] and latency["itl_p50_ms"] > 0
    assert doc["server"]["model"] == "SmolLM2-135M-Instruct"

    # the server counted those requests (and the warm-up), and generated exactly those tokens
    assert metric_sum(server, "nitro:request_success_total") - requests_before == 4 + WARMUP_REQUESTS
    assert metric_sum(server, "nitro:generation_tokens_total") - tokens_before == requested + WARMUP_TOKENS


def test_url_token_id_workload_uses_completions_with_concurrency(server: str, tmp_path: Path) -> None:
    out = tmp_path / "w256.json"
    result = bench("--url", server, "--workload", "w256", "--shape", "tiny", "--limit", "3", "--max-tokens", "4",
                   "--concurrency", "2", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "token-id prompts" in result.stdout and "at most 2 in flight" in result.stdout
    latency = json.loads(out.read_text())["systems"]["server"]["latency"]
    assert latency["errors"] == 0 and latency["completion_tokens"] == 3 * 4


def test_in_process_run_with_ratios_and_the_script_wrappers(tmp_path: Path) -> None:
    out = tmp_path / "inproc.json"
    result = bench("--workload", "w256", "--shape", "tiny", "--limit", "2", "--max-tokens", "8",
                   "--systems", "nitro,hf-static", "--no-roofline", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^nitro\s+2\s+[\d.]+ .* [\d.]+x", result.stdout, re.M), result.stdout  # ratio to hf-static
    doc = json.loads(out.read_text())
    assert doc["requests"]["max_tokens"] == 16
    assert [run["tokens"] for run in doc["systems"]["nitro"]["runs"]] == [16]
    assert doc["systems"]["nitro"]["vs_baselines"]["hf-static"] > 0

    summary = bench(str(out), script="scripts/bench_summary.py")  # gpu_check.sh's last step, on a real result
    assert summary.returncode == 0, summary.stderr
    assert re.search(r"^w256 tiny\s+nitro\s+2\s", summary.stdout, re.M), summary.stdout

    usage = bench("--help", script="scripts/bench.py")
    assert usage.returncode == 0, usage.stderr
    assert "--workload" in usage.stdout and "--baseline-limit" in usage.stdout and "--url" in usage.stdout


def test_decode_b1_on_the_cpu_runs_the_embedded_model_one_request_at_a_time(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    result = bench("--workload", "decode-b1", "--limit", "2", "--max-tokens", "6", "--repeats", "1", "--check",
                   "--no-roofline", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "model SmolLM2-135M-Instruct" in result.stdout
    assert re.search(r"^time per output token .*: nitro [\d.]+ ms, nitro-fp32 [\d.]+ ms, hf-static [\d.]+ ms$",
                     result.stdout, re.M), result.stdout
    assert "check: nitro-fp32 vs hf-static: 2/2 requests identical, 12/12 tokens before the first difference" \
        in result.stdout  # float weights: token-identical
    doc = json.loads(out.read_text())
    assert set(doc["systems"]) == {"nitro", "nitro-fp32", "hf-static"}
    assert [run["tokens"] for run in doc["systems"]["nitro"]["runs"]] == [12]
    packed = next(c for c in doc["checks"] if c["system"] == "nitro")
    assert packed["lengths"] == [6, 6]  # its leading-token agreement is measured, whatever it is


def test_unreachable_url_is_one_line_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = bench("--url", url, "--workload", "chat-64", "--limit", "1")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"nitro-torch bench: error: cannot reach the server at {url}: "
                                                   "Connection refused"]
    assert result.stdout == ""


def test_latency_stats_over_streams() -> None:
    streams = [
        StreamResult(ok=True, ttft_s=0.1, e2e_s=1.0, gaps_s=[0.01, 0.03], prompt_tokens=5, completion_tokens=3),
        StreamResult(ok=True, ttft_s=0.3, e2e_s=2.0, gaps_s=[0.02], prompt_tokens=7, completion_tokens=None,
                     text_chunks=2),
        StreamResult(ok=False, error="HTTP 400: no"),
    ]
    stats = latency_stats(streams, wall_s=2.0)
    assert stats["requests"] == 3 and stats["errors"] == 1
    assert stats["prompt_tokens"] == 12 and stats["completion_tokens"] == 5  # no usage chunk: the text chunks
    assert stats["req_s"] == pytest.approx(1.0)
    assert stats["ttft_p50_ms"] == pytest.approx(200) and stats["ttft_p90_ms"] == pytest.approx(280)
    assert stats["itl_p50_ms"] == pytest.approx(20) and stats["e2e_p90_s"] == pytest.approx(1.9)
