"""Numbers over seeds: the interval and the rule that states a difference."""

import pytest

from tegaki.analysis.stats import Spread, difference_sentence, format_spread, separated, spread, t_quantile


def test_interval_is_students_t():
    s = Spread((5.0, 5.1, 5.2))
    assert s.mean == pytest.approx(5.1) and s.std == pytest.approx(0.1)
    low, high = s.interval
    assert high - s.mean == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert low == pytest.approx(2 * s.mean - high)
    assert t_quantile(100) == 1.96 and t_quantile(11) == 2.228  # between tabled rows: the wider one


def test_a_difference_is_stated_only_where_intervals_separate():
    a, b = Spread((5.00, 5.01, 5.02)), Spread((5.30, 5.31, 5.32))
    assert separated(a, b) and "lower by 0.300" in difference_sentence("a", a, "b", b)
    noisy = Spread((4.9, 5.3, 5.6))
    assert not separated(noisy, b) and "no measurable difference" in difference_sentence("n", noisy, "b", b)
    one = Spread((1.0,))
    assert one.interval is None and not separated(one, Spread((9.0,)))
    assert "one seed" in difference_sentence("x", one, "y", Spread((9.0,)))


def test_format_and_missing_values():
    assert format_spread(Spread((1.0, 3.0))) == "2.000 ± 1.414"
    assert format_spread(Spread((1.0,))) == "1.000" and format_spread(None) == "-"
    assert spread([None, 2.0]).values == (2.0,) and spread([None]) is None
