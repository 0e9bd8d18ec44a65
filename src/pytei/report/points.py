"""Statistics of report points: ``pytei.stats`` per group of trials, ranked medians and the failure BER."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from .. import metrics
from ..stats import Bounds, Summary, summarize

__all__ = [
    "FAILURE_LOSS",
    "STAT_FIELDS",
    "drop_bounds",
    "failure_ber",
    "metric_bounds",
    "point_stats",
    "ranked_median",
]

#: Relative AUC loss that counts as failure: mean AUC < (1 - FAILURE_LOSS) x baseline AUC.
FAILURE_LOSS = 0.01
#: The ``Summary`` fields a point carries, in table order.
STAT_FIELDS = tuple(f for f in Summary.__dataclass_fields__ if f != "level")


def metric_bounds(name: str) -> Bounds:
    """The range of a stored metric (``pytei.metrics.bounds``: auc in [0, 1], rmse in [0, inf), ...)."""
    return metrics.bounds(name)


def drop_bounds(baselines: pd.Series) -> Bounds:
    """Range of an AUC drop, baseline - AUC with AUC in [0, 1]: [min baseline - 1, max baseline]."""
    b = baselines.to_numpy(dtype=float)
    return (float(np.nanmin(b)) - 1.0, float(np.nanmax(b)))


def ranked_median(values: Iterable[float]) -> float:
    """Median of runs, invalid ones ranked highest (nan > inf): nan or inf once at least half are.

    The heatmap cell rule for RMSE, where NaN means the outputs were NaN (an invalid run, not a missing
    one). Ranking invalid values above every finite one and taking the upper middle for an even count
    makes the cell nan when >= half the runs are nan, inf when >= half are inf or nan, and otherwise the
    ordinary median (whose middle values are then finite).
    """
    v = np.asarray(list(values), dtype=float)
    half = math.ceil(v.size / 2)
    if v.size == 0 or np.isnan(v).sum() >= half:
        return math.nan
    if (~np.isfinite(v)).sum() >= half:
        return math.inf
    return float(np.median(np.where(np.isfinite(v), v, np.inf)))


def point_stats(
    rows: pd.DataFrame, keys: Sequence[str], column: str, bounds: Bounds, baseline: str | None = None
) -> pd.DataFrame:
    """One row per group of ``keys``: the ``Summary`` of ``column`` (within ``bounds``) and its ranked median.

    ``baseline`` names a column whose group mean is added as ``baseline`` (NaN without one).
    """
    records = []
    for key, grp in rows.groupby(list(keys), sort=True):
        values = grp[column].to_numpy(dtype=float)
        summary = summarize(values, bounds=bounds).as_dict()
        summary.pop("level")
        records.append(
            {
                **dict(zip(keys, key, strict=True)),
                **summary,
                "ranked": ranked_median(values),
                "baseline": float(grp[baseline].mean()) if baseline else math.nan,
            }
        )
    return pd.DataFrame.from_records(records, columns=[*keys, *STAT_FIELDS, "ranked", "baseline"])


def failure_ber(
    rates: Sequence[float], means: Sequence[float], baseline: float, loss: float = FAILURE_LOSS
) -> tuple[float | None, float | None]:
    """(first grid BER with mean < (1 - loss) x baseline, that BER interpolated in log10), None if none.

    The interpolated value is None too when the smallest BER already fails (nothing to interpolate from).
    """
    threshold = (1 - loss) * baseline
    order = np.argsort(rates)
    r, m = np.asarray(rates, dtype=float)[order], np.asarray(means, dtype=float)[order]
    below = np.flatnonzero(m < threshold)
    if below.size == 0:
        return None, None
    i = int(below[0])
    if i == 0:
        return float(r[0]), None
    frac = (m[i - 1] - threshold) / (m[i - 1] - m[i])
    lo, hi = math.log10(r[i - 1]), math.log10(r[i])
    return float(r[i]), float(10 ** (lo + frac * (hi - lo)))
