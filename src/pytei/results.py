"""Campaign results as pandas tables: load a results database, summarize it per point, export it.

Statistics follow :mod:`pytei.stats` (one policy for the report, these tables and the adaptive
``[confidence]`` loop): NaN is a run without a value (counted in ``n_nan``, left out), +-inf is a
value (one infinite RMSE makes the point's mean infinite), and the interval of the mean is
distribution-free and stays inside the metric's range (``pytei.metrics.bounds``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from . import metrics as metric_registry
from . import stats
from .campaign.store import COLUMNS, DUMMY_CONFIG_KEYS, INT_COLUMNS, REAL_COLUMNS, V1_METRICS, Store

__all__ = ["CONFIG_COLUMNS", "POINT", "export", "load", "summarize"]

#: The columns that identify a grid point (the default grouping of :func:`summarize`).
POINT = ("model", "target", "site", "mitigation", "rate")
#: A dummy model's grid point, one column each (NaN for other models), from ``model_config``.
CONFIG_COLUMNS = {f"cfg_{key}": key for key in DUMMY_CONFIG_KEYS}
_STATS = ("n", "n_nan", "n_inf", "mean", "median", "std", "min", "max", "ci_low", "ci_high")


def load(db: str | Path) -> pd.DataFrame:
    """All trials of a results database, one row each, one float64 column per stored metric.

    Columns: the trial's fields (:class:`pytei.campaign.store.TrialRow`), then one column per
    metric (``auc``, ``rmse``, ``baseline_auc``, ..., and any metric a plugin registered; NaN where
    not computed or undefined, +-inf restored), then ``cfg_*``: a dummy model's configuration.
    Counts of faults and outputs are nullable Int64 (missing for failed trials); ``model_config``
    is a dict (or None); ``bits`` and ``extra`` stay JSON text (decode with ``json.loads``).

    Raises FileNotFoundError for a missing file and StoreError (a ValueError) for a file that is
    not a pytei results database.
    """
    with Store(db, create=False, readonly=True) as store:
        rows = store.rows()
    # every table has the built-in metrics' columns (NaN where not computed), then any other stored
    names = sorted({k for r in rows for k in r["metrics"]} - set(V1_METRICS))
    columns = [c for c in COLUMNS if c != "metrics"]
    df = pd.DataFrame([{c: r[c] for c in columns} for r in rows], columns=columns)
    values = pd.DataFrame(
        [r["metrics"] for r in rows], columns=[*V1_METRICS, *names], index=df.index, dtype="float64"
    )
    df["model_config"] = df["model_config"].map(lambda t: json.loads(t) if isinstance(t, str) else None)
    configs = pd.DataFrame(
        {
            column: [c.get(key, math.nan) if c else math.nan for c in df["model_config"]]
            for column, key in CONFIG_COLUMNS.items()
        },
        index=df.index,
        dtype="float64",
    )
    out = pd.concat([df, values, configs], axis=1)
    dtypes = {**{c: "float64" for c in REAL_COLUMNS}, **{c: "Int64" for c in INT_COLUMNS}}
    return out.astype({**dtypes, "run": "int64", "seed": "int64"})


def summarize(
    df: pd.DataFrame,
    by: str | Sequence[str] = POINT,
    metrics: str | Sequence[str] = ("auc", "rmse"),
    level: float = 0.95,
) -> pd.DataFrame:
    """Per group of ``by``, statistics of each metric over the trials with status "ok".

    One row per group, with the ``by`` columns then ``<metric>_<stat>`` for each stat in
    n, n_nan, n_inf, mean, median, std, min, max, ci_low, ci_high (:func:`pytei.stats.summarize`;
    the interval is that of the mean at confidence ``level``, inside the metric's range).
    """
    by = [by] if isinstance(by, str) else list(by)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    missing = [c for c in ("status", *by, *metrics) if c not in df.columns]
    if missing:
        raise KeyError(f"summarize: no column(s) {missing} in the results")
    ok = df[df["status"] == "ok"]
    groups = ok.groupby(by, dropna=False, sort=True)
    records = []
    for key, group in groups:
        record = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
        for m in metrics:
            s = stats.summarize(
                group[m].to_numpy(dtype=np.float64), level=level, bounds=metric_registry.bounds(m)
            )
            values = {**s.as_dict(), "ci_low": s.low, "ci_high": s.high}
            record.update({f"{m}_{stat}": values[stat] for stat in _STATS})
        records.append(record)
    return pd.DataFrame(records, columns=[*by, *(f"{m}_{stat}" for m in metrics for stat in _STATS)])


def export(db: str | Path, out_path: str | Path, fmt: str = "csv") -> Path:
    """Write every trial of ``db`` (as :func:`load` gives them) to a CSV or Parquet file."""
    out = Path(out_path)
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"unknown export format {fmt!r}; use 'csv' or 'parquet'")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401  (checked here for a clear message)
        except ImportError as err:
            raise ImportError("parquet export needs pyarrow: pip install 'pytei[parquet]'") from err
    df = load(db)
    df["model_config"] = df["model_config"].map(lambda c: json.dumps(c) if c is not None else None)  # as text
    if fmt == "csv":
        df.to_csv(out, index=False)
    else:
        df.to_parquet(out, engine="pyarrow", index=False)
    return out
