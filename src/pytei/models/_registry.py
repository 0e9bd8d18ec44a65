"""The model registry: ``@register("name")`` makes an ``nn.Module`` class creatable by name.

It lives in its own module so that the model modules (``dlrm``, ``dummy``, ``fm_family``, and any
plugin) import it without importing the package that imports them.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .._registry import Registry
from .layers import INPUT_LAYOUTS

__all__ = ["create", "get", "names", "register"]


def _check_model(name: str, cls: Any, meta: dict[str, Any]) -> type[nn.Module]:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register({name!r}) decorates nn.Module subclasses, got {cls!r}")
    layout = getattr(cls, "input_layout", None)
    if layout not in INPUT_LAYOUTS:
        raise ValueError(f"{cls.__qualname__}.input_layout must be in {INPUT_LAYOUTS}, got {layout!r}")
    setattr(cls, "name", name)  # noqa: B010 - cls is typed as type[nn.Module], which has no name
    return cls


#: Models by name. ``@register("name")`` on a class sets ``cls.name``; ``create(name, **config)``
#: builds one. A registered class has an ``input_layout`` (see ``INPUT_LAYOUTS``).
register: Registry[type[nn.Module]] = Registry("model", _check_model)


def names() -> list[str]:
    """Registered model names, sorted."""
    return register.names()


def get(name: str) -> type[nn.Module]:
    """The class registered as ``name``."""
    return register.get(name)


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
