"""Distributed inference with sharded embedding tables: fault domains, placement strategies, recovery.

A TorchRec model's tables are sharded over ``world_size`` processes (ranks, one per emulated host) by a
named strategy (``STRATEGIES``) with TorchRec's ``DistributedModelParallel`` on the gloo backend over
loopback; ``ShardedGroup`` runs them and scores the test set under a trial's faults:

* global faults (any pytei error model): drawn on the *unsharded* model at the trial's seed and
  applied by whichever rank holds each faulty (table, row, column), so every strategy receives exactly
  the faults the unsharded model receives and gives the same outputs;
* host faults (``faults``): silent corruption, loss (with a fill, or rebuilt from XOR / sum parity or a
  replica: ``parity``), a stale host, a slow host.

Needs the optional extra ``pytei[torchrec]``.
"""

from __future__ import annotations

from ._group import DistributedError, Evaluation, ShardedGroup
from ._plan import GPU_ONLY, STRATEGIES, check_strategy
from .faults import FILLS, RECOVERIES, HostFault, HostLoss, HostSDC, HostSlow, HostStale

__all__ = [
    "FILLS",
    "GPU_ONLY",
    "RECOVERIES",
    "STRATEGIES",
    "DistributedError",
    "Evaluation",
    "HostFault",
    "HostLoss",
    "HostSDC",
    "HostSlow",
    "HostStale",
    "ShardedGroup",
    "check_strategy",
]
