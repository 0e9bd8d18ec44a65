"""Evaluate a model over fixed batches, recomputing per trial only the graph nodes its faults reach.

The clean pass runs the captured graph node by node over every batch and keeps the values of the
nodes worth keeping (the most saved compute per byte, within a memory budget). A trial then marks
*dirty* the nodes that read a faulted tensor (``get_attr`` of a parameter, calls of a module that
holds it) or a module hooked for activation faults, and everything downstream of them; only those
are executed again, with their clean inputs taken from the cache (or recomputed when not kept).

Embedding tables are finer: a faulted row reaches only the samples that read it (their ids are
recorded in the clean pass), so a batch whose samples read no faulted row is skipped, and where the
model is per-sample the affected samples alone are recomputed as a sub-batch and merged into the
clean outputs. TorchRec embedding collections (EBC/EC, float or quantized) are one node each, fed a
``KeyedJaggedTensor``: the samples that read a row of a table are those whose ids, under any of the
features the table serves, include it; a sub-batch of a KJT keeps each chosen sample's ids in order.
Results are bit-identical to a full evaluation: batches keep their composition, recomputed nodes
run the same kernels on the same inputs, and sub-batches are used only at sizes verified, on the
clean run, to give the rows of the full batch bit for bit.
"""

from __future__ import annotations

import operator
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..errors import Faults
from ._budget import default_budget, storage_ptr, storages
from ._capture import capture, hooked_modules
from ._jagged import Collection, batch_rows, collections, feature_reads, take

__all__ = ["CacheReport", "IncrementalEvaluator", "Outcome", "PATHS"]

#: How a trial's outputs were computed, from cheapest to dearest.
PATHS = ("clean", "rows", "samples", "subgraph", "full")
#: Smallest sub-batch; sizes double from it up to (not including) the batch size.
_MIN_BUCKET = 8
#: Smallest number of a Linear's output features recomputed alone (narrower GEMMs change kernels).
_MIN_COLUMNS = 16
_COMPUTE_OPS = ("call_module", "call_function", "call_method")
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
#: Where a table site's faults land: the nodes to re-run whole (a mask), the faulted rows per (node, table).
_Placement = tuple[int, dict[tuple[int, str], torch.Tensor]]
#: The placement of a table site that no graph node reads (the trial is evaluated in full).
_UNPLACED: _Placement = (-1, {})


@dataclass
class Outcome:
    """A trial's outputs (float32, one per row), the path that computed them, and the rows recomputed
    (the only ones that can differ from the clean outputs; all rows for ``full``), and how often a
    Linear layer was re-run on a few output features only."""

    outputs: torch.Tensor
    path: str
    recomputed: torch.Tensor
    narrowed: int = 0
    """How many (Linear node, batch) pairs re-ran only the output features their faults touch."""


@dataclass
class CacheReport:
    """What the cache holds: ``used`` of ``budget`` bytes (measured over unique storages), and the
    node values kept and dropped (named ``graph node``), over all captured graphs and variants."""

    budget: int
    used: int
    needed: int
    kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        mib = 1 << 20
        text = (
            f"cache {self.used / mib:.1f} MiB of a {self.budget / mib:.1f} MiB budget "
            f"({len(self.kept)} node values kept"
        )
        if self.dropped:
            shown = ", ".join(self.dropped[:5]) + (", ..." if len(self.dropped) > 5 else "")
            text += f"; {len(self.dropped)} dropped ({self.needed / mib:.1f} MiB to keep all): {shown}"
        return text + ")"


def _same(a: Any, b: Any) -> bool:
    """Bit-identical values (NaN payloads and signed zeros included)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() or a.is_complex():
            a, b = a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
        return bool(torch.equal(a, b))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b) if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) else False


_INPLACE_OPERATORS = {
    operator.setitem,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
    operator.imatmul,
}


def _writes_inputs(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether a node may write into one of its inputs (``x += y``, ``x.add_(y)``, ``inplace=True``)."""
    if node.kwargs.get("inplace"):
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.endswith("__"))
    if node.op == "call_module":
        return bool(getattr(modules[str(node.target)], "inplace", False))
    return False


