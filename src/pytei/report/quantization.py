"""Report section: does quantization change robustness? (``pytei reproduce``'s quantization study).

Reads ``Context.extras``: ``quantization`` (the study's trials, with ``dtype`` and ``field`` columns)
and ``quantization_blast`` (one row per measured single flip, ``pytei.torchrec.blast.FlipEffect``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..stats import summarize
from . import figures
from .document import Doc
from .format import fmt, slug, table
from .points import metric_bounds, point_stats
from .rows import prepare
from .sections import MEAN_COLUMNS, Context, register

__all__ = ["blast_summary"]

_DTYPE_ORDER = ("fp32", "fp16", "int8", "int4", "int2")
_FIELD_ORDER = ("codes", "scale", "bias")


def _rank(values: pd.Series, order: tuple[str, ...]) -> pd.Series:
    return values.map(lambda v: order.index(v) if v in order else len(order))


def _median(values: pd.Series, high: float) -> str:
    """Median with its distribution-free 95 % interval (``pytei.stats``), as text."""
    s = summarize(values.to_numpy(dtype=float), bounds=(0.0, high))
    return f"{fmt(s.median)} [{fmt(s.median_low)}, {fmt(s.median_high)}]"


def blast_summary(flips: pd.DataFrame) -> pd.DataFrame:
    """Per dtype and field: the measured single flips' values changed, their size, readers and logits."""
    records = []
    groups = flips.groupby(["dtype", "field"], sort=False)
    for (dtype, field), g in groups:
        readers = g["readers"].to_numpy(dtype=float)
        changed = g["logits_changed"].to_numpy(dtype=float)
        share = changed[readers > 0] / readers[readers > 0]
        records.append(
            {
                "dtype": dtype,
                "field": field,
                "flips": str(len(g)),
                "dim": str(int(g["dim"].max())),
                "values changed (mean, min-max)": f"{g['values_changed'].mean():.3g} "
                f"({int(g['values_changed'].min())}-{int(g['values_changed'].max())})",
                "max |change| of a value, median [CI95]": _median(g["max_value_change"], math.inf),
                "readers (mean)": fmt(float(readers.mean())),
                "logits changed (mean)": fmt(float(changed.mean())),
                "share of readers' logits changed": fmt(float(share.mean())) if share.size else "-",
                "max |change| of a logit, median [CI95]": _median(g["max_logit_change"], math.inf),
                "_d": dtype,
                "_f": field,
            }
        )
    out = pd.DataFrame.from_records(records)
    if out.empty:
        return out
    out = out.sort_values(
        ["_d", "_f"], key=lambda c: _rank(c, _DTYPE_ORDER if c.name == "_d" else _FIELD_ORDER)
    )
    return out.drop(columns=["_d", "_f"]).reset_index(drop=True)


def _series_rank(series: str) -> int:
    """A version's place in ``_DTYPE_ORDER`` by its label's dtype suffix (``dlrm-torchrec/int8``)."""
    dtype = series.rsplit("/", 1)[-1]
    return _DTYPE_ORDER.index(dtype) if dtype in _DTYPE_ORDER else len(_DTYPE_ORDER)


_POINT_COLUMNS = {"series": "model", "field": "field", "rate": "BER", **MEAN_COLUMNS, "baseline": "baseline"}


@register(
    "quantization", "Does quantization change robustness?", before="definitions", extras=("quantization",)
)
def _quantization(doc: Doc, ctx: Context) -> None:
    trials = ctx.extras.get("quantization")
    flips = ctx.extras.get("quantization_blast")
    if trials is None or trials.empty:
        doc.note("The quantization study ran no trials.")
        return
    ok = prepare(trials)
    ok = ok.assign(
        dtype=trials.loc[ok.index, "dtype"].astype(str),
        field=trials.loc[ok.index, "field"].astype(str),
    )
    datasets = ", ".join(sorted(ok["dataset"].unique()))
    versions = ", ".join(sorted(ok["series"].unique(), key=_series_rank))
    doc.text(
        f"One trained model ({versions} on {datasets}) in each row format, "
        "BitFlip errors in its embedding tables only, BER counted over the targeted bits. 'codes' are the "
        "stored values (fp32 / fp16 floats, int8 codes, int4 codes packed two a byte); 'scale/bias' are the "
        "fp16 scale and bias of each int8 / int4 row (fp32 and fp16 rows have none). Paired design: every "
        "version uses the same seeds, and faults come from a stream per site name, so the scale/bias "
        "faults of int8 and int4 are identical (same site names, fp16 [rows, 1] tensors); codes differ in "
        "bit count per row across dtypes, so their faults do not coincide. Mean AUC over runs with the "
        "95 % interval of the mean (pytei.stats; see Definitions); the dotted line is a random guess."
    )
    base = (
        ok.groupby("dtype").agg(trials=("trial_id", "size"), baseline=("baseline_auc", "mean")).reset_index()
    )
    fp32 = base.loc[base["dtype"] == "fp32", "baseline"]
    ref = float(fp32.iloc[0]) if len(fp32) else math.nan
    base = base.assign(shift=base["baseline"] - ref).sort_values(
        "dtype", key=lambda c: _rank(c, _DTYPE_ORDER)
    )
    doc.table(
        table(base, {"dtype": "dtype", "trials": "trials", "baseline": "fault-free AUC", "shift": "vs fp32"}),
        "Fault-free AUC of each version",
    )
    palette = figures.styles(sorted(ok["series"].unique(), key=_series_rank))
    all_points = []
    for field in [f for f in ("codes", "scale/bias") if f in set(ok["field"])] + sorted(
        set(ok["field"]) - {"codes", "scale/bias"}
    ):
        mine = ok[ok["field"] == field]
        points = point_stats(mine, ["dataset", "series", "rate"], "auc", metric_bounds("auc"), "baseline_auc")
        path = doc.figure_path("fig-quantization-" + slug(field))
        title = f"AUC vs BER by row format: errors in the embedding {field}"
        figures.plot_quality_vs_ber(points, mine, path, title, palette)
        doc.image(path, f"AUC vs BER, one line per dtype, errors in the embedding {field}.")
        all_points.append(points.assign(field=field))
    points = pd.concat(all_points, ignore_index=True)
    points = points.assign(_d=points["series"].map(_series_rank))
    points = points.sort_values(["field", "_d", "rate"])
    doc.table(table(points, _POINT_COLUMNS), "AUC points: dtype x field x BER")
    if flips is None or flips.empty:
        doc.note("No blast-radius measurements.")
        return
    doc.text(
        "Blast radius of one bit flip, measured: the same test-read rows in every version, one random bit "
        "of the field flipped at a time (the same bit of the scale or bias in int8 and int4), the row read "
        "back through the model's lookup kernel and the scored test set run again, then the bytes "
        "restored. A value or logit counts as changed when its bits differ; 'readers' are the scored "
        "samples that look the row up. Medians with their distribution-free 95 % interval (pytei.stats). "
        "A scale flip leaves the row's values with code 0 (at least its minimum) unchanged unless the "
        "new scale is not finite; a bias flip moves every value; a code flip moves one."
    )
    summary = blast_summary(flips)
    doc.table(summary, "Blast radius of a single flip: dtype x field")
    n_zero = int((flips["field"] == "scale").sum())
    if n_zero:
        scale = flips[flips["field"] == "scale"]
        partial = int((np.asarray(scale["values_changed"]) < np.asarray(scale["dim"])).sum())
        doc.note(f"{partial} of {n_zero} scale flips changed fewer than all dim values of their row.")
