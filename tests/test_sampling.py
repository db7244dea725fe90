"""Choosing the next token: our pure functions against transformers' logits processors, and the draw."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen2audio.generation.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    next_tokens,
    top_k_filter,
    top_p_filter,
)

B, V = 6, 257  # a small batch over a vocabulary that is not a power of two


def random_logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(B, V, generator=torch.Generator().manual_seed(seed))


def random_history(seed: int, length: int = 40) -> torch.Tensor:
    """Token ids already in each row (B, length), with repeats, as generate() passes them."""
    return torch.randint(0, V, (B, length), generator=torch.Generator().manual_seed(seed))


def seen_mask(history: torch.Tensor) -> torch.Tensor:
    seen = torch.zeros(B, V, dtype=torch.bool)
    return seen.scatter(1, history, True)


def assert_same_filter(got: torch.Tensor, expected: torch.Tensor) -> None:
    """The same tokens kept (finite), with identical values, and the rest at -inf."""
    kept, kept_ref = torch.isfinite(got), torch.isfinite(expected)
    assert torch.equal(kept, kept_ref), f"kept sets differ in {int((kept != kept_ref).sum())} places"
    assert torch.equal(got[kept], expected[kept_ref])
    assert bool((got[~kept] == float("-inf")).all())


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_equals_transformers(penalty):
    logits, history = random_logits(0), random_history(1)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    got = apply_repetition_penalty(logits, seen_mask(history), penalty)
    assert torch.equal(got, expected)
    # Tokens never seen keep their logits; seen ones changed (positive ones shrink when penalty > 1).
    unseen = ~seen_mask(history)
    assert torch.equal(got[unseen], logits[unseen])
    assert not torch.equal(got, logits)


def test_repetition_penalty_one_is_identity():
    logits, history = random_logits(2), random_history(3)
    assert torch.equal(apply_repetition_penalty(logits, seen_mask(history), 1.0), logits)


@pytest.mark.parametrize("k", [1, 5, 50, V - 1])
def test_top_k_equals_transformers(k):
    logits = random_logits(4)
    expected = TopKLogitsWarper(top_k=k)(None, logits.clone())
    got = top_k_filter(logits, k)
    assert_same_filter(got, expected)
    assert (torch.isfinite(got).sum(-1) == k).all()


def test_top_k_keeps_ties_like_transformers():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.5, -1.0, 2.0]])
    expected = TopKLogitsWarper(top_k=2)(None, logits.clone())
    got = top_k_filter(logits, 2)
    assert_same_filter(got, expected)
    assert torch.isfinite(got).sum() == 5  # the best and all four tied for second place


def test_top_k_off():
    logits = random_logits(5)
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, V + 10), logits)


@pytest.mark.parametrize("p", [0.01, 0.3, 0.8, 0.95, 0.999])
def test_top_p_equals_transformers(p):
    logits = random_logits(6, scale=2.0)
    expected = TopPLogitsWarper(top_p=p)(None, logits.clone())
    got = top_p_filter(logits, p)
    assert_same_filter(got, expected)
    # At least one token (the best) always survives; the kept mass reaches p.
    assert bool((torch.isfinite(got).sum(-1) >= 1).all())
    assert torch.equal(got.argmax(-1), logits.argmax(-1))
    kept_mass = torch.where(torch.isfinite(got), logits.softmax(-1), 0.0).sum(-1)
    assert bool((kept_mass >= p - 1e-6).all())


@pytest.mark.parametrize("k, p, keep", [(1, 1.0, 3), (2, 1.0, 2), (5, 1.0, 3), (0, 0.01, 3), (0, 0.3, 2), (4, 0.2, 3)])
def test_tokens_kept_at_least_like_transformers_min_tokens_to_keep(k, p, keep):
    """Beam sampling keeps at least (stop tokens + 1) tokens a beam, as transformers' warpers do with
    min_tokens_to_keep: a filter that would keep fewer keeps that many."""
    logits = random_logits(11, scale=3.0)
    expected = logits.clone()
    if k:
        expected = TopKLogitsWarper(top_k=k, min_tokens_to_keep=keep)(None, expected)
    expected = TopPLogitsWarper(top_p=p, min_tokens_to_keep=keep)(None, expected)
    got = top_p_filter(top_k_filter(logits, k, keep), p, keep)
    assert_same_filter(got, expected)
    assert bool((torch.isfinite(got).sum(-1) >= keep).all())
    if k and k < keep or p == 0.01:
        assert bool((torch.isfinite(got).sum(-1) == keep).all())  # the filter alone would keep fewer


def test_top_p_off():
    logits = random_logits(7)
    assert torch.equal(top_p_filter(logits, 1.0), logits)


@pytest.mark.parametrize("temperature,k,p", [(0.7, 0, 1.0), (1.3, 20, 1.0), (0.8, 0, 0.9), (0.6, 40, 0.8)])
def test_full_pipeline_equals_transformers_order(temperature, k, p):
    """Penalty, temperature, top-k, top-p in generate()'s order give the same distribution."""
    logits, history = random_logits(8), random_history(9)
    ref = RepetitionPenaltyLogitsProcessor(1.2)(history, logits.clone())
    ref = TemperatureLogitsWarper(temperature)(history, ref)
    if k:
        ref = TopKLogitsWarper(k)(history, ref)
    ref = TopPLogitsWarper(p)(history, ref)
    ours = apply_repetition_penalty(logits, seen_mask(history), 1.2)
    ours = top_p_filter(top_k_filter(ours / temperature, k), p)
    assert_same_filter(ours, ref)


