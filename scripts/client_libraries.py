"""The client libraries nitro_torch's users talk to it with, used as their users use them, against a running server.

Not part of the test suite: these libraries are not the project's dependencies. Set them up once in a separate
environment, start a server, then run this file from that environment:

    python3 -m venv /tmp/clients && /tmp/clients/bin/pip install instructor langchain-openai \
        "pydantic-ai-slim[openai]" litellm anthropic
    .venv/bin/nitro-torch serve --port 3951 &
    /tmp/clients/bin/python scripts/client_libraries.py http://127.0.0.1:3951

Prints one line per check (ok or FAIL with the error) and a count; exits 1 if any failed. The small default model
often answers oddly, so the checks look at the shape of each answer (a parsed object, a tool call, a stream that
completes), not at its wisdom.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

BASE = sys.argv[1].rstrip("/") if len(sys.argv) > 1 else "http://127.0.0.1:3928"
V1 = BASE + "/v1"
WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}}]
CHECKS: list[tuple[str, Callable[[], Any]]] = []


class City(BaseModel):
    name: str
    country: str


def check(name: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    def register(run: Callable[[], Any]) -> Callable[[], Any]:
        CHECKS.append((name, run))
        return run
    return register


@check("instructor, TOOLS mode (its default)")
def instructor_tools() -> Any:
    import instructor
    from openai import OpenAI

    client = instructor.from_openai(OpenAI(base_url=V1, api_key="unused"), mode=instructor.Mode.TOOLS)
    return client.chat.completions.create(model="gpt-4o-mini", response_model=City, max_retries=0, max_tokens=60,
                                          temperature=0, messages=[{"role": "user", "content": "Paris is in France."}])


@check("langchain-openai, bind_tools(tool_choice='any')")
def langchain_bind_tools() -> Any:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(base_url=V1, api_key="unused", temperature=0, max_tokens=60)
    reply = llm.bind_tools([get_weather], tool_choice="any").invoke("What is the weather in Paris?")
    assert reply.tool_calls, reply
    return reply.tool_calls[0]


@check("langchain-openai, with_structured_output(method='function_calling')")
def langchain_structured() -> Any:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=V1, api_key="unused", temperature=0, max_tokens=60)
    return llm.with_structured_output(City, method="function_calling").invoke("Paris is in France.")


@check("langchain-openai, use_responses_api=True")
def langchain_responses() -> Any:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=V1, api_key="unused", temperature=0, max_tokens=20, use_responses_api=True)
    return llm.invoke("Say hello.").text


@check("pydantic-ai, tool output over chat completions")
def pydantic_ai_chat() -> Any:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("gpt-4o", provider=OpenAIProvider(base_url=V1, api_key="unused"))
    agent = Agent(model, output_type=City, retries=0, model_settings={"temperature": 0, "max_tokens": 60})
    return agent.run_sync("Paris is in France.").output


@check("pydantic-ai, OpenAIResponsesModel")
def pydantic_ai_responses() -> Any:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIResponsesModel("gpt-4o", provider=OpenAIProvider(base_url=V1, api_key="unused"))
    agent = Agent(model, retries=0, model_settings={"temperature": 0, "max_tokens": 20})
    return agent.run_sync("Say hello.").output


@check("litellm, tools with tool_choice='required'")
def litellm_tools() -> Any:
    import litellm

    reply = litellm.completion(model="openai/gpt-4o", api_base=V1, api_key="unused", tools=CHAT_TOOLS,
                               tool_choice="required", max_tokens=60, temperature=0,
                               messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert reply.choices[0].message.tool_calls
    return reply.choices[0].message.tool_calls[0].function


@check("openai, responses.create and responses.stream")
def openai_responses() -> Any:
    from openai import OpenAI

    client = OpenAI(base_url=V1, api_key="unused")
    created = client.responses.create(model="gpt-4o", input="Say hello.", max_output_tokens=10)
    # get_final_response() needs response.completed: room to finish (a cut answer ends in response.incomplete).
    with client.responses.stream(model="gpt-4o", input="Say hi.", max_output_tokens=300) as stream:
        final = stream.get_final_response()
    return created.status, final.output_text


@check("anthropic, messages.create, messages.stream and a forced tool_use")
def anthropic_messages() -> Any:
    import anthropic

    client = anthropic.Anthropic(base_url=BASE, api_key="unused")
    hello = [{"role": "user", "content": "Hi"}]
    created = client.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=hello)
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=10, messages=hello) as stream:
        text = "".join(stream.text_stream)
    tool = {"name": "get_weather", "input_schema": WEATHER_PARAMETERS}
    called = client.messages.create(model="claude", max_tokens=60, tools=[tool],
                                    tool_choice={"type": "tool", "name": "get_weather"},
                                    messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert called.stop_reason == "tool_use", called
    return created.stop_reason, text, called.content[-1].input


def main() -> int:
    results = []
    for name, run in CHECKS:
        try:
            results.append((name, "ok", str(run())))
        except Exception as exc:  # each check reports its own failure; the others still run
            results.append((name, "FAIL", f"{type(exc).__name__}: {exc}"))
    width = max(len(name) for name, _, _ in results)
    for name, status, detail in results:
        print(f"{name:<{width}}  {status:<4}  {detail[:90]}".replace("\n", " "))
    passed = sum(status == "ok" for _, status, _ in results)
    print(f"{passed}/{len(results)} passed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