def _columns(module: nn.Linear, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Output features ``idx`` of ``module(x)``, computed alone."""
    bias = module.bias.index_select(0, idx) if module.bias is not None else None
    return nn.functional.linear(x, module.weight.index_select(0, idx), bias)


def _written(g: _Graph, env: Mapping[int, Any]) -> set[int]:
    """Storages that in-place nodes write into (their first tensor input's), in this clean pass."""
    out: set[int] = set()
    for i, writes in enumerate(g.inplace):
        if writes:
            for j in g.inputs[i][:1]:
                out.update(storages(env.get(j)))
    return out


def _bits(mask: int) -> list[int]:
    out, i = [], 0
    while mask:
        if mask & 1:
            out.append(i)
        mask >>= 1
        i += 1
    return out


class _Graph:
    """One captured graph: its nodes in order, who depends on whom, and which nodes read which storage."""

    def __init__(self, model: nn.Module, graph: fx.Graph, leaves: frozenset[str]) -> None:
        self.leaves = leaves
        self.nodes: list[fx.Node] = list(graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.inputs = [[self.pos[a] for a in n.all_input_nodes] for n in self.nodes]
        self.output = next(i for i, n in enumerate(self.nodes) if n.op == "output")
        inputs = [i for i, n in enumerate(self.nodes) if n.op == "placeholder"]
        self.placeholders = {i: k for k, i in enumerate(inputs)}
        self.modules = dict(model.named_modules())
        self.model = model
        self.desc = [0] * len(self.nodes)
        for i in reversed(range(len(self.nodes))):
            mask = 1 << i
            for u in self.nodes[i].users:
                mask |= self.desc[self.pos[u]]
            self.desc[i] = mask
        self.anc = [0] * len(self.nodes)
        for i in range(len(self.nodes)):
            mask = 1 << i
            for j in self.inputs[i]:
                mask |= self.anc[j]
            self.anc[i] = mask
        self.inplace = [_writes_inputs(n, self.modules) for n in self.nodes]
        self.uncacheable = 0
        self.by_storage: dict[int, int] = {}
        self.embeddings: dict[int, nn.Module] = {}
        self.linears: dict[int, nn.Linear] = {}
        self.collections: dict[int, Collection] = {}
        self.tabled = collections(model)
        self.called: set[str] = set()
        for i, n in enumerate(self.nodes):
            if n.op == "call_module":
                module = self.modules[str(n.target)]
                self.called.add(str(n.target))
                tensors = [
                    *(p for _, p in module.named_parameters(remove_duplicate=False)),
                    *(t for _, t in module.named_buffers(remove_duplicate=False)),
                ]
                if isinstance(module, _EMBEDDINGS) and getattr(module, "max_norm", None) is None:
                    self.embeddings[i] = module
                if type(module) is nn.Linear and len(n.args) == 1 and not n.kwargs and self.inputs[i]:
                    self.linears[i] = module
                if str(n.target) in self.tabled:
                    self.collections[i] = self.tabled[str(n.target)]
            elif n.op == "get_attr":
                value = self.attr(str(n.target))
                tensors = [value] if isinstance(value, torch.Tensor) else []
            else:
                continue
            for t in tensors:
                ptr = storage_ptr(t)
                self.by_storage[ptr] = self.by_storage.get(ptr, 0) | (1 << i)

    def attr(self, target: str) -> Any:
        obj: Any = self.model
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def name(self, i: int) -> str:
        return self.nodes[i].name

    def calls(self, module: str) -> list[int] | None:
        """The module-call nodes that run ``module`` (its own calls, or calls of the leaf holding it);
        None when it runs inside traced code (modules under it are called, itself never)."""
        nodes = [
            i
            for i, n in enumerate(self.nodes)
            if n.op == "call_module" and (n.target == module or module.startswith(f"{n.target}."))
        ]
        if not nodes and any(c.startswith(f"{module}.") for c in self.called):
            return None
        return nodes

    def arguments(self, i: int, env: dict[int, Any]) -> tuple[Any, Any]:
        """Node ``i``'s args and kwargs with its input nodes replaced by their values in ``env``."""
        node = self.nodes[i]
        args = fx.node.map_arg(node.args, lambda n: env[self.pos[n]])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[self.pos[n]])
        return args, kwargs

    def execute(self, i: int, env: dict[int, Any]) -> Any:
        node = self.nodes[i]
        args, kwargs = self.arguments(i, env)
        if node.op == "call_module":
            return self.modules[str(node.target)](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, str(node.target))(*rest, **kwargs)
        if node.op == "get_attr":
            return self.attr(str(node.target))
        if node.op == "output":
            return args[0]
        raise RuntimeError(f"cannot execute graph node {node.format_node()}")


class _Reads:
    """Which sample of which batch reads which row of one embedding node, sorted by row, so that the
    readers of a trial's faulted rows are found in O(faulted rows x log reads)."""

    def __init__(self, per_batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        ids = torch.cat([ids for ids, _ in per_batch])
        self.rows, order = torch.sort(ids, stable=True)
        batch = torch.cat(
            [torch.full((len(ids),), b, dtype=torch.int64) for b, (ids, _) in enumerate(per_batch)]
        )
        self.batch = batch[order]
        self.sample = torch.cat([sample for _, sample in per_batch])[order]

    def readers(self, bad: torch.Tensor) -> dict[int, torch.Tensor]:
        """``{batch: samples}`` that read any of the rows ``bad``."""
        lo = torch.searchsorted(self.rows, bad, right=False)
        counts = torch.searchsorted(self.rows, bad, right=True) - lo
        total = int(counts.sum())
        if not total:
            return {}
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.repeat_interleave(lo - starts, counts) + torch.arange(total, dtype=torch.int64)
        batch, sample = self.batch[pos], self.sample[pos]
        out: dict[int, torch.Tensor] = {}
        for b in torch.unique(batch).tolist():
            out[b] = sample[batch == b]
        return out


@dataclass
class _Variant:
    """The clean state of one mitigation variant on one graph."""

    name: str
    graph: _Graph
    base: _Variant | None
    dependent: int
    outputs: list[Any] = field(default_factory=list)
    flat: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    bounds: list[int] = field(default_factory=list)
    values: dict[int, list[Any]] = field(default_factory=dict)
    reads: dict[tuple[int, str], _Reads] = field(default_factory=dict)
    """Per (embedding node, table): who reads which row; the table is ``""`` for torch's own layers."""
    hooks: frozenset[str] = frozenset()
    """The modules that had hooks in the clean pass (``""``: the model itself)."""
    buckets: list[int] = field(default_factory=list)
    sliceable: int = 0
    plans: dict[tuple[int, bool], list[int]] = field(default_factory=dict)
    columns: dict[int, list[int]] = field(default_factory=dict)

    def cached(self, i: int, b: int) -> Any:
        if i in self.values:
            return self.values[i][b]
        if self.base is not None and not (self.dependent >> i) & 1 and i in self.base.values:
            return self.base.values[i][b]
        return None

    def has(self, i: int) -> bool:
        if i in self.values:
            return True
        return self.base is not None and not (self.dependent >> i) & 1 and i in self.base.values

    def rows_read(self, key: tuple[int, str]) -> _Reads | None:
        if key in self.reads:
            return self.reads[key]
        if self.base is not None and not (self.dependent >> key[0]) & 1:
            return self.base.reads.get(key)
        return None


def _read_rows(
    module: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids read, output row of each id) of one embedding call: which sample reads which row."""
    ids = (args[0] if args else kwargs["input"]).detach()
    if ids.dim() >= 2 or (isinstance(module, nn.Embedding) and ids.dim() == 1):
        per = ids[0].numel() if ids.dim() >= 2 else 1
        sample = torch.arange(ids.shape[0], dtype=torch.int64, device=ids.device).repeat_interleave(per)
        return ids.reshape(-1).to(torch.int64).cpu(), sample.cpu()
    offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
    if offsets is None:  # a 1-D EmbeddingBag input needs offsets; treat it as one bag
        return ids.to(torch.int64).cpu(), torch.zeros(ids.numel(), dtype=torch.int64)
    pos = torch.arange(ids.numel(), dtype=torch.int64, device=ids.device)
    sample = torch.searchsorted(offsets.to(torch.int64), pos, right=True) - 1
    return ids.to(torch.int64).cpu(), sample.cpu()


class IncrementalEvaluator:
    """Clean outputs of ``model`` over ``batches`` and, per trial, outputs under its faults computed by
    recomputing only what they reach.

    ``budget`` is the cache's memory in bytes (default: ``DEFAULT_FRACTION`` of the RAM available);
    a model that cannot be captured as a graph, or whose graph does not reproduce its eager outputs
    bit for bit, is evaluated in full (a warning says so once). Call :meth:`prepare` once per
    variant (a mitigation attached, no faults), then :meth:`evaluate` per trial in the same state
    plus faults.
    """

    def __init__(
        self, model: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]], *, budget: int | None = None
    ) -> None:
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(f"cache budget must be an int number of bytes >= 0, got {budget!r}")
        self.model = model
        self.batches = list(batches)
        self.budget = default_budget() if budget is None else budget
        self.reason: str | None = None
        #: Graphs by their leaves and the storages the model's tensors live in (a mitigation may move
        #: parameters into storage of its own while attached, as fused ABFT does).
        self._graphs: dict[tuple[frozenset[str], tuple[int, ...]], _Graph] = {}
        self._variants: dict[str, _Variant] = {}
        self._ratios: dict[tuple[int, int], float] = {}
        self._needed: dict[tuple[int, int], int] = {}
        self._dropped: set[tuple[int, int]] = set()
        self._warned = False
        self._tensors = {
            **dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False)),
        }
        #: Storages that exist anyway (inputs, parameters, buffers): keeping views of them costs nothing.
        self._fixed = {p for b in self.batches for t in b for p in storages(t)} | {
            storage_ptr(t) for t in self._tensors.values()
        }

    # --- clean passes ------------------------------------------------------------------------

    @property
    def incremental(self) -> bool:
        """Whether trials can be evaluated incrementally (the model was captured)."""
        return self.reason is None

    def _fallback(self, reason: str) -> None:
        self.reason = reason
        self._variants.clear()
        self._graphs.clear()
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{type(self.model).__name__}: {reason}; trials are evaluated in full", stacklevel=3
            )

    def _graph(self, leaves: frozenset[str]) -> _Graph | None:
        key = (leaves, tuple(storage_ptr(t) for t in self._tensors.values()))
        if key not in self._graphs:
            graph = capture(self.model, leaves)
            if isinstance(graph, str):
                self._fallback(f"cannot be captured as a torch.fx graph ({graph})")
                return None
            self._graphs[key] = _Graph(self.model, graph, leaves)
        return self._graphs[key]

    @torch.no_grad()
    def prepare(self, variant: str, reference: torch.Tensor, *, per_sample: bool = True) -> None:
        """Run the clean pass of ``variant`` (the model as it is now: its mitigation attached, no
        faults) and keep what trials need. ``reference`` is the eager clean output (float32, one per
        row): the graph must reproduce it bit for bit, else the model is evaluated in full.
        ``per_sample``: whatever is attached acts on each sample alone, so sub-batches may be tried."""
        if self.reason is not None or variant in self._variants:
            return
        hooked = hooked_modules(self.model)
        if self.model._forward_pre_hooks:
            self._fallback("the model itself has forward pre-hooks, which a captured graph cannot run")
            return
        g = self._graph(hooked - {""})
        if g is None:
            return
        base = self._variants.get("none") if variant != "none" else None
        if base is not None and base.graph is not g:
            base = None
        dependent = 0
        for name in hooked - {""}:
            for i in g.calls(name) or ():
                dependent |= g.desc[i]
        v = _Variant(variant, g, base, dependent if base is not None else (1 << len(g.nodes)) - 1)
        v.hooks = hooked
        first = not any(var.graph is g for var in self._variants.values())
        costs: list[float] = [0.0] * len(g.nodes)
        sizes: list[dict[int, int]] = [{} for _ in g.nodes]
        keep: list[int] | None = None
        generator = torch.Generator().manual_seed(0)
        last = len(self.batches) - 1
        per_sample = per_sample and not self.model.training
        verified: set[int] | None = None
        sliceable = -1
        reads: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for b, batch in enumerate(self.batches):
            env = self._run_all(g, batch, costs if b == 0 else None)
            final = self._finish(batch, env[g.output])
            v.outputs.append(final)
            for i, module in g.embeddings.items():
                if (b == 0 and v.rows_read((i, "")) is None) or (i, "") in reads:
                    args, kwargs = g.arguments(i, env)
                    reads.setdefault((i, ""), []).append(_read_rows(module, args, kwargs))
            for i, collection in g.collections.items():
                args, kwargs = g.arguments(i, env)
                kjt = args[0] if args else kwargs.get("features")
                if collection.remapped or batch_rows(kjt) is None or isinstance(kjt, torch.Tensor):
                    continue
                for table, features in collection.features.items():
                    if (b == 0 and v.rows_read((i, table)) is None) or (i, table) in reads:
                        reads.setdefault((i, table), []).append(feature_reads(kjt, features))
            if b == 0:
                written = _written(g, env)
                for i in range(len(g.nodes)):
                    if i in env and g.nodes[i].op in _COMPUTE_OPS:
                        held = storages(env[i])
                        if written & held.keys():  # a later op writes into it: a kept value goes stale
                            g.uncacheable |= 1 << i
                        sizes[i] = {p: n for p, n in held.items() if p not in self._fixed}
                keep = self._select(g, v, costs, sizes, first)
                for i in keep:
                    v.values[i] = []
            for i in v.values:
                v.values[i].append(env[i])
            if b in (0, last):
                self._verify_columns(g, v, env, hooked, b == 0)
            if per_sample and b in (0, last):
                ok, mask = self._verify(g, batch, env, final, generator)
                verified = set(ok) if verified is None else verified & set(ok)
                sliceable &= mask
        v.reads = {i: _Reads(per_batch) for i, per_batch in reads.items()}
        v.buckets = sorted(verified or ())
        v.sliceable = sliceable if v.buckets else 0
        v.flat = torch.cat([o.float().reshape(-1) for o in v.outputs])
        v.bounds = [0]
        for o in v.outputs:
            v.bounds.append(v.bounds[-1] + o.numel())
        rows = [(batch_rows(batch[0]) or -1) if batch else 0 for batch in self.batches]
        if v.bounds[1:] != list(torch.tensor(rows).cumsum(0).tolist()):
            v.buckets, v.sliceable = [], 0  # outputs are not one per sample: no sub-batches
        if not _same(v.flat, reference.float().reshape(-1)):
            self._fallback("its captured graph does not reproduce the eager outputs bit for bit")
            return
        self._variants[variant] = v
        self._enforce_budget()

    def _finish(self, inputs: tuple[torch.Tensor, ...], output: Any) -> Any:
        """The graph's output passed through the model's own forward hooks, as ``model(*inputs)`` does."""
        root = self.model
        for key, hook in root._forward_hooks.items():
            if key in root._forward_hooks_with_kwargs:
                result = hook(root, inputs, {}, output)
            else:
                result = hook(root, inputs, output)
            if result is not None:
                output = result
        return output

    def _run_all(
        self, g: _Graph, batch: tuple[torch.Tensor, ...], costs: list[float] | None
    ) -> dict[int, Any]:
        env: dict[int, Any] = {}
        for i, node in enumerate(g.nodes):
            if node.op == "placeholder":
                env[i] = self._placeholder(g, i, batch)
                continue
            started = time.perf_counter()
            env[i] = g.execute(i, env)
            if costs is not None:
                costs[i] = time.perf_counter() - started
        return env

    @staticmethod
    def _placeholder(g: _Graph, i: int, batch: tuple[torch.Tensor, ...]) -> Any:
        k = g.placeholders[i]
        if k < len(batch):
            return batch[k]
        default = g.nodes[i].args
        if default:
            return default[0]
        name = g.nodes[i].target
        raise TypeError(f"the model's forward takes an input {name!r} that the batches do not hold")

    def _select(
        self, g: _Graph, v: _Variant, costs: list[float], sizes: list[dict[int, int]], first: bool
    ) -> list[int]:
        """Nodes whose values to keep for ``v``, greedily by saved compute (the node's own time and its
        ancestors') per byte while the estimate fits the budget; the rest are recomputed when needed."""
        gid = id(g)
        rows = [(batch_rows(b[0]) or 1) if b else 1 for b in self.batches]
        scale = sum(rows) / max(rows[0], 1)  # batch 0's bytes -> all batches' (the last may be short)
        if first:
            for i, node in enumerate(g.nodes):
                if node.op in _COMPUTE_OPS and not (g.uncacheable >> i) & 1:
                    nbytes = int(sum(sizes[i].values()) * scale)
                    saved = sum(costs[j] for j in _bits(g.anc[i]))
                    self._ratios[(gid, i)] = saved / nbytes if nbytes else float("inf")
                    self._needed[(gid, i)] = nbytes
        candidates = [i for (h, i) in self._ratios if h == gid and (v.dependent >> i) & 1]
        candidates.sort(key=lambda i: -self._ratios[(gid, i)])
        room = self.budget - self._used()
        seen: set[int] = set()
        keep = []
        for i in candidates:
            extra = (
                int(sum(n for p, n in sizes[i].items() if p not in seen) * scale)
                if first
                else self._needed[(gid, i)]
            )
            if extra > room:
                self._dropped.add((gid, i))
                continue
            room -= extra
            seen.update(sizes[i])
            keep.append(i)
        return sorted(keep)

    def _enforce_budget(self) -> None:
        """Drop kept values, least saved compute per byte first, until the cache fits the budget."""
        while self._used() > self.budget:
            kept = [
                (self._ratios.get((id(v.graph), i), 0.0), v.name, i)
                for v in self._variants.values()
                for i in v.values
                if self._needed.get((id(v.graph), i), 0) > 0
            ]
            if not kept:
                break
            _, name, i = min(kept)
            v = self._variants[name]
            del v.values[i]
            v.plans.clear()
            for other in self._variants.values():
                if other.base is v:
                    other.plans.clear()
            self._dropped.add((id(v.graph), i))

    def _used(self) -> int:
        seen: dict[int, int] = {}
        for v in self._variants.values():
            for values in v.values.values():
                for value in values:
                    seen.update(storages(value))
        return sum(n for p, n in seen.items() if p not in self._fixed)

    def cache_report(self) -> CacheReport:
        """What the cache holds now, measured."""
        kept = [f"{v.name}:{v.graph.name(i)}" for v in self._variants.values() for i in v.values]
        dropped = sorted(
            {
                v.graph.name(i)
                for v in self._variants.values()
                for (gid, i) in self._dropped
                if gid == id(v.graph)
            }
        )
        needed = sum(self._needed.values())
        return CacheReport(self.budget, self._used(), needed, kept, dropped)

    @torch.no_grad()
    def _verify_columns(
        self, g: _Graph, v: _Variant, env: dict[int, Any], hooked: frozenset[str], first: bool
    ) -> None:
        """Widths at which a Linear's output columns computed alone equal the full layer's bit for bit
        (kept only if they hold on every batch checked): a fault in a few rows of its weight then
        re-runs only those output features."""
        generator = torch.Generator().manual_seed(1)
        for i, module in g.linears.items():
            if str(g.nodes[i].target) in hooked or (g.uncacheable >> i) & 1:
                continue
            x, y = env[g.inputs[i][0]], env[i]
            widths, width = [], _MIN_COLUMNS
            while width <= module.out_features // 2:
                idx = torch.randperm(module.out_features, generator=generator)[:width].sort().values
                if _same(_columns(module, x, idx), y.index_select(-1, idx)):
                    widths.append(width)
                width *= 2
            if first:
                v.columns[i] = widths
            elif i in v.columns:
                v.columns[i] = [w for w in v.columns[i] if w in widths]

    @torch.no_grad()
    def _verify(
        self,
        g: _Graph,
        batch: tuple[torch.Tensor, ...],
        env: dict[int, Any],
        full_out: Any,
        generator: torch.Generator,
    ) -> tuple[list[int], int]:
        """Sub-batch sizes whose rows equal the full batch's bit for bit, and the nodes whose values
        are per-sample (a sub-batch's value is the full value's rows), on this clean batch."""
        rows = batch_rows(batch[0]) if batch else None
        if rows is None or any(batch_rows(t) != rows for t in batch):
            return [], 0
        ok: list[int] = []
        sliceable = -1
        size = _MIN_BUCKET
        while size < rows:
            idx = torch.randperm(rows, generator=generator)[:size].sort().values
            sub_batch = tuple(take(t, idx) for t in batch)
            sub_env = self._run_all(g, sub_batch, None)
            sub_out = self._finish(sub_batch, sub_env[g.output])
            if isinstance(full_out, torch.Tensor) and _same(sub_out, full_out[idx]):
                ok.append(size)
                mask = 0
                for i, value in env.items():
                    sub = sub_env.get(i)
                    if (
                        isinstance(value, torch.Tensor)
                        and isinstance(sub, torch.Tensor)
                        and value.dim() > 0
                        and value.shape[0] == rows
                        and sub.shape[0] == size
                        and _same(value[idx], sub)
                    ):
                        mask |= 1 << i
                sliceable &= mask
            size *= 2
        return ok, (sliceable if ok else 0)

    # --- trials ------------------------------------------------------------------------------

    def clean(self, variant: str) -> torch.Tensor:
        """The clean outputs of a prepared ``variant``."""
        return self._variants[variant].flat

    @torch.no_grad()
    def evaluate(
        self,
        variant: str,
        faults: Mapping[str, Faults],
        hooked: Sequence[str] = (),
        *,
        numels: Mapping[str, int] | None = None,
    ) -> Outcome | None:
        """Outputs under ``faults`` (tensor name -> faults, now in the model) and activation hooks on
        the modules ``hooked`` (any other module hooked since the clean pass counts as hooked too);
        None when this trial needs a full evaluation (not captured, or a fault the graph cannot place).
        ``numels``: the size of each faulted tensor (a fault map's), which places faults in the rows
        of embedding-table sites that are views of a collection's storage (quantized fields)."""
        v = self._variants.get(variant)
        if v is None:
            return None
        now = hooked_modules(self.model)
        if v.hooks - now or "" in now - v.hooks:
            return None  # hooks the clean pass ran are gone, or the model itself gained one
        hooked = sorted({*hooked, *(now - v.hooks)} - {""})
        g = v.graph
        dense = 0
        rows: dict[tuple[int, str], torch.Tensor] = {}
        columns: dict[int, torch.Tensor] = {}
        whole: set[int] = set()
        for name, f in faults.items():
            if not len(f):
                continue
            placed = self._table_rows(v, name, f, numels)
            if placed is _UNPLACED:
                return None
            if placed is not None:
                mask, table_rows = placed
                dense |= mask
                whole.update(_bits(mask))
                for key, bad in table_rows.items():
                    rows[key] = torch.cat([rows[key], bad]) if key in rows else bad
                continue
            tensor = self._tensors.get(name)
            if tensor is None:
                return None
            mask = g.by_storage.get(storage_ptr(tensor), 0)
            if not mask:
                return None  # read outside the graph's nodes: cannot tell what it reaches
            i = mask.bit_length() - 1
            module = g.embeddings.get(i) if mask == 1 << i else None
            if module is not None and module.weight is tensor and v.rows_read((i, "")) is not None:
                bad = torch.unique(f.index.to(torch.int64) // module.weight.shape[1])
                rows[(i, "")] = torch.cat([rows[(i, "")], bad]) if (i, "") in rows else bad
                continue
            dense |= mask
            linear = g.linears.get(i) if mask == 1 << i and v.columns.get(i) and v.has(i) else None
            if linear is not None and (tensor is linear.weight or tensor is linear.bias):
                index = f.index.to(torch.int64)
                hit = index // linear.in_features if tensor is linear.weight else index
                columns[i] = torch.cat([columns[i], hit]) if i in columns else hit
            else:
                whole.add(i)
        for name in hooked:
            nodes = g.calls(name)
            if nodes is None:
                return None  # hooked inside the graph, not at a module call: cannot place it
            for i in nodes:
                dense |= 1 << i
                whole.add(i)
        narrow = self._narrow(v, columns, whole, dense)
        readers: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
        for key, bad in rows.items():
            found = v.rows_read(key)
            assert found is not None
            readers[key] = found.readers(torch.unique(bad))
        out = v.flat
        recomputed: list[torch.Tensor] = []
        used_samples = False
        narrowed = 0
        for b, batch in enumerate(self.batches):
            seeds = dense
            samples: list[torch.Tensor] = []
            for (i, _), by_batch in readers.items():
                if b in by_batch:
                    seeds |= 1 << i
                    samples.append(by_batch[b])
            dirty = 0
            for i in _bits(seeds):
                dirty |= g.desc[i]
            if not (dirty >> g.output) & 1:
                continue
            if out is v.flat:
                out = v.flat.clone()
            lo, hi = v.bounds[b], v.bounds[b + 1]
            affected = torch.unique(torch.cat(samples)) if samples and not dense else None
            size = self._bucket(v, affected, hi - lo)
            if affected is not None and size:
                self._run_samples(v, b, batch, dirty, affected, size, out)
                recomputed.append(affected + lo)
                used_samples = True
            else:
                here = {i: c for i, c in narrow.items() if not seeds & g.anc[i] & ~(1 << i)}
                env = self._run_dirty(v, b, batch, dirty, None, here)
                narrowed += len(here)
                out[lo:hi] = self._finish(batch, env[g.output]).float().reshape(-1)
                recomputed.append(torch.arange(lo, hi, dtype=torch.int64))
        if not recomputed:
            return Outcome(v.flat, "clean", torch.empty(0, dtype=torch.int64))
        path = "subgraph" if dense else ("samples" if used_samples else "rows")
        return Outcome(out, path, torch.cat(recomputed), narrowed)

    def _table_rows(
        self, v: _Variant, name: str, f: Faults, numels: Mapping[str, int] | None
    ) -> _Placement | None:
        """Where the faults ``f`` of site ``name`` land if it is (a field of) a torchrec/FBGEMM table:
        the nodes to re-run whole (a mask) and the faulted rows per (collection node, table) when they
        can be placed (a known site size, no pruning remap, reads recorded, the storage read by those
        nodes alone); None if the site is no such table's; ``_UNPLACED`` if no graph node reads it."""
        g = v.graph
        owners = [(c, c.sites[name]) for c in g.tabled.values() if name in c.sites]
        if not owners:
            return None
        if all(name in c.padding for c, _ in owners):
            return 0, {}  # the bytes that align a row: no kernel reads them
        keys = [(i, t) for c, t in owners for i, n in g.collections.items() if n is c]
        nodes = {i for i, _ in keys}
        for c, _ in owners:
            if not any(g.collections.get(i) is c for i in nodes):
                called = g.calls(c.path)  # run inside another leaf: re-run that one whole
                if not called:
                    return _UNPLACED
                nodes.update(called)
        mask = sum(1 << i for i in nodes)
        tensor = self._tensors.get(name)
        if tensor is not None:
            mask |= g.by_storage.get(storage_ptr(tensor), 0)
        numel = numels.get(name) if numels is not None else None
        if numel is None and tensor is not None and all(c.own_weights for c, _ in owners):
            numel = tensor.numel()  # a float collection's own weight is the site itself
        i, table = keys[0] if keys else (-1, "")
        count = g.collections[i].rows[table] if keys else 0
        placeable = (
            numel is not None
            and count > 0
            and numel % count == 0
            and mask == sum(1 << j for j, _ in keys)
            and not any(c.remapped for c, _ in owners)
            and all(v.rows_read(key) is not None for key in keys)
        )
        if not placeable:
            return mask, {}
        assert numel is not None
        bad = torch.unique(f.index.to(torch.int64) // (numel // count))
        return 0, {key: bad for key in keys}

    @staticmethod
    def _narrow(
        v: _Variant, columns: dict[int, torch.Tensor], whole: set[int], dense: int
    ) -> dict[int, torch.Tensor]:
        """Linear nodes to re-run on a few output features: faulted only in some rows, their input clean
        (no other seed upstream), padded to a verified width with clean features."""
        g = v.graph
        out: dict[int, torch.Tensor] = {}
        for i, hit in columns.items():
            if i in whole or dense & g.anc[i] & ~(1 << i):
                continue
            hit = torch.unique(hit)
            width = next((w for w in v.columns[i] if w >= hit.numel()), 0)
            if not width:
                continue
            free = torch.ones(g.linears[i].out_features, dtype=torch.bool)
            free[hit] = False
            pad = free.nonzero().squeeze(1)[: width - hit.numel()]
            out[i] = torch.sort(torch.cat([hit, pad])).values
        return out

    @staticmethod
    def _bucket(v: _Variant, affected: torch.Tensor | None, rows: int) -> int:
        if affected is None:
            return 0
        for size in v.buckets:
            if size >= affected.numel() and size <= rows // 2:
                return size
        return 0

    def _plan(self, v: _Variant, dirty: int, sub: bool) -> list[int]:
        """Nodes to execute, in order: the dirty ones and the clean ones they need that are not kept."""
        key = (dirty, sub)
        if key not in v.plans:
            g = v.graph
            needed = dirty
            stack = _bits(dirty)
            while stack:
                i = stack.pop()
                for j in g.inputs[i]:
                    if (needed >> j) & 1 or g.nodes[j].op in ("placeholder", "get_attr"):
                        continue
                    if v.has(j) and (not sub or (v.sliceable >> j) & 1):
                        continue
                    needed |= 1 << j
                    stack.append(j)
            v.plans[key] = _bits(needed)
        return v.plans[key]

    def _run_dirty(
        self,
        v: _Variant,
        b: int,
        batch: tuple[torch.Tensor, ...],
        dirty: int,
        idx: torch.Tensor | None,
        narrow: Mapping[int, torch.Tensor] | None = None,
    ) -> dict[int, Any]:
        """Execute the dirty nodes of batch ``b`` (of its rows ``idx``); ``narrow``: Linear nodes to
        re-run on some output features only, the rest taken from their clean values."""
        g = v.graph
        sub = idx is not None
        order = self._plan(v, dirty, sub)
        env: dict[int, Any] = {}
        needed = 0
        for i in order:
            needed |= 1 << i
        for i in order:
            for j in g.inputs[i]:
                if j in env:
                    continue
                node = g.nodes[j]
                if node.op == "placeholder":
                    value = self._placeholder(g, j, batch)
                    env[j] = take(value, idx) if idx is not None and g.placeholders[j] < len(batch) else value
                elif node.op == "get_attr":
                    env[j] = g.attr(str(node.target))
                elif not (needed >> j) & 1:
                    value = v.cached(j, b)
                    env[j] = value[idx] if sub else value
            if narrow and i in narrow:
                features = narrow[i]
                y = v.cached(i, b).clone()
                y[..., features] = _columns(g.linears[i], env[g.inputs[i][0]], features)
                env[i] = y
            else:
                env[i] = g.execute(i, env)
        return env

    def _run_samples(
        self,
        v: _Variant,
        b: int,
        batch: tuple[torch.Tensor, ...],
        dirty: int,
        affected: torch.Tensor,
        size: int,
        out: torch.Tensor,
    ) -> None:
        """Recompute the ``affected`` samples of batch ``b`` as one sub-batch of a verified ``size``
        (padded with unaffected rows, whose values are clean) and write them into ``out``."""
        rows = batch_rows(batch[0])
        assert rows is not None  # sub-batches are verified only for batches of samples
        free = torch.ones(rows, dtype=torch.bool)
        free[affected] = False
        pad = free.nonzero().squeeze(1)[: size - affected.numel()]
        idx, order = torch.sort(torch.cat([affected, pad]))
        env = self._run_dirty(v, b, batch, dirty, idx)
        values = self._finish(tuple(take(t, idx) for t in batch), env[v.graph.output]).float().reshape(-1)
        where = (order < affected.numel()).nonzero().squeeze(1)
        out[v.bounds[b] + idx[where]] = values[where]
