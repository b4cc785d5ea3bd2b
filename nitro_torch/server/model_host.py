"""ModelHost: owns the serving EngineClient (or none) and swaps it while the server stays up.

A switch keeps the previous model serving as long as it can:
  1. LOADING    a hub model the cache lacks is downloaded, then the new engine is staged (`stage_engine`: a new
                core process loads the weights, onto the CPU when the target is a GPU, so the old engine keeps
                its GPU memory); the old engine still serves. A failure here changes nothing.
  2. SWITCHING  new requests get 503 `model_switching` (+ Retry-After); the old engine drains (every lease
                released, no live engine request) and is shut down, its memory freed.
  3.            the new weights move to the device, the engine (KV cache) is built and warmed up. If that
                fails, the old model is reloaded from its config (from disk: its memory was already freed).

Every request that uses the engine holds a `Lease` from `acquire()` until its response is fully sent
(streams included): `LeaseMiddleware` releases it, `context.get_engine` takes it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import traceback
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from nitro_torch.config import Config
from nitro_torch.engine.client import stage_engine, start_engine_client
from nitro_torch.server.http.errors import APIError

if TYPE_CHECKING:
    from nitro_torch.engine.client import EngineClient, StagedEngine

logger = logging.getLogger("nitro_torch.server")

NO_MODEL = "none"
"""`--model none`: start without a model and wait for POST /inferences/llamacpp/loadmodel (as Nitro did)."""
LOAD_ROUTE = "POST /inferences/llamacpp/loadmodel"
_LEASE_SCOPE_KEY = "nitro_torch.lease"
_DRAIN_POLL_S = 0.05


class HostState(str, Enum):
    EMPTY = "empty"  # no model
    READY = "ready"  # serving
    LOADING = "loading"  # new weights loading; the current model (if any) still serves
    SWITCHING = "switching"  # draining the old engine / starting the new one: new requests are turned away
    UNLOADING = "unloading"  # draining before an unload


class RetryLaterError(APIError):
    """503 with a Retry-After header: the model is being switched."""

    def __init__(self, message: str, code: str, retry_after_s: int) -> None:
        super().__init__(503, message, code=code)
        self.headers = {"Retry-After": str(retry_after_s)}

    def response(self, headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
        return super().response({**(self.headers or {}), **(headers or {})}, path)


class ModelLoadError(Exception):
    """A load failed; `cause` is why. `serving` names the model serving afterwards (None: no model)."""

    def __init__(self, cause: BaseException, phase: str, serving: str | None, restored: bool = False) -> None:
        super().__init__(f"{phase}: {type(cause).__name__}")
        self.cause = cause
        self.phase = phase  # "load" (old model untouched) or "start" (old engine already shut down)
        self.serving = serving
        self.restored = restored  # the previous model was reloaded after the new one failed to start


@dataclass
class Serving:
    """One installed engine and what it was started with."""

    engine: EngineClient
    config: Config
    owned: bool  # shut down by the host when replaced or closed
    embedding: bool = True
    any_model_name: bool = False
    """Loaded through Nitro's loadmodel, whose clients name models their own way (Nitro ignored `model`)."""
    loaded_at: int = dataclasses.field(default_factory=lambda: int(time.time()))
    leases: int = 0

    @property
    def idle(self) -> bool:
        return self.leases == 0 and self.engine.num_live_requests == 0


class Lease:
    """A request's claim on one engine: the engine is not shut down (short of the drain timeout) before release."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving
        self.engine = serving.engine
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.serving.leases -= 1


class LeaseHolder:
    """Put in each HTTP request's scope by LeaseMiddleware; `get_engine` fills it on first use."""

    def __init__(self) -> None:
        self.lease: Lease | None = None

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()


