"""The trials of a sharded model (``sharded = "dir"`` in a spec): run on a group of rank processes.

``ShardedRunner`` starts a ``pytei.distributed.ShardedGroup`` for one (checkpoint, strategy, world
size), scores the fault-free outputs and measures the fault-free latency once, then runs each trial
on the ranks: an error point at the ``weights`` site (drawn on the unsharded model, applied where each
faulty value lives) or a host fault at the ``host`` site. Metrics are those of the spec (scored on the
raw logits against the test labels, as for any model), plus what distributed inference adds:

* ``blast_samples``: share of scored samples whose logit changed; for host faults ``blast_tables``:
  share of the tables with a shard on the faulty host;
* ``p50_ms`` / ``p99_ms``: latency of batched requests under a slow host; ``baseline_p50_ms`` /
  ``baseline_p99_ms``: without faults (every trial carries them);
* for a lost host rebuilt before it serves: ``storage_overhead``, ``rebuild_ms``, ``rebuilt_exactly``
  and ``recovered_share`` (of the hosts lost together, those the survivors could rebuild).

A rank that dies fails the trial in flight (its row says which rank); the next trial starts the
group afresh. Under ``torchrun`` (``pytei.distributed.launch``) a dead rank stops the campaign
instead (the launch's process group is broken): the trial in flight is not stored, and the campaign
resumes when torchrun restarts the processes. Every ``VERIFY_EVERY`` trials, and when the runner is
done, each rank's digest of what it holds is compared with its clean one: a restore that left
anything changed fails loudly.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from .. import metrics
from ..distributed import DistributedError, HostSlow, ShardedGroup
from ..distributed.faults import HostFault, host_faults
from ..distributed.launch import LaunchBroken
from .plan import HOST_SITE, Trial, build_error
from .runner import VERIFY_EVERY, failed_row, runners, trial_row
from .spec import make_error
from .store import TrialRow

__all__ = ["ShardedRunner", "host_fault"]


def host_fault(error: dict) -> HostFault:
    """The host fault a host trial's ``error`` dict describes (``HostFaultChoice.fault_dict``)."""
    cls = host_faults.get(str(error["model"]))
    kwargs = {k: v for k, v in error.items() if k != "model"}
    if cls.takes_error:
        kwargs["error"] = make_error(kwargs["error"])
    return cls(**kwargs)


