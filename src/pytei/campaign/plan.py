"""Campaign plans: a spec expanded into trials, each a self-describing unit of work.

A trial carries everything the runner needs (how to build the model, what to select, which error
model, seed and mitigation) and an id hashed from exactly that content, so a store can tell what
is already done whatever the order or the machine, and the same spec always gives the same list.

Order: model, target, site, error point, run, mitigation. Grouping by model lets a worker load
each model once; mitigations are innermost so the paired trials of one run are adjacent.

A sharded model (``pytei.distributed``) gets the error points at the ``weights`` site with the
mitigation ``none`` only, then its host faults (site ``host``): each registered fault on each rank,
HostSDC-like faults at every error point, random ones for every run, the others once. A host
trial's ``mitigation`` is the fault's recovery (``none``, ``xor``, ``xor/g2``, ``replica``).

Seeds depend on the spec seed and the run only (common random numbers): at run ``r`` every
model, target, rate and mitigation uses the same seed. As the injector derives each tensor's
faults from (seed, tensor name), mitigations face identical faults and a sub-selection's faults
are the matching subset of a whole-model trial's, so differences between them are paired.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import metrics as metric_registry
from ..distributed.faults import host_faults
from ..errors import ErrorModel
from .sources import source_for
from .spec import PER_PARAMETER, HostFaultChoice, MitigationChoice, Spec, canonical_json, make_error
from .store import KINDS

__all__ = [
    "HOST_SITE",
    "HOST_TARGET",
    "KINDS",
    "Point",
    "Trial",
    "build_error",
    "count_trials",
    "fault_label",
    "iter_plan",
    "plan",
    "recovery",
    "run_seed",
]

#: The site of host-fault trials (faults of one host of a sharded model).
HOST_SITE = "host"
#: The target of host-fault trials: the tables (host faults act on the shards a host holds).
HOST_TARGET = ("embedding", {"target": "embedding", "params": "all", "include": None, "exclude": None})


@dataclass(frozen=True)
class Point:
    """A grid point: a trial without run and seed. Its runs are the samples of one statistic."""

    model: str
    target: str
    site: str
    error: str
    """Canonical JSON of ``Trial.error`` (hashable)."""
    mitigation: str


@dataclass(frozen=True)
class Trial:
    """One injection and evaluation; ``trial_id`` is a hash of what determines its outcome.

    Hashed: every field up to ``metrics``, plus ``mitigation_options`` when there are any (so the
    ids of campaigns written before mitigations had options do not change). Not hashed, as they
    follow from the rest or only name things: ``kind`` (see :data:`KINDS`) and ``label`` (the
    model's display label from the spec). The dict fields are shared between the trials of a plan:
    treat them as read-only.
    """

    trial_id: str
    model: str
    model_spec: dict
    target: str
    target_spec: dict
    site: str
    error: dict
    rate: float
    run: int
    seed: int
    mitigation: str
    """The mitigation's label in the spec (its name, or ``name(option=value, ...)``)."""
    metrics: tuple[str, ...]
    mitigation_name: str = ""
    """The registered mitigation (``mitigation`` when empty)."""
    mitigation_options: dict[str, Any] = field(default_factory=dict)
    kind: str = "component"
    label: str | None = None

    def __hash__(self) -> int:  # the dict fields are not hashable; the id stands for all of them
        return hash(self.trial_id)

    @property
    def point(self) -> Point:
        return Point(self.model, self.target, self.site, canonical_json(self.error), self.mitigation)


def run_seed(spec_seed: int, run: int) -> int:
    """The injection seed of run ``run``: a stable 62-bit hash of (spec seed, run)."""
    digest = hashlib.sha256(f"pytei.campaign.run\x1f{spec_seed}\x1f{run}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def build_error(source: Trial | Mapping) -> ErrorModel:
    """The error model of a trial (or of an error dict such as ``Trial.error``)."""
    return make_error(dict(source.error if isinstance(source, Trial) else source))


def _make_trial(choice: MitigationChoice, kind: str, label: str | None, **content: Any) -> Trial:
    hashed = dict(content)
    if choice.hashed() != choice.name:  # a mitigation with options or its own label
        hashed["mitigation_spec"] = choice.hashed()
    digest = hashlib.sha256(canonical_json(hashed).encode()).hexdigest()
    return Trial(
        trial_id=digest[:20],
        **content,
        mitigation_name=choice.name,
        mitigation_options=dict(choice.options),
        kind=kind,
        label=label,
    )


def _targets(
    spec: Spec, model: str, parameter_names: Callable[[str], list[str]] | None
) -> list[tuple[str, dict, bool]]:
    """``(name, Injector selection, per parameter)`` of every target for ``model``, per-parameter
    ones expanded."""
    out = []
    for t in spec.targets:
        if not t.per_parameter:
            out.append((t.name, t.selection(), False))
            continue
        if parameter_names is None:
            raise ValueError(f"targets = {PER_PARAMETER!r} needs plan(spec, parameter_names=...)")
        names = list(parameter_names(model))
        if not names:
            raise ValueError(f"parameter_names({model!r}) listed no parameters")
        # glob.escape: the name becomes an include pattern and must match only itself.
        out += [
            (n, {"target": "all", "params": "all", "include": [glob.escape(n)], "exclude": None}, True)
            for n in names
        ]
    seen: set[str] = set()
    for name, _, _ in out:
        if name in seen:
            raise ValueError(f"target name {name!r} appears twice for model {model}")
        seen.add(name)
    return out


def _metrics(spec: Spec, model_spec: dict) -> tuple[str, ...]:
    """Metrics that apply to a model: those needing labels only where its source has labels."""
    if source_for(model_spec).labelled:
        return spec.metrics
    return tuple(m for m in spec.metrics if not metric_registry.register.get(m).needs_labels)


def _kind(per_parameter: bool, error: dict) -> str:
    if per_parameter:
        return "parameter"
    return "bits" if error.get("bits") is not None else "component"


def plan(
    spec: Spec, *, runs: int | None = None, parameter_names: Callable[[str], list[str]] | None = None
) -> list[Trial]:
    """Every trial of ``spec``, in execution order (see :func:`iter_plan`, which makes them one by one)."""
    return list(iter_plan(spec, runs=runs, parameter_names=parameter_names))


def _n_runs(spec: Spec, runs: int | None) -> int:
    n_runs = spec.runs if runs is None else runs
    if isinstance(n_runs, bool) or not isinstance(n_runs, int) or n_runs < 1:
        raise ValueError(f"runs must be an int >= 1, got {n_runs!r}")
    return n_runs


def _sharded(model_spec: dict) -> bool:
    return "sharded" in model_spec


def _site_mitigations(spec: Spec, site: str, model_spec: dict) -> list[MitigationChoice]:
    """The mitigations planned with ``site`` (memory-side ones do nothing to activation or index faults;
    a sharded model is run without mitigations, at the weights site only)."""
    if _sharded(model_spec):
        return [m for m in spec.mitigations if m.plain_none] if site == "weights" else []
    return [m for m in spec.mitigations if not (site != "weights" and m.memory)]


def _host_points(spec: Spec, model_spec: dict) -> Iterator[tuple[HostFaultChoice, int, list, bool]]:
    """``(host fault, rank, its error points (None: takes no error), random)`` of a sharded model."""
    for choice in spec.host_faults:
        cls = host_faults.get(choice.name)
        points: list = spec.errors.points() if cls.takes_error else [(0.0, None)]
        for rank in choice.ranks_in(int(model_spec["world_size"])):
            yield choice, rank, points, cls.random


def _host_trials(
    spec: Spec, model: str, model_spec: dict, label: str | None, metrics: tuple[str, ...], seeds: list[int]
) -> Iterator[Trial]:
    """The host-fault trials of a sharded model (site ``host``), fault by fault, rank by rank."""
    target, target_spec = HOST_TARGET
    none = MitigationChoice("none")
    for choice, rank, points, random in _host_points(spec, model_spec):
        runs = list(enumerate(seeds)) if random else [(0, seeds[0])]
        for (rate, error), (run, seed) in itertools.product(points, runs):
            fault = choice.fault_dict(rank, error)
            yield _make_trial(
                none,
                "component",
                label,
                model=model,
                model_spec=model_spec,
                target=target,
                target_spec=target_spec,
                site=HOST_SITE,
                error=fault,
                rate=rate,
                run=run,
                seed=seed,
                mitigation=recovery(fault),
                metrics=metrics,
            )


def fault_label(fault: Mapping[str, Any]) -> str:
    """How results name a host fault (``HostLoss(rank=1, fill=zeros)``: ``HostFault.label``)."""
    return host_faults.get(str(fault["model"])).label_of(fault)


def recovery(fault: Mapping[str, Any]) -> str:
    """How results name a host fault's recovery (``HostFault.recovery``: ``none``, ``xor``, ``xor/g2``)."""
    return host_faults.get(str(fault["model"])).recovery_of(fault)


def _site_targets(targets: list[tuple[str, dict, bool]], site: str) -> list[tuple[str, dict, bool]]:
    """The targets planned with ``site``: one with ``bounds`` (what an out-of-range id does) is planned
    with the ``indices`` site only."""
    return [t for t in targets if site == "indices" or "bounds" not in t[1]]


def count_trials(
    spec: Spec, *, runs: int | None = None, parameter_names: Callable[[str], list[str]] | None = None
) -> int:
    """How many trials :func:`plan` gives, computed from the grid's sizes without making them (so a
    grid of 1e7 trials is counted in microseconds; per-parameter targets list each model's parameters)."""
    n_runs = _n_runs(spec, runs)
    n_points = len(spec.errors.rates) * len(spec.errors.bit_sets)
    total = 0
    for model, model_spec in spec.model_specs().items():
        if any(t.per_parameter for t in spec.targets):
            targets = _targets(spec, model, parameter_names)
        else:
            targets = [(t.name, t.selection(), False) for t in spec.targets]
        for site in spec.sites:
            n_targets = len(_site_targets(targets, site))
            total += n_targets * len(_site_mitigations(spec, site, model_spec)) * n_points * n_runs
        if _sharded(model_spec):
            total += sum(len(p) * (n_runs if r else 1) for _, _, p, r in _host_points(spec, model_spec))
    return total


def iter_plan(
    spec: Spec, *, runs: int | None = None, parameter_names: Callable[[str], list[str]] | None = None
) -> Iterator[Trial]:
    """Every trial of ``spec``, in execution order (see the module docstring), made as they are consumed.

    ``runs`` overrides the number of runs per point (default ``spec.runs``; with ``[confidence]``
    that is ``max_runs`` and the executor decides how many to run). ``parameter_names(model key)``
    lists a model's parameters for ``targets = "per-parameter"``. Trials of memory-side mitigations
    (``protect-bits``, ``ecc``) with the ``activations`` or ``indices`` site are skipped: they act on stored
    tensors only; a target with ``bounds`` is planned with the ``indices`` site only.
    """
    n_runs = _n_runs(spec, runs)
    labels = spec.model_labels()
    seeds = [run_seed(spec.seed, r) for r in range(n_runs)]
    points = spec.errors.points()
    for model, model_spec in spec.model_specs().items():
        metrics = _metrics(spec, model_spec)
        for target, target_spec, per_parameter in _targets(spec, model, parameter_names):
            for site in spec.sites:
                if not _site_targets([(target, target_spec, per_parameter)], site):
                    continue
                mitigations = _site_mitigations(spec, site, model_spec)
                for (rate, error), (run, seed), m in itertools.product(points, enumerate(seeds), mitigations):
                    yield _make_trial(
                        m,
                        _kind(per_parameter, error),
                        labels.get(model),
                        model=model,
                        model_spec=model_spec,
                        target=target,
                        target_spec=target_spec,
                        site=site,
                        error=error,
                        rate=rate,
                        run=run,
                        seed=seed,
                        mitigation=m.label,
                        metrics=metrics,
                    )
        if _sharded(model_spec):
            yield from _host_trials(spec, model, model_spec, labels.get(model), metrics, seeds)
