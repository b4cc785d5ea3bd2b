"""Nitro's own routes: /healthz, /inferences/llamacpp/{loadmodel, unloadmodel, modelstatus} and the
/inferences/llamacpp/{chat_completion, embedding} aliases of the OpenAI routes.

Where Nitro's behaviour was a bug (text/html health, 200 on internal errors) this follows OpenAI instead;
the README section "Nitro's routes and model management" lists every difference.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from nitro_torch.config import ChatConfig, Config, ConfigError
from nitro_torch.server.http.context import parse_body
from nitro_torch.server.http.errors import APIError
from nitro_torch.server.model_host import ModelLoadError, Serving, get_host
from nitro_torch.server.openai import chat as openai_chat
from nitro_torch.server.openai.embeddings import create_embeddings

logger = logging.getLogger("nitro_torch.server")

PREFIX = "/inferences/llamacpp"
_NOT_CAUSAL = re.compile(r"Unrecognized configuration class <class '(?:[\w.]*\.)?(\w+)'> for this kind of AutoModel")
_Text = Annotated[StrictStr, Field(max_length=100_000)]
_Name = Annotated[StrictStr, Field(min_length=1, max_length=4096)]
PROMPT_FIELDS = ("system_prompt", "user_prompt", "ai_prompt", "pre_prompt")
MIN_CTX_LEN = 16
"""One KV block, and room for the one-token warm-up of any tokenizer: below it a load would retire the serving
model only to fail at warm-up."""
MAX_CTX_LEN = 1 << 24
"""Above the longest-context open models (10M tokens); the loader also refuses more than the model's own window."""
MAX_CPU_THREADS = os.cpu_count() or 1
"""More threads than the server has CPUs only oversubscribe them (torch.set_num_threads in the core process)."""


class LoadModelRequest(BaseModel):
    """Nitro's load parameters that mean something here. Every other field (llama.cpp's ngl, n_batch, mlock,
    grp_attn_n, caching_enabled, mmproj, ...) is accepted, ignored and named in the answer's `ignored_options`."""

    model_config = ConfigDict(extra="allow")

    llama_model_path: _Name | None = None
    model: _Name | None = None
    ctx_len: StrictInt | None = Field(default=None, ge=MIN_CTX_LEN, le=MAX_CTX_LEN)
    n_parallel: StrictInt | None = Field(default=None, ge=1)  # at most the server's --max-num-seqs: to_config
    cont_batching: StrictBool | None = None
    embedding: StrictBool | None = None
    cpu_threads: StrictInt | None = Field(default=None, ge=1, le=MAX_CPU_THREADS)
    system_prompt: _Text | None = None
    user_prompt: _Text | None = None
    ai_prompt: _Text | None = None
    pre_prompt: _Text | None = None

    @field_validator("llama_model_path", "model")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and ("\x00" in value or not value.strip()):
            raise ValueError("must be a non-empty path or model id without NUL characters")
        return value

    def source(self) -> tuple[str, str]:
        """-> (what to load, the field that named it). With both fields, `model` is the served name."""
        if self.llama_model_path is not None:
            return self.llama_model_path, "llama_model_path"
        if self.model is not None:
            return self.model, "model"
        raise APIError(400, "Missing required parameter: 'llama_model_path' (a .gguf file, a Hugging Face model "
                            "folder, or a hub name ORG/NAME or ORG/NAME-GGUF:QUANT).",
                       param="llama_model_path", code="missing_required_parameter")

    def to_config(self, base: Config) -> Config:
        """The start-up config with this model: model-specific settings come from the request or the model."""
        source, _ = self.source()
        config = copy.deepcopy(base)
        config.model.model = source
        config.model.served_model_name = self.model if self.llama_model_path is not None else None
        config.model.max_model_len = self.ctx_len
        config.chat = ChatConfig(system_prompt=self.system_prompt, user_prompt=self.user_prompt,
                                 ai_prompt=self.ai_prompt, pre_prompt=self.pre_prompt,
                                 special_tokens_in_content=base.chat.special_tokens_in_content)  # server policy
        if self.n_parallel is not None:
            check_n_parallel(self.n_parallel, base.scheduler.max_num_seqs)
            config.scheduler.max_num_seqs = self.n_parallel
        try:
            config.validate()
        except ConfigError as exc:
            raise APIError(400, str(exc), code="invalid_value") from None
        return config

    @property
    def ignored(self) -> list[str]:
        return sorted(self.model_extra or {})


