"""nitro_torch: continuous-batching LLM serving on PyTorch + transformers with an OpenAI-compatible API."""

__version__ = "0.1.0"
