"""Activation clipping: confine hidden-layer outputs to a range so one corrupted value cannot blow up.

Two variants from the paper (Sec. 4.2): Eq. (2), ``mode="clamp"``, saturates out-of-range values at
the bound (as ReLU6 / PACT do); Eq. (1), ``mode="zero"``, replaces them by 0 (as FT-ClipAct does).
NaN becomes 0 in both. The range is the paper's [-6, 6] by default, or per layer from clean data
(``ClipActivations.profile``), the way range-restriction work (Ranger, FT-ClipAct) sets it.

It acts on the outputs of the selected Linear layers (by default every hidden Linear of the MLP
and attention blocks, never the output layer) through forward hooks, so the clipped value is what
the next layer (BatchNorm, ReLU, ...) receives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batches, Mitigation, hidden_linears, input_batches

__all__ = ["ClipActivations", "CLIP_MODES"]

CLIP_MODES = ("clamp", "zero")


class ClipActivations(Mitigation):
    """Clip the outputs of hidden Linear layers to ``[low, high]`` (or to per-layer ``bounds``).

    ``layers`` names the modules to clip (default: ``hidden_linears(model, component)``).
    ``bounds`` maps layer names to ``(low, high)`` and overrides the global range for them.
    ``count=True`` keeps per-layer counts of clipped values in ``stats`` (costs a reduction).
    """

    per_sample = True

    def __init__(
        self,
        low: float = -6.0,
        high: float = 6.0,
        *,
        mode: str = "clamp",
        layers: Sequence[str] | None = None,
        component: Sequence[str] = ("mlp", "attention"),
        bounds: dict[str, tuple[float, float]] | None = None,
        count: bool = False,
    ) -> None:
        if mode not in CLIP_MODES:
            raise ValueError(f"unknown clipping mode {mode!r}; allowed: {', '.join(CLIP_MODES)}")
        for name, (lo, hi) in {"range": (low, high), **(bounds or {})}.items():
            if not float(lo) < float(hi):
                raise ValueError(f"clipping needs low < high, got {name} = ({lo}, {hi})")
        self.low, self.high, self.mode = float(low), float(high), mode
        self.layers = list(layers) if layers is not None else None
        self.component = tuple(component)
        self.bounds = {k: (float(lo), float(hi)) for k, (lo, hi) in (bounds or {}).items()}
        self.count = count
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._clipped: dict[str, int] = {}

    def __repr__(self) -> str:
        rng = f"{len(self.bounds)} profiled layers" if self.bounds else f"[{self.low:g}, {self.high:g}]"
        return f"ClipActivations({rng}, mode={self.mode!r})"

    @classmethod
    def profile(
        cls,
        model: nn.Module,
        batches: Batches,
        *,
        margin: float = 0.1,
        **options,
    ) -> ClipActivations:
        """Per-layer bounds from clean data: each layer's observed [min, max] widened by ``margin``
        times its span on both sides. ``batches``: tensors (one-input model) or tuples of tensors
        (``model(*inputs)``); a bare tensor is one batch."""
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        inputs_list = input_batches(batches, "ClipActivations.profile")
        probe = cls(**options)
        layers = hidden_linears(model, probe.component, probe.layers)
        lo: dict[str, float] = {}
        hi: dict[str, float] = {}

        def record(name: str):
            def hook(module, inputs, output):
                finite = output[torch.isfinite(output)]
                if finite.numel():
                    lo[name] = min(lo.get(name, float("inf")), float(finite.min()))
                    hi[name] = max(hi.get(name, float("-inf")), float(finite.max()))

            return hook

        handles = [m.register_forward_hook(record(n)) for n, m in layers.items()]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for inputs in inputs_list:
                    model(*inputs)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        if set(lo) != set(layers):
            raise ValueError(f"profiling saw no finite output for layers {sorted(set(layers) - set(lo))}")
        bounds = {}
        for name in layers:
            span = max(hi[name] - lo[name], 1e-6)
            bounds[name] = (lo[name] - margin * span, hi[name] + margin * span)
        return cls(**{**options, "layers": list(layers), "bounds": bounds})

    def attach(self, model: nn.Module) -> None:
        if self._hooks:
            raise RuntimeError("this ClipActivations is already attached; detach() first")
        for name, module in hidden_linears(model, self.component, self.layers).items():
            lo, hi = self.bounds.get(name, (self.low, self.high))
            self._hooks.append(module.register_forward_hook(self._hook(name, lo, hi)))
            self._clipped.setdefault(name, 0)

    def _hook(self, name: str, lo: float, hi: float):
        zero_mode = self.mode == "zero"

        def hook(module, inputs, output: torch.Tensor) -> torch.Tensor:
            # In place where nothing else can need the raw output (not counting, no autograd graph):
            # a fresh 4096 x 512 output costs more to allocate than to clamp.
            inplace = not self.count and not output.requires_grad
            if zero_mode:  # Eq. (1): out-of-range, NaN and Inf -> 0
                clipped = zero_outside(output, lo, hi, inplace=inplace)
            elif inplace:  # Eq. (2): saturate at the bounds; NaN -> 0
                clipped = output.nan_to_num_(nan=0.0).clamp_(lo, hi)
            else:
                clipped = torch.nan_to_num(output, nan=0.0).clamp_(lo, hi)
            if self.count:
                self._clipped[name] += int((clipped != output).sum())
            return clipped

        return hook

    def detach(self) -> None:
        while self._hooks:
            self._hooks.pop().remove()

    def reset_stats(self) -> None:
        """Zero the per-layer clipped-value counts (the layers seen so far stay listed)."""
        self._clipped = dict.fromkeys(self._clipped, 0)

    @property
    def stats(self) -> dict:
        if not self.count:
            return {"layers": len(self._clipped)}
        return {
            "layers": len(self._clipped),
            "clipped": sum(self._clipped.values()),
            "per_layer": dict(self._clipped),
        }


def zero_outside(y: torch.Tensor, lo: float, hi: float, *, inplace: bool = False) -> torch.Tensor:
    """``y`` where ``lo <= y <= hi``, else 0 (also for NaN and +-Inf): the paper's Eq. (1); written
    into ``y`` itself with ``inplace``.

    Built from float-only kernels: on CPUs, comparison masks and ``torch.where`` cost several
    times a ``clamp``. Subtracting the out-of-range part leaves in-range values exact and
    out-of-range ones exactly 0; an Inf or NaN turns into NaN, which ``nan_to_num_`` zeroes.
    """
    if lo == -hi:  # hardshrink(y, h) is y where |y| > h, else 0
        outside = F.hardshrink(y, hi)
        return (y.sub_(outside) if inplace else y - outside).nan_to_num_(nan=0.0)
    above = F.threshold(y, hi, 0.0)  # threshold(y, t, 0) is y where y > t, else 0
    below = F.threshold(y.neg(), -lo, 0.0).neg_()
    out = y.sub_(above) if inplace else y - above
    out -= below
    return out.nan_to_num_(nan=0.0)
