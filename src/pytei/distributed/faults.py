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

``host_faults`` registers them by name for campaign specs (``host_faults = ["HostSDC", { name =
"HostLoss", fill = "mean" }]``); a plugin registers its own ``HostFault`` subclass the same way.
A fault's ``label`` is how results name it: its class and the options that tell it apart, the
recovery and the inner error model left out (results keep those in ``mitigation`` and ``rate``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from .._registry import Registry, short
from ..errors import ErrorModel
from ..exceptions import ArgumentError

__all__ = [
    "FILLS",
    "RECOVERIES",
    "HostFault",
    "HostLoss",
    "HostSDC",
    "HostSlow",
    "HostStale",
    "host_faults",
]

#: What a lost host's lookups return.
FILLS = ("zeros", "mean", "default_row")
#: How a lost host's shards are rebuilt before they are read.
RECOVERIES = ("xor", "sum", "replica")


@dataclass(frozen=True)
class HostFault:
    """A fault confined to one host (``rank``)."""

    rank: int

    #: Whether repeated runs differ (drawn faults, jitter): a campaign runs it ``runs`` times, else once.
    random: ClassVar[bool] = False
    #: Whether it wraps an error model (``error``): a campaign sweeps it over the spec's ``[errors]``.
    takes_error: ClassVar[bool] = False
    #: Options that are paths (a campaign spec resolves them against its folder).
    paths: ClassVar[tuple[str, ...]] = ()
    #: Options a label leaves out (kept elsewhere in a result, or too long to name a fault by).
    unlabelled: ClassVar[tuple[str, ...]] = ("error", "recover", "checkpoint")
    #: Options a label shows only when they are not at their default.
    quiet: ClassVar[tuple[str, ...]] = ()

    @property
    def label(self) -> str:
        """``HostLoss(rank=1, fill=zeros)``: the class, the rank and the options that tell faults apart."""
        return self.label_of(self._options())

    @classmethod
    def label_of(cls, options: Mapping[str, Any]) -> str:
        """The ``label`` of the fault ``options`` describe (``rank`` and its options; defaults filled in)."""
        shown = [f"rank={options['rank']}"]
        for f in fields(cls):  # every subclass is a dataclass
            value = options.get(f.name, f.default)
            if f.name == "rank" or f.name in cls.unlabelled or (f.name in cls.quiet and value == f.default):
                continue
            shown.append(f"{f.name}={short(value)}")
        return f"{cls.__name__}({', '.join(shown)})"

    @property
    def recovery(self) -> str:
        """How results name what rebuilt the host (their ``mitigation``): ``none``, ``replica``, ``xor``,
        ``xor/g2`` (parity groups of 2 hosts), ``sum``."""
        return self.recovery_of(self._options())

    @classmethod
    def recovery_of(cls, options: Mapping[str, Any]) -> str:
        """The ``recovery`` of the fault ``options`` describe."""
        return "none"

    def _options(self) -> dict[str, Any]:
        """Every field by name (what ``label_of`` and ``recovery_of`` read)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ArgumentError(f"{type(self).__name__}.rank must be an int >= 0, got {self.rank!r}")

    def lost(self, world_size: int) -> list[int]:
        """The ranks the fault is on (its blast: tables with a shard there)."""
        return [self.rank]

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

    random: ClassVar[bool] = True
    takes_error: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.error, ErrorModel):
            raise ArgumentError(f"HostSDC.error must be a pytei error model, got {self.error!r}")


@dataclass(frozen=True)
class HostLoss(HostFault):
    fill: str = "zeros"
    recover: str | None = None
    group: int | None = None
    """Hosts per parity group (ECRM): consecutive ranks ``[k g, (k + 1) g)`` share one parity block
    kept on a host outside the group; None: every host in one group."""
    hosts: int = 1
    """Hosts lost at once: ``rank`` and the next ``hosts - 1`` ranks (modulo the world)."""
    replicas: int = 2
    """Copies of every host's shards with ``recover="replica"`` (its own and ``replicas - 1`` on the next
    hosts): a lost host comes back while one of its copies is on a host that is not lost."""

    unlabelled: ClassVar[tuple[str, ...]] = ("recover", "group", "replicas")
    quiet: ClassVar[tuple[str, ...]] = ("hosts",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fill not in FILLS:
            raise ArgumentError(f"unknown HostLoss fill {self.fill!r}; allowed: {', '.join(FILLS)}")
        if self.recover is not None and self.recover not in RECOVERIES:
            raise ArgumentError(
                f"unknown HostLoss recovery {self.recover!r}; allowed: {', '.join(RECOVERIES)} (or none)"
            )
        for name, low in (("group", 2), ("hosts", 1), ("replicas", 2)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ArgumentError(f"HostLoss.{name} must be an int >= {low}, got {value!r}")
        if self.group is not None and self.recover not in ("xor", "sum"):
            raise ArgumentError(
                f"HostLoss.group is a parity group: it needs recover='xor' or 'sum', got {self.recover!r}"
            )
        if self.replicas != 2 and self.recover != "replica":
            raise ArgumentError(f"HostLoss.replicas needs recover='replica', got {self.recover!r}")

    @classmethod
    def recovery_of(cls, options: Mapping[str, Any]) -> str:
        recover = options.get("recover")
        if not recover:
            return "none"
        if recover == "replica":
            return f"replica x{options['replicas']}" if options.get("replicas", 2) != 2 else "replica"
        return str(recover) + (f"/g{options['group']}" if options.get("group") else "")

    def lost(self, world_size: int) -> list[int]:
        """The ranks lost together: ``rank`` and the ``hosts - 1`` after it."""
        return [(self.rank + i) % world_size for i in range(self.hosts)]

    def check_world(self, world_size: int) -> None:
        super().check_world(world_size)
        for name in ("group", "hosts", "replicas"):
            value = getattr(self, name)
            if value is not None and value > world_size:
                raise ArgumentError(f"HostLoss.{name} {value} is larger than the world of {world_size} hosts")


@dataclass(frozen=True)
class HostStale(HostFault):
    checkpoint: str | Path

    paths: ClassVar[tuple[str, ...]] = ("checkpoint",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not Path(self.checkpoint).is_dir():
            raise ArgumentError(f"HostStale.checkpoint {str(self.checkpoint)!r} is not a checkpoint folder")


@dataclass(frozen=True)
class HostSlow(HostFault):
    delay_ms: float
    jitter_ms: float = 0.0

    random: ClassVar[bool] = True  # latency is measured: each run is a sample of it

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("delay_ms", "jitter_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 60_000:
                raise ArgumentError(f"HostSlow.{name} must be milliseconds in [0, 60000), got {value!r}")


#: Host faults by name (campaign specs' ``host_faults``): ``HostFault`` subclasses.
host_faults: Registry[type[HostFault]] = Registry("host fault")
for _cls in (HostSDC, HostLoss, HostStale, HostSlow):
    host_faults(_cls.__name__, _cls)
