"""Quality metrics that stay meaningful on corrupted models.

Corrupted models emit huge logits, infinities and NaNs. Everything here works on raw logits in
float64 (a float32 sigmoid saturates large logits to exact ties, which destroys AUC), and never
crashes on invalid outputs. The policy for an invalid (NaN/Inf) output:

* ``auc`` treats it as a coin flip: every positive/negative pair that involves an invalid score
  counts 1/2, exactly as a tie does in ROC AUC. A model whose outputs are all invalid scores 0.5.
  It equals ``(pairs_valid * auc_valid + 0.5 * (pairs - pairs_valid)) / pairs``, computed exactly:
  the Mann-Whitney count ``2U = sum 2[s_p > s_n] + [s_p == s_n]`` over valid pairs is an integer,
  and each AUC is one correctly rounded division of integers (``2U / (2 pairs_valid)`` and
  ``(2U + pairs - pairs_valid) / (2 pairs)``). So :class:`RankAUC`, which updates the count when a
  trial changes k of N scores, returns the same floats bit for bit as ``auc`` on the new scores.
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
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ._registry import Registry

__all__ = [
    "Incremental",
    "Metric",
    "RankAUC",
    "Scorer",
    "auc",
    "bounds",
    "invalid_mask",
    "logloss",
    "register",
    "rmse",
    "score",
]

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


def _below(ordered: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``#(ordered < x) + #(ordered <= x)`` for each ``x`` (int64), by binary search."""
    return torch.searchsorted(ordered, x, side="left") + torch.searchsorted(ordered, x, side="right")


def _twice_u(pos: torch.Tensor, neg_sorted: torch.Tensor) -> int:
    """Twice the Mann-Whitney count ``sum_{p, n} 2[p > n] + [p == n]`` of ``pos`` against sorted
    ``neg_sorted``: ``#(n < p) + #(n <= p)`` summed over ``p``."""
    if not pos.numel() or not neg_sorted.numel():
        return 0
    return int(_below(neg_sorted, pos).sum())


def _auc_from_counts(
    twice_u: int, pos: int, neg: int, vpos: int, vneg: int, n_bad: int, n: int
) -> dict[str, float]:
    """The AUC family from exact integer counts: each value is one rounding of an integer ratio."""
    pairs, vpairs = pos * neg, vpos * vneg
    auc_valid = twice_u / (2 * vpairs) if vpairs else math.nan
    blended = (twice_u + (pairs - vpairs)) / (2 * pairs)
    return {"auc": blended, "auc_valid": auc_valid, "invalid_frac": n_bad / n}


