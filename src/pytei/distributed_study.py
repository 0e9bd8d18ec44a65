"""The distributed-inference study: which table placement contains one faulty host best, and what does
recovering it cost? (``pytei reproduce --preset distributed``, ``pytei distributed``; needs
``pytei[torchrec]``.)

The study is a campaign (``pytei.campaign``): ``spec`` writes it as a spec, one ``sharded`` model
(every strategy of ``sizes.strategies`` at every world size) with ``host_faults``, and ``run_study``
runs it into a results database (resumable: a trial already stored is not run again; the database is
bound to the spec and the checkpoints' contents), so ``pytei campaign run`` on the written spec does
the same. Per strategy and world size:

* the spec's error point at the ``weights`` site: BitFlip at ``ber`` over every embedding table, the
  same faults the unsharded model gets at that seed (so every strategy sees the same faults);
* per rank: ``HostSDC`` (the rank's share of those faults), ``HostLoss`` served as each fill,
  ``HostLoss`` rebuilt by each recovery (XOR parity, sum parity, a replica, XOR parity in groups of
  ``parity_groups`` hosts), ``HostStale`` (the
  model's older checkpoint, when given), ``HostSlow`` (its lookups ``slow_ms`` late).

A trial's row carries the strategy and world size (``model_config``), the fault (``error_model``,
``site="host"`` for host faults), the recovery (``mitigation``) and the metrics of
``pytei.campaign.sharded`` (AUC and its baseline, blast radius, latency, recovery cost).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import tomli_w
from rich.console import Console

__all__ = ["DistributedSizes", "run_study", "spec"]


@dataclass(frozen=True)
class DistributedSizes:
    """What the study sweeps, and how much of the test set it scores."""

    strategies: tuple[str, ...] = ("table_wise", "column_wise", "table_column_wise", "data_parallel")
    world_sizes: tuple[int, ...] = (2,)
    ber: float = 1e-3
    runs: int = 2
    fills: tuple[str, ...] = ("zeros", "mean")
    recoveries: tuple[str, ...] = ("xor", "sum", "replica")
    parity_groups: tuple[int, ...] = (2,)
    """XOR parity in groups of this many hosts (ECRM), besides one group of every host (``xor``)."""
    slow_ms: float = 5.0
    batch_size: int = 256
    test_rows: int | None = 2000
    latency_batch: int = 128
    latency_requests: int = 30
    latency_pooling: int = 1
    """Ids per bag of the timed requests (each row's own and random ones): their sparsity."""


def spec(
    checkpoint: str | Path, sizes: DistributedSizes = DistributedSizes(), stale: str | Path | None = None
) -> str:
    """The study as a campaign spec (TOML text, absolute paths)."""
    faults: list[Any] = ["HostSDC"]
    faults += [{"name": "HostLoss", "fill": f} for f in sizes.fills]
    faults += [{"name": "HostLoss", "recover": r} for r in sizes.recoveries]
    faults += [{"name": "HostLoss", "recover": "xor", "group": g} for g in sizes.parity_groups]
    if stale is not None:
        faults.append({"name": "HostStale", "checkpoint": str(Path(stale).resolve())})
    faults.append({"name": "HostSlow", "delay_ms": float(sizes.slow_ms)})
    model = {
        "sharded": str(Path(checkpoint).resolve()),
        "strategies": list(sizes.strategies),
        "world_sizes": list(sizes.world_sizes),
        "batch_size": sizes.batch_size,
        "latency": {
            "batch": sizes.latency_batch,
            "requests": sizes.latency_requests,
            "pooling": sizes.latency_pooling,
        },
    }
    document = {
        "name": "distributed-inference",
        "seed": 0,
        "runs": sizes.runs,
        "metrics": ["auc", "logloss"],
        "targets": ["embedding"],
        "host_faults": faults,
        "models": [model],
        "data": {"max_rows": sizes.test_rows or 0},
        "errors": {"model": "BitFlip", "rates": [float(sizes.ber)]},
    }
    return tomli_w.dumps(document)


def run_study(
    checkpoint: str | Path,
    db: str | Path,
    sizes: DistributedSizes = DistributedSizes(),
    *,
    stale: str | Path | None = None,
    console: Console | None = None,
) -> pd.DataFrame:
    """Run (or resume) the study of ``checkpoint`` (and its older version ``stale``) into ``db``;
    returns every trial (``pytei.results.load``)."""
    from .campaign.execute import run_campaign
    from .campaign.spec import parse_spec
    from .results import load

    parsed = parse_spec(spec(checkpoint, sizes, stale))
    result = run_campaign(parsed, db, progress=console is not None)
    if console is not None:
        console.print(
            f"distributed inference: {result.planned} trials planned, {result.skipped} stored, "
            f"{result.ran} run ({result.failed} failed)",
            markup=False,
        )
    return load(db)
