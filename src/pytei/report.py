"""Campaign reports: the paper's Figs 4-10 as PNGs, plus ``report.md`` and a self-contained ``report.html``.

Input is one row per trial (``pytei.results.load``); statistics use ``status == "ok"`` rows only.
Each figure is followed by a table of every plotted point, so the report reads without its figures.
Definitions (also written into the report, section 7):

* Point statistics: n runs, counts of inf and nan values, and mean / std (ddof=1) / min / max and a
  95 % Student-t confidence interval of the mean, all over the finite values.
* Heatmap cell: the median RMSE over runs with nan ranked above inf above every finite value, taking
  the upper middle value for an even count. A cell is thus "nan" when at least half its runs are nan,
  "inf" when at least half are inf or nan, and otherwise the ordinary median of the runs.
* Failure BER: the smallest BER at which the mean AUC < (1 - FAILURE_LOSS) x baseline AUC, linearly
  interpolated in log10(BER) between the last grid point above and the first below that threshold.
* Trial kinds: ``bits`` with one position is a per-bit trial (section 4 only); a dotted target is a
  parameter name (section 5 only); anything else is a component (or a label).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy import stats

from .targets import COMPONENTS

__all__ = [
    "FAILURE_LOSS",
    "ZERO_RMSE",
    "dummy_params",
    "failure_ber",
    "plot_mitigations",
    "plot_per_bit",
    "plot_per_layer",
    "plot_quality_vs_ber",
    "plot_rmse_heatmaps",
    "point_stats",
    "ranked_median",
    "summarize",
    "write_report",
]

#: An RMSE below this is shown as "0.0": no noticeable deviation (paper, Sec. 5.2).
ZERO_RMSE = 0.005
#: Relative AUC loss that counts as failure: mean AUC < (1 - FAILURE_LOSS) x baseline AUC.
FAILURE_LOSS = 0.01
TOP_PARAMETERS = 15
DPI = 120

#: Row / figure order of component targets, as in the paper (entire model, MLP, embedding).
_TARGETS = ("all", "mlp", "embedding", *(c for c in COMPONENTS if c not in ("mlp", "embedding")))
_TARGET_NAMES = {"all": "entire model", "mlp": "MLP"}
_MITIGATIONS = ("none", "clip", "clip-zero", "clip-profiled", "protect-bits", "abft", "ecc")
_VARIANT_COLUMNS = ("error_model", "site", "params", "bitset")
_NUMERIC = ("rate", "auc", "rmse", "baseline_auc")
_INF_COLOR, _NAN_COLOR, _MISSING_COLOR = "#5b8fd6", "#8e6cc0", "#eeeeee"
_LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "pad": 1}
_STAT_COLUMNS = {
    "n": "n",
    "inf": "#inf",
    "nan": "#nan",
    "mean": "mean",
    "std": "std",
    "min": "min",
    "max": "max",
    "ci_lo": "CI95 lo",
    "ci_hi": "CI95 hi",
}


# --------------------------------------------------------------------------- statistics


def summarize(values: Iterable[float]) -> dict[str, float]:
    """n, inf/nan counts, and mean, std, min, max and 95 % Student-t CI over the finite values."""
    v = np.asarray(list(values), dtype=float)
    fin = v[np.isfinite(v)]
    k = fin.size
    mean = float(fin.mean()) if k else math.nan
    std = float(fin.std(ddof=1)) if k > 1 else math.nan
    half = float(stats.t.ppf(0.975, k - 1) * std / math.sqrt(k)) if k > 1 else math.nan
    return {
        "n": int(v.size),
        "inf": int(np.isinf(v).sum()),
        "nan": int(np.isnan(v).sum()),
        "mean": mean,
        "std": std,
        "min": float(fin.min()) if k else math.nan,
        "max": float(fin.max()) if k else math.nan,
        "ci_lo": mean - half,
        "ci_hi": mean + half,
    }


def ranked_median(values: Iterable[float]) -> float:
    """Median of runs, invalid ones ranked highest (nan > inf): nan or inf once at least half are.

    Ranking invalid values above every finite one and taking the upper middle for an even count
    makes the cell nan when >= half the runs are nan, inf when >= half are inf or nan, and otherwise
    the ordinary median (whose middle values are then finite).
    """
    v = np.asarray(list(values), dtype=float)
    half = math.ceil(v.size / 2)
    if v.size == 0 or np.isnan(v).sum() >= half:
        return math.nan
    if (~np.isfinite(v)).sum() >= half:
        return math.inf
    return float(np.median(np.where(np.isfinite(v), v, np.inf)))


def point_stats(rows: pd.DataFrame, keys: Sequence[str], column: str) -> pd.DataFrame:
    """One row per group of ``keys``: ``summarize`` and ``ranked_median`` of ``column``, mean baseline AUC."""
    records = []
    for key, grp in rows.groupby(list(keys), sort=True):
        values = grp[column].to_numpy(dtype=float)
        records.append(
            {
                **dict(zip(keys, key, strict=True)),
                **summarize(values),
                "median": ranked_median(values),
                "baseline": float(grp["baseline_auc"].mean()),
            }
        )
    return pd.DataFrame.from_records(records, columns=[*keys, *_STAT_COLUMNS, "median", "baseline"])


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


# --------------------------------------------------------------------------- preparing rows


def dummy_params(key: str) -> dict[str, float | str]:
    """Hyper-parameters encoded in a dummy model key, e.g. ``dummy:depth=2,hidden=256,...``."""
    kind, _, rest = key.partition(":")
    if kind != "dummy":
        return {}
    aliases = {"mlp_depth": "depth", "mlp_hidden": "hidden", "embed_dim": "embed"}
    out: dict[str, float | str] = {}
    for part in rest.split(","):
        name, sep, value = part.partition("=")
        if sep:
            try:
                out[aliases.get(name.strip(), name.strip())] = float(value)
            except ValueError:
                out[aliases.get(name.strip(), name.strip())] = value.strip()
    return out


def _parse_bits(value: Any) -> tuple[int, ...] | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    parsed = json.loads(value) if isinstance(value, str) else value
    if parsed is None:
        return None
    return (int(parsed),) if isinstance(parsed, int | float) else tuple(int(b) for b in parsed)


def _bitset_label(bits: tuple[int, ...] | None) -> str:
    if bits is None:
        return "all"
    return "single" if len(bits) == 1 else "[" + ",".join(map(str, sorted(bits))) + "]"


def _short_key(key: str) -> str:
    kind, _, rest = key.partition(":")
    return "/".join(Path(rest).parts[-2:]) if kind == "ckpt" else (rest or key)


def _prepare(df: pd.DataFrame) -> pd.DataFrame:
    """ok trials with BER > 0, plus derived columns: bit, bitset, labelled, is_param, drop, series."""
    ok = df[df["status"] == "ok"].copy()
    for col in _NUMERIC:
        ok[col] = pd.to_numeric(ok[col], errors="coerce").astype(float)
    ok = ok[ok["rate"] > 0]
    for col in ("model", "model_label", "dataset", "target", "mitigation", "error_model", "site", "params"):
        ok[col] = ok[col].fillna("").astype(str)
    bits = ok["bits"].map(_parse_bits)
    ok["bit"] = bits.map(lambda b: float(b[0]) if b is not None and len(b) == 1 else math.nan).astype(float)
    ok["bitset"] = bits.map(_bitset_label).astype(str)
    ok["labelled"] = ok["model"].map(ok.groupby("model")["baseline_auc"].count() > 0).astype(bool)
    ok["is_param"] = ok["target"].str.contains(".", regex=False)  # parameter names are dotted
    ok["drop"] = np.where(ok["labelled"], ok["baseline_auc"] - ok["auc"], ok["rmse"])
    ok["variant"] = _variants(ok)
    ok["series"] = _names(ok) + ok["variant"].map(lambda v: f" ({v})" if v else "")
    return ok


def _variants(ok: pd.DataFrame) -> pd.Series:
    """The error model, site, params and bit set of a row, naming only those that vary in the campaign."""
    whole_word = ok[ok["bit"].isna()]
    varying = [c for c in _VARIANT_COLUMNS if whole_word[c].nunique() > 1]
    if not varying:
        return pd.Series("", index=ok.index, dtype=str)
    return ok[varying].apply(lambda r: ", ".join(f"{c}={r[c]}" for c in varying), axis=1).astype(str)


def _names(ok: pd.DataFrame) -> pd.Series:
    """model_label, with a short model key appended where one label names several models of a data set."""
    label = ok["model_label"].where(ok["model_label"] != "", ok["model"].map(_short_key))
    if ok.empty:
        return label
    keys = ok.groupby(["model_label", "dataset"])["model"].transform("nunique")
    return label.where(keys <= 1, label + " [" + ok["model"].map(_short_key) + "]")


# --------------------------------------------------------------------------- formatting


def _fmt(x: Any) -> str:
    """A table value: floats to 4 significant digits, "-" where missing or undefined (NaN)."""
    if x is None:
        return "-"
    if isinstance(x, int | np.integer):
        return str(int(x))
    if isinstance(x, float | np.floating):
        return "-" if math.isnan(x) else f"{float(x):.4g}"
    return str(x)


def _fmt_rate(rate: float) -> str:
    mantissa, exponent = f"{rate:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def _fmt_invalid(value: float, digits: int = 4) -> str:
    """A ranked median: "nan"/"inf" for invalid cells, else ``digits`` significant digits."""
    if math.isnan(value):
        return "nan"
    return "inf" if math.isinf(value) else f"{value:.{digits}g}"


def _cell_text(value: float) -> str:
    """Heatmap annotation: "0.0" below ZERO_RMSE, "inf"/"nan", else two significant digits."""
    return "0.0" if np.isfinite(value) and value < ZERO_RMSE else _fmt_invalid(value, 2)


def _target_name(target: str) -> str:
    return _TARGET_NAMES.get(target, target)


def _ordered(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    """Unique values, those in ``preferred`` first in its order, the rest sorted."""
    uniq = set(values)
    return [v for v in preferred if v in uniq] + sorted(uniq - set(preferred))


def _slug(*parts: str) -> str:
    text = "-".join(p for p in parts if p)
    return re.sub(r"[^A-Za-z0-9.=]+", "-", text).strip("-").lower()[:80] or "all"


def _table(points: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Select and rename ``columns`` and format every value as text (rates as BERs)."""
    shown = points[list(columns)].copy()
    out = pd.DataFrame(index=shown.index)
    for col, title in columns.items():
        fmt = _fmt_rate if col == "rate" else _fmt_invalid if col == "median" else _fmt
        out[title] = shown[col].map(fmt).astype(str)
    return out.reset_index(drop=True)


