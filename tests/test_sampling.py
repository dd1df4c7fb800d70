"""Each sampler on hand-made distributions, where the right answer can be worked out by hand."""

import pytest
import torch

from tegaki.sampling import (
    SamplingSettings,
    apply_presence_penalty,
    apply_repetition_penalty,
    min_p_filter,
    sample_next,
    top_k_filter,
    top_p_filter,
)

INF = float("inf")


def logits_of(probs):
    return torch.tensor([probs]).log()  # (1, V): softmax gives back probs


def kept(logits):
    return (logits[0] > -INF).tolist()


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert kept(top_k_filter(logits, 2)) == [False, True, False, True, False]
    assert kept(top_k_filter(logits, 10)) == [True] * 5


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = logits_of([0.5, 0.25, 0.15, 0.1])
    assert kept(top_p_filter(logits, 0.45)) == [True, False, False, False]  # 0.5 alone reaches 0.45
    assert kept(top_p_filter(logits, 0.6)) == [True, True, False, False]  # 0.75 >= 0.6
    assert kept(top_p_filter(logits, 0.8)) == [True, True, True, False]  # 0.9 >= 0.8
    assert kept(top_p_filter(logits, 0.95)) == [True, True, True, True]
    assert kept(top_p_filter(logits, 0.01)) == [True, False, False, False]  # the best token always stays


def test_top_p_works_in_vocabulary_order_not_sorted_order():
    logits = logits_of([0.1, 0.6, 0.3])
    assert kept(top_p_filter(logits, 0.8)) == [False, True, True]


def test_min_p_scales_with_the_most_likely_token():
    logits = logits_of([0.6, 0.25, 0.1, 0.05])
    assert kept(min_p_filter(logits, 0.2)) == [True, True, False, False]  # threshold 0.12
    assert kept(min_p_filter(logits, 0.1)) == [True, True, True, False]  # threshold 0.06


def test_repetition_penalty_lowers_seen_tokens_whatever_their_sign():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_presence_penalty_subtracts_once_per_seen_token():
    out = apply_presence_penalty(torch.tensor([[2.0, 0.5]]), torch.tensor([[False, True]]), 1.5)
    assert out.tolist() == [[2.0, -1.0]]


def test_temperature_zero_is_argmax_even_after_penalties():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    seen = torch.tensor([[True, False, False]])
    assert sample_next(logits, SamplingSettings(temperature=0)).item() == 0
    assert sample_next(logits, SamplingSettings(temperature=0, repetition_penalty=1.5), seen=seen).item() == 1


def test_sampling_frequencies_follow_the_tempered_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, SamplingSettings(temperature=0.5), generator=g)
    tempered = probs**2 / (probs**2).sum()  # temperature 0.5 squares the probabilities
    freq = torch.bincount(draws, minlength=3).float() / 20000
    torch.testing.assert_close(freq, tempered, atol=0.015, rtol=0)


def test_filters_never_let_a_removed_token_be_drawn():
    logits = logits_of([0.4, 0.3, 0.2, 0.1]).expand(5000, 4)
    g = torch.Generator().manual_seed(1)
    draws = sample_next(logits, SamplingSettings(top_k=3, top_p=0.65), generator=g)
    assert set(draws.tolist()) == {0, 1}  # top-k drops token 3, then top-p keeps 0.4 + 0.3 of the rest


def test_a_seed_fixes_the_draws():
    logits = torch.randn(4, 100)
    a = sample_next(logits, SamplingSettings(), generator=torch.Generator().manual_seed(3))
    b = sample_next(logits, SamplingSettings(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("p", [0.3, 0.7, 0.9])
def test_top_p_kept_mass_reaches_p_and_is_minimal(p):
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    probs = logits.softmax(-1)[0]
    mask = top_p_filter(logits, p)[0] > -INF
    mass = probs[mask].sum().item()
    assert mass >= p - 1e-6
    assert mass - probs[mask].min().item() < p  # without its least likely member it would fall short


# -------------------------------------------------------------------------------------------------
# Settings: refused when made, or safe for any finite logits
# -------------------------------------------------------------------------------------------------

NAN = float("nan")
EDGES = {
    "temperature": [0, 1e-300, 0.01, 1.0, 100.0, 1e300, NAN, INF],
    "top_k": [None, 1, 10**30],
    "top_p": [None, 1e-300, 0.5, 1.0],
    "min_p": [None, 1e-300, 1.0],
    "repetition_penalty": [1e-308, 0.01, 100.0, 1e308],
    "presence_penalty": [-1e300, -100.0, 100.0, INF],
}


def test_no_combination_of_settings_reaches_the_sampler_as_inf_or_nan():
    """Every combination of edge values is either refused with a TegakiError that names a setting, or
    draws a real token from a finite distribution, even for huge, tied and one-hot logits."""
    import itertools

    from tegaki.sampling import SamplingSettingError, sampling_distribution

    logits = torch.stack([torch.randn(40) * 3, torch.linspace(-1e4, 1e4, 40), torch.zeros(40)])  # (3, V)
    seen = torch.ones(3, 40, dtype=torch.bool)  # every token seen: the penalties reach them all
    made = 0
    for values in itertools.product(*EDGES.values()):
        keywords = dict(zip(EDGES, values))
        try:
            settings = SamplingSettings(**keywords)
        except SamplingSettingError as e:
            assert e.name in EDGES and e.name in str(e)
            continue
        made += 1
        drawn = sample_next(logits, settings, seen=seen, generator=torch.Generator().manual_seed(0))
        assert drawn.shape == (3,) and bool(((drawn >= 0) & (drawn < 40)).all()), keywords
        dist = sampling_distribution(logits[0], settings)
        assert bool(dist.isfinite().all()) and float(dist.sum()) == pytest.approx(1.0, abs=1e-4), keywords
    assert made > 100  # the grid is not all refusals


@pytest.mark.parametrize(
    "keywords, name",
    [
        ({"temperature": 1e-300}, "temperature"),
        ({"repetition_penalty": 1e-308}, "repetition_penalty"),
        ({"presence_penalty": 1e300}, "presence_penalty"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": NAN}, "top_p"),
    ],
)
def test_settings_out_of_range_are_refused_with_their_name(keywords, name):
    from tegaki.sampling import SamplingSettingError

    with pytest.raises(SamplingSettingError, match=name) as caught:
        SamplingSettings(**keywords)
    assert caught.value.name == name


def test_a_tiny_top_p_keeps_the_best_token():
    """1e-300 is 0 as float32: the best token must still stay (it is always kept)."""
    logits = logits_of([0.2, 0.5, 0.3])
    assert kept(top_p_filter(logits, 1e-300)) == [False, True, False]
    assert sample_next(logits, SamplingSettings(top_p=1e-300)).item() == 1
