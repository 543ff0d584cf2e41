"""Sampling: parameter validation and each processor's effect on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from tinyllm.errors import TinyLLMError
from tinyllm.sampling import (
    SamplingError,
    SamplingParams,
    apply_penalties,
    apply_temperature,
    make_generator,
    min_p_filter,
    process_logits,
    sample,
    token_logprobs,
    top_k_filter,
    top_p_filter,
)

# probabilities 0.5, 0.3, 0.15, 0.05 as logits
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().view(-1).tolist())


def draws(logits: torch.Tensor, params: SamplingParams, n: int = 300) -> list[int]:
    g = make_generator(0)
    return [sample(logits, params, generators=[g])[0] for _ in range(n)]


# --- validation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, "temperature must be 0 (greedy) to 100"),
        ("temperature", math.nan, "temperature"),
        ("top_k", -1, "top_k must be an integer >= 0"),
        ("top_k", 2.5, "top_k"),
        ("top_p", 0.0, "top_p must be in (0, 1]"),
        ("top_p", 1.5, "top_p must be in (0, 1]"),
        ("min_p", -0.1, "min_p must be in [0, 1]"),
        ("min_p", 1.1, "min_p must be in [0, 1]"),
        ("repetition_penalty", 0.0, "repetition_penalty must be in (0, 10]"),
        ("presence_penalty", 2.5, "presence_penalty must be in [-2, 2]"),
        ("frequency_penalty", -3.0, "frequency_penalty must be in [-2, 2]"),
        ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
        ("seed", "abc", "seed must be in [0, 2**63)"),
        ("seed", -1, "seed must be in [0, 2**63)"),
        ("seed", 10**20, "seed must be in [0, 2**63)"),  # torch's generator overflowed with a traceback
        ("stop", ("",), "stop must be non-empty strings"),
        ("stop_token_ids", (-1,), "stop_token_ids"),
        ("top_logprobs", 21, "top_logprobs must be an integer in [0, 20]"),
    ],
)
def test_bad_values_are_rejected_with_clear_messages(field: str, value: object, message: str) -> None:
    with pytest.raises(SamplingError) as info:
        SamplingParams(**{field: value})
    assert message in str(info.value)
    assert repr(value) in str(info.value) or field == "stop"
    assert isinstance(info.value, TinyLLMError)


def test_defaults_are_valid_and_lists_become_tuples() -> None:
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[1, 2])  # type: ignore[arg-type]
    assert p.stop == ("a", "b") and p.stop_token_ids == (1, 2)
    assert SamplingParams(stop="x").stop == ("x",)  # type: ignore[arg-type]
    assert hash(p) == hash(SamplingParams(stop=("a", "b"), stop_token_ids=(1, 2)))
    assert not SamplingParams().greedy and SamplingParams(temperature=0).greedy
    with pytest.raises(SamplingError):
        SamplingParams().replace(top_p=2.0)


# --- each processor's effect --------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax_and_deterministic() -> None:
    logits = torch.tensor([[0.1, 2.0, 1.9], [3.0, -1.0, 2.99]])
    greedy = SamplingParams(temperature=0)
    assert sample(logits, greedy) == [1, 0]
    assert all(sample(logits, greedy) == [1, 0] for _ in range(5))
    with pytest.raises(SamplingError, match="greedy"):
        apply_temperature(logits, 0.0)


def test_temperature_flattens_or_sharpens() -> None:
    def entropy(t: float) -> float:
        p = apply_temperature(LOGITS, t).softmax(-1)
        return float(-(p * p.log()).sum())

    assert entropy(0.5) < entropy(1.0) < entropy(2.0)
    cold = draws(LOGITS, SamplingParams(temperature=0.1, top_k=0, top_p=1.0))
    hot = draws(LOGITS, SamplingParams(temperature=5.0, top_k=0, top_p=1.0))
    assert cold.count(0) > 290 and hot.count(0) < 150


def test_a_tiny_temperature_samples_the_argmax_instead_of_overflowing() -> None:
    """1e-39 passes validation: dividing the logits by it used to overflow to inf and fail the engine's step."""
    logits = torch.tensor([[50.0, 49.0, -50.0], [-3.0, 7.0, 6.999]])
    for t in (1e-50, 1e-39, 1e-30, 1e-6, 9.9e-4):  # 1e-50 is 0 in float32: every logit became NaN or -inf
        params = SamplingParams(temperature=t, top_k=0, top_p=1.0)
        assert params.temperature == 0.0 and params.greedy  # below MIN_TEMPERATURE: greedy, as the server's
        assert draws(logits[0], params, n=20) == [0] * 20
        assert sample(logits, params) == [0, 1]
    assert SamplingParams(temperature=1e-3).temperature == 1e-3
    scaled = apply_temperature(logits, 0.5)
    torch.testing.assert_close(scaled.softmax(-1), (logits / 0.5).softmax(-1))  # the same distribution


