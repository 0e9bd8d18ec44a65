"""Report section: distributed inference with sharded tables (the trials of a campaign's sharded models,
such as ``pytei.distributed_study``'s, in ``Context.extras["distributed"]``): AUC loss and latency per
placement strategy and host fault, the blast radius of one faulty host, and what recovering a lost
host costs."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from . import figures
from .document import Doc
from .format import table
from .sections import Context, register

__all__ = ["fault_summary", "recovery_summary"]


def _config(config: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(config) if isinstance(config, str) else dict(config or {})
    return out


def _strategy(trials: pd.DataFrame) -> pd.Series:
    """``table_wise x2``: the strategy and the world size of each trial (and its requests' pooling)."""

    def one(config: Any) -> str:
        c = _config(config)
        pooling = f" pooling {c['pooling']}" if c.get("pooling", 1) != 1 else ""
        return f"{c.get('strategy', '?')} x{c.get('world_size', '?')}{pooling}"

    return trials["model_config"].map(one)


def _fault(label: str, site: str, rate: float) -> str:
    """A fault without its rank (``HostLoss(rank=1, fill=zeros)`` -> ``HostLoss(fill=zeros)``), with its
    rate where it has one; faults of every table (site ``weights``) are ``global``."""
    name, args = label[:-1].split("(", 1) if "(" in label else (label, "")
    kept = [a for a in args.split(", ") if a and not a.startswith("rank=")]
    shown = f"{name}({', '.join(kept)})" if kept else name
    shown = f"global {shown}" if site == "weights" else shown
    return f"{shown} @ {rate:.0e}" if rate else shown


#: Metrics of sharded trials that only some faults have (``pytei.campaign.sharded``).
_MEASURED = (
    "blast_samples", "blast_tables", "p50_ms", "p99_ms", "baseline_p50_ms", "baseline_p99_ms",
    "storage_overhead", "rebuild_ms", "rebuilt_exactly", "recovered_share",
)  # fmt: skip


def _prepared(trials: pd.DataFrame) -> pd.DataFrame:
    ok = trials[trials["status"] == "ok"].copy()
    for column in _MEASURED:  # a campaign without slow hosts or recoveries has no such metric
        if column not in ok:
            ok[column] = float("nan")
    ok["strategy"] = _strategy(ok)
    ok["fault"] = [_fault(*x) for x in zip(ok["error_model"], ok["site"], ok["rate"], strict=True)]
    ok["loss"] = ok["baseline_auc"] - ok["auc"]
    return ok


def fault_summary(trials: pd.DataFrame) -> pd.DataFrame:
    """Per strategy and fault (no recovery), over ranks and runs: AUC loss (mean, worst), blast radius
    (samples whose logit changed, tables on the faulty host) and latency (P50/P99 where measured); first
    per strategy the fault-free baseline (``none``)."""
    ok = _prepared(trials)
    base = (
        ok.groupby("strategy", sort=False)
        .agg(auc=("baseline_auc", "mean"), p50=("baseline_p50_ms", "mean"), p99=("baseline_p99_ms", "mean"))
        .reset_index()
        .assign(fault="none", trials=float("nan"), loss=0.0, worst=0.0, samples=0.0, tables=0.0)
    )
    ok = ok[ok["mitigation"] == "none"]
    faults = (
        ok.groupby(["strategy", "fault"], sort=False)
        .agg(
            trials=("trial_id", "size"),
            auc=("auc", "mean"),
            loss=("loss", "mean"),
            worst=("loss", "max"),
            samples=("blast_samples", "mean"),
            tables=("blast_tables", "mean"),
            p50=("p50_ms", "mean"),
            p99=("p99_ms", "mean"),
        )
        .reset_index()
    )
    out = pd.concat([base, faults], ignore_index=True)[list(faults.columns)]
    order = {s: i for i, s in enumerate(dict.fromkeys(out["strategy"]))}
    return out.sort_values("strategy", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)


def recovery_summary(trials: pd.DataFrame) -> pd.DataFrame:
    """Per strategy, loss (one host or several) and recovery: storage overhead, rebuild time, whether the
    shards came back bit for bit, the share of lost hosts rebuilt, and the AUC after recovery against
    the fault-free baseline."""
    ok = _prepared(trials)
    ok = ok[ok["mitigation"] != "none"]
    return (
        ok.groupby(["strategy", "fault", "mitigation"], sort=False)
        .agg(
            trials=("trial_id", "size"),
            overhead=("storage_overhead", "mean"),
            rebuild=("rebuild_ms", "mean"),
            exact=("rebuilt_exactly", "mean"),
            recovered=("recovered_share", "mean"),
            loss=("loss", "max"),
            samples=("blast_samples", "mean"),
        )
        .reset_index()
    )


_FAULTS = {
    "strategy": "strategy",
    "fault": "fault",
    "trials": "trials",
    "auc": "AUC",
    "loss": "AUC loss (mean)",
    "worst": "AUC loss (worst rank)",
    "samples": "samples changed",
    "tables": "tables on the host",
    "p50": "P50 ms",
    "p99": "P99 ms",
}
_RECOVERY = {
    "strategy": "strategy",
    "fault": "lost",
    "mitigation": "recovery",
    "trials": "trials",
    "overhead": "storage overhead",
    "rebuild": "rebuild ms",
    "exact": "bit-exact share",
    "recovered": "hosts rebuilt",
    "loss": "AUC loss after (worst)",
    "samples": "samples changed",
}


@register("distributed", "Distributed inference", before="definitions", extras=("distributed",))
def _distributed(doc: Doc, ctx: Context) -> None:
    trials = ctx.extras["distributed"]
    ok = _prepared(trials)
    if ok.empty:
        doc.note("The distributed-inference study has no finished trials.")
        return
    world = sorted({int(_config(c)["world_size"]) for c in ok["model_config"]})
    doc.text(
        f"One trained model ({', '.join(sorted(set(ok['architecture'])))} on "
        f"{', '.join(sorted(set(ok['dataset'])))}) served by {', '.join(map(str, world))} processes with "
        "its embedding tables sharded by each strategy (TorchRec DistributedModelParallel, gloo on "
        "loopback). 'none': fault-free. 'global': the error model over every table, the same faults the "
        "unsharded model gets at that seed. Host faults, one rank at a time: HostSDC (that host's "
        "share of the same faults), "
        "HostLoss (its lookups served as zeros or each table's mean row), HostStale (its shards from an "
        "older checkpoint), HostSlow (its lookups late: latency only). 'samples changed': share of "
        "scored samples whose logit differs from the fault-free one; 'tables on the host': share of "
        "tables with a shard on the faulty host. Latency: batched requests, a request done when its "
        "slowest rank is. 'x2' / 'x4': the number of processes (hosts)."
    )
    faults = fault_summary(trials)
    doc.table(table(faults, _FAULTS), "AUC loss, blast radius and latency per strategy and fault")
    recovery = recovery_summary(trials)
    if not recovery.empty:
        doc.text(
            "A lost host rebuilt before it serves: 'xor' from XOR parity of every host's raw shard bytes "
            "kept on another host (exact; 'xor/g2': one parity block per group of 2 hosts, as ECRM), "
            "'sum' from sum parity of the values (rounded once per addition), 'replica' from a copy of "
            "its shards on another host. Storage overhead: the parity blocks' size (or the replicas', "
            "one of every host) over all shards."
        )
        doc.table(table(recovery, _RECOVERY), "Recovery of a lost host")
    path = doc.figure_path("fig-distributed-auc-loss")
    figures.save(path, "AUC loss of one faulty host, per placement strategy", _figure, faults)
    doc.image(path, "AUC loss per host fault, one bar per strategy.")


def _figure(faults: pd.DataFrame) -> Figure:
    """Grouped bars: mean AUC loss per fault (x), one bar per strategy."""
    shown = faults[faults["fault"] != "none"]
    labels = list(dict.fromkeys(shown["fault"]))
    strategies = list(dict.fromkeys(shown["strategy"]))
    fig = figures.new_figure(8.0, 4.0)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(strategies))
    for i, strategy in enumerate(strategies):
        part = shown[shown["strategy"] == strategy].set_index("fault")
        values = [float(part.loc[f, "loss"]) if f in part.index else 0.0 for f in labels]
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=strategy)
    ax.set_xticks([x + width * (len(strategies) - 1) / 2 for x in range(len(labels))])
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("AUC loss (fault-free - faulty)")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.legend(fontsize=8)
    return fig