def check_n_parallel(n_parallel: int, ceiling: int) -> None:
    """A load may lower the operator's --max-num-seqs, never raise it: the memory, the decode graphs and the
    429 bound (requests wait only once every running slot is taken) were sized for it."""
    if n_parallel > ceiling:
        raise APIError(400, f"Invalid value for 'n_parallel': at most {ceiling} requests may run at once on this "
                            f"server (its --max-num-seqs), not {n_parallel}.", param="n_parallel",
                       code="invalid_value")


async def load_model(request: Request) -> JSONResponse:
    host = get_host(request)
    body = await parse_body(request, LoadModelRequest)
    source, param = body.source()
    config = body.to_config(host.base_config)
    previous = host.engine.model_name if host.engine is not None else None
    started = time.monotonic()
    try:
        serving = await host.load(config, embedding=body.embedding is not False, cpu_threads=body.cpu_threads)
    except ModelLoadError as exc:
        raise load_failure(exc, source, param, config) from None
    request.app.state.started_at = serving.loaded_at  # what /v1/models reports as `created`
    return JSONResponse({
        "message": "Model loaded successfully",
        **_model_facts(serving),
        "previous_model": previous,
        "load_time_s": round(time.monotonic() - started, 2),
        "ignored_options": body.ignored,
    })


async def unload_model(request: Request) -> JSONResponse:
    name = await get_host(request).unload()
    return JSONResponse({"message": "Model unloaded successfully", "model": name})


async def model_status(request: Request) -> JSONResponse:
    """Nitro's shape: `model_data` is a JSON *string* (clients JSON.parse it); `model` and `state` are extras."""
    host = get_host(request)
    error = host.unavailable_error()
    if error is not None:
        if error.code == "model_not_loaded":
            raise APIError(409, error.message, code="model_not_loaded")
        raise error
    assert host.serving is not None
    facts = _model_facts(host.serving)
    return JSONResponse({"model_loaded": True, "model": facts["model"], "state": host.state.value,
                         "model_data": json.dumps(facts, ensure_ascii=False)})


async def healthz(request: Request) -> JSONResponse:
    """Liveness: 200 whenever the process answers, with or without a model (readiness is /health)."""
    return JSONResponse({"status": "ok", "message": "Nitro is alive!!!",
                         "model_loaded": get_host(request).engine is not None})


def _model_facts(serving: Serving) -> dict[str, Any]:
    engine, config = serving.engine, serving.config
    prompts = {k: v for k, v in vars(config.chat).items() if k in PROMPT_FIELDS and v is not None}
    return {"model": engine.model_name, "ctx_len": engine.max_model_len,
            "n_parallel": config.scheduler.max_num_seqs, "cont_batching": True, "embedding": serving.embedding,
            "device": engine.info.device, "dtype": engine.info.dtype,
            "prompt_template": prompts or None, "loaded_at": serving.loaded_at}


# load failures -> OpenAI errors (no server paths: only what the client sent is echoed) --------------------


def load_failure(error: ModelLoadError, source: str, param: str, config: Config) -> APIError:
    api_error = _describe(error.cause, source, param, config)
    api_error.message = api_error.message.rstrip(".") + "."
    if error.phase == "load" and error.serving:
        api_error.message += f" The previous model '{error.serving}' is still serving."
    elif error.restored:
        api_error.message += f" The previous model '{error.serving}' was reloaded and is serving."
    else:
        api_error.message += " No model is loaded now."
    if api_error.status >= 500:
        logger.error("loading %s failed", source, exc_info=error.cause)
    else:
        logger.warning("loading %s failed: %s", source, error.cause)
    return api_error