class ShardedRunner:
    """The sharded model of ``trial``'s model spec, served by its ranks while trials run."""

    def __init__(self, trial: Trial) -> None:
        from ..checkpoint import load_checkpoint
        from .sources import _architecture

        spec = trial.model_spec
        self.key = trial.model
        self.checkpoint = Path(spec["sharded"])
        meta = load_checkpoint(self.checkpoint, with_data=False).meta
        self.label, self.dataset = _architecture(meta), str(meta["data"]["name"])
        self._make = lambda: ShardedGroup(
            self.checkpoint,
            spec["strategy"],
            int(spec["world_size"]),
            batch_size=int(spec["batch_size"]),
            test_rows=int(spec["max_rows"]) or None,
        )
        self.where = trial.model.rsplit(":", 1)[-1]  # table_wise x2 (pooling 8)
        self.latency_batch, self.latency_requests, self.pooling = (int(v) for v in spec["latency"])
        self.group: ShardedGroup | None = None
        self.trials_since_check = 0
        self._scorers: dict[tuple[str, ...], tuple[metrics.Scorer, dict[str, float]]] = {}
        group = self._start()
        try:  # measured once: a group started again after a failure holds the same model
            base = group.evaluate()
            self.clean, self.labels = base.logits, base.labels
            latency = group.latency(
                batch=self.latency_batch, requests=self.latency_requests, pooling=self.pooling
            )
            self.base_latency = {f"baseline_{k}": v for k, v in latency.items() if k != "mean_ms"}
            self.digests = group.digests()
        except BaseException:
            self.close()
            raise

    def _start(self) -> ShardedGroup:
        """The running group (started now if a failure closed it)."""
        if self.group is None:
            group = self._make()
            group.start()
            self.group = group
        return self.group

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None

    def verify(self) -> None:
        """Fail loudly if any rank holds anything other than its clean shards (restore drift)."""
        self.trials_since_check = 0
        if self.group is not None and self.group.digests() != self.digests:
            raise RuntimeError(f"a rank of {self.key} drifted from its clean shards: restore failed")

    def run(self, trial: Trial) -> TrialRow:
        """Run one trial; one that raises (a dead rank included) is returned as a failed row."""
        started = time.time()
        try:
            row = self._run(trial, started)
        except LaunchBroken:  # a launch's rank is gone: every process stops, torchrun restarts them
            raise
        except DistributedError as err:  # the group is closed: the next trial starts a new one
            self.group = None
            row = failed_row(trial, started, err, self)
        except Exception as err:  # recorded, not fatal: one bad trial must not end a campaign
            row = failed_row(trial, started, err, self)
        self.trials_since_check += 1
        if self.trials_since_check >= VERIFY_EVERY:
            self.verify()
        return dataclasses.replace(row, model_label=f"{row.model_label} {self.where}")

    def _scorer(self, trial: Trial) -> tuple[metrics.Scorer, dict[str, float]]:
        """The scorer of the trial's metrics and its scores of the fault-free outputs (made once)."""
        if trial.metrics not in self._scorers:
            scorer = metrics.Scorer(self.labels, self.clean, metrics=trial.metrics, clean=self.clean)
            self._scorers[trial.metrics] = (
                scorer,
                scorer(self.clean, changed=torch.empty(0, dtype=torch.int64)),
            )
        return self._scorers[trial.metrics]

    def _run(self, trial: Trial, started: float) -> TrialRow:
        group = self._start()
        extra: dict[str, float] = {}
        if trial.site == HOST_SITE:
            fault = host_fault(trial.error)
            if isinstance(fault, HostSlow):
                extra.update(
                    group.latency(
                        batch=self.latency_batch,
                        requests=self.latency_requests,
                        fault=fault,
                        pooling=self.pooling,
                    )
                )
            ev = group.evaluate(fault=fault, seed=trial.seed)
            tables = group.all_tables()
            hit = {t for r in fault.lost(group.world_size) for t in group.tables_on(r)}
            extra["blast_tables"] = len(hit) / len(tables) if tables else 0.0
        elif trial.site == "weights":
            ev = group.evaluate(build_error(trial), seed=trial.seed, **trial.target_spec)
        else:
            raise ValueError(f"a sharded model runs the weights and host sites, not {trial.site!r}")
        scorer, base = self._scorer(trial)
        changed = torch.nonzero(ev.logits.view(torch.int32) != self.clean.view(torch.int32)).reshape(-1)
        got = scorer(ev.logits, changed=changed)
        values = {k: v for k, v in got.items() if k not in ("n", "n_invalid")}
        values["invalid_frac"] = got["n_invalid"] / max(got["n"], 1)
        values.update({f"baseline_{k}": v for k, v in base.items() if k not in ("n", "n_invalid")})
        values["blast_samples"] = changed.numel() / max(ev.logits.numel(), 1)
        values.update(extra)
        values.update(self.base_latency)
        if ev.recovery:
            values["storage_overhead"] = float(ev.recovery["storage_overhead"])
            values["rebuild_ms"] = float(ev.recovery["rebuild_s"]) * 1e3
            exact = ev.recovery["exact"]
            values["rebuilt_exactly"] = float("nan") if exact is None else float(exact)
            values["recovered_share"] = float(ev.recovery["recovered"])
        return trial_row(
            trial,
            started,
            self,
            status="ok",
            n_faults=ev.faults,
            n_invalid=int(got["n_invalid"]),
            n_outputs=int(got["n"]),
            metrics=values,
            extra={"path": "sharded", "applied": ev.applied, "eval_s": ev.seconds},
        )


runners("sharded", ShardedRunner)
