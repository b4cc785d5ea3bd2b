"""The Starlette app: routes, error handlers, and a lifespan that owns the engine."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from nitro_torch.config import Config
from nitro_torch.server import openai_api
from nitro_torch.server.errors import EXCEPTION_HANDLERS, APIError

if TYPE_CHECKING:
    from nitro_torch.engine.async_engine import AsyncEngine

logger = logging.getLogger("nitro_torch.server")


async def health(request: Request) -> JSONResponse:
    """200 with the engine's counters while the engine is up; 503 otherwise."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise APIError(503, "The model is not loaded yet.", code="model_not_ready")
    if not engine.is_alive:
        raise APIError(503, "The inference engine has stopped.", type="server_error", code="engine_dead")
    return JSONResponse({"status": "ok", **engine.stats()})


async def healthz(request: Request) -> JSONResponse:
    """Nitro's liveness probe."""
    if getattr(request.app.state, "engine", None) is None:
        raise APIError(503, "The model is not loaded yet.", code="model_not_ready")
    return JSONResponse({"status": "ok"})


def create_app(config: Config, engine: AsyncEngine | None = None) -> Starlette:
    """An app serving `engine`; without one, the lifespan loads it from `config` and shuts it down at exit.

    A caller-supplied engine stays the caller's to shut down.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        owned = None
        if engine is None:
            from nitro_torch.engine.async_engine import AsyncEngine

            logger.info("loading model %s", config.model.model)
            # Loading blocks the loop on purpose: uvicorn binds the port only after start-up, so /health
            # answers once the model is ready.
            owned = AsyncEngine.from_config(config)
        app.state.engine = engine or owned
        app.state.started_at = int(time.time())
        try:
            yield
        finally:
            app.state.engine = None
            if owned is not None:
                owned.shutdown()

    routes = [
        *openai_api.routes,
        Route("/health", health, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    app.state.config = config
    app.state.engine = None
    return app


def run_server(config: Config) -> None:
    """Load the model first (so a bad --model fails fast with a clear message), then serve until stopped."""
    import uvicorn

    from nitro_torch.engine.async_engine import AsyncEngine

    logging.basicConfig(level=config.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = AsyncEngine.from_config(config)
    try:
        logger.info("serving %s at http://%s:%d/v1 (context %d tokens)", engine.model_name, config.server.host,
                    config.server.port, engine.max_model_len)
        uvicorn.run(
            create_app(config, engine),
            host=config.server.host,
            port=config.server.port,
            log_level=config.server.log_level,
            timeout_graceful_shutdown=5,
        )
    finally:
        engine.shutdown()
