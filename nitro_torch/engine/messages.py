"""Plain typed messages between the engine client (API side) and the engine core: nothing alive crosses.

Requests go in as `EngineCoreRequest`; each core step comes back as one `CoreOutputs` batch that holds, per
request that advanced, only token ids (no text: the client detokenizes), plus the core's counters. They are
msgspec structs: between processes they travel as MessagePack (`encode_input` / `decode_output` ...), measured
at ~0.05 µs a request for a 256-request step, against ~1.2 µs for pickled dataclasses (DESIGN notes in the
README's architecture section).
"""

from __future__ import annotations

from typing import Any

import msgspec

from nitro_torch.engine.outputs import FinishReason, TokenLogprob
from nitro_torch.sampling import GuidedDecoding, SamplingParams


class EngineCoreRequest(msgspec.Struct, tag="add"):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    parent_id: str | None = None
    """A live request with the same prompt (choice 0 of n) whose computed prompt this one shares."""
    client: str = ""
    """Who sent it (an API key's fingerprint or an address): steps are shared fairly between clients."""


class FinishRequests(msgspec.Struct, tag="finish"):
    """End these requests now: the client aborted them, or found a stop string in their text."""

    request_ids: list[str]
    reason: FinishReason = FinishReason.ABORT


class EmbedCall(msgspec.Struct, tag="embed"):
    """One packed embedding forward, between steps; answered with a CallResult holding the vectors."""

    call_id: int
    token_id_lists: list[list[int]]


class CompileGrammar(msgspec.Struct, tag="grammar"):
    """Compile (and cache) a request's grammar off the core's loop; answered with an empty CallResult."""

    call_id: int
    guided: GuidedDecoding


UtilityCall = EmbedCall | CompileGrammar


class StartCore(msgspec.Struct, tag="start"):
    """Go on from staged weights: move them to the device, build the KV cache, serve."""


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


CoreInput = EngineCoreRequest | FinishRequests | EmbedCall | CompileGrammar | StartCore | Shutdown


class CoreOutput(msgspec.Struct, array_like=True, gc=False):
    """One request's progress in one step: the token ids it sampled, and how it ended if it did."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    ended_on_stop_token: bool = False
    """It ended because its last token is an EOS / stop token id (which is then not rendered as text)."""
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    """Set when the request failed alone (its sampling, logits, or its arrival); it ends with finish_reason abort."""
    first_scheduled_time: float | None = None
    """time.monotonic() of its first admission (one clock for every process of the machine)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineStats(msgspec.Struct):
    """The core's counters after a step, as /health, /metrics and admission read them."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prefix_cache_query_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    decode_compiling: bool = False
    """The one-request decode step is still compiling in the background (--cpu-decode-compile background): a
    request alone decodes eagerly, at about half the compiled step's tokens/s, until it is done."""


class CoreOutputs(msgspec.Struct, tag="outputs"):
    """Everything one core step (or one batch of commands) produced, sent as one message."""

    outputs: list[CoreOutput]
    stats: EngineStats
    num_received: int = 0
    """Requests the core has taken in so far: the client counts the rest of what it sent as waiting."""


class CallResult(msgspec.Struct, tag="result"):
    call_id: int
    value: Any = None
    error: str | None = None
    error_type: str | None = None
    """The exception's class name, so the client raises the same kind (SamplingParamsError, ValueError...)."""
    error_param: str | None = None


class EngineInfo(msgspec.Struct, frozen=True):
    """What the serving engine is: fixed for its lifetime, known once it has started."""

    model_name: str
    model_path: str
    device: str
    device_name: str
    """The GPU's name, or "cpu (N threads)"."""
    dtype: str
    quantization: str
    kv_cache_dtype: str
    kv_capacity_tokens: int
    kv_blocks_total: int
    kv_block_size: int
    max_num_seqs: int
    max_model_len: int
    max_num_batched_tokens: int
    embedding_size: int
    eos_token_ids: frozenset[int] = frozenset()
    packed_weights: str = ""
    """How --cpu-weights packed the linear layers ("": the float weights as loaded, token-identical)."""
    row_decode_compile: str = "off"
    """When the compiled one-request CPU decode step was made (--cpu-decode-compile; off: none)."""
    tensor_parallel_size: int = 1
    ranks: list[str] = []
    """With tensor parallelism: what each rank holds ("rank 1 on cuda:1: weights ..."), rank 0 first."""
    kv_cache_bytes: int = 0
    """The KV cache's bytes, summed over the ranks."""
    max_step_time_s: float = 0.0
    """--max-step-time as it applies (0: steps are not limited in time)."""


class CoreStaged(msgspec.Struct, tag="staged"):
    """The core process has its weights (on the CPU when the target is a GPU) and waits for StartCore."""


class CoreReady(msgspec.Struct, tag="ready"):
    info: EngineInfo


class CoreFailed(msgspec.Struct, tag="failed"):
    """The core could not load or start, or its loop died: why, for the client to raise or log."""

    phase: str
    """"load" (staging the weights), "start" (device, KV cache) or "run"."""
    message: str
    error_types: list[str]
    """The exception's class name, then its bases' (so the client can raise the nearest kind it knows)."""


CoreMessage = CoreOutputs | CallResult | CoreStaged | CoreReady | CoreFailed

_encoder = msgspec.msgpack.Encoder()
_input_decoder = msgspec.msgpack.Decoder(CoreInput)  # type: ignore[arg-type]
_message_decoder = msgspec.msgpack.Decoder(CoreMessage)  # type: ignore[arg-type]


def encode(message: CoreInput | CoreMessage) -> bytes:
    return _encoder.encode(message)


def decode_input(data: bytes) -> CoreInput:
    return _input_decoder.decode(data)  # type: ignore[no-any-return]


def decode_message(data: bytes) -> CoreMessage:
    return _message_decoder.decode(data)  # type: ignore[no-any-return]
