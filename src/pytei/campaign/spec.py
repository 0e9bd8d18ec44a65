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
* dummy models have no labels: they are scored by ``rmse`` against their clean outputs only, and
  ``auc``/``logloss`` are skipped for them (``rmse`` must therefore be among ``metrics``);
* ``protect-bits`` and ``ecc`` filter faults on their way into stored tensors, so with the
  ``activations`` site they do nothing: the planner skips those trials;
* with a ``[confidence]`` table the number of runs adapts per point (between ``min_runs`` and
  ``max_runs``) and ``runs`` must not be given; ``Spec.runs`` is then ``max_runs``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from .. import errors
from ..injector import SITES
from ..targets import COMPONENTS, PARAM_KINDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "ERROR_MODELS",
    "LABEL_METRICS",
    "MEMORY_MITIGATIONS",
    "METRICS",
    "MITIGATIONS",
    "PER_PARAMETER",
    "CheckpointModel",
    "Confidence",
    "DataOptions",
    "DummyGrid",
    "ErrorGrid",
    "Spec",
    "SpecError",
    "Target",
    "canonical_json",
    "load_spec",
    "make_error",
    "parse_spec",
]

#: Mitigation names a spec may use (the runner maps each to its implementation).
MITIGATIONS = ("none", "clip", "clip-zero", "clip-profiled", "protect-bits", "abft", "ecc")
#: Mitigations that act on stored tensors only: meaningless for activation faults.
MEMORY_MITIGATIONS = ("protect-bits", "ecc")
#: Quality metrics a trial can record.
METRICS = ("auc", "logloss", "rmse")
#: Metrics that need labels (checkpoints only; dummy models have none).
LABEL_METRICS = ("auc", "logloss")
#: ``targets`` value that expands into one target per parameter of each model, at plan time.
PER_PARAMETER = "per-parameter"
#: Error models a campaign sweeps, with the keyword argument that is the sweep's x axis.
ERROR_MODELS: dict[str, tuple[type[errors.ErrorModel], str]] = {
    "BitFlip": (errors.BitFlip, "ber"),
    "StuckAt": (errors.StuckAt, "rate"),
    "RandomValue": (errors.RandomValue, "rate"),
    "Burst": (errors.Burst, "rate"),
    "FlipCount": (errors.FlipCount, "k"),
}
#: Highest bit position of the widest supported dtype (float64/int64).
MAX_BIT = 63
#: Synthetic input shape of the paper's dummy model (Table 1) unless a spec overrides it.
DUMMY_DENSE_DIM, DUMMY_SPARSE_DIM = 128, 8192

_TOP_KEYS = (
    "name",
    "seed",
    "runs",
    "confidence",
    "models",
    "data",
    "errors",
    "targets",
    "sites",
    "mitigations",
    "metrics",
)
_REQUIRED = object()

Check = Callable[[Any, str], Any]


class SpecError(ValueError):
    """A campaign spec that cannot be run; ``path`` is the offending key (``errors.rates[3]``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


# --- the parsed spec -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DataOptions:
    """Which rows of a checkpoint's data set are scored: ``split`` and its first ``max_rows`` (0: all)."""

    split: str = "test"
    max_rows: int = 0


@dataclass(frozen=True)
class CheckpointModel:
    """A trained model saved by ``pytei train``: its resolved directory and an optional display label."""

    checkpoint: str
    label: str | None = None

    @property
    def key(self) -> str:
        return f"ckpt:{self.checkpoint}"

    def expand(self, data: DataOptions) -> dict[str, dict]:
        """``{model key: how the runner builds it}`` (one entry)."""
        return {self.key: {"checkpoint": self.checkpoint, "split": data.split, "max_rows": data.max_rows}}


