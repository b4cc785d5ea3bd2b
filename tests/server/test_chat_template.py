import pytest

from nitro_torch.server.chat.protocol import ChatMessage
from nitro_torch.server.chat.template import prompt_token_ids
from nitro_torch.server.http.errors import APIError

DODGERS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Who won the world series in 2020?"},
    {"role": "assistant", "content": "The Los Angeles Dodgers won the World Series in 2020."},
    {"role": "user", "content": "Where was it played?"},
]


def messages(raw: list[dict]) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in raw]


def reference_ids(tokenizer, raw: list[dict]) -> list[int]:
    return list(tokenizer.apply_chat_template(raw, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_matches_the_tokenizers_own_template(tokenizer):
    assert prompt_token_ids(tokenizer, messages(DODGERS)) == reference_ids(tokenizer, DODGERS)
    hello = [{"role": "user", "content": "Hello"}]
    ids = prompt_token_ids(tokenizer, messages(hello))
    assert ids == reference_ids(tokenizer, hello)
    assert tokenizer.decode(ids).endswith("assistant\n")


def test_text_parts_are_joined(tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    assert prompt_token_ids(tokenizer, messages(parts)) == reference_ids(
        tokenizer, [{"role": "user", "content": "Hello\nthere"}])


def test_developer_is_system(tokenizer):
    developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert prompt_token_ids(tokenizer, messages(developer)) == reference_ids(tokenizer, system)


def test_tool_and_null_content(tokenizer):
    raw = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": None},
           {"role": "tool", "content": "4", "tool_call_id": "c1"}]
    ids = prompt_token_ids(tokenizer, messages(raw))
    assert "tool\n4" in tokenizer.decode(ids)


@pytest.mark.parametrize("raw", [
    [{"role": "wizard", "content": "hi"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
])
def test_refused_messages_point_at_messages(tokenizer, raw):
    with pytest.raises(APIError) as info:
        prompt_token_ids(tokenizer, messages(raw))
    assert info.value.status == 400 and info.value.param == "messages"


def test_a_model_without_template_falls_back_to_nitro_prefixes(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    ids = prompt_token_ids(tokenizer, messages([{"role": "user", "content": "hi"}]))
    assert tokenizer.decode(ids) == "USER: hiASSISTANT: "
