"""pytei.stats: NaN/inf policy, intervals inside the metric's range, and coverage measured by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special
from scipy import stats as sps

from pytei.stats import Summary, interval, median_interval, summarize

AUC, RMSE = (0.0, 1.0), (0.0, math.inf)
LEVEL = 0.95
REPS = 2000
#: A coverage estimate from REPS samples has binomial sd sqrt(c (1 - c) / REPS); 3 sd below the level fails.
TOLERANCE = 3 * math.sqrt(LEVEL * (1 - LEVEL) / REPS)


def bimodal_auc(rng: np.random.Generator, n: int, p: float, baseline: float = 0.75) -> np.ndarray:
    """REPS samples of n runs: baseline +- 0.003, with probability p collapsed to 0.5 +- 0.02."""
    hit = rng.random((REPS, n)) < p
    typical = np.clip(rng.normal(baseline, 0.003, (REPS, n)), 0, 1)
    return np.where(hit, np.clip(rng.normal(0.5, 0.02, (REPS, n)), 0, 1), typical)


def t_interval(x: np.ndarray) -> tuple[float, float]:
    """The Student-t interval the report and results used before pytei.stats."""
    half = sps.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return x.mean() - half, x.mean() + half


def coverage(samples: np.ndarray, truth: float, method) -> float:
    hits = [lo <= truth <= hi for lo, hi in (method(s) for s in samples)]
    return float(np.mean(hits))


@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.3])
def test_interval_covers_bimodal_auc_means(n: int, p: float) -> None:
    rng = np.random.default_rng(1000 * n + int(100 * p))
    samples = bimodal_auc(rng, n, p)
    truth = (1 - p) * 0.75 + p * 0.5
    assert coverage(samples, truth, lambda s: interval(s, level=LEVEL, bounds=AUC)) >= LEVEL - TOLERANCE


def test_the_old_t_interval_fails_the_same_check() -> None:
    """The check has teeth: Student t over 3 runs with 10 % collapses covers about a quarter of the time."""
    samples = bimodal_auc(np.random.default_rng(7), 3, 0.1)
    assert coverage(samples, 0.9 * 0.75 + 0.1 * 0.5, t_interval) < 0.5


@pytest.mark.parametrize("n", [3, 10])
def test_interval_covers_rmse_means_with_huge_collapses(n: int) -> None:
    rng = np.random.default_rng(n)
    hit = rng.random((REPS, n)) < 0.1
    typical = rng.lognormal(math.log(1e-4), 0.5, (REPS, n))
    samples = np.where(hit, 10 ** rng.uniform(30, 34, (REPS, n)), typical)
    truth = 0.9 * math.exp(math.log(1e-4) + 0.125) + 0.1 * (1e34 - 1e30) / (4 * math.log(10))
    found = [interval(s, level=LEVEL, bounds=RMSE) for s in samples]
    assert all(lo >= 0 for lo, _ in found)
    assert np.mean([lo <= truth <= hi for lo, hi in found]) >= LEVEL - TOLERANCE


@pytest.mark.parametrize("n", [6, 9])
def test_median_interval_covers_the_median(n: int) -> None:
    rng = np.random.default_rng(n)
    samples = rng.lognormal(0.0, 2.0, (REPS, n))  # median exp(0) = 1
    assert coverage(samples, 1.0, lambda s: median_interval(s, bounds=RMSE)) >= LEVEL - TOLERANCE


def test_interval_is_anderson_bound_by_hand() -> None:
    eps = special.smirnovi(3, 0.025)
    assert eps == pytest.approx(1 - 0.025 ** (1 / 3))  # only the smallest run matters for 3 runs
    low, high = interval([0.8, 0.8, 0.8], bounds=AUC)
    assert low == pytest.approx(0.8 * (1 - eps))  # mass eps moved to the bound 0
    assert high == pytest.approx(0.8 + 0.2 * eps)  # mass eps moved to the bound 1
    # two distinct values: 1 - F_U is (1 - eps) below 0.6 and (1/2 - eps)^+ between 0.6 and 0.9
    eps2 = special.smirnovi(2, 0.025)
    assert interval([0.9, 0.6], bounds=AUC)[0] == pytest.approx(0.6 * (1 - eps2) + 0.3 * max(0, 0.5 - eps2))


def test_interval_stays_inside_bounds_and_narrows_with_runs() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 100):
        lo, hi = interval(np.clip(rng.normal(0.99, 0.05, n), 0, 1), bounds=AUC)
        assert 0 <= lo <= hi <= 1
    widths = [np.subtract(*interval(np.full(n, 0.7), bounds=AUC)[::-1]) for n in (3, 10, 100, 1000)]
    assert widths == sorted(widths, reverse=True) and widths[-1] < 0.05
    lo, hi = interval([1e-4, 2e-4, 3e-4], bounds=RMSE)
    assert 0 <= lo < 1e-4 and hi == math.inf  # no finite upper limit holds for every distribution on [0, inf)
    assert interval([1.0, 2.0], bounds=(-math.inf, math.inf)) == (-math.inf, math.inf)


def test_non_finite_policy() -> None:
    inf, nan = math.inf, math.nan
    s = summarize([1.0, 2.0, 3.0, inf, nan], bounds=RMSE)
    assert isinstance(s, Summary)
    assert (s.n, s.n_nan, s.n_inf) == (4, 1, 1)
    assert (s.mean, s.max, s.std, s.high) == (inf, inf, inf, inf)  # an infinite run is a value
    assert (s.min, s.median) == (1.0, 2.5)  # the NaN run has no value
    assert 0 <= s.low < 1.0
    finite = summarize([1.0, 2.0, 3.0, nan], bounds=RMSE)
    assert (finite.n, finite.mean, finite.std) == (3, 2.0, 1.0)
    empty = summarize([nan, nan], bounds=AUC)
    assert (empty.n, empty.n_nan) == (0, 2) and math.isnan(empty.mean) and math.isnan(empty.low)
    one = summarize([0.7], bounds=AUC)
    assert math.isnan(one.std) and 0 < one.low < 0.7 < one.high < 1
    # a large share of infinite runs makes even the lower end infinite: the mean is inf with confidence
    assert interval([1.0] + [inf] * 99, bounds=RMSE)[0] == inf


def test_median_interval_small_samples_reach_the_bounds() -> None:
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0], bounds=RMSE) == (0.0, math.inf)  # 5 runs: 1/32 > 2.5 %
    assert median_interval([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == (1.0, 6.0)  # 6 runs: 1/64 < 2.5 %
    assert median_interval(np.arange(20.0)) == (5.0, 14.0)  # P(Bin(20, 1/2) <= 5) = 0.021 <= 0.025


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match=r"value 1\.5 lies outside the metric's bounds \(0\.0, 1\.0\)"):
        interval([0.5, 1.5], bounds=AUC)
    with pytest.raises(ValueError, match=r"value -0\.1 lies outside"):
        summarize([-0.1], bounds=RMSE)
    with pytest.raises(ValueError, match="level must lie in"):
        interval([0.5], level=95)
    with pytest.raises(ValueError, match="low < high"):
        interval([0.5], bounds=(1.0, 0.0))
