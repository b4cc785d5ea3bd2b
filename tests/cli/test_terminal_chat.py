"""`nitro-torch chat` driven through a real pseudo-terminal (pexpect) against a real `nitro-torch serve` on the
default model: answers stream, Ctrl-C stops one (and the server aborts it), /reset and /system change what the
server is sent (read back from the prompt-token count in the stats line)."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator

import httpx
import pexpect
import pytest

from tests.server.conftest import free_port, server_process

PROMPT = "you> "
STATS = re.compile(r"\[(\d+) tokens, [\d.]+ tok/s, prompt (\d+)[^\]]*\]")
ABORTS = re.compile(r'^nitro:request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$', re.MULTILINE)
SERVER_OPTIONS = ("--max-model-len", "2048", "--max-num-seqs", "4", "--log-level", "warning")
API_KEY = "test-chat-key"
QUESTION = "What is the capital of France?"
LONG_SYSTEM = ("You are a cheerful pirate captain who sails the seven seas, loves maps, parrots and treasure, "
               "and always answers in one short sentence full of nautical words.")


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with server_process(*SERVER_OPTIONS, "--api-key", API_KEY) as (_, base_url, _):
        yield base_url


def spawn_chat(url: str, *options: str, api_key: str | None = API_KEY, timeout: float = 60) -> pexpect.spawn:
    env = {k: v for k, v in os.environ.items() if k not in ("NITRO_API_KEY", "OPENAI_API_KEY")}
    env["TERM"] = "dumb"  # no colours, and readline keeps its escape sequences out of the output
    if api_key:
        env["NITRO_API_KEY"] = api_key
    child = pexpect.spawn(sys.executable, ["-m", "nitro_torch.cli", "chat", "--url", url, *options],
                          env=env, encoding="utf-8", timeout=timeout, dimensions=(40, 200))
    return child


def started(url: str, *options: str) -> pexpect.spawn:
    child = spawn_chat(url, *options)
    child.expect_exact(PROMPT)
    assert "/reset" in child.before and "Ctrl-C" in child.before
    return child


def ask(child: pexpect.spawn, text: str) -> tuple[str, int, int]:
    """Sends `text`, waits for the whole answer; returns (answer, completion tokens, prompt tokens)."""
    child.sendline(text)
    child.expect_exact(text + "\r\n")
    child.expect(STATS)
    answer = child.before.strip()
    completion, prompt = int(child.match.group(1)), int(child.match.group(2))
    child.expect_exact(PROMPT)
    return answer, completion, prompt


def command(child: pexpect.spawn, line: str) -> str:
    child.sendline(line)
    child.expect_exact(line + "\r\n")
    child.expect_exact(PROMPT)
    return child.before


def leave(child: pexpect.spawn) -> int:
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def aborted_requests(url: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).text
    return sum(float(value) for value in ABORTS.findall(text))


@pytest.mark.slow
def test_reply_streams_in_pieces_then_stats(server_url: str) -> None:
    child = started(server_url + "/v1/", "--temperature", "0", "--max-tokens", "32")
    text = "Tell me about the ocean."
    child.sendline(text)
    child.expect_exact(text + "\r\n")
    pieces = [child.buffer] if child.buffer else []
    child.buffer = ""
    while not STATS.search("".join(pieces)):
        pieces.append(child.read_nonblocking(4096, timeout=60))
    before_stats = [piece for piece in pieces[:-1] if piece.strip()]
    assert len(before_stats) >= 2, pieces  # the answer grew over several reads before the stats line
    output = "".join(pieces)
    stats = STATS.search(output)
    answer, after = output[:stats.start()].strip(), output[stats.end():]
    assert answer and len(answer) > len(before_stats[0].strip())
    child.buffer = after  # what came with the stats line (the prompt, perhaps) goes back for expect to see
    child.expect_exact(PROMPT)
    assert leave(child) == 0


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_and_the_server_aborts_it(server_url: str) -> None:
    aborts_before = aborted_requests(server_url)
    child = started(server_url, "--temperature", "0", "--max-tokens", "1000")
    text = "Write a very long story about a dragon and a knight."
    child.sendline(text)
    child.expect_exact(text + "\r\n")
    child.expect(r"\w+\W+\w+\W+\w+")  # a few words have streamed
    stopped_at = time.monotonic()
    child.sendintr()
    child.expect_exact("[stopped]", timeout=10)
    assert not STATS.search(child.before)  # it was cut short, not finished
    child.expect_exact(PROMPT, timeout=10)
    assert time.monotonic() - stopped_at < 5
    assert child.isalive()

    deadline = time.monotonic() + 15
    while aborted_requests(server_url) <= aborts_before:  # the closed connection made the server abort it
        assert time.monotonic() < deadline, "the server did not count an aborted request"
        time.sleep(0.2)

    follow_up = "Now tell me about the knight's horse."
    child.sendline(follow_up)
    child.expect_exact(follow_up + "\r\n")
    child.expect(r"\w+\W+\w+")  # it answers again, with the stopped answer in the conversation
    child.sendintr()
    child.expect_exact("[stopped]", timeout=10)
    child.expect_exact(PROMPT, timeout=10)
    assert leave(child) == 0


@pytest.mark.slow
def test_reset_clears_the_history_that_is_sent(server_url: str) -> None:
    child = started(server_url, "--temperature", "0", "--max-tokens", "12")
    _, _, first = ask(child, QUESTION)
    _, _, second = ask(child, QUESTION)
    assert second > first + 5  # the first question and its answer were sent along
    assert "[conversation cleared" in command(child, "/reset")
    _, _, after_reset = ask(child, QUESTION)
    assert after_reset == first
    assert leave(child) == 0


@pytest.mark.slow
def test_system_prompt_is_sent_shown_and_removed(server_url: str) -> None:
    child = started(server_url, "--temperature", "0", "--max-tokens", "8")
    _, _, plain = ask(child, QUESTION)
    assert "[no system prompt]" in command(child, "/system")
    assert "[system prompt set]" in command(child, "/system " + LONG_SYSTEM)
    assert LONG_SYSTEM in command(child, "/system")
    command(child, "/reset")
    _, _, with_system = ask(child, QUESTION)
    assert with_system > plain + 10
    assert "[system prompt removed]" in command(child, "/system -")
    command(child, "/reset")
    assert ask(child, QUESTION)[2] == plain
    assert leave(child) == 0


@pytest.mark.slow
def test_server_errors_are_shown_and_the_chat_goes_on(server_url: str) -> None:
    child = started(server_url, "--max-tokens", "1000000")
    child.sendline("Hello?")
    child.expect(r"error: server answered 400: [^\r\n]*maximum context length")
    child.expect_exact(PROMPT)
    assert child.isalive()
    assert "unknown command" in command(child, "/frobnicate")
    assert "/system -" in command(child, "/help")
    assert leave(child) == 0

    wrong_key = spawn_chat(server_url, api_key="wrong")
    wrong_key.expect(pexpect.EOF)
    wrong_key.close()
    assert wrong_key.exitstatus == 1
    assert "401" in wrong_key.before and "Traceback" not in wrong_key.before


@pytest.mark.slow
def test_ctrl_c_at_the_prompt_stays_ctrl_d_and_exit_leave(server_url: str) -> None:
    child = started(server_url)
    child.sendintr()
    child.expect_exact("/exit or Ctrl-D")
    child.expect_exact(PROMPT)
    assert child.isalive()
    assert leave(child) == 0

    child = started(server_url)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_unreachable_server_is_one_line_and_exit_code_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    child = spawn_chat(url, timeout=30)
    child.expect(pexpect.EOF)
    child.close()
    lines = [line for line in child.before.splitlines() if line.strip()]
    assert child.exitstatus == 1
    assert len(lines) == 1 and "cannot reach" in lines[0] and url in lines[0], child.before