def test_nan_logits_raise_a_clear_error_when_sampled() -> None:
    with pytest.raises(SamplingError, match="NaN or inf"):
        sample(torch.tensor([[0.0, math.nan, 1.0]]), SamplingParams(temperature=1.0, top_k=0, top_p=1.0))


def test_top_k_keeps_exactly_k() -> None:
    assert kept(top_k_filter(LOGITS, 2)) == {0, 1}
    assert kept(top_k_filter(LOGITS, 0)) == {0, 1, 2, 3}
    assert set(draws(LOGITS, SamplingParams(temperature=1.0, top_k=2, top_p=1.0))) == {0, 1}
    assert set(draws(LOGITS, SamplingParams(temperature=1.0, top_k=0, top_p=1.0), n=600)) == {0, 1, 2, 3}


def test_top_p_keeps_the_nucleus() -> None:
    assert kept(top_p_filter(LOGITS, 0.4)) == {0}  # the likeliest token always stays
    assert kept(top_p_filter(LOGITS, 0.75)) == {0, 1}
    assert kept(top_p_filter(LOGITS, 0.9)) == {0, 1, 2}
    assert kept(top_p_filter(LOGITS, 1.0)) == {0, 1, 2, 3}
    shuffled = LOGITS[[2, 0, 3, 1]]  # order must not matter
    assert kept(top_p_filter(shuffled, 0.75)) == {1, 3}
    assert set(draws(LOGITS, SamplingParams(temperature=1.0, top_k=0, top_p=0.75))) == {0, 1}


def test_min_p_drops_tokens_far_below_the_best() -> None:
    assert kept(min_p_filter(LOGITS, 0.25)) == {0, 1, 2}  # threshold 0.125
    assert kept(min_p_filter(LOGITS, 0.5)) == {0, 1}  # threshold 0.25
    assert kept(min_p_filter(LOGITS, 0.0)) == {0, 1, 2, 3}
    assert set(draws(LOGITS, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5))) == {0, 1}


def test_repetition_penalty_pushes_seen_tokens_down() -> None:
    logits = torch.tensor([2.0, -1.0, 1.0, 0.5])
    out = apply_penalties(logits, output_ids=[0], prompt_ids=[1], repetition_penalty=2.0)
    assert out.tolist() == [1.0, -2.0, 1.0, 0.5]
    assert logits.tolist() == [2.0, -1.0, 1.0, 0.5]  # pure: input untouched
    greedy = SamplingParams(temperature=0, repetition_penalty=3.0)
    assert sample(logits, greedy, output_ids=[[]]) == [0]
    assert sample(logits, greedy, output_ids=[[0]]) == [2]


