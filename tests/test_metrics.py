"""Metrics on clean and corrupted outputs, checked against scikit-learn."""

import math

import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from pytei import metrics
from pytei.metrics import RankAUC, Scorer, auc, logloss, rmse, score

INVALID = (math.nan, math.inf, -math.inf)


def data(n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.3).float()
    logits = 2.0 * y - 1.0 + 1.5 * torch.randn(n, generator=g)
    return logits, y


def test_auc_matches_sklearn_on_clean_outputs():
    logits, y = data()
    r = auc(logits, y)
    assert r["auc"] == pytest.approx(roc_auc_score(y.numpy(), logits.double().numpy()), abs=1e-12)
    assert r["auc"] == r["auc_valid"] and r["invalid_frac"] == 0.0


def test_huge_logits_are_not_ties():
    # A float32 sigmoid maps all of these to exactly 1.0 and would give AUC 0.5.
    logits = torch.tensor([1e30, 2e30, 3e30, 4e30], dtype=torch.float32)
    y = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert torch.sigmoid(logits).unique().numel() == 1
    assert auc(logits, y)["auc"] == 1.0


def test_invalid_outputs_count_as_coin_flips():
    logits, y = data()
    bad = logits.clone()
    bad[:500] = float("nan")
    bad[500:700] = float("inf")
    r = auc(bad, y)
    valid = slice(700, None)
    auc_valid = roc_auc_score(y[valid].numpy(), logits[valid].double().numpy())
    pos, neg = float(y.sum()), float((1 - y).sum())
    vpos, vneg = float(y[valid].sum()), float((1 - y[valid]).sum())
    expected = (vpos * vneg * auc_valid + 0.5 * (pos * neg - vpos * vneg)) / (pos * neg)
    assert r["auc_valid"] == pytest.approx(auc_valid, abs=1e-12)
    assert r["auc"] == pytest.approx(expected, abs=1e-12)
    assert r["invalid_frac"] == pytest.approx(700 / 2000)
    # Same as scoring invalid outputs as ties with everyone: brute force on a small case.
    s = torch.tensor([0.1, float("nan"), 0.4, 0.35, float("inf")])
    t = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0])
    pairs = [(i, j) for i in range(5) for j in range(5) if t[i] == 1 and t[j] == 0]
    brute = sum(
        0.5
        if not (math.isfinite(s[i]) and math.isfinite(s[j]))
        else float(s[i] > s[j]) + 0.5 * float(s[i] == s[j])
        for i, j in pairs
    ) / len(pairs)
    assert auc(s, t)["auc"] == pytest.approx(brute)


def test_all_invalid_scores_half():
    _, y = data(100)
    r = auc(torch.full((100,), float("nan")), y)
    assert r["auc"] == 0.5 and math.isnan(r["auc_valid"]) and r["invalid_frac"] == 1.0


def test_logloss_matches_sklearn_and_survives_corruption():
    logits, y = data()
    expected = log_loss(y.numpy(), torch.sigmoid(logits.double()).numpy())
    assert logloss(logits, y) == pytest.approx(expected, rel=1e-9)
    huge = torch.tensor([1e38, -1e38, float("nan")])
    ll = logloss(huge, torch.tensor([0.0, 0.0, 1.0]))
    assert math.isfinite(ll) and ll == pytest.approx((1e38 + 0 + math.log(2)) / 3)


def test_rmse_against_golden():
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rmse(g + 1, g)["rmse"] == pytest.approx(1.0)
    r = rmse(torch.tensor([1.0, 2.0, float("inf"), 5.0]), g)
    assert r["rmse"] == math.inf and r["rmse_valid"] == pytest.approx(math.sqrt(1 / 3))
    assert math.isnan(rmse(torch.tensor([float("nan"), 2.0, 3.0, 4.0]), g)["rmse"])


def test_score_combines_and_validates():
    logits, y = data(100)
    s = score(logits, y, golden=logits)
    assert s["n"] == 100 and s["n_invalid"] == 0 and s["rmse"] == 0.0 and 0.5 < s["auc"] <= 1.0
    with pytest.raises(ValueError, match="both positive and negative"):
        auc(logits, torch.ones(100))
    with pytest.raises(ValueError, match="99 labels for 100 outputs"):
        auc(logits, y[:99])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        auc(logits, y * 2)


def same(a, b):
    """Bit-identical results: the same keys, equal values, NaN exactly where the other has NaN."""
    assert a.keys() == b.keys(), (a, b)
    for key in a:
        x, y = a[key], b[key]
        assert (math.isnan(x) and math.isnan(y)) or x == y, (key, x, y)


