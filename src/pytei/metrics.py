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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from ._registry import Registry

__all__ = ["Metric", "auc", "bounds", "invalid_mask", "logloss", "register", "rmse", "score"]

Bounds = tuple[float, float]
UNBOUNDED: Bounds = (-math.inf, math.inf)


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


# --- registry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A quality metric a campaign can record: ``compute(outputs, labels, golden, **options)``.

    ``compute`` returns a float (stored under the metric's name) or a dict of named floats (each
    stored under its key, e.g. ``auc``, ``auc_valid``, ``invalid_frac``). ``needs_labels``: scored
    only where the model has labels (checkpoints; dummy models have none); ``needs_golden``: needs
    the clean model's outputs. ``bounds`` is the range of each stored key (confidence intervals
    and figure axes never leave it); keys it does not list are unbounded.
    """

    name: str
    compute: Callable[..., float | Mapping[str, float]]
    needs_labels: bool = False
    needs_golden: bool = False
    bounds: Mapping[str, Bounds] = field(default_factory=dict)

    @property
    def origin(self) -> Callable[..., Any]:
        return self.compute

    def __call__(
        self, outputs: torch.Tensor, labels: torch.Tensor | None, golden: torch.Tensor | None, **options: Any
    ) -> dict[str, float]:
        """The metric's named values (a float result is stored under the metric's name)."""
        value = self.compute(outputs, labels, golden, **options)
        if isinstance(value, Mapping):
            return {str(k): float(v) for k, v in value.items()}
        return {self.name: float(value)}

    def applies(self, has_labels: bool, has_golden: bool) -> bool:
        """Whether the metric can be computed with what a model has."""
        return (has_labels or not self.needs_labels) and (has_golden or not self.needs_golden)


def _make_metric(name: str, compute: Any, meta: dict[str, Any]) -> Metric:
    if isinstance(compute, Metric):
        return compute
    if not callable(compute):
        raise TypeError(f"metrics.register({name!r}) decorates a function, got {compute!r}")
    allowed = {"needs_labels", "needs_golden", "bounds"}
    unknown = sorted(set(meta) - allowed)
    if unknown:
        raise TypeError(
            f"metrics.register({name!r}) got unknown arguments {unknown}; allowed: {sorted(allowed)}"
        )
    given = meta.get("bounds", {})
    per_key = {name: _check_bounds(name, given)} if isinstance(given, tuple | list) else dict(given)
    return Metric(
        name,
        compute,
        needs_labels=bool(meta.get("needs_labels", False)),
        needs_golden=bool(meta.get("needs_golden", False)),
        bounds={k: _check_bounds(k, v) for k, v in per_key.items()},
    )


def _check_bounds(key: str, value: Any) -> Bounds:
    low, high = (float(v) for v in value)
    if not low < high:
        raise ValueError(f"bounds of metric {key!r} must be (low, high) with low < high, got {value!r}")
    return low, high


#: Metrics by name. ``@register("name", needs_golden=True, bounds=(0, inf))`` on a function
#: ``(outputs, labels, golden, **options) -> float | dict[str, float]``.
register: Registry[Metric] = Registry("metric", _make_metric)
register(
    "auc",
    lambda s, y, g: auc(s, y),
    needs_labels=True,
    bounds={"auc": (0.0, 1.0), "auc_valid": (0.0, 1.0), "invalid_frac": (0.0, 1.0)},
)
register("logloss", lambda s, y, g: logloss(s, y), needs_labels=True, bounds=(0.0, math.inf))
register(
    "rmse",
    lambda s, y, g: rmse(s, g),
    needs_golden=True,
    bounds={"rmse": (0.0, math.inf), "rmse_valid": (0.0, math.inf)},
)

#: Keys every score has, whatever the metrics: counts, and the share of NaN/Inf outputs.
_ALWAYS: dict[str, Bounds] = {"invalid_frac": (0.0, 1.0), "n": (0.0, math.inf), "n_invalid": (0.0, math.inf)}


def bounds(name: str) -> Bounds:
    """Range of a stored metric key (``auc``, ``rmse_valid``, ``baseline_auc``, a plugin's key).

    A ``baseline_`` key has its metric's range; a key no registered metric declares is unbounded.
    """
    key = name.removeprefix("baseline_")
    if key in _ALWAYS:
        return _ALWAYS[key]
    for n in register.names():
        metric = register.get(n)
        if key in metric.bounds:
            return metric.bounds[key]
    return UNBOUNDED


def score(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    golden: torch.Tensor | None = None,
    *,
    metrics: Iterable[str | tuple[str, Mapping[str, Any]]] | None = None,
) -> dict[str, float]:
    """Counts (``n``, ``n_invalid``) and every metric that applies: by default each registered one
    whose needs are met (AUC family and log loss with labels, RMSE with golden outputs).

    ``metrics`` names the ones to compute instead, each a name or ``(name, options)``; one that does
    not apply (it needs labels or golden outputs that are not given) is skipped.
    """
    s = _f64(logits)
    out: dict[str, float] = {"n": s.numel(), "n_invalid": int((~torch.isfinite(s)).sum())}
    chosen = register.names() if metrics is None else list(metrics)
    for item in chosen:
        name, options = (item, {}) if isinstance(item, str) else item
        metric = register.get(name)
        if metric.applies(labels is not None, golden is not None):
            out.update(metric(s, labels, golden, **options))
    return out
