"""The Starlette app: routes, error handlers, and a lifespan that owns the ModelHost's start-up model."""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from nitro_torch.config import Config
from nitro_torch.server import anthropic, nitro, openai, openapi, webui
from nitro_torch.server import metrics as metrics_api
from nitro_torch.server.http.admission import AdmissionMiddleware, ready
from nitro_torch.server.http.errors import EXCEPTION_HANDLERS
from nitro_torch.server.http.request_ids import wrap_outermost
from nitro_torch.server.http.security import middleware as security_middleware
from nitro_torch.server.model_host import NO_MODEL, HostState, LeaseMiddleware, ModelHost, fetch_model_files, get_host

if TYPE_CHECKING:
    from nitro_torch.engine.client import EngineClient

logger = logging.getLogger("nitro_torch.server")


async def health(request: Request) -> JSONResponse:
    """Liveness: 200 with the engine's counters while a model serves, and 200 with the host's state while a
    model is switched or none is loaded (readiness, /ready, is 503 then); 503 once the engine has stopped."""
    host = get_host(request)
    error = host.liveness_error()
    if error is not None:
        raise error
    engine = host.engine
    body: dict[str, object] = {"status": "ok"}
    if host.state != HostState.READY:
        body.update(state=host.state.value, model_loaded=engine is not None)
    if engine is not None and engine.is_alive:
        body.update(health_counters(engine))
    return JSONResponse(body)


def health_counters(engine: EngineClient) -> dict[str, int]:
    info = engine.info
    return {**msgspec.structs.asdict(engine.stats()), "kv_block_size": info.kv_block_size,
            "kv_capacity_tokens": info.kv_capacity_tokens, "max_num_seqs": info.max_num_seqs,
            "max_model_len": info.max_model_len}


def create_app(config: Config, engine: EngineClient | None = None, *, host: ModelHost | None = None) -> Starlette:
    """An app serving `engine`, or `host`'s model; with neither, the lifespan loads `config.model` (unless it
    is "none") and shuts it down at exit. A caller-supplied engine or host stays the caller's to shut down.
    """
    owns_host = host is None
    if host is None:
        host = ModelHost(config)
        if engine is not None:
            host.install(engine, config, owned=False)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if owns_host and host.engine is None and config.model.model != NO_MODEL:
            from nitro_torch.engine.client import start_engine_client

            logger.info("loading model %s", config.model.model)
            # Loading blocks the loop on purpose: uvicorn binds the port only after start-up, so /health
            # answers once the model is ready.
            fetch_model_files(config, progress=True)
            host.install(start_engine_client(config), config, owned=True)
        app.state.started_at = int(time.time())
        if getattr(app.state, "drain_on_signal", False):  # run_server: SIGTERM starts draining
            from nitro_torch.server.http.draining import watch_signals

            watch_signals(app.state)
        try:
            yield
        finally:
            if owns_host:
                host.close()

    routes = [
        *openai.routes,
        *anthropic.routes,
        *nitro.routes,
        Route("/health", health, methods=["GET"]),
        *metrics_api.routes,
        Route("/ready", ready, methods=["GET"]),
        *openapi.routes,
        *webui.routes,
    ]
    middleware = [*security_middleware(config),  # CORS, API key, --log-prompts (request ids: outermost, below)
                  Middleware(AdmissionMiddleware, max_queued_requests=config.server.max_queued_requests,
                             max_request_bytes=config.server.max_request_bytes),
                  Middleware(nitro.api.NitroPathCase), Middleware(LeaseMiddleware)]
    app = wrap_outermost(Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan,
                                   middleware=middleware))
    app.state.config = config
    app.state.host = host
    app.state.metrics_registry = metrics_api.create_registry(host)  # GET /metrics, per app
    app.state.draining = False  # set on SIGTERM/SIGINT under run_server (http/draining.py)
    return app


def run_server(config: Config) -> None:
    """Load the model first (so a bad --model fails fast with a clear message), warm it up, then serve until
    stopped; once the port is bound, print the block that says where to go and what is served.

    With `--model none` the server starts empty and waits for POST /inferences/llamacpp/loadmodel, as Nitro did.
    """
    from nitro_torch.server.http.connections import (
        ConnectionLimits,
        protocol_class,
        raise_open_file_limit,
        throttle_accept_errors,
    )
    from nitro_torch.server.startup import announce, served_urls, start_with_progress, startup_block

    logging.basicConfig(level=config.server.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")
    host = ModelHost(config)
    engine = None
    if config.model.model != NO_MODEL:
        engine = start_with_progress(config)
        host.install(engine, config, owned=True)
    app = create_app(config, host=host)
    app.state.drain_on_signal = True
    raise_open_file_limit()
    limits = ConnectionLimits.from_config(config.server)  # head/body deadlines, connection cap (connections.py)
    throttle_accept_errors()
    server_config = uvicorn.Config(app, host=config.server.host, port=config.server.port,
                                   log_level=config.server.log_level, http=protocol_class(limits),
                                   timeout_graceful_shutdown=math.ceil(config.server.shutdown_timeout))
    block = startup_block(config, engine, served_urls(config.server.host, config.server.port))
    server = _AnnouncingServer(server_config, lambda: announce(block))
    try:
        server.run()
    finally:
        host.close()
    if not server.started:
        sys.exit(3)  # uvicorn's start-up failure code (e.g. the port is taken; uvicorn logged why)


class _AnnouncingServer(uvicorn.Server):
    """uvicorn's server, calling `on_bound` once the port is bound (before that, the URLs would be a promise)."""

    def __init__(self, config: uvicorn.Config, on_bound: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_bound = on_bound

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            self._on_bound()
