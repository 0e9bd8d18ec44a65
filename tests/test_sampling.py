"""Exactness of the position samplers: binomial counts, uniformity, tiny and huge rates."""

import math

import pytest
import torch
from scipy import stats

from pytei.sampling import DENSE_P, bernoulli_positions, generator_for, sample_without_replacement


def within_sd(count: int, n: int, p: float, k: float = 5.0) -> bool:
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    return abs(count - mean) <= k * sd + 1e-9


# Includes the rates where PyTEI's float mask rounded to no flips at all (7e-3, 2e-9, 1e-10).
@pytest.mark.parametrize("p", [1e-12, 1e-10, 2e-9, 1e-7, 1e-5, 7e-3, 0.05, DENSE_P, 0.3, 0.5, 0.9])
def test_count_is_binomial(p):
    n = 50_000_000 if p >= 1e-7 else 1 << 52  # up to 4.5e15 trials: sparse cost, no memory per trial
    if p >= DENSE_P:
        n = 4_000_000
    pos = bernoulli_positions(n, p, torch.Generator().manual_seed(1))
    assert within_sd(pos.numel(), n, p), (pos.numel(), n * p)
    assert pos.dtype == torch.int64
    if pos.numel():
        assert int(pos.min()) >= 0 and int(pos.max()) < n
        assert bool((pos[1:] > pos[:-1]).all()), "positions must be sorted and distinct"


def test_mean_over_many_seeds_is_unbiased():
    n, p, reps = 10_000_000, 1e-4, 200
    total = sum(bernoulli_positions(n, p, torch.Generator().manual_seed(s)).numel() for s in range(reps))
    assert within_sd(total, n * reps, p, k=5.0)


@pytest.mark.parametrize("p", [1e-3, 0.3])
def test_positions_are_uniform(p):
    n, bins = 3_200_000, 32
    pos = bernoulli_positions(n, p, torch.Generator().manual_seed(2))
    counts = torch.bincount(pos % bins, minlength=bins).double()  # e.g. bit position within a word
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < stats.chi2.ppf(1 - 1e-6, bins - 1)
    coarse = torch.bincount(pos * 16 // n, minlength=16).double()  # spread over the tensor
    assert float(((coarse - coarse.mean()) ** 2 / coarse.mean()).sum()) < stats.chi2.ppf(1 - 1e-6, 15)


def test_edge_rates():
    g = torch.Generator().manual_seed(0)
    assert bernoulli_positions(1000, 0.0, g).numel() == 0
    assert torch.equal(bernoulli_positions(1000, 1.0, g), torch.arange(1000))
    assert bernoulli_positions(0, 0.5, g).numel() == 0


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "1e-3", None])
def test_bad_rate_is_rejected(bad):
    with pytest.raises((ValueError, TypeError), match="probability"):
        bernoulli_positions(10, bad, torch.Generator())


def test_same_seed_same_positions():
    a = bernoulli_positions(10**8, 1e-5, torch.Generator().manual_seed(7))
    b = bernoulli_positions(10**8, 1e-5, torch.Generator().manual_seed(7))
    c = bernoulli_positions(10**8, 1e-5, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generator_for_is_stable_and_keyed():
    a = torch.rand(3, generator=generator_for(0, "layer.weight"))
    b = torch.rand(3, generator=generator_for(0, "layer.weight"))
    c = torch.rand(3, generator=generator_for(0, "layer.bias"))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(("n", "k"), [(10, 0), (10, 10), (1000, 999), (10**12, 5000), (100, 30)])
def test_without_replacement_is_exact(n, k):
    s = sample_without_replacement(n, k, torch.Generator().manual_seed(3))
    assert s.numel() == k and torch.unique(s).numel() == k
    if k:
        assert int(s.min()) >= 0 and int(s.max()) < n


def test_without_replacement_is_uniform():
    n, k, reps = 20, 5, 4000
    counts = torch.zeros(n)
    g = torch.Generator().manual_seed(4)
    for _ in range(reps):
        counts[sample_without_replacement(n, k, g)] += 1
    expected = reps * k / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < stats.chi2.ppf(1 - 1e-6, n - 1)
    with pytest.raises(ValueError, match="cannot choose 11"):
        sample_without_replacement(10, 11, g)
