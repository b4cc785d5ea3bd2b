"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors; triton reads this when a
# kernel is decorated, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite checks greedy answers against transformers and across batchings (alone, concurrent, through each
# API), which holds for float weights only: servers started here, and configs read from the environment, use
# --cpu-weights fp32. The packed default has its own tests, which ask for it explicitly
# (tests/models/test_cpu_weights.py, tests/runner/test_lean_decoder.py, test_startup.py, the decode-b1 bench).
os.environ.setdefault("NITRO_CPU_WEIGHTS", "fp32")
# A packed model would also compile its one-request decode step in the background (a minute of the CPU): servers
# started here do not, except where a test asks (tests/runner/test_row_decode.py, test_startup.py, decode-b1).
os.environ.setdefault("NITRO_CPU_DECODE_COMPILE", "off")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2 tokenizer: from $NITRO_TEST_TOKENIZER (a saved copy: the GPU machine lacks the 98 MB embedded
    model), else through the model loader, else the saved reference copy."""
    if os.environ.get("NITRO_TEST_TOKENIZER"):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.environ["NITRO_TEST_TOKENIZER"])
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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> str:
    """A tiny random-weight Llama with SmolLM2's tokenizer and chat template, as an HF folder."""
    from tests.tiny_models import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer))
