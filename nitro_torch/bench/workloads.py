"""Benchmark workloads: pure functions that return lists of `BenchRequest(prompt_token_ids, max_tokens)`.

Everything here is deterministic in its arguments (a seeded `random.Random`, never the global RNG), so every
system measured by `nitro-torch bench` (scripts/bench.py) sees exactly the same requests, run after run.

- `chat_requests`: the CPU workload "chat-64": templated chats with varied system and user messages
  (prompts ~30-300 tokens), `max_tokens` uniform in [16, 128].
- `random_requests`: random token ids with uniform prompt and output lengths (the shape of the GPU
  workload "w256": 256 requests, prompts 64-512, outputs 64-256; and of "decode-b1": one request, a 32-token
  prompt, 128 new tokens).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from typing import NamedTuple, Protocol

Message = dict[str, str]


class BenchRequest(NamedTuple):
    prompt_token_ids: list[int]
    max_tokens: int
    messages: list[Message] | None = None
    """The conversation a chat request was templated from: what a server benchmark (`--url`) sends instead of
    the token ids, so that the server applies its own chat template."""


class ChatTokenizer(Protocol):
    """The part of a HF tokenizer the chat workload needs."""

    def apply_chat_template(self, conversation: list[Message], **kwargs: object) -> object: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


# ---------------------------------------------------------------------------------------------------------------
# chat-64
# ---------------------------------------------------------------------------------------------------------------

# None = no system message: SmolLM2's chat template then inserts its own default system prompt.
SYSTEM_PROMPTS: tuple[str | None, ...] = (
    None,
    "You are a helpful assistant.",
    "You are a patient tutor. Explain ideas step by step, use simple words, and end with a one-sentence summary.",
    "You are a senior software engineer reviewing a colleague's question. Be precise, mention trade-offs, and "
    "prefer short code examples over long prose. If something is ambiguous, state your assumption first.",
    "You are a friendly travel guide who loves history and food. Answer with enthusiasm, give practical tips, "
    "and suggest one thing most visitors miss.",
    "You are an expert science communicator writing for curious teenagers. Follow these rules: (1) start with "
    "a surprising fact; (2) explain the core idea with an everyday analogy; (3) mention one common "
    "misconception and correct it; (4) keep every paragraph under four sentences; (5) never invent "
    "citations; (6) finish with a question that invites the reader to think further.",
)

TOPICS: tuple[str, ...] = (
    "photosynthesis", "black holes", "the French Revolution", "binary search", "compound interest",
    "the water cycle", "vaccines", "plate tectonics", "recursion in programming", "the Roman Empire",
    "climate change", "hash tables", "the human heart", "volcanoes", "machine learning",
    "the printing press", "sourdough bread", "the stock market", "electric cars", "honeybees",
    "the Moon landing", "DNA replication", "public-key cryptography", "jazz music",
)

QUESTION_TEMPLATES: tuple[str, ...] = (
    "What is {topic}?",
    "Explain {topic} to a ten-year-old.",
    "Give me three interesting facts about {topic}.",
    "Why does {topic} matter today?",
    "Write a short poem about {topic}.",
    "What are the most common misunderstandings about {topic}, and why do people get it wrong?",
    "Compare {topic} with something from everyday life and explain the similarities and the differences.",
    "I am preparing a five-minute talk about {topic} for my class. Suggest an outline with an opening hook, "
    "three main points and a memorable closing line.",
)

# Background paragraphs a user may paste before the question (lengthens some prompts towards ~300 tokens).
CONTEXT_PARAGRAPHS: tuple[str, ...] = (
    "Some background: I have been reading about this for a few weeks, mostly in library books and a couple of "
    "online courses, but the explanations I found either skip the basics or drown me in jargon.",
    "For context, my teacher mentioned it briefly last week and said it would come up again in the final exam, "
    "so I want to understand the main idea well enough to explain it in my own words.",
    "A friend of mine claims that everything about it was settled a hundred years ago and that there is nothing "
    "left to learn. I suspect that is not true, but I could not find a good argument during our discussion.",
    "I learn best with concrete examples and short sentences. Please avoid long lists of definitions, and if "
    "you use a technical term, explain it the first time it appears.",
    "Last year I tried to read a popular book about it, gave up after two chapters because of all the equations, "
    "and I would like to try again with a better mental model before I pick the book up again.",
    "My background is in accounting, not science or engineering, so please connect the explanation to ideas "
    "a practical person would recognise, like budgets, schedules, checklists or queues at the supermarket.",
)

CHAT_MAX_TOKENS = (16, 128)


def chat_messages(num_requests: int = 64, seed: int = 0) -> list[tuple[list[Message], int]]:
    """The conversations of the chat workload with their `max_tokens`, before templating."""
    rng = random.Random(seed)
    chats: list[tuple[list[Message], int]] = []
    for _ in range(num_requests):
        messages: list[Message] = []
        system = rng.choice(SYSTEM_PROMPTS)
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": _user_message(rng)})
        chats.append((messages, rng.randint(*CHAT_MAX_TOKENS)))
    return chats


def _user_message(rng: random.Random) -> str:
    question = rng.choice(QUESTION_TEMPLATES).format(topic=rng.choice(TOPICS))
    num_context = rng.choice((0, 0, 1, 2, 3, 4))
    context = rng.sample(CONTEXT_PARAGRAPHS, num_context)
    return "\n\n".join([*context, question])


def chat_requests(tokenizer: ChatTokenizer, num_requests: int = 64, seed: int = 0) -> list[BenchRequest]:
    """chat-64: the conversations of `chat_messages`, templated with the model's chat template and tokenized."""
    return [
        BenchRequest(template_chat(tokenizer, messages), max_tokens, messages)
        for messages, max_tokens in chat_messages(num_requests, seed)
    ]


def template_chat(tokenizer: ChatTokenizer, messages: list[Message]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)
    return tokenizer.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------------------------------------------------------
# random token ids (w256-style)
# ---------------------------------------------------------------------------------------------------------------


def random_requests(
    vocab_size: int,
    num_requests: int = 256,
    prompt_len: tuple[int, int] = (64, 512),
    output_len: tuple[int, int] = (64, 256),
    seed: int = 0,
) -> list[BenchRequest]:
    """Random prompts (token ids uniform in [0, vocab_size)), lengths uniform in the given inclusive ranges."""
    rng = random.Random(seed)
    requests: list[BenchRequest] = []
    for _ in range(num_requests):
        n = rng.randint(*prompt_len)
        requests.append(BenchRequest([rng.randrange(vocab_size) for _ in range(n)], rng.randint(*output_len)))
    return requests


# ---------------------------------------------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------------------------------------------


def describe(requests: Sequence[BenchRequest]) -> str:
    """One line: request count, prompt and output length ranges."""
    prompts = [len(r.prompt_token_ids) for r in requests]
    outputs = [r.max_tokens for r in requests]
    return (
        f"{len(requests)} requests; prompt tokens min/median/max {min(prompts)}/{statistics.median(prompts):g}/"
        f"{max(prompts)} (total {sum(prompts)}); max_tokens min/median/max {min(outputs)}/"
        f"{statistics.median(outputs):g}/{max(outputs)} (total {sum(outputs)})"
    )
