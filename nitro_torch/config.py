"""All server/engine options in one table: built from configs/*.yaml < env NITRO_* < CLI flags.

Each option lives in exactly one section dataclass; `OPTIONS` is derived from the dataclass fields so the
CLI, the environment and the YAML file can never disagree about names, types or defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

ENV_PREFIX = "NITRO_"


class ConfigError(ValueError):
    pass


def served_names(served_model_name: str | None) -> list[str]:
    """--served-model-name's aliases, in order (the first is the reported name)."""
    return [name.strip() for name in (served_model_name or "").split(",") if name.strip()]


@dataclass
class ModelConfig:
    model: str = field(default="default", metadata={"help": "'default' (embedded SmolLM2-135M-Instruct), a local HF folder, a .gguf file, a hub name ORG/NAME[@REVISION] (served from the HF cache, downloaded into it first when missing), a GGUF quant ORG/NAME-GGUF:QUANT, or 'none' (start empty and wait for Nitro's loadmodel)"})
    served_model_name: str | None = field(default=None, metadata={"help": "the model's name in /v1/models and in answers (default: derived from --model); several comma-separated names are aliases, the first is reported"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={"help": "weight dtype; auto = bfloat16 on CUDA, float32 on CPU"})
    device: Literal["auto", "cuda", "cpu"] = field(default="auto", metadata={"help": "auto = cuda when available"})
    device_map: Literal["none", "auto"] = field(default="none", metadata={"help": "auto: spread the layers over all visible GPUs with accelerate, for a model that does not fit one (eager decoding, one GPU computes at a time)"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "split every layer over N worker processes (one per GPU; NCCL on CUDA, gloo on CPU) with transformers' tensor-parallel plan: each holds 1/N of the weights and of the KV heads; attention heads and KV heads must divide by N; no bitsandbytes or packed CPU weights"})
    max_model_len: int | None = field(default=None, metadata={"help": "context window (default: the model's)"})
    hf_token_file: str | None = field(default=None, metadata={"help": "file holding the Hugging Face token (stripped) for gated or private hub models; instead of $HF_TOKEN"})
    model_cache_dir: str | None = field(default=None, metadata={"help": "where converted models are kept (default: $NITRO_HOME or ~/.cache/nitro_torch)"})
    quantization: Literal["none", "bnb-4bit", "bnb-8bit"] = field(default="none", metadata={"help": "bitsandbytes weights quantized at load; 4-bit is NF4 with double quantization and bf16 compute on CUDA"})
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type of --quantization bnb-4bit"})
    cpu_weights: Literal["auto", "fp32", "int8", "int4"] = field(default="auto", metadata={"help": "linear-layer weights on the CPU: int4 = packed 4-bit groups (a GGUF file's own blocks, kept as stored; other models quantized at load), int8 = per-channel int8 quantized at load, fp32 = the float weights (the only mode token-identical to transformers); auto = int4 for a GGUF model, else fp32"})


@dataclass
class ChatConfig:
    chat_template: str | None = field(default=None, metadata={"help": "Jinja chat template file that replaces the model's own"})
    system_prompt: str | None = field(default=None, metadata={"help": "prompt-prefix mode (models without a chat template): text before a system message"})
    user_prompt: str | None = field(default=None, metadata={"help": "prompt-prefix mode: text before a user message"})
    ai_prompt: str | None = field(default=None, metadata={"help": "prompt-prefix mode: text before an assistant message and the answer"})
    pre_prompt: str | None = field(default=None, metadata={"help": "prompt-prefix mode: text at the start of every prompt"})
    special_tokens_in_content: bool = field(default=False, metadata={"help": "tokenize control tokens written inside message content (e.g. <|im_start|>) as the special tokens themselves; off: as plain text, as OpenAI does, so a client cannot forge a turn"})


@dataclass
class CacheConfig:
    block_size: int = field(default=16, metadata={"help": "tokens per KV-cache block"})
    kv_cache_memory: float = field(default=1.0, metadata={"help": "GiB of KV cache on CPU"})
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={"help": "dtype of the KV cache; attention computes in it; auto = the model's dtype, except float16 for a float32 model with packed --cpu-weights (its activations are rounded to bfloat16 already; half the bytes to store and read, like llama.cpp's f16 cache)"})
    gpu_memory_utilization: float = field(default=0.90, metadata={"help": "share of GPU memory for weights + activations + KV cache"})
    num_kv_blocks: int | None = field(default=None, metadata={"help": "exact number of KV blocks (overrides the memory budget)"})
    prefix_caching: bool = field(default=True, metadata={"help": "reuse KV blocks of identical prompt prefixes"})


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = field(default=2048, metadata={"help": "token budget of one engine step"})
    max_num_seqs: int = field(default=128, metadata={"help": "most requests running at once"})
    fair_share: bool = field(default=True, metadata={"help": "share each step's tokens and the waiting queue fairly between clients (by API key, else by client address), so that one heavy client cannot starve a light one; on a CPU a client well behind in engine time lately also runs alone while busier clients wait; off: first come, first served"})
    fair_share_hold: float = field(default=2.0, metadata={"help": "seconds a client's fair share stays held after its last request ended, so that its next one (a chat turn, an agent's next call) does not wait behind a full step of a heavy client (0: none)"})
    max_step_time: float | None = field(default=None, metadata={"help": "seconds one engine step may take, as predicted from the steps before it: decodes take turns and prompt chunks are cut to fit, so a request that arrives waits at most about this long for the step in flight (default: 0.25 on a CPU, where a step of many long sequences takes seconds; off on CUDA; 0: no limit)"})


