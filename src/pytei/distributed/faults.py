"""Host-level faults of a sharded model: what one faulty host does to the shards it holds.

A hardware error in distributed inference lives on one host. Each fault names the ``rank`` (host)
and what goes wrong there:

* ``HostSDC(rank, error)``: silent data corruption of that host's memory: any pytei error model
  applied to the table shards (and replicas) the rank holds. The faults are drawn on the unsharded
  model's tables with the trial's seed, so a global trial and a host trial of the same seed agree on
  every fault the host holds.
* ``HostLoss(rank, fill)``: the host is gone; its lookups are served as ``fill`` (``"zeros"``, each
  table's ``"mean"`` row, or its ``"default_row"``, row 0), as a serving system degrades, unless
  ``recover`` rebuilds its shards first: ``"xor"`` from XOR parity of the raw bytes (exact),
  ``"sum"`` from sum parity of the values (rounded), ``"replica"`` from a copy on another host.
* ``HostStale(rank, checkpoint)``: the host serves its shards from an older checkpoint of the model.
* ``HostSlow(rank, delay_ms, jitter_ms)``: the host's lookups take ``delay_ms`` longer (plus an
  exponential jitter of mean ``jitter_ms``, seeded): latency only, outputs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ErrorModel
from ..exceptions import ArgumentError

__all__ = ["FILLS", "RECOVERIES", "HostFault", "HostLoss", "HostSDC", "HostSlow", "HostStale"]

#: What a lost host's lookups return.
FILLS = ("zeros", "mean", "default_row")
#: How a lost host's shards are rebuilt before they are read.
RECOVERIES = ("xor", "sum", "replica")


@dataclass(frozen=True)
class HostFault:
    """A fault confined to one host (``rank``)."""

    rank: int

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ArgumentError(f"{type(self).__name__}.rank must be an int >= 0, got {self.rank!r}")

    def check_world(self, world_size: int) -> None:
        """An ``ArgumentError`` unless ``rank`` is a rank of a group of ``world_size``."""
        if self.rank >= world_size:
            raise ArgumentError(
                f"{type(self).__name__}.rank {self.rank} is not a rank of a world of {world_size} "
                f"(0..{world_size - 1})"
            )


@dataclass(frozen=True)
class HostSDC(HostFault):
    error: ErrorModel

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.error, ErrorModel):
            raise ArgumentError(f"HostSDC.error must be a pytei error model, got {self.error!r}")


@dataclass(frozen=True)
class HostLoss(HostFault):
    fill: str = "zeros"
    recover: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fill not in FILLS:
            raise ArgumentError(f"unknown HostLoss fill {self.fill!r}; allowed: {', '.join(FILLS)}")
        if self.recover is not None and self.recover not in RECOVERIES:
            raise ArgumentError(
                f"unknown HostLoss recovery {self.recover!r}; allowed: {', '.join(RECOVERIES)} (or none)"
            )


@dataclass(frozen=True)
class HostStale(HostFault):
    checkpoint: str | Path

    def __post_init__(self) -> None:
        super().__post_init__()
        if not Path(self.checkpoint).is_dir():
            raise ArgumentError(f"HostStale.checkpoint {str(self.checkpoint)!r} is not a checkpoint folder")


@dataclass(frozen=True)
class HostSlow(HostFault):
    delay_ms: float
    jitter_ms: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("delay_ms", "jitter_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 60_000:
                raise ArgumentError(f"HostSlow.{name} must be milliseconds in [0, 60000), got {value!r}")
