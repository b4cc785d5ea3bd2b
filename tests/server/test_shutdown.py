"""EngineClient.shutdown() while a request streams: the request ends with EngineError instead of hanging."""

import asyncio

import pytest

from nitro_torch.config import build_config
from nitro_torch.engine.client import EngineError
from nitro_torch.sampling import SamplingParams

from .helpers import ENGINE_OPTIONS, HELLO, template_ids


def test_shutdown_fails_a_streaming_request(own_engine, tokenizer):
    prompt = template_ids(tokenizer, HELLO)
    params = SamplingParams(max_tokens=500, ignore_eos=True, temperature=0)

    async def scenario() -> list[str]:
        stream = own_engine.generate("streaming", prompt, params)
        received = [(await anext(stream)).new_text for _ in range(2)]
        assert own_engine.stats().num_running == 1
        own_engine.shutdown()  # what the app's lifespan does, on the event loop's thread

        async def drain() -> None:
            async for output in stream:
                assert not output.finished  # nothing may pretend the request completed
                received.append(output.new_text)

        with pytest.raises(EngineError):
            await asyncio.wait_for(drain(), timeout=5)
        return received

    received = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert "".join(received)  # it really was generating before the shutdown
    assert not own_engine.is_alive

    async def after_shutdown() -> None:
        async for _ in own_engine.generate("late", prompt, params):
            pass

    with pytest.raises(EngineError):
        asyncio.run(asyncio.wait_for(after_shutdown(), timeout=5))


def test_health_turns_503_once_the_engine_has_stopped(own_engine):
    from starlette.testclient import TestClient

    from nitro_torch.server.app import create_app

    with TestClient(create_app(build_config(ENGINE_OPTIONS, env={}), own_engine)) as client:
        assert client.get("/health").status_code == 200
        own_engine.shutdown()
        response = client.get("/health")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "engine_dead"
