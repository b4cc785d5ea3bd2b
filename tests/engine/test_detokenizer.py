from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nitro_torch.engine.detokenizer import IncrementalDetokenizer
from nitro_torch.sampling import SamplingParams

PROMPT = [1, 2, 3]
MULTIBYTE_TEXT = "héllo 😀👍🏽 你好世界, naïve café — 日本語のテキスト 🚀🎉!"


def stream(tokenizer, token_ids: list[int], prompt: list[int] = PROMPT,
           **params) -> tuple[list[str], IncrementalDetokenizer]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(**params))
    pieces = []
    for token_id in token_ids:
        pieces.append(detokenizer.add(token_id))
        if detokenizer.stopped:
            break
    pieces.append(detokenizer.finish())
    return pieces, detokenizer


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A Llama-style tokenizer: '▁' word markers, byte fallback, first leading space stripped."""
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "▁Hello": 2, "▁world": 3, "!": 4, "▁": 5, "lo": 6}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


LLAMA_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little fox who lived in the woods.",
    "Hello world! The weather is lovely today, said the dog to the fox.",
] * 20


@pytest.fixture(scope="module")
def trained_llama_tokenizer():
    """A Llama-style tokenizer trained here: '▁' word markers (Metaspace), BPE with byte fallback and
    Llama's decoder, which strips the first space of the text it decodes."""
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(LLAMA_CORPUS, trainer)
    spec = json.loads(backend.to_str())  # byte-fallback pieces are ordinary vocabulary entries, as in Llama
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def byte_tokens(text: str) -> list[int]:
    return [7 + b for b in text.encode()]


def test_stream_equals_full_decode(smol_tokenizer):
    ids = smol_tokenizer.encode("The quick brown fox\njumps over   the lazy dog. It's 42°C!")
    pieces, detokenizer = stream(smol_tokenizer, ids)
    assert "".join(pieces) == smol_tokenizer.decode(ids) == detokenizer.output_text


