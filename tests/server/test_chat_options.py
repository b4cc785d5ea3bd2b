"""Chat-completion fields beyond the basics, over HTTP on the real model: n, usage options, content parts,
model names, template controls and Nitro's prompt-prefix mode."""

from __future__ import annotations

import json

import openai
import pytest

from nitro_torch.config import ChatConfig
from nitro_torch.server.chat.protocol import ChatMessage
from nitro_torch.server.chat.template import ChatFormatter, PromptPrefixes, to_template_messages

from .helpers import HELLO, engine_reference, template_ids, wait_until_idle

STORY = [{"role": "user", "content": "Tell me a short story about a robot."}]


def sse_payloads(response) -> list[dict]:
    events = [line.removeprefix("data: ") for line in response.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_n_choices_share_the_prompt_and_count_it_once(client, tokenizer, real_engine):
    body = {"messages": STORY, "n": 3, "max_tokens": 12, "temperature": 1.0, "seed": 7}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    choices = data["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    prompt_len = len(template_ids(tokenizer, STORY))
    tokens = [len(tokenizer(c["message"]["content"], add_special_tokens=False)["input_ids"]) for c in choices]
    assert data["usage"]["prompt_tokens"] == prompt_len
    assert data["usage"]["completion_tokens"] >= sum(tokens) - 3  # EOS tokens count but render no text
    assert data["usage"]["total_tokens"] == prompt_len + data["usage"]["completion_tokens"]
    texts = [c["message"]["content"] for c in choices]
    assert len(set(texts)) > 1, "seed + i gives each choice its own draws"
    again = client.post("/v1/chat/completions", json=body).json()
    assert [c["message"]["content"] for c in again["choices"]] == texts
    # choice 0 is exactly the n=1 request with the same seed
    single = client.post("/v1/chat/completions", json={**body, "n": 1}).json()
    assert single["choices"][0]["message"]["content"] == texts[0]
    assert wait_until_idle(real_engine).kv_blocks_used == 0


def test_n_greedy_choices_equal_the_engine(client, tokenizer, real_engine):
    reference = engine_reference(real_engine, template_ids(tokenizer, HELLO), temperature=0, max_tokens=10)
    data = client.post("/v1/chat/completions",
                       json={"messages": HELLO, "n": 4, "max_tokens": 10, "temperature": 0}).json()
    assert [c["message"]["content"] for c in data["choices"]] == [reference.text] * 4
    assert data["usage"]["completion_tokens"] == 4 * reference.num_output_tokens


def test_n_streaming(client):
    response = client.post("/v1/chat/completions", json={
        "messages": STORY, "n": 2, "max_tokens": 8, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    chunks = sse_payloads(response)
    texts, finished = {0: "", 1: ""}, {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content") or ""
        if choice["finish_reason"]:
            assert choice["delta"] == {}
            finished[choice["index"]] = choice["finish_reason"]
    assert finished == {0: "length", 1: "length"}
    assert texts[0] == texts[1] and texts[0]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 16


def test_continuous_usage_stats(client):
    response = client.post("/v1/chat/completions", json={
        "messages": HELLO, "max_tokens": 6, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    chunks = sse_payloads(response)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert all("usage" in c for c in chunks)
    assert counts == sorted(counts) and counts[-1] == 6


@pytest.mark.parametrize(("n", "status"), [(0, 400), (65, 400), (64, 200)])
def test_n_bounds(client, n, status):
    response = client.post("/v1/chat/completions", json={"messages": HELLO, "n": n, "max_tokens": 1})
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["error"]["param"] == "n"
    else:
        assert len(response.json()["choices"]) == 64


def test_image_parts_are_refused_clearly(client):
    content = [{"type": "text", "text": "What is in this picture?"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "this model does not accept images" in error["message"] and error["param"] == "messages"


def test_any_model_name_is_answered_by_the_served_model(client, real_engine):
    for name in ("", real_engine.model_name, None, "gpt-4o-mini", "gpt-3.5-turbo"):
        response = client.post("/v1/chat/completions", json={"model": name, "messages": HELLO, "max_tokens": 1})
        assert response.status_code == 200, (name, response.text)
        assert response.json()["model"] == real_engine.model_name


def test_strict_model_name_answers_unknown_names_404(strict_client, real_engine):
    response = strict_client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found" and response.json()["error"]["param"] == "model"
    response = strict_client.post("/v1/chat/completions", json={"model": real_engine.config.model.model,
                                                                 "messages": HELLO, "max_tokens": 1})
    assert response.status_code == 200


def test_continue_final_message_extends_the_assistant_turn(client, tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My favourite is"}]
    response = client.post("/v1/chat/completions", json={
        "messages": messages, "add_generation_prompt": False, "continue_final_message": True,
        "max_tokens": 5, "temperature": 0, "logprobs": True})
    assert response.status_code == 200, response.text
    prompt = tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=True, return_dict=False)
    assert response.json()["usage"]["prompt_tokens"] == len(prompt)
    assert tokenizer.decode(prompt).endswith("My favourite is")
    bad = client.post("/v1/chat/completions", json={"messages": messages, "continue_final_message": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "continue_final_message"


def test_add_generation_prompt_false(client, tokenizer):
    response = client.post("/v1/chat/completions", json={"messages": HELLO, "add_generation_prompt": False,
                                                         "max_tokens": 1})
    prompt = tokenizer.apply_chat_template(HELLO, add_generation_prompt=False, tokenize=True, return_dict=False)
    assert response.json()["usage"]["prompt_tokens"] == len(prompt)


def test_chat_template_kwargs_reach_the_template(client, tokenizer):
    # SmolLM2's template adds a default system prompt; a variable it does not know changes nothing, and a
    # reserved name is refused.
    plain = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1}).json()
    extra = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1,
                                                      "chat_template_kwargs": {"enable_thinking": False}}).json()
    assert extra["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    bad = client.post("/v1/chat/completions", json={"messages": HELLO, "chat_template_kwargs": {"tokenize": False}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs"


def test_chat_template_kwargs_are_template_variables(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = "{% for m in messages %}{{ greeting }} {{ m['content'] }}{% endfor %}"
    formatter = ChatFormatter.from_config(tokenizer, ChatConfig())
    ids = formatter.prompt_ids([{"role": "user", "content": "there"}], template_kwargs={"greeting": "Ahoy"})
    assert tokenizer.decode(ids) == "Ahoy there"


def test_prompt_prefix_mode_follows_nitro(tokenizer):
    prefixes = PromptPrefixes(system_prompt="RULES: ", user_prompt="USER: ", ai_prompt="ASSISTANT: ",
                              pre_prompt="A chat. ")
    chat = ChatConfig(system_prompt="RULES: ", user_prompt="USER: ", ai_prompt="ASSISTANT: ", pre_prompt="A chat. ")
    formatter = ChatFormatter.from_config(tokenizer, chat)
    assert formatter.prefixes == prefixes and formatter.extra_stop == ["USER:"]
    messages = to_template_messages([ChatMessage(role="user", content="Hi"),
                                     ChatMessage(role="assistant", content="Hello!"),
                                     ChatMessage(role="system", content="Be kind."),
                                     ChatMessage(role="user", content="Bye")])
    text = "RULES: Be kind.A chat. USER: HiASSISTANT: Hello!USER: ByeASSISTANT: "
    assert formatter.prompt_ids(messages) == tokenizer(text)["input_ids"]


def test_model_without_template_uses_nitro_default_prefixes(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    formatter = ChatFormatter.from_config(tokenizer, ChatConfig())
    assert formatter.prefixes == PromptPrefixes()
    ids = formatter.prompt_ids([{"role": "user", "content": "Hi"}])
    assert tokenizer.decode(ids) == "USER: HiASSISTANT: "


def test_openai_client_n_and_seed(threaded_server):
    client = openai.OpenAI(base_url=threaded_server.api_url, api_key="unused")
    first = client.chat.completions.create(model="", messages=STORY, n=2, max_completion_tokens=8, seed=3,
                                           temperature=1.0)
    second = client.chat.completions.create(model="", messages=STORY, n=2, max_completion_tokens=8, seed=3,
                                            temperature=1.0)
    assert len(first.choices) == 2
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert first.usage.completion_tokens <= 16


def test_chat_template_file_replaces_the_models_template(tmp_path, tiny_model_dir):
    from nitro_torch.config import ConfigError, build_config
    from nitro_torch.engine.engine import LLMEngine
    from nitro_torch.server.chat.template import to_template_messages as convert

    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>")
    engine = LLMEngine.from_config(build_config({"model": tiny_model_dir, "device": "cpu", "num_kv_blocks": 8,
                                                 "chat_template": str(template)}, env={}))
    formatter = ChatFormatter.from_config(engine.tokenizer, engine.config.chat)
    ids = formatter.prompt_ids(convert([ChatMessage(role="user", content="Hi")]))
    assert engine.tokenizer.decode(ids) == "<user>Hi<assistant>"
    with pytest.raises(ConfigError, match="chat template file not found"):
        build_config({"chat_template": str(tmp_path / "missing.jinja")}, env={})


@pytest.mark.parametrize("tool_choice", ["none", "auto", "required", {"type": "function", "function": {"name": "f"}}])
def test_tool_choice_without_tools_is_400_as_openai(client, tool_choice):
    response = client.post("/v1/chat/completions", json={"messages": HELLO, "tool_choice": tool_choice})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tool_choice" and "only allowed when 'tools' are specified" in error["message"]
