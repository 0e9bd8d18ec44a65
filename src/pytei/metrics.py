"""Quality metrics that stay meaningful on corrupted models.

Corrupted models emit huge logits, infinities and NaNs. Everything here works on raw logits in
float64 (a float32 sigmoid saturates large logits to exact ties, which destroys AUC), and never
crashes on invalid outputs. The policy for an invalid (NaN/Inf) output:

* ``auc`` treats it as a coin flip: every positive/negative pair that involves an invalid score
  counts 1/2, exactly as a tie does in ROC AUC. A model whose outputs are all invalid scores 0.5.
  It equals ``(pairs_valid * auc_valid + 0.5 * (pairs - pairs_valid)) / pairs``.
* ``auc_valid`` is the AUC over valid outputs only, and ``invalid_frac`` the share of invalid ones,
  so the two effects (wrong scores vs. no scores) can be told apart.
* ``logloss`` counts an invalid output as predicting 0.5 (a loss of ln 2).
* ``rmse`` against golden outputs is NaN/Inf when any output is, as in the paper's figures, and
  ``rmse_valid`` is taken over the outputs valid in both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

__all__ = ["auc", "logloss", "rmse", "invalid_mask", "score"]


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1).to(device="cpu", dtype=torch.float64)


def invalid_mask(logits: torch.Tensor) -> torch.Tensor:
    """True where an output is NaN or +-Inf."""
    return ~torch.isfinite(_f64(logits))


def _check_labels(labels: torch.Tensor, n: int) -> torch.Tensor:
    y = _f64(labels)
    if y.numel() != n:
        raise ValueError(f"{y.numel()} labels for {n} outputs")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    if bool((y == y[0]).all()):
        raise ValueError("AUC needs both positive and negative labels")
    return y


def auc(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """ROC AUC with invalid outputs as coin flips; also AUC over valid outputs and invalid share."""
    s = _f64(logits)
    y = _check_labels(labels, s.numel())
    bad = ~torch.isfinite(s)
    pos, neg = float(y.sum()), float((1 - y).sum())
    vy = y[~bad]
    vpos, vneg = float(vy.sum()), float((1 - vy).sum())
    if vpos and vneg:
        auc_valid = float(roc_auc_score(vy.numpy(), s[~bad].numpy()))
    else:
        auc_valid = math.nan
    pairs, vpairs = pos * neg, vpos * vneg
    blended = ((vpairs * auc_valid if vpairs else 0.0) + 0.5 * (pairs - vpairs)) / pairs
    return {"auc": blended, "auc_valid": auc_valid, "invalid_frac": float(bad.double().mean())}


def logloss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy of raw logits (float64, stable for huge logits); invalid -> ln 2."""
    s = _f64(logits)
    y = _f64(labels)
    if y.numel() != s.numel():
        raise ValueError(f"{y.numel()} labels for {s.numel()} outputs")
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    return float(F.binary_cross_entropy_with_logits(s, y))


def rmse(outputs: torch.Tensor, golden: torch.Tensor) -> dict[str, float]:
    """RMSE of outputs against error-free (golden) outputs, overall and over valid outputs."""
    o, g = _f64(outputs), _f64(golden)
    if o.numel() != g.numel():
        raise ValueError(f"{o.numel()} outputs against {g.numel()} golden outputs")
    with torch.no_grad():
        overall = float(torch.sqrt(torch.mean((o - g) ** 2)))
        ok = torch.isfinite(o) & torch.isfinite(g)
        valid = float(torch.sqrt(torch.mean((o[ok] - g[ok]) ** 2))) if bool(ok.any()) else math.nan
    return {"rmse": overall, "rmse_valid": valid}


def score(
    logits: torch.Tensor, labels: torch.Tensor | None = None, golden: torch.Tensor | None = None
) -> dict[str, float]:
    """All metrics that apply: AUC family and log loss with labels, RMSE with golden outputs."""
    s = _f64(logits)
    out: dict[str, float] = {"n": s.numel(), "n_invalid": int((~torch.isfinite(s)).sum())}
    if labels is not None:
        out.update(auc(s, labels))
        out["logloss"] = logloss(s, labels)
    if golden is not None:
        out.update(rmse(s, golden))
    return out
