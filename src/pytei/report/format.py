"""Text of the report's tables and labels: numbers, BERs, target names, ordering and file-name slugs."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..targets import COMPONENTS

__all__ = ["TARGET_ORDER", "cell_text", "fmt", "fmt_invalid", "fmt_rate", "ordered", "slug", "table"]

#: Row / figure order of component targets, as in the paper (entire model, MLP, embedding).
TARGET_ORDER = ("all", "mlp", "embedding", *(c for c in COMPONENTS if c not in ("mlp", "embedding")))
_TARGET_NAMES = {"all": "entire model", "mlp": "MLP"}


def fmt(x: Any) -> str:
    """A table value: floats to 4 significant digits, "-" where missing or undefined (NaN)."""
    if x is None:
        return "-"
    if isinstance(x, bool | np.bool_):
        return "yes" if x else "no"
    if isinstance(x, int | np.integer):
        return str(int(x))
    if isinstance(x, float | np.floating):
        return "-" if math.isnan(x) else f"{float(x):.4g}"
    return str(x)


def fmt_rate(rate: float) -> str:
    """A BER as 1e-06, 3.16e-05: the mantissa without trailing zeros."""
    mantissa, exponent = f"{rate:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def fmt_invalid(value: float, digits: int = 4) -> str:
    """A ranked median: "nan"/"inf" for invalid cells, else ``digits`` significant digits."""
    if math.isnan(value):
        return "nan"
    return "inf" if math.isinf(value) else f"{value:.{digits}g}"


def cell_text(value: float) -> str:
    """Heatmap annotation: "nan"/"inf", "0" for zero, scientific below 0.01 or from 1000, else 2 digits.

    Small values keep their magnitude (3e-04, not "0.0"), so cells that differ by decades look different.
    """
    if not math.isfinite(value):
        return fmt_invalid(value)
    if value == 0:
        return "0"
    if abs(value) < 0.01 or abs(value) >= 1000:
        mantissa, exponent = f"{value:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.2g}"


def target_name(target: str) -> str:
    """A component target as the paper names it ("all" -> "entire model")."""
    return _TARGET_NAMES.get(target, target)


def ordered(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    """Unique values, those in ``preferred`` first in its order, the rest sorted."""
    uniq = set(values)
    return [v for v in preferred if v in uniq] + sorted(uniq - set(preferred))


def slug(*parts: str) -> str:
    """A file-name stem from ``parts``: lower case, runs of other characters as one "-"."""
    text = "-".join(p for p in parts if p)
    return re.sub(r"[^A-Za-z0-9.=]+", "-", text).strip("-").lower()[:80] or "all"


def table(points: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Select and rename ``columns`` and format every value as text (rates as BERs, ranked medians)."""
    shown = points[list(columns)].copy()
    out = pd.DataFrame(index=shown.index)
    for col, title in columns.items():
        fn = fmt_rate if col == "rate" else fmt_invalid if col == "ranked" else fmt
        out[title] = shown[col].map(fn).astype(str)
    return out.reset_index(drop=True)
