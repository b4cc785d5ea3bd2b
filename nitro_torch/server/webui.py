"""The chat page: `GET /` and its static files under /static/, shipped inside the package (no CDN, no build step)."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

WEBUI_DIR = Path(__file__).with_name("webui")
PAGE_PATH = "/"
STATIC_PREFIX = "/static"
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate, so an upgraded server never runs with a stale page


async def chat_page(request: Request) -> FileResponse:
    return FileResponse(WEBUI_DIR / "index.html", media_type="text/html", headers=NO_CACHE)


class _RevalidatedStatic(StaticFiles):
    def file_response(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - StaticFiles' own signature
        response = super().file_response(*args, **kwargs)
        response.headers.update(NO_CACHE)
        return response


routes = [
    Route(PAGE_PATH, chat_page, methods=["GET"]),
    Mount(STATIC_PREFIX, app=_RevalidatedStatic(directory=WEBUI_DIR), name="static"),
]
