"""Campaign specs: a TOML file describing a sweep, validated into frozen dataclasses.

The file is parsed (``tomllib``), never evaluated. Every key is checked before any model is
loaded: an unknown key (a typo), a wrong type or an out-of-range value raises :class:`SpecError`
whose message names the key path (``errors.rates[3]``, ``models[1].dummy.mlp_hidden``) and what is
allowed, so a mistake costs seconds, not a night of wrong trials. Defaults are filled in, so
``Spec.hash`` (over the parsed values, not the text) is the same for any formatting, key order or
comments, and changes with any value (resolved checkpoint paths included).

Semantics a reader of a spec needs to know:

* relative checkpoint paths resolve against the spec file's directory; that they exist is checked
  by the runner, not here;
* a target's name (what reports show, unique in a spec) is its ``label``, else its component(s)
  joined by ``+`` with its include/exclude patterns (``mlp[-predictor.*]``); a bare string is a
  component, ``"all"`` or ``"per-parameter"`` (one target per parameter of each model, expanded by
  the planner, which then needs the model's parameter names);
* a target table's ``fields`` (``["codes"]``, ``["scale", "bias"]``, ``["padding"]``) keeps only those
  fields of embedding tables' rows (``pytei.targets.FIELDS``; FBGEMM's quantized rows hold codes, an
  fp16 scale and bias, and padding); without it a target takes every tensor, padding left out;
* the ``indices`` site puts faults in the ids embedding lookups read (``pytei.indices``); a target's
  ``bounds`` (``"zero"``, ``"skip"``, ``"raise"``) says what an id pushed out of range does, and such a
  target is planned with the ``indices`` site only (memory-side mitigations are skipped there too);
* dummy models have no labels: they are scored by ``rmse`` against their clean outputs only, and
  ``auc``/``logloss`` are skipped for them (``rmse`` must therefore be among ``metrics``);
* ``protect-bits`` and ``ecc`` filter faults on their way into stored tensors, so with the
  ``activations`` site they do nothing: the planner skips those trials;
* with a ``[confidence]`` table the number of runs adapts per point (between ``min_runs`` and
  ``max_runs``) and ``runs`` must not be given; ``Spec.runs`` is then ``max_runs``. A point stops
  once the half-width of the distribution-free interval of its mean (``pytei.stats.interval``,
  inside the metric's range) is at most ``halfwidth``. That interval is honest about few runs
  (with n runs all equal its width is still the KS band, 0.56 of the range at n = 5, 0.29 at 20),
  so an AUC needs ``halfwidth`` >= 0.15 to stop within 20 runs (0.1 within 50), and a metric
  unbounded above (``rmse``) never stops early: its interval's upper end is infinite;
* mitigations and error models are registered names (``pytei.mitigation.register``,
  ``pytei.errors.register``); a mitigation may be a table with its options
  (``{ name = "clip", low = -4, high = 4 }``), checked against the object's signature;
* ``plugins = ["my_pkg.models"]`` imports modules (that register more names) before the rest of
  the spec is checked;
* a ``sharded = "dir"`` model (``pytei.distributed``) is served by ``world_size`` processes with its
  tables placed by a strategy; it is scored on its checkpoint's test split (``data.split`` must be
  ``test``), gets the spec's error points at the ``weights`` site with the mitigation ``none`` (drawn
  on the unsharded model, so every strategy receives the same faults), and the ``host_faults``:
  registered host faults (``pytei.distributed.faults.host_faults``: ``"HostSDC"``, ``{ name =
  "HostLoss", fill = "mean", recover = "xor", group = 2 }``, ``{ name = "HostLoss", hosts = 2,
  recover = "replica", replicas = 3 }``, ``{ name = "HostStale", checkpoint =
  "dir" }``, ``{ name = "HostSlow", delay_ms = 5 }``), each on every rank (or its ``ranks`` that exist
  in a world), at the ``host`` site. HostSDC is swept over the ``[errors]`` points and runs, HostSlow
  over the runs; the others are planned once (run 0): their outcome does not depend on the seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

from .. import errors, metrics, mitigation, plugins
from .._registry import OptionError, check_options, short
from ..distributed.faults import HostFault, host_faults
from ..exceptions import ArgumentError
from ..indices import BOUNDS
from ..injector import SITES
from ..targets import COMPONENTS, FIELDS, PARAM_KINDS
from .checks import (
    REQUIRED,
    TOP_KEYS,
    Check,
    SpecError,
    Table,
    choice,
    integer,
    many,
    number,
    show,
    string,
    target_name,
)
from .sources import (
    CheckpointModel,
    DataOptions,
    DummyGrid,
    ModelEntry,
    RegisteredModel,
    ShardedModel,
    source_for,
    sources,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "PER_PARAMETER",
    "CheckpointModel",
    "Confidence",
    "DataOptions",
    "DummyGrid",
    "ErrorGrid",
    "HostFaultChoice",
    "MitigationChoice",
    "RegisteredModel",
    "ShardedModel",
    "Spec",
    "SpecError",
    "Target",
    "canonical_json",
    "load_spec",
    "make_error",
    "parse_spec",
]

#: ``targets`` value that expands into one target per parameter of each model, at plan time.
PER_PARAMETER = "per-parameter"
#: Highest bit position of the widest supported dtype (float64/int64).
MAX_BIT = 63


# --- the parsed spec -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorGrid:
    """A registered error model swept over ``rates`` (its x axis) and ``bit_sets`` (``(None,)``: all bits)."""

    model: str
    rates: tuple[float, ...]
    options: tuple[tuple[str, Any], ...] = ()
    bit_sets: tuple[tuple[int, ...] | None, ...] = (None,)

    def points(self) -> list[tuple[float, dict]]:
        """``(x value, error dict)`` for every rate and bit set, rate-major; builds each model once."""
        entry = errors.register.entry(self.model)
        cls, swept = entry.obj, entry.meta["swept"]
        has_bits = any(f.name == "bits" for f in _fields(cls))
        out = []
        for rate, bits in itertools.product(self.rates, self.bit_sets):
            kwargs = {swept: rate, **dict(self.options), **({"bits": bits} if has_bits else {})}
            out.append((rate, _error_dict(self.model, cls(**kwargs))))
        return out


@dataclass(frozen=True)
class Target:
    """Where errors go: Injector selection arguments under a display ``name`` (unique in a spec)."""

    name: str
    component: tuple[str, ...] = ("all",)
    params: str = "all"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    per_parameter: bool = False
    fields: tuple[str, ...] | None = None
    """Fields of embedding tables' rows (``pytei.targets.FIELDS``); None: every tensor, padding left out."""
    bounds: str | None = None
    """What an id pushed out of range does at the ``indices`` site (``pytei.indices.BOUNDS``)."""

    def selection(self) -> dict:
        """Keyword arguments of ``pytei.Injector`` that select this target's tensors (``fields`` only when
        given, so that the trials of specs written before it keep their identity)."""
        out = {
            "target": self.component[0] if len(self.component) == 1 else list(self.component),
            "params": self.params,
            "include": list(self.include) if self.include else None,
            "exclude": list(self.exclude) if self.exclude else None,
        }
        if self.fields:
            out["fields"] = list(self.fields)
        if self.bounds:
            out["bounds"] = self.bounds
        return out


