"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2 tokenizer: through the model loader when it exists, else the saved reference copy."""
    try:
        from nitro_torch.models.loader import load_tokenizer
    except ImportError:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained("/tmp/smol_ref")
    return load_tokenizer("default")


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The embedded default model as a safetensors HF folder, converted once per machine into the normal cache."""
    from nitro_torch.models.loader import resolve_model_source

    return resolve_model_source("default")[0]
