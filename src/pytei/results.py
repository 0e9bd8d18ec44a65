"""Campaign results as pandas tables: load a results database, summarize it per point, export it.

``summarize`` policy for non-finite metrics (an RMSE is infinite once an output overflows):

* ``n`` counts the trials with a value (NaN, i.e. undefined or not computed, is left out) and
  ``n_inf`` those whose value is infinite;
* ``mean``, ``min`` and ``max`` are over all ``n`` values, so one infinite RMSE makes the mean
  infinite: the expected error of that point *is* unbounded;
* ``std``, ``ci_low`` and ``ci_high`` describe the ``n - n_inf`` finite values: the Student t
  interval of their mean (NaN with fewer than two finite values).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .campaign.store import COLUMNS, INT_COLUMNS, METRICS, REAL_COLUMNS, Store

__all__ = ["POINT", "export", "load", "summarize"]

#: The columns that identify a grid point (the default grouping of :func:`summarize`).
POINT = ("model", "target", "site", "mitigation", "rate")

_DTYPES = {
    **{c: "float64" for c in (*REAL_COLUMNS, *METRICS)},
    **{c: "Int64" for c in INT_COLUMNS},  # nullable: the counts are missing for failed trials
    "run": "int64",
    "seed": "int64",
}


def load(db: str | Path) -> pd.DataFrame:
    """All trials of a results database, one row each, with NaN and infinities restored.

    Metrics are float64 (NaN where not computed or undefined), counts of faults and outputs
    nullable Int64 (missing for failed trials). Text columns keep pandas' default string dtype, whose
    missing values are NaN or None, not ``pd.NA``, so plain Python functions can map over them;
    ``bits`` and ``extra`` stay JSON text (decode with ``json.loads``).

    Raises FileNotFoundError for a missing file and ValueError for a file that is not a pytei
    results database.
    """
    with Store(db, create=False) as store:
        rows = store.rows()
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype(_DTYPES)


def summarize(
    df: pd.DataFrame,
    by: str | Sequence[str] = POINT,
    metrics: str | Sequence[str] = ("auc", "rmse"),
    level: float = 0.95,
) -> pd.DataFrame:
    """Per group of ``by``, statistics of each metric over the trials with status "ok".

    One row per group, with the ``by`` columns then ``<metric>_<stat>`` for each stat in
    n, n_inf, mean, std, min, max, ci_low, ci_high (see the module docstring for non-finite values);
    the interval is the two-sided Student t interval of confidence ``level``.
    """
    by = [by] if isinstance(by, str) else list(by)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    missing = [c for c in ("status", *by, *metrics) if c not in df.columns]
    if missing:
        raise KeyError(f"summarize: no column(s) {missing} in the results")
    ok = df[df["status"] == "ok"]
    parts = [_metric_stats(ok, by, m, level).add_prefix(f"{m}_") for m in metrics]
    return pd.concat(parts, axis=1).reset_index()


def _metric_stats(ok: pd.DataFrame, by: list[str], metric: str, level: float) -> pd.DataFrame:
    """n, n_inf, mean, std, min, max, ci_low, ci_high of one metric per group, indexed by the group keys."""
    values = ok[metric].astype("float64")
    work = ok[by].assign(value=values, finite=values.where(np.isfinite(values)), inf=np.isinf(values))
    grouped = work.groupby(by, dropna=False, sort=True)
    n_finite = grouped["finite"].count()
    std = grouped["finite"].std()
    t = stats.t.ppf(0.5 + level / 2, (n_finite - 1).where(n_finite > 1))
    half = t * std / np.sqrt(n_finite)
    centre = grouped["finite"].mean()
    return pd.DataFrame(
        {
            "n": grouped["value"].count(),
            "n_inf": grouped["inf"].sum(),
            "mean": grouped["value"].mean(),
            "std": std,
            "min": grouped["value"].min(),
            "max": grouped["value"].max(),
            "ci_low": centre - half,
            "ci_high": centre + half,
        }
    )


def export(db: str | Path, out_path: str | Path, fmt: str = "csv") -> Path:
    """Write every trial of ``db`` (as :func:`load` gives them) to a CSV or Parquet file."""
    out = Path(out_path)
    if fmt == "csv":
        load(db).to_csv(out, index=False)
    elif fmt == "parquet":
        try:
            import pyarrow  # noqa: F401  (checked here for a clear message)
        except ImportError as err:
            raise ImportError("parquet export needs pyarrow: pip install 'pytei[parquet]'") from err
        load(db).to_parquet(out, engine="pyarrow", index=False)
    else:
        raise ValueError(f"unknown export format {fmt!r}; use 'csv' or 'parquet'")
    return out
