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
    Field("model", "supported", "`\"\"` or the served model's name (or its `--model` value); any other name is 404 "
                                "`model_not_found`, except for models loaded through Nitro's loadmodel, which "
                                "answer to any name as Nitro did"),
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
    Field("tools", "supported", "rendered by the model's chat template; models whose template has no tools are 400"),
    Field("tool_choice", "supported", "`none`, `auto`, `required`, or a named function; required/named are "
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

ENDPOINTS = (CHAT, COMPLETIONS, EMBEDDINGS)


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