@dataclass(frozen=True)
class MitigationChoice:
    """A registered mitigation with the options a spec gives it, shown as ``label`` (unique in a spec).

    A bare name (``"clip"``) has no options and is labelled by its name; a table
    (``{ name = "clip", low = -4, high = 4 }``) is labelled ``clip(low=-4, high=4)`` unless it has a
    ``label``.
    """

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            args = ", ".join(f"{k}={short(v)}" for k, v in self.options)
            object.__setattr__(self, "label", f"{self.name}({args})" if args else self.name)

    @property
    def plain_none(self) -> bool:
        """It is ``none`` without options: the one mitigation a sharded model runs with."""
        return self.name == "none" and not self.options

    @property
    def memory(self) -> bool:
        """It acts on stored tensors only (a Protection): it does nothing to activation faults."""
        return mitigation.register.get(self.name).memory

    def hashed(self) -> str | dict:
        """What the spec hash sees: a bare name as the string it always was, else a dict."""
        if not self.options and self.label == self.name:
            return self.name
        return {"name": self.name, "options": dict(self.options), "label": self.label}


@dataclass(frozen=True)
class HostFaultChoice:
    """A registered host fault (``pytei.distributed.faults.host_faults``) with its options, on ``ranks``
    (None: every rank of each sharded model's world)."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    ranks: tuple[int, ...] | None = None

    def ranks_in(self, world_size: int) -> list[int]:
        """The ranks it is planned on in a world of ``world_size``."""
        return [r for r in range(world_size) if self.ranks is None or r in self.ranks]

    def fault_dict(self, rank: int, error: dict | None = None) -> dict:
        """What a trial carries (its ``error``): ``{"model": name, "rank": r, **options}``, and the error
        dict of the error model it wraps (HostSDC)."""
        return {"model": self.name, "rank": rank, **dict(self.options), **({"error": error} if error else {})}


@dataclass(frozen=True)
class Confidence:
    """Adaptive sample size: run a point until the ``level`` CI of ``metric`` is within ``halfwidth``."""

    metric: str
    halfwidth: float
    level: float = 0.95
    min_runs: int = 5
    max_runs: int = 50


@dataclass(frozen=True)
class Spec:
    """A validated campaign spec. ``text`` is the TOML as written; ``hash`` identifies its values."""

    name: str
    seed: int
    runs: int
    models: tuple[ModelEntry, ...]
    data: DataOptions
    errors: ErrorGrid
    targets: tuple[Target, ...]
    sites: tuple[str, ...]
    mitigations: tuple[MitigationChoice, ...]
    metrics: tuple[str, ...]
    confidence: Confidence | None
    plugins: tuple[str, ...] = ()
    host_faults: tuple[HostFaultChoice, ...] = ()
    text: str = field(default="", repr=False, compare=False)
    hash: str = field(default="", compare=False)

    def model_specs(self) -> dict[str, dict]:
        """``{model key: how the runner builds it}`` in spec order, dummy grids expanded."""
        out: dict[str, dict] = {}
        for m in self.models:
            out.update(m.expand(self.data))
        return out

    def model_labels(self) -> dict[str, str]:
        """Display labels given to models in the spec, by model key."""
        out = {}
        for m in self.models:
            label = getattr(m, "label", None)
            if label:
                out.update(dict.fromkeys(m.expand(self.data), label))
        return out

    def host_checkpoints(self) -> list[str]:
        """Checkpoints the host faults read (a stale host's): they are part of the results' identity."""
        return [str(v) for h in self.host_faults for k, v in h.options if k in host_faults.get(h.name).paths]

    def mitigation(self, label: str) -> MitigationChoice:
        """The mitigation shown as ``label``."""
        for m in self.mitigations:
            if m.label == label:
                return m
        raise KeyError(f"no mitigation {label!r} in spec {self.name!r}")


def _fields(cls: type) -> tuple[dataclasses.Field, ...]:
    """The fields of a registered error model (a dataclass: ``errors.register`` checks it)."""
    return dataclasses.fields(cast(Any, cls))


def make_error(error: Mapping[str, Any]) -> errors.ErrorModel:
    """The error model an error dict (``{"model": "BitFlip", "ber": 1e-6, "bits": None}``) describes."""
    name = error.get("model")
    cls = errors.register.get(str(name)) if isinstance(name, str) else None
    if cls is None:
        raise SpecError("errors.model", f"must name a registered error model, got {name!r}")
    return cls(**{k: v for k, v in error.items() if k != "model"})


def _error_dict(name: str, model: errors.ErrorModel) -> dict:
    """JSON-ready description of ``model`` with every field (defaults included), bits as a list."""
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in model.spec.items()}
    out["model"] = name
    return out


def canonical_json(value: Any) -> str:
    """Key-sorted, compact JSON (dataclasses as dicts): equal values give equal text and hashes."""
    return json.dumps(value, default=_as_dict, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _as_dict(value: Any) -> Any:
    if isinstance(value, MitigationChoice):
        return value.hashed()
    if isinstance(value, Target):  # keys added later enter the hash only when given (old hashes hold)
        later = ("fields", "bounds")
        return {
            f.name: getattr(value, f.name)
            for f in dataclasses.fields(value)
            if f.name not in later or getattr(value, f.name) is not None
        }
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# --- sections ------------------------------------------------------------------------------------


def _model(value: Any, path: str, *, base: Path) -> ModelEntry:
    if not isinstance(value, dict):
        raise SpecError(path, f"must be a table, got {show(value)}")
    found = [name for name in sources.names() if name in value]
    if len(found) != 1:
        keys = " or ".join(f"{k} = ..." for k in sources.names())
        got = f" (got {', '.join(found)})" if found else ""
        raise SpecError(path, f"must have exactly one of {keys}{got}")
    return sources.get(found[0]).parse(value, path, base)


def _data(value: Any, path: str) -> DataOptions:
    t = Table(value, path, ("split", "max_rows"))
    split = t.get("split", choice(("test", "valid", "original")), "test")  # original: see sources
    return DataOptions(split, t.get("max_rows", integer(0), 0))


#: Range checks of the built-in error models' non-swept arguments, by argument name (finer messages
#: than the type check every other argument gets from its type hint).
_OPTION_CHECKS: dict[str, Check] = {
    "value": integer(0, 1),
    "low": number(),
    "high": number(),
    "length": integer(1, MAX_BIT + 1),
}


def _bits(value: Any, path: str) -> tuple[int, ...]:
    return tuple(sorted(many(integer(0, MAX_BIT))(value, path)))


def _errors(value: Any, path: str) -> ErrorGrid:
    if not isinstance(value, dict):
        raise SpecError(path, f"must be a table, got {show(value)}")
    names = errors.register.names()
    if "model" not in value:
        raise SpecError(f"{path}.model", f"required: one of {', '.join(names)}")
    name = choice(names)(value["model"], f"{path}.model")
    entry = errors.register.entry(name)
    cls, swept = entry.obj, entry.meta["swept"]
    fields = {f.name: f for f in _fields(cls) if f.name != swept and f.init}
    options = [f for n, f in fields.items() if n != "bits"]
    bit_keys = ("bits", "bit_sets") if "bits" in fields else ()
    t = Table(value, path, ("model", "rates", *(f.name for f in options), *bit_keys))
    if t.has("bits") and t.has("bit_sets"):
        raise SpecError(
            t.key("bit_sets"), "give either bits (one set) or bit_sets (one point per set), not both"
        )
    if t.has("bits"):
        bit_sets: tuple = (t.get("bits", _bits),)
    else:
        bit_sets = t.get("bit_sets", many(_bits, scalar=False), (None,))
    grid = ErrorGrid(
        model=name,
        rates=t.get("rates", partial(_rates, counts=swept == "k")),
        options=tuple((f.name, _option(t, cls, f)) for f in sorted(options, key=lambda f: f.name)),
        bit_sets=bit_sets,
    )
    try:
        grid.points()
    except (ValueError, TypeError) as err:  # joint constraints the error model checks (low < high)
        raise SpecError(path, str(err)) from err
    return grid


def _option(t: Table, cls: type, f: dataclasses.Field) -> Any:
    """A non-swept argument of the error model; its own default when the spec leaves it out."""
    default = REQUIRED if f.default is dataclasses.MISSING else f.default
    if f.name in _OPTION_CHECKS:
        return t.get(f.name, _OPTION_CHECKS[f.name], default)

    def typed(value: Any, path: str) -> Any:  # checked against the field's type hint
        try:
            return check_options(cls, {f.name: value}, what=f"error model {cls.__name__}")[f.name]
        except OptionError as err:
            raise SpecError(path, str(err)) from err

    return t.get(f.name, typed, default)


def _rates(value: Any, path: str, *, counts: bool) -> tuple[float, ...]:
    """A list of rates in [0, 1] (of fault counts k >= 0 for FlipCount), or a log grid table."""
    if not isinstance(value, dict):
        return many(integer(0) if counts else number(0.0, 1.0))(value, path)
    if counts:
        raise SpecError(path, "FlipCount sweeps a fault count k: give a list of non-negative ints")
    t = Table(value, path, ("start", "stop", "per_decade"))
    start = t.get("start", number(0.0, 1.0, open_low=True))
    stop = t.get("stop", number(start, 1.0))
    per_decade = t.get("per_decade", integer(1), 1)
    steps = math.log10(stop / start) * per_decade
    if abs(steps - round(steps)) > 1e-6:
        raise SpecError(
            t.key("stop"), f"{stop:g} is not on the grid from {start:g} at {per_decade} per decade"
        )
    return tuple(float(f"{start * 10 ** (i / per_decade):.12g}") for i in range(round(steps) + 1))


def _target(value: Any, path: str) -> Target:
    if value == PER_PARAMETER:
        return Target(PER_PARAMETER, per_parameter=True)
    if isinstance(value, str):
        return Target(value, (choice(("all", *COMPONENTS, PER_PARAMETER))(value, path),))
    t = Table(value, path, ("component", "params", "include", "exclude", "fields", "bounds", "label"))
    component = t.get("component", many(choice(("all", *COMPONENTS))), ("all",))
    include = t.get("include", many(string), None)
    exclude = t.get("exclude", many(string), None)
    t.get("label", string, None)
    return Target(
        name=target_name(value),
        component=component,
        params=t.get("params", choice(PARAM_KINDS), "all"),
        include=include,
        exclude=exclude,
        fields=t.get("fields", many(choice(FIELDS)), None),
        bounds=t.get("bounds", choice(BOUNDS), None),
    )


def _mitigation(value: Any, path: str) -> MitigationChoice:
    """A registered mitigation's name, or a table of its ``name``, options and an optional ``label``."""
    names = mitigation.register.names()
    if isinstance(value, str):
        return MitigationChoice(choice(names)(value, path))
    if not isinstance(value, dict):
        raise SpecError(path, f"must be a mitigation name or a table {{ name = ... }}, got {show(value)}")
    if "name" not in value:
        raise SpecError(f"{path}.name", f"required: one of {', '.join(names)}")
    name = choice(names)(value["name"], f"{path}.name")
    label = value.get("label", "")
    if "label" in value:
        string(label, f"{path}.label")
    raw = {k: v for k, v in value.items() if k not in ("name", "label")}
    mtype = mitigation.register.get(name)
    try:
        options = mtype.check(raw)
    except OptionError as err:
        raise SpecError(f"{path}.{err.key}", str(err)) from err
    try:  # values the object itself refuses (fallback = "bogus"), before any trial runs
        mtype.factory(**{**mtype.defaults, **options})
    except (ValueError, TypeError) as err:
        raise SpecError(path, f"mitigation {name!r}: {err}") from err
    return MitigationChoice(name, tuple(options.items()), label)


def _host_fault(value: Any, path: str, *, base: Path) -> HostFaultChoice:
    """A registered host fault's name, or a table of its ``name``, options and ``ranks``."""
    names = host_faults.names()
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise SpecError(path, f"must be a host fault name or a table {{ name = ... }}, got {show(value)}")
    if "name" not in value:
        raise SpecError(f"{path}.name", f"required: one of {', '.join(names)}")
    name = choice(names)(value["name"], f"{path}.name")
    cls = host_faults.get(name)
    ranks = Table({"ranks": value["ranks"]} if "ranks" in value else {}, path, ("ranks",))
    raw = {k: v for k, v in value.items() if k not in ("name", "ranks")}
    try:
        options = check_options(cls, raw, what=f"host fault {name}", skip=("rank", "error"))
    except OptionError as err:
        raise SpecError(f"{path}.{err.key}", str(err)) from err
    for key in cls.paths:  # relative to the spec's folder, as checkpoints are
        if key in options:
            options[key] = str((base / Path(str(options[key])).expanduser()).resolve())
    try:  # values the fault itself refuses (fill = "bogus", a missing option), before any trial runs
        _example(name, options)
    except (ArgumentError, TypeError) as err:
        raise SpecError(path, f"host fault {name}: {err}") from err
    return HostFaultChoice(name, tuple(sorted(options.items())), ranks.get("ranks", _ranks, None))


def _example(name: str, options: dict[str, Any]) -> HostFault:
    """The host fault ``name`` with ``options`` on rank 0 (an error model of rate 0 where it wraps one):
    what checks the options before any trial runs."""
    cls = host_faults.get(name)
    return cls(rank=0, **options, **({"error": errors.BitFlip(0.0)} if cls.takes_error else {}))


def _ranks(value: Any, path: str) -> tuple[int, ...]:
    return tuple(sorted(many(integer(0, 63))(value, path)))


def _confidence(value: Any, path: str) -> Confidence:
    t = Table(value, path, ("metric", "halfwidth", "level", "min_runs", "max_runs"))
    min_runs = t.get("min_runs", integer(2), 5)
    return Confidence(
        metric=t.get("metric", choice(metrics.register.names())),
        halfwidth=t.get("halfwidth", number(0.0, open_low=True)),
        level=t.get("level", number(0.0, 1.0, open_low=True), 0.95),
        min_runs=min_runs,
        max_runs=t.get("max_runs", integer(min_runs), 50),
    )


def _plugins(value: Any, path: str) -> tuple[str, ...]:
    """Module names, imported now so that the names they register are known to the rest of the spec."""
    names = many(string)(value, path)
    for i, name in enumerate(names):
        try:
            plugins.load([name])
        except plugins.PluginError as err:
            raise SpecError(f"{path}[{i}]" if isinstance(value, list) else path, str(err)) from err
    return names


# --- whole spec ----------------------------------------------------------------------------------


def _check_models_distinct(models: tuple, data: DataOptions) -> None:
    owner: dict[str, int] = {}
    for i, m in enumerate(models):
        for key in m.expand(data):
            if key in owner:
                raise SpecError(f"models[{i}]", f"model {key} is also in models[{owner[key]}]")
            owner[key] = i


def _labelled(entry: ModelEntry, data: DataOptions) -> bool:
    """Whether the entry's models have labels (its source's ``labelled``)."""
    return source_for(next(iter(entry.expand(data).values()))).labelled


def _what(entry: ModelEntry) -> str:
    if isinstance(entry, DummyGrid):
        return "a dummy model"
    if isinstance(entry, RegisteredModel):
        return f"registered model {entry.model!r}"
    return f"a {type(entry).__name__}"


def _check_metrics(
    models: tuple, data: DataOptions, chosen: tuple[str, ...], confidence: Confidence | None
) -> None:
    needs_labels = {m for m in chosen if metrics.register.get(m).needs_labels}
    unlabelled = [i for i, m in enumerate(models) if not _labelled(m, data)]
    if unlabelled and set(chosen) <= needs_labels:
        usable = [n for n in metrics.register.names() if not metrics.register.get(n).needs_labels]
        skipped = ", ".join(sorted(needs_labels))
        raise SpecError(
            "metrics",
            f"models[{unlabelled[0]}] is {_what(models[unlabelled[0]])} without labels, scored against "
            f"its clean outputs only ({skipped} {'is' if len(needs_labels) == 1 else 'are'} skipped for "
            f"it), so metrics must include one of {', '.join(usable)}; got {list(chosen)}",
        )
    if confidence is None:
        return
    if confidence.metric not in chosen:
        raise SpecError("confidence.metric", f"must be one of metrics ({', '.join(chosen)})")
    if unlabelled and confidence.metric in needs_labels:
        raise SpecError(
            "confidence.metric",
            f"models[{unlabelled[0]}] is {_what(models[unlabelled[0]])} without labels, so "
            f"{confidence.metric} is never computed for it: use a metric of its clean outputs such as rmse",
        )


def _check_sharded(
    models: tuple,
    data: DataOptions,
    chosen: tuple[HostFaultChoice, ...],
    sites: tuple[str, ...],
    mitigations: tuple[MitigationChoice, ...],
) -> None:
    """Sharded models score their test split and get trials; host faults need a sharded model."""
    sharded = [i for i, m in enumerate(models) if isinstance(m, ShardedModel)]
    if chosen and not sharded:
        raise SpecError(
            "host_faults", 'host faults need a sharded model: [[models]] sharded = "dir" (pytei.distributed)'
        )
    if sharded and data.split != "test":
        raise SpecError(
            "data.split",
            f"models[{sharded[0]}] is sharded: its ranks score the test split; got {data.split!r}",
        )
    global_trials = "weights" in sites and any(m.plain_none for m in mitigations)
    if sharded and not chosen and not global_trials:
        raise SpecError(
            f"models[{sharded[0]}]",
            'a sharded model gets the spec\'s error points at the "weights" site with the mitigation '
            f'"none", and its host_faults; with sites = {list(sites)}, mitigations = '
            f"{[m.label for m in mitigations]} and no host_faults it would get no trial",
        )
    worlds = sorted({w for i in sharded for w in models[i].world_sizes})
    for k, h in enumerate(chosen):  # options that depend on the world (a parity group, hosts lost)
        fault = _example(h.name, dict(h.options))
        for world in worlds:
            try:
                fault.check_world(world)
            except ArgumentError as err:
                raise SpecError(
                    f"host_faults[{k}]", f"{err} (a sharded model has world size {world})"
                ) from err
    widest = max(worlds, default=0)
    for k, h in enumerate(chosen):
        if h.ranks is not None and min(h.ranks) >= widest:
            raise SpecError(
                f"host_faults[{k}].ranks", f"no rank {list(h.ranks)} in any world (sizes up to {widest})"
            )


def _check_not_all_skipped(
    sites: tuple[str, ...], mitigations: tuple[MitigationChoice, ...], targets: tuple[Target, ...]
) -> None:
    if "weights" not in sites and all(m.memory for m in mitigations):
        raise SpecError(
            "mitigations",
            f"{', '.join(m.label for m in mitigations)} protect stored weights only, so with sites = "
            f"{list(sites)} every trial would be skipped",
        )
    bounded = [t.name for t in targets if t.bounds]
    if bounded and "indices" not in sites:
        raise SpecError(
            "targets",
            f'{", ".join(bounded)} set bounds (what a faulted id does), which needs "indices" in sites; '
            f"sites = {list(sites)}",
        )


def parse_spec(text: str, base_dir: str | Path = ".") -> Spec:
    """Validate TOML ``text``; relative checkpoint paths resolve against ``base_dir``.

    The modules named by ``plugins`` are imported first, so the models, error models, mitigations
    and metrics they register can be named in the rest of the spec.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError("", f"not valid TOML: {err}") from err
    top = Table(raw, "", TOP_KEYS)
    loaded = top.get("plugins", _plugins, ())
    confidence = top.get("confidence", _confidence, None)
    base = Path(base_dir).expanduser()
    chosen_hosts = top.get("host_faults", many(partial(_host_fault, base=base)), ())
    if confidence is not None and top.has("runs"):
        raise SpecError("runs", "conflicts with [confidence], whose min_runs and max_runs bound the runs")
    values: dict[str, Any] = {
        "name": top.get("name", string),
        "seed": top.get("seed", integer(0), 0),
        "runs": confidence.max_runs if confidence else top.get("runs", integer(1), 10),
        "models": top.get("models", many(partial(_model, base=base), distinct=False)),
        "data": top.get("data", _data, DataOptions()),
        "errors": top.get("errors", _errors),
        "targets": top.get("targets", many(_target, key=lambda t: t.name), (Target("all"),)),
        "sites": top.get("sites", many(choice(SITES)), ("weights",)),
        "mitigations": top.get(
            "mitigations", many(_mitigation, key=lambda m: m.label), (MitigationChoice("none"),)
        ),
        "metrics": top.get("metrics", many(choice(metrics.register.names())), _DEFAULT_METRICS),
        "confidence": confidence,
    }
    _check_models_distinct(values["models"], values["data"])
    _check_metrics(values["models"], values["data"], values["metrics"], confidence)
    _check_sharded(values["models"], values["data"], chosen_hosts, values["sites"], values["mitigations"])
    if not all(isinstance(m, ShardedModel) for m in values["models"]):  # sharded models need no other site
        _check_not_all_skipped(values["sites"], values["mitigations"], values["targets"])
    later = {"plugins": loaded, "host_faults": chosen_hosts}  # keys added later: hashed when given
    hashed = {**values, **{k: v for k, v in later.items() if v}}  # (older specs keep their hash)
    digest = hashlib.sha256(canonical_json(hashed).encode()).hexdigest()
    return Spec(**values, plugins=loaded, host_faults=chosen_hosts, text=text, hash=digest)


#: Metrics recorded when a spec does not list any (the paper's three).
_DEFAULT_METRICS = ("auc", "logloss", "rmse")


def load_spec(path: str | Path) -> Spec:
    """Read and validate the spec file at ``path`` (relative checkpoints resolve against its folder)."""
    path = Path(path).expanduser()
    return parse_spec(path.read_text(encoding="utf-8"), path.parent)
