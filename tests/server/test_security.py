"""API key, CORS, request ids and prompt-free logs (the "secure by default" options)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import openai
import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from nitro_torch.config import ConfigError, build_config
from nitro_torch.server.app import create_app
from nitro_torch.server.http.security import INVALID_KEY_MESSAGE, METRICS_PATHS, PUBLIC_PATHS

from .conftest import serving
from .helpers import ENGINE_OPTIONS

KEY = "sk-test-0123456789abcdef"
WRONG = "sk-test-wrong"
SECRET = "zebra-violet-7731"  # a prompt string that must not reach the logs
ORIGIN = "https://app.example.com"


def make_config(**options):
    return build_config({**ENGINE_OPTIONS, **options}, env={})


@pytest.fixture
def make_client(real_engine) -> Iterator:
    clients: list[TestClient] = []

    def make(**options) -> TestClient:
        client = TestClient(create_app(make_config(**options), real_engine), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_invalid_key(response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    if response.request.method == "HEAD":
        return
    if response.url.path.startswith("/v1/messages"):  # Anthropic's error body there
        assert response.json()["error"] == {"type": "authentication_error", "message": INVALID_KEY_MESSAGE}
        return
    error = response.json()["error"]
    assert error["message"].startswith("Incorrect API key provided")
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    assert error["code"] == "invalid_api_key"
    assert KEY not in response.text and WRONG not in response.text


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def route_calls(app, exempt: frozenset[str]) -> list[tuple[str, str]]:
    """Every (method, path) of the app's routes, exempt paths left out; unloadmodel last (it unloads)."""
    calls = [(method, concrete(route.path)) for route in app.routes if isinstance(route, Route)
             for method in sorted(route.methods or ()) if route.path not in exempt]
    return sorted(calls, key=lambda call: "unloadmodel" in call[1])


# --- API key ------------------------------------------------------------------------------------------------

def test_no_key_by_default(make_client):
    client = make_client()
    assert client.get("/v1/models").status_code == 200


def test_every_route_needs_the_key(make_client):
    client = make_client(api_key=KEY)
    calls = route_calls(client.app, PUBLIC_PATHS)
    assert ("POST", "/v1/chat/completions") in calls and ("GET", "/v1/models") in calls
    for method, path in calls:
        assert_invalid_key(client.request(method, path))
        assert_invalid_key(client.request(method, path, headers=bearer(WRONG)))
        assert_invalid_key(client.request(method, path, headers={"Authorization": KEY}))  # no scheme
        assert_invalid_key(client.request(method, path, headers={"Authorization": f"Basic {KEY}"}))
    for method, path in calls:
        # a body that is not JSON: the route answers (400 or so) without running anything heavy
        response = client.request(method, path, headers={**bearer(KEY), "Content-Type": "application/json"},
                                  content=b"not json" if method == "POST" else None)
        assert response.status_code != 401, (method, path, response.text)


def test_unknown_routes_need_the_key_too(make_client):
    client = make_client(api_key=KEY)
    assert_invalid_key(client.get("/no/such/route"))
    assert client.get("/no/such/route", headers=bearer(KEY)).status_code == 404


def test_exempt_routes_answer_without_a_key(make_client):
    client = make_client(api_key=KEY)
    assert client.get("/health").status_code == 200
    assert client.get("/healthz").status_code == 200
    assert client.get("/ready").status_code != 401
    assert client.get("/health", headers=bearer(WRONG)).status_code == 200


def test_metrics_exempt_only_when_public(make_client):
    private = make_client(api_key=KEY)
    public = make_client(api_key=KEY, metrics_public=True)
    for path in METRICS_PATHS:
        assert_invalid_key(private.get(path))
        assert public.get(path).status_code != 401
    assert_invalid_key(public.get("/v1/models"))