# --------------------------------------------------------------------------- report document


@dataclass
class _Doc:
    """The report as a list of blocks, rendered to Markdown and to HTML from the same content."""

    out: Path
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", (level, text)))

    def text(self, text: str) -> None:
        self.blocks.append(("text", text))

    def note(self, text: str) -> None:
        self.blocks.append(("note", text))

    def table(self, frame: pd.DataFrame, caption: str) -> None:
        self.blocks.append(("table", (frame, caption)))

    def figure_path(self, stem: str) -> Path:
        """A fresh PNG path in the output folder (a counter keeps names unique)."""
        taken = {b[1][0].name for b in self.blocks if b[0] == "image"}
        name, k = f"{stem}.png", 1
        while name in taken:
            k += 1
            name = f"{stem}-{k}.png"
        return self.out / name

    def image(self, path: Path, caption: str) -> None:
        self.blocks.append(("image", (path, caption)))

    def markdown(self) -> str:
        parts = []
        for kind, value in self.blocks:
            if kind == "heading":
                parts.append("#" * value[0] + " " + value[1])
            elif kind == "text":
                parts.append(value)
            elif kind == "note":
                parts.append(f"_{value}_")
            elif kind == "image":
                parts.append(f"![{value[1]}]({value[0].name})\n\n*{value[1]}*")
            else:
                parts.append(f"**{value[1]}**\n\n{_md_table(value[0])}")
        return "\n\n".join(parts) + "\n"

    def html(self, title: str) -> str:
        parts = []
        for kind, value in self.blocks:
            if kind == "heading":
                parts.append(f"<h{value[0]}>{html.escape(value[1])}</h{value[0]}>")
            elif kind == "text":
                parts.append(f"<p>{html.escape(value)}</p>")
            elif kind == "note":
                parts.append(f'<p class="note">{html.escape(value)}</p>')
            elif kind == "image":
                data = base64.b64encode(value[0].read_bytes()).decode("ascii")
                parts.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(value[1])}">'
                    f"<figcaption>{html.escape(value[1])}</figcaption></figure>"
                )
            else:
                parts.append(_html_table(*value))
        body = "\n".join(parts)
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
        )


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}"
    "h1,h2{border-bottom:1px solid #ddd;padding-bottom:.2em}"
    "table{border-collapse:collapse;font-size:.85em;margin:.5em 0 1.5em}"
    "th,td{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}"
    "td:first-child,th:first-child{text-align:left}"
    "figure{margin:1em 0}img{max-width:100%}figcaption,.note{color:#555;font-style:italic}"
    "details{margin-bottom:1.5em}summary{cursor:pointer;font-weight:600}"
)


