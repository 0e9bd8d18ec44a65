"""Statistics of a campaign point: the values of one metric over its runs.

One module for ``pytei.results``, the report and the adaptive ``[confidence]`` loop, so all three
agree on every number. Pure functions over float arrays (numpy and scipy only).

Non-finite values (one policy everywhere):

* **NaN** means the run has no value of the metric (not computed, or undefined, e.g. an AUC over no
  valid output). It is counted in ``n_nan`` and left out of every other statistic.
* **+-inf** is a value (an RMSE whose outputs overflowed): it counts in ``n`` and ``n_inf`` and enters
  every statistic, so one infinite run makes the mean, the max, the std and the interval's upper end
  infinite. The expected error of that point *is* unbounded; hiding the run would understate it.

Confidence interval of the mean (:func:`interval`): Anderson's (1969) distribution-free bound. The
values are known to lie in ``bounds`` (a metric's range, ``pytei.metrics.bounds``). With probability
at least ``1 - alpha/2`` the true distribution function lies within ``eps`` of the empirical one
(one-sided Kolmogorov-Smirnov band, ``eps`` exact for ``n``: ``scipy.special.smirnovi``); the lowest
and highest means of a distribution inside that band and inside ``bounds`` are the interval's ends.
So its coverage is at least ``level`` for *every* distribution on ``bounds``, including the bimodal
ones campaigns produce (most runs at the baseline, a few collapsed), where a Student-t interval over
3-10 runs covers far less (``benchmarks/ci_coverage.py`` measures both). The price is honesty about
few runs: with n runs all at the baseline, a share of up to ``eps`` collapsed runs cannot be ruled
out (``eps`` = 0.71 for 3 runs, 0.41 for 10, 0.13 for 100), so that share is moved to the metric's
bound. The interval never leaves ``bounds``, and its far end *is* the bound where the metric is
unbounded on that side (no finite-sample upper limit of a mean holds for every distribution on
[0, inf), e.g. for an RMSE).

Median interval (:func:`median_interval`): the distribution-free order-statistic interval (exact
binomial), with the bound as the end where fewer runs than needed exist (below 6 runs at 95 %).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray
from scipy import special, stats

__all__ = ["Bounds", "Summary", "interval", "median_interval", "summarize"]

#: (lowest, highest) value a metric can take; -inf/inf where it is unbounded on that side.
Bounds = tuple[float, float]
_UNBOUNDED: Bounds = (-math.inf, math.inf)


@dataclass(frozen=True)
class Summary:
    """Statistics of one point (see the module docstring for NaN and inf).

    ``n``: values that are not NaN; ``n_nan``: NaN values; ``n_inf``: infinite values. ``mean``,
    ``median``, ``std`` (ddof=1), ``min``, ``max`` over the ``n`` values (NaN where undefined, e.g.
    the std of one value); ``low``/``high``: the confidence interval of the mean at ``level``
    (:func:`interval`); ``median_low``/``median_high``: that of the median (:func:`median_interval`).
    """

    n: int
    n_nan: int
    n_inf: int
    mean: float
    median: float
    std: float
    min: float
    max: float
    low: float
    high: float
    median_low: float
    median_high: float
    level: float

    def as_dict(self) -> dict[str, float]:
        """The fields as a plain dict (for DataFrame records)."""
        return asdict(self)


def _values(values: Iterable[float] | NDArray[np.float64], bounds: Bounds) -> NDArray[np.float64]:
    """The non-NaN values as float64, sorted; ValueError for bad bounds or a value outside them."""
    lo, hi = float(bounds[0]), float(bounds[1])
    if math.isnan(lo) or math.isnan(hi) or not lo < hi:
        raise ValueError(f"bounds must be (low, high) with low < high, got {bounds!r}")
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    v = np.sort(v[~np.isnan(v.reshape(-1))])
    if v.size and (v[0] < lo or v[-1] > hi):
        bad = float(v[0] if v[0] < lo else v[-1])
        raise ValueError(f"value {bad!r} lies outside the metric's bounds {(lo, hi)!r}")
    return v


def _check_level(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    return float(level)


@lru_cache(maxsize=4096)
def _band(n: int, level: float) -> float:
    """Half-width eps of the one-sided KS band holding with probability (1 + level) / 2 for n values."""
    return float(special.smirnovi(n, (1 - level) / 2))


def _lower_mean(x: NDArray[np.float64], low: float, eps: float) -> float:
    """Lowest mean of a distribution >= ``low`` whose CDF lies at most ``eps`` above that of sorted ``x``.

    The mean is low + integral of (1 - F); the band's F_U = min(1, F_n + eps) is constant on each
    gap between order statistics, so the integral is a sum over the gaps from ``low`` to x_(n).
    """
    n = x.size
    weights = np.clip(1 - np.arange(n) / n - eps, 0.0, None)  # 1 - F_U on [x_(i), x_(i+1)), x_(0) = low
    if not weights.any():
        return low
    if math.isinf(low):
        return low  # mass weights[0] > 0 may sit at an infinite bound: so may the mean
    with np.errstate(invalid="ignore"):
        gaps = np.diff(np.concatenate(([low], x)))
    gaps = np.where(np.isnan(gaps), 0.0, gaps)  # inf - inf between two infinite values: no gap
    used = weights > 0
    return float(low + np.sum(gaps[used] * weights[used]))


def interval(
    values: Iterable[float] | NDArray[np.float64], *, level: float = 0.95, bounds: Bounds = _UNBOUNDED
) -> tuple[float, float]:
    """Confidence interval of the mean at ``level``, inside ``bounds`` (Anderson's bound, module docstring).

    NaN values are left out; (nan, nan) when none is left. Coverage is at least ``level`` for any
    distribution within ``bounds``; an end is the bound itself where the runs cannot rule it out.
    """
    level = _check_level(level)
    x = _values(values, bounds)
    if x.size == 0:
        return math.nan, math.nan
    eps = _band(x.size, level)
    low = _lower_mean(x, float(bounds[0]), eps)
    high = -_lower_mean(-x[::-1], -float(bounds[1]), eps)
    return low, high


def median_interval(
    values: Iterable[float] | NDArray[np.float64], *, level: float = 0.95, bounds: Bounds = _UNBOUNDED
) -> tuple[float, float]:
    """Distribution-free interval of the median: order statistics x_(k), x_(n+1-k) (exact binomial).

    k is the largest rank with P(Binomial(n, 1/2) < k) <= (1 - level) / 2; where no rank qualifies
    (fewer than 6 values at 95 %) the ends are ``bounds``. Coverage >= ``level`` for any distribution.
    """
    level = _check_level(level)
    x = _values(values, bounds)
    n = x.size
    if n == 0:
        return math.nan, math.nan
    # x_(k+1) (1-based) exceeds the median iff at most k values lie below it: P = P(B <= k), B ~ Bin(n, 1/2).
    alpha_2 = (1 - level) / 2
    k = int(stats.binom.ppf(alpha_2, n, 0.5))  # smallest k with P(B <= k) >= alpha/2
    if stats.binom.cdf(k, n, 0.5) > alpha_2:
        k -= 1  # the largest k with P(B <= k) <= alpha/2
    if k < 0:
        return float(bounds[0]), float(bounds[1])
    return float(x[k]), float(x[n - 1 - k])


def _std(x: NDArray[np.float64]) -> float:
    if x.size < 2:
        return math.nan
    if np.isinf(x).any():
        return math.inf
    return float(np.std(x, ddof=1))


def summarize(
    values: Iterable[float] | NDArray[np.float64], *, level: float = 0.95, bounds: Bounds = _UNBOUNDED
) -> Summary:
    """Every statistic of one point (``Summary``) under the module's NaN/inf policy."""
    level = _check_level(level)
    raw = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    x = _values(raw, bounds)
    n = x.size
    nan = math.nan
    with np.errstate(invalid="ignore"):
        mean = float(np.mean(x)) if n else nan
        median = float(np.median(x)) if n else nan
    low, high = interval(x, level=level, bounds=bounds)
    m_low, m_high = median_interval(x, level=level, bounds=bounds)
    return Summary(
        n=n,
        n_nan=int(np.isnan(raw).sum()),
        n_inf=int(np.isinf(x).sum()),
        mean=mean,
        median=median,
        std=_std(x),
        min=float(x[0]) if n else nan,
        max=float(x[-1]) if n else nan,
        low=low,
        high=high,
        median_low=m_low,
        median_high=m_high,
        level=level,
    )