def test_right_key_serves(make_client):
    client = make_client(api_key=KEY)
    response = client.post("/v1/chat/completions", headers=bearer(KEY),
                           json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert client.get("/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200


def test_preflight_passes_without_a_key(make_client):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with_cors = make_client(api_key=KEY, allowed_origins=ORIGIN)
    response = with_cors.options("/v1/chat/completions", headers=preflight)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    without_cors = make_client(api_key=KEY)
    assert without_cors.options("/v1/chat/completions", headers=preflight).status_code != 401
    assert_invalid_key(without_cors.options("/v1/chat/completions"))  # not a preflight


def test_key_never_logged(make_client, caplog):
    caplog.set_level(logging.DEBUG)
    client = make_client(api_key=KEY, log_prompts=True)
    client.get("/v1/models", headers=bearer(WRONG))
    client.get("/v1/models", headers=bearer(KEY))
    client.post("/v1/chat/completions", headers=bearer(KEY),
                json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    assert KEY not in caplog.text and WRONG not in caplog.text


def test_key_from_file_env_and_config_repr(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(f"  {KEY}\n")
    config = build_config({"api_key_file": str(key_file)}, env={})
    assert config.security.api_key == KEY
    assert KEY not in repr(config)
    assert build_config(env={"NITRO_API_KEY": KEY}).security.api_key == KEY
    with pytest.raises(ConfigError, match="not both"):
        build_config({"api_key": KEY, "api_key_file": str(key_file)}, env={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        build_config({"api_key_file": str(tmp_path / "empty")}, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        build_config({"api_key_file": str(tmp_path / "missing")}, env={})


def test_help_does_not_show_the_key(monkeypatch, capsys):
    from nitro_torch.cli import build_parser

    monkeypatch.setenv("NITRO_API_KEY", KEY)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--api-key" in out and "--allowed-origins" in out and "--log-prompts" in out
    assert KEY not in out


# --- the official client against a real socket ---------------------------------------------------------------

@pytest.fixture
def keyed_server(real_engine) -> Iterator[str]:
    with serving(create_app(make_config(api_key=KEY), real_engine)) as url:
        yield url + "/v1"


def test_openai_client_wrong_and_right_key(keyed_server):
    messages = [{"role": "user", "content": "Hi"}]
    wrong = openai.OpenAI(base_url=keyed_server, api_key=WRONG, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.chat.completions.create(model="", messages=messages, max_tokens=2)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=keyed_server, api_key=KEY, max_retries=0)
    reply = right.chat.completions.create(model="", messages=messages, max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")
    chunks = list(right.chat.completions.create(model="", messages=messages, max_tokens=2, stream=True))
    assert chunks


# --- the admin key: only it loads or unloads the model --------------------------------------------------------

ADMIN_KEY = "sk-admin-fedcba9876543210"
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
UNLOAD = "/inferences/llamacpp/unloadmodel"
LOAD = "/inferences/llamacpp/loadmodel"


def assert_admin_key_required(response) -> None:
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["type"] == "permission_error" and error["code"] == "admin_key_required"
    assert "--admin-api-key" in error["message"]
    assert KEY not in response.text and ADMIN_KEY not in response.text


def test_user_key_cannot_unload_the_model(real_engine):
    """A real server with both keys: every spelling of unloadmodel / loadmodel refuses the user key (403) and
    a missing or wrong key (401), the model serves on; the admin key works there and on the user routes."""
    import httpx

    with serving(create_app(make_config(api_key=KEY, admin_api_key=ADMIN_KEY), real_engine)) as url:
        def call(method: str, path: str, key: str | None, **kwargs) -> httpx.Response:
            return httpx.request(method, url + path, headers=bearer(key) if key else {}, timeout=60, **kwargs)

        for method, path in [("GET", UNLOAD), ("POST", UNLOAD), ("GET", "/inferences/llamacpp/unloadModel"),
                             ("GET", "/INFERENCES/LLAMACPP/UNLOADMODEL"), ("GET", UNLOAD + "/"),
                             ("POST", "/inferences/llamacpp/loadModel")]:
            body = {"json": {"model": "default"}} if method == "POST" else {}
            assert_admin_key_required(call(method, path, KEY, **body))
            assert_invalid_key(call(method, path, None, **body))
            assert_invalid_key(call(method, path, WRONG, **body))
            assert_invalid_key(httpx.request(method, url + path, headers={"Authorization": f"Basic {ADMIN_KEY}"},
                                             timeout=60, **body))
        assert real_engine.is_alive
        assert call("POST", "/v1/chat/completions", KEY, json=CHAT).status_code == 200  # still serving
        assert call("GET", "/ready", None).status_code == 200
        assert call("POST", "/v1/chat/completions", ADMIN_KEY, json=CHAT).status_code == 200  # admin: user routes
        assert call("GET", "/v1/models", ADMIN_KEY).status_code == 200
        assert_invalid_key(call("POST", "/v1/chat/completions", None, json=CHAT))
        bad_load = call("POST", LOAD, ADMIN_KEY, json={"n_parallel": 1})  # past the key check: the body's fault
        assert bad_load.status_code == 400 and bad_load.json()["error"]["param"] == "llama_model_path"
        unloaded = call("POST", UNLOAD, ADMIN_KEY)
        assert unloaded.status_code == 200 and unloaded.json()["model"] == real_engine.model_name
        assert call("POST", "/v1/chat/completions", KEY, json=CHAT).json()["error"]["code"] == "model_not_loaded"


def test_admin_key_alone_closes_only_model_management(make_client):
    """--admin-api-key without --api-key: the user routes stay open, model management needs the admin key."""
    client = make_client(admin_api_key=ADMIN_KEY)
    assert client.get("/v1/models").status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    for path in (UNLOAD, "/inferences/llamacpp/UnloadModel"):
        assert_invalid_key(client.get(path))
        assert_invalid_key(client.get(path, headers=bearer(WRONG)))
    assert "admin API key" in client.get(UNLOAD).json()["error"]["message"]
    assert client.post(LOAD, headers=bearer(ADMIN_KEY), json={}).json()["error"]["param"] == "llama_model_path"
    assert client.get("/v1/models").status_code == 200  # nothing was unloaded


def test_without_an_admin_key_the_user_key_manages_models(make_client):
    client = make_client(api_key=KEY)
    assert_invalid_key(client.get(UNLOAD))
    assert client.post(LOAD, headers=bearer(KEY), json={}).json()["error"]["param"] == "llama_model_path"


def test_admin_key_file_and_env_on_a_real_server(tmp_path, tiny_model_dir, monkeypatch):
    """`nitro-torch serve` as a user runs it: the admin key from --admin-api-key-file (user key from the
    environment), then from NITRO_ADMIN_API_KEY (user key from --api-key-file)."""
    import httpx

    from .conftest import server_process

    admin_file, user_file = tmp_path / "admin-key", tmp_path / "user-key"
    admin_file.write_text(f"{ADMIN_KEY}\n")
    user_file.write_text(f"  {KEY}\n")
    common = ("--model", "none", "--device", "cpu", "--kv-cache-memory", "0.1", "--log-level", "warning")

    monkeypatch.setenv("NITRO_API_KEY", KEY)
    with server_process(*common, "--admin-api-key-file", str(admin_file)) as (_, url, log):
        def call(method: str, path: str, key: str | None, **kwargs) -> httpx.Response:
            return httpx.request(method, url + path, headers=bearer(key) if key else {}, timeout=120, **kwargs)

        assert_admin_key_required(call("POST", LOAD, KEY, json={"model": tiny_model_dir}))
        loaded = call("POST", LOAD, ADMIN_KEY, json={"model": tiny_model_dir})
        assert loaded.status_code == 200, loaded.text
        assert call("POST", "/v1/chat/completions", KEY, json=CHAT).status_code == 200
        assert_admin_key_required(call("GET", UNLOAD, KEY))
        assert_invalid_key(call("GET", UNLOAD, None))
        assert call("POST", "/v1/chat/completions", KEY, json=CHAT).status_code == 200  # the model serves on
        assert call("GET", UNLOAD, ADMIN_KEY).status_code == 200
        assert KEY not in log.read_text() and ADMIN_KEY not in log.read_text()
    monkeypatch.delenv("NITRO_API_KEY")

    monkeypatch.setenv("NITRO_ADMIN_API_KEY", ADMIN_KEY)
    with server_process(*common, "--api-key-file", str(user_file)) as (_, url, _log):
        assert_admin_key_required(httpx.get(url + UNLOAD, headers=bearer(KEY), timeout=60))
        not_loaded = httpx.get(url + UNLOAD, headers=bearer(ADMIN_KEY), timeout=60)  # past the key check
        assert not_loaded.status_code == 409 and not_loaded.json()["error"]["code"] == "model_not_loaded"
        assert_invalid_key(httpx.get(url + "/v1/models", timeout=60))
        assert httpx.get(url + "/v1/models", headers=bearer(ADMIN_KEY), timeout=60).status_code == 200


# --- CORS ---------------------------------------------------------------------------------------------------

def test_cors_off_by_default(make_client):
    client = make_client()
    response = client.get("/v1/models", headers={"Origin": ORIGIN})
    assert not [name for name in response.headers if name.lower().startswith("access-control-")]
    preflight = client.options("/v1/models", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
    assert not [name for name in preflight.headers if name.lower().startswith("access-control-")]


def test_cors_for_allowed_origins_only(make_client):
    client = make_client(allowed_origins=f"{ORIGIN}, https://other.example.org")
    allowed = client.get("/v1/models", headers={"Origin": ORIGIN})
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-credentials" not in allowed.headers
    assert "x-request-id" in allowed.headers["access-control-expose-headers"].lower()
    other = client.get("/v1/models", headers={"Origin": "https://evil.example.net"})
    assert "access-control-allow-origin" not in other.headers


def test_cors_star_without_credentials(make_client):
    client = make_client(allowed_origins="*", api_key=KEY)
    response = client.get("/v1/models", headers={"Origin": "https://anywhere.example", **bearer(KEY)})
    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers
    # a 401 still carries the CORS header, so a browser app can read the error
    denied = client.get("/v1/models", headers={"Origin": "https://anywhere.example"})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "*"


# --- request ids --------------------------------------------------------------------------------------------

def test_request_id_echoed_or_made(make_client):
    client = make_client()
    assert client.get("/health", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = client.get("/health").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert client.get("/health").headers["x-request-id"] != made
    for bad in ("a" * 129, "has space", "tab\there"):
        got = client.get("/health", headers={"X-Request-Id": bad}).headers["x-request-id"]
        assert got != bad and re.fullmatch(r"[0-9a-f]{32}", got)
    assert client.get("/health", headers={"X-Request-Id": "b" * 128}).headers["x-request-id"] == "b" * 128


def test_request_id_on_errors_and_streams(make_client):
    client = make_client(api_key=KEY)
    denied = client.get("/v1/models", headers={"X-Request-Id": "rid-401"})
    assert denied.status_code == 401 and denied.headers["x-request-id"] == "rid-401"
    missing = client.get("/nope", headers={"X-Request-Id": "rid-404", **bearer(KEY)})
    assert missing.status_code == 404 and missing.headers["x-request-id"] == "rid-404"
    bad = client.post("/v1/chat/completions", headers={"X-Request-Id": "rid-400", **bearer(KEY)}, content=b"{")
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "rid-400"
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body,
                       headers={"X-Request-Id": "rid-sse", **bearer(KEY)}) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["x-request-id"] == "rid-sse"
        assert "data: [DONE]" in "".join(stream.iter_text())


def test_request_id_in_log_records(make_client, caplog):
    caplog.set_level(logging.INFO, logger="nitro_torch")
    client = make_client(api_key=KEY)
    client.get("/v1/models", headers={"X-Request-Id": "rid-logged"})
    records = [record for record in caplog.records if getattr(record, "request_id", None) == "rid-logged"]
    assert records, [(r.getMessage(), getattr(r, "request_id", None)) for r in caplog.records]
    outside = logging.getLogger("nitro_torch.test").makeRecord("x", logging.INFO, "f", 1, "m", (), None)
    assert outside.request_id == "-"


# --- prompts stay out of the logs ---------------------------------------------------------------------------

def chat_and_complete(client: TestClient) -> None:
    headers = {"X-Request-Id": "rid-prompt"}
    chat = client.post("/v1/chat/completions", headers=headers,
                       json={"messages": [{"role": "user", "content": f"Say {SECRET}"}], "max_tokens": 2})
    assert chat.status_code == 200, chat.text
    text = client.post("/v1/completions", headers=headers, json={"prompt": f"Say {SECRET}", "max_tokens": 2})
    assert text.status_code == 200, text.text
    embedded = client.post("/v1/embeddings", headers=headers, json={"input": SECRET})
    assert embedded.status_code == 200, embedded.text


def test_prompts_not_logged_by_default(make_client, caplog):
    caplog.set_level(logging.DEBUG)
    chat_and_complete(make_client())
    assert caplog.records  # something was logged at all levels...
    assert SECRET not in caplog.text  # ...but no prompt
    assert all(SECRET not in str(record.args) for record in caplog.records)


def test_prompts_logged_with_log_prompts(make_client, caplog):
    caplog.set_level(logging.INFO)
    chat_and_complete(make_client(log_prompts=True))
    records = [record for record in caplog.records if SECRET in record.getMessage()]
    assert len(records) == 3
    assert all(record.request_id == "rid-prompt" and record.levelno == logging.INFO for record in records)


def test_request_id_on_unexpected_500(make_client):
    async def boom(request):
        raise RuntimeError("boom")

    client = make_client()
    client.app.router.routes.append(Route("/boom-for-test", boom))
    response = client.get("/boom-for-test", headers={"X-Request-Id": "rid-500"})
    assert response.status_code == 500 and response.headers["x-request-id"] == "rid-500"
    assert response.json()["error"]["code"] == "internal_error"
