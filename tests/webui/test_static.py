"""The chat page's files over HTTP (no browser): served from the package, public, self-contained."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import httpx

from nitro_torch.server.webui import WEBUI_DIR

from .conftest import API_KEY

EXTERNAL = re.compile(r"""(?:src|href|url|import|from|fetch)\s*[=(]?\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):  # noqa: ANN001, ANN201
        self.refs += [value for name, value in attrs if name in ("src", "href") and value]


def page_assets(html: str) -> list[str]:
    parser = _Assets()
    parser.feed(html)
    return parser.refs


def test_page_and_assets_are_served(page_server):
    page = httpx.get(page_server + "/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    refs = page_assets(page.text)
    assert "/static/app.js" in refs and "/static/style.css" in refs
    for ref in refs:
        assert ref.startswith("/static/"), f"{ref}: the page may only load its own files"
        asset = httpx.get(page_server + ref, timeout=10)
        assert asset.status_code == 200, ref
    script = httpx.get(page_server + "/static/app.js", timeout=10)
    assert re.match(r"(text|application)/javascript", script.headers["content-type"])
    assert httpx.get(page_server + "/static/markdown.js", timeout=10).status_code == 200
    assert httpx.get(page_server + "/static/nope.js", timeout=10).status_code == 404


def test_modules_import_only_their_siblings():
    for path in WEBUI_DIR.glob("*.js"):
        for target in re.findall(r"""^\s*import\b[^;]*?from\s*["']([^"']+)["']""", path.read_text(), re.MULTILINE):
            assert target.startswith("./") and (WEBUI_DIR / target).is_file(), f"{path.name} imports {target}"


def test_no_external_references():
    files = [p for p in WEBUI_DIR.iterdir() if p.suffix in (".html", ".js", ".css", ".svg")]
    assert {"index.html", "app.js", "markdown.js", "style.css"} <= {p.name for p in files}
    for path in files:
        text = path.read_text()
        assert not EXTERNAL.search(text), f"{path.name} refers to an external URL: {EXTERNAL.search(text)[0]}"
        assert "@import" not in text, path.name
        # Model text reaches the DOM as text nodes only: no HTML parsing sinks anywhere in the page's code.
        sink = re.search(r"\.(?:innerHTML|outerHTML)\s*\+?=|insertAdjacentHTML\(|createContextualFragment\(|"
                         r"\bDOMParser\b|document\.write|\beval\(|new Function\(", text)
        assert not sink, f"{path.name}: {sink and sink[0]}"


def test_page_is_public_on_a_keyed_server(keyed_server):
    assert httpx.get(keyed_server + "/", timeout=10).status_code == 200
    assert httpx.get(keyed_server + "/static/app.js", timeout=10).status_code == 200
    refused = httpx.get(keyed_server + "/v1/models", timeout=10)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    allowed = httpx.get(keyed_server + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert allowed.status_code == 200


def test_webui_dir_is_in_the_package():
    assert WEBUI_DIR == Path(__import__("nitro_torch").__file__).parent / "server" / "webui"