def test_presence_and_frequency_penalties_use_output_counts() -> None:
    logits = torch.zeros(4)
    out = apply_penalties(logits, output_ids=[0, 0, 1], presence_penalty=1.0, frequency_penalty=0.5)
    assert out.tolist() == [-2.0, -1.5, 0.0, 0.0]
    negative = apply_penalties(logits, output_ids=[3], presence_penalty=-1.0)  # negative encourages repeats
    assert negative.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert apply_penalties(logits, output_ids=[0], prompt_ids=[1], presence_penalty=1.0).tolist()[1] == 0.0


def test_process_logits_matches_the_sampler() -> None:
    torch.manual_seed(0)
    logits = torch.randn(100)
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.8, min_p=0.1, frequency_penalty=0.5)
    allowed = kept(process_logits(logits, params, output_ids=[3, 3]))
    assert 1 <= len(allowed) <= 10
    g = make_generator(1)
    seen = {sample(logits, params, generators=[g], output_ids=[[3, 3]])[0] for _ in range(200)}
    assert seen <= allowed and len(seen) > 1


# --- seeds and batches --------------------------------------------------------------------------------------------


def test_same_seed_same_draws_and_different_seed_differs() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1000)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)

    def run(seed: int) -> list[int]:
        g = make_generator(seed)
        return [sample(logits, params, generators=[g])[0] for _ in range(20)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_rows_use_their_own_params_and_generators() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 500)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, seed=5),
    ]
    g = [None, make_generator(0), make_generator(5)]
    first = sample(logits, params, generators=g)
    assert first[0] == int(logits[0].argmax()) and first[1] == int(logits[1].argmax())
    alone = sample(logits[2:], params[2], generators=[make_generator(5)])
    assert first[2] == alone[0]
    with pytest.raises(SamplingError, match="2 SamplingParams for 3 rows"):
        sample(logits, params[:2])


def test_a_given_argmax_serves_the_plain_greedy_rows_only() -> None:
    """A compiled or C step hands over its argmax; plain greedy rows take it, penalized or sampled rows do not."""
    logits = torch.zeros(3, 10)
    logits[:, 4] = 1.0  # every row's own argmax is 4
    given = torch.tensor([7, 8, 9])  # a stand-in argmax, to see which rows used it
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, repetition_penalty=1.5),
        SamplingParams(temperature=0),
    ]
    assert sample(logits, params, argmax=given, output_ids=[[], [1], []], prompt_ids=[[], [], []]) == [7, 4, 9]
    assert sample(logits[:1], params[0], argmax=given[:1]) == [7]
    history = dict(output_ids=[[], [1], []], prompt_ids=[[], [], []])
    assert sample(logits, params, argmax=[7, 8, 9], **history) == [7, 4, 9]  # a list (the C step's) as well
    assert sample(logits, params, output_ids=[[], [1], []], prompt_ids=[[], [], []]) == [4, 4, 4]


def test_token_logprobs_reports_the_model_distribution() -> None:
    logits = torch.stack([LOGITS, LOGITS.flip(0)])
    (lp0, top0), (lp1, top1) = token_logprobs(logits, [1, 0], top_n=2)
    assert lp0 == pytest.approx(math.log(0.3), abs=1e-6) and lp1 == pytest.approx(math.log(0.05), abs=1e-6)
    assert [t for t, _ in top0] == [0, 1] and [t for t, _ in top1] == [3, 2]
    assert top0[0][1] == pytest.approx(math.log(0.5), abs=1e-6)
    assert token_logprobs(logits, [0, 0])[0][1] == []
    (_, top), _ = token_logprobs(logits, [0, 0], top_n=20)  # more alternatives than the vocabulary has
    assert [i for i, _ in top] == sorted(range(logits.shape[-1]), key=lambda i: -float(logits[0, i]))


def test_top_p_far_below_any_probability_keeps_the_likeliest_token():
    from tinyllm.sampling import top_p_filter

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    kept = top_p_filter(logits, 5e-324)
    assert torch.isfinite(kept).tolist() == [[True, False, False, False]]
