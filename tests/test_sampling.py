"""Exactness of the position samplers: binomial counts, uniformity, tiny and huge rates."""

import math
from collections import Counter

import pytest
import torch
from scipy import stats

from pytei import sampling
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


def test_without_replacement_rejects_impossible_k():
    g = torch.Generator().manual_seed(4)
    with pytest.raises(ValueError, match="cannot choose 11 distinct positions out of 10"):
        sample_without_replacement(10, 11, g)
    with pytest.raises(ValueError, match="cannot choose -1"):
        sample_without_replacement(10, -1, g)


def test_without_replacement_same_seed_same_sample():
    a = sample_without_replacement(1000, 50, torch.Generator().manual_seed(5))
    b = sample_without_replacement(1000, 50, torch.Generator().manual_seed(5))
    c = sample_without_replacement(1000, 50, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- which path draws the sample, and is each path uniform? -------------------------------------------
# ``sample_without_replacement`` has two paths: when 4k >= n it takes the first k of a random permutation
# ("permutation"); otherwise it draws uniform integers with replacement, rejecting repeats, until k distinct
# ones are seen, drawing again if the first batch fell short ("rejection", "retry" when it drew more than
# once), and keeps a random k-subset of them. The paths are told apart by counting the calls the sampler
# makes to torch.randint, without changing what it does.

ALPHA = 1e-6  # per-test false-failure probability of every goodness-of-fit test below


class PathCounter:
    """Counts, per call of the sampler, how many times it drew with torch.randint."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.randint_calls = 0
        real = torch.randint

        def counting_randint(*args, **kwargs):
            self.randint_calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(sampling.torch, "randint", counting_randint)

    def draw(self, n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, str]:
        before = self.randint_calls
        sample = sample_without_replacement(n, k, g)
        calls = self.randint_calls - before
        return sample, ("permutation" if calls == 0 else "rejection" if calls == 1 else "retry")


def draw_many(counter: PathCounter, n: int, k: int, trials: int, seed: int) -> tuple[torch.Tensor, Counter]:
    """``trials`` samples stacked as a (trials, k) tensor, checked against the API, and the paths taken."""
    g = torch.Generator().manual_seed(seed)
    samples, paths = [], Counter()
    for _ in range(trials):
        s, path = counter.draw(n, k, g)
        samples.append(s)
        paths[path] += 1
    out = torch.stack(samples)
    assert out.dtype == torch.int64 and out.shape == (trials, k)
    assert int(out.min()) >= 0 and int(out.max()) < n
    assert bool((out[:, 1:] > out[:, :-1]).all()), "every sample must be sorted with distinct indices"
    return out, paths


def inclusion_pvalue(samples: torch.Tensor, n: int) -> float:
    """p-value of the hypothesis that the samples are uniform k-subsets, from each index's inclusion count.

    Each count is Binomial(trials, p = k/n), but the counts are not independent (they sum to trials * k):
    for uniform k-subsets the inclusion indicators of two indices have covariance -p(1-p)/(n-1), so the count
    vector c has covariance trials * p(1-p) * n/(n-1) * (I - J/n), a projection of rank n - 1 scaled. Hence
    sum_i (c_i - trials p)^2 * (n-1) / (n trials p (1-p)) is chi-square with n - 1 degrees of freedom
    (Pearson's statistic with the finite-population factor; without it the test is too lenient when p is
    large, e.g. by 27 % at n=20, k=5).
    """
    trials, k = samples.shape
    p = k / n
    counts = torch.bincount(samples.flatten(), minlength=n).double()
    stat = float(((counts - trials * p) ** 2).sum()) * (n - 1) / (n * trials * p * (1 - p))
    return float(stats.chi2.sf(stat, n - 1))


def subset_pvalue(samples: torch.Tensor, n: int) -> float:
    """Pearson p-value of the hypothesis that every one of the C(n, 2) 2-subsets is equally likely."""
    cells = math.comb(n, 2)
    counts = torch.bincount(samples[:, 0] * n + samples[:, 1], minlength=n * n).double().reshape(n, n)
    assert float(counts.tril().sum()) == 0.0  # pairs are sorted: (a, b) with a < b
    observed = counts[torch.triu_indices(n, n, offset=1).unbind()].numpy()
    assert observed.size == cells
    return float(stats.chisquare(observed).pvalue)


@pytest.mark.parametrize(
    ("n", "k", "path"),
    [
        (1000, 50, "rejection"),  # 4k = 200 < n
        (20, 4, "rejection"),  # 16 < 20: the last k below the threshold
        (20, 5, "permutation"),  # 20 >= 20: the threshold itself
        (20, 20, "permutation"),
    ],
)
def test_path_chosen_by_size(monkeypatch, n, k, path):
    counter = PathCounter(monkeypatch)
    _, paths = draw_many(counter, n, k, 50, seed=10)
    # The retry is so rare at these sizes that 50 draws never see it (one draw of k + k//8 + 16 integers).
    assert paths == Counter({path: 50})


@pytest.mark.parametrize(
    ("n", "k", "trials", "expected_paths"),
    [
        (1000, 50, 4000, {"rejection"}),  # the case: rejection, expected inclusion count 200
        (20, 5, 4000, {"permutation"}),  # the case: permutation, expected inclusion count 1000
        (4000, 999, 600, {"rejection", "retry"}),  # the first batch of 1139 draws often has < 999 distinct
    ],
)
def test_inclusion_counts_are_uniform(monkeypatch, n, k, trials, expected_paths):
    samples, paths = draw_many(PathCounter(monkeypatch), n, k, trials, seed=11)
    assert set(paths) == expected_paths, paths
    if "retry" in expected_paths:
        assert paths["retry"] >= trials // 10, paths  # the retry loop is exercised, not just reachable
    assert inclusion_pvalue(samples, n) > ALPHA


@pytest.mark.parametrize(
    ("n", "path", "trials"),
    [(9, "rejection", 3600), (6, "permutation", 1500)],  # 36 and 15 subsets, 100 expected draws of each
)
def test_every_pair_is_equally_likely(monkeypatch, n, path, trials):
    # The joint law, not only the marginals: a sampler can include each index equally often and still
    # favour some subsets (e.g. only adjacent pairs).
    samples, paths = draw_many(PathCounter(monkeypatch), n, 2, trials, seed=12)
    assert paths == Counter({path: trials})
    assert subset_pvalue(samples, n) > ALPHA


@pytest.mark.parametrize(("n", "k", "test"), [(1000, 50, "inclusion"), (20, 5, "inclusion"), (9, 2, "pairs")])
def test_uniformity_tests_detect_a_biased_sampler(monkeypatch, n, k, test):
    # The realistic bug: no random choice among the distinct draws (or the permutation), so the k smallest
    # are kept. With torch.randperm made the identity, both paths have it, and each test must fail.
    monkeypatch.setattr(sampling.torch, "randperm", lambda m, **_: torch.arange(m))
    samples, _ = draw_many(PathCounter(monkeypatch), n, k, 400, seed=13)
    pvalue = inclusion_pvalue(samples, n) if test == "inclusion" else subset_pvalue(samples, n)
    assert pvalue < ALPHA
