"""The distributed-inference study: which table placement contains one faulty host best, and what does
recovering it cost? (``pytei reproduce --preset distributed``; needs ``pytei[torchrec]``.)

A trained TorchRec model is sharded over ``world_size`` ranks by each strategy
(``pytei.distributed.STRATEGIES`` that run on CPU). Per strategy:

* the fault-free baseline: AUC, and P50/P99 latency of batched requests;
* ``global``: BitFlip at ``ber`` over every embedding table, the same faults the unsharded model
  gets at that seed (so every strategy sees the same faults);
* per rank: ``HostSDC`` (the rank's share of those faults), ``HostLoss`` served as each fill,
  ``HostLoss`` rebuilt by each recovery (XOR parity, sum parity, a replica), ``HostStale`` (the
  model's older checkpoint, when given), ``HostSlow`` (its lookups ``slow_ms`` late).

Each is one trial in a results database (resumable: a trial already stored is not run again; the
database is bound to the study's settings and the checkpoints' contents). A trial's row carries the
strategy and world size (``model_config``), the host fault (``error_model``, ``site="host"``), the
recovery (``mitigation``), and its metrics: ``auc``, ``baseline_auc``, ``invalid_share``, the blast
radius (``blast_samples``: share of scored samples whose logit changed; ``blast_tables``: share of
tables with a shard on the faulty host), latency ``p50_ms``/``p99_ms`` (with the fault, for slow
hosts and baselines), and for recoveries ``storage_overhead`` and ``rebuild_ms``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from .campaign.fingerprint import checkpoint_fingerprint
from .campaign.plan import run_seed
from .campaign.store import Store, TrialRow
from .errors import BitFlip

__all__ = ["DistributedSizes", "Task", "run_study", "tasks"]


@dataclass(frozen=True)
class DistributedSizes:
    """What the study sweeps, and how much of the test set it scores."""

    strategies: tuple[str, ...] = ("table_wise", "column_wise", "table_column_wise", "data_parallel")
    world_sizes: tuple[int, ...] = (2,)
    ber: float = 1e-3
    runs: int = 2
    fills: tuple[str, ...] = ("zeros", "mean")
    recoveries: tuple[str, ...] = ("xor", "sum", "replica")
    slow_ms: float = 5.0
    batch_size: int = 256
    test_rows: int | None = 2000
    latency_batch: int = 128
    latency_requests: int = 30


@dataclass(frozen=True)
class Task:
    """One trial of the study on one strategy: what goes wrong, where, with which seed."""

    fault: str  # "baseline", "global", "HostSDC", "HostLoss", "HostStale", "HostSlow"
    rank: int | None = None
    fill: str | None = None
    recover: str | None = None
    run: int = 0

    @property
    def label(self) -> str:
        """The fault as the results name it (``error_model``)."""
        if self.rank is None:
            return self.fault
        extra = "".join(f", {k}={v}" for k, v in (("fill", self.fill),) if v is not None)
        return f"{self.fault}(rank={self.rank}{extra})"


def tasks(sizes: DistributedSizes, world_size: int, stale: bool) -> Iterator[Task]:
    """The trials of one strategy on ``world_size`` ranks, in the order they run."""
    yield Task("baseline")
    for run in range(sizes.runs):
        yield Task("global", run=run)
    for rank in range(world_size):
        for run in range(sizes.runs):
            yield Task("HostSDC", rank, run=run)
        for fill in sizes.fills:
            yield Task("HostLoss", rank, fill=fill)
        for recover in sizes.recoveries:
            yield Task("HostLoss", rank, fill="zeros", recover=recover)
        if stale:
            yield Task("HostStale", rank)
        yield Task("HostSlow", rank)


def _seed(run: int) -> int:
    """The injection seed of run ``run``: the campaigns' (``run_seed``) with spec seed 0."""
    return run_seed(0, run)


def _trial_id(settings: dict[str, Any], where: tuple[str, int], task: Task) -> str:
    strategy, world = where
    fields = {**settings, "strategy": strategy, "world_size": world, "task": asdict(task)}
    key = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:24]


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
    from .checkpoint import load_checkpoint
    from .distributed import check_strategy
    from .results import load

    console = console or Console()
    for s in sizes.strategies:
        check_strategy(s)
    ckpt = load_checkpoint(checkpoint, with_data=False)
    prints = {str(checkpoint): checkpoint_fingerprint(checkpoint) or ""}
    if stale is not None:
        prints[str(stale)] = checkpoint_fingerprint(stale) or ""
    settings = {"sizes": asdict(sizes), "fingerprints": prints}
    text = json.dumps(settings, sort_keys=True, default=str)
    groups = [(s, w) for w in sizes.world_sizes for s in sizes.strategies]
    planned = [(g, t) for g in groups for t in tasks(sizes, g[1], stale is not None)]
    with Store(db) as store:
        store.attach_spec(
            text, hashlib.sha256(text.encode()).hexdigest(), "distributed-inference", len(planned),
            fingerprints=prints,
        )  # fmt: skip
        done = store.done_ids()
        todo = [(s, t) for s, t in planned if _trial_id(settings, s, t) not in done]
        stored = len(planned) - len(todo)
        console.print(f"distributed inference: {len(planned)} trials planned, {stored} stored", markup=False)
        context = {
            "model": Path(checkpoint).name,
            "architecture": ckpt.meta["model"]["name"],
            "dataset": ckpt.meta["data"]["name"],
        }
        for where in groups:
            mine = [t for g, t in todo if g == where]
            if mine:
                _run_group(checkpoint, where, mine, sizes, settings, stale, context, store, console)
    return load(db)