def test_auc_matches_sklearn_with_many_ties():
    g = torch.Generator().manual_seed(1)
    y = (torch.rand(3000, generator=g) < 0.4).float()
    logits = (torch.randint(-3, 4, (3000,), generator=g) + y).double()  # 8 distinct values
    r = auc(logits, y)
    assert r["auc"] == r["auc_valid"] == pytest.approx(roc_auc_score(y.numpy(), logits.numpy()), abs=1e-12)
    assert auc(torch.zeros(3000), y)["auc"] == 0.5  # all tied


def test_auc_with_infinities_and_nans_mixed():
    logits, y = data(seed=2)
    s = logits.double().clone()
    g = torch.Generator().manual_seed(3)
    kinds = torch.randint(0, 4, (2000,), generator=g)
    for kind, value in zip((1, 2, 3), INVALID, strict=True):
        s[kinds == kind] = value  # a quarter valid, the rest NaN, +inf or -inf
    bad = ~torch.isfinite(s)
    r = auc(s, y)
    ok = ~bad
    auc_valid = roc_auc_score(y[ok].numpy(), s[ok].numpy())
    pos, neg = float(y.sum()), float((1 - y).sum())
    vpos, vneg = float(y[ok].sum()), float((1 - y[ok]).sum())
    assert r["auc_valid"] == pytest.approx(auc_valid, abs=1e-12)
    expected = (vpos * vneg * auc_valid + 0.5 * (pos * neg - vpos * vneg)) / (pos * neg)
    assert r["auc"] == pytest.approx(expected, abs=1e-12)
    assert r["invalid_frac"] == float(bad.double().mean())
    # Only one class valid: no valid pairs, the valid AUC is undefined and the blend a coin flip.
    s[y == 1] = math.inf
    r = auc(s, y)
    assert math.isnan(r["auc_valid"]) and r["auc"] == 0.5


def random_case(g, n, ties, invalid_share):
    """Scores (integer-valued when ``ties``) with some invalid ones, and labels of both classes."""
    y = torch.rand(n, generator=g) < 0.4
    y[torch.randperm(n, generator=g)[:2]] = torch.tensor([True, False])
    s = torch.randint(-3, 4, (n,), generator=g).double() if ties else torch.randn(n, generator=g).double()
    return set_invalid(g, s, invalid_share), y.double()


def set_invalid(g, s, share):
    """``s`` with about ``share`` of it set to NaN, +inf or -inf."""
    s = s.clone()
    hit = torch.rand(s.numel(), generator=g) < share
    s[hit] = torch.tensor(INVALID, dtype=torch.float64)[torch.randint(0, 3, (int(hit.sum()),), generator=g)]
    return s


def random_change(g, clean, k, ties):
    """``k`` distinct indices and new values: fresh scores, copies of other scores (ties), the old
    value itself, and invalid values (an invalid clean score may become valid again)."""
    n = clean.numel()
    idx = torch.randperm(n, generator=g)[:k]
    fresh = torch.randint(-3, 4, (k,), generator=g).double() if ties else torch.randn(k, generator=g).double()
    copies = clean[torch.randint(0, n, (k,), generator=g)]
    choice = torch.randint(0, 4, (k,), generator=g)
    new = torch.where(choice == 0, fresh, torch.where(choice == 1, copies, clean[idx]))
    new = torch.where(choice == 3, set_invalid(g, fresh, 1.0), new)
    return idx, new


