"""Metrics on clean and corrupted outputs, checked against scikit-learn."""

import math

import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from pytei.metrics import auc, logloss, rmse, score


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
