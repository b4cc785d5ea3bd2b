"""HTTP layer: OpenAI-compatible API over the engine (Starlette + uvicorn)."""

from nitro_torch.server.app import create_app, run_server

__all__ = ["create_app", "run_server"]
