"""Row preparation: the ok trials of a results table with the columns the sections group by.

Trial kinds and the dummy configuration are read from the columns the campaign stores at plan time
(``kind``; ``cfg_mlp_depth``, ``cfg_mlp_hidden``, ``cfg_embed_dim``, ... of a dummy model), never
parsed back out of target names or model keys: a component named ``v1.2`` stays a component.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import results
from ..campaign.store import KINDS

__all__ = ["CONFIG_COLUMNS", "KINDS", "METRIC_COLUMNS", "prepare"]

#: Dummy-model configuration columns (NaN for other models); hidden size and embedding dim span a heatmap.
CONFIG_COLUMNS = tuple(results.CONFIG_COLUMNS)
#: Metric columns the report reads (absent ones are NaN: not computed).
METRIC_COLUMNS = ("auc", "auc_valid", "invalid_frac", "logloss", "rmse", "rmse_valid", "baseline_auc")
_REQUIRED = ("status", "model", "dataset", "target", "kind", "rate", "mitigation")
_TEXT = ("model", "model_label", "dataset", "target", "mitigation", "error_model", "site", "params")
_VARIANT_COLUMNS = ("error_model", "site", "params", "bitset")


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """ok trials with BER > 0, plus derived columns.

    Adds: ``bit`` (the position of a single-position ``bits`` trial, else NaN), ``bitset``,
    ``per_bit``, ``per_parameter``, ``component`` (exactly one is true), ``labelled`` (the model has a
    baseline AUC), ``dummy`` (the model has a dummy configuration), ``invalid`` (share of invalid
    outputs), ``drop`` (baseline AUC - AUC, or RMSE for unlabelled models), ``variant`` and ``series``.
    Raises ValueError naming missing columns or an unknown kind.
    """
    missing = [c for c in _REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(
            f"the results table has no column(s) {missing}; load it with pytei.results.load (schema 2)"
        )
    ok = df[df["status"] == "ok"].copy()
    for col in ("rate", *METRIC_COLUMNS, *CONFIG_COLUMNS, "n_invalid", "n_outputs"):
        ok[col] = pd.to_numeric(ok[col], errors="coerce").astype(float) if col in ok else math.nan
    ok = ok[ok["rate"] > 0]
    for col in _TEXT:
        ok[col] = ok[col].fillna("").astype(str) if col in ok else ""
    ok["kind"] = ok["kind"].fillna("component").astype(str)
    unknown = sorted(set(ok["kind"]) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown trial kind(s) {unknown} in column 'kind'; allowed: {list(KINDS)}")
    bits = ok["bits"].map(_parse_bits) if "bits" in ok else pd.Series(None, index=ok.index, dtype=object)
    single = bits.map(lambda b: b is not None and len(b) == 1)
    ok["per_bit"] = (ok["kind"] == "bits") & single
    ok["bit"] = [float(b[0]) if s else math.nan for b, s in zip(bits, ok["per_bit"], strict=True)]
    ok["bitset"] = bits.map(_bitset_label).astype(str)
    ok["per_parameter"] = ok["kind"] == "parameter"
    ok["component"] = ~ok["per_bit"] & ~ok["per_parameter"]
    ok["labelled"] = ok["model"].map(ok.groupby("model")["baseline_auc"].count() > 0).astype(bool)
    ok["dummy"] = ok["cfg_mlp_hidden"].notna() & ok["cfg_embed_dim"].notna()
    share = ok["n_invalid"] / ok["n_outputs"].where(ok["n_outputs"] > 0)
    ok["invalid"] = ok["invalid_frac"].where(ok["invalid_frac"].notna(), share)
    ok["drop"] = np.where(ok["labelled"], ok["baseline_auc"] - ok["auc"], ok["rmse"])
    ok["variant"] = _variants(ok)
    ok["series"] = _names(ok) + ok["variant"].map(lambda v: f" ({v})" if v else "")
    return ok


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


def short_key(key: str) -> str:
    """A model key for display: the last two path parts of a checkpoint, the rest of other keys."""
    kind, _, rest = key.partition(":")
    return "/".join(Path(rest).parts[-2:]) if kind == "ckpt" else (rest or key)


def _variants(ok: pd.DataFrame) -> pd.Series:
    """The error model, site, params and bit set of a row, naming only those that vary in the campaign."""
    whole_word = ok[~ok["per_bit"]]
    varying = [c for c in _VARIANT_COLUMNS if whole_word[c].nunique() > 1]
    if not varying:
        return pd.Series("", index=ok.index, dtype=str)
    return ok[varying].apply(lambda r: ", ".join(f"{c}={r[c]}" for c in varying), axis=1).astype(str)


def _names(ok: pd.DataFrame) -> pd.Series:
    """model_label, with a short model key appended where one label names several models of a data set."""
    label = ok["model_label"].where(ok["model_label"] != "", ok["model"].map(short_key))
    if ok.empty:
        return label
    keys = ok.groupby(["model_label", "dataset"])["model"].transform("nunique")
    return label.where(keys <= 1, label + " [" + ok["model"].map(short_key) + "]")