class LeaseMiddleware:
    """Releases a request's lease once the app is done with it: after the last byte of a stream, on errors too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder = scope[_LEASE_SCOPE_KEY] = LeaseHolder()
        try:
            await self.app(scope, receive, send)
        finally:
            holder.release()


def lease_holder(request: Request) -> LeaseHolder | None:
    return request.scope.get(_LEASE_SCOPE_KEY)


def get_host(request: Request) -> ModelHost:
    return request.app.state.host


class ModelHost:
    def __init__(self, base_config: Config, *, drain_timeout_s: float = 120.0, retry_after_s: int = 5) -> None:
        self.base_config = base_config  # the start-up configuration; loads override its model fields
        self.drain_timeout_s = drain_timeout_s
        self.retry_after_s = retry_after_s
        self._serving: Serving | None = None
        self.served_metrics: list[tuple[str, Any]] = []
        """(model name, its engine's RequestMetrics) of every engine that has served, in order: what /metrics
        exports, so an engine that came and went between two scrapes is still counted (no engine is kept)."""
        self.state = HostState.EMPTY
        self.lost_model: str | None = None
        """The model a failed switch could not bring back (no model is loaded, though none was unloaded)."""
        self._switch: asyncio.Future[Any] | None = None

    @property
    def serving(self) -> Serving | None:
        return self._serving

    @serving.setter
    def serving(self, serving: Serving | None) -> None:
        self._serving = serving
        metrics = getattr(serving.engine, "request_metrics", None) if serving else None
        if serving is not None and metrics is not None and not any(seen is metrics for _, seen in self.served_metrics):
            self.served_metrics.append((serving.engine.model_name, metrics))

    # what routes see ------------------------------------------------------------------------------

    @property
    def engine(self) -> EngineClient | None:
        """The installed engine, also while it drains (None when no model is loaded)."""
        return self.serving.engine if self.serving else None

    @property
    def busy(self) -> bool:
        return self.state in (HostState.LOADING, HostState.SWITCHING, HostState.UNLOADING)

    @property
    def in_flight(self) -> int:
        return self.serving.leases if self.serving else 0

    def unavailable_error(self) -> APIError | None:
        """Why a new request cannot have the engine now, or None when it can."""
        if self.state in (HostState.SWITCHING, HostState.UNLOADING) or (self.serving is None and self.busy):
            doing = "unloaded" if self.state == HostState.UNLOADING else "switched"
            return RetryLaterError(f"The model is being {doing}; retry in a few seconds.", "model_switching",
                                   self.retry_after_s)
        if self.serving is None:
            return APIError(503, f"No model is loaded. Load one with {LOAD_ROUTE}.", code="model_not_loaded")
        return None

    def liveness_error(self) -> APIError | None:
        """Why the process needs a restart, or None. A switch and an empty host (--model none, an unload) are
        alive: readiness alone turns traffic away then, so a long switch does not restart the pod. A stopped
        engine that no switch is replacing, or a model lost by a failed switch, is not alive."""
        if self.busy:
            return None
        if self.serving is None:
            if self.lost_model is None:
                return None
            return APIError(503, "No model is loaded: a failed switch could not bring the previous model back.",
                            type="server_error", code="model_lost")
        if not self.serving.engine.is_alive:
            return APIError(503, "The inference engine has stopped.", type="server_error", code="engine_dead")
        return None

    def acquire(self) -> Lease:
        error = self.unavailable_error()
        if error is not None:
            raise error
        assert self.serving is not None
        self.serving.leases += 1
        return Lease(self.serving)

    # installing, loading, unloading ---------------------------------------------------------------

    def install(self, engine: EngineClient, config: Config, *, owned: bool, embedding: bool = True) -> None:
        """Serve an engine that is already running (start-up); only while no model is loaded."""
        if self.serving is not None or self.busy:
            raise RuntimeError("a model is already installed")
        self.serving = Serving(engine, config, owned, embedding)
        self.state = HostState.READY
        self.lost_model = None

    async def load(self, config: Config, *, embedding: bool = True, cpu_threads: int | None = None) -> Serving:
        """Load `config.model` and serve it instead of the current model; raises ModelLoadError on failure.

        409 if a load or unload is already running. The switch finishes even if the caller is cancelled.
        """
        self._begin(HostState.LOADING)
        self._switch = asyncio.ensure_future(self._load(config, embedding, cpu_threads))
        return await asyncio.shield(self._switch)

    async def unload(self) -> str:
        """Drain and shut down the current model; returns its name. 409 when none is loaded."""
        if self.serving is None and not self.busy:
            raise APIError(409, "No model is loaded.", code="model_not_loaded")
        self._begin(HostState.UNLOADING)
        self._switch = asyncio.ensure_future(self._unload())
        return await asyncio.shield(self._switch)

    def close(self) -> None:
        """Shut down the engine the host owns (server exit)."""
        serving, self.serving = self.serving, None
        self.state = HostState.EMPTY
        if serving is not None and serving.owned:
            serving.engine.shutdown()

    def _begin(self, state: HostState) -> None:
        if self.busy:
            raise APIError(409, f"A model {self.state.value.removesuffix('ing')} is already in progress; "
                                "wait for it to finish.", code="load_in_progress")
        self.state = state

    def _settle(self) -> None:
        self.state = HostState.READY if self.serving is not None else HostState.EMPTY

    async def _load(self, config: Config, embedding: bool, cpu_threads: int | None) -> Serving:
        try:
            try:
                await asyncio.to_thread(fetch_model_files, config, progress=False)
                staged: StagedEngine = await asyncio.to_thread(stage_engine, config, cpu_threads=cpu_threads)
            except Exception as exc:
                raise ModelLoadError(exc, "load", self.engine.model_name if self.engine else None) from exc
            self.state = HostState.SWITCHING
            previous = None
            if self.serving is not None:
                previous = _Previous.of(self.serving)
                await self._retire(self.serving)
            try:
                engine = await self._start(staged)
            except Exception as exc:
                logger.error("starting %s failed", config.model.model, exc_info=exc)
                await asyncio.to_thread(staged.discard)
                del staged
                traceback.clear_frames(exc.__traceback__)  # the frames hold the new model: free it first
                await asyncio.to_thread(free_memory)
                restored = await self._restore(previous)
                if previous is not None and restored is None:
                    self.lost_model = previous.config.model.model
                raise ModelLoadError(exc, "start", restored.engine.model_name if restored else None,
                                     restored=restored is not None) from None
            self.serving = Serving(engine, config, owned=True, embedding=embedding, any_model_name=True)
            self.lost_model = None
            logger.info("now serving %s", engine.model_name)
            return self.serving
        finally:
            self._settle()

    async def _start(self, staged: StagedEngine) -> EngineClient:
        engine = await asyncio.to_thread(staged.start)
        try:
            await warm_up(engine)
        except BaseException:
            await asyncio.to_thread(engine.shutdown)
            raise
        return engine

    async def _unload(self) -> str:
        try:
            assert self.serving is not None
            name = self.serving.engine.model_name
            await self._retire(self.serving)
            self.lost_model = None
            logger.info("unloaded %s", name)
            return name
        finally:
            self._settle()

    async def _retire(self, serving: Serving) -> None:
        """Drain (leases and live engine requests), then shut down and free the old engine."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout_s
        while not serving.idle and loop.time() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        if not serving.idle:
            logger.warning("drain timeout (%.0f s): %d requests on %s end with an error", self.drain_timeout_s,
                           serving.leases, serving.engine.model_name)
        self.serving = None
        if serving.owned:
            await asyncio.to_thread(serving.engine.shutdown)
        del serving  # the last reference (for an owned engine), so free_memory can release its weights
        await asyncio.to_thread(free_memory)

    async def _restore(self, previous: _Previous | None) -> Serving | None:
        """After the new engine failed to start: serve the previous model again, if there was one."""
        if previous is None:
            return None
        if previous.kept is not None and previous.kept.engine.is_alive:  # the caller's engine: put it back
            self.serving = previous.kept
            return self.serving
        logger.warning("restoring the previous model %s", previous.config.model.model)
        try:
            engine = await asyncio.to_thread(start_engine_client, previous.config)
        except Exception:
            logger.exception("could not restore the previous model; no model is loaded")
            return None
        self.serving = Serving(engine, previous.config, owned=True, embedding=previous.embedding)
        return self.serving


@dataclass
class _Previous:
    """What a restore needs of a retired model: its engine only when the host never owned (or shut) it."""

    config: Config
    embedding: bool
    kept: Serving | None

    @classmethod
    def of(cls, serving: Serving) -> _Previous:
        return cls(serving.config, serving.embedding, None if serving.owned else serving)


def fetch_model_files(config: Config, progress: bool) -> None:
    """Download a hub model the cache lacks, here rather than in the engine core: its errors keep their kind
    (loadmodel answers each with its own status) and the download's progress shows in this process."""
    from nitro_torch.models.hub import fetch_model

    model = config.model
    fetch_model(model.model, hf_token_file=model.hf_token_file, cache_dir=model.model_cache_dir, progress=progress)


async def warm_up(engine: EngineClient) -> None:
    """One greedy token, as Nitro's warm-up did: a model whose forward pass fails is caught before it serves."""
    from nitro_torch.sampling import SamplingParams

    prompt = list(engine.tokenizer.encode("Hello")) or [0]
    async for _ in engine.generate(f"warmup-{uuid.uuid4().hex}", prompt, SamplingParams(max_tokens=1, temperature=0.0)):
        pass
    engine.request_metrics.reset()  # /metrics counts traffic only


def free_memory() -> None:
    from nitro_torch.engine.loading import free_memory as free

    free()
