"""POST /v1/embeddings: the loaded chat model's mean-pooled, L2-normalised final hidden states (as Nitro served
embeddings from its chat model), in OpenAI's shape, as floats or base64 little-endian float32."""

from __future__ import annotations

import base64
import logging
import struct
from typing import Any, Literal

from pydantic import BaseModel, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from transformers import PreTrainedTokenizerBase

from nitro_torch.server.http.context import (
    ClientDisconnected,
    check_token_list,
    get_engine,
    parse_body,
    until_disconnect,
)
from nitro_torch.server.http.errors import APIError
from nitro_torch.server.http.schema import LenientModel
from nitro_torch.server.model_names import check_model_name

logger = logging.getLogger("nitro_torch.server")

EmbeddingInput = str | list[int]


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


class EmbeddingRequest(LenientModel):
    model: str | None = ""
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        shapes = "a string, a list of strings, a list of token ids or a list of lists of token ids"
        if isinstance(value, str) or (isinstance(value, list) and value and (
                all(isinstance(item, str) for item in value) or _is_token_list(value)
                or all(_is_token_list(item) for item in value))):
            return value
        if isinstance(value, list) and not value:
            raise ValueError("input must not be empty")
        raise ValueError(f"input must be {shapes}")

    @property
    def inputs(self) -> list[EmbeddingInput]:
        if isinstance(self.input, str) or _is_token_list(self.input):
            return [self.input]  # type: ignore[list-item]
        return list(self.input)  # type: ignore[arg-type]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def input_token_lists(tokenizer: PreTrainedTokenizerBase, inputs: list[EmbeddingInput],
                      max_model_len: int) -> list[list[int]]:
    vocab_size = len(tokenizer)
    texts = [(i, item) for i, item in enumerate(inputs) if isinstance(item, str)]
    for index, text in texts:
        if not text:
            raise APIError(400, f"Input {index} is an empty string; every input needs some text.", param="input",
                           code="invalid_value")
    encoded = tokenizer([text for _, text in texts])["input_ids"] if texts else []
    token_lists = [list(item) if not isinstance(item, str) else [] for item in inputs]
    for (index, _), ids in zip(texts, encoded, strict=True):
        token_lists[index] = list(ids)
    for index, ids in enumerate(token_lists):
        check_token_list(ids, vocab_size, "input", f"Input {index}")
        if len(ids) > max_model_len:
            raise APIError(400, f"This model's maximum context length is {max_model_len} tokens, but input {index} "
                                f"has {len(ids)} tokens. Please reduce the length of the input.",
                           param="input", code="context_length_exceeded")
    return token_lists


def encode_base64(vector: list[float]) -> str:
    """What the openai client decodes: little-endian float32 bytes, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def create_embeddings(request: Request) -> Response:
    """OpenAI's /v1/embeddings (also the handler behind Nitro's embedding route aliases)."""
    engine = get_engine(request)
    body = await parse_body(request, EmbeddingRequest)
    check_model_name(request, engine, body.model)
    size = engine.info.embedding_size
    if body.dimensions is not None and body.dimensions != size:
        raise APIError(400, f"'dimensions' is not supported: this model's embeddings have {size} dimensions.",
                       param="dimensions", code="invalid_value")
    token_lists = input_token_lists(engine.tokenizer, body.inputs, engine.max_model_len)
    try:
        vectors = await until_disconnect(request, engine.embed(token_lists))
    except ClientDisconnected:
        logger.info("client disconnected during an embeddings request")
        return Response(status_code=499)
    as_base64 = body.encoding_format == "base64"
    data = [Embedding(index=i, embedding=encode_base64(v) if as_base64 else v) for i, v in enumerate(vectors)]
    num_tokens = sum(len(ids) for ids in token_lists)
    response = EmbeddingResponse(data=data, model=engine.model_name,
                                 usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens))
    return JSONResponse(response.model_dump())


routes = [Route("/v1/embeddings", create_embeddings, methods=["POST"])]
