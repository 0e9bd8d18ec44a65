"""Campaign plans: a spec expanded into trials, each a self-describing unit of work.

A trial carries everything the runner needs (how to build the model, what to select, which error
model, seed and mitigation) and an id hashed from exactly that content, so a store can tell what
is already done whatever the order or the machine, and the same spec always gives the same list.

Order: model, target, site, error point, run, mitigation. Grouping by model lets a worker load
each model once; mitigations are innermost so the paired trials of one run are adjacent.

Seeds depend on the spec seed and the run only (common random numbers): at run ``r`` every
model, target, rate and mitigation uses the same seed. As the injector derives each tensor's
faults from (seed, tensor name), mitigations face identical faults and a sub-selection's faults
are the matching subset of a whole-model trial's, so differences between them are paired.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import ErrorModel
from .spec import LABEL_METRICS, MEMORY_MITIGATIONS, PER_PARAMETER, Spec, canonical_json, make_error

__all__ = ["Point", "Trial", "build_error", "plan", "run_seed"]


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
    """One injection and evaluation; ``trial_id`` is a hash of all the other fields.

    The dict fields are shared between the trials of a plan: treat them as read-only.
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
    metrics: tuple[str, ...]

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


def _make_trial(**content) -> Trial:
    digest = hashlib.sha256(canonical_json(content).encode()).hexdigest()
    return Trial(trial_id=digest[:20], **content)


def _targets(
    spec: Spec, model: str, parameter_names: Callable[[str], list[str]] | None
) -> list[tuple[str, dict]]:
    """``(name, Injector selection)`` of every target for ``model``, per-parameter ones expanded."""
    out = []
    for t in spec.targets:
        if not t.per_parameter:
            out.append((t.name, t.selection()))
            continue
        if parameter_names is None:
            raise ValueError(f"targets = {PER_PARAMETER!r} needs plan(spec, parameter_names=...)")
        names = list(parameter_names(model))
        if not names:
            raise ValueError(f"parameter_names({model!r}) listed no parameters")
        # glob.escape: the name becomes an include pattern and must match only itself.
        out += [
            (n, {"target": "all", "params": "all", "include": [glob.escape(n)], "exclude": None})
            for n in names
        ]
    seen: set[str] = set()
    for name, _ in out:
        if name in seen:
            raise ValueError(f"target name {name!r} appears twice for model {model}")
        seen.add(name)
    return out


def _metrics(spec: Spec, model_spec: dict) -> tuple[str, ...]:
    """Metrics that apply to a model: dummy models have no labels, so only rmse."""
    if "checkpoint" in model_spec:
        return spec.metrics
    return tuple(m for m in spec.metrics if m not in LABEL_METRICS)


def plan(
    spec: Spec, *, runs: int | None = None, parameter_names: Callable[[str], list[str]] | None = None
) -> list[Trial]:
    """Every trial of ``spec``, in execution order (see the module docstring).

    ``runs`` overrides the number of runs per point (default ``spec.runs``; with ``[confidence]``
    that is ``max_runs`` and the executor decides how many to run). ``parameter_names(model key)``
    lists a model's parameters for ``targets = "per-parameter"``. Trials of ``protect-bits`` or
    ``ecc`` with the ``activations`` site are skipped: those mitigations act on stored tensors only.
    """
    n_runs = spec.runs if runs is None else runs
    if isinstance(n_runs, bool) or not isinstance(n_runs, int) or n_runs < 1:
        raise ValueError(f"runs must be an int >= 1, got {n_runs!r}")
    seeds = [run_seed(spec.seed, r) for r in range(n_runs)]
    points = spec.errors.points()
    trials = []
    for model, model_spec in spec.model_specs().items():
        metrics = _metrics(spec, model_spec)
        for target, target_spec in _targets(spec, model, parameter_names):
            for site in spec.sites:
                mitigations = [
                    m for m in spec.mitigations if not (site == "activations" and m in MEMORY_MITIGATIONS)
                ]
                for (rate, error), (run, seed), m in itertools.product(points, enumerate(seeds), mitigations):
                    trials.append(
                        _make_trial(
                            model=model,
                            model_spec=model_spec,
                            target=target,
                            target_spec=target_spec,
                            site=site,
                            error=error,
                            rate=rate,
                            run=run,
                            seed=seed,
                            mitigation=m,
                            metrics=metrics,
                        )
                    )
    return trials
