"""What `nitro-torch serve` prints while it starts: progress bars, then one block whose URLs answer and whose
figures are the engine's own."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from nitro_torch.bench.http_system import wait_for_decode_compile
from nitro_torch.server.startup import WILDCARD_HOSTS, lan_ipv4_addresses, served_urls
from nitro_torch.sse_client import Server
from tests.server.conftest import server_process

BLOCK_START = "is ready."
OPTIONS = ("--max-model-len", "1024", "--kv-cache-memory", "0.05", "--max-num-seqs", "6", "--log-level", "warning",
           "--cpu-weights", "auto", "--cpu-decode-compile", "background")  # the defaults, over the suite's


def startup_block(log_path: Path, timeout_s: float = 30.0) -> dict[str, list[str]]:
    """The printed block as {label: [values]} (continuation lines add values to the label above)."""
    deadline = time.monotonic() + timeout_s
    while BLOCK_START not in log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.2)
    text = log_path.read_text(errors="replace")
    rows: dict[str, list[str]] = {}
    label = ""
    for line in text[text.index(BLOCK_START):].splitlines()[1:]:
        match = re.match(r"^  (\S[^:]*:)?\s+(.*)$", line)
        if not match:
            break
        label = match.group(1) or label
        rows.setdefault(label, []).append(match.group(2).strip())
    return rows


def test_the_block_tells_where_to_go_and_what_is_served() -> None:
    with server_process("--host", "0.0.0.0", *OPTIONS) as (_, base_url, log_path):
        block = startup_block(log_path)
        health = httpx.get(base_url + "/health", timeout=10).json()
        models = httpx.get(base_url + "/v1/models", timeout=10).json()
        urls = block["Chat page:"]
        port = base_url.rsplit(":", 1)[1]
        assert urls[0] == f"http://127.0.0.1:{port}/"
        if shutil.which("hostname"):  # every LAN address, as the system lists them
            listed = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
            for address in (a for a in listed if ":" not in a):
                assert f"http://{address}:{port}/" in urls
        for url in urls:  # each is real: the chat page and the API answer there
            assert httpx.get(url, timeout=10).status_code == 200, url
            assert httpx.get(url + "v1/models", timeout=10).json()["data"][0]["id"] == models["data"][0]["id"]
        assert block["OpenAI API:"][0].startswith(f"http://127.0.0.1:{port}/v1")

        assert block["Model:"] == [f"{models['data'][0]['id']} (context {health['max_model_len']} tokens)"]
        assert health["max_model_len"] == 1024
        weights = block["Weights:"]
        assert weights[0] == "float32, quantization none"
        assert weights[1].startswith("linear layers int4 groups of 32 (210 GGUF Q4_1, 1 GGUF Q8_0 layers")
        assert "NOT token-identical to float32 (--cpu-weights fp32 is)" in weights[1]
        answer = httpx.post(base_url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 12,
            "temperature": 0}).json()  # the packed default answers as the model does
        assert "Paris" in answer["choices"][0]["message"]["content"]
        assert re.fullmatch(r"cpu \(\d+ threads\)", block["Device:"][0])
        assert block["Decode:"] == ["one request alone runs a torch.compile'd step: compiling in the background "
                                    "(about a minute the first time, seconds once cached)"]
        tokens, blocks, size = health["kv_capacity_tokens"], health["kv_blocks_total"], health["kv_block_size"]
        assert tokens == blocks * size and tokens > 0
        assert block["KV cache:"] == [f"{tokens} tokens in float16 ({blocks} blocks of {size}): "  # packed: fp16
                                      f"{tokens // 1024} requests at the full context"]
        assert block["Sequences:"] == ["up to 6 at once (--max-num-seqs)"] and health["max_num_seqs"] == 6
        assert block["Steps:"] == ["about 0.25 s at most, so a new request soon joins; decodes take turns beyond it "
                                   "(--max-step-time)"]
        assert block["API key:"][0].startswith("not required")

        assert isinstance(health["decode_compiling"], bool)
        # the core process tells the API when the background compile ends, without a request to carry it (if it
        # did not, /health would say true until the wait gives up)
        wait_for_decode_compile(Server(base_url), timeout_s=300)
        assert httpx.get(base_url + "/health", timeout=10).json()["decode_compiling"] is False

        log = log_path.read_text(errors="replace")
        assert "Loading weights: 100%" in log  # loading's bar (transformers')
        assert re.search(r"warming up: 100%\|[^\n\r]*2/2", log)  # engine start-up and a first request
        assert log.index("warming up: 100%") < log.index(BLOCK_START)  # the block comes once it is ready


def test_the_block_says_a_key_is_required_and_when_no_model_is_loaded() -> None:
    with server_process("--model", "none", "--api-key", "k-123", "--log-level", "warning",
                        wait_healthy=False) as (_, base_url, log):
        block = startup_block(log)
        port = base_url.rsplit(":", 1)[1]
        assert block["Chat page:"] == [f"http://127.0.0.1:{port}/"]  # bound to one address: only that one
        assert block["Model:"][0].startswith("none loaded")
        assert block["API key:"][0].startswith("required")
        assert "k-123" not in log.read_text()  # the key itself is never printed


def test_served_urls() -> None:
    assert served_urls("127.0.0.1", 3928) == ["http://127.0.0.1:3928/"]
    assert served_urls("::1", 80) == ["http://[::1]:80/"]
    addresses = lan_ipv4_addresses()
    assert addresses[0] == "127.0.0.1" and len(set(addresses)) == len(addresses)
    for host in WILDCARD_HOSTS:
        assert served_urls(host, 1) == [f"http://{address}:1/" for address in addresses]


def test_a_taken_port_fails_with_uvicorns_code_and_no_block() -> None:
    host = "0.0.0.0"
    with server_process("--model", "none", "--host", host, "--log-level", "warning",
                        wait_healthy=False) as (_, base_url, log):
        startup_block(log)  # bound
        port = base_url.rsplit(":", 1)[1]
        result = subprocess.run([sys.executable, "-m", "nitro_torch.cli", "serve", "--model", "none", "--host", host, "--port", port],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr[-2000:]
    assert BLOCK_START not in result.stdout
    assert "address already in use" in result.stderr.lower()
