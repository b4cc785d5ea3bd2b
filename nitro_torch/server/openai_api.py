"""OpenAI-compatible routes: /v1/chat/completions (plain and streaming) and /v1/models."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from nitro_torch.engine.client import check_context_length
from nitro_torch.sampling import SamplingParamsError
from nitro_torch.server.chat_template import to_template_messages
from nitro_torch.server.completion import Completion
from nitro_torch.server.context import (
    chat_formatter,
    check_model_name,
    check_token_ids,
    get_engine,
    parse_body,
    respond,
    token_texts,
)
from nitro_torch.server.errors import APIError
from nitro_torch.server.grammar_check import check_chat_grammar
from nitro_torch.server.protocol import ChatCompletionRequest, ModelCard, ModelList
from nitro_torch.server.request_budget import check_budget_of, client_of
from nitro_torch.server.tools import (
    ToolCallStreamParser,
    check_tools_supported,
    template_messages_for_tools,
    template_tools,
    tool_choice_guidance,
)


async def chat_completions(request: Request) -> Response:
    engine = get_engine(request)
    body = await parse_body(request, ChatCompletionRequest)
    check_model_name(request, engine, body.model)
    params = body.to_sampling_params()  # SamplingParamsError and ContextLengthExceeded become 400s in errors.py
    check_token_ids(params, len(engine.tokenizer))
    formatter = chat_formatter(engine)
    tool_choice = body.resolved_tool_choice()
    tools = template_tools(body.tools, tool_choice)
    if tools is not None:
        check_tools_supported(engine.tokenizer)
        if params.guided is not None and tool_choice.forced:
            raise SamplingParamsError("response_format", "'response_format' cannot be combined with a forced "
                                                         "'tool_choice'; the tool's parameters define the output")
        params.guided = tool_choice_guidance(engine.tokenizer, body.tools, tool_choice, body.parallel_tool_calls,
                                             check=False) or params.guided
    prompt_ids = formatter.prompt_ids(
        template_messages_for_tools(to_template_messages(body.messages)),
        tools=tools,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        template_kwargs=body.chat_template_kwargs,
    )
    params.stop.extend(s for s in formatter.extra_stop if s not in params.stop)
    check_context_length(len(prompt_ids), params.max_tokens, engine.max_model_len)
    check_budget_of(request, [len(prompt_ids)], body.num_choices, params.max_tokens, params.min_tokens,
                    engine.max_model_len)
    await check_chat_grammar(engine.tokenizer, body, params, tools_forced=tools is not None and tool_choice.forced)
    await engine.prepare(params)
    completion = Completion(engine, token_texts(request, engine), prompt_ids, params, n=body.num_choices,
                            client=client_of(request),
                            include_usage=body.include_usage, continuous_usage=body.continuous_usage,
                            parser_factory=(lambda: ToolCallStreamParser(engine.tokenizer)) if tools else None)
    return await respond(request, completion, bool(body.stream))


async def list_models(request: Request) -> JSONResponse:
    return JSONResponse(ModelList(data=[_model_card(request)]).model_dump())


async def retrieve_model(request: Request) -> JSONResponse:
    card = _model_card(request)
    model_id = request.path_params["model_id"]
    if model_id != card.id:
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return JSONResponse(card.model_dump())


def _model_card(request: Request) -> ModelCard:
    engine = get_engine(request)
    created = getattr(request.app.state, "started_at", None) or int(time.time())
    return ModelCard(id=engine.model_name, created=created, max_model_len=engine.max_model_len)


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"]),
]
