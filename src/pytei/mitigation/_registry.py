"""The mitigation registry: names a campaign spec can use, each a factory with typed options.

A registered mitigation is a class (or function) whose keyword parameters are the options a spec
may give it (``{ name = "clip", low = -4, high = 4 }``), checked against its signature and type
hints. What it builds is a compute-side :class:`Mitigation` (attached around the forward pass) or
a memory-side :class:`~pytei.injector.Protection` (filters faults before they land), or None for
no mitigation. An object with a ``calibrate(model, batches)`` method is calibrated on clean data
of each model before its first trial (ABFT tolerances, profiled clipping ranges).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._registry import Registry, check_options
from ..injector import Protection
from .abft import ABFT
from .base import Mitigation
from .clip import ClipActivations
from .ecc import ECC
from .protect import ProtectBits

__all__ = ["MitigationType", "NoMitigation", "ProfiledClip", "register"]

Built = tuple[Mitigation | None, Protection | None]


@dataclass(frozen=True)
class MitigationType:
    """A registered mitigation: ``factory(**defaults, **options)`` builds it for one model.

    ``memory``: it acts on stored tensors only (a Protection), so it does nothing to activation
    faults and the planner skips those trials.
    """

    name: str
    factory: Callable[..., Any]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    memory: bool = False

    @property
    def origin(self) -> Callable[..., Any]:
        return self.factory

    def check(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` converted to the factory's types; OptionError for a key it does not take."""
        return check_options(self.factory, options, what=f"mitigation {self.name!r}")

    def build(
        self, model: nn.Module, calibration: Iterable[tuple[torch.Tensor, ...]], **options: Any
    ) -> Built:
        """The (compute-side, memory-side) pair for ``model``, calibrated on clean ``calibration``."""
        obj = self.factory(**{**self.defaults, **options})
        if obj is None:
            return None, None
        if callable(getattr(obj, "calibrate", None)):
            obj.calibrate(model, list(calibration))
        if isinstance(obj, Mitigation):
            return obj, None
        if isinstance(obj, Protection):
            return None, obj
        raise TypeError(
            f"mitigation {self.name!r} built {obj!r}: expected a pytei Mitigation, a Protection or None"
        )


def _make_type(name: str, factory: Any, meta: dict[str, Any]) -> MitigationType:
    if not callable(factory):
        raise TypeError(f"mitigation.register({name!r}) decorates a class or function, got {factory!r}")
    unknown = sorted(set(meta) - {"defaults", "memory"})
    if unknown:
        raise TypeError(f"mitigation.register({name!r}) got unknown arguments {unknown}")
    memory = meta.get("memory", isinstance(factory, type) and issubclass(factory, Protection))
    mtype = MitigationType(name, factory, dict(meta.get("defaults", {})), bool(memory))
    mtype.check(mtype.defaults)
    return mtype


#: Mitigations by name: ``@register("name")`` on a Mitigation or Protection subclass (or a factory
#: function); ``register("name", cls, defaults={...})`` registers a preset of an existing class.
register: Registry[MitigationType] = Registry("mitigation", _make_type)


def NoMitigation() -> None:  # noqa: N802 - reads as a class in the registry
    """No mitigation: the reference every mitigation is compared against."""
    return None


class ProfiledClip(ClipActivations):
    """Activation clipping whose per-layer ranges come from clean data of the model it protects:
    each layer's observed [min, max] widened by ``margin`` times its span (``ClipActivations.profile``)."""

    def __init__(
        self,
        *,
        margin: float = 0.1,
        mode: str = "clamp",
        layers: Sequence[str] | None = None,
        component: Sequence[str] = ("mlp", "attention"),
        count: bool = False,
    ) -> None:
        super().__init__(mode=mode, layers=layers, component=component, count=count)
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = margin

    def calibrate(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]]) -> None:
        """Profile the ranges on ``batches`` (input tuples of ``model``)."""
        options = {"mode": self.mode, "layers": self.layers, "component": self.component, "count": self.count}
        profiled = ClipActivations.profile(model, batches, margin=self.margin, **options)
        self.layers, self.bounds = profiled.layers, profiled.bounds


register("none", NoMitigation)
register("clip", ClipActivations)
register("clip-zero", ClipActivations, defaults={"mode": "zero"})
register("clip-profiled", ProfiledClip)
register("protect-bits", ProtectBits)
register("ecc", ECC)
register("abft", ABFT)
