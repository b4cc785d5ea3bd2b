"""POST /tokenize and POST /detokenize, in vLLM's shapes: the loaded model's tokenizer over HTTP.

A tokenized conversation is exactly the prompt /v1/chat/completions would run for it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from nitro_torch.server.chat.preprocess import chat_formatter
from nitro_torch.server.chat.protocol import ChatMessage
from nitro_torch.server.chat.template import to_template_messages
from nitro_torch.server.http.context import (
    get_engine,
    parse_body,
)
from nitro_torch.server.http.errors import APIError
from nitro_torch.server.http.schema import LenientModel
from nitro_torch.server.model_names import check_model_name


class TokenizeRequest(LenientModel):
    model: str | None = ""
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    """For `prompt` only: a conversation's special tokens are the chat template's."""
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(LenientModel):
    model: str | None = ""
    tokens: list[int]

    @field_validator("tokens", mode="before")
    @classmethod
    def _token_ids(cls, value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        raise ValueError("tokens must be a list of token ids")


async def tokenize(request: Request) -> JSONResponse:
    engine = get_engine(request)
    body = await parse_body(request, TokenizeRequest)
    check_model_name(request, engine, body.model)
    tokenizer = engine.tokenizer
    if body.messages is not None:
        ids = chat_formatter(engine).prompt_ids(to_template_messages(body.messages),
                                                add_generation_prompt=body.add_generation_prompt)
    elif body.prompt is not None:
        ids = list(tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"])
    else:
        raise APIError(400, "Missing required parameter: 'prompt' (or 'messages').", param="prompt",
                       code="missing_required_parameter")
    response = TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids)
    payload = response.model_dump()
    if body.return_token_strs:
        payload["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
    else:
        del payload["token_strs"]
    return JSONResponse(payload)


async def detokenize(request: Request) -> JSONResponse:
    engine = get_engine(request)
    body = await parse_body(request, DetokenizeRequest)
    check_model_name(request, engine, body.model)
    vocab_size = len(engine.tokenizer)
    for index, token in enumerate(body.tokens):
        if not 0 <= token < vocab_size:
            raise APIError(400, f"tokens[{index}] = {token} is not a token id: the vocabulary has {vocab_size} "
                                "tokens.", param="tokens", code="invalid_value")
    return JSONResponse({"prompt": engine.tokenizer.decode(body.tokens)})


routes = [
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/detokenize", detokenize, methods=["POST"]),
]