@pytest.mark.parametrize("full_above", [1.0, 0.1])  # always incremental; the default (large k from scratch)
def test_rank_auc_update_is_bit_identical_to_auc(full_above):
    g = torch.Generator().manual_seed(4)
    for n in (2, 3, 17, 17, 17, 200, 200, 1001):
        for ties in (False, True):
            for invalid_share in (0.0, 0.1, 0.6):
                clean, y = random_case(g, n, ties, invalid_share)
                rank = RankAUC(clean, y, full_above=full_above)
                for k in sorted({0, 1, min(5, n), n // 2, n}):
                    idx, new = random_change(g, clean, k, ties)
                    full = clean.clone()
                    full[idx] = new
                    same(rank.update(idx, new), auc(full, y))
                # Every changed score made invalid, then every score changed to a valid one.
                idx = torch.arange(n)
                same(rank.update(idx, torch.full((n,), math.nan)), auc(torch.full((n,), math.nan), y))
                fresh = torch.randn(n, generator=g, dtype=torch.float64)
                same(rank.update(idx.flip(0), fresh.flip(0)), auc(fresh, y))


def test_rank_auc_update_of_float32_outputs_and_state_is_clean():
    logits, y = data(500, seed=5)  # float32 outputs, as a model gives
    rank = RankAUC(logits, y)
    idx = torch.tensor([3, 100, 7])
    new = torch.tensor([1e30, -math.inf, 0.25], dtype=torch.float32)
    changed = logits.clone()
    changed[idx] = new
    same(rank.update(idx, new), auc(changed, y))
    same(rank.update(idx[:0], new[:0]), auc(logits, y))  # updates never modify the clean state
    same(rank.update(idx.reshape(3, 1), new.reshape(3, 1)), auc(changed, y))


def test_rank_auc_rejects_bad_changes():
    logits, y = data(50)
    rank = RankAUC(logits, y)
    with pytest.raises(ValueError, match="index 4 more than once"):
        rank.update(torch.tensor([4, 1, 4]), torch.zeros(3))
    with pytest.raises(ValueError, match="3 indices .* 2 values"):
        rank.update(torch.tensor([4, 1, 2]), torch.zeros(2))
    with pytest.raises(ValueError, match=r"index 50; indices must lie in \[0, 50\)"):
        rank.update(torch.tensor([50]), torch.zeros(1))
    with pytest.raises(ValueError, match="index -1"):
        rank.update(torch.tensor([-1]), torch.zeros(1))
    with pytest.raises(ValueError, match="integer indices .* torch.float32"):
        rank.update(torch.tensor([1.0]), torch.zeros(1))
    with pytest.raises(ValueError, match="integer indices .* torch.bool"):
        rank.update(torch.zeros(50, dtype=torch.bool), torch.zeros(50))
    with pytest.raises(ValueError, match="full_above"):
        RankAUC(logits, y, full_above=2.0)
    with pytest.raises(ValueError, match="49 labels for 50 outputs"):
        RankAUC(logits, y[:49])


def test_auc_is_registered_with_its_incremental_form():
    logits, y = data(100)
    state = metrics.register.get("auc").incremental(logits, y, None)
    same(
        state.update(torch.tensor([0]), torch.tensor([9.0])),
        auc(torch.cat([torch.tensor([9.0]), logits[1:]]), y),
    )
    with pytest.raises(TypeError, match="incremental=.* takes a factory"):
        metrics.register("not_incremental", lambda s, y, g: 0.0, incremental=3)


def test_scorer_equals_score_bit_for_bit():
    g = torch.Generator().manual_seed(6)
    clean, y = random_case(g, 400, ties=True, invalid_share=0.05)
    golden = clean.float()
    for chosen in (None, ["auc", "rmse"], [("auc", {}), "logloss"]):
        scorer = Scorer(y, golden, metrics=chosen, clean=clean)
        for k in (0, 1, 5, 200, 400):
            idx, new = random_change(g, clean, k, ties=True)
            outputs = clean.clone()
            outputs[idx] = new
            expected = score(outputs, y, golden, metrics=chosen)
            same(scorer(outputs, idx), expected)
            same(scorer(outputs), expected)
            assert [type(v) for v in scorer(outputs, idx).values()] == [type(v) for v in expected.values()]
    same(Scorer(None, golden, clean=clean)(clean + 1, torch.arange(400)), score(clean + 1, golden=golden))
    with pytest.raises(ValueError, match="needs the clean outputs"):
        Scorer(y)(clean, torch.tensor([0]))
    with pytest.raises(ValueError, match="399 outputs against 400 clean outputs"):
        Scorer(y, clean=clean)(clean[1:], torch.tensor([0]))
    with pytest.raises(ValueError, match="index 2 more than once"):
        Scorer(y, clean=clean)(clean, torch.tensor([2, 2]))


def test_scorer_uses_a_metrics_incremental_state_built_once():
    built, updates = [], []

    class Total:
        def __init__(self, clean):
            self.clean = clean.double()
            built.append(self)

        def update(self, changed, new_values):
            updates.append(changed.numel())
            return float(self.clean.sum() + (new_values.double() - self.clean[changed]).sum())

    def total(s, y, g):
        return float(s.double().sum())

    metrics.register("test_total", total, incremental=lambda s, y, g: Total(s))
    try:
        clean = torch.arange(10.0)
        scorer = Scorer(metrics=["test_total", ("test_total", {})], clean=clean)
        outputs = clean.clone()
        outputs[[2, 5]] = 100.0
        same(scorer(outputs, torch.tensor([2, 5])), score(outputs, metrics=["test_total"]))
        scorer(outputs, torch.tensor([2, 5]))
        assert len(built) == 2 and updates == [2, 2, 2, 2]  # one state per chosen entry, built lazily once
        assert Scorer(metrics=[("test_total", {"unused": 1})], clean=clean).__dict__["_states"] == {}
    finally:
        metrics.register.remove("test_total")
