"""Model zoo: the paper's dummy model (Sec. 5.1), its five pytorch-fm CTR models (Sec. 6.1) and DLRM.

Models are registered by name, timm-style::

    model = pytei.models.create("dfm", field_dims=[6041, 3953])
    clone = pytei.models.create(model.name, **model.config)   # how checkpoints are rebuilt

Every model has a class attribute ``input_layout`` (see ``INPUT_LAYOUTS``), returns raw logits of
shape ``[batch]``, and tags its parts with ``pytei_component`` for the injector.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from .layers import INPUT_LAYOUTS, RecModel

__all__ = ["INPUT_LAYOUTS", "RecModel", "create", "dummy_inputs", "get", "names", "register"]

_REGISTRY: dict[str, type[nn.Module]] = {}

T = TypeVar("T", bound=type[nn.Module])


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make ``cls`` creatable as ``create(name, ...)`` and set ``cls.name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")

    def deco(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register({name!r}) decorates nn.Module subclasses, got {cls!r}")
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name].__qualname__}")
        layout = getattr(cls, "input_layout", None)
        if layout not in INPUT_LAYOUTS:
            raise ValueError(f"{cls.__qualname__}.input_layout must be in {INPUT_LAYOUTS}, got {layout!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[nn.Module]:
    """The class registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(names())}")
    return _REGISTRY[name]


def create(name: str, **config: Any) -> nn.Module:
    """A new ``name`` model built from ``config`` (the model's keyword arguments)."""
    cls = get(name)
    params = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(config) - set(params))
        if unknown:
            accepted = ", ".join(params)
            raise TypeError(f"model {name!r} got unknown config keys {unknown}; accepted: {accepted}")
    return cls(**config)


# The model modules register themselves through ``register`` above, so they are imported last.
from . import dlrm, dummy, fm_family  # noqa: E402, F401
from .dummy import dummy_inputs  # noqa: E402
