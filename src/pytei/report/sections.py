"""The report's sections, in a registry: each renders its figures and tables into the document.

``register(name, title)`` adds a section (a function of the document and the ``Context``); sections
are numbered and written in registration order, so a plugin can append its own. A section that reads
study tables besides the trials names them (``extras=``) and is left out of a report without them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..targets import COMPONENTS
from . import figures
from .document import Doc
from .figures import MITIGATION_ORDER, Style
from .format import TARGET_ORDER, fmt, fmt_rate, ordered, slug, table, target_name
from .points import FAILURE_LOSS, drop_bounds, failure_ber, metric_bounds, point_stats

__all__ = ["ACTIVITY_COUNTERS", "Context", "Section", "mitigation_activity", "names", "register", "sections"]

TOP_PARAMETERS = 15
#: More lines than this in one panel are left to the tables.
MAX_LINES = 10

#: Columns of a point whose headline is the mean (AUC, log loss, invalid share).
MEAN_COLUMNS = {
    "n": "n",
    "n_inf": "#inf",
    "n_nan": "#nan",
    "mean": "mean",
    "std": "std",
    "min": "min",
    "max": "max",
    "low": "CI95 lo",
    "high": "CI95 hi",
}
#: Columns of a point whose headline is the ranked median (RMSE of dummy models).
MEDIAN_COLUMNS = {
    "ranked": "median",
    "median_low": "median CI95 lo",
    "median_high": "median CI95 hi",
    "n": "n",
    "n_inf": "#inf",
    "n_nan": "#nan",
    "mean": "mean",
    "min": "min",
    "max": "max",
}


@dataclass(frozen=True)
class Context:
    """What every section reads: all trials, the prepared ok rows and one style per labelled model."""

    trials: pd.DataFrame
    ok: pd.DataFrame
    palette: dict[str, Style]
    extras: Mapping[str, pd.DataFrame] = field(default_factory=dict)
    """Tables of studies that are not campaign trials (e.g. the quantization study's blast radius)."""

    def components(self, labelled: bool | None = None) -> pd.DataFrame:
        """Component trials (not per-bit, not per-parameter); only labelled / unlabelled models if given."""
        rows = self.ok[self.ok["component"]]
        return rows if labelled is None else rows[rows["labelled"] == labelled]


@dataclass(frozen=True)
class Section:
    """A numbered report section: its heading and the function that fills it."""

    name: str
    title: str
    render: Callable[[Doc, Context], None]
    extras: tuple[str, ...] = ()
    """``Context.extras`` keys the section needs; a report without them leaves it out."""

    def applies(self, ctx: Context) -> bool:
        """Whether ``ctx`` has the study tables this section reads."""
        return all(key in ctx.extras for key in self.extras)


_SECTIONS: dict[str, Section] = {}


def register(
    name: str, title: str, *, before: str | None = None, extras: tuple[str, ...] = ()
) -> Callable[[Callable[[Doc, Context], None]], Callable[[Doc, Context], None]]:
    """Decorator: add ``render`` as section ``name`` headed ``title`` after the sections registered so far
    (or just before the registered section ``before``); with ``extras``, only in reports that have those
    study tables."""

    def add(render: Callable[[Doc, Context], None]) -> Callable[[Doc, Context], None]:
        if name in _SECTIONS:
            raise ValueError(f"report section {name!r} is already registered; registered: {names()}")
        if before is not None and before not in _SECTIONS:
            raise ValueError(f"no report section {before!r} to put {name!r} before; registered: {names()}")
        _SECTIONS[name] = Section(name, title, render, tuple(extras))
        if before is not None:
            order = list(_SECTIONS)
            order.remove(name)
            order.insert(order.index(before), name)
            for key in order:  # re-insert in the new order
                _SECTIONS[key] = _SECTIONS.pop(key)
        return render

    return add


def names() -> list[str]:
    """Names of the registered sections, in report order."""
    return list(_SECTIONS)


def sections() -> Iterator[Section]:
    """The registered sections, in report order."""
    return iter(list(_SECTIONS.values()))


def _mitigation_rank(mitigation: str) -> int:
    return MITIGATION_ORDER.index(mitigation) if mitigation in MITIGATION_ORDER else len(MITIGATION_ORDER)


def _suffix(mitigation: str) -> str:
    return "" if mitigation == "none" else mitigation


# --------------------------------------------------------------------------- 1. heatmaps


_GROUP_COLUMNS = ("cfg_mlp_depth", "cfg_dense_dim", "cfg_sparse_dim", "cfg_sparsity", "cfg_samples")


def _group_label(row: pd.Series) -> str:
    """The dummy configuration one heatmap figure shares (all but hidden size and embedding dim)."""
    parts = [f"{c.removeprefix('cfg_')}={row[c]:g}" for c in _GROUP_COLUMNS if pd.notna(row[c])]
    return ", ".join(sorted(parts))


@register("heatmaps", "RMSE heatmaps of dummy models (Figs 4-6)")
def _heatmaps(doc: Doc, ctx: Context) -> None:
    rows = ctx.ok[ctx.ok["dummy"] & ctx.ok["component"]].copy()
    if rows.empty:
        doc.note("No dummy-model trials (no cfg_mlp_hidden and cfg_embed_dim columns with values).")
        return
    rows["hidden"], rows["embed"] = rows["cfg_mlp_hidden"], rows["cfg_embed_dim"]
    rows["group"] = rows.apply(_group_label, axis=1).astype(str)
    doc.text(
        "Each cell is the median RMSE between error-free and error-injected outputs over the runs "
        "(ranked median, see Definitions): 'nan' when at least half the runs are nan, 'inf' when at least "
        "half are inf or nan; values below 0.01 are printed in scientific notation (3e-4), an exact "
        "zero as 0; '*' marks a finite median with some invalid runs. Every BER of the campaign has a "
        "row of panels."
    )
    groups = sorted(
        rows.groupby(["group", "variant", "mitigation"]),
        key=lambda g: (g[0][0], g[0][1], _mitigation_rank(g[0][2])),
    )
    for (group, variant, mitigation), grp in groups:
        cells = point_stats(grp, ["target", "rate", "hidden", "embed"], "rmse", metric_bounds("rmse"))
        extra = "" if mitigation == "none" else f", mitigation {mitigation}"
        name = f"dummy model {group}{f', {variant}' if variant else ''}{extra}"
        path = doc.figure_path("fig1-rmse-" + slug(group, variant, _suffix(mitigation)))
        figures.plot_rmse_heatmaps(cells, path, f"RMSE vs error-free outputs: {name}")
        doc.image(path, f"Median RMSE over runs, {name}.")
        cols = {"target": "target", "rate": "BER", "hidden": "MLP hidden", "embed": "embed dim"}
        doc.table(table(cells, {**cols, **MEDIAN_COLUMNS}), f"RMSE points: {name}")


# --------------------------------------------------------------------------- 2. quality vs BER


_LINE_COLUMNS = {
    "dataset": "data set",
    "series": "model",
    "rate": "BER",
    **MEAN_COLUMNS,
    "baseline": "baseline",
}


@register("quality", "Quality vs BER (Figs 7-9)")
def _quality(doc: Doc, ctx: Context) -> None:
    rows = ctx.components(labelled=True)
    rows = rows[rows["mitigation"] == "none"]
    if rows.empty:
        doc.note("No trials of models with labels (AUC) without mitigation.")
        return
    doc.text(
        "Mean AUC over runs; no mitigation. The first panel of each data set overlays every model (one "
        "colour, marker and line style each), then each model has its own panel with its runs (dots) "
        "and the 95 % confidence interval of the mean (shaded; see Definitions: with few runs it "
        "reaches far down, since collapsed runs that did not happen to occur cannot be ruled out). "
        "The dotted line is a random guess (AUC 0.5)."
    )
    for target in ordered(rows["target"], TARGET_ORDER):
        mine = rows[rows["target"] == target]
        points = point_stats(mine, ["dataset", "series", "rate"], "auc", metric_bounds("auc"), "baseline_auc")
        path = doc.figure_path("fig2-auc-vs-ber-" + slug(target))
        what = f"errors in {target_name(target)}"
        figures.plot_quality_vs_ber(points, mine, path, f"AUC vs BER: {what}", ctx.palette)
        doc.image(path, f"AUC vs BER, {what}.")
        doc.table(table(points, _LINE_COLUMNS), f"AUC points: {what}")


# --------------------------------------------------------------------------- 3. mitigations


@register("mitigations", "Mitigation comparison (Fig 10)")
def _mitigations(doc: Doc, ctx: Context) -> None:
    rows = ctx.components()
    several = rows.groupby(["target", "dataset", "series"])["mitigation"].transform("nunique") > 1
    rows = rows[several]
    if rows.empty:
        doc.note("No model was run with more than one mitigation.")
        return
    doc.text(
        "Every mitigation at the same (model, target, BER, run) faults. Models with labels: mean AUC; "
        "baselines are per mitigation (clean model with it). Models without labels (dummy and plugin "
        "models): median RMSE (log axis). The "
        "unmitigated line ('none') is black and dashed and drawn on top; lines are shifted slightly "
        "along the BER axis so that a mitigation matching 'none' exactly still shows both."
    )
    for labelled, metric in ((True, "AUC"), (False, "RMSE")):
        part = rows[rows["labelled"] == labelled]
        for target in ordered(part["target"], TARGET_ORDER):
            mine = part[part["target"] == target]
            keys = ["dataset", "series", "mitigation", "rate"]
            what = f"errors in {target_name(target)}"
            if labelled:
                points = point_stats(mine, keys, "auc", metric_bounds("auc"), "baseline_auc")
                cols = {"mitigation": "mitigation", **_LINE_COLUMNS}
            else:
                points = point_stats(mine, keys, "rmse", metric_bounds("rmse"))
                cols = {"dataset": "data set", "series": "model", "mitigation": "mitigation", "rate": "BER"}
                cols |= MEDIAN_COLUMNS
            points = points.sort_values(
                ["dataset", "series", "mitigation"],
                key=lambda c: c.map(_mitigation_rank) if c.name == "mitigation" else c,
            )
            stem = "fig3-mitigation-" + ("" if labelled else "rmse-") + slug(target)
            path = doc.figure_path(stem)
            figures.plot_mitigations(points, path, f"Mitigations ({metric}): {what}", rmse=not labelled)
            doc.image(path, f"{'Mean AUC' if labelled else 'Median RMSE'} vs BER per mitigation, {what}.")
            doc.table(table(points, cols), f"Mitigation points ({metric}): {what}")
    activity = mitigation_activity(rows)
    if not activity.empty:
        doc.text(
            "What each mitigation did, as the mean per trial over models and targets at each BER. ABFT: "
            "output rows that failed their checksum, re-executions, rows recovered by one, rows still "
            "failing after every retry (corrupted weights fail on every re-execution) and false alarms "
            "on clean data. ECC: 64-bit words hit, corrected, detected uncorrectable, "
            "miscorrected (silently wrong) and undetected. Bit protection: bit flips blocked and passed."
        )
        doc.table(activity, "Mitigation activity (mean per trial)")


#: Counters each mitigation stores in a trial's ``extra``, in the order they are shown.
ACTIVITY_COUNTERS = {
    "abft": ("detected", "reexecutions", "recovered", "unrecoverable", "false_alarms"),
    "ecc": ("words_with_errors", "corrected", "detected", "miscorrected", "undetected"),
    "protect-bits": ("blocked_bits", "passed_bits"),
}


def mitigation_activity(rows: pd.DataFrame) -> pd.DataFrame:
    """Per mitigation and BER, the mean per trial of each counter in ``ACTIVITY_COUNTERS``."""
    out = []
    for (mitigation, rate), group in rows.groupby(["mitigation", "rate"], sort=True):
        counters = ACTIVITY_COUNTERS.get(mitigation)
        if counters is None:
            continue
        extra = pd.DataFrame([_extra(v) for v in group["extra"]], index=group.index)
        present = [n for n in counters if n in extra]
        if not present:
            continue
        means = extra[present].apply(pd.to_numeric, errors="coerce").mean()
        cells = ", ".join(f"{n.replace('_', ' ')} {fmt(means[n])}" for n in present)
        out.append(
            {
                "mitigation": mitigation,
                "BER": fmt_rate(rate),
                "trials": str(len(group)),
                "mean per trial": cells,
            }
        )
    return pd.DataFrame(out, columns=["mitigation", "BER", "trials", "mean per trial"])


def _extra(value: Any) -> dict[str, Any]:
    """A trial's ``extra`` column as a dict (stored as JSON text)."""
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value) if isinstance(value, str) and value else {}
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


