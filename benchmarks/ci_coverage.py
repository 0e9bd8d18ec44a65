"""Actual coverage of 95 % confidence intervals of a point's mean on the run distributions campaigns produce.

Campaign points are bimodal: most runs sit at the baseline, a few collapse (an AUC near 0.5, an RMSE
of 1e30 or more). For each mixture and number of runs n, draws ``--reps`` samples of n runs, builds
each method's interval and prints the share that contains the true mean (and the mean width):

* ``t``: the old Student-t interval over the finite values (pytei <= 0.1 report and results);
* ``bootstrap``: percentile bootstrap of the mean (scipy.stats.bootstrap, 999 resamples, seeded);
* ``bounded``: ``pytei.stats.interval`` (Anderson's bound inside the metric's range).

    python benchmarks/ci_coverage.py [--reps 4000] [--seed 0]

The standard error of a coverage near 0.95 from R samples is sqrt(0.95 * 0.05 / R) (0.0034 for 4000).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import stats as sps

from pytei.stats import interval

Sampler = Callable[[np.random.Generator, tuple[int, int]], NDArray[np.float64]]


@dataclass(frozen=True)
class Mixture:
    """Runs at a baseline with probability 1 - p, collapsed with probability p."""

    name: str
    p: float
    bounds: tuple[float, float]
    typical: Sampler
    collapsed: Sampler
    true_mean: float

    def draw(self, rng: np.random.Generator, reps: int, n: int) -> NDArray[np.float64]:
        hit = rng.random((reps, n)) < self.p
        return np.where(hit, self.collapsed(rng, (reps, n)), self.typical(rng, (reps, n)))


def auc_mixture(p: float, baseline: float = 0.75) -> Mixture:
    """AUC: baseline +- 0.003 (sd), collapsed runs at 0.5 +- 0.02 (random guessing)."""
    return Mixture(
        f"AUC p={p:g}",
        p,
        (0.0, 1.0),
        lambda rng, shape: np.clip(rng.normal(baseline, 0.003, shape), 0, 1),
        lambda rng, shape: np.clip(rng.normal(0.5, 0.02, shape), 0, 1),
        (1 - p) * baseline + p * 0.5,
    )


def rmse_mixture(p: float) -> Mixture:
    """RMSE: lognormal around 1e-4 at the baseline, collapsed runs at 10^U(30, 34) (overflowed weights)."""
    mu, sigma = math.log(1e-4), 0.5
    collapsed_mean = (1e34 - 1e30) / (4 * math.log(10))
    return Mixture(
        f"RMSE p={p:g}",
        p,
        (0.0, math.inf),
        lambda rng, shape: rng.lognormal(mu, sigma, shape),
        lambda rng, shape: 10 ** rng.uniform(30, 34, shape),
        (1 - p) * math.exp(mu + sigma**2 / 2) + p * collapsed_mean,
    )


def t_interval(x: NDArray[np.float64], level: float) -> tuple[float, float]:
    """The old interval: Student t over the finite values, unbounded."""
    fin = x[np.isfinite(x)]
    k = fin.size
    if k < 2:
        return math.nan, math.nan
    half = sps.t.ppf(0.5 + level / 2, k - 1) * fin.std(ddof=1) / math.sqrt(k)
    return fin.mean() - half, fin.mean() + half


def bootstrap_intervals(samples: NDArray[np.float64], level: float, seed: int) -> NDArray[np.float64]:
    """Percentile-bootstrap intervals of the mean of each row of ``samples`` (one vectorised call)."""
    res = sps.bootstrap(
        (samples,),
        np.mean,
        axis=-1,
        vectorized=True,
        confidence_level=level,
        n_resamples=999,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return np.stack([res.confidence_interval.low, res.confidence_interval.high], axis=-1)


def coverage(mixture: Mixture, n: int, reps: int, level: float, seed: int) -> dict[str, tuple[float, float]]:
    """(coverage, median width) of each method on ``reps`` samples of ``n`` runs of ``mixture``."""
    samples = mixture.draw(np.random.default_rng(seed), reps, n)
    found = {
        "t": np.array([t_interval(s, level) for s in samples]),
        "bootstrap": bootstrap_intervals(samples, level, seed),
        "bounded": np.array([interval(s, level=level, bounds=mixture.bounds) for s in samples]),
    }
    mu = mixture.true_mean
    out = {}
    for name, ci in found.items():
        with np.errstate(invalid="ignore"):
            hit = (ci[:, 0] <= mu) & (mu <= ci[:, 1])
            width = ci[:, 1] - ci[:, 0]
        out[name] = (float(hit.mean()), float(np.nanmedian(width)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=4000, help="samples per mixture and n (default 4000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level (default 0.95)")
    args = parser.parse_args()
    mixtures = [auc_mixture(p) for p in (0.0, 0.05, 0.1, 0.2, 0.4)] + [rmse_mixture(p) for p in (0.05, 0.2)]
    se = math.sqrt(args.level * (1 - args.level) / args.reps)
    print(f"coverage of {args.level:.0%} intervals of the mean ({args.reps} samples each, s.e. {se:.4f})")
    print(f"{'mixture':<14} {'n':>3} | {'t':>6} {'bootstrap':>9} {'bounded':>8} | median width of bounded")
    for k, mixture in enumerate(mixtures):
        for n in (3, 5, 10):
            res = coverage(mixture, n, args.reps, args.level, args.seed + 100 * k + n)
            print(
                f"{mixture.name:<14} {n:>3} | {res['t'][0]:>6.3f} {res['bootstrap'][0]:>9.3f} "
                f"{res['bounded'][0]:>8.3f} | {res['bounded'][1]:.3g}"
            )


if __name__ == "__main__":
    main()