@dataclass
class RunnerConfig:
    cuda_graphs: bool = field(default=True, metadata={"help": "replay decode steps as captured CUDA graphs (CUDA only; --no-cuda-graphs runs them eagerly)"})
    attention_backend: Literal["auto", "triton", "torch"] = field(default="auto", metadata={"help": "paged-attention kernels: auto = Triton on CUDA, torch elsewhere"})
    compile_decode: bool = field(default=False, metadata={"help": "torch.compile the fixed-shape decode step, once per padded batch size at start-up (on CUDA its graphs are captured from the compiled code)"})
    async_scheduling: bool = field(default=False, metadata={"help": "plan and stage each engine step while the previous one runs on the device; its sampled ids come back one step behind (greedy batches overlap, others run in step)"})
    cpu_decode_compile: Literal["background", "startup", "off"] = field(default="background", metadata={"help": "a request decoding alone on a CPU with packed weights runs a torch.compile'd step (about twice the eager step's tokens/s): compiled in the background while the server already answers (one to two minutes the first time, seconds once cached), at start-up before it answers, or off"})
    engine_core: Literal["process", "thread"] = field(default="process", metadata={"help": "where the engine core (scheduler, model, sampling) runs: its own process, or a thread of the server's (debugging)"})


@dataclass
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "bind address; 0.0.0.0 serves the LAN"})
    port: int = field(default=3928, metadata={"help": "TCP port (Nitro's default)"})
    log_level: Literal["debug", "info", "warning", "error"] = field(default="info", metadata={"help": "log verbosity"})
    max_queued_requests: int = field(default=1024, metadata={"help": "most requests waiting for the engine; more are 429 with Retry-After (0: no bound)"})
    max_request_bytes: int = field(default=8 << 20, metadata={"help": "largest request body in bytes; larger is 413 (0: no limit)"})
    request_timeout: float = field(default=0.0, metadata={"help": "seconds a request may take from arrival; then it ends with finish_reason 'length' and what it has produced (0: no limit)"})
    shutdown_timeout: float = field(default=30.0, metadata={"help": "seconds in-flight requests may finish after SIGTERM before the server exits"})
    max_request_tokens: int | None = field(default=None, metadata={"help": "most tokens one request may ask for: prompt x n + n x max_tokens; more is 400 (default: 4 x the context window; 0: no limit)"})
    header_timeout: float = field(default=10.0, metadata={"help": "seconds a client has to send a request's line and headers, and the most an idle connection waits for its first request; then the connection is closed (0: no limit)"})
    body_timeout: float = field(default=30.0, metadata={"help": "seconds a client has to send a request's body once its headers arrived; then 408 and the connection is closed (0: no limit)"})
    keep_alive_timeout: float = field(default=5.0, metadata={"help": "seconds an idle keep-alive connection stays open between requests"})
    responses_store: int = field(default=512, metadata={"help": "most /v1/responses answers kept in memory for previous_response_id and GET /v1/responses/{id}; the oldest is dropped first (0: none kept, store=true is 400)"})
    strict_model_name: bool = field(default=False, metadata={"help": "answer a request whose 'model' is not one of the served names (or --model) with 404; off: the one served model answers any name, as Nitro did"})
    max_connections: int | None = field(default=None, metadata={"help": "most open client connections; more are answered 503 and closed at once (default: three quarters of the open-file limit, at most 4096; 0: no limit)"})


