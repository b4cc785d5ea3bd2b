from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from nitro_torch.engine.request import Request
from nitro_torch.runner.sampler import Sampler, apply_penalties
from nitro_torch.sampling import SamplingParams

CPU = torch.device("cpu")
VOCAB = 64
EOS = 5
SKEWED_PROBS = [0.3, 0.25, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01]


def make_request(
    request_id: str = "r",
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    **params,
) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt or [1, 2, 3],
        params=SamplingParams(**params),
        eos_token_ids=frozenset({EOS}),
        output_token_ids=list(output or []),
    )


def skewed_logits(rows: int) -> torch.Tensor:
    probs = torch.tensor(SKEWED_PROBS + [0.0] * (VOCAB - len(SKEWED_PROBS))) + 1e-12
    return probs.log().expand(rows, VOCAB).clone()


def token_ids(sampled) -> list[int]:
    return [s.token_id for s in sampled]


def draw_many(sampler: Sampler, rounds: int = 4, rows: int = 500, **params) -> Counter:
    logits = skewed_logits(rows)
    requests = [make_request(f"r{i}", **params) for i in range(rows)]
    return Counter(t for _ in range(rounds) for t in token_ids(sampler.sample(logits, requests)))


def test_greedy_is_argmax_for_any_dtype():
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    requests = [make_request(f"r{i}", temperature=0.0) for i in range(6)]
    sampled = Sampler(CPU).sample(logits, requests)
    assert token_ids(sampled) == logits.float().argmax(dim=-1).tolist()
    assert all(s.logprob is None for s in sampled)


def test_top_k_one_matches_greedy_in_a_mixed_batch():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    requests = [
        make_request("a", temperature=1.3, top_k=1),
        make_request("b", temperature=1.0),
        make_request("c", temperature=0.0),
        make_request("d", temperature=0.7, top_p=0.5),
    ]
    sampled = token_ids(Sampler(CPU).sample(logits, requests))
    greedy = logits.argmax(dim=-1).tolist()
    assert sampled[0] == greedy[0] and sampled[2] == greedy[2]


def run_seeded(neighbours: list[Request], position: int, steps: int = 12) -> list[int]:
    """Tokens of request 'seeded' over several steps, the row's logits depending only on the step."""
    sampler = Sampler(CPU)
    seeded = make_request("seeded", seed=1234, temperature=1.0, top_p=0.95)
    tokens = []
    for step in range(steps):
        batch = neighbours[:position] + [seeded] + neighbours[position:]
        logits = torch.randn(len(batch), VOCAB, generator=torch.Generator().manual_seed(100 + step))
        logits[position] = torch.randn(VOCAB, generator=torch.Generator().manual_seed(step))
        tokens.append(sampler.sample(logits, batch)[position].token_id)
    return tokens


def test_seeded_request_ignores_its_neighbours():
    alone = run_seeded([], 0)
    crowded = run_seeded(
        [make_request("x", temperature=0.5, top_k=3), make_request("y", seed=7), make_request("z")], 2
    )
    mixed = run_seeded([make_request("g", temperature=0.0, logprobs=2, frequency_penalty=1.0)], 1)
    assert alone == crowded == mixed
    assert len(set(alone)) > 1, "a sampled sequence should not be constant"


def test_seeds_matter_and_release_restarts_the_sequence():
    logits = torch.zeros(1, VOCAB)
    sampler = Sampler(CPU)
    first = [sampler.sample(logits, [make_request("a", seed=1)])[0].token_id for _ in range(8)]
    other = [sampler.sample(logits, [make_request("b", seed=2)])[0].token_id for _ in range(8)]
    sampler.release("a")
    again = [sampler.sample(logits, [make_request("a", seed=1)])[0].token_id for _ in range(8)]
    assert first == again
    assert first != other