def _md_table(frame: pd.DataFrame) -> str:
    def row(cells: Iterable[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [row(frame.columns), "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += [row(r) for r in frame.itertuples(index=False)]
    return "\n".join(lines)


def _html_table(frame: pd.DataFrame, caption: str) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
        for r in frame.itertuples(index=False)
    )
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    summary = f"{html.escape(caption)} ({len(frame)} row{'' if len(frame) == 1 else 's'})"
    return f"<details{' open' if len(frame) <= 40 else ''}><summary>{summary}</summary>{table}</details>"


# --------------------------------------------------------------------------- figures


def _new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure (renders with Agg on save, no global backend state)."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Figure, path: Path, title: str) -> Path:
    """Add the title, wrapped to the figure's width, and write the PNG."""
    fig.suptitle(_wrap(title, fig.get_figwidth(), 11), fontsize=11)
    fig.savefig(path, dpi=DPI)
    return path


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """Wrap ``text`` to about ``width_in`` inches at ``fontsize`` points."""
    return textwrap.fill(text, max(30, int(width_in * 110 / fontsize)))


def plot_rmse_heatmaps(cells: pd.DataFrame, path: Path, title: str) -> Path:
    """Figs 4-6: rows = target, columns = BER; each panel MLP hidden size x embedding dim.

    ``cells`` holds target, rate, hidden, embed, median (``ranked_median``) and inf/nan counts.
    """
    targets = _ordered(cells["target"], _TARGETS)
    rates = sorted(cells["rate"].unique())
    hidden, embed = sorted(cells["hidden"].unique()), sorted(cells["embed"].unique())
    lookup = {(r.target, r.rate, r.hidden, r.embed): r for r in cells.itertuples(index=False)}
    finite = cells["median"][np.isfinite(cells["median"])]
    norm = LogNorm(ZERO_RMSE, max(float(finite.max()) if len(finite) else 0.0, 10 * ZERO_RMSE))
    cmap = colormaps["YlOrRd"]
    fontsize = 8 if len(embed) <= 4 else 6
    width = max(6.5, len(rates) * (0.62 * len(embed) + 0.8) + 1.4)
    fig = _new_figure(width, len(targets) * (0.42 * len(hidden) + 0.9) + 1.2)
    axes = fig.subplots(len(targets), len(rates), squeeze=False)
    for i, target in enumerate(targets):
        for j, rate in enumerate(rates):
            ax = axes[i][j]
            rgba = np.empty((len(hidden), len(embed), 4))
            for a, h in enumerate(hidden):
                for b, e in enumerate(embed):
                    cell = lookup.get((target, rate, h, e))
                    rgba[a, b] = _cell_color(cell, cmap, norm)
                    if cell is not None:
                        partial = cell.inf + cell.nan > 0 and np.isfinite(cell.median)
                        text = _cell_text(cell.median) + ("*" if partial else "")
                        dark = float(np.dot(rgba[a, b, :3], [0.299, 0.587, 0.114])) < 0.5
                        color = "white" if dark else "black"
                        ax.text(b, a, text, ha="center", va="center", fontsize=fontsize, color=color)
            ax.imshow(rgba, aspect="auto")
            ax.set_xticks(range(len(embed)), [f"{e:g}" for e in embed], fontsize=8)
            ax.set_yticks(range(len(hidden)), [f"{h:g}" for h in hidden], fontsize=8)
            ax.set_title(f"{_target_name(target)} | BER {_fmt_rate(rate)}", fontsize=9)
            if i == len(targets) - 1:
                ax.set_xlabel("embedding dim", fontsize=8)
            if j == 0:
                ax.set_ylabel("MLP hidden size", fontsize=8)
    fig.colorbar(ScalarMappable(norm, cmap), ax=axes, label="median RMSE over runs", shrink=0.8)
    fig.legend(
        handles=[
            Patch(color=_INF_COLOR, label="inf (>= half the runs inf or nan)"),
            Patch(color=_NAN_COLOR, label="nan (>= half the runs nan)"),
            Patch(facecolor=_MISSING_COLOR, edgecolor="0.6", label="not run"),
        ],
        loc="outside lower center",
        ncols=3,
        fontsize=8,
        frameon=False,
    )
    return _save(fig, path, title)


def _cell_color(cell: Any, cmap: Any, norm: LogNorm) -> tuple[float, ...]:
    if cell is None:
        return to_rgba(_MISSING_COLOR)
    if math.isnan(cell.median):
        return to_rgba(_NAN_COLOR)
    if math.isinf(cell.median):
        return to_rgba(_INF_COLOR)
    return cmap(norm(max(cell.median, ZERO_RMSE)))


def _draw_lines(
    ax: Axes, points: pd.DataFrame, hue: str, order: Sequence[str], colors: dict[str, Any]
) -> None:
    """Mean vs BER per ``hue`` value with 95 % CI error bars and a min-max band."""
    for name in order:
        s = points[points[hue] == name].sort_values("rate")
        if s.empty:
            continue
        color = colors[name]
        ax.fill_between(s["rate"], s["min"], s["max"], color=color, alpha=0.15, linewidth=0)
        err = np.nan_to_num(np.vstack([s["mean"] - s["ci_lo"], s["ci_hi"] - s["mean"]]))
        ax.errorbar(
            s["rate"], s["mean"], yerr=err, color=color, marker="o", ms=3, capsize=3, lw=1.5, label=name
        )
    ax.axhline(0.5, ls=":", color="0.4", lw=1, label="random guess (0.5)")
    ax.set_xscale("log")
    ax.set_xlabel("bit error rate (BER)")
    ax.set_ylabel("AUC")
    ax.grid(alpha=0.3)


def _figure_legend(fig: Figure, axes: Iterable[Axes]) -> None:
    """One legend right of the figure with every distinct label of ``axes``."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=8, frameon=False)


def plot_quality_vs_ber(points: pd.DataFrame, path: Path, title: str, colors: dict[str, Any]) -> Path:
    """Figs 7-9: AUC vs BER, one panel per data set, one line per model (``series``)."""
    datasets = sorted(points["dataset"].unique())
    ncols = min(3, len(datasets))
    nrows = math.ceil(len(datasets) / ncols)
    fig = _new_figure(4.2 * ncols + 2.2, 3.3 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    order = sorted(points["series"].unique())
    for ax, dataset in zip(axes, datasets, strict=False):
        _draw_lines(ax, points[points["dataset"] == dataset], "series", order, colors)
        ax.set_title(dataset, fontsize=10)
    for ax in axes[len(datasets) :]:
        ax.set_visible(False)
    _figure_legend(fig, axes[: len(datasets)])
    return _save(fig, path, title)


def plot_mitigations(points: pd.DataFrame, path: Path, title: str) -> Path:
    """Fig 10: AUC vs BER per mitigation; rows = data set, columns = model (``series``)."""
    datasets, models = sorted(points["dataset"].unique()), sorted(points["series"].unique())
    order = _ordered(points["mitigation"], _MITIGATIONS)
    colors = {m: f"C{k}" for k, m in enumerate(_ordered([*_MITIGATIONS, *order], _MITIGATIONS))}
    fig = _new_figure(3.6 * len(models) + 2.0, 3.0 * len(datasets) + 0.5)
    axes = fig.subplots(len(datasets), len(models), squeeze=False, sharey=True)
    for i, dataset in enumerate(datasets):
        for j, model in enumerate(models):
            ax = axes[i][j]
            panel = points[(points["dataset"] == dataset) & (points["series"] == model)]
            if panel.empty:
                ax.set_visible(False)
                continue
            _draw_lines(ax, panel, "mitigation", order, colors)
            ax.set_title(f"{model} | {dataset}", fontsize=9)
    _figure_legend(fig, axes.ravel())
    return _save(fig, path, title)


def _is_rmse(points: pd.DataFrame) -> bool:
    return bool((points["metric"] == "RMSE").all())


def _invalid_bar_length(scores: pd.Series) -> float:
    """Length of the hatched bar standing for an inf/nan score: beyond every finite one."""
    finite = scores[np.isfinite(scores)]
    return float(max(finite.max() * 3, 1.0)) if len(finite) else 1.0


def plot_per_bit(points: pd.DataFrame, path: Path, title: str) -> Path:
    """Quality drop vs flipped bit position, one panel per model/target, bars grouped by BER.

    Labelled models: mean AUC drop with 95 % CI; dummy models: median RMSE (log axis starting at
    ZERO_RMSE), a hatched bar where the median is inf/nan.
    """
    panels = list(points.groupby(["series", "dataset", "target", "mitigation"], sort=True))
    bits = sorted(points["bit"].unique())
    fig = _new_figure(max(7.0, 0.32 * len(bits) + 2.5), 2.8 * len(panels) + 0.6)
    axes = fig.subplots(len(panels), 1, squeeze=False).ravel()
    for ax, ((series, dataset, target, mitigation), panel) in zip(axes, panels, strict=True):
        rates = sorted(panel["rate"].unique())
        width = 0.8 / len(rates)
        rmse = _is_rmse(panel)
        cap = _invalid_bar_length(panel["score"])
        for k, rate in enumerate(rates):
            s = panel[panel["rate"] == rate].set_index("bit").reindex(bits)
            x = np.arange(len(bits)) + (k - (len(rates) - 1) / 2) * width
            finite = np.isfinite(s["score"]).to_numpy()
            invalid = s["n"].notna().to_numpy() & ~finite
            err = None if rmse else np.nan_to_num(np.vstack([s["mean"] - s["ci_lo"], s["ci_hi"] - s["mean"]]))
            heights = np.where(finite, s["score"], 0.0)
            ax.bar(x, heights, width, yerr=err, color=f"C{k}", capsize=2, label=f"BER {_fmt_rate(rate)}")
            if invalid.any():
                label = "inf/nan (hatched)" if k == 0 else None
                ax.bar(x[invalid], cap, width, color=f"C{k}", alpha=0.35, hatch="///", label=label)
                for xx, value in zip(x[invalid], s["score"][invalid], strict=True):
                    ax.text(xx, cap, _fmt_invalid(value), ha="center", va="top", fontsize=7, bbox=_LABEL_BOX)
        if rmse:
            ax.set_yscale("log")
            ax.set_ylim(bottom=ZERO_RMSE)
        else:
            ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xticks(np.arange(len(bits)), [f"{b:g}" for b in bits], fontsize=7)
        ax.set_xlim(-0.6, len(bits) - 0.4)
        ax.set_xlabel("flipped bit position")
        ax.set_ylabel("median RMSE" if rmse else "AUC drop (baseline - AUC)")
        extra = "" if mitigation == "none" else f" | {mitigation}"
        panel_title = f"{series} | {dataset} | {_target_name(target)}{extra}"
        ax.set_title(_wrap(panel_title, fig.get_figwidth(), 9), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncols=min(len(rates) + 1, 4), frameon=False)
    return _save(fig, path, title)


def plot_per_layer(points: pd.DataFrame, path: Path, title: str) -> Path:
    """Top parameters by quality drop (most severe on top), one horizontal-bar panel per BER."""
    rates = sorted(points["rate"].unique())
    rmse = _is_rmse(points)
    tallest = points.groupby("rate").size().max()
    fig = _new_figure(4.8 * len(rates) + 1.0, max(3.0, 0.28 * tallest + 1.6))
    axes = fig.subplots(1, len(rates), squeeze=False).ravel()
    for ax, rate in zip(axes, rates, strict=True):
        s = points[points["rate"] == rate].iloc[::-1]
        y = np.arange(len(s))
        finite = np.isfinite(s["score"])
        err = None if rmse else np.nan_to_num(np.vstack([s["mean"] - s["ci_lo"], s["ci_hi"] - s["mean"]]))
        ax.barh(y, s["score"].where(finite, 0), xerr=err, color="C3", capsize=2)
        if (~finite).any():
            cap = _invalid_bar_length(s["score"])
            ax.barh(y[~finite.to_numpy()], cap, color="C3", alpha=0.35, hatch="///")
            for yy, value in zip(y[~finite.to_numpy()], s["score"][~finite], strict=True):
                ax.text(cap, yy, _fmt_invalid(value), ha="right", va="center", fontsize=7, bbox=_LABEL_BOX)
        ax.set_yticks(y, s["target"], fontsize=7)
        if rmse:
            ax.set_xscale("log")
            ax.set_xlim(left=ZERO_RMSE)
        ax.set_xlabel("median RMSE" if rmse else "mean AUC drop (baseline - AUC)")
        ax.set_title(f"BER {_fmt_rate(rate)}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    return _save(fig, path, title)


# --------------------------------------------------------------------------- sections


def _colors(names: Iterable[str]) -> dict[str, Any]:
    """A color per model series, the same in every figure."""
    palette = colormaps["tab10"].colors + colormaps["Dark2"].colors
    return {n: palette[k % len(palette)] for k, n in enumerate(sorted(set(names)))}


def _header(doc: _Doc, df: pd.DataFrame, ok: pd.DataFrame, title: str) -> None:
    doc.heading(1, title)
    failed = df[df["status"] != "ok"]
    doc.text(
        f"Trials: {int((df['status'] == 'ok').sum())} ok, {len(failed)} failed ({len(df)} in all). "
        f"Data sets: {', '.join(sorted(ok['dataset'].unique())) or 'none'}. "
        f"Statistics use ok trials with BER > 0 only ({len(ok)} trials)."
    )
    if not ok.empty:
        models = (
            ok.groupby(["series", "model", "dataset"])
            .agg(trials=("trial_id", "size"), baseline_auc=("baseline_auc", "mean"))
            .reset_index()
        )
        cols = {"series": "model", "model": "key", "dataset": "data set", "trials": "trials"}
        doc.table(_table(models, {**cols, "baseline_auc": "baseline AUC"}), "Models")
    if not failed.empty:
        errors = failed["error_message"].fillna("").astype(str).str.slice(0, 120).value_counts().head(10)
        frame = pd.DataFrame({"error": errors.index, "trials": errors.to_numpy()})
        doc.table(_table(frame, {"error": "error", "trials": "trials"}), "Failed trials (most common errors)")


def _section_heatmaps(doc: _Doc, ok: pd.DataFrame) -> None:
    doc.heading(2, "1. RMSE heatmaps of dummy models (Figs 4-6)")
    rows = ok[ok["model"].str.startswith("dummy:") & ok["bit"].isna() & ~ok["is_param"]].copy()
    params = rows["model"].map(dummy_params)
    rows = rows[params.map(lambda p: "hidden" in p and "embed" in p)]
    if rows.empty:
        doc.note("No dummy-model trials with hidden size and embedding dim in their key.")
        return
    params = params[rows.index]
    rows["hidden"] = params.map(lambda p: float(p["hidden"]))
    rows["embed"] = params.map(lambda p: float(p["embed"]))
    rows["group"] = params.map(_group_label)
    doc.text(
        "Each cell is the median RMSE between error-free and error-injected outputs over the runs "
        f"(ranked median, see section 7): 'nan' when at least half the runs are nan, 'inf' when at least "
        f"half are inf or nan; '0.0' means RMSE < {ZERO_RMSE}; '*' marks a finite median with some "
        "invalid runs. BERs where every cell is 0.0 or every cell invalid are left out of the figure "
        "(as in the paper) but kept in the table."
    )
    mitigation_rank = {m: k for k, m in enumerate(_MITIGATIONS)}
    groups = sorted(
        rows.groupby(["group", "variant", "mitigation"]),
        key=lambda g: (g[0][0], g[0][1], mitigation_rank.get(g[0][2], 99)),
    )
    for (group, variant, mitigation), grp in groups:
        cells = point_stats(grp, ["target", "rate", "hidden", "embed"], "rmse")
        shown = _informative_rates(cells)
        extra = "" if mitigation == "none" else f", mitigation {mitigation}"
        name = f"dummy model {group}{f', {variant}' if variant else ''}{extra}"
        path = doc.figure_path(
            "fig1-rmse-" + _slug(group, variant, "" if mitigation == "none" else mitigation)
        )
        plot_rmse_heatmaps(cells[cells["rate"].isin(shown)], path, f"RMSE vs error-free outputs: {name}")
        omitted = sorted(set(cells["rate"]) - set(shown))
        note = f" BERs left out: {', '.join(map(_fmt_rate, omitted))}." if omitted else ""
        doc.image(path, f"Median RMSE over runs, {name}.{note}")
        cols = {
            "target": "target",
            "rate": "BER",
            "hidden": "MLP hidden",
            "embed": "embed dim",
            "median": "median",
        }
        doc.table(_table(cells, {**cols, **_STAT_COLUMNS}), f"RMSE points: {name}")


def _group_label(params: dict[str, float | str]) -> str:
    """The dummy hyper-parameters that one heatmap figure shares (all but hidden size and embedding dim)."""
    shared = sorted((k, v) for k, v in params.items() if k not in ("hidden", "embed"))
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shared)


def _informative_rates(cells: pd.DataFrame) -> list[float]:
    """BERs whose cells are not all "0.0" and not all invalid (all BERs if none is informative)."""
    rates = sorted(cells["rate"].unique())
    shown = []
    for rate in rates:
        med = cells.loc[cells["rate"] == rate, "median"]
        finite = np.isfinite(med)
        if not ((finite & (med < ZERO_RMSE)).all() or (~finite).all()):
            shown.append(rate)
    return shown or rates


def _labelled_components(ok: pd.DataFrame) -> pd.DataFrame:
    """Labelled-model trials on components (not single parameters), flipping any bit."""
    return ok[ok["labelled"] & ok["bit"].isna() & ~ok["is_param"]]


_LINE_COLUMNS = {
    "dataset": "data set",
    "series": "model",
    "rate": "BER",
    **_STAT_COLUMNS,
    "baseline": "baseline",
}


def _section_quality(doc: _Doc, ok: pd.DataFrame, colors: dict[str, Any]) -> None:
    doc.heading(2, "2. Quality vs BER (Figs 7-9)")
    rows = _labelled_components(ok)
    rows = rows[rows["mitigation"] == "none"]
    if rows.empty:
        doc.note("No trials of models with labels (AUC) without mitigation.")
        return
    doc.text(
        "Mean AUC over runs (line), 95 % confidence interval of the mean (error bars) and min-max range "
        "(band); no mitigation. The dotted line is a random guess (AUC 0.5)."
    )
    for target in _ordered(rows["target"], _TARGETS):
        points = point_stats(rows[rows["target"] == target], ["dataset", "series", "rate"], "auc")
        path = doc.figure_path("fig2-auc-vs-ber-" + _slug(target))
        what = f"errors in {_target_name(target)}"
        plot_quality_vs_ber(points, path, f"AUC vs BER: {what}", colors)
        doc.image(path, f"AUC vs BER, {what}.")
        doc.table(_table(points, _LINE_COLUMNS), f"AUC points: {what}")


def _section_mitigations(doc: _Doc, ok: pd.DataFrame) -> None:
    doc.heading(2, "3. Mitigation comparison (Fig 10)")
    rows = _labelled_components(ok)
    several = rows.groupby(["target", "dataset", "series"])["mitigation"].transform("nunique") > 1
    rows = rows[several]
    if rows.empty:
        doc.note("No model was run with more than one mitigation.")
        return
    doc.text(
        "Mean AUC over runs with 95 % CI per mitigation; baselines are per mitigation (clean model with it)."
    )
    for target in _ordered(rows["target"], _TARGETS):
        points = point_stats(
            rows[rows["target"] == target], ["dataset", "series", "mitigation", "rate"], "auc"
        )
        path = doc.figure_path("fig3-mitigation-" + _slug(target))
        what = f"errors in {_target_name(target)}"
        plot_mitigations(points, path, f"Mitigations: {what}")
        doc.image(path, f"AUC vs BER per mitigation, {what}.")
        cols = {"dataset": "data set", "series": "model", "mitigation": "mitigation", **_LINE_COLUMNS}
        doc.table(_table(points, cols), f"Mitigation points: {what}")
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
        names = ACTIVITY_COUNTERS.get(mitigation)
        if names is None:
            continue
        extra = pd.DataFrame([_extra(v) for v in group["extra"]], index=group.index)
        present = [n for n in names if n in extra]
        if not present:
            continue
        means = extra[present].apply(pd.to_numeric, errors="coerce").mean()
        cells = ", ".join(f"{n.replace('_', ' ')} {_fmt(means[n])}" for n in present)
        out.append(
            {
                "mitigation": mitigation,
                "BER": _fmt_rate(rate),
                "trials": str(len(group)),
                "mean per trial": cells,
            }
        )
    return pd.DataFrame(out, columns=["mitigation", "BER", "trials", "mean per trial"])


def _extra(value: Any) -> dict:
    """A trial's ``extra`` column as a dict (stored as JSON text)."""
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value) if isinstance(value, str) and value else {}
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _drop_points(rows: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Stats of the quality drop, with ``metric`` and ``score``: mean AUC drop, or ranked-median RMSE."""
    points = point_stats(rows, keys, "drop")
    labelled = rows.groupby(list(keys))["labelled"].first().to_numpy()
    points["metric"] = np.where(labelled, "AUC drop", "RMSE")
    points["score"] = np.where(labelled, points["mean"], points["median"])
    return points


def _section_per_bit(doc: _Doc, ok: pd.DataFrame) -> None:
    doc.heading(2, "4. Per-bit sensitivity")
    rows = ok[ok["bit"].notna()]
    if rows.empty:
        doc.note("No per-bit trials (bits with a single position).")
        return
    doc.text(
        "Errors confined to one bit position. Labelled models: mean AUC drop (baseline AUC - AUC) with "
        "95 % CI; dummy models: median RMSE (a mean would be inf as soon as one run is)."
    )
    points = _drop_points(rows, ["series", "dataset", "target", "mitigation", "rate", "bit"])
    path = doc.figure_path("fig4-per-bit")
    plot_per_bit(points, path, "Quality drop by flipped bit position")
    doc.image(path, "Quality drop by flipped bit position.")
    cols = {"series": "model", "dataset": "data set", "target": "target", "mitigation": "mitigation"}
    cols |= {"rate": "BER", "bit": "bit", "metric": "metric", "median": "median", **_STAT_COLUMNS}
    doc.table(_table(points, cols), "Per-bit points")


def _severity(points: pd.DataFrame) -> pd.DataFrame:
    """Sorted most severe first: nan, then inf, then by decreasing score."""
    rank = np.where(points["score"].isna(), 2, np.where(np.isinf(points["score"]), 1, 0))
    return points.assign(_rank=rank).sort_values(["rate", "_rank", "score"], ascending=[True, False, False])


def _section_per_layer(doc: _Doc, ok: pd.DataFrame) -> None:
    doc.heading(2, "5. Per-layer vulnerability")
    rows = ok[ok["is_param"] & ok["bit"].isna()]
    if rows.empty:
        doc.note("No per-parameter trials (targets naming a single parameter).")
        return
    doc.text(
        f"Top {TOP_PARAMETERS} parameters per BER by mean AUC drop (labelled models) or median RMSE "
        "(dummy models); nan ranks above inf above any finite value."
    )
    for (series, dataset, mitigation), grp in rows.groupby(["series", "dataset", "mitigation"], sort=True):
        points = _severity(_drop_points(grp, ["rate", "target"]))
        points = points.groupby("rate", sort=True).head(TOP_PARAMETERS)
        name = f"{series} on {dataset}" + ("" if mitigation == "none" else f", mitigation {mitigation}")
        path = doc.figure_path(
            "fig5-per-layer-" + _slug(series, dataset, "" if mitigation == "none" else mitigation)
        )
        plot_per_layer(points, path, f"Most vulnerable parameters: {name}")
        doc.image(path, f"Most vulnerable parameters, {name}.")
        cols = {"rate": "BER", "target": "parameter", "metric": "metric", "median": "median", **_STAT_COLUMNS}
        doc.table(_table(points, cols), f"Per-parameter points: {name}")


def _section_failure(doc: _Doc, ok: pd.DataFrame) -> None:
    doc.heading(2, "6. Failure BER")
    rows = _labelled_components(ok)
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
    frame["order"] = frame["mitigation"].map({m: k for k, m in enumerate(_MITIGATIONS)}).fillna(99)
    cols = {"series": "model", "dataset": "data set", "target": "target", "mitigation": "mitigation"}
    cols |= {"baseline": "baseline AUC", "threshold": "threshold", "grid": "failure BER (grid)"}
    cols |= {"interpolated": "failure BER (interpolated)"}
    doc.table(_table(frame.sort_values(["series", "dataset", "target", "order"]), cols), "Failure BER")


def _fmt_failure(grid: float | None, interpolated: float | None, rates: pd.Index, interpolate: bool) -> str:
    if grid is None:
        return f"> {_fmt_rate(rates.max())}"
    if interpolated is None:
        return f"<= {_fmt_rate(grid)}"
    return _fmt_rate(interpolated if interpolate else grid)


def _section_definitions(doc: _Doc) -> None:
    doc.heading(2, "7. Definitions")
    doc.text(
        "Every figure is followed by a table of its points. n is the number of ok runs; #inf and #nan count "
        "runs whose value was inf or nan; mean, std (n-1), min, max and the 95 % confidence interval of the "
        "mean (Student t with n_finite - 1 degrees of freedom) are taken over the finite values only; '-' "
        "marks a statistic that is undefined (e.g. std of one value). Numbers have 4 significant digits."
    )
    doc.text(
        "Ranked median (heatmaps, dummy-model RMSE): the median over runs with nan ranked above inf above "
        "every finite value, taking the upper middle value for an even count; so it is nan when at least "
        "half the runs are nan, inf when at least half are inf or nan, and otherwise the ordinary median."
    )
    doc.text(
        "Trial kinds: a trial whose bits hold a single position is a per-bit trial (section 4 only); a "
        "dotted target (a parameter name such as mlp.0.weight) is a per-parameter trial (section 5 only); "
        "other targets ('all', " + ", ".join(COMPONENTS) + ", or a label) are components. Where error "
        "model, site, params or bit set vary in the campaign, model names carry them in parentheses."
    )


# --------------------------------------------------------------------------- entry point


def write_report(
    df_or_db: pd.DataFrame | str | Path, out_dir: str | Path, *, title: str | None = None
) -> Path:
    """Write the figures, ``report.md`` and a self-contained ``report.html`` to ``out_dir``.

    ``df_or_db``: a DataFrame with one row per trial, or a results database path (read with
    ``pytei.results.load``). Returns the path of ``report.md``.
    """
    if isinstance(df_or_db, pd.DataFrame):
        df = df_or_db
    else:
        from .results import load

        df = load(df_or_db)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heading = f"pytei report: {title}" if title else "pytei report"
    ok = _prepare(df)
    colors = _colors(_labelled_components(ok)["series"])
    doc = _Doc(out)
    _header(doc, df, ok, heading)
    _section_heatmaps(doc, ok)
    _section_quality(doc, ok, colors)
    _section_mitigations(doc, ok)
    _section_per_bit(doc, ok)
    _section_per_layer(doc, ok)
    _section_failure(doc, ok)
    _section_definitions(doc)
    (out / "report.html").write_text(doc.html(heading), encoding="utf-8")
    md = out / "report.md"
    md.write_text(doc.markdown(), encoding="utf-8")
    return md
