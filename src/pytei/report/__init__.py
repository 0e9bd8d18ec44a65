"""Campaign reports: the paper's Figs 4-10 as PNGs, plus ``report.md`` and a self-contained ``report.html``.

Input is one row per trial (``pytei.results.load``); statistics use ``status == "ok"`` rows only and
come from ``pytei.stats`` (one NaN/inf policy; confidence intervals inside each metric's range).
Each figure is followed by a table of every plotted point, so the report reads without its figures;
the last section defines every statistic.

The package: ``points`` (statistics of report points), ``rows`` (row preparation: kinds and dummy
configuration read from stored columns), ``document`` (Markdown/HTML), ``figures``, ``sections`` (a
registry; ``pytei.report.sections.register`` adds one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from ..stats import summarize
from . import abft_plan as _abft_plan  # noqa: F401 - registers its section
from . import distributed as _distributed  # noqa: F401 - registers its section
from . import quantization as _quantization  # noqa: F401 - registers its section
from . import sections as _sections
from .document import Doc
from .figures import (
    plot_mitigations,
    plot_per_bit,
    plot_per_layer,
    plot_quality_vs_ber,
    plot_rmse_heatmaps,
    styles,
)
from .format import table
from .points import FAILURE_LOSS, failure_ber, point_stats, ranked_median
from .rows import prepare
from .sections import ACTIVITY_COUNTERS, Context, mitigation_activity, register

__all__ = [
    "ACTIVITY_COUNTERS",
    "FAILURE_LOSS",
    "failure_ber",
    "mitigation_activity",
    "plot_mitigations",
    "plot_per_bit",
    "plot_per_layer",
    "plot_quality_vs_ber",
    "plot_rmse_heatmaps",
    "point_stats",
    "ranked_median",
    "register",
    "summarize",
    "write_report",
]


def _header(doc: Doc, df: pd.DataFrame, ok: pd.DataFrame, title: str) -> None:
    doc.heading(1, title)
    failed = df[df["status"] != "ok"]
    kinds = ", ".join(f"{n} {k}" for k, n in ok["kind"].value_counts().sort_index().items()) or "none"
    doc.text(
        f"Trials: {int((df['status'] == 'ok').sum())} ok, {len(failed)} failed ({len(df)} in all). "
        f"Data sets: {', '.join(sorted(ok['dataset'].unique())) or 'none'}. "
        f"Statistics use ok trials with BER > 0 only ({len(ok)} trials; by kind: {kinds})."
    )
    if not ok.empty:
        arch = ok["architecture"].fillna("").astype(str) if "architecture" in ok else pd.Series("", ok.index)
        models = (
            ok.assign(architecture=arch)
            .groupby(["series", "model", "architecture", "dataset"])
            .agg(trials=("trial_id", "size"), baseline_auc=("baseline_auc", "mean"))
            .reset_index()
        )
        cols = {"series": "model", "model": "key", "architecture": "architecture", "dataset": "data set"}
        doc.table(table(models, {**cols, "trials": "trials", "baseline_auc": "baseline AUC"}), "Models")
    if not failed.empty:
        errors = failed["error_message"].fillna("").astype(str).str.slice(0, 120).value_counts().head(10)
        frame = pd.DataFrame({"error": errors.index, "trials": errors.to_numpy()})
        doc.table(table(frame, {"error": "error", "trials": "trials"}), "Failed trials (most common errors)")


def write_report(
    df_or_db: pd.DataFrame | str | Path,
    out_dir: str | Path,
    *,
    title: str | None = None,
    extras: Mapping[str, pd.DataFrame] | None = None,
    sections: Sequence[str] | None = None,
) -> Path:
    """Write the figures, ``report.md`` and a self-contained ``report.html`` to ``out_dir``.

    ``df_or_db``: a DataFrame with one row per trial (as ``pytei.results.load`` gives it: with the
    ``kind`` and dummy ``cfg_*`` columns), or a results database path. ``extras``: tables of studies
    that sections read besides the trials (``quantization``: the quantization study's trials with
    ``dtype`` and ``field``; ``quantization_blast``: its measured flips; ``abft_plan``; ``distributed``:
    the trials of sharded models: taken from the trials when not given). ``sections``: names of the
    sections to write (default: every registered one that has its data). Host-fault trials (site
    ``host``) are shown by the distributed section only. Returns the path of ``report.md``.
    """
    if isinstance(df_or_db, pd.DataFrame):
        df = df_or_db
    else:
        from ..results import load

        df = load(df_or_db)
    extras = dict(extras or {})
    sharded = (
        df["model"].astype(str).str.startswith("sharded:") if "model" in df else pd.Series(False, df.index)
    )
    if "distributed" not in extras and bool(sharded.any()):
        extras["distributed"] = df[sharded]
    if "site" in df:
        df = df[df["site"] != "host"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heading = f"pytei report: {title}" if title else "pytei report"
    ok = prepare(df)
    labelled = ok[ok["component"] & ok["labelled"]]
    ctx = Context(trials=df, ok=ok, palette=styles(labelled["series"]), extras=extras)
    doc = Doc(out)
    _header(doc, df, ok, heading)
    if sections is not None:
        unknown = sorted(set(sections) - set(_sections.names()))
        if unknown:
            raise ValueError(f"no report section {unknown}; registered: {', '.join(_sections.names())}")
    present = [s for s in _sections.sections() if s.applies(ctx) and (sections is None or s.name in sections)]
    for number, section in enumerate(present, start=1):
        doc.heading(2, f"{number}. {section.title}")
        section.render(doc, ctx)
    (out / "report.html").write_text(doc.html(heading), encoding="utf-8")
    md = out / "report.md"
    md.write_text(doc.markdown(), encoding="utf-8")
    return md