@dataclass(frozen=True)
class DummyGrid:
    """The paper's untrained dummy model over the product of the listed hyper-parameters (Table 1)."""

    mlp_depth: tuple[int, ...] = (1,)
    mlp_hidden: tuple[int, ...] = (64,)
    embed_dim: tuple[int, ...] = (64,)
    sparsity: tuple[float, ...] = (0.001,)
    dense_dim: tuple[int, ...] = (DUMMY_DENSE_DIM,)
    sparse_dim: tuple[int, ...] = (DUMMY_SPARSE_DIM,)
    samples: int = 2048

    def expand(self, data: DataOptions) -> dict[str, dict]:
        """``{model key: how the runner builds it}`` for every combination, in key order of Table 1."""
        out = {}
        grid = (
            self.mlp_depth,
            self.mlp_hidden,
            self.embed_dim,
            self.dense_dim,
            self.sparse_dim,
            self.sparsity,
        )
        for depth, hidden, embed, dense, sparse, sparsity in itertools.product(*grid):
            parts = [f"depth={depth}", f"hidden={hidden}", f"embed={embed}"]
            parts += [f"dense={dense}"] if dense != DUMMY_DENSE_DIM else []
            parts += [f"sparse={sparse}"] if sparse != DUMMY_SPARSE_DIM else []
            parts += [f"sparsity={sparsity!r}", f"samples={self.samples}"]
            config = {
                "mlp_depth": depth,
                "mlp_hidden": hidden,
                "embed_dim": embed,
                "dense_dim": dense,
                "sparse_dim": sparse,
            }
            out["dummy:" + ",".join(parts)] = {"dummy": config, "sparsity": sparsity, "samples": self.samples}
        return out


@dataclass(frozen=True)
class ErrorGrid:
    """An error model swept over ``rates`` (its x axis) and ``bit_sets`` (``(None,)``: all bits)."""

    model: str
    rates: tuple[float, ...]
    options: tuple[tuple[str, Any], ...] = ()
    bit_sets: tuple[tuple[int, ...] | None, ...] = (None,)

    def points(self) -> list[tuple[float, dict]]:
        """``(x value, error dict)`` for every rate and bit set, rate-major; builds each model once."""
        cls, swept = ERROR_MODELS[self.model]
        has_bits = any(f.name == "bits" for f in dataclasses.fields(cls))
        out = []
        for rate, bits in itertools.product(self.rates, self.bit_sets):
            kwargs = {swept: rate, **dict(self.options), **({"bits": bits} if has_bits else {})}
            out.append((rate, _error_dict(cls(**kwargs))))
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

    def selection(self) -> dict:
        """Keyword arguments of ``pytei.Injector`` that select this target's tensors."""
        return {
            "target": self.component[0] if len(self.component) == 1 else list(self.component),
            "params": self.params,
            "include": list(self.include) if self.include else None,
            "exclude": list(self.exclude) if self.exclude else None,
        }


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
    models: tuple[CheckpointModel | DummyGrid, ...]
    data: DataOptions
    errors: ErrorGrid
    targets: tuple[Target, ...]
    sites: tuple[str, ...]
    mitigations: tuple[str, ...]
    metrics: tuple[str, ...]
    confidence: Confidence | None
    text: str = field(default="", repr=False, compare=False)
    hash: str = field(default="", compare=False)

    def model_specs(self) -> dict[str, dict]:
        """``{model key: how the runner builds it}`` in spec order, dummy grids expanded."""
        out: dict[str, dict] = {}
        for m in self.models:
            out.update(m.expand(self.data))
        return out

    def model_labels(self) -> dict[str, str]:
        """Display labels given to checkpoints, by model key."""
        return {m.key: m.label for m in self.models if isinstance(m, CheckpointModel) and m.label}


def make_error(error: dict) -> errors.ErrorModel:
    """The error model an error dict (``{"model": "BitFlip", "ber": 1e-6, "bits": None}``) describes."""
    name = error.get("model")
    if name not in ERROR_MODELS:
        raise ValueError(f"unknown error model {name!r}; allowed: {', '.join(ERROR_MODELS)}")
    return ERROR_MODELS[name][0](**{k: v for k, v in error.items() if k != "model"})