def _run_group(
    checkpoint: str | Path,
    where: tuple[str, int],
    todo: list[Task],
    sizes: DistributedSizes,
    settings: dict[str, Any],
    stale: str | Path | None,
    context: dict[str, str],
    store: Store,
    console: Console,
) -> None:
    """The trials ``todo`` of one (strategy, world size) on one group of ranks (restarted after a rank
    fails)."""
    from .distributed import DistributedError, ShardedGroup

    strategy, world = where
    t0 = time.monotonic()
    pending = list(todo)
    while pending:  # each failure takes one trial off: a group that cannot start fails them all
        group = ShardedGroup(
            checkpoint, strategy, world, batch_size=sizes.batch_size, test_rows=sizes.test_rows
        )
        started = time.time()
        try:
            group.start()
            base = group.evaluate()
            base_auc = base.metrics()["auc"]
            base_latency = group.latency(batch=sizes.latency_batch, requests=sizes.latency_requests)
            while pending:
                started = time.time()
                metrics, n_faults = _measure(group, pending[0], sizes, stale, base, base_latency)
                row = _row(context, settings, where, sizes, pending[0], started, "ok", None)
                store.record(_with(row, metrics, base_auc, n_faults, base.logits.numel()))
                pending.pop(0)
        except DistributedError as err:  # the group is closed: the trial in flight failed
            failed = _row(context, settings, where, sizes, pending.pop(0), started, "failed", str(err))
            store.record(failed)
        finally:
            group.close()
    seconds = time.monotonic() - t0
    console.print(f"  {strategy} x{world}: {len(todo)} trials in {seconds:.1f} s", markup=False)


def _measure(
    group: Any, task: Task, sizes: DistributedSizes, stale: Any, base: Any, base_latency: dict[str, float]
) -> tuple[dict[str, float], int]:
    """The metrics of one trial on a running group, and its fault count."""
    from .distributed import HostLoss, HostSDC, HostSlow, HostStale

    metrics: dict[str, float] = {}
    seed = _seed(task.run)
    if task.fault == "baseline":
        ev = base
        metrics.update(base_latency)
    elif task.fault == "global":
        ev = group.evaluate(BitFlip(sizes.ber), seed=seed)
    else:
        assert task.rank is not None
        fault: Any
        if task.fault == "HostSDC":
            fault = HostSDC(task.rank, BitFlip(sizes.ber))
        elif task.fault == "HostLoss":
            fault = HostLoss(task.rank, task.fill or "zeros", recover=task.recover)
        elif task.fault == "HostStale":
            fault = HostStale(task.rank, stale)
        else:
            fault = HostSlow(task.rank, sizes.slow_ms)
            metrics.update(
                group.latency(batch=sizes.latency_batch, requests=sizes.latency_requests, fault=fault)
            )
        ev = group.evaluate(fault=fault, seed=seed)
        tables = group.all_tables()
        metrics["blast_tables"] = len(group.tables_on(task.rank)) / len(tables) if tables else 0.0
    metrics.update(ev.metrics())
    changed = ~((ev.logits == base.logits) | (ev.logits.isnan() & base.logits.isnan()))
    metrics["blast_samples"] = float(changed.double().mean())
    if ev.recovery:
        metrics["storage_overhead"] = float(ev.recovery["storage_overhead"])
        metrics["rebuild_ms"] = float(ev.recovery["rebuild_s"]) * 1e3
        metrics["rebuilt_exactly"] = float(ev.recovery["exact"])
    return metrics, ev.faults


def _row(
    context: dict[str, str],
    settings: dict[str, Any],
    where: tuple[str, int],
    sizes: DistributedSizes,
    task: Task,
    started: float,
    status: str,
    message: str | None,
) -> TrialRow:
    strategy, world = where
    finished = time.time()
    rate = sizes.ber if task.fault in ("global", "HostSDC") else 0.0
    return TrialRow(
        trial_id=_trial_id(settings, where, task),
        model=context["model"],
        model_label=f"{context['architecture']} {strategy} x{world}",
        architecture=context["architecture"],
        dataset=context["dataset"],
        target="embedding",
        params="weight",
        site="weights" if task.fault in ("baseline", "global") else "host",
        kind="component",
        model_config={"strategy": strategy, "world_size": world},
        error_model=task.label,
        rate=rate,
        bits=None,
        run=task.run,
        seed=_seed(task.run),
        mitigation=task.recover or "none",
        status=status,
        error_message=message,
        started=started,
        finished=finished,
        duration_s=finished - started,
    )


def _with(row: TrialRow, metrics: dict[str, float], base_auc: float, n_faults: int, n: int) -> TrialRow:
    invalid = int(round(metrics.get("invalid_share", 0.0) * n))
    return replace(
        row,
        metrics={**metrics, "baseline_auc": base_auc},
        n_faults=n_faults,
        n_invalid=invalid,
        n_outputs=n,
    )
