"""What `nitro-torch serve` shows a person while it starts: a warm-up progress bar, then one block that says where
to go and what is being served (URLs, model, weights, device, KV capacity, API key)."""

from __future__ import annotations

import array
import asyncio
import fcntl
import ipaddress
import socket
import struct
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tqdm import tqdm

from nitro_torch import __version__
from nitro_torch.config import Config

if TYPE_CHECKING:
    from nitro_torch.engine.client import EngineClient

WILDCARD_HOSTS = ("0.0.0.0", "::", "")
SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def start_with_progress(config: Config) -> EngineClient:
    """Engine start (weights, KV sizing, decode-graph capture) and a first request, under one progress bar: the
    first request pays one-off costs (kernel compilation, allocator growth) that no user request should. A hub
    model not yet in the cache downloads first, under a bar of its own."""
    from nitro_torch.engine.client import start_engine_client
    from nitro_torch.server.model_host import fetch_model_files, warm_up

    fetch_model_files(config, progress=True)
    with tqdm(total=2, desc="warming up", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        bar.set_postfix_str("loading the model, sizing the KV cache")
        engine = start_engine_client(config)
        bar.update()
        bar.set_postfix_str("first request")
        try:
            asyncio.run(warm_up(engine))
        except BaseException:
            engine.shutdown()
            raise
        bar.update()
        bar.set_postfix_str("done")
    return engine


@dataclass(frozen=True)
class Capacity:
    """The engine's KV capacity, as the start-up block and /health state it."""

    kv_tokens: int
    kv_blocks: int
    block_size: int
    max_num_seqs: int
    max_model_len: int

    @classmethod
    def of(cls, engine: EngineClient) -> Capacity:
        info = engine.info
        return cls(kv_tokens=info.kv_capacity_tokens, kv_blocks=info.kv_blocks_total, block_size=info.kv_block_size,
                   max_num_seqs=info.max_num_seqs, max_model_len=info.max_model_len)

    @property
    def full_context_requests(self) -> int:
        return self.kv_tokens // self.max_model_len


def lan_ipv4_addresses() -> list[str]:
    """Every IPv4 address of this machine's interfaces (loopback first), for the URLs a wildcard bind serves."""
    found: set[str] = set()
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for name in names:
            request = array.array("B", struct.pack("256s", name.encode()[:15]))
            try:
                fcntl.ioctl(probe.fileno(), SIOCGIFADDR, request, True)
            except OSError:  # an interface without an IPv4 address
                continue
            found.add(socket.inet_ntoa(request.tobytes()[20:24]))
    if not found:  # no ioctl (not Linux): the host name's addresses
        try:
            found = {str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
        except OSError:
            pass
    found.add("127.0.0.1")
    return sorted(found, key=lambda address: (not ipaddress.ip_address(address).is_loopback,
                                              ipaddress.ip_address(address)))


def served_urls(host: str, port: int) -> list[str]:
    """Base URLs a browser can open: every interface's for a wildcard bind, else the bound host's."""
    if host in WILDCARD_HOSTS:
        return [f"http://{address}:{port}/" for address in lan_ipv4_addresses()]
    shown = f"[{host}]" if ":" in host else host
    return [f"http://{shown}:{port}/"]


def startup_block(config: Config, engine: EngineClient | None, urls: list[str]) -> str:
    """The block printed once the port is bound."""
    lines = [f"nitro_torch {__version__} is ready."]
    width = 13

    def row(label: str, value: str) -> None:
        lines.append(f"  {label:<{width}}{value}")

    row("Chat page:", urls[0])
    for url in urls[1:]:
        row("", url)
    row("OpenAI API:", urls[0] + "v1" + ("   (and the same path on every address above)" if len(urls) > 1 else ""))
    if engine is None:
        row("Model:", "none loaded; load one with POST /inferences/llamacpp/loadmodel")
    else:
        info = engine.info
        capacity = Capacity.of(engine)
        row("Model:", f"{engine.model_name} (context {capacity.max_model_len} tokens)")
        row("Weights:", f"{info.dtype}, quantization {info.quantization}")
        if info.packed_weights:
            row("", f"linear layers {info.packed_weights}: fast, NOT token-identical to float32 "
                    "(--cpu-weights fp32 is)")
        row("Device:", info.device_name)
        if info.tensor_parallel_size > 1:
            row("Parallel:", f"every layer split over {info.tensor_parallel_size} ranks (--tensor-parallel-size)")
            for rank in info.ranks:
                row("", rank)
        if info.row_decode_compile != "off":
            when = ("compiling in the background (about a minute the first time, seconds once cached)"
                    if info.row_decode_compile == "background" else "compiled at start-up")
            row("Decode:", f"one request alone runs a torch.compile'd step: {when}")
        summed = f", {info.kv_cache_bytes / (1 << 30):.2f} GiB over {info.tensor_parallel_size} ranks" \
            if info.tensor_parallel_size > 1 else ""
        row("KV cache:", f"{capacity.kv_tokens} tokens in {info.kv_cache_dtype} ({capacity.kv_blocks} blocks of "
                         f"{capacity.block_size}{summed}): {capacity.full_context_requests} requests at the full "
                         "context")
        row("Sequences:", f"up to {capacity.max_num_seqs} at once (--max-num-seqs)")
        if info.max_step_time_s > 0:
            row("Steps:", f"about {info.max_step_time_s:g} s at most, so a new request soon joins; decodes take "
                          "turns beyond it (--max-step-time)")
    security = config.security
    if security.api_key:
        row("API key:", "required: send 'Authorization: Bearer <key>' (the chat page asks for it)")
    else:
        row("API key:", "not required: anyone who can reach this port can use it (set one with --api-key)")
    return "\n".join(lines)


def announce(text: str) -> None:
    print(text, file=sys.stdout, flush=True)
