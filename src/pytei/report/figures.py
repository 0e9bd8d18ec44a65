"""The report's figures (pyplot-free matplotlib): each ``*_figure`` builds one, each ``plot_*`` saves it.

Rules every figure keeps: at most ``MAX_FIGURE_PX`` wide (the HTML page's width, so it is never shown
shrunk) with fonts of 9 pt or more; every model has its own colour, marker and line style, and where
models overlap each gets a small panel of its own with its runs and interval; axes stay inside the
metric's range (AUC in [0, 1], RMSE above 0); the unmitigated baseline is drawn on top of the
mitigations, dashed and black, so a mitigation that changes nothing cannot hide it.
"""

from __future__ import annotations

import functools
import hashlib
import math
import sys
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from PIL import Image

from .. import __version__
from .document import MAX_FIGURE_PX
from .format import TARGET_ORDER, cell_text, fmt_invalid, fmt_rate, ordered, target_name

__all__ = [
    "DPI",
    "MITIGATION_ORDER",
    "Style",
    "heatmap_figure",
    "invalid_figure",
    "labels_overlap",
    "mitigation_figure",
    "per_bit_figure",
    "per_layer_figure",
    "plot_mitigations",
    "plot_per_bit",
    "plot_per_layer",
    "plot_quality_vs_ber",
    "plot_rmse_heatmaps",
    "quality_figure",
    "save",
    "styles",
]

DPI = 110
#: Widest figure in inches at DPI.
MAX_WIDTH_IN = MAX_FIGURE_PX / DPI
FONT = 10
SMALL = 9
MITIGATION_ORDER = ("none", "clip", "clip-zero", "clip-profiled", "protect-bits", "abft", "ecc")
_INF_COLOR, _NAN_COLOR, _MISSING_COLOR = "#5b8fd6", "#8e6cc0", "#eeeeee"
_LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "pad": 1}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
_LINESTYLES = ("-", "--", "-.", ":")


@dataclass(frozen=True)
class Style:
    """How one model (or mitigation) is drawn in every figure."""

    color: Any
    marker: str
    linestyle: str
    zorder: float = 2.0
    width: float = 1.6


#: matplotlib's ten categorical colours.
_TAB10 = [colormaps["tab10"](k) for k in range(10)]