def test_unfiltered_sampling_follows_the_distribution():
    counts = draw_many(Sampler(CPU), temperature=1.0)
    total = sum(counts.values())
    for token, prob in enumerate(SKEWED_PROBS[:4]):
        assert abs(counts[token] / total - prob) < 0.04


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        ({"top_k": 3}, {0, 1, 2}),
        ({"top_p": 0.7}, {0, 1, 2}),  # mass before token 3 is 0.75
        ({"min_p": 0.5}, {0, 1, 2}),  # keeps p >= 0.15
        ({"top_k": 4, "top_p": 0.5}, {0, 1}),
        ({"top_k": 3, "min_p": 0.7}, {0, 1}),
        ({"temperature": 0.5, "top_p": 0.9}, {0, 1, 2}),  # sharpened: 0.45, 0.31, 0.2, ...
    ],
)
def test_filters_never_sample_removed_tokens(params, allowed):
    counts = draw_many(Sampler(CPU), **params)
    assert set(counts) == allowed


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    apply_penalties(logits, [make_request(prompt=[0], output=[1], repetition_penalty=2.0)])
    assert logits.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    request = make_request(prompt=[0, 3], output=[1, 2, 2], frequency_penalty=0.5, presence_penalty=0.25)
    apply_penalties(logits, [request])
    assert logits.tolist() == [[2.0, -2.75, -0.25, 0.5]]


def test_penalties_only_touch_their_own_rows():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    requests = [
        make_request("plain", output=[0, 1]),
        make_request("penalised", prompt=[3], output=[0, 0], repetition_penalty=2.0, frequency_penalty=1.0),
    ]
    apply_penalties(logits, requests)
    assert logits.tolist() == [[2.0, -2.0, 1.0, 0.5], [-1.0, -2.0, 1.0, 0.25]]


def test_frequency_penalty_changes_the_greedy_choice():
    logits = torch.zeros(1, VOCAB)
    logits[0, 10], logits[0, 11] = 3.0, 2.0
    request = make_request(output=[10, 10], temperature=0.0, frequency_penalty=1.0)
    assert Sampler(CPU).sample(logits, [request])[0].token_id == 11


def test_min_tokens_masks_eos_and_stop_tokens():
    logits = torch.zeros(3, VOCAB)
    logits[:, EOS], logits[:, 9], logits[:, 20] = 5.0, 4.0, 3.0
    requests = [
        make_request("short", output=[1], temperature=0.0, min_tokens=3, stop_token_ids=[9]),
        make_request("done", output=[1, 1, 1], temperature=0.0, min_tokens=3, stop_token_ids=[9]),
        make_request("ignore", output=[1], temperature=0.0, min_tokens=3, stop_token_ids=[9], ignore_eos=True),
    ]
    assert token_ids(Sampler(CPU).sample(logits, requests)) == [20, EOS, EOS]


def test_min_tokens_applies_to_sampled_rows():
    logits = torch.full((200, VOCAB), -30.0)
    logits[:, EOS], logits[:, 9] = 10.0, 0.0
    requests = [make_request(f"r{i}", min_tokens=1) for i in range(200)]
    assert set(token_ids(Sampler(CPU).sample(logits, requests))) == {9}


def test_logprobs_describe_raw_logits():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(3))
    requests = [
        make_request("a", temperature=0.0, logprobs=5, repetition_penalty=1.5, output=[7]),
        make_request("b", seed=3, logprobs=0),
        make_request("c", temperature=0.0),
    ]
    original = logits.clone()
    expected = torch.log_softmax(logits, dim=-1)
    sampled = Sampler(CPU).sample(logits, requests)
    assert torch.equal(logits, original), "the caller's logits must not be modified"

    first = sampled[0].logprob
    assert first is not None and first.token_id == sampled[0].token_id
    assert math.isclose(first.logprob, expected[0, first.token_id].item(), abs_tol=1e-5)
    values, ids = expected[0].topk(5)
    assert [t for t, _ in first.top] == ids.tolist()
    assert [v for _, v in first.top] == pytest.approx(values.tolist(), abs=1e-5)
    assert [v for _, v in first.top] == sorted((v for _, v in first.top), reverse=True)

    second = sampled[1].logprob
    assert second is not None and second.top == []
    assert math.isclose(second.logprob, expected[1, sampled[1].token_id].item(), abs_tol=1e-5)
    assert sampled[2].logprob is None


def test_one_host_transfer_per_call(monkeypatch):
    calls = []
    original = torch.Tensor.tolist

    def counting_tolist(self):
        calls.append(self.shape)
        return original(self)

    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(4))
    requests = [
        make_request("a", temperature=0.0),
        make_request("b", seed=1, top_p=0.9, logprobs=3),
        make_request("c", top_k=5, min_p=0.1, presence_penalty=0.5, output=[4]),
        make_request("d", min_tokens=2),
    ]
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    Sampler(CPU).sample(logits, requests)
    assert len(calls) == 1