def test_split_utf8_is_never_emitted_half(smol_tokenizer):
    ids = smol_tokenizer.encode(MULTIBYTE_TEXT)
    assert any("\ufffd" in smol_tokenizer.decode([i]) for i in ids), "text must split characters"
    pieces, _ = stream(smol_tokenizer, ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == MULTIBYTE_TEXT


def test_incomplete_character_is_released_by_finish(smol_tokenizer):
    ids = smol_tokenizer.encode("ok 😀")
    pieces, _ = stream(smol_tokenizer, ids[:-1])
    assert "".join(pieces[:-1]) == "ok "
    assert pieces[-1] == smol_tokenizer.decode(ids[:-1])[len("ok ") :] != ""


def test_special_tokens_follow_skip_special_tokens(smol_tokenizer):
    ids = smol_tokenizer.encode("Hi there") + [smol_tokenizer.eos_token_id] + smol_tokenizer.encode(" again")
    skipped, _ = stream(smol_tokenizer, ids)
    assert "".join(skipped) == "Hi there again"
    kept, _ = stream(smol_tokenizer, ids, skip_special_tokens=False)
    assert "".join(kept) == "Hi there<|im_end|> again"


def test_stop_token_ids_are_not_rendered(smol_tokenizer):
    stop_id = smol_tokenizer.encode(" STOP")[0]
    ids = smol_tokenizer.encode("a b") + [stop_id]
    pieces, _ = stream(smol_tokenizer, ids, stop_token_ids=[stop_id])
    assert "".join(pieces) == "a b"


def test_sentencepiece_leading_spaces_and_byte_fallback(sentencepiece_tokenizer):
    ids = [2, 3, 4, 1, 3, *byte_tokens("你😀"), 2, 6]
    eos_only = [1]  # a prompt with no rendered text: the output is the start of the text
    pieces, _ = stream(sentencepiece_tokenizer, ids, prompt=eos_only)
    expected = "Hello world! world你😀 Hellolo"
    assert "".join(pieces) == sentencepiece_tokenizer.decode(ids, skip_special_tokens=True) == expected
    assert not any("\ufffd" in piece for piece in pieces)
    pieces, _ = stream(sentencepiece_tokenizer, ids, prompt=[], skip_special_tokens=False)
    assert "".join(pieces) == sentencepiece_tokenizer.decode(ids, skip_special_tokens=False)


def test_stop_string_across_tokens_is_never_emitted(smol_tokenizer):
    ids = smol_tokenizer.encode("one two three END OF TEXT four")
    pieces, detokenizer = stream(smol_tokenizer, ids, stop=["END OF TEXT"])
    assert detokenizer.stopped
    assert "".join(pieces) == detokenizer.output_text == "one two three "
    assert not any("E" in piece for piece in pieces)


def test_stop_string_included_when_asked(smol_tokenizer):
    ids = smol_tokenizer.encode("one two three END OF TEXT four")
    pieces, detokenizer = stream(smol_tokenizer, ids, stop=["END OF TEXT"], include_stop_str_in_output=True)
    assert "".join(pieces) == "one two three END OF TEXT"
    assert detokenizer.finish() == ""


def test_text_before_stop_in_same_token_is_emitted(smol_tokenizer):
    ids = smol_tokenizer.encode("hello world")
    assert smol_tokenizer.decode(ids[-1:]) == " world"
    pieces, detokenizer = stream(smol_tokenizer, ids, stop=["rld"])
    assert detokenizer.stopped
    assert pieces[-2:] == [" wo", ""]
    assert detokenizer.output_text == "hello wo"


def test_possible_stop_prefix_is_held_then_released(smol_tokenizer):
    ids = smol_tokenizer.encode("a b c")
    detokenizer = IncrementalDetokenizer(smol_tokenizer, PROMPT, SamplingParams(stop=[" c!"]))
    pieces = [detokenizer.add(i) for i in ids]
    assert pieces[-1] == "" and detokenizer.output_text == "a b"
    assert detokenizer.finish() == " c"
    assert not detokenizer.stopped and detokenizer.output_text == "a b c"


def test_earliest_completed_stop_wins(smol_tokenizer):
    ids = smol_tokenizer.encode("xx abcd yy")
    _, detokenizer = stream(smol_tokenizer, ids, stop=["abcd", "bc"])
    assert detokenizer.output_text == "xx a"


def test_add_after_stop_is_refused(smol_tokenizer):
    ids = smol_tokenizer.encode("stop here please")
    _, detokenizer = stream(smol_tokenizer, ids, stop=["here"])
    with pytest.raises(RuntimeError):
        detokenizer.add(ids[-1])


class DecodeRecorder:
    """Wraps a tokenizer and records how many ids every decode() call received."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.window_sizes: list[int] = []

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def decode(self, token_ids, **kwargs):
        self.window_sizes.append(len(token_ids))
        return self._tokenizer.decode(token_ids, **kwargs)


def test_decoding_cost_does_not_grow_with_the_output(smol_tokenizer):
    ids = smol_tokenizer.encode((MULTIBYTE_TEXT + " and some plain words. ") * 20)
    recorder = DecodeRecorder(smol_tokenizer)
    pieces, _ = stream(recorder, ids)
    assert "".join(pieces) == smol_tokenizer.decode(ids)
    assert max(recorder.window_sizes) <= 6


def split_after(tokenizer, text: str, prompt_text: str) -> tuple[list[int], list[int]]:
    """`text` tokenized as a whole, cut where the tokens of `prompt_text` end."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    for cut in range(len(ids) + 1):
        if tokenizer.decode(ids[:cut]) == prompt_text:
            return ids[:cut], ids[cut:]
    raise AssertionError(f"{prompt_text!r} does not end on a token boundary of {text!r}")


def test_completion_keeps_its_leading_space_with_a_llama_tokenizer(trained_llama_tokenizer):
    tokenizer = trained_llama_tokenizer
    text = "The quick brown fox jumps over the lazy dog. 你好 😀!"
    prompt, output = split_after(tokenizer, text, "The quick brown fox jumps")
    assert tokenizer.convert_ids_to_tokens(output[0]).startswith("▁")
    assert tokenizer.decode(output) == "over the lazy dog. 你好 😀!"  # what decoding the output alone loses
    bos = [tokenizer.bos_token_id]
    pieces, detokenizer = stream(tokenizer, output, prompt=bos + prompt)
    assert "".join(pieces) == detokenizer.output_text == " over the lazy dog. 你好 😀!"
    assert not any("\ufffd" in piece for piece in pieces)
    # Nothing but special tokens before it: the output is the start of the text, as Llama decodes it.
    assert "".join(stream(tokenizer, output, prompt=bos)[0]) == "over the lazy dog. 你好 😀!"


def test_prompt_context_with_stop_strings_and_long_prompts(trained_llama_tokenizer):
    tokenizer = trained_llama_tokenizer
    long_prompt = "Once upon a time there was a little fox who lived in the woods. " * 3 + "Hello"
    prompt, output = split_after(tokenizer, long_prompt + " world! The weather is lovely", long_prompt)
    recorder = DecodeRecorder(tokenizer)
    pieces, detokenizer = stream(recorder, output, prompt=prompt, stop=["weather"])
    assert detokenizer.stopped and "".join(pieces) == " world! The "
    assert max(recorder.window_sizes) <= 8  # a few prompt tokens, not the whole prompt


def test_prompt_ending_mid_word_with_smollm2(smol_tokenizer):
    prompt = smol_tokenizer.encode("Once upon a ti")  # tokenized alone, as a completions prompt is
    output = smol_tokenizer.encode("me, in a land far away")
    pieces, _ = stream(smol_tokenizer, output, prompt=prompt)
    assert "".join(pieces) == "me, in a land far away"


def test_prompt_ending_mid_character_does_not_swallow_text(smol_tokenizer):
    ids = smol_tokenizer.encode("ok 😀 done")
    split = next(i for i in range(1, len(ids)) if "\ufffd" in smol_tokenizer.decode(ids[:i]))
    pieces, _ = stream(smol_tokenizer, ids[split:], prompt=ids[:split])
    text = "".join(pieces)
    assert text.endswith(" done") and text == smol_tokenizer.decode(ids[split:])