def styles(names: Iterable[str]) -> dict[str, Style]:
    """A distinct colour, marker and line style per name (sorted), the same in every figure."""
    palette = _TAB10
    out = {}
    for k, name in enumerate(sorted(set(names))):
        out[name] = Style(palette[k % 10], _MARKERS[k % len(_MARKERS)], _LINESTYLES[(k // 10) % 4])
    return out


def mitigation_styles(names: Iterable[str]) -> dict[str, Style]:
    """Mitigations in colour; "none" black, dashed, thick and on top, so no mitigation line can hide it."""
    order = ordered([*MITIGATION_ORDER, *names], MITIGATION_ORDER)
    palette = _TAB10
    out = {m: Style(palette[k % 10], _MARKERS[k % len(_MARKERS)], "-") for k, m in enumerate(order[1:])}
    out["none"] = Style("black", "o", "--", zorder=5.0, width=2.2)
    return out


# --------------------------------------------------------------------------- common


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure at most MAX_WIDTH_IN wide (renders with Agg on save, no global state)."""
    return Figure(figsize=(min(width, MAX_WIDTH_IN), height), dpi=DPI, layout="constrained")


#: The PNG text chunk holding the digest of what a figure was drawn from.
INPUTS_KEY = "pytei-inputs"


def save(path: Path, title: str, build: Callable[..., Figure], *inputs: Any) -> Path:
    """Write ``build(*inputs)`` to ``path`` as a PNG, titled ``title`` (wrapped to the figure's width).

    The PNG carries a digest of ``build``, its inputs and the drawing code; a PNG already there with
    the same digest is kept as it is, so rewriting a report on unchanged results (a resumed campaign,
    ``pytei reproduce`` run again) draws nothing: drawing is most of a report's time.
    """
    key = _digest(build, title, inputs)
    if _drawn_from(path) == key:
        return path
    fig = build(*inputs)
    fig.suptitle(wrap(title, fig.get_figwidth(), 12), fontsize=12)
    fig.savefig(path, dpi=DPI, metadata={INPUTS_KEY: key})
    return path


def _digest(build: Callable[..., Figure], title: str, inputs: tuple[Any, ...]) -> str:
    """sha256 of the figure's inputs, ``build``'s name, and the versions, source and matplotlib settings
    that draw it."""
    h = hashlib.sha256()
    for part in (__version__, matplotlib.__version__, _source(build.__module__)):
        h.update(part.encode())
    # A user's style draws differently. dict.items: reading "backend" through rcParams would resolve
    # it (pyplot's import); figures are drawn by Agg whatever it is.
    style = sorted((k, v) for k, v in dict.items(matplotlib.rcParams) if k != "backend")
    h.update(repr(style).encode())
    h.update(f"{build.__qualname__}\0{title}".encode())
    for value in inputs:
        if isinstance(value, pd.DataFrame):
            h.update(repr((list(value.columns), [str(t) for t in value.dtypes])).encode())
            objects = {c: str for c, t in value.dtypes.items() if t == np.dtype(object)}  # dicts among them
            cells = value.astype(objects)
            h.update(pd.util.hash_pandas_object(cells, index=True).to_numpy().tobytes())
        else:  # str, bool, numbers, dicts of Style: their repr says all (an object's address: a miss)
            h.update(repr(value).encode())
        h.update(b"\0")
    return h.hexdigest()


@functools.cache
def _source(module: str) -> str:
    """sha256 of the report package's source files (the builders and the formatting helpers beside
    them) and of ``module``, the builder's: a change in the drawing code draws the figure again."""
    files = {*Path(__file__).parent.glob("*.py"), Path(sys.modules[module].__file__ or __file__)}
    h = hashlib.sha256()
    for file in sorted(files):
        h.update(file.read_bytes())
    return h.hexdigest()


def _drawn_from(path: Path) -> str | None:
    """The inputs digest stored in the PNG at ``path`` (None: no file, not a PNG, or none stored)."""
    try:
        with Image.open(path) as image:  # reads the chunks before the pixels, decodes nothing
            key = image.info.get(INPUTS_KEY)
    except OSError:  # no file, or not a PNG (UnidentifiedImageError)
        return None
    return key if isinstance(key, str) else None


def wrap(text: str, width_in: float, fontsize: float) -> str:
    """Wrap ``text`` to about ``width_in`` inches at ``fontsize`` points."""
    return textwrap.fill(text, max(20, int(width_in * 120 / fontsize)))


def _grid(fig: Figure, n: int, ncols: int, **kwargs: Any) -> list[Axes]:
    """``n`` axes in rows of ``ncols``; spare cells hidden."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    axes = list(fig.subplots(nrows, ncols, squeeze=False, **kwargs).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def _legend_below(fig: Figure, axes: Iterable[Axes], ncols: int = 3) -> None:
    """One legend under the figure with every distinct label of ``axes``."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if not label.startswith("_"):
                handles.setdefault(label, handle)
    if handles:
        fig.legend(
            handles.values(),
            handles.keys(),
            loc="outside lower center",
            fontsize=SMALL,
            frameon=False,
            ncols=min(ncols, len(handles)),
        )


def auc_limits(*arrays: Iterable[float]) -> tuple[float, float]:
    """y limits of an AUC axis: the values shown (and 0.5, random guessing) with a margin, inside [0, 1]."""
    v = np.concatenate([np.asarray(list(a), dtype=float) for a in arrays] + [np.array([0.5])])
    v = v[np.isfinite(v)]
    lo, hi = float(v.min()), float(v.max())
    pad = max(0.02, 0.05 * (hi - lo))
    return max(0.0, lo - pad), min(1.0, hi + pad)


def positive_limits(values: Iterable[float], top: float | None = None) -> tuple[float, float] | None:
    """Log-axis limits of the positive finite ``values`` (a decade margin below), capped at ``top``."""
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return None
    lo, hi = float(v.min()) / 3, float(v.max()) * 3
    if top is not None:
        hi = min(hi, top)
    return lo, max(hi, lo * 10)


def _log_rates(ax: Axes) -> None:
    ax.set_xscale("log")
    ax.set_xlabel("bit error rate (BER)", fontsize=SMALL)
    ax.tick_params(labelsize=SMALL)
    ax.grid(alpha=0.3)


def _dodge(rates: np.ndarray, k: int, count: int) -> np.ndarray:
    """Rates shifted a little in log space, so coinciding markers of ``count`` lines stay visible."""
    return rates * 10 ** (0.04 * (k - (count - 1) / 2))


# --------------------------------------------------------------------------- heatmaps (Figs 4-6)


def heatmap_figure(cells: pd.DataFrame, title: str) -> Figure:
    """Figs 4-6: one panel per (BER, target), each MLP hidden size x embedding dim; every BER is kept.

    ``cells`` holds target, rate, hidden, embed, ranked (``ranked_median``), n_inf and n_nan. Colours
    are log-scaled over the finite positive medians; cells print in scientific notation below 0.01.
    """
    targets = ordered(cells["target"], TARGET_ORDER)
    rates = sorted(cells["rate"].unique())
    hidden, embed = sorted(cells["hidden"].unique()), sorted(cells["embed"].unique())
    lookup = {(r.target, r.rate, r.hidden, r.embed): r for r in cells.itertuples(index=False)}
    limits = positive_limits(cells["ranked"]) or (1e-3, 1e-2)
    norm = LogNorm(limits[0] * 3, max(limits[1] / 3, limits[0] * 30))
    cmap = colormaps["YlOrRd"]
    panel_w, panel_h = 0.7 * len(embed) + 1.0, 0.45 * len(hidden) + 1.0
    fig = new_figure(len(targets) * panel_w + 1.6, len(rates) * panel_h + 1.4)
    axes = fig.subplots(len(rates), len(targets), squeeze=False)
    for i, rate in enumerate(rates):
        for j, target in enumerate(targets):
            ax = axes[i][j]
            rgba = np.empty((len(hidden), len(embed), 4))
            for a, h in enumerate(hidden):
                for b, e in enumerate(embed):
                    cell = lookup.get((target, rate, h, e))
                    rgba[a, b] = _cell_color(cell, cmap, norm)
                    if cell is not None:
                        partial = cell.n_inf + cell.n_nan > 0 and np.isfinite(cell.ranked)
                        text = cell_text(cell.ranked) + ("*" if partial else "")
                        dark = float(np.dot(rgba[a, b, :3], [0.299, 0.587, 0.114])) < 0.5
                        ax.text(
                            b,
                            a,
                            text,
                            ha="center",
                            va="center",
                            fontsize=SMALL,
                            color="white" if dark else "black",
                        )
            ax.imshow(rgba, aspect="auto")
            ax.set_xticks(range(len(embed)), [f"{e:g}" for e in embed], fontsize=SMALL)
            ax.set_yticks(range(len(hidden)), [f"{h:g}" for h in hidden], fontsize=SMALL)
            ax.set_title(f"{target_name(target)} | BER {fmt_rate(rate)}", fontsize=FONT)
            if i == len(rates) - 1:
                ax.set_xlabel("embedding dim", fontsize=SMALL)
            if j == 0:
                ax.set_ylabel("MLP hidden size", fontsize=SMALL)
    bar = fig.colorbar(ScalarMappable(norm, cmap), ax=axes, shrink=0.8)
    bar.set_label("median RMSE over runs", fontsize=SMALL)
    fig.legend(
        handles=[
            Patch(color=_INF_COLOR, label="inf (>= half the runs inf or nan)"),
            Patch(color=_NAN_COLOR, label="nan (>= half the runs nan)"),
            Patch(facecolor=_MISSING_COLOR, edgecolor="0.6", label="not run"),
        ],
        loc="outside lower center",
        ncols=2,
        fontsize=SMALL,
        frameon=False,
    )
    return fig


def _cell_color(cell: Any, cmap: Any, norm: LogNorm) -> tuple[float, ...]:
    if cell is None:
        return to_rgba(_MISSING_COLOR)
    if math.isnan(cell.ranked):
        return to_rgba(_NAN_COLOR)
    if math.isinf(cell.ranked):
        return to_rgba(_INF_COLOR)
    low = cell.ranked if norm.vmin is None else float(norm.vmin)
    return tuple(cmap(norm(max(cell.ranked, low))))


def plot_rmse_heatmaps(cells: pd.DataFrame, path: Path, title: str) -> Path:
    """Write :func:`heatmap_figure` to ``path``."""
    return save(path, title, heatmap_figure, cells, title)


# --------------------------------------------------------------------------- quality vs BER (Figs 7-9)


def _line(
    ax: Axes, s: pd.DataFrame, y: str, style: Style, label: str | None, dodge: np.ndarray | None = None
) -> None:
    x = s["rate"].to_numpy(dtype=float) if dodge is None else dodge
    ax.plot(
        x,
        s[y],
        color=style.color,
        marker=style.marker,
        ls=style.linestyle,
        lw=style.width,
        ms=5,
        zorder=style.zorder,
        label=label,
        mfc="none" if style.zorder > 2 else style.color,
    )


def quality_figure(
    points: pd.DataFrame, runs: pd.DataFrame, metric: str, title: str, palette: dict[str, Style]
) -> Figure:
    """Figs 7-9: per data set, one panel with every model's mean AUC, then a small panel per model.

    ``points``: dataset, series, rate and the ``Summary`` fields of ``metric``; ``runs``: the trials
    (dataset, series, rate, ``metric``). A model's panel shows its mean, the 95 % interval of the mean
    (shaded, clipped to the axis) and every run (dots), so overlapping models stay readable.
    """
    datasets = sorted(points["dataset"].unique())
    groups = [(d, sorted(points.loc[points["dataset"] == d, "series"].unique())) for d in datasets]
    n_panels = sum(len(models) + (len(models) > 1) for _, models in groups)
    ncols = min(3, n_panels)
    nrows = sum(math.ceil((len(m) + (len(m) > 1)) / ncols) for _, m in groups)
    fig = new_figure(3.8 * ncols + 0.4, 3.0 * nrows + 1.2)
    axes = _grid(fig, nrows * ncols, ncols, sharex=True)
    ylim = auc_limits(runs[metric], points["mean"])
    k = 0
    for dataset, models in groups:
        if len(models) > 1:
            ax = axes[k]
            for name in models:
                _line(
                    ax,
                    points[(points["dataset"] == dataset) & (points["series"] == name)].sort_values("rate"),
                    "mean",
                    palette[name],
                    name,
                )
            _finish_auc(ax, f"{dataset}: all models", ylim)
            k += 1
        for name in models:
            ax = axes[k]
            s = points[(points["dataset"] == dataset) & (points["series"] == name)].sort_values("rate")
            r = runs[(runs["dataset"] == dataset) & (runs["series"] == name)]
            style = palette[name]
            ax.fill_between(
                s["rate"],
                s["low"],
                s["high"],
                color=style.color,
                alpha=0.15,
                lw=0,
                label="95 % interval of the mean",
            )
            ax.scatter(r["rate"], r[metric], s=9, color=style.color, alpha=0.5, lw=0, label="runs")
            _line(ax, s, "mean", style, name)
            _finish_auc(ax, f"{dataset}: {name}", ylim)
            k += 1
        k = math.ceil(k / ncols) * ncols  # each data set starts a new row
    for ax in axes[k:]:
        ax.set_visible(False)
    _legend_below(fig, axes)
    return fig


def _finish_auc(ax: Axes, title: str, ylim: tuple[float, float]) -> None:
    ax.axhline(0.5, ls=":", color="0.4", lw=1, label="random guess (0.5)")
    _log_rates(ax)
    ax.set_ylim(*ylim)
    ax.set_ylabel("AUC", fontsize=SMALL)
    ax.set_title(wrap(title, 3.8, FONT), fontsize=FONT)


def plot_quality_vs_ber(
    points: pd.DataFrame, runs: pd.DataFrame, path: Path, title: str, palette: dict[str, Style]
) -> Path:
    """Write :func:`quality_figure` (AUC) to ``path``."""
    return save(path, title, quality_figure, points, runs, "auc", title, palette)


# --------------------------------------------------------------------------- mitigations (Fig 10)


def mitigation_figure(points: pd.DataFrame, title: str, rmse: bool = False) -> Figure:
    """Fig 10: one panel per (data set, model), one line per mitigation: mean AUC, or median RMSE.

    The unmitigated line ("none") is black, dashed and drawn last; lines are dodged slightly along
    the BER axis so a mitigation that matches "none" exactly still shows both.
    """
    panels = sorted({(d, s) for d, s in zip(points["dataset"], points["series"], strict=True)})
    order = ordered(points["mitigation"], MITIGATION_ORDER)
    palette = mitigation_styles(order)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = new_figure(3.8 * ncols + 0.4, 3.0 * nrows + 1.2)
    axes = _grid(fig, len(panels), ncols, sharey=not rmse)
    y = "ranked" if rmse else "mean"
    ylim = positive_limits(points[y]) if rmse else auc_limits(points["mean"])
    for ax, (dataset, series) in zip(axes, panels, strict=True):
        panel = points[(points["dataset"] == dataset) & (points["series"] == series)]
        drawn = [m for m in order if m != "none"] + (["none"] if "none" in order else [])
        for mitigation in drawn:
            s = panel[panel["mitigation"] == mitigation].sort_values("rate")
            if s.empty:
                continue
            shown = s[np.isfinite(s[y])]
            _line(
                ax,
                shown,
                y,
                palette[mitigation],
                mitigation,
                _dodge(shown["rate"].to_numpy(dtype=float), order.index(mitigation), len(order)),
            )
        _log_rates(ax)
        if rmse:
            ax.set_yscale("log")
            if ylim is not None:
                ax.set_ylim(*ylim)
            ax.set_ylabel("median RMSE", fontsize=SMALL)
        else:
            ax.axhline(0.5, ls=":", color="0.4", lw=1, label="random guess (0.5)")
            ax.set_ylim(*(ylim or (0.0, 1.0)))
            ax.set_ylabel("mean AUC", fontsize=SMALL)
        ax.set_title(wrap(f"{series} | {dataset}", 3.8, FONT), fontsize=FONT)
    _legend_below(fig, axes, ncols=4)
    return fig


def plot_mitigations(points: pd.DataFrame, path: Path, title: str, rmse: bool = False) -> Path:
    """Write :func:`mitigation_figure` to ``path``."""
    return save(path, title, mitigation_figure, points, title, rmse)


# --------------------------------------------------------------------------- invalid outputs


def invalid_figure(points: pd.DataFrame, title: str, palette: dict[str, Style]) -> Figure:
    """Mean share of invalid (NaN/inf) outputs vs BER, one panel per target, one line per model.

    Log axis capped at 1 (all outputs invalid); points where no output was invalid are left out.
    """
    targets = ordered(points["target"], TARGET_ORDER)
    ncols = min(3, len(targets))
    fig = new_figure(3.8 * ncols + 0.4, 3.0 * math.ceil(len(targets) / ncols) + 1.2)
    axes = _grid(fig, len(targets), ncols, sharey=True)
    ylim = positive_limits(points["mean"], top=1.0)
    for ax, target in zip(axes, targets, strict=True):
        panel = points[points["target"] == target]
        names = sorted(panel["series"].unique())
        for k, name in enumerate(names):
            s = panel[(panel["series"] == name) & (panel["mean"] > 0)].sort_values("rate")
            _line(ax, s, "mean", palette[name], name, _dodge(s["rate"].to_numpy(dtype=float), k, len(names)))
        _log_rates(ax)
        ax.set_yscale("log")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_ylabel("share of invalid outputs", fontsize=SMALL)
        ax.set_title(f"errors in {target_name(target)}", fontsize=FONT)
    _legend_below(fig, axes)
    return fig


# --------------------------------------------------------------------------- per bit


def _is_rmse(points: pd.DataFrame) -> bool:
    return bool((points["metric"] == "RMSE").all())


def _invalid_bar_length(scores: pd.Series) -> float:
    """Length of the hatched bar standing for an inf/nan score: beyond every finite one."""
    finite = scores[np.isfinite(scores) & (scores > 0)]
    return float(max(finite.max() * 3, 1.0)) if len(finite) else 1.0


def per_bit_figure(points: pd.DataFrame, runs: pd.DataFrame, title: str) -> Figure:
    """Quality drop vs flipped bit position, one panel per model/target, bars grouped by BER.

    Labelled models: mean AUC drop (bars) and every run's drop (dots); dummy models: median RMSE (log
    axis), a hatched bar where the median is inf/nan. Intervals are in the table, not on the bars.
    """
    keys = ["series", "dataset", "target", "mitigation"]
    panels = list(points.groupby(keys, sort=True))
    bits = sorted(points["bit"].unique())
    fig = new_figure(max(7.0, 0.34 * len(bits) + 2.5), 2.9 * len(panels) + 0.8)
    axes = fig.subplots(len(panels), 1, squeeze=False).ravel()
    for ax, (key, panel) in zip(axes, panels, strict=True):
        series, dataset, target, mitigation = key
        rates = sorted(panel["rate"].unique())
        width = 0.8 / len(rates)
        rmse = _is_rmse(panel)
        cap = _invalid_bar_length(panel["score"])
        mine = runs[np.logical_and.reduce([runs[c] == v for c, v in zip(keys, key, strict=True)])]
        for k, rate in enumerate(rates):
            s = panel[panel["rate"] == rate].set_index("bit").reindex(bits)
            offset = (k - (len(rates) - 1) / 2) * width
            x = np.arange(len(bits)) + offset
            finite = np.isfinite(s["score"]).to_numpy()
            invalid = s["n"].notna().to_numpy() & ~finite
            ax.bar(x, np.where(finite, s["score"], 0.0), width, color=f"C{k}", label=f"BER {fmt_rate(rate)}")
            if not rmse:
                r = mine[mine["rate"] == rate]
                xr = np.searchsorted(bits, r["bit"].to_numpy()) + offset
                ax.scatter(
                    xr,
                    r["drop"],
                    s=6,
                    color="black",
                    alpha=0.5,
                    lw=0,
                    zorder=3,
                    label="runs" if k == 0 else None,
                )
            if invalid.any():
                ax.bar(
                    x[invalid],
                    cap,
                    width,
                    color=f"C{k}",
                    alpha=0.35,
                    hatch="///",
                    label="inf/nan (hatched)" if k == 0 else None,
                )
                for xx, value in zip(x[invalid], s["score"][invalid], strict=True):
                    ax.text(
                        xx, cap, fmt_invalid(value), ha="center", va="top", fontsize=SMALL, bbox=_LABEL_BOX
                    )
        if rmse:
            ax.set_yscale("log")
            limits = positive_limits([*panel["score"], cap])
            if limits is not None:
                ax.set_ylim(*limits)
        else:
            ax.axhline(0, color="0.3", lw=0.8)
            ax.set_ylim(*_drop_limits(mine["drop"], panel["score"], panel["baseline"]))
        ax.set_xticks(np.arange(len(bits)), [f"{b:g}" for b in bits], fontsize=SMALL)
        ax.set_xlim(-0.6, len(bits) - 0.4)
        ax.set_xlabel("flipped bit position", fontsize=SMALL)
        ax.set_ylabel("median RMSE" if rmse else "AUC drop", fontsize=SMALL)
        extra = "" if mitigation == "none" else f" | {mitigation}"
        ax.set_title(
            wrap(f"{series} | {dataset} | {target_name(target)}{extra}", fig.get_figwidth(), FONT),
            fontsize=FONT,
        )
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(labelsize=SMALL)
        ax.legend(fontsize=SMALL, ncols=min(len(rates) + 2, 4), frameon=False)
    return fig


def _drop_limits(*arrays: Iterable[float]) -> tuple[float, float]:
    """Axis of an AUC drop: from the lowest value (or 0) to the highest, inside [baseline - 1, baseline]."""
    *values, baselines = arrays
    v = np.concatenate([np.asarray(list(a), dtype=float) for a in values] + [np.zeros(1)])
    v = v[np.isfinite(v)]
    b = np.asarray(list(baselines), dtype=float)
    top = float(np.nanmax(b)) if np.isfinite(b).any() else 1.0
    lo, hi = float(v.min()), float(v.max())
    pad = max(0.005, 0.08 * (hi - lo))
    return max(top - 1, lo - pad), min(top, hi + pad)


def plot_per_bit(points: pd.DataFrame, runs: pd.DataFrame, path: Path, title: str) -> Path:
    """Write :func:`per_bit_figure` to ``path``."""
    return save(path, title, per_bit_figure, points, runs, title)


# --------------------------------------------------------------------------- per layer


def per_layer_figure(points: pd.DataFrame, runs: pd.DataFrame, title: str) -> Figure:
    """Top parameters by quality drop (most severe on top), one full-width panel per BER, stacked.

    Stacking gives every panel the figure's width, so long parameter names never run into the
    neighbouring panel; at most five value ticks per axis.
    """
    rates = sorted(points["rate"].unique())
    rmse = _is_rmse(points)
    heights = [max(1.8, 0.3 * int((points["rate"] == r).sum()) + 1.0) for r in rates]
    longest = max((len(t) for t in points["target"]), default=10)
    fig = new_figure(min(MAX_WIDTH_IN, max(7.0, 0.075 * longest + 6.0)), sum(heights) + 0.8)
    axes = fig.subplots(len(rates), 1, squeeze=False, gridspec_kw={"height_ratios": heights}).ravel()
    for ax, rate in zip(axes, rates, strict=True):
        s = points[points["rate"] == rate].iloc[::-1]
        y = np.arange(len(s))
        finite = np.isfinite(s["score"]).to_numpy()
        ax.barh(y, np.where(finite, s["score"], 0.0), color="C3", height=0.7)
        if not rmse:
            r = runs[runs["rate"] == rate]
            where = {t: k for k, t in enumerate(s["target"])}
            mine = r[r["target"].isin(where)]
            ax.scatter(mine["drop"], mine["target"].map(where), s=8, color="black", alpha=0.5, lw=0, zorder=3)
        cap = _invalid_bar_length(s["score"])
        if (~finite).any():
            ax.barh(y[~finite], cap, color="C3", alpha=0.35, hatch="///", height=0.7)
            for yy, value in zip(y[~finite], s["score"][~finite], strict=True):
                ax.text(cap, yy, fmt_invalid(value), ha="right", va="center", fontsize=SMALL, bbox=_LABEL_BOX)
        ax.set_yticks(y, s["target"], fontsize=SMALL)
        if rmse:
            ax.set_xscale("log")
            limits = positive_limits([*s["score"], cap])
            if limits is not None:
                ax.set_xlim(*limits)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(5))
            ax.set_xlim(*_drop_limits(runs.loc[runs["rate"] == rate, "drop"], s["score"], s["baseline"]))
        ax.tick_params(axis="x", labelsize=SMALL)
        ax.set_xlabel(
            "median RMSE" if rmse else "AUC drop (baseline - AUC): mean (bar), runs (dots)", fontsize=SMALL
        )
        ax.set_title(f"BER {fmt_rate(rate)}", fontsize=FONT)
        ax.grid(axis="x", alpha=0.3)
    return fig


def plot_per_layer(points: pd.DataFrame, runs: pd.DataFrame, path: Path, title: str) -> Path:
    """Write :func:`per_layer_figure` to ``path``."""
    return save(path, title, per_layer_figure, points, runs, title)


def labels_overlap(fig: Figure) -> list[tuple[str, str]]:
    """Pairs of tick labels (and titles) of ``fig`` whose drawn boxes intersect (a layout check)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        texts = [*ax.get_xticklabels(), *ax.get_yticklabels(), ax.title]
        boxes += [
            (t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_text() and t.get_visible()
        ]
    hits = []
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            if box_a.overlaps(box_b):
                hits.append((a, b))
    return hits
