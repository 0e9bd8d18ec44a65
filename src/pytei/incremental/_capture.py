"""Capture a model's forward as a torch.fx graph whose module calls keep their hooks.

Symbolic tracing records a ``call_module`` node for every *leaf* module and traces through the rest.
Hooks only fire on modules called as such, so the leaves are torch's own layers, every module that
owns parameters directly (the modules activation-site faults hook), every module that has hooks
when the graph is captured (a mitigation's), and torchrec's embedding collections (float and
quantized EBC/EC) and FBGEMM's TBEs: called as one node, they run eagerly with their own modules'
hooks, and tracing into them would bake their unregistered TBEs' tensors into the graph as
constants. A model whose forward cannot be traced (Python control flow on tensor values,
unsupported calls) is reported with the reason, and evaluated in full.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import fx, nn

from ._jagged import is_collection

__all__ = ["capture", "hooked_modules"]


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: frozenset[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            module_qualified_name in self.leaves
            or bool(m._parameters)
            or is_collection(m)
            or super().is_leaf_module(m, module_qualified_name)
        )


def hooked_modules(model: nn.Module, ignore: Iterable[str] = ()) -> frozenset[str]:
    """Names of ``model``'s modules (``""`` for the root) that have forward hooks or pre-hooks."""
    skip = set(ignore)
    return frozenset(
        name
        for name, m in model.named_modules()
        if name not in skip
        and (m._forward_hooks or m._forward_pre_hooks or getattr(m, "_forward_hooks_with_kwargs", None))
    )


def capture(model: nn.Module, leaves: frozenset[str]) -> fx.Graph | str:
    """The traced graph of ``model.forward`` with ``leaves`` (module names) kept as module calls, or the
    one-line reason it cannot be traced."""
    try:
        return _LeafTracer(leaves).trace(model)
    except Exception as err:  # any tracing failure means: evaluate this model in full
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"{type(err).__name__}: {first[:200]}"
