"""Structured outputs: grammars compiled once per (kind, spec) with xgrammar, one matcher per request, and
a per-step token mask for the rows that sample under a grammar (one host->device copy per step).

Stop tokens (EOS, and the request's stop_token_ids) are allowed only where the structure is complete, so a
constrained output always ends well-formed unless max_tokens or a stop string cut it first.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import xgrammar as xgr
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nitro_torch.runner.grammar_language import admits_finite_output
from nitro_torch.runner.sequence import SequenceState
from nitro_torch.sampling import GuidedDecoding, SamplingParamsError

logger = logging.getLogger("nitro_torch.guided")

_MAX_CACHED_GRAMMARS = 256
_XGRAMMAR_CACHE_BYTES = 512 << 20
"""xgrammar keeps sub-results (e.g. bounded strings) across schemas; bounded so user schemas cannot grow it forever."""
_JSON_OBJECT_SCHEMA = '{"type": "object"}'
_WHAT = {"json_object": "JSON mode", "json_schema": "JSON schema", "regex": "regex", "ebnf": "grammar",
         "structural_tag": "structural tag"}
_CPP_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
_COMPILERS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, dict[tuple, xgr.GrammarCompiler]] = \
    weakref.WeakKeyDictionary()


def grammar_compiler(tokenizer: PreTrainedTokenizerBase, vocab_size: int,
                     stop_token_ids: Sequence[int]) -> xgr.GrammarCompiler:
    """One compiler per tokenizer (building its TokenizerInfo takes a few hundred ms on a 50k vocabulary).

    `vocab_size` is the width of the model's logits, which may exceed the tokenizer: those ids are never allowed."""
    per_tokenizer = _COMPILERS.setdefault(tokenizer, {})
    key = (vocab_size, tuple(stop_token_ids))
    compiler = per_tokenizer.get(key)
    if compiler is None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_token_ids) or None)
        # A quarter of the cores: a big schema compiling beside the step loop must not starve its forward.
        compiler = per_tokenizer[key] = xgr.GrammarCompiler(info, max_threads=max(1, (os.cpu_count() or 1) // 4),
                                                            cache_limit_bytes=_XGRAMMAR_CACHE_BYTES)
    return compiler


def logits_vocab_size(model: PreTrainedModel) -> int:
    """Width of the model's logits, which may exceed len(tokenizer) (padded embedding tables)."""
    head = model.get_output_embeddings()
    width = getattr(head, "out_features", None) or getattr(getattr(head, "weight", None), "shape", [None])[0]
    return int(width or model.config.get_text_config().vocab_size)


def grammar_of(guided: GuidedDecoding, param: str = "response_format") -> xgr.Grammar:
    """The tokenizer-free grammar (SamplingParamsError if the spec is invalid or admits no finite output).

    Usually milliseconds, but a deeply nested schema takes seconds: the server runs this off its event loop
    (server/chat/grammar_check.py)."""
    grammar = _build_grammar(guided, param)
    if not admits_finite_output(str(grammar)):
        raise SamplingParamsError(param, f"Invalid {_WHAT[guided.kind]} for '{param}': it admits no finite output "
                                         "(every value would have to contain itself, e.g. a required "
                                         "property whose schema is a $ref to its parent)")
    return grammar


def _build_grammar(guided: GuidedDecoding, param: str) -> xgr.Grammar:
    try:
        if guided.kind == "json_object":
            return xgr.Grammar.from_json_schema(_JSON_OBJECT_SCHEMA, any_whitespace=False)
        if guided.kind == "json_schema":
            return xgr.Grammar.from_json_schema(guided.spec, any_whitespace=False)
        if guided.kind == "regex":
            return xgr.Grammar.from_regex(guided.spec)
        if guided.kind == "ebnf":
            return xgr.Grammar.from_ebnf(guided.spec)
        if guided.kind == "structural_tag":
            return xgr.Grammar.from_structural_tag(structural_tag_json(guided.spec))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise guided_error(guided, exc, param) from None
    raise SamplingParamsError(param, f"unknown guided decoding kind {guided.kind!r}")


def check_compiles(guided: GuidedDecoding, param: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """Everything the engine will do with the spec, against the tokenizer's vocabulary: a spec that compiles
    here compiles in the engine in about the same time (SamplingParamsError otherwise)."""
    grammar = grammar_of(guided, param)
    try:
        checking_compiler(tokenizer).compile_grammar(grammar)  # xgrammar releases the GIL meanwhile
    except (RuntimeError, ValueError, TypeError) as exc:
        raise guided_error(guided, exc, param) from None


_CHECKING_COMPILERS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, xgr.GrammarCompiler] = \
    weakref.WeakKeyDictionary()
_CHECKING_LOCK = threading.Lock()


def checking_compiler(tokenizer: PreTrainedTokenizerBase) -> xgr.GrammarCompiler:
    """The server's compiler for checking specs: one thread per compile (so a check uses at most one core) and
    no cache (the server keeps verdicts, not compiled grammars)."""
    with _CHECKING_LOCK:
        compiler = _CHECKING_COMPILERS.get(tokenizer)
        if compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
            compiler = _CHECKING_COMPILERS[tokenizer] = xgr.GrammarCompiler(info, max_threads=1,
                                                                             cache_enabled=False)
        return compiler


def structural_tag_json(spec: str) -> str:
    """xgrammar's structural tag JSON; the legacy {"structures": [{begin, schema, end}], "triggers"} is converted."""
    try:
        value = json.loads(spec)
    except (json.JSONDecodeError, RecursionError):
        return spec  # xgrammar words the error
    if isinstance(value, dict) and "structures" in value and "format" not in value:
        items = [xgr.StructuralTagItem(**item) for item in value["structures"]]
        return xgr.StructuralTag.from_legacy_structural_tag(items, list(value.get("triggers", []))) \
            .model_dump_json(indent=None)
    return spec


def guided_error(guided: GuidedDecoding, exc: Exception, param: str = "response_format") -> SamplingParamsError:
    detail = _CPP_LOCATION.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return SamplingParamsError(param, f"Invalid {_WHAT.get(guided.kind, guided.kind)} for '{param}': {detail}")


def unpack_bitmask(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar's int32 bitmask words [k, W] -> [k, vocab_size] bool (bit j of word i is token 32 i + j)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).view(bits.shape[0], -1)[:, :vocab_size].bool()


def mask_with_torch(scores: torch.Tensor, bits: torch.Tensor) -> None:
    """In place on [k, V] scores, on any device (a few elementwise kernels, no JIT-compiled ones)."""
    scores.masked_fill_(~unpack_bitmask(bits, scores.shape[1]), float("-inf"))


@dataclass
class TokenMask:
    """The grammar rows of one sampling batch: their allowed tokens, packed as xgrammar bitmask words
    with the batch row index appended, so rows and bits travel to the device in one copy. Valid for one
    step: on CPU `packed` is a view of the decoder's reused host buffer."""

    rows: list[int]
    matchers: list[xgr.GrammarMatcher]
    packed: torch.Tensor
    """[len(rows) * words + len(rows)] int32 on the logits' device."""
    words: int

    def _parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = len(self.rows)
        return self.packed[: k * self.words].view(k, self.words), self.packed[k * self.words:].long()

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """[len(rows), vocab_size] bool: which tokens keep each row's output valid."""
        return unpack_bitmask(self._parts()[0], vocab_size)

    def _mask(self, grammar_rows: torch.Tensor) -> None:
        """In place on [len(rows), V] scores: forbidden tokens get -inf."""
        bits, _ = self._parts()
        if grammar_rows.device.type == "cpu":
            # xgrammar's single-threaded kernel reads the bits directly: no [k, V] bool tensor to build.
            xgr.apply_token_bitmask_inplace(grammar_rows, bits, vocab_size=grammar_rows.shape[1], backend="cpu")
        else:
            mask_with_torch(grammar_rows, bits)

    def apply(self, scores: torch.Tensor) -> None:
        """In place: tokens the grammar forbids get -inf in the grammar rows."""
        if self.rows == list(range(scores.shape[0])):
            self._mask(scores)
            return
        _, rows = self._parts()
        grammar_rows = scores.index_select(0, rows)
        self._mask(grammar_rows)
        scores.index_copy_(0, rows, grammar_rows)

    def greedy(self, logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """`token_ids` (argmax of the raw logits) with the grammar rows re-picked among allowed tokens."""
        _, rows = self._parts()
        grammar_rows = logits.index_select(0, rows)
        self._mask(grammar_rows)
        return token_ids.index_copy(0, rows, grammar_rows.argmax(dim=-1))


class GuidedDecoder:
    """Per engine: the compiler (TokenizerInfo built on first use), compiled grammars and live matchers."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: Iterable[int],
                 device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = max(vocab_size, len(tokenizer))
        self.stop_token_ids = sorted(stop_token_ids)
        self.device = torch.device(device)
        self.words = (self.vocab_size + 31) // 32
        self._compiler: xgr.GrammarCompiler | None = None
        self._grammars: OrderedDict[GuidedDecoding, xgr.CompiledGrammar] = OrderedDict()
        self._matchers: dict[str, xgr.GrammarMatcher] = {}
        self._batch: xgr.BatchGrammarMatcher | None = None
        self._host = torch.empty(0, dtype=torch.int32)
        self._lock = threading.Lock()
        """compile() also runs on worker threads (the core process's grammar thread), so a slow schema never stalls
        the core's steps."""

    @property
    def active(self) -> bool:
        """True while any request has a matcher; the engine skips all grammar work otherwise."""
        return bool(self._matchers)

    def compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                self._compiler = grammar_compiler(self.tokenizer, self.vocab_size, self.stop_token_ids)
            return self._compiler

    def compile(self, guided: GuidedDecoding) -> xgr.CompiledGrammar:
        """The compiled grammar, from the cache when it was compiled before (thread-safe)."""
        with self._lock:
            compiled = self._grammars.get(guided)
            if compiled is not None:
                self._grammars.move_to_end(guided)
                return compiled
        grammar = grammar_of(guided)
        try:
            compiled = self.compiler().compile_grammar(grammar)  # xgrammar releases the GIL meanwhile
        except (RuntimeError, ValueError, TypeError) as exc:
            raise guided_error(guided, exc) from None
        with self._lock:
            self._grammars[guided] = compiled
            if len(self._grammars) > _MAX_CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
        return compiled

    def attach(self, request: SequenceState) -> None:
        """Compile the request's grammar (SamplingParamsError if it is invalid) and start its matcher."""
        guided = request.params.guided
        if guided is None:
            return
        compiled = self.compile(guided)
        stops = sorted(set(self.stop_token_ids) | set(request.params.stop_token_ids))
        matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stops or None)
        for token_id in request.output_token_ids:  # a request that already has output (never the usual case)
            matcher.accept_token(token_id)
        self._matchers[request.request_id] = matcher

    def release(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def token_mask(self, requests: Sequence[SequenceState]) -> TokenMask | None:
        """The mask for the rows of `requests` that have a grammar; None when no row has one."""
        rows: list[int] = []
        matchers: list[xgr.GrammarMatcher] = []
        for row, request in enumerate(requests):
            matcher = self._matchers.get(request.request_id)
            if matcher is not None:
                rows.append(row)
                matchers.append(matcher)
        if not rows:
            return None
        k = len(rows)
        host = self._host_buffer(k * self.words + k)
        bits = host[: k * self.words].view(k, self.words)
        if k == 1:
            matchers[0].fill_next_token_bitmask(bits, 0)
        else:
            if self._batch is None:
                self._batch = xgr.BatchGrammarMatcher()
            self._batch.batch_fill_next_token_bitmask(matchers, bits)
        host[k * self.words: k * self.words + k] = torch.tensor(rows, dtype=torch.int32)
        packed = host[: k * self.words + k]
        if self.device.type != "cpu":
            packed = packed.to(self.device, non_blocking=True)
        return TokenMask(rows, matchers, packed, self.words)

    def accept(self, mask: TokenMask, token_ids: Sequence[int]) -> list[int]:
        """Advance the grammar rows by their sampled tokens; returns the rows whose grammar has ended."""
        ended = []
        for row, matcher in zip(mask.rows, mask.matchers, strict=True):
            if not matcher.accept_token(token_ids[row]):
                logger.error("grammar rejected sampled token %d; ending the request", token_ids[row])
                ended.append(row)
            elif matcher.is_terminated():
                ended.append(row)
        return ended

    def _host_buffer(self, size: int) -> torch.Tensor:
        # Reused across steps: a non-blocking copy out of it has finished by the time the sampler syncs.
        if self._host.numel() < size:
            pin = self.device.type == "cuda"
            self._host = torch.empty(max(size, 2 * self._host.numel()), dtype=torch.int32, pin_memory=pin)
        return self._host