def auc(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """ROC AUC with invalid outputs as coin flips; also AUC over valid outputs and invalid share.

    Exact: the Mann-Whitney count over valid pairs is an integer (sorted negatives, a binary search
    per positive: O(N log N)), and each value is one rounding of an integer ratio.
    """
    s = _f64(logits)
    return _auc_of(s, _check_labels(labels, s.numel()) == 1)


def _auc_of(s: torch.Tensor, is_pos: torch.Tensor) -> dict[str, float]:
    """:func:`auc` of float64 scores ``s`` with checked labels (``is_pos``: True for positives)."""
    ok = torch.isfinite(s)
    vp, vn = s[ok & is_pos], torch.sort(s[ok & ~is_pos]).values
    n, n_pos = s.numel(), int(is_pos.sum())
    return _auc_from_counts(_twice_u(vp, vn), n_pos, n - n_pos, vp.numel(), vn.numel(), n - int(ok.sum()), n)


def _check_indices(changed: torch.Tensor, n: int) -> torch.Tensor:
    """``changed`` as flat int64 indices, each distinct and in ``[0, n)``, or a ValueError."""
    if (
        not isinstance(changed, torch.Tensor)
        or changed.dtype.is_floating_point
        or changed.dtype.is_complex
        or changed.dtype == torch.bool
    ):
        what = changed.dtype if isinstance(changed, torch.Tensor) else type(changed).__name__
        raise ValueError(f"changed must be a tensor of integer indices into the outputs, got {what}")
    idx = changed.detach().reshape(-1).to(device="cpu", dtype=torch.int64)
    if idx.numel():
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= n:
            bad = low if low < 0 else high
            raise ValueError(f"changed holds index {bad}; indices must lie in [0, {n}) for {n} outputs")
        ordered = torch.sort(idx).values
        same = ordered[1:] == ordered[:-1]
        if bool(same.any()):
            dup = int(ordered[1:][same][0])
            raise ValueError(f"changed holds index {dup} more than once; each index may appear once")
    return idx


def _check_changed(
    changed: torch.Tensor, new_values: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat int64 indices (distinct, in ``[0, n)``) and their float64 new values, or a ValueError."""
    idx = _check_indices(changed, n)
    if not isinstance(new_values, torch.Tensor):
        raise ValueError(f"new_values must be a tensor, got {type(new_values).__name__}")
    new = _f64(new_values)
    if idx.numel() != new.numel():
        raise ValueError(
            f"changed has {idx.numel()} indices (shape {tuple(changed.shape)}) but new_values has "
            f"{new.numel()} values (shape {tuple(new_values.shape)}); they must match"
        )
    return idx, new


class RankAUC:
    """:func:`auc` of outputs that differ from fixed clean ones at a few indices, in O(k log N).

    Built once from the clean logits (sorts the valid positive and negative scores, counts ``2U``);
    ``update(changed, new_values)`` returns exactly (bit for bit, NaN included) what
    ``auc(new_logits, labels)`` returns, where ``new_logits`` is the clean logits with
    ``new_logits[changed] = new_values``, without building or sorting the new array. Every update is
    relative to the clean logits (the state is never modified), as each campaign trial is. When
    more than ``full_above`` of the outputs changed (default 0.1, about where the update stops
    being cheaper), it scores the new array from scratch instead; the result is the same.

    With ``D`` the signed change of the valid scores (new values +1, old values -1, per label) and
    ``W(A, B) = sum_{p in A+, n in B-} 2[p > n] + [p == n]`` bilinear:
    ``2U_new = 2U_old + W(D, clean) + W(clean, D) + W(D, D)``: D (2k values) is sorted once, the
    first two terms are binary searches of D in the clean sorted scores, the last one of D in itself
    (prefix sums of its negatives' weights). Valid counts and the invalid count change by D's weights.
    """

    def __init__(self, clean_logits: torch.Tensor, labels: torch.Tensor, *, full_above: float = 0.1) -> None:
        if not 0.0 <= full_above <= 1.0:
            raise ValueError(f"full_above is a share of the outputs in [0, 1], got {full_above!r}")
        self.full_above = full_above
        s = _f64(clean_logits)
        self._clean = s
        self._is_pos = _check_labels(labels, s.numel()) == 1
        ok = torch.isfinite(s)
        self._pos_sorted = torch.sort(s[ok & self._is_pos]).values
        self._neg_sorted = torch.sort(s[ok & ~self._is_pos]).values
        self._n = s.numel()
        self._n_pos = int(self._is_pos.sum())
        self._n_bad = self._n - int(ok.sum())
        self._twice_u = _twice_u(self._pos_sorted, self._neg_sorted)

    def update(self, changed: torch.Tensor, new_values: torch.Tensor) -> dict[str, float]:
        """``auc`` of the clean logits with ``changed`` (distinct int indices) set to ``new_values``."""
        idx, new = _check_changed(changed, new_values, self._n)
        k = idx.numel()
        if k > self.full_above * self._n:  # cheaper from scratch, and exactly the same
            full = self._clean.clone()
            full[idx] = new
            return _auc_of(full, self._is_pos)
        # The signed change D, sorted: new values weigh +1 and old values -1, on the label's side
        # (wp for positives, wn for negatives); invalid values weigh 0 (and are set to 0.0 to sort).
        vals = torch.cat([new, self._clean[idx]])
        ok = torch.isfinite(vals)
        sign = torch.ones(2 * k, dtype=torch.int64)
        sign[k:] = -1
        is_pos = self._is_pos[idx]
        is_pos = torch.cat([is_pos, is_pos])
        vals = torch.where(ok, vals, torch.zeros_like(vals))
        order = torch.argsort(vals)
        v, sign, ok, is_pos = vals[order], sign[order], ok[order], is_pos[order]
        wp, wn = sign * (ok & is_pos), sign * (ok & ~is_pos)
        cum_wn = torch.cat([wn.new_zeros(1), torch.cumsum(wn, 0)])  # weight of D's negatives below
        left, right = torch.searchsorted(v, v, side="left"), torch.searchsorted(v, v, side="right")
        wn_below = cum_wn[left] + cum_wn[right]
        # 2U_new - 2U_old = W(D, clean) + W(clean, D) + W(D, D).
        delta = (
            wp * _below(self._neg_sorted, v)
            + wn * (2 * self._pos_sorted.numel() - _below(self._pos_sorted, v))
            + wp * wn_below
        )
        d_twice_u, d_vpos, d_vneg, d_bad = torch.stack(
            [delta.sum(), wp.sum(), wn.sum(), (sign * ~ok).sum()]
        ).tolist()
        return _auc_from_counts(
            self._twice_u + d_twice_u,
            self._n_pos,
            self._n - self._n_pos,
            self._pos_sorted.numel() + d_vpos,
            self._neg_sorted.numel() + d_vneg,
            self._n_bad + d_bad,
            self._n,
        )


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


class Incremental(Protocol):
    """A metric's state for outputs that differ from fixed clean outputs at a few indices."""

    def update(self, changed: torch.Tensor, new_values: torch.Tensor) -> float | Mapping[str, float]:
        """The metric of the clean outputs with ``changed`` set to ``new_values``, exactly."""
        ...


#: ``(clean_outputs, labels, golden) -> Incremental``: builds a metric's incremental state once.
IncrementalFactory = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], Incremental]


@dataclass(frozen=True)
class Metric:
    """A quality metric a campaign can record: ``compute(outputs, labels, golden, **options)``.

    ``compute`` returns a float (stored under the metric's name) or a dict of named floats (each
    stored under its key, e.g. ``auc``, ``auc_valid``, ``invalid_frac``). ``needs_labels``: scored
    only where the model has labels (checkpoints; dummy models have none); ``needs_golden``: needs
    the clean model's outputs. ``bounds`` is the range of each stored key (confidence intervals
    and figure axes never leave it); keys it does not list are unbounded.

    ``incremental`` (optional) is a factory ``(clean_outputs, labels, golden) -> state`` whose
    ``state.update(changed, new_values)`` returns what ``compute`` returns (bit for bit) on the
    clean outputs with ``changed`` set to ``new_values``; a :class:`Scorer` uses it when a trial
    changed few outputs and the metric is asked for without options.
    """

    name: str
    compute: Callable[..., float | Mapping[str, float]]
    needs_labels: bool = False
    needs_golden: bool = False
    bounds: Mapping[str, Bounds] = field(default_factory=dict)
    incremental: IncrementalFactory | None = None

    @property
    def origin(self) -> Callable[..., Any]:
        return self.compute

    def __call__(
        self, outputs: torch.Tensor, labels: torch.Tensor | None, golden: torch.Tensor | None, **options: Any
    ) -> dict[str, float]:
        """The metric's named values (a float result is stored under the metric's name)."""
        return self.named(self.compute(outputs, labels, golden, **options))

    def named(self, value: float | Mapping[str, float]) -> dict[str, float]:
        """A result of ``compute`` (or of an incremental update) as named floats."""
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
    allowed = {"needs_labels", "needs_golden", "bounds", "incremental"}
    unknown = sorted(set(meta) - allowed)
    if unknown:
        raise TypeError(
            f"metrics.register({name!r}) got unknown arguments {unknown}; allowed: {sorted(allowed)}"
        )
    incremental = meta.get("incremental")
    if incremental is not None and not callable(incremental):
        raise TypeError(
            f"metrics.register({name!r}, incremental=...) takes a factory "
            f"(clean_outputs, labels, golden) -> state with .update(changed, new_values), got {incremental!r}"
        )
    given = meta.get("bounds", {})
    per_key = {name: _check_bounds(name, given)} if isinstance(given, tuple | list) else dict(given)
    return Metric(
        name,
        compute,
        needs_labels=bool(meta.get("needs_labels", False)),
        needs_golden=bool(meta.get("needs_golden", False)),
        bounds={k: _check_bounds(k, v) for k, v in per_key.items()},
        incremental=incremental,
    )


def _check_bounds(key: str, value: Any) -> Bounds:
    low, high = (float(v) for v in value)
    if not low < high:
        raise ValueError(f"bounds of metric {key!r} must be (low, high) with low < high, got {value!r}")
    return low, high


def _rank_auc(clean: torch.Tensor, labels: torch.Tensor | None, golden: torch.Tensor | None) -> RankAUC:
    if labels is None:
        raise ValueError("the incremental AUC needs labels")
    return RankAUC(clean, labels)


#: Metrics by name. ``@register("name", needs_golden=True, bounds=(0, inf))`` on a function
#: ``(outputs, labels, golden, **options) -> float | dict[str, float]``; ``incremental=factory``
#: optionally adds an exact update for outputs that changed at a few indices (see ``Metric``).
register: Registry[Metric] = Registry("metric", _make_metric)
register(
    "auc",
    lambda s, y, g: auc(s, y),
    needs_labels=True,
    bounds={"auc": (0.0, 1.0), "auc_valid": (0.0, 1.0), "invalid_frac": (0.0, 1.0)},
    incremental=_rank_auc,
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


MetricChoice = str | tuple[str, Mapping[str, Any]]


class Scorer:
    """Scores outputs against fixed labels and golden outputs with a fixed choice of metrics.

    ``scorer(outputs)`` returns what :func:`score` returns. Given ``clean`` (the clean outputs),
    ``scorer(outputs, changed)``, with ``changed`` the distinct indices where ``outputs`` differs
    from ``clean``, returns the same values bit for bit, but each metric with an ``incremental``
    form (and no options) is updated from the clean state in O(k log N) instead of recomputed; that
    state is built on first use, once per scorer. The caller vouches for ``changed``: outputs that
    differ elsewhere are not looked at by the incremental metrics.
    """

    def __init__(
        self,
        labels: torch.Tensor | None = None,
        golden: torch.Tensor | None = None,
        *,
        metrics: Iterable[MetricChoice] | None = None,
        clean: torch.Tensor | None = None,
    ) -> None:
        self.labels, self.golden = labels, golden
        chosen = register.names() if metrics is None else list(metrics)
        self._metrics: list[tuple[Metric, dict[str, Any]]] = []
        for item in chosen:
            name, options = (item, {}) if isinstance(item, str) else item
            metric = register.get(name)
            if metric.applies(labels is not None, golden is not None):
                self._metrics.append((metric, dict(options)))
        self._clean = None if clean is None else _f64(clean)
        self._clean_invalid = None if self._clean is None else int((~torch.isfinite(self._clean)).sum())
        self._states: dict[int, Incremental] = {}

    def __call__(self, outputs: torch.Tensor, changed: torch.Tensor | None = None) -> dict[str, float]:
        """Counts (``n``, ``n_invalid``) and the chosen metrics of ``outputs``."""
        if changed is None:
            return self._full(outputs)
        if self._clean is None or self._clean_invalid is None:
            raise ValueError("scoring with changed= needs the clean outputs: Scorer(..., clean=outputs)")
        if outputs.numel() != self._clean.numel():
            raise ValueError(f"{outputs.numel()} outputs against {self._clean.numel()} clean outputs")
        idx = _check_indices(changed, outputs.numel())
        new = _f64(outputs.detach().reshape(-1)[idx.to(outputs.device)])
        n_invalid = self._clean_invalid
        n_invalid += int((~torch.isfinite(new)).sum()) - int((~torch.isfinite(self._clean[idx])).sum())
        out: dict[str, float] = {"n": outputs.numel(), "n_invalid": n_invalid}
        full: torch.Tensor | None = None
        for i, (metric, options) in enumerate(self._metrics):
            if metric.incremental is not None and not options:
                if i not in self._states:
                    self._states[i] = metric.incremental(self._clean, self.labels, self.golden)
                out.update(metric.named(self._states[i].update(idx, new)))
            else:
                full = _f64(outputs) if full is None else full
                out.update(metric(full, self.labels, self.golden, **options))
        return out

    def _full(self, outputs: torch.Tensor) -> dict[str, float]:
        s = _f64(outputs)
        out: dict[str, float] = {"n": s.numel(), "n_invalid": int((~torch.isfinite(s)).sum())}
        for metric, options in self._metrics:
            out.update(metric(s, self.labels, self.golden, **options))
        return out


def score(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    golden: torch.Tensor | None = None,
    *,
    metrics: Iterable[MetricChoice] | None = None,
) -> dict[str, float]:
    """Counts (``n``, ``n_invalid``) and every metric that applies: by default each registered one
    whose needs are met (AUC family and log loss with labels, RMSE with golden outputs).

    ``metrics`` names the ones to compute instead, each a name or ``(name, options)``; one that does
    not apply (it needs labels or golden outputs that are not given) is skipped. The same as
    ``Scorer(labels, golden, metrics=metrics)(logits)``.
    """
    return Scorer(labels, golden, metrics=metrics)(logits)