def _describe(cause: BaseException, source: str, param: str, config: Config) -> APIError:
    import torch

    from nitro_torch.models.hub_errors import HubError

    if isinstance(cause, HubError):  # a hub name: not found, gated, no such quant, no disk, no network, ...
        return APIError(cause.status, _scrub(str(cause), source, config, limit=1000), param=param, code=cause.code)
    if isinstance(cause, FileNotFoundError):  # includes the loader's ModelNotFoundError
        if not _exists(source):
            return APIError(404, f"Model not found: '{source}' is not a .gguf file or model folder on the server, "
                                 "nor a model name on the Hugging Face Hub.",
                            param=param, code="model_not_found")
        return APIError(400, f"'{source}' is not a model nitro_torch can load: a folder needs the Hugging Face "
                             "layout (config.json, weights, tokenizer), a file must be a .gguf.",
                        param=param, code="invalid_model")
    if isinstance(cause, ConfigError):
        text = str(cause)
        bad = "ctx_len" if "max_model_len" in text else None
        return APIError(400, text.replace("max_model_len", "ctx_len"), param=bad or param, code="invalid_value")
    if isinstance(cause, (torch.OutOfMemoryError, MemoryError)):
        return APIError(500, f"Out of memory while loading '{source}': the model (with its KV cache) does not fit.",
                        type="server_error", code="out_of_memory")
    if isinstance(cause, (ValueError, KeyError, OSError)):  # unknown architecture, not a causal LM, bad files
        not_causal = _NOT_CAUSAL.search(str(cause))
        detail = (f"it is not a causal language model (AutoModelForCausalLM has no class for {not_causal[1]})"
                  if not_causal else _scrub(str(cause), source, config))
        return APIError(400, f"'{source}' cannot be served: {detail}", param=param, code="unsupported_model")
    return APIError(500, f"Loading '{source}' failed ({type(cause).__name__}); the details are in the server log.",
                    type="server_error", code="model_load_failed")


def _exists(source: str) -> bool:
    try:
        return Path(source).expanduser().exists()
    except (OSError, ValueError):
        return False


def _scrub(text: str, source: str, config: Config, limit: int = 400) -> str:
    """The first line of a loader message, with the server's cache folders and home directory masked."""
    from nitro_torch.models.embedded import nitro_cache_dir
    from nitro_torch.models.loader import hf_hub_cache_dir

    line = next((part.strip() for part in text.strip("'\" \n").splitlines() if part.strip()), "invalid model")
    try:
        resolved = str(Path(source).expanduser().resolve())
    except (OSError, ValueError, RuntimeError):
        resolved = source
    if resolved != source:
        line = line.replace(resolved, source)
    for folder, label in ((hf_hub_cache_dir(), "<hf-cache>"), (nitro_cache_dir(config.model.model_cache_dir),
                                                                 "<model-cache>")):
        line = line.replace(str(folder), label)
    home = str(Path.home())
    if len(home) > 1 and home not in source:
        line = line.replace(home, "~")
    return line[:limit]


# routing ----------------------------------------------------------------------------------------------


class NitroPathCase:
    """Nitro matched paths case-insensitively (its docs use both loadModel and loadmodel)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            lowered = scope["path"].lower()
            if lowered != scope["path"] and lowered.startswith("/inferences/"):
                scope = {**scope, "path": lowered, "raw_path": lowered.encode()}
        await self.app(scope, receive, send)


async def embedding(request: Request) -> Response:
    """Nitro's /inferences/llamacpp/embedding: /v1/embeddings, unless the model was loaded with embedding=false."""
    serving = get_host(request).serving
    if serving is not None and not serving.embedding:
        raise APIError(400, "Embeddings are off for this model (it was loaded with \"embedding\": false).",
                       param="embedding", code="embeddings_disabled")
    return await create_embeddings(request)


routes = [
    Route(f"{PREFIX}/loadmodel", load_model, methods=["POST"]),
    Route(f"{PREFIX}/unloadmodel", unload_model, methods=["GET", "POST"]),
    Route(f"{PREFIX}/modelstatus", model_status, methods=["GET", "POST"]),
    Route(f"{PREFIX}/chat_completion", openai_chat.chat_completions, methods=["POST"]),
    Route(f"{PREFIX}/embedding", embedding, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
]
