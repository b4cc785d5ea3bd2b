"""`nitro-torch chat`: a terminal chat with a running server. Answers stream token by token; the conversation is
kept and sent with every message; `/reset`, `/system TEXT`, `/help`, `/exit` (or Ctrl-D). Ctrl-C stops an answer
(the connection is closed, so the server aborts the request) and returns to the prompt."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from nitro_torch.sse_client import Server, ServerError

PROMPT = "you> "
HELP = """commands:
  /reset          clear the conversation (the system prompt stays)
  /system TEXT    set the system prompt (sent first, before the conversation)
  /system         show the system prompt
  /system -       remove the system prompt
  /help           this list
  /exit           leave (or Ctrl-D)
  //text          send "/text" as a message
Ctrl-C stops an answer (the part already shown stays in the conversation); at the prompt it only clears the line."""


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:3928",
                        help="the server's base URL, with or without /v1 (default: %(default)s)")
    parser.add_argument("--model", default=None, help="model id to ask for (default: the server's first model)")
    parser.add_argument("--system", default=None, metavar="TEXT", help="system prompt to start with")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: server's)")
    parser.add_argument("--max-tokens", type=int, default=None, help="most tokens per answer (default: server's)")
    parser.add_argument("--api-key", default=os.environ.get("NITRO_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                        help="sent as 'Authorization: Bearer KEY' (default: $NITRO_API_KEY or $OPENAI_API_KEY)")


@dataclass
class Chat:
    server: Server
    model: str
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def request(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": self.messages(), "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body


class Style:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.enabled else text


def _use_color() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _enable_line_editing() -> None:
    try:
        import readline  # noqa: F401  (importing it is what gives input() editing and in-session history)
    except ImportError:
        pass


def _served_models(server: Server) -> list[str]:
    """The ids in GET /v1/models; asked even with --model, as the check that the server is there."""
    models = server.get_json("/models")
    data = models.get("data") if isinstance(models, dict) else None
    return [str(entry.get("id", "")) for entry in data or [] if isinstance(entry, dict)]


def stats_line(usage: dict[str, Any] | None, elapsed_s: float, finish_reason: str | None) -> str:
    if not usage:
        return "[done]"
    tokens, prompt = usage.get("completion_tokens", 0), usage.get("prompt_tokens", 0)
    rate = tokens / elapsed_s if elapsed_s > 0 else 0.0
    note = ", hit --max-tokens" if finish_reason == "length" else ""
    return f"[{tokens} tokens, {rate:.1f} tok/s, prompt {prompt}{note}]"


def answer(chat: Chat, style: Style) -> None:
    """Streams one answer to the last user message and records it; Ctrl-C stops it, keeping the part shown."""
    parts: list[str] = []
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    started = time.monotonic()
    events = chat.server.stream("/chat/completions", chat.request())
    try:
        for event in events:
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    parts.append(text)
                    _out(text)
                finish_reason = choice.get("finish_reason") or finish_reason
    except KeyboardInterrupt:
        events.close()  # hangs up now, so the server stops generating
        _out(("\n" if parts else "") + style.dim("[stopped]") + "\n")
        _record(chat, "".join(parts))
        return
    except ServerError:
        _out("\n" if parts else "")
        chat.history.pop()  # the message was not answered: leave it out, so it can be sent again
        raise
    elapsed = time.monotonic() - started
    _out(("\n" if parts else "") + style.dim(stats_line(usage, elapsed, finish_reason)) + "\n")
    _record(chat, "".join(parts))


def _record(chat: Chat, text: str) -> None:
    if text:
        chat.history.append({"role": "assistant", "content": text})
    else:  # nothing came: drop the question too, so user and assistant turns still alternate
        chat.history.pop()


def command(chat: Chat, line: str) -> bool:
    """Runs a /command; False when the user wants to leave."""
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        chat.history.clear()
        print("[conversation cleared" + (", system prompt kept]" if chat.system else "]"))
    elif name == "/system" and not rest:
        print(f"[system prompt: {chat.system}]" if chat.system else "[no system prompt]")
    elif name == "/system" and rest == "-":
        chat.system = None
        print("[system prompt removed]")
    elif name == "/system":
        chat.system = rest
        print("[system prompt set]")
    elif name in ("/help", "/?"):
        print(HELP)
    else:
        print(f"[unknown command {name}; /help lists the commands, //text sends '/text']")
    return True


def read_line() -> str | None:
    """The next input line, or None at end of input; Ctrl-C at the prompt clears the line and asks again."""
    while True:
        try:
            return input(PROMPT)
        except EOFError:
            print()
            return None
        except KeyboardInterrupt:
            print("\n[to leave: /exit or Ctrl-D]")


def loop(chat: Chat, style: Style) -> None:
    while (line := read_line()) is not None:
        line = line.strip()
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            if not command(chat, line):
                return
            continue
        chat.history.append({"role": "user", "content": line[1:] if line.startswith("//") else line})
        try:
            answer(chat, style)
        except ServerError as exc:
            print(f"error: {_describe(exc)}")
        except KeyboardInterrupt:  # Ctrl-C before the answer began (connecting)
            chat.history.pop()
            print("\n" + style.dim("[stopped]"))


def _describe(exc: ServerError) -> str:
    return f"server answered {exc.status}: {exc}" if exc.status else str(exc)


def run_chat(args: argparse.Namespace) -> int:
    try:
        server = Server(args.url, args.api_key)
        served = _served_models(server)
    except ValueError as exc:
        print(f"nitro-torch chat: {exc}", file=sys.stderr)
        return 1
    except ServerError as exc:
        print(f"nitro-torch chat: {_describe(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    model = args.model if args.model is not None else (served[0] if served else "")
    _enable_line_editing()
    style = Style(_use_color())
    chat = Chat(server, model, system=args.system, temperature=args.temperature, max_tokens=args.max_tokens)
    print(f"nitro-torch chat with {server.base_url} (model: {model or 'server default'}). "
          "/reset clears the conversation, /system TEXT sets the system prompt, /help lists commands; "
          "/exit or Ctrl-D leaves, Ctrl-C stops an answer.", flush=True)
    loop(chat, style)
    return 0
