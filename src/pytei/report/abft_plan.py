"""Report section: what ABFT checks in each model, where each layer sits on the roofline, and what its
check costs (``ABFT.plan`` of every CTR model of ``pytei reproduce``, in ``Context.extras["abft_plan"]``)."""

from __future__ import annotations

import pandas as pd

from .document import Doc
from .format import table
from .sections import Context, register

__all__: list[str] = []


def summary(plan: pd.DataFrame) -> pd.DataFrame:
    """Per model: layers and parameter values checked / unchecked, layers per roofline bound, and the
    summed time of the checked layers and of their checks."""
    records = []
    for model, rows in plan.groupby("model", sort=False):
        checked = rows[rows["status"] == "checked"]
        called = checked[checked["layer_ms"].notna()]
        bounds = called["bound"].value_counts()
        layer_ms = float(called["layer_ms"].sum())
        check_ms = float((called["overhead"] * called["layer_ms"]).sum())  # of the scheme each layer runs
        records.append(
            {
                "model": model,
                "checked": len(checked),
                "unchecked": int((rows["status"] == "unchecked").sum()),
                "values": f"{int(checked['values'].sum()):,} of {int(rows['values'].sum()):,}",
                "memory": int(bounds.get("memory", 0)),
                "ambiguous": int(bounds.get("ambiguous", 0)),
                "compute": int(bounds.get("compute", 0)),
                "fused": int((called["scheme"] == "fused").sum()),
                "layer_ms": layer_ms,
                "check_ms": check_ms,
                "ratio": check_ms / layer_ms if layer_ms else float("nan"),
            }
        )
    return pd.DataFrame.from_records(records)


_SUMMARY = {
    "model": "model",
    "checked": "layers checked",
    "unchecked": "unchecked",
    "values": "parameter values checked",
    "memory": "memory-bound",
    "ambiguous": "ambiguous",
    "compute": "compute-bound",
    "fused": "fused",
    "layer_ms": "layers (ms)",
    "check_ms": "checks (ms)",
    "ratio": "check / layer",
}
_LAYERS = {
    "model": "model",
    "layer": "layer",
    "type": "type",
    "shape": "call",
    "intensity": "FLOP/byte",
    "bound": "bound",
    "scheme": "scheme",
    "layer_ms": "layer (ms)",
    "check_ms": "global check (ms)",
    "fused_ms": "fused layer + check (ms)",
}


@register("abft_plan", "ABFT coverage and cost per layer", before="definitions", extras=("abft_plan",))
def _abft_plan(doc: Doc, ctx: Context) -> None:
    plan = ctx.extras["abft_plan"]
    doc.text(
        "ABFT.plan of each model on a batch of its test split: every module holding parameters is checked "
        "(by its own checksum or by the layer that contains it) or listed unchecked with the reason. A "
        "checked layer's arithmetic intensity (FLOPs per byte moved) against this machine's measured "
        "balance (peak GEMM FLOP/s over memory bandwidth) makes it memory-bound (below half the "
        "balance), compute-bound (above twice) or ambiguous. ABFT(scheme='auto') runs the fused form (the "
        "checksum computed by the layer's own kernel call) on memory-bound layers, the global check on "
        "compute-bound ones, and the faster of the two, as measured, on ambiguous ones. Times are medians "
        "of 3 calls on one batch; 'checks (ms)' is the extra time of the scheme each layer runs."
    )
    doc.table(table(summary(plan), _SUMMARY), "ABFT coverage and check cost per model")
    unchecked = plan[plan["status"] == "unchecked"]
    if unchecked.empty:
        doc.note("Every parameterised layer of these models is checked.")
    else:
        cols = {"model": "model", "layer": "layer", "type": "type", "values": "values", "reason": "reason"}
        doc.table(table(unchecked, cols), "Unchecked layers")
    called = plan[(plan["status"] == "checked") & plan["layer_ms"].notna()]
    doc.table(table(called, _LAYERS), "Checked layers: roofline and measured cost")
