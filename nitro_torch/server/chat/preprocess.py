"""The one path from a chat request to what the engine runs, for every API that runs a chat (OpenAI chat
completions and responses, Anthropic messages, Nitro's chat_completion): the template, tools, structured
output, tokenizing and the checks on size and grammar. Each API translates its request into a
ChatCompletionRequest first, then calls prepare_chat."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from nitro_torch.engine.client import ContextLengthExceeded, check_context_length
from nitro_torch.sampling import SamplingParams, SamplingParamsError
from nitro_torch.server.chat.generation import Completion, OutputParser
from nitro_torch.server.chat.grammar_check import check_chat_grammar
from nitro_torch.server.chat.logprobs import TokenTexts
from nitro_torch.server.chat.protocol import ChatCompletionRequest
from nitro_torch.server.chat.request_budget import check_budget_of, client_of
from nitro_torch.server.chat.template import ChatFormatter, to_template_messages
from nitro_torch.server.chat.tool_prompt import render_tools
from nitro_torch.server.chat.tools import (
    ToolCallStreamParser,
    template_messages_for_tools,
    template_tools,
    tool_choice_guidance,
)
from nitro_torch.server.http.context import check_token_ids
from nitro_torch.server.http.errors import APIError, context_length_error, sampling_params_error

if TYPE_CHECKING:
    from nitro_torch.engine.client import EngineClient

_formatters: weakref.WeakKeyDictionary[Any, ChatFormatter] = weakref.WeakKeyDictionary()


def chat_formatter(engine: EngineClient) -> ChatFormatter:
    """How the engine's model turns conversations into prompts (its template, or Nitro's prompt prefixes)."""
    formatter = _formatters.get(engine)
    if formatter is None:
        formatter = _formatters[engine] = ChatFormatter.from_config(engine.tokenizer, engine.config.chat)
    return formatter


def token_texts(request: Request, engine: EngineClient) -> TokenTexts:
    texts = getattr(request.app.state, "token_texts", None)
    if texts is None or texts.tokenizer is not engine.tokenizer:
        texts = request.app.state.token_texts = TokenTexts(engine.tokenizer)
    return texts


@dataclass
class PreparedChat:
    """A checked chat request, ready for the engine: its prompt, sampling and how to read tool calls."""

    prompt_ids: list[int]
    params: SamplingParams
    n: int
    parser_factory: Callable[[], OutputParser] | None
    """Set when tools were offered: splits the output into content and tool calls."""

    def completion(self, request: Request, engine: EngineClient, *, include_usage: bool = False,
                   continuous_usage: bool = False) -> Completion:
        return Completion(engine, token_texts(request, engine), self.prompt_ids, self.params, n=self.n,
                          client=client_of(request), include_usage=include_usage,
                          continuous_usage=continuous_usage, parser_factory=self.parser_factory)


async def prepare_chat(request: Request, engine: EngineClient, body: ChatCompletionRequest) -> PreparedChat:
    """Everything between a parsed chat request and the engine; each failure is a 400 naming the field.

    SamplingParamsError and ContextLengthExceeded become 400s in http/errors.py."""
    params = body.to_sampling_params()
    check_token_ids(params, len(engine.tokenizer))
    formatter = chat_formatter(engine)
    tool_choice = body.resolved_tool_choice()
    tools = template_tools(body.tools, tool_choice)
    # A template that cannot render tools gets them (and the history's calls and results) as text in its messages.
    rendering = render_tools(formatter, template_messages_for_tools(to_template_messages(body.messages)), tools)
    if tools is not None:
        if params.guided is not None and tool_choice.forced:
            raise SamplingParamsError("response_format", "'response_format' cannot be combined with a forced "
                                                         "'tool_choice'; the tool's parameters define the output")
        params.guided = tool_choice_guidance(rendering.format, body.tools, tool_choice, body.parallel_tool_calls,
                                             check=False) or params.guided
    prompt_ids = formatter.prompt_ids(
        rendering.messages,
        tools=rendering.tools,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        template_kwargs=body.chat_template_kwargs,
    )
    params.stop.extend(s for s in formatter.extra_stop if s not in params.stop)
    check_context_length(len(prompt_ids), params.max_tokens, engine.max_model_len)
    check_budget_of(request, [len(prompt_ids)], body.num_choices, params.max_tokens, params.min_tokens,
                    engine.max_model_len)
    await check_chat_grammar(engine.tokenizer, body, params, tools_forced=tools is not None and tool_choice.forced,
                             tool_format=rendering.format)
    await engine.prepare(params)
    parser_factory = (lambda: ToolCallStreamParser(rendering.format)) if tools else None
    return PreparedChat(prompt_ids, params, body.num_choices, parser_factory)


async def prepare_translated_chat(request: Request, engine: EngineClient, body: ChatCompletionRequest,
                                  rename: Callable[[APIError], APIError]) -> PreparedChat:
    """prepare_chat for an API that translated its request into `body`: `rename` makes each 400 name the field
    as that API's request spells it."""
    try:
        return await prepare_chat(request, engine, body)
    except SamplingParamsError as exc:
        raise rename(sampling_params_error(exc)) from None
    except ContextLengthExceeded as exc:
        raise rename(context_length_error(exc)) from None
    except APIError as exc:
        raise rename(exc) from None
