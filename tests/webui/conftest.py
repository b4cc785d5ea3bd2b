"""Fixtures for the chat page: real `nitro-torch serve` processes (one open, one with --api-key) on the
embedded default model, and headless Chromium driven by Playwright (Debian's /usr/bin/chromium)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import server_process

CHROMIUM = "/usr/bin/chromium"
API_KEY = "secret-key"
SERVER_OPTIONS = ("--max-model-len", "2048", "--log-level", "warning")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


@pytest.fixture(scope="session")
def page_server() -> Iterator[str]:
    """Base URL of a server without an API key."""
    with server_process(*SERVER_OPTIONS) as (_, base_url, _):
        yield base_url


@pytest.fixture(scope="session")
def keyed_server() -> Iterator[str]:
    """Base URL of a server started with --api-key."""
    with server_process(*SERVER_OPTIONS, "--api-key", API_KEY) as (_, base_url, _):
        yield base_url


@pytest.fixture(scope="session")
def browser():
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


class PageErrors(list):
    """Uncaught exceptions of the page's scripts."""


def open_page(browser, request, viewport=DESKTOP, **context_options):
    """A page in a fresh context (empty localStorage); returns (context, page, errors)."""
    context = browser.new_context(viewport=viewport, **context_options)
    context.set_default_timeout(30_000)
    page = context.new_page()
    errors = PageErrors()
    page.on("pageerror", lambda error: errors.append(str(error)))
    return context, page, errors


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


@pytest.fixture
def page(browser, request):
    """A desktop-sized page; its screenshot is saved as artifacts/screenshots/<test name>.png at the end."""
    context, page, errors = open_page(browser, request)
    try:
        yield page
        screenshot(page, request.node.name)
        assert not errors, f"errors in the page's scripts: {errors}"
    finally:
        context.close()


def metric(base_url: str, name: str, headers: dict | None = None, **labels: str) -> float:
    """The sum of the samples of Prometheus metric `name` whose labels include `labels` (0 when absent)."""
    text = httpx.get(base_url + "/metrics", headers=headers or {}, timeout=10).text
    total = 0.0
    for match in re.finditer(rf"^{re.escape(name)}(?:\{{(.*?)\}})? (\S+)$", text, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def wait_for_metric(base_url: str, name: str, expected: float, timeout: float = 10, **labels: str) -> float:
    """Polls metric `name` until it equals `expected`; returns the last value seen."""
    deadline = time.monotonic() + timeout
    value = metric(base_url, name, **labels)
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        value = metric(base_url, name, **labels)
    return value
