"""Numbers over seeds: mean, standard deviation, a 95% interval, and whether two intervals separate.

A loss after a few hundred steps moves by a few hundredths of a nat when only the seed changes (the
initial weights and the batch order), and by about as much between two machines whose CPU kernels
round differently. One run cannot tell a real difference from that noise; several seeds can, when
their intervals do not overlap. The interval is Student's t interval of the mean, the textbook
choice for a handful of samples (with 3 seeds it is mean +- 2.48 standard deviations).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Two-sided 95% quantiles of Student's t distribution, by degrees of freedom (n - 1).
T_95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def t_quantile(dof: int) -> float:
    """The 95% t quantile for `dof` degrees of freedom (the next smaller tabled one: a wider interval)."""
    if dof < 1:
        raise ValueError("an interval needs at least two values")
    if dof > 30:
        return 1.96
    return T_95[max(d for d in T_95 if d <= dof)]


@dataclass(frozen=True)
class Spread:
    """One quantity measured once per seed."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation; 0 for a single value (which has no spread to show)."""
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95% interval of the mean; None for a single value."""
        if self.n < 2:
            return None
        half = t_quantile(self.n - 1) * self.std / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    def as_dict(self) -> dict:
        low_high = self.interval
        return {
            "mean": self.mean,
            "std": self.std,
            "n": self.n,
            "values": list(self.values),
            "ci95": list(low_high) if low_high else None,
        }


def spread(values) -> Spread | None:
    """A Spread of the values that exist (None entries are runs that produced no number)."""
    kept = tuple(float(v) for v in values if v is not None)
    return Spread(kept) if kept else None


def separated(a: Spread, b: Spread) -> bool:
    """True when the 95% intervals of a and b do not overlap: a difference the seeds support.
    Without intervals (one seed) nothing is separated."""
    ia, ib = a.interval, b.interval
    if ia is None or ib is None:
        return False
    return ia[1] < ib[0] or ib[1] < ia[0]


def difference_sentence(name_a: str, a: Spread, name_b: str, b: Spread, what: str = "val loss") -> str:
    """One line of the report: a difference only where the intervals separate."""
    delta = a.mean - b.mean
    if not separated(a, b):
        why = "one seed: no interval" if a.n < 2 or b.n < 2 else "95% intervals overlap"
        return f"{name_a} vs {name_b}: no measurable difference in {what} ({delta:+.3f}; {why})"
    word = "lower" if delta < 0 else "higher"
    return f"{name_a} vs {name_b}: {what} {word} by {abs(delta):.3f} (95% intervals separate)"


def format_spread(s: Spread | None, spec: str = ".3f") -> str:
    """ "5.839 ± 0.021" (mean ± standard deviation), or the single value, or "-"."""
    if s is None:
        return "-"
    if s.n < 2:
        return format(s.mean, spec)
    return f"{format(s.mean, spec)} ± {format(s.std, spec)}"