@dataclass
class SecurityConfig:
    api_key: str | None = field(default=None, repr=False, metadata={"help": "require 'Authorization: Bearer <key>' on every route but /health, /healthz, /ready and the chat page"})
    api_key_file: str | None = field(default=None, metadata={"help": "file holding the API key (stripped); instead of --api-key"})
    admin_api_key: str | None = field(default=None, repr=False, metadata={"help": "a second key, required for loadmodel and unloadmodel (a user key gets 403 there); without it those routes take the user key, as before"})
    admin_api_key_file: str | None = field(default=None, metadata={"help": "file holding the admin API key (stripped); instead of --admin-api-key"})
    metrics_public: bool = field(default=False, metadata={"help": "serve /metrics without the API key"})
    allowed_origins: str | None = field(default=None, metadata={"help": "CORS: comma-separated origins allowed to call the API from a browser, or '*' (default: CORS off)"})
    log_prompts: bool = field(default=False, metadata={"help": "log request prompts/messages at INFO (off: logs never hold prompts or outputs)"})


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def validate(self) -> None:
        if self.cache.block_size < 1 or self.cache.block_size & (self.cache.block_size - 1):
            raise ConfigError("block_size must be a power of two")
        if not 0.05 <= self.cache.gpu_memory_utilization <= 1.0:
            raise ConfigError("gpu_memory_utilization must be in [0.05, 1]")
        if self.cache.kv_cache_memory <= 0:
            raise ConfigError("kv_cache_memory must be positive")
        if self.scheduler.max_num_seqs < 1 or self.scheduler.max_num_batched_tokens < 1:
            raise ConfigError("max_num_seqs and max_num_batched_tokens must be positive")
        if (self.scheduler.max_step_time or 0) < 0:
            raise ConfigError("max_step_time may not be negative")
        server = self.server
        if min(server.max_queued_requests, server.max_request_bytes, server.shutdown_timeout,
               server.request_timeout, server.header_timeout, server.body_timeout, server.keep_alive_timeout,
               server.max_request_tokens or 0, server.max_connections or 0) < 0:
            raise ConfigError("max_queued_requests, max_request_bytes, max_request_tokens, max_connections and the "
                              "timeouts may not be negative")
        if not 0 < self.server.port < 65536:
            raise ConfigError("port must be in 1..65535")
        self._validate_tensor_parallel()
        if self.chat.chat_template and not Path(self.chat.chat_template).is_file():
            raise ConfigError(f"chat template file not found: {self.chat.chat_template}")
        security = self.security
        security.api_key = _resolve_key(security.api_key, security.api_key_file, "api_key")
        security.admin_api_key = _resolve_key(security.admin_api_key, security.admin_api_key_file, "admin_api_key")
        security.api_key_file = security.admin_api_key_file = None  # resolved: the keys are in place now
        if security.admin_api_key is not None and security.admin_api_key == security.api_key:
            raise ConfigError("admin_api_key must differ from api_key")

    def _validate_tensor_parallel(self) -> None:
        model, size = self.model, self.model.tensor_parallel_size
        if size < 1:
            raise ConfigError("tensor_parallel_size must be at least 1")
        if size == 1:
            return
        if model.device_map == "auto":
            raise ConfigError("--tensor-parallel-size splits each layer over the GPUs and --device-map auto spreads "
                              "whole layers: choose one")
        if model.quantization != "none":
            raise ConfigError(f"--quantization {model.quantization}: bitsandbytes weights have no tensor-parallel "
                              "path in transformers; use 16-bit weights with --tensor-parallel-size")
        if model.cpu_weights in ("int4", "int8"):
            raise ConfigError(f"--cpu-weights {model.cpu_weights}: packed CPU weights cannot be split over ranks; "
                              "use --cpu-weights fp32 (or auto) with --tensor-parallel-size")
        if self.runner.engine_core == "thread":
            raise ConfigError("--tensor-parallel-size needs the engine core in its own process (--engine-core "
                              "process): a worker that dies must be able to take the core down")