def test_greedy_is_argmax():
    logits = random_logits(10)
    params = SamplingParams(temperature=0.0, top_k=3, top_p=0.5)  # filters do not matter for greedy
    assert torch.equal(next_tokens(logits, params), logits.argmax(-1))
    # With a penalty, argmax of the penalised logits; make the penalty decide at least one row.
    seen = torch.zeros(B, V, dtype=torch.bool)
    seen[torch.arange(B), logits.argmax(-1)] = True
    penalised = apply_repetition_penalty(logits, seen, 50.0)
    got = next_tokens(logits, SamplingParams(repetition_penalty=50.0), seen)
    assert torch.equal(got, penalised.argmax(-1))
    assert not torch.equal(got, logits.argmax(-1))


def test_greedy_accepts_half_precision_logits():
    logits = random_logits(11).to(torch.bfloat16)
    assert torch.equal(next_tokens(logits, SamplingParams()), logits.float().argmax(-1))


def test_sampling_is_reproducible_with_a_seed_and_differs_across_seeds():
    logits = torch.zeros(64, V)  # flat: every draw is a fresh coin
    params = SamplingParams(temperature=1.0)

    def draw(seed):
        return next_tokens(logits, params, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


@pytest.mark.parametrize("temperature,k,p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.5, 0, 1.0), (1.0, 4, 1.0), (0.8, 0, 0.7)])
def test_draws_follow_the_filtered_softmax(temperature, k, p):
    """Over many draws, token frequencies match softmax(filtered logits / T) (chi-square, loose bound)."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    n = 40_000
    params = SamplingParams(temperature=temperature, top_k=k, top_p=p)
    draws = next_tokens(logits.expand(n, -1), params, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=logits.numel()).double()
    probs = top_p_filter(top_k_filter(logits[None] / temperature, k), p).softmax(-1)[0].double()
    assert bool((counts[probs == 0] == 0).all()), "drew a token the filters removed"
    keep = probs > 0
    expected = n * probs[keep]
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    # df <= 7: P(chi2 > 40) < 1e-5 for a correct sampler; a wrong temperature gives thousands.
    assert chi2 < 40, f"chi-square {chi2:.1f}: frequencies {counts.tolist()} vs expected {expected.tolist()}"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_stop_string_becomes_a_tuple():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=("a", "b")).stop == ("a", "b")
    for empty in ("", ("a", "")):  # would end every reply before its first word
        with pytest.raises(ValueError, match="stop strings must be non-empty"):
            SamplingParams(stop=empty)
    assert SamplingParams().greedy and not SamplingParams(temperature=0.5).greedy


@pytest.mark.parametrize("field,value,said", [
    ("temperature", float("nan"), "temperature must be a finite number, got nan"),
    ("temperature", float("inf"), "temperature must be a finite number"),
    ("repetition_penalty", float("nan"), "repetition_penalty must be a finite number"),
    ("temperature", "0.5", "temperature must be a finite number, got '0.5'"),
    ("max_new_tokens", 2.5, "max_new_tokens must be a whole number, got 2.5"),
    ("num_beams", 2.0, "num_beams must be a whole number"),
    ("seed", "1", "seed must be a whole number or None"),
    ("seed", 10**23, "seed must be between 0 and 2\\*\\*63 - 1"),
])
def test_values_of_the_wrong_kind_are_named(field, value, said):
    """A NaN passes every comparison, and a float count or a str temperature failed deep inside decoding."""
    with pytest.raises(ValueError, match=said):
        SamplingParams(**{field: value})
    SamplingParams(seed=np.int64(3), temperature=np.float32(0.5), max_new_tokens=np.int64(4))  # numpy numbers do


def test_numpy_numbers_become_pythons_and_stop_none_is_no_stop():
    """np.int64 seeds reached torch.Generator.manual_seed, which takes no numpy integer: the request failed
    after it had taken a cache slot, and 16 such calls left the model with none."""
    params = SamplingParams(seed=np.int64(3), temperature=np.float32(0.5), max_new_tokens=np.int64(4), logprobs=np.int8(2))
    assert [type(v) for v in (params.seed, params.max_new_tokens, params.logprobs, params.temperature)] == [
        int, int, int, float]
    torch.Generator().manual_seed(params.seed)
    assert SamplingParams(stop=None).stop == ()


@pytest.mark.parametrize("given,said", [
    ({"temperature": "0.7"}, "temperature must be a finite number, got '0.7'"),
    ({"num_beams": "2"}, "num_beams must be a whole number, got '2'"),
    ({"num_beams": None}, "num_beams must be a whole number, got None"),
])
def test_chat_and_transcription_settings_leave_bad_values_to_be_named(given, said):
    """The settings' merging compared a str with 0 ('>' not supported ...) before SamplingParams could say
    which value is wrong."""
    from qwen2audio.generation.params import chat_settings, transcription_decoding

    with pytest.raises(ValueError, match=said):
        SamplingParams(**chat_settings({"temperature": 0.7, "top_p": 0.9}, given))
    sampling, _ = transcription_decoding({"num_beams": 4, "fallback": True}, given)
    with pytest.raises(ValueError, match=said):
        SamplingParams(**sampling)


def test_a_transcription_with_stop_strings_decodes_with_one_beam_whatever_the_checkpoint_asks():
    """The demo model's generation_config asks for 4 beams in transcriptions: transcribe(stop=...) then
    failed ("stop strings are not supported with beam search") though the caller asked for no beams; chat
    already gave stop strings one beam."""
    from qwen2audio.generation.params import transcription_decoding

    defaults = {"num_beams": 4, "fallback": True}
    sampling, _ = transcription_decoding(defaults, {"stop": ["zz"]})
    params = SamplingParams(**sampling)
    assert params.num_beams == 1 and list(params.stop) == ["zz"]
    assert transcription_decoding(defaults, {})[0]["num_beams"] == 4
    with pytest.raises(ValueError, match="stop strings are not supported with beam search"):
        SamplingParams(**transcription_decoding(defaults, {"stop": ["zz"], "num_beams": 2})[0])