def _error_dict(model: errors.ErrorModel) -> dict:
    """JSON-ready description of ``model`` with every field (defaults included), bits as a list."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in model.spec.items()}


def canonical_json(value: Any) -> str:
    """Key-sorted, compact JSON (dataclasses as dicts): equal values give equal text and hashes."""
    return json.dumps(value, default=_as_dict, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _as_dict(value: Any) -> dict:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# --- checkers: (value, key path) -> normalized value, or SpecError -------------------------------


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _int(minimum: int, maximum: int | None = None) -> Check:
    def check(value: Any, path: str) -> int:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if not (is_int and value >= minimum and (maximum is None or value <= maximum)):
            bound = f"in {minimum}..{maximum}" if maximum is not None else f">= {minimum}"
            raise SpecError(path, f"must be an int {bound}, got {_show(value)}")
        return value

    return check


def _number(low: float = -math.inf, high: float = math.inf, *, open_low: bool = False) -> Check:
    def check(value: Any, path: str) -> float:
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and low <= value <= high
        )
        if not ok or (open_low and value == low):
            raise SpecError(path, f"must be a {_describe_range(low, high, open_low)}, got {_show(value)}")
        return float(value)

    return check


def _describe_range(low: float, high: float, open_low: bool) -> str:
    if math.isinf(low):
        return "finite number"
    if math.isinf(high):
        return f"number {'>' if open_low else '>='} {low:g}"
    return f"number in {'(' if open_low else '['}{low:g}, {high:g}]"


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(path, f"must be a non-empty string, got {_show(value)}")
    return value


def _choice(allowed: Sequence[str]) -> Check:
    def check(value: Any, path: str) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise SpecError(path, f"must be one of {', '.join(allowed)}; got {_show(value)}")
        return value

    return check


def _many(
    check: Check, *, scalar: bool = True, distinct: bool = True, key: Callable[[Any], Any] | None = None
) -> Check:
    """A non-empty list of items passing ``check``, distinct (by ``key``) if asked; one bare item if
    ``scalar`` (``sites = "weights"``)."""

    def many(value: Any, path: str) -> tuple:
        if not isinstance(value, list):
            if scalar:
                return (check(value, path),)
            raise SpecError(path, f"must be a list, got {_show(value)}")
        if not value:
            raise SpecError(path, "must not be empty")
        items = tuple(check(v, f"{path}[{i}]") for i, v in enumerate(value))
        keys = [key(v) if key else v for v in items] if distinct else []
        for i, k in enumerate(keys):
            if keys.index(k) != i:
                raise SpecError(f"{path}[{i}]", f"repeats {path}[{keys.index(k)}] ({k!r})")
        return items

    return many


class _Table:
    """One TOML table: rejects unknown keys up front, then hands out checked values by key."""

    def __init__(self, value: Any, path: str, keys: Sequence[str]) -> None:
        if not isinstance(value, dict):
            raise SpecError(path, f"must be a table, got {_show(value)}")
        self.value, self.path = value, path
        for k in value:
            if k not in keys:
                raise SpecError(self.key(k), f"unknown key{self._hint(k, keys)}; allowed: {', '.join(keys)}")

    def _hint(self, k: str, keys: Sequence[str]) -> str:
        if self.path and k in _TOP_KEYS:  # the classic TOML slip: a top-level key below a [table]
            header = self.path.split(".")[0].split("[")[0]
            return f" (in TOML, keys below a [{header}] header belong to it: put {k} above the first table)"
        close = difflib.get_close_matches(k, keys, n=1)
        return f" (did you mean {close[0]!r}?)" if close else ""

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return name in self.value

    def get(self, name: str, check: Check, default: Any = _REQUIRED) -> Any:
        if name in self.value:
            return check(self.value[name], self.key(name))
        if default is _REQUIRED:
            raise SpecError(self.key(name), "required")
        return default


# --- sections ------------------------------------------------------------------------------------


def _model(value: Any, path: str, *, base: Path) -> CheckpointModel | DummyGrid:
    if not isinstance(value, dict):
        raise SpecError(path, f"must be a table, got {_show(value)}")
    is_ckpt, is_dummy = "checkpoint" in value, "dummy" in value
    if is_ckpt == is_dummy:
        raise SpecError(path, 'must have exactly one of checkpoint = "dir" or dummy = { ... }')
    if is_ckpt:
        t = _Table(value, path, ("checkpoint", "label"))
        where = Path(t.get("checkpoint", _string)).expanduser()
        return CheckpointModel(str((base / where).resolve()), t.get("label", _string, None))
    t = _Table(value, path, ("dummy", "samples"))
    return DummyGrid(**t.get("dummy", _dummy), samples=t.get("samples", _int(1), 2048))


def _dummy(value: Any, path: str) -> dict:
    size = _many(_int(1))
    checks = {
        "mlp_depth": _many(_int(1, 2)),
        "mlp_hidden": size,
        "embed_dim": size,
        "sparsity": _many(_number(0.0, 1.0)),
        "dense_dim": size,
        "sparse_dim": size,
    }
    t = _Table(value, path, tuple(checks))
    return {k: t.get(k, check, getattr(DummyGrid, k)) for k, check in checks.items()}


def _data(value: Any, path: str) -> DataOptions:
    t = _Table(value, path, ("split", "max_rows"))
    return DataOptions(t.get("split", _choice(("test", "valid")), "test"), t.get("max_rows", _int(0), 0))


#: Checks of the non-swept arguments of the error models, by argument name.
_OPTION_CHECKS: dict[str, Check] = {
    "value": _int(0, 1),
    "low": _number(),
    "high": _number(),
    "length": _int(1, MAX_BIT + 1),
}


def _bits(value: Any, path: str) -> tuple[int, ...]:
    return tuple(sorted(_many(_int(0, MAX_BIT))(value, path)))


def _errors(value: Any, path: str) -> ErrorGrid:
    if not isinstance(value, dict):
        raise SpecError(path, f"must be a table, got {_show(value)}")
    if "model" not in value:
        raise SpecError(f"{path}.model", f"required: one of {', '.join(ERROR_MODELS)}")
    name = _choice(tuple(ERROR_MODELS))(value["model"], f"{path}.model")
    cls, swept = ERROR_MODELS[name]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != swept}
    options = [f for n, f in fields.items() if n != "bits"]
    bit_keys = ("bits", "bit_sets") if "bits" in fields else ()
    t = _Table(value, path, ("model", "rates", *(f.name for f in options), *bit_keys))
    if t.has("bits") and t.has("bit_sets"):
        raise SpecError(
            t.key("bit_sets"), "give either bits (one set) or bit_sets (one point per set), not both"
        )
    if t.has("bits"):
        bit_sets: tuple = (t.get("bits", _bits),)
    else:
        bit_sets = t.get("bit_sets", _many(_bits, scalar=False), (None,))
    grid = ErrorGrid(
        model=name,
        rates=t.get("rates", partial(_rates, counts=swept == "k")),
        options=tuple((f.name, _option(t, f)) for f in sorted(options, key=lambda f: f.name)),
        bit_sets=bit_sets,
    )
    try:
        grid.points()
    except (ValueError, TypeError) as err:  # joint constraints the error model checks (low < high)
        raise SpecError(path, str(err)) from None
    return grid


def _option(t: _Table, f: dataclasses.Field) -> Any:
    """A non-swept argument of the error model; its own default when the spec leaves it out."""
    return t.get(f.name, _OPTION_CHECKS[f.name], _REQUIRED if f.default is dataclasses.MISSING else f.default)


def _rates(value: Any, path: str, *, counts: bool) -> tuple[float, ...]:
    """A list of rates in [0, 1] (of fault counts k >= 0 for FlipCount), or a log grid table."""
    if not isinstance(value, dict):
        return _many(_int(0) if counts else _number(0.0, 1.0))(value, path)
    if counts:
        raise SpecError(path, "FlipCount sweeps a fault count k: give a list of non-negative ints")
    t = _Table(value, path, ("start", "stop", "per_decade"))
    start = t.get("start", _number(0.0, 1.0, open_low=True))
    stop = t.get("stop", _number(start, 1.0))
    per_decade = t.get("per_decade", _int(1), 1)
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
        return Target(value, (_choice(("all", *COMPONENTS, PER_PARAMETER))(value, path),))
    t = _Table(value, path, ("component", "params", "include", "exclude", "label"))
    component = t.get("component", _many(_choice(("all", *COMPONENTS))), ("all",))
    include = t.get("include", _many(_string), None)
    exclude = t.get("exclude", _many(_string), None)
    patterns = [*(include or ()), *(f"-{p}" for p in exclude or ())]
    name = "+".join(component) + (f"[{','.join(patterns)}]" if patterns else "")
    return Target(
        name=t.get("label", _string, name),
        component=component,
        params=t.get("params", _choice(PARAM_KINDS), "all"),
        include=include,
        exclude=exclude,
    )


def _confidence(value: Any, path: str) -> Confidence:
    t = _Table(value, path, ("metric", "halfwidth", "level", "min_runs", "max_runs"))
    min_runs = t.get("min_runs", _int(2), 5)
    return Confidence(
        metric=t.get("metric", _choice(METRICS)),
        halfwidth=t.get("halfwidth", _number(0.0, open_low=True)),
        level=t.get("level", _number(0.0, 1.0, open_low=True), 0.95),
        min_runs=min_runs,
        max_runs=t.get("max_runs", _int(min_runs), 50),
    )


# --- whole spec ----------------------------------------------------------------------------------


def _check_models_distinct(models: tuple, data: DataOptions) -> None:
    owner: dict[str, int] = {}
    for i, m in enumerate(models):
        for key in m.expand(data):
            if key in owner:
                raise SpecError(f"models[{i}]", f"model {key} is also in models[{owner[key]}]")
            owner[key] = i


def _check_metrics(models: tuple, metrics: tuple[str, ...], confidence: Confidence | None) -> None:
    dummies = [i for i, m in enumerate(models) if isinstance(m, DummyGrid)]
    if dummies and "rmse" not in metrics:
        raise SpecError(
            "metrics",
            f"models[{dummies[0]}] is a dummy model: it has no labels and is scored by rmse only "
            f"(auc and logloss are skipped for it), so metrics must include rmse; got {list(metrics)}",
        )
    if confidence is None:
        return
    if confidence.metric not in metrics:
        raise SpecError("confidence.metric", f"must be one of metrics ({', '.join(metrics)})")
    if dummies and confidence.metric in LABEL_METRICS:
        raise SpecError(
            "confidence.metric", f"models[{dummies[0]}] is a dummy model without labels: use rmse"
        )


def _check_not_all_skipped(sites: tuple[str, ...], mitigations: tuple[str, ...]) -> None:
    if set(sites) == {"activations"} and set(mitigations) <= set(MEMORY_MITIGATIONS):
        raise SpecError(
            "mitigations",
            f"{', '.join(MEMORY_MITIGATIONS)} protect stored weights only, so with sites = "
            '["activations"] every trial would be skipped',
        )


def parse_spec(text: str, base_dir: str | Path = ".") -> Spec:
    """Validate TOML ``text``; relative checkpoint paths resolve against ``base_dir``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError("", f"not valid TOML: {err}") from None
    top = _Table(raw, "", _TOP_KEYS)
    confidence = top.get("confidence", _confidence, None)
    if confidence is not None and top.has("runs"):
        raise SpecError("runs", "conflicts with [confidence], whose min_runs and max_runs bound the runs")
    values = {
        "name": top.get("name", _string),
        "seed": top.get("seed", _int(0), 0),
        "runs": confidence.max_runs if confidence else top.get("runs", _int(1), 10),
        "models": top.get("models", _many(partial(_model, base=Path(base_dir).expanduser()), distinct=False)),
        "data": top.get("data", _data, DataOptions()),
        "errors": top.get("errors", _errors),
        "targets": top.get("targets", _many(_target, key=lambda t: t.name), (Target("all"),)),
        "sites": top.get("sites", _many(_choice(SITES)), ("weights",)),
        "mitigations": top.get("mitigations", _many(_choice(MITIGATIONS)), ("none",)),
        "metrics": top.get("metrics", _many(_choice(METRICS)), METRICS),
        "confidence": confidence,
    }
    _check_models_distinct(values["models"], values["data"])
    _check_metrics(values["models"], values["metrics"], confidence)
    _check_not_all_skipped(values["sites"], values["mitigations"])
    digest = hashlib.sha256(canonical_json(values).encode()).hexdigest()
    return Spec(**values, text=text, hash=digest)


def load_spec(path: str | Path) -> Spec:
    """Read and validate the spec file at ``path`` (relative checkpoints resolve against its folder)."""
    path = Path(path).expanduser()
    return parse_spec(path.read_text(encoding="utf-8"), path.parent)
