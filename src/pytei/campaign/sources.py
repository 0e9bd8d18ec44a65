"""Model sources: where a campaign's models come from, one registered source per kind of entry.

A ``[[models]]`` entry of a spec names its source by the key it has: ``checkpoint = "dir"`` (a model
trained by ``pytei train``, scored against its data set's labels), ``dummy = { ... }`` (the paper's
untrained dummy model over a grid of hyper-parameters, synthetic inputs), ``model = "name"`` (any
model registered with ``pytei.models.register``, e.g. in a plugin, on synthetic inputs) or
``sharded = "dir"`` (a trained TorchRec model served with its tables sharded over several processes,
one model per placement strategy and world size: ``pytei.distributed``). A source
parses its entry into a frozen dataclass that expands into ``{model key: model spec}`` (plain JSON
that trials carry and hash) and, in a worker, builds the model and the rows it is scored on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .. import models
from .._registry import OptionError, Registry, check_options
from ..checkpoint import load_checkpoint
from ..exceptions import ArgumentError
from .checks import SpecError, Table, integer, many, number, show, string
from .store import DUMMY_CONFIG_KEYS

__all__ = [
    "DUMMY_DENSE_DIM",
    "DUMMY_SPARSE_DIM",
    "CheckpointModel",
    "DataOptions",
    "DummyGrid",
    "Evaluation",
    "ModelEntry",
    "ModelSource",
    "RegisteredModel",
    "ShardedModel",
    "source_for",
    "sources",
]

#: Synthetic input shape of the paper's dummy model (Table 1) unless a spec overrides it.
DUMMY_DENSE_DIM, DUMMY_SPARSE_DIM = 128, 8192


@dataclass(frozen=True)
class DataOptions:
    """Which rows of a checkpoint's data set are scored: ``split`` and its first ``max_rows`` (0: all)."""

    split: str = "test"
    max_rows: int = 0


@dataclass
class Evaluation:
    """A model and the rows it is scored on, cut into a fixed batch partition.

    ``label`` is the model's architecture (its registry name); ``labels`` are None for models
    scored against their own clean outputs only (dummy and registered models).
    """

    key: str
    label: str
    dataset: str
    model: nn.Module
    batches: list[tuple[torch.Tensor, ...]]
    labels: torch.Tensor | None
    calibration: list[tuple[torch.Tensor, ...]] = field(default_factory=list)


class ModelEntry(Protocol):
    """A parsed ``[[models]]`` entry."""

    label: str | None

    def expand(self, data: DataOptions) -> dict[str, dict]: ...


class ModelSource(Protocol):
    """A kind of ``[[models]]`` entry, recognised by its ``key``."""

    key: str
    labelled: bool
    """Whether its models have labels (label metrics such as auc apply to them)."""

    def parse(self, value: dict, path: str, base: Path) -> ModelEntry: ...

    def build(self, model_spec: dict) -> nn.Module: ...

    def load(self, key: str, model_spec: dict, batch_size: int) -> Evaluation: ...

    def architecture(self, model_spec: dict) -> str: ...

    def config(self, model_spec: dict) -> dict | None: ...


#: Model sources by the key that marks their entries (``checkpoint``, ``dummy``, ``model``).
sources: Registry[ModelSource] = Registry("model source")


def source_for(model_spec: dict) -> ModelSource:
    """The source that built ``model_spec`` (the one whose key it has)."""
    for name in sources.names():
        if name in model_spec:
            return sources.get(name)
    raise ValueError(f"no model source for {model_spec!r}; sources: {', '.join(sources.names())}")