def test_logit_bias_forces_and_bans_tokens_per_row():
    sampler = Sampler(CPU)
    logits = skewed_logits(3)  # argmax is token 0
    requests = [
        make_request("force", temperature=0.0, logit_bias={7: 100.0}),
        make_request("ban", temperature=0.0, logit_bias={0: -100.0, VOCAB + 10: 5.0}),  # padding id ignored
        make_request("plain", temperature=0.0),
    ]
    assert token_ids(sampler.sample(logits, requests)) == [7, 1, 0]
    sampled = draw_many(sampler, rounds=1, rows=200, temperature=1.0, logit_bias={0: -100.0, 1: -100.0})
    assert 0 not in sampled and 1 not in sampled and sampled[2] > 0


@pytest.mark.parametrize("vocab", [49152, 4096, 50257])
def test_greedy_pick_is_max_with_its_first_index(vocab: int) -> None:
    from nitro_torch.runner.sampler import greedy_pick

    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=generator)
    logits[1, 5] = logits[1, vocab - 3] = 99.0  # a tie across blocks: the first index wins
    logits[2, 7] = logits[2, 8] = 99.0  # a tie inside a block
    logits[3] = float("-inf")
    logits[4, vocab // 2] = float("nan")
    logits[5, 11] = float("inf")
    logits[6] = logits[6].round()  # many ties everywhere
    expected_max, expected_ids = logits.max(dim=-1)
    row_max, token_ids = greedy_pick(logits)
    assert torch.equal(token_ids, expected_ids)
    assert torch.equal(torch.isfinite(row_max), torch.isfinite(expected_max))
    assert torch.equal(token_ids, logits.argmax(dim=-1))


@pytest.mark.parametrize("vocab", [49152, 4099])
def test_the_host_pick_gives_the_blocked_picks_tokens_and_flags_broken_rows(vocab: int) -> None:
    """The sampler picks few rows through numpy and many through torch's blocked max: the same tokens either way."""
    from nitro_torch.runner.sampler import INVALID_TOKEN, greedy_pick, host_greedy_ids

    logits = torch.randn(200, vocab, generator=torch.Generator().manual_seed(vocab))
    logits[1, 5] = logits[1, vocab - 3] = 99.0
    logits[2, 7] = logits[2, 8] = 99.0
    logits[3] = float("-inf")
    logits[4, vocab // 2] = float("nan")
    logits[5, 11] = float("inf")
    logits[6] = logits[6].round()
    row_max, picked = greedy_pick(logits)
    expected = [t if math.isfinite(m) else INVALID_TOKEN for t, m in zip(picked.tolist(), row_max.tolist())]
    assert expected[3:6] == [INVALID_TOKEN] * 3
    assert host_greedy_ids(logits) == expected
    greedy = [make_request(f"r{i}", temperature=0.0) for i in range(200)]
    for rows in (1, 9, 200):  # the host pick, then torch's
        assert token_ids(Sampler(CPU).sample(logits[:rows], greedy[:rows], all_plain_greedy=True)) == expected[:rows]


def test_sampling_columns_are_kept_while_the_batch_is_the_same() -> None:
    sampler = Sampler(torch.device("cpu"))
    hot = Request("hot", [1], SamplingParams(temperature=0.7, top_p=0.9, seed=3))
    cool = Request("cool", [1], SamplingParams(temperature=0.2, top_k=5, min_p=0.1, seed=4))
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    first = sampler.sample(logits, [hot, cool])
    columns = sampler._columns
    assert columns is not None and columns.request_ids == ("hot", "cool")
    assert columns.temperature[:, 0].tolist() == pytest.approx([0.7, 0.2])
    assert columns.top_k[:, 0].tolist() == [64, 5] and columns.any_top_k_or_p and columns.any_min_p
    sampler.sample(logits, [hot, cool])
    assert sampler._columns is columns  # the same requests: nothing rebuilt
    sampler.sample(logits[:1], [cool])
    assert sampler._columns is not columns and sampler._columns.request_ids == ("cool",)
    assert all(0 <= token.token_id < 64 for token in first)
