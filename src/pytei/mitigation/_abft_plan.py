"""``ABFT.plan``: per parameterised layer, what checks it, its place on the roofline, what its check costs.

Every module that holds floating-point parameters or buffers of its own (or FBGEMM tables) is a row:
*checked* when ABFT protects it or an ancestor whose check covers its parameters (a collection's
tables), else *unchecked* with the reason. Checked rows carry the layer's call shape, its arithmetic
intensity and bound on the device's measured roofline (``pytei.mitigation.roofline``), the scheme
chosen, and the measured time of the layer and of its check on the batch given.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checksums import Check, check_class, uncheckable
from .roofline import Balance, bound, machine_balance

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["COLUMNS", "plan_table"]

#: The plan's columns, in order.
COLUMNS = (
    "layer",
    "type",
    "values",
    "status",
    "checked_by",
    "shape",
    "flops",
    "bytes",
    "intensity",
    "bound",
    "scheme",
    "layer_ms",
    "check_ms",
    "fused_ms",
    "overhead",
    "reason",
)


def _own_values(module: nn.Module) -> int:
    """Floating-point parameter and buffer values the module holds itself (FBGEMM tables included)."""
    n = sum(
        t.numel()
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if t.is_floating_point()
    )
    return n + _fbgemm_values(module)


def _fbgemm_values(module: nn.Module) -> int:
    """Bytes of the rows of an FBGEMM TBE's tables (held in unregistered storage), else 0."""
    if not type(module).__module__.startswith("fbgemm_gpu"):
        return 0
    weights = getattr(module, "split_embedding_weights", None)
    if weights is None:
        return 0
    total = 0
    for w in weights():
        t = w[0] if isinstance(w, tuple) else w
        total += t.numel() if isinstance(t, torch.Tensor) else 0
    return total


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _fused_ms(check: Check, module: nn.Module, args: tuple, kwargs: dict, repeats: int) -> float:
    """Median time of the fused layer call and its fused check (the module is unfused after)."""

    def call() -> None:
        out = module(*args, **kwargs)
        check.fused_residual(args, kwargs, out)

    check.fuse(module)
    try:
        return _median_ms(call, repeats)
    finally:
        check.unfuse(module)


def _shape(args: tuple, output: Any) -> str:
    def dims(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return "x".join(str(d) for d in x.shape)
        values = getattr(x, "values", None)
        return dims(values()) if callable(values) else type(x).__name__

    first = args[0] if args else None
    return f"{dims(first)} -> {dims(output)}"


def choose(scheme: str, bound_: str, fusable: bool, global_ms: float, fused_ms: float | None) -> str:
    """The scheme a layer runs: as asked (``fused`` only where the check has a fused form); with
    ``auto``, fused for memory-bound layers, global for compute-bound ones, and the faster of the two
    measured totals (layer + check) where the roofline is ambiguous."""
    if not fusable or scheme == "global":
        return "global"
    if scheme == "fused" or bound_ == "memory":
        return "fused"
    if bound_ == "compute" or fused_ms is None:
        return "global"
    return "fused" if fused_ms < global_ms else "global"


def plan_table(
    model: nn.Module,
    protected: dict[str, nn.Module],
    checks: Callable[[nn.Module], Check],
    inputs: tuple,
    scheme: str = "global",
    *,
    balance: Balance | None = None,
    repeats: int = 5,
) -> pd.DataFrame:
    """The plan of ``protected`` (name -> module, each checked by ``checks(module)``) in ``model``, with
    one forward pass of ``inputs`` to see each checked layer's call, then ``repeats`` timings each of
    the layer, its global check and (where it has one) its fused form; ``scheme`` as ``ABFT``'s."""
    import pandas as pd

    calls: dict[str, tuple[tuple, dict, Any]] = {}
    handles = []

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            calls.setdefault(name, (args, kwargs, output))

        return hook

    covering = {n: checks(m) for n, m in protected.items()}
    for name, module in protected.items():
        handles.append(module.register_forward_hook(recorder(name), with_kwargs=True))
    for name, check in covering.items():  # composite checks read their taps' outputs
        for tap in check.taps:
            handles.append(protected[name].get_submodule(tap).register_forward_hook(check.recorder(tap)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    balance = balance or machine_balance(device)
    records = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        values = _own_values(module)
        if not values and name not in protected:
            continue
        owner = _owner(name, covering)
        row: dict[str, Any] = {c: None for c in COLUMNS}
        row.update(layer=name, type=type(module).__name__, values=values)
        if owner is None:
            reason = (
                _refused_by_ancestor(name, modules)
                or uncheckable(module)
                or "not among the layers this ABFT protects"
            )
            row.update(status="unchecked", checked_by="", scheme="", reason=reason)
            records.append(row)
            continue
        row.update(status="checked", checked_by=owner, scheme="global", reason="")
        if owner == name and name in calls:
            why_not_fused = covering[name].why_not_fused(module)
            args, kwargs, output = calls[name]
            check = covering[name]
            cost = check.cost(args, kwargs, output)
            row.update(
                shape=_shape(args, output),
                flops=cost.flops,
                bytes=cost.bytes,
                intensity=cost.intensity,
                bound=bound(cost, balance),
            )
            with torch.no_grad():
                layer_ms = _median_ms(partial(module, *args, **kwargs), repeats)
                check_ms = _median_ms(partial(check.residual, args, kwargs, output), repeats)
                fused_ms = None if why_not_fused else _fused_ms(check, module, args, kwargs, repeats)
            chosen = choose(scheme, row["bound"], why_not_fused is None, layer_ms + check_ms, fused_ms)
            total = layer_ms + check_ms if chosen == "global" else fused_ms
            overhead = total / layer_ms - 1.0 if layer_ms and total is not None else None
            row.update(
                layer_ms=layer_ms, check_ms=check_ms, fused_ms=fused_ms, scheme=chosen, overhead=overhead
            )
        elif owner == name:
            row.update(reason="not called by this batch")
        records.append(row)
    return pd.DataFrame.from_records(records, columns=list(COLUMNS))


def _refused_by_ancestor(name: str, modules: dict[str, nn.Module]) -> str | None:
    """For a module without a check of its own, the reason its nearest ancestor whose check would cover
    it is unchecked (a TorchRec cross network's ParameterLists); else None."""
    if check_class(modules[name]) is not None:
        return None
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        ancestor = ".".join(parts[:i])
        cls = check_class(modules[ancestor])
        if cls is not None and (cls.covers_descendants or ".".join(parts[i:]) in cls.covers):
            return uncheckable(modules[ancestor])
    return None


def _owner(name: str, covering: dict[str, Check]) -> str | None:
    """The protected layer whose check covers the parameters of module ``name``, or None."""
    if name in covering:
        return name
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        ancestor = ".".join(parts[:i])
        check = covering.get(ancestor)
        if check is not None and (check.covers_descendants or name[len(ancestor) + 1 :] in check.covers):
            return ancestor
    root = covering.get("")
    if root is not None and (root.covers_descendants or name in root.covers):
        return ""
    return None