def _cut(inputs: tuple[torch.Tensor, ...], batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    n = inputs[0].shape[0]
    return [tuple(t[i : i + batch_size] for t in inputs) for i in range(0, n, batch_size)]


def _original_split(data: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The original PyTEI code's test rows (``pytei reproduce --compat original-split``): as many rows
    as the test split, drawn from the whole data set, training rows included. The original re-drew
    them unseeded at every evaluation; one seeded draw per model keeps trials paired."""
    parts = (data.train, data.valid, data.test)
    inputs = tuple(torch.cat(ts) for ts in zip(*(p.inputs for p in parts), strict=True))
    labels = torch.cat([p.labels for p in parts])
    rows = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(0))[
        : len(data.test.labels)
    ]
    return tuple(t[rows] for t in inputs), labels[rows]


# --- checkpoints -----------------------------------------------------------------------------------


def _architecture(meta: dict) -> str:
    """A checkpoint's architecture: its model's registry name, and the dtype of a quantized one
    (``dlrm-torchrec/int8``), so that the quantized versions of one model are told apart."""
    quantization = meta["model"].get("quantization")
    name = str(meta["model"]["name"])
    return f"{name}/{quantization['dtype']}" if quantization else name


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


class CheckpointSource:
    """``checkpoint = "dir"`` (relative to the spec's folder): scored on its data set's split."""

    key = "checkpoint"
    labelled = True

    def parse(self, value: dict, path: str, base: Path) -> CheckpointModel:
        t = Table(value, path, ("checkpoint", "label"))
        where = Path(t.get("checkpoint", string)).expanduser()
        return CheckpointModel(str((base / where).resolve()), t.get("label", string, None))

    def build(self, model_spec: dict) -> nn.Module:
        return load_checkpoint(model_spec["checkpoint"], with_data=False).model

    def architecture(self, model_spec: dict) -> str:
        return ""  # known once loaded (the checkpoint's metadata)

    def config(self, model_spec: dict) -> dict | None:
        return None

    def load(self, key: str, model_spec: dict, batch_size: int) -> Evaluation:
        ckpt = load_checkpoint(model_spec["checkpoint"])
        if ckpt.data is None:
            raise ValueError(f"checkpoint {model_spec['checkpoint']} was loaded without its data")
        if model_spec.get("split") == "original":
            inputs, labels = _original_split(ckpt.data)
        else:
            split = ckpt.data.valid if model_spec.get("split") == "valid" else ckpt.data.test
            inputs, labels = split.inputs, split.labels
        if model_spec.get("max_rows"):
            inputs = tuple(t[: model_spec["max_rows"]] for t in inputs)
            labels = labels[: model_spec["max_rows"]]
        calib_split = ckpt.data.train if model_spec.get("split") == "valid" else ckpt.data.valid
        calib = tuple(t[: 4 * batch_size] for t in calib_split.inputs)
        collate = ckpt.data.model_inputs  # e.g. layout dense+kjt: a batch's ids as a KeyedJaggedTensor
        return Evaluation(
            key=key,
            label=_architecture(ckpt.meta),
            dataset=ckpt.meta["data"]["name"],
            model=ckpt.model.eval(),
            batches=[collate(b) for b in _cut(tuple(t.contiguous() for t in inputs), batch_size)],
            labels=labels.clone(),
            calibration=[collate(b) for b in _cut(calib, batch_size)],
        )


# --- the paper's dummy model ---------------------------------------------------------------------


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


class DummySource:
    """``dummy = { mlp_depth = [1, 2], ... }``: the paper's dummy model, scored by rmse only."""

    key = "dummy"
    labelled = False

    def parse(self, value: dict, path: str, base: Path) -> DummyGrid:
        t = Table(value, path, ("dummy", "samples"))
        return DummyGrid(**t.get("dummy", _dummy), samples=t.get("samples", integer(1), 2048))

    def build(self, model_spec: dict) -> nn.Module:
        return models.create("dummy", seed=model_spec.get("model_seed", 0), **model_spec["dummy"]).eval()

    def architecture(self, model_spec: dict) -> str:
        return "dummy"

    def config(self, model_spec: dict) -> dict | None:
        point = {**model_spec["dummy"], "sparsity": model_spec["sparsity"], "samples": model_spec["samples"]}
        point.setdefault("dense_dim", DUMMY_DENSE_DIM)
        point.setdefault("sparse_dim", DUMMY_SPARSE_DIM)
        return {k: point[k] for k in DUMMY_CONFIG_KEYS}

    def load(self, key: str, model_spec: dict, batch_size: int) -> Evaluation:
        dummy = dict(model_spec["dummy"])
        model = self.build(model_spec)
        shape = {k: dummy[k] for k in ("dense_dim", "sparse_dim") if k in dummy}
        sparsity, samples = model_spec["sparsity"], model_spec["samples"]
        inputs = models.dummy_inputs(samples, sparsity=sparsity, seed=0, **shape)
        calib = models.dummy_inputs(min(samples, 4 * batch_size), sparsity=sparsity, seed=1, **shape)
        return Evaluation(
            key=key,
            label="dummy",
            dataset=f"synthetic (sparsity {sparsity:g})",
            model=model,
            batches=_cut(inputs, batch_size),
            labels=None,
            calibration=_cut(calib, batch_size),
        )


def _dummy(value: Any, path: str) -> dict:
    size = many(integer(1))
    checks = {
        "mlp_depth": many(integer(1, 2)),
        "mlp_hidden": size,
        "embed_dim": size,
        "sparsity": many(number(0.0, 1.0)),
        "dense_dim": size,
        "sparse_dim": size,
    }
    t = Table(value, path, tuple(checks))
    return {k: t.get(k, check, getattr(DummyGrid, k)) for k, check in checks.items()}


# --- any registered model (a plugin's) on synthetic inputs -------------------------------------------


@dataclass(frozen=True)
class RegisteredModel:
    """A model registered with ``pytei.models.register``, built from ``config`` (seeded), scored on
    ``samples`` synthetic inputs against its own clean outputs (it has no labels)."""

    model: str
    config: tuple[tuple[str, Any], ...] = ()
    samples: int = 1024
    label: str | None = None

    @property
    def key(self) -> str:
        args = ",".join(f"{k}={v!r}" for k, v in self.config)
        return f"model:{self.model}" + (f"({args})" if args else "")

    def expand(self, data: DataOptions) -> dict[str, dict]:
        return {self.key: {"model": self.model, "config": dict(self.config), "samples": self.samples}}


def synthetic_inputs(model: nn.Module, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``n`` inputs for ``model``: its own ``example_inputs(n, seed)`` if it defines one, else drawn
    for its ``input_layout`` (``dummy``: dense N(0, 1) + sparse 0/1; ``categorical``: uniform
    indices below each of ``config["field_dims"]``)."""
    make: Callable[..., Any] | None = getattr(model, "example_inputs", None)
    if callable(make):
        out = make(n, seed)
        return tuple(out) if isinstance(out, tuple | list) else (out,)
    config = dict(getattr(model, "config", {}))
    layout = getattr(model, "input_layout", "")
    if layout == "dummy":
        shape = {k: config[k] for k in ("dense_dim", "sparse_dim") if k in config}
        return models.dummy_inputs(n, seed=seed, sparsity=0.01, **shape)
    if layout == "categorical" and "field_dims" in config:
        g = torch.Generator().manual_seed(seed)
        dims = torch.tensor(list(config["field_dims"]), dtype=torch.float64)
        u = torch.rand(n, len(dims), generator=g, dtype=torch.float64)
        return ((u * dims).to(torch.int64),)
    raise ArgumentError(
        f"model {type(model).__name__} (input_layout {layout!r}) cannot be given synthetic inputs: "
        "define example_inputs(self, n: int, seed: int) -> tuple of input tensors"
    )


class RegisteredSource:
    """``model = "name"`` (optionally ``config = { ... }``, ``samples``, ``label``): a registered model."""

    key = "model"
    labelled = False

    def parse(self, value: dict, path: str, base: Path) -> RegisteredModel:
        t = Table(value, path, ("model", "config", "samples", "label"))
        name = t.get("model", string)
        if name not in models.register:
            raise SpecError(
                t.key("model"),
                f"unknown model {name!r}; registered: {', '.join(models.names())} "
                '(a plugin registers more: plugins = ["my_pkg.models"] or --plugin)',
            )
        raw = t.get("config", _table, {})
        try:
            config = check_options(models.get(name), raw, what=f"model {name!r}")
        except OptionError as err:
            raise SpecError(t.key(f"config.{err.key}"), str(err)) from err
        samples = t.get("samples", integer(1), 1024)
        return RegisteredModel(name, tuple(sorted(config.items())), samples, t.get("label", string, None))

    def build(self, model_spec: dict) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same weights in every worker, without touching the caller's RNG
            return models.create(model_spec["model"], **model_spec["config"]).eval()

    def architecture(self, model_spec: dict) -> str:
        return str(model_spec["model"])

    def config(self, model_spec: dict) -> dict | None:
        return None

    def load(self, key: str, model_spec: dict, batch_size: int) -> Evaluation:
        model = self.build(model_spec)
        n = model_spec["samples"]
        return Evaluation(
            key=key,
            label=model_spec["model"],
            dataset="synthetic",
            model=model,
            batches=_cut(tuple(t.contiguous() for t in synthetic_inputs(model, n, 0)), batch_size),
            labels=None,
            calibration=_cut(synthetic_inputs(model, min(n, 4 * batch_size), 1), batch_size),
        )


def _table(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise SpecError(path, f"must be a table, got {show(value)}")
    return value


# --- a TorchRec model sharded over several processes (distributed inference) -------------------------


@dataclass(frozen=True)
class ShardedModel:
    """A trained TorchRec model served by ``world_sizes`` processes with its tables placed by each of
    ``strategies`` (``pytei.distributed.STRATEGIES``): one model per (strategy, world size)."""

    checkpoint: str
    strategies: tuple[str, ...]
    world_sizes: tuple[int, ...] = (2,)
    batch_size: int = 256
    latency_batch: int = 128
    latency_requests: int = 30
    latency_pooling: int = 1
    label: str | None = None

    def expand(self, data: DataOptions) -> dict[str, dict]:
        """``{model key: how the runner builds it}``, world size major (``sharded:DIR:table_wise x2``, with
        `` pooling 8`` where the timed requests have 8 ids per bag)."""
        out = {}
        pooling = f" pooling {self.latency_pooling}" if self.latency_pooling != 1 else ""
        for world, strategy in itertools.product(self.world_sizes, self.strategies):
            out[f"sharded:{self.checkpoint}:{strategy} x{world}{pooling}"] = {
                "sharded": self.checkpoint,
                "strategy": strategy,
                "world_size": world,
                "max_rows": data.max_rows,
                "batch_size": self.batch_size,
                "latency": [self.latency_batch, self.latency_requests, self.latency_pooling],
            }
        return out


def _strategy(value: Any, path: str) -> str:
    from ..distributed._plan import check_strategy  # no torchrec import: the names and their rules

    try:
        return check_strategy(value)
    except ArgumentError as err:
        raise SpecError(path, str(err)) from err


class ShardedSource:
    """``sharded = "dir"`` with ``strategies``, ``world_sizes``, ``batch_size`` (rows per rank and step),
    ``latency = { batch, requests, pooling }`` (the timed requests: rows per rank, how many, ids per
    bag) and ``label``: the checkpoint's TorchRec model sharded over
    ``world_size`` processes (gloo on loopback), scored on its test split. Its trials run on the
    ranks (global faults, drawn on the unsharded model, and the spec's ``host_faults``); the spec's
    mitigations other than ``none`` do not apply to it."""

    key = "sharded"
    labelled = True

    def parse(self, value: dict, path: str, base: Path) -> ShardedModel:
        from ..distributed._plan import GPU_ONLY, STRATEGIES

        keys = ("sharded", "strategies", "world_sizes", "batch_size", "latency", "label")
        t = Table(value, path, keys)
        where = Path(t.get("sharded", string)).expanduser()
        cpu = tuple(s for s in STRATEGIES if s not in GPU_ONLY)
        latency = Table(value.get("latency", {}), t.key("latency"), ("batch", "requests", "pooling"))
        return ShardedModel(
            checkpoint=str((base / where).resolve()),
            strategies=t.get("strategies", many(_strategy), cpu),
            world_sizes=t.get("world_sizes", many(integer(1, 64)), (2,)),
            batch_size=t.get("batch_size", integer(1), 256),
            latency_batch=latency.get("batch", integer(1), 128),
            latency_requests=latency.get("requests", integer(1), 30),
            latency_pooling=latency.get("pooling", integer(1, 4096), 1),
            label=t.get("label", string, None),
        )

    def build(self, model_spec: dict) -> nn.Module:
        """The unsharded model (its parameter names are the sharded model's logical names)."""
        return load_checkpoint(model_spec["sharded"], with_data=False).model

    def architecture(self, model_spec: dict) -> str:
        return ""  # known once loaded (the checkpoint's metadata)

    def config(self, model_spec: dict) -> dict | None:
        pooling = int(model_spec["latency"][2])
        out = {"strategy": model_spec["strategy"], "world_size": model_spec["world_size"]}
        return {**out, "pooling": pooling} if pooling != 1 else out

    def load(self, key: str, model_spec: dict, batch_size: int) -> Evaluation:
        """The unsharded model on the same test rows: the reference a sharded model must equal."""
        unsharded = {"checkpoint": model_spec["sharded"], "split": "test", "max_rows": model_spec["max_rows"]}
        return CheckpointSource().load(key, unsharded, batch_size)


sources("checkpoint", CheckpointSource())
sources("dummy", DummySource())
sources("model", RegisteredSource())
sources("sharded", ShardedSource())
