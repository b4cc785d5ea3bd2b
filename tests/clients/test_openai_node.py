"""The official `openai` npm client's suite (node/openai.test.mjs), run by `node --test` against this session's
live server on the real default model and the tiny tool model's server. scripts/setup installs the client
(`npm ci --prefix tests/clients/node`); without Node.js or that install the test skips and says why (fails in CI)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.server.conftest import RunningServer

pytestmark = pytest.mark.slow

NODE_DIR = Path(__file__).parent / "node"
SUITE = NODE_DIR / "openai.test.mjs"
NODE_TIMEOUT_S = 600


def tap_counts(output: str) -> dict[str, int]:
    """The summary of node's TAP reporter: `# pass 19`, `# fail 0`, `# skipped 0`, ..."""
    return {name: int(value) for name, value in re.findall(r"^# (\w+) (\d+)$", output, flags=re.MULTILINE)}


def missing(reason: str) -> None:
    """In CI (where Node.js is part of the machine) a missing client is a failure, elsewhere a skip."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def test_the_npm_openai_client_suite_passes(request: pytest.FixtureRequest) -> None:
    node = shutil.which("node")
    if node is None:
        missing("node is not installed: the npm openai client suite needs Node.js (scripts/setup warned)")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        missing("tests/clients/node/node_modules is missing: scripts/setup installs it "
                "(npm ci --prefix tests/clients/node)")
    # The servers start only once the suite can run.
    live_server: RunningServer = request.getfixturevalue("live_server")
    tool_server_url: str = request.getfixturevalue("tool_server_url")
    env = {**os.environ, "NITRO_BASE_URL": live_server.api_url, "NITRO_TOOL_BASE_URL": tool_server_url}
    try:
        result = subprocess.run([node, "--test", "--test-reporter=tap", str(SUITE)], env=env, check=False,
                                capture_output=True, text=True, timeout=NODE_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"node --test ran past {NODE_TIMEOUT_S} s:\n{exc.stdout}\n{exc.stderr}")
    output = result.stdout + result.stderr
    counts = tap_counts(result.stdout)
    expected = len(re.findall(r"^test\(", SUITE.read_text(), flags=re.MULTILINE))
    assert result.returncode == 0 and counts.get("fail") == 0, f"node --test failed:\n{output}"
    assert counts.get("pass") == expected and counts.get("skipped") == 0, f"not every test ran:\n{output}"
