"""Structured outputs: the token mask against xgrammar's own matcher on the real SmolLM2 vocabulary, the sampler
under a mask, and the engine on a tiny random-weight model, whose junk logits the grammar must still tame."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
import xgrammar as xgr

from nitro_torch.config import build_config
from nitro_torch.engine.engine import LLMEngine
from nitro_torch.engine.request import Request
from nitro_torch.models.loader import load_model
from nitro_torch.runner.attention import register_paged_attention
from nitro_torch.runner.guided import GuidedDecoder, TokenMask, mask_with_torch
from nitro_torch.runner.sampler import Sampler
from nitro_torch.sampling import GuidedDecoding, SamplingParams, SamplingParamsError
from nitro_torch.server.chat.response_format import guided_decoding

CPU = torch.device("cpu")
EOS = 2
YES_NO = GuidedDecoding("ebnf", 'root ::= "yes" | "no"')
# Every string, number and array is bounded, so even uniform-random logits must finish the object.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string",
                                                                                 "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "role", "active", "address"],
}


@pytest.fixture(scope="module")
def decoder(smol_tokenizer) -> GuidedDecoder:
    return GuidedDecoder(smol_tokenizer, len(smol_tokenizer), [EOS], CPU)


def make_request(request_id: str, guided: GuidedDecoding | None = None, output: list[int] | None = None,
                 **params) -> Request:
    return Request(request_id, [1, 2, 3], SamplingParams(guided=guided, **params), eos_token_ids=frozenset({EOS}),
                   output_token_ids=list(output or []))


def accepted_by_matcher(compiled: xgr.CompiledGrammar, prefix: str, vocab_size: int) -> torch.Tensor:
    """Ground truth, token by token: does a matcher that has seen `prefix` accept the token?"""
    matcher = xgr.GrammarMatcher(compiled, max_rollback_tokens=1)
    assert matcher.accept_string(prefix)
    accepted = torch.zeros(vocab_size, dtype=torch.bool)
    for token_id in range(vocab_size):
        if matcher.accept_token(token_id):
            accepted[token_id] = True
            matcher.rollback(1)
    return accepted


# ---- the mask ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("guided", "prefix"), [
    (GuidedDecoding("json_schema", json.dumps(PERSON_SCHEMA)), '{"name": "Al'),
    (GuidedDecoding("json_object"), '{"a": [1, '),
    (GuidedDecoding("regex", r"[0-9]{3}-[a-z]+"), "12"),
    (YES_NO, ""),
])
def test_mask_is_exactly_what_the_matcher_accepts(smol_tokenizer, decoder, guided, prefix):
    request = make_request(f"mask-{guided.kind}", guided)
    decoder.attach(request)
    try:
        matcher = decoder._matchers[request.request_id]
        assert matcher.accept_string(prefix)
        mask = decoder.token_mask([make_request("plain"), request])
        assert mask is not None and mask.rows == [1]
        allowed = mask.allowed(decoder.vocab_size)[0]
        expected = accepted_by_matcher(decoder.compile(guided), prefix, decoder.vocab_size)
        assert torch.equal(allowed, expected)
        assert 0 < int(allowed.sum()) < decoder.vocab_size
    finally:
        decoder.release(request.request_id)
    assert not decoder.active


def test_choice_mask_allows_only_prefixes_of_the_choices(smol_tokenizer, decoder):
    request = make_request("choice", YES_NO)
    decoder.attach(request)
    mask = decoder.token_mask([request])
    decoder.release(request.request_id)
    allowed_ids = mask.allowed(decoder.vocab_size)[0].nonzero().flatten().tolist()
    texts = {smol_tokenizer.decode([t]) for t in allowed_ids}
    assert texts and all(t and ("yes".startswith(t) or "no".startswith(t)) for t in texts)
    assert {"y", "n"} <= texts


def test_apply_matches_xgrammar_kernel_on_a_padded_vocabulary(smol_tokenizer):
    padded = len(smol_tokenizer) + 77  # logits wider than the tokenizer: the extra ids are never allowed
    decoder = GuidedDecoder(smol_tokenizer, padded, [EOS], CPU)
    requests = [make_request("a", YES_NO), make_request("b"), make_request("c", GuidedDecoding("json_object"))]
    for r in requests:
        decoder.attach(r)
    mask = decoder.token_mask(requests)
    assert mask.rows == [0, 2]
    logits = torch.randn(3, padded, generator=torch.Generator().manual_seed(0))
    ours = logits.clone()
    mask.apply(ours)
    full = torch.full((3, decoder.words), -1, dtype=torch.int32)
    full[[0, 2]] = mask.packed[: 2 * decoder.words].view(2, decoder.words)
    reference = logits.clone()
    xgr.apply_token_bitmask_inplace(reference, full, indices=[0, 2], backend="cpu")
    assert torch.equal(ours, reference)
    assert torch.equal(ours[1], logits[1])
    assert torch.isinf(ours[[0, 2], len(smol_tokenizer):]).all()
    on_other_devices = logits[[0, 2]].clone()  # the path CUDA takes, checked here on CPU tensors
    mask_with_torch(on_other_devices, full[[0, 2]])
    assert torch.equal(on_other_devices, reference[[0, 2]])


def test_no_grammar_row_means_no_mask(decoder):
    assert decoder.token_mask([make_request("x"), make_request("y")]) is None


def test_one_compiler_per_tokenizer(smol_tokenizer, decoder):
    other = GuidedDecoder(smol_tokenizer, len(smol_tokenizer), [EOS], CPU)
    assert other.compiler() is decoder.compiler()


def test_compiled_grammars_are_cached(decoder):
    guided = GuidedDecoding("json_schema", json.dumps({"type": "object", "properties": {"k": {"type": "integer"}}}))
    assert decoder.compile(guided) is decoder.compile(GuidedDecoding(guided.kind, guided.spec))


@pytest.mark.parametrize("guided", [
    GuidedDecoding("json_schema", '{"type": 5}'),
    GuidedDecoding("json_schema", "{not json"),
    GuidedDecoding("regex", "[a-"),
    GuidedDecoding("ebnf", "root ::= undefined_rule"),
    GuidedDecoding("structural_tag", '{"type": "structural_tag"}'),
])
def test_invalid_specs_are_sampling_params_errors(decoder, guided):
    with pytest.raises(SamplingParamsError) as info:
        decoder.compile(guided)
    assert info.value.param == "response_format"
    assert ".cc:" not in str(info.value)  # no C++ source locations in client-facing messages


@pytest.mark.parametrize("guided", [
    GuidedDecoding("json_schema", '{"$ref": "#"}'),
    GuidedDecoding("json_schema", '{"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}'),
    GuidedDecoding("json_schema", '{"type": "array", "items": {"$ref": "#"}, "minItems": 1}'),
    GuidedDecoding("ebnf", 'root ::= "(" root ")"'),
    GuidedDecoding("ebnf", 'root ::= item\nitem ::= "x" item+'),
])
def test_a_grammar_without_a_finite_output_is_rejected(decoder, guided):
    """Before, these compiled, no token was ever allowed, and the engine logged 'grammar rejected sampled token'."""
    with pytest.raises(SamplingParamsError, match="no finite output"):
        decoder.compile(guided)


@pytest.mark.parametrize("guided", [
    GuidedDecoding("json_schema", '{"type": "object", "properties": {"a": {"$ref": "#"}}}'),
    GuidedDecoding("json_schema", '{"type": "array", "items": {"$ref": "#"}}'),
    GuidedDecoding("json_schema", '{"anyOf": [{"$ref": "#"}, {"type": "null"}]}'),
    GuidedDecoding("ebnf", 'root ::= "(" root ")" | "x"'),
    GuidedDecoding("ebnf", 'root ::= ("a" root)*'),
    GuidedDecoding("regex", "a+b?c{2,3}[x-z]*"),
])
def test_a_recursive_grammar_with_finite_outputs_compiles(decoder, guided):
    assert decoder.compile(guided) is not None


def test_structural_tag_in_both_shapes(decoder):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    legacy = {"structures": [{"begin": "<tool>", "schema": schema, "end": "</tool>"}], "triggers": ["<tool>"]}
    current = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<tool>"], "tags": [
        {"type": "tag", "begin": "<tool>", "content": {"type": "json_schema", "json_schema": schema},
         "end": "</tool>"}]}}
    for spec in (legacy, current):
        compiled = decoder.compile(GuidedDecoding("structural_tag", json.dumps(spec)))
        matcher = xgr.GrammarMatcher(compiled)
        assert matcher.accept_string('I will look it up. <tool>{"city": "Paris"}</tool>')
        assert not matcher.accept_string("<tool>{bad")


# ---- the sampler under a mask ------------------------------------------------------------------------------


def yes_no_batch(decoder: GuidedDecoder, **params) -> tuple[list[Request], TokenMask]:
    requests = [make_request("free", **params), make_request("guided", YES_NO, **params)]
    decoder.attach(requests[1])
    mask = decoder.token_mask(requests)
    decoder.release("guided")
    return requests, mask


def test_greedy_fast_path_honours_the_mask(smol_tokenizer, decoder):
    requests, mask = yes_no_batch(decoder, temperature=0.0)
    logits = torch.randn(2, decoder.vocab_size, generator=torch.Generator().manual_seed(3))
    sampled = Sampler(CPU).sample(logits, requests, mask)
    allowed = mask.allowed(decoder.vocab_size)[0]
    assert sampled[0].token_id == int(logits[0].argmax())
    masked = logits[1].masked_fill(~allowed, float("-inf"))
    assert sampled[1].token_id == int(masked.argmax())
    assert smol_tokenizer.decode([sampled[1].token_id]) in {"y", "ye", "yes", "n", "no"}


@pytest.mark.parametrize("params", [
    {"temperature": 1.0, "seed": 7},
    {"temperature": 1.5, "top_k": 50, "top_p": 0.9},
    {"temperature": 0.0, "logprobs": 2, "presence_penalty": 0.5},
    {"temperature": 1.0, "min_p": 0.2, "logit_bias": {100: 100.0}},
])
def test_sampled_tokens_are_always_allowed(decoder, params):
    requests, mask = yes_no_batch(decoder, **params)
    allowed = mask.allowed(decoder.vocab_size)[0]
    sampler = Sampler(CPU)
    for step in range(20):
        logits = torch.randn(2, decoder.vocab_size, generator=torch.Generator().manual_seed(step))
        sampled = sampler.sample(logits, requests, mask)
        assert allowed[sampled[1].token_id]
        if params.get("logprobs") is not None:  # logprobs describe the raw model logits, not the masked ones
            raw = logits.log_softmax(dim=-1)
            assert sampled[1].logprob.logprob == pytest.approx(float(raw[1, sampled[1].token_id]), abs=1e-5)


def test_min_tokens_does_not_fight_a_complete_grammar(decoder):
    request = make_request("done", YES_NO, min_tokens=5, temperature=1.0)
    decoder.attach(request)
    assert decoder._matchers["done"].accept_string("yes")
    mask = decoder.token_mask([request])
    decoder.release("done")
    logits = torch.randn(1, decoder.vocab_size)
    assert Sampler(CPU).sample(logits, [request], mask)[0].token_id == EOS


# ---- the engine on a tiny random model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir) -> LLMEngine:
    config = build_config({"model": tiny_model_dir, "device": "cpu", "max_num_seqs": 8,
                           "max_num_batched_tokens": 256}, env={})
    return LLMEngine(load_model(config.model, attn_implementation=register_paged_attention()), config)


@pytest.fixture(scope="module")
def prompt(tiny_engine) -> list[int]:
    return tiny_engine.tokenizer("Describe a user as JSON.")["input_ids"]


def run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple[str, str]]:
    """(text, finish reason) per prompt, all in one continuous batch."""
    ids = [f"guided-{i}" for i in range(len(prompts))]
    requests = [engine.add_request(i, p, sp) for i, p, sp in zip(ids, prompts, params)]
    texts = {i: "" for i in ids}
    while engine.has_unfinished_requests:
        for output in engine.step():
            texts[output.request_id] += output.new_text
    assert not engine.guided.active  # every matcher released
    return [(texts[i], r.finish_reason.value) for i, r in zip(ids, requests)]


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 11},
                                      {"temperature": 1.0, "top_p": 0.8, "seed": 5, "repetition_penalty": 1.3}])
def test_random_model_output_validates_against_the_schema(tiny_engine, prompt, sampling):
    params = SamplingParams(max_tokens=400, guided=GuidedDecoding("json_schema", json.dumps(PERSON_SCHEMA)),
                            **sampling)
    for text, reason in run(tiny_engine, [prompt] * 2, [params] * 2):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)


def test_mixed_batch_of_kinds(tiny_engine, prompt):
    kinds = [
        (GuidedDecoding("regex", r"[A-Z][a-z]{2,6}-[0-9]{2}"), lambda t: re.fullmatch(r"[A-Z][a-z]{2,6}-[0-9]{2}", t)),
        (guided_decoding(guided_choice=["red", "green", 'say "blue"']), lambda t: t in {"red", "green", 'say "blue"'}),
        (GuidedDecoding("ebnf", 'root ::= "(" [0-9]+ ("+" [0-9])? ")"'), lambda t: re.fullmatch(r"\(\d+(\+\d)?\)", t)),
        (None, lambda t: True),
    ]
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=i, guided=g) for i, (g, _) in enumerate(kinds)]
    results = run(tiny_engine, [prompt] * len(kinds), params)
    for (text, reason), (guided, check) in zip(results[:3], kinds[:3]):
        assert reason == "stop" and check(text), (guided, text)


def test_grammar_ends_the_request_even_with_ignore_eos(tiny_engine, prompt):
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True, guided=YES_NO)
    [(text, reason)] = run(tiny_engine, [prompt], [params])
    assert reason == "stop" and text in {"yes", "no"}


def test_preempted_requests_keep_their_grammar_state(tiny_model_dir, prompt):
    config = build_config({"model": tiny_model_dir, "device": "cpu", "num_kv_blocks": 12, "block_size": 16,
                           "max_num_seqs": 8}, env={})
    engine = LLMEngine(load_model(config.model, attn_implementation=register_paged_attention()), config)
    schema = GuidedDecoding("json_schema", json.dumps(PERSON_SCHEMA))
    params = [SamplingParams(max_tokens=100, temperature=1.0, seed=i, guided=schema) for i in range(5)]
    results = run(engine, [prompt] * 5, params)
    assert engine.scheduler.stats.num_preemptions > 0
    assert any(reason == "stop" for _, reason in results)
    for text, reason in results:
        if reason == "stop":
            jsonschema.validate(json.loads(text), PERSON_SCHEMA)
        else:  # cut by max_tokens: still a valid prefix, never a broken token
            assert reason == "length" and text.startswith("{")


def test_add_request_rejects_a_bad_grammar_without_queueing(tiny_engine, prompt):
    with pytest.raises(SamplingParamsError) as info:
        tiny_engine.add_request("bad", prompt, SamplingParams(guided=GuidedDecoding("regex", "(unclosed")))
    assert info.value.param == "response_format"
    assert not tiny_engine.has_unfinished_requests and not tiny_engine.guided.active


def test_abort_releases_the_matcher(tiny_engine, prompt):
    tiny_engine.add_request("to-abort", prompt, SamplingParams(max_tokens=50, guided=YES_NO))
    assert tiny_engine.guided.active
    tiny_engine.abort("to-abort")
    assert not tiny_engine.guided.active and not tiny_engine.has_unfinished_requests
