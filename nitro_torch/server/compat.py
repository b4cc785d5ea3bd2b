"""The API compatibility table: every request field of the OpenAI-style endpoints, and what nitro_torch does with it.

The README's table is rendered from here (`python -m nitro_torch.server.compat`), and tests/server/test_compat.py
checks it against the request schemas and the server's answers, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["supported", "extra", "ignored", "rejected"]

STATUS_TEXT: dict[Status, str] = {
    "supported": "✅ supported",
    "extra": "✅ extra (vLLM)",
    "ignored": "➖ accepted, no effect",
    "rejected": "❌ 400",
}


@dataclass(frozen=True)
class Field:
    name: str
    status: Status
    note: str
    example: Any = None
    """For ignored and rejected fields: a value the tests send (ignored → 200, rejected → 400 naming the field)."""


@dataclass(frozen=True)
class Endpoint:
    path: str
    fields: tuple[Field, ...]


CHAT = Endpoint("/v1/chat/completions", (
    Field("model", "supported", "any name: one model is served, and it answers `\"\"`, its own name, a "
                                "`--served-model-name` alias or a name copied from elsewhere (`gpt-4o-mini`), as "
                                "Nitro did; the answer names the served model. With `--strict-model-name` a name "
                                "that is not the served name, an alias or the `--model` value is 404 "
                                "`model_not_found`"),
    Field("messages", "supported", "roles system, developer (= system), user, assistant, tool; content as a string "
                                   "or `text` parts, required except in assistant messages (a turn of "
                                   "`tool_calls`); `image_url`/`input_audio`/`file` parts are 400 \"this model "
                                   "does not accept images\" (or audio, files); control tokens written in content "
                                   "(a template's turn markers) are plain text, so a turn cannot be forged "
                                   "(`--special-tokens-in-content` restores the old behaviour)"),
    Field("n", "supported", "1–64; choices 2..n fork choice 1's prompt KV blocks, so the prompt is prefilled once; "
                            "usage counts the prompt once. prompt × n + n × `max_tokens` (unset: the rest of the "
                            "context window) must stay within `--max-request-tokens` (default: four context "
                            "windows), else 400 `request_too_large`"),
    Field("stop", "supported", "a string or up to 16 strings; the output ends before the stop string"),
    Field("max_tokens", "supported", "deprecated by OpenAI, still honoured; default: up to the context window"),
    Field("max_completion_tokens", "supported", "wins over `max_tokens`"),
    Field("temperature", "supported", "0–2; 0 is greedy"),
    Field("top_p", "supported", "(0, 1]"),
    Field("presence_penalty", "supported", "-2–2"),
    Field("frequency_penalty", "supported", "-2–2"),
    Field("logit_bias", "supported", "token id → -100..100; ids outside the vocabulary are 400"),
    Field("logprobs", "supported", "OpenAI's `logprobs.content` objects (token, logprob, bytes), also in stream "
                                   "chunks"),
    Field("top_logprobs", "supported", "0–20, needs `logprobs: true`"),
    Field("seed", "supported", "same seed, same output (choice i of n uses seed + i)"),
    Field("response_format", "supported", "`text`, `json_object`, `json_schema`: constrained decoding with "
                                          "xgrammar, so the output parses (and validates) unless cut by max_tokens"),
    Field("stream", "supported", "server-sent events ending with `data: [DONE]`; a JSON boolean "
                                 "(`\"yes\"` is 400)"),
    Field("stream_options", "supported", "`include_usage`; `continuous_usage_stats` (vLLM) puts usage on every "
                                         "chunk"),
    Field("user", "supported", "accepted for the client's own tracking"),
    Field("tools", "supported", "rendered by the model's chat template; where it cannot render tools (e.g. "
                                "the default model), a built-in Hermes-style tool prompt in the system turn"),
    Field("tool_choice", "supported", "`none`, `auto`, `required`, or a named function (any of them without "
                                      "`tools` is 400, as OpenAI); required/named are "
                                      "forced by a grammar, so the call parses and its arguments match the schema"),
    Field("parallel_tool_calls", "supported", "false allows one call per answer"),
    Field("top_k", "extra", "0 or -1 disables"),
    Field("min_p", "extra", "0–1"),
    Field("repetition_penalty", "extra", "(0, 2]"),
    Field("min_tokens", "extra", "EOS and stop tokens are masked until reached"),
    Field("ignore_eos", "extra", "generate through EOS"),
    Field("stop_token_ids", "extra", "extra token ids that end the answer"),
    Field("include_stop_str_in_output", "extra", "keep the stop string (or EOS text) in the output"),
    Field("skip_special_tokens", "extra", "default true"),
    Field("add_generation_prompt", "extra", "default true"),
    Field("continue_final_message", "extra", "continue the last assistant message (with add_generation_prompt "
                                             "false)"),
    Field("chat_template_kwargs", "extra", "extra variables for the chat template"),
    Field("guided_json", "extra", "a JSON schema the output must follow"),
    Field("guided_regex", "extra", "a regular expression the output must match"),
    Field("guided_choice", "extra", "the output is one of these strings"),
    Field("guided_grammar", "extra", "an EBNF grammar the output must follow"),
    Field("structured_outputs", "extra", "vLLM's newer form of the four guided_* fields"),
    Field("metadata", "ignored", "nothing is stored", {"team": "a"}),
    Field("store", "ignored", "nothing is stored", True),
    Field("service_tier", "ignored", "one tier", "auto"),
    Field("prompt_cache_key", "ignored", "prefix caching is automatic", "user-1"),
    Field("safety_identifier", "ignored", "accepted for the client's own tracking", "user-1"),
    Field("prediction", "ignored", "a speed hint; output is the same without it",
          {"type": "content", "content": "Hi"}),
    Field("reasoning_effort", "ignored", "no reasoning models special-cased", "low"),
    Field("verbosity", "ignored", "no effect on these models", "low"),
    Field("modalities", "rejected", "only `[\"text\"]` is accepted", ["text", "audio"]),
    Field("audio", "rejected", "no audio output", {"voice": "alloy", "format": "wav"}),
    Field("functions", "rejected", "deprecated by OpenAI: use `tools`",
          [{"name": "f", "parameters": {"type": "object"}}]),
    Field("function_call", "rejected", "deprecated by OpenAI: use `tool_choice`", "auto"),
    Field("web_search_options", "rejected", "no web search", {}),
))

COMPLETIONS = Endpoint("/v1/completions", (
    Field("model", "supported", "as for chat"),
    Field("prompt", "supported", "a string, a list of strings, token ids, or a list of token-id lists; each prompt "
                                 "has its own choices"),
    Field("max_tokens", "supported", "default 16, as OpenAI"),
    Field("n", "supported", "1–64 per prompt; all prompts' choices count against `--max-request-tokens` as for "
                            "chat"),
    Field("stop", "supported", "as for chat"),
    Field("temperature", "supported", "as for chat"),
    Field("top_p", "supported", "as for chat"),
    Field("presence_penalty", "supported", "as for chat"),
    Field("frequency_penalty", "supported", "as for chat"),
    Field("logit_bias", "supported", "as for chat"),
    Field("seed", "supported", "as for chat"),
    Field("stream", "supported", "as for chat"),
    Field("stream_options", "supported", "`include_usage`"),
    Field("user", "supported", "as for chat"),
    Field("top_k", "extra", "as for chat"),
    Field("min_p", "extra", "as for chat"),
    Field("repetition_penalty", "extra", "as for chat"),
    Field("min_tokens", "extra", "as for chat"),
    Field("ignore_eos", "extra", "as for chat"),
    Field("stop_token_ids", "extra", "as for chat"),
    Field("include_stop_str_in_output", "extra", "as for chat"),
    Field("skip_special_tokens", "extra", "as for chat"),
    Field("echo", "rejected", "not supported", True),
    Field("logprobs", "rejected", "the legacy integer form is not supported; use chat's `logprobs`", 2),
    Field("suffix", "rejected", "no fill-in-the-middle", "end"),
    Field("best_of", "rejected", "only `best_of` equal to `n`", 3),
))

EMBEDDINGS = Endpoint("/v1/embeddings", (
    Field("model", "supported", "as for chat"),
    Field("input", "supported", "a string, a list of strings, token ids, or a list of token-id lists; every item "
                                "has its own `index` (Nitro gave all 0)"),
    Field("encoding_format", "supported", "`float` or `base64` (little-endian float32)"),
    Field("dimensions", "supported", "only the model's hidden size; anything else is 400"),
    Field("user", "supported", "as for chat"),
))

RESPONSES = Endpoint("/v1/responses", (
    Field("model", "supported", "as for chat; the answer's `model` is the served name"),
    Field("input", "supported", "a string (one user message) or items: `message` (roles user, system, developer, "
                                "assistant; content a string or `input_text`/`output_text` parts), `function_call` "
                                "and `function_call_output` (a tool round trip); `reasoning` items are left out; "
                                "`input_image`/`input_file` parts, `item_reference` and built-in tool items are "
                                "400 naming the item"),
    Field("instructions", "supported", "the system message; not carried over by `previous_response_id`, as OpenAI"),
    Field("previous_response_id", "supported", "continues a stored response's conversation (its input and output); "
                                               "an unknown or dropped id is 404 `previous_response_not_found`"),
    Field("store", "supported", "default true: the last `--responses-store` responses (default 512) are kept in "
                                "memory, the oldest dropped first, for `previous_response_id` and GET/DELETE "
                                "`/v1/responses/{id}`; with `--responses-store 0` nothing is kept and `true` is 400"),
    Field("stream", "supported", "the Responses events (`response.created`, `response.in_progress`, "
                                 "`response.output_item.added`, `response.content_part.added`, "
                                 "`response.output_text.delta`/`.done`, `response.function_call_arguments.delta`/"
                                 "`.done`, ..., `response.completed` or `response.incomplete`) with `event:` lines "
                                 "and `sequence_number`; a failure after the headers is `response.failed`"),
    Field("max_output_tokens", "supported", "`status` `incomplete` with `incomplete_details.reason` "
                                            "`max_output_tokens` when reached; default: up to the context window"),
    Field("temperature", "supported", "as for chat"),
    Field("top_p", "supported", "as for chat"),
    Field("tools", "supported", "`function` tools `{name, description, parameters, strict}`, as chat's `tools`; "
                                "built-in tools (`web_search`, `file_search`, ...) are 400"),
    Field("tool_choice", "supported", "`none`, `auto`, `required`, `{type: function, name}`: forced by a grammar as "
                                      "for chat; calls are `function_call` output items"),
    Field("parallel_tool_calls", "supported", "as for chat"),
    Field("text", "supported", "`format` `text`, `json_object` or `json_schema` `{name, schema, strict}`: "
                               "constrained decoding as chat's `response_format`; `verbosity` has no effect"),
    Field("include", "supported", "`message.output_text.logprobs` puts the tokens' logprobs in `output_text`; "
                                  "OpenAI's other values are accepted and have no effect (no items they name)"),
    Field("top_logprobs", "supported", "0–20, in `output_text.logprobs` (also without `include`)"),
    Field("metadata", "supported", "up to 16 string pairs, stored and returned with the response"),
    Field("user", "supported", "returned with the response"),
    Field("reasoning", "rejected", "`effort` is accepted and has no effect; `summary` is 400 (no reasoning items)",
          {"summary": "auto"}),
    Field("background", "rejected", "`true` is 400: wait for the answer or stream it", True),
    Field("conversation", "rejected", "no conversations API: use `previous_response_id`", "conv_1"),
    Field("prompt", "rejected", "no saved prompts: send `instructions` and `input`", {"id": "pmpt_1"}),
    Field("truncation", "ignored", "the input is never truncated: a conversation longer than the context window is "
                                   "400 `context_length_exceeded`", "auto"),
    Field("max_tool_calls", "ignored", "bounds built-in tool calls, which are not offered", 3),
    Field("service_tier", "ignored", "one tier", "auto"),
    Field("prompt_cache_key", "ignored", "prefix caching is automatic", "user-1"),
    Field("prompt_cache_retention", "ignored", "prefix caching is automatic", "24h"),
    Field("safety_identifier", "ignored", "accepted for the client's own tracking", "user-1"),
    Field("stream_options", "ignored", "no obfuscation padding is added", {"include_obfuscation": False}),
))

MESSAGES = Endpoint("/v1/messages", (
    Field("model", "supported", "any name is answered by the served model (404 `not_found_error` for an unknown "
                                "name with `--strict-model-name`); the answer's `model` is the served name"),
    Field("messages", "supported", "`user` / `assistant` turns, content a string or `text` blocks; `tool_use` "
                                   "(assistant) and `tool_result` (user; string or text blocks; `is_error` puts "
                                   "\"Error: \" before the result) become the chat template's tool calls and tool "
                                   "messages; consecutive turns of one role are combined; a final assistant turn is "
                                   "continued (prefill); `thinking` blocks are left out; `image`/`document` blocks "
                                   "are 400 naming the block"),
    Field("max_tokens", "supported", "required, as Anthropic; `stop_reason` `max_tokens` when reached"),
    Field("system", "supported", "a string or `text` blocks, as the system message"),
    Field("stop_sequences", "supported", "up to 16; `stop_reason` `stop_sequence` with the matched string in "
                                         "`stop_sequence`"),
    Field("temperature", "supported", "0–1, as Anthropic; 0 is greedy"),
    Field("top_p", "supported", "(0, 1]"),
    Field("top_k", "supported", "0 disables"),
    Field("stream", "supported", "Anthropic's events (`message_start`, `content_block_start`/`_delta`/`_stop`, "
                                 "`message_delta`, `message_stop`) with `event:` lines; a failure after the "
                                 "headers is an `error` event"),
    Field("tools", "supported", "custom tools `{name, description, input_schema}`, rendered by the chat template "
                                "as chat's `tools`; server tools (`type` other than `custom`) are 400"),
    Field("tool_choice", "supported", "`auto`, `any`, `tool` (named), `none`; `any`/`tool` are forced by a grammar, "
                                      "so `input` matches `input_schema`; `disable_parallel_tool_use` allows one "
                                      "call"),
    Field("output_config", "supported", "`format` `{type: json_schema, schema}`: constrained decoding as chat's "
                                        "`response_format`; `effort` has no effect"),
    Field("thinking", "rejected", "`disabled` and `adaptive` are accepted (the model never thinks); `enabled` "
                                  "is 400", {"type": "enabled", "budget_tokens": 1024}),
    Field("mcp_servers", "rejected", "no MCP connector", [{"type": "url", "url": "https://mcp.example", "name": "x"}]),
    Field("container", "rejected", "no code-execution container", "container_1"),
    Field("metadata", "ignored", "nothing is stored", {"user_id": "user-1"}),
    Field("service_tier", "ignored", "one tier", "auto"),
    Field("cache_control", "ignored", "prefix caching is automatic; cache reads are in "
                                      "`usage.cache_read_input_tokens`", {"type": "ephemeral"}),
    Field("speed", "ignored", "one speed", "standard"),
    Field("inference_geo", "ignored", "one place", "us"),
))

ENDPOINTS = (CHAT, RESPONSES, MESSAGES, COMPLETIONS, EMBEDDINGS)


def render_markdown() -> str:
    """The README's compatibility tables."""
    lines: list[str] = []
    for endpoint in ENDPOINTS:
        lines += [f"`POST {endpoint.path}`", "", "| Field | Status | Notes |", "|---|---|---|"]
        for field in endpoint.fields:
            lines.append(f"| `{field.name}` | {STATUS_TEXT[field.status]} | {field.note} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
