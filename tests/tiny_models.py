"""Tiny random-weight causal LMs saved as HF folders (SmolLM2's tokenizer), for tests that need a second
model or a chat template the default model lacks. Seconds to build, megabytes on disk."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


def save_tiny_model(folder: Path, tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None,
                    seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                    max_shard_size: str | None = None, initializer_range: float = 0.02) -> Path:
    """A 2-layer Llama with `tokenizer` (and `chat_template` replacing its own when given) saved to `folder`
    (in shards of `max_shard_size` with an index, when given). A larger `initializer_range` than the default makes
    greedy answers less repetitive (the last token's embedding then rules the logits less)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True, initializer_range=initializer_range,
    )
    model = LlamaForCausalLM(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    original = tokenizer.chat_template
    try:
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = original
    return folder