def _resolve_key(key: str | None, key_file: str | None, name: str) -> str | None:
    if not key_file:
        return key
    if key:
        raise ConfigError(f"give --{name.replace('_', '-')} or --{name.replace('_', '-')}-file, not both")
    try:
        key = Path(key_file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {name}_file {key_file}: {exc.strerror}") from None
    if not key:
        raise ConfigError(f"{name}_file {key_file} is empty")
    return key


@dataclass(frozen=True)
class Option:
    section: str
    name: str
    type: Any
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def parse(self, raw: Any) -> Any:
        """Coerce a YAML/env/CLI value to the option's type."""
        base, optional = _unwrap(self.type)
        if raw is None or (optional and isinstance(raw, str) and raw.lower() in ("", "none", "null")):
            if optional:
                return None
            raise ConfigError(f"{self.name} may not be empty")
        try:
            if base is bool:
                if isinstance(raw, bool):
                    return raw
                text = str(raw).strip().lower()
                if text in ("1", "true", "yes", "on"):
                    return True
                if text in ("0", "false", "no", "off"):
                    return False
                raise ValueError(raw)
            if get_origin(base) is Literal:
                if str(raw) not in get_args(base):
                    raise ValueError(raw)
                return str(raw)
            return base(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid value for {self.name}: {raw!r}") from None


def _unwrap(tp: Any) -> tuple[Any, bool]:
    args = get_args(tp)
    if args and type(None) in args and get_origin(tp) is not Literal:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _collect_options() -> dict[str, Option]:
    options: dict[str, Option] = {}
    for section in dataclasses.fields(Config):
        cls: Any = section.default_factory
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            options[f.name] = Option(section.name, f.name, hints[f.name], f.default, f.metadata.get("help", ""))
    return options


OPTIONS: dict[str, Option] = _collect_options()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"YAML file of options (keys as below, with - or _) [env {CONFIG_ENV}]")
    for opt in OPTIONS.values():
        base, _ = _unwrap(opt.type)
        default_text = f" [default: {opt.default}; env {opt.env}]"
        if base is bool:
            parser.add_argument(opt.flag, dest=opt.name, action=argparse.BooleanOptionalAction,
                                default=None, help=opt.help + default_text)
        else:
            choices = list(get_args(base)) if get_origin(base) is Literal else None
            parser.add_argument(opt.flag, dest=opt.name, default=None, choices=choices,
                                help=opt.help + default_text)


CONFIG_ENV = ENV_PREFIX + "CONFIG"
"""The config file's path, for containers where flags are awkward (a --config flag wins)."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    values: dict[str, Any] = {}
    for key, raw in data.items():
        name = str(key).replace("-", "_")
        if name not in OPTIONS:
            raise ConfigError(f"{path}: unknown option '{key}'")
        values[name] = raw
    return values


def build_config(
    cli: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Config:
    """Precedence: defaults < config file (`config_file`, else $NITRO_CONFIG) < environment (NITRO_*) < explicit
    CLI values."""
    env = dict(os.environ) if env is None else env
    config_file = config_file or env.get(CONFIG_ENV) or None
    merged: dict[str, Any] = {}
    if config_file:
        merged.update(load_yaml(config_file))
    for name, opt in OPTIONS.items():
        if opt.env in env:
            merged[name] = env[opt.env]
    for name, raw in (cli or {}).items():
        if raw is not None and name in OPTIONS:
            merged[name] = raw
    config = Config()
    for name, raw in merged.items():
        opt = OPTIONS[name]
        setattr(getattr(config, opt.section), name, opt.parse(raw))
    config.validate()
    return config