# --------------------------------------------------------------------------- 4./5. per bit and per layer


def _drop_points(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Stats of the quality drop with ``metric`` and ``score``: mean AUC drop, or ranked-median RMSE."""
    parts = []
    for labelled, grp in rows.groupby("labelled", sort=False):
        if labelled:
            points = point_stats(grp, keys, "drop", drop_bounds(grp["baseline_auc"]), "baseline_auc")
            points = points.assign(metric="AUC drop", score=points["mean"])
        else:
            points = point_stats(grp, keys, "drop", metric_bounds("rmse"))
            points = points.assign(metric="RMSE", score=points["ranked"])
        parts.append(points)
    return pd.concat(parts, ignore_index=True).sort_values(keys, ignore_index=True)


_DROP_COLUMNS = {"metric": "metric", "score": "score", **MEAN_COLUMNS, "ranked": "median"}


@register("per_bit", "Per-bit sensitivity")
def _per_bit(doc: Doc, ctx: Context) -> None:
    rows = ctx.ok[ctx.ok["per_bit"]]
    if rows.empty:
        doc.note("No per-bit trials (trials of kind 'bits' with a single bit position).")
        return
    doc.text(
        "Errors confined to one bit position. Labelled models: mean AUC drop (baseline AUC - AUC; bars) "
        "and the drop of every run (dots); models without labels: median RMSE (a mean would be inf as "
        "soon as one "
        "run is). Confidence intervals are in the table."
    )
    keys = ["series", "dataset", "target", "mitigation", "rate", "bit"]
    points = _drop_points(rows, keys)
    path = doc.figure_path("fig4-per-bit")
    figures.plot_per_bit(points, rows, path, "Quality drop by flipped bit position")
    doc.image(path, "Quality drop by flipped bit position.")
    cols = {"series": "model", "dataset": "data set", "target": "target", "mitigation": "mitigation"}
    cols |= {"rate": "BER", "bit": "bit", **_DROP_COLUMNS}
    doc.table(table(points, cols), "Per-bit points")


def _severity(points: pd.DataFrame) -> pd.DataFrame:
    """Sorted most severe first: nan, then inf, then by decreasing score."""
    rank = np.where(points["score"].isna(), 2, np.where(np.isinf(points["score"]), 1, 0))
    return points.assign(_rank=rank).sort_values(["rate", "_rank", "score"], ascending=[True, False, False])


@register("per_layer", "Per-layer vulnerability")
def _per_layer(doc: Doc, ctx: Context) -> None:
    rows = ctx.ok[ctx.ok["per_parameter"]]
    if rows.empty:
        doc.note("No per-parameter trials (trials of kind 'parameter').")
        return
    doc.text(
        f"Top {TOP_PARAMETERS} parameters per BER by mean AUC drop (labelled models; bars, with every "
        "run as a dot) or median RMSE (models without labels); nan ranks above inf above any finite value."
    )
    for (series, dataset, mitigation), grp in rows.groupby(["series", "dataset", "mitigation"], sort=True):
        points = _severity(_drop_points(grp, ["rate", "target"]))
        points = points.groupby("rate", sort=True).head(TOP_PARAMETERS)
        name = f"{series} on {dataset}" + ("" if mitigation == "none" else f", mitigation {mitigation}")
        path = doc.figure_path("fig5-per-layer-" + slug(series, dataset, _suffix(mitigation)))
        figures.plot_per_layer(points, grp, path, f"Most vulnerable parameters: {name}")
        doc.image(path, f"Most vulnerable parameters, {name}.")
        doc.table(
            table(points, {"rate": "BER", "target": "parameter", **_DROP_COLUMNS}),
            f"Per-parameter points: {name}",
        )


# --------------------------------------------------------------------------- 6. failure BER


@register("failure", "Failure BER")
def _failure(doc: Doc, ctx: Context) -> None:
    rows = ctx.components(labelled=True)
    if rows.empty:
        doc.note("No trials of models with labels (AUC).")
        return
    doc.text(
        f"Failure BER: the smallest BER at which the mean AUC drops below (1 - {FAILURE_LOSS:g}) x baseline "
        "AUC (the model loses 1 % of its AUC). 'grid' is the first tested BER below the threshold; "
        "'interpolated' interpolates linearly in log10(BER) between it and the tested BER before it. "
        "'> max' means it never failed in the tested range, '<= min' that it failed at the smallest BER."
    )
    records = []
    keys = ["series", "dataset", "target", "mitigation"]
    for key, grp in rows.groupby(keys, sort=True):
        means = grp.groupby("rate")["auc"].mean()
        baseline = float(grp["baseline_auc"].mean())
        grid, interpolated = failure_ber(means.index.to_numpy(), means.to_numpy(), baseline)
        records.append(
            {
                **dict(zip(keys, key, strict=True)),
                "baseline": baseline,
                "threshold": (1 - FAILURE_LOSS) * baseline,
                "grid": _fmt_failure(grid, interpolated, means.index, False),
                "interpolated": _fmt_failure(grid, interpolated, means.index, True),
            }
        )
    frame = pd.DataFrame.from_records(records)
    frame["order"] = frame["mitigation"].map(_mitigation_rank)
    cols = {"series": "model", "dataset": "data set", "target": "target", "mitigation": "mitigation"}
    cols |= {"baseline": "baseline AUC", "threshold": "threshold", "grid": "failure BER (grid)"}
    cols |= {"interpolated": "failure BER (interpolated)"}
    doc.table(table(frame.sort_values(["series", "dataset", "target", "order"]), cols), "Failure BER")


def _fmt_failure(grid: float | None, interpolated: float | None, rates: pd.Index, interpolate: bool) -> str:
    if grid is None:
        return f"> {fmt_rate(rates.max())}"
    if interpolated is None:
        return f"<= {fmt_rate(grid)}"
    return fmt_rate(interpolated if interpolate else grid)


# --------------------------------------------------------------------------- 7. invalid outputs, log loss


@register("invalid", "Invalid outputs and log loss")
def _invalid(doc: Doc, ctx: Context) -> None:
    rows = ctx.components()
    rows = rows[rows["invalid"].notna()]
    if rows.empty:
        doc.note("No trials with a count of invalid outputs.")
        return
    doc.text(
        "Share of outputs that are NaN or inf (mean over runs; metric invalid_frac, or n_invalid / "
        "n_outputs where it was not computed) and, for models with labels, the log loss (an invalid "
        "output counts as predicting 0.5). The figure shows trials without mitigation; points where "
        "no output was invalid are left out of its log axis. Every mitigation is in the table."
    )
    keys = ["series", "dataset", "target", "mitigation", "rate"]
    shares = point_stats(rows, keys, "invalid", metric_bounds("invalid_frac"))
    losses = point_stats(rows, keys, "logloss", metric_bounds("logloss"))
    for labelled, kind in ((True, "models with labels"), (False, "models without labels")):
        plain = shares[
            shares["series"].isin(rows.loc[rows["labelled"] == labelled, "series"])
            & (shares["mitigation"] == "none")
        ]
        n_series = plain["series"].nunique()
        if plain.empty or not (plain["mean"] > 0).any():
            continue
        if n_series > MAX_LINES:
            doc.note(f"{n_series} {kind}: too many lines for one figure; see the table.")
            continue
        palette = ctx.palette if labelled else figures.styles(plain["series"])
        path = doc.figure_path("fig6-invalid-" + slug("labelled" if labelled else "dummy"))
        title = f"Share of invalid outputs vs BER ({kind}, no mitigation)"
        figures.save(path, title, figures.invalid_figure, plain, title, palette)
        doc.image(path, f"Share of invalid outputs vs BER, {kind}.")
    merged = shares.merge(losses, on=keys, suffixes=("", "_loss"))
    cols = {
        "series": "model",
        "dataset": "data set",
        "target": "target",
        "mitigation": "mitigation",
        "rate": "BER",
    }
    cols |= {"n": "n", "mean": "invalid share", "low": "CI95 lo", "high": "CI95 hi"}
    cols |= {"mean_loss": "log loss", "median_loss": "log loss median", "low_loss": "log loss CI95 lo"}
    cols |= {"high_loss": "log loss CI95 hi"}
    merged = merged.sort_values(keys, key=lambda c: c.map(_mitigation_rank) if c.name == "mitigation" else c)
    doc.table(table(merged, cols), "Invalid outputs and log loss")


# --------------------------------------------------------------------------- definitions


@register("definitions", "Definitions")
def _definitions(doc: Doc, ctx: Context) -> None:
    doc.text(
        "Every figure is followed by a table of its points. n is the number of ok runs with a value; "
        "#nan counts runs without one (NaN: not computed or undefined), which every statistic leaves out; "
        "#inf counts runs whose value is infinite, which every statistic keeps (one infinite run makes the "
        "mean, std and max inf). mean, std (n-1), min and max are over the n values; '-' marks a "
        "statistic that is undefined (e.g. std of one value). Numbers have 4 significant digits."
    )
    doc.text(
        "CI95 lo/hi: a 95 % confidence interval of the mean that holds for any distribution of the runs "
        "within the metric's range (Anderson's bound: AUC and shares in [0, 1], RMSE and log loss in "
        "[0, inf)). Campaign runs are bimodal (most at the baseline, a few collapsed), and over 3-10 runs "
        "a Student-t interval covers the true mean far less often than 95 % there (measured: 26 % for "
        "3 runs with 10 % collapses); this one covers it at least 95 % of the time for every distribution, "
        "so with few runs it reaches far towards the bound: with n runs, a share of up to 0.71 (n=3), "
        "0.56 (n=5) or 0.41 (n=10) of collapsed runs cannot be ruled out. Where the metric is unbounded "
        "(RMSE, log loss) no finite upper limit holds for every distribution, so CI95 hi is inf. "
        "median CI95 lo/hi: the distribution-free order-statistic interval of the median; with fewer "
        "than 6 runs it is the metric's range. See pytei.stats."
    )
    doc.text(
        "Ranked median (heatmaps, dummy-model RMSE): the median over runs with nan ranked above inf above "
        "every finite value, taking the upper middle value for an even count; so it is nan when at least "
        "half the runs are nan, inf when at least half are inf or nan, and otherwise the ordinary median. "
        "(An RMSE is nan when the model's outputs were: an invalid run, not a missing one.)"
    )
    doc.text(
        "Trial kinds come from the 'kind' column stored at plan time: 'bits' trials with a single bit "
        "position are per-bit trials (section Per-bit sensitivity), 'parameter' trials target one "
        "parameter (section Per-layer vulnerability), everything else is a component ('all', "
        + ", ".join(COMPONENTS)
        + ", or a label), whatever its name. Dummy models are recognised by their stored configuration "
        "(cfg_mlp_hidden, cfg_embed_dim, ...). Where error model, site, params or bit set vary in the "
        "campaign, model names carry them in parentheses."
    )
