"""pytei: emulated hardware-error injection for deep recommendation models on PyTorch.

Data flow: ``bits`` (dtype layouts) -> ``errors`` (error models) -> ``targets`` (which tensors) ->
``injector`` (apply / restore) -> models and data -> metrics -> mitigation -> campaign -> report.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .bits import BitLayout, layout, supported_dtypes
from .errors import BitFlip, BitRates, Burst, ErrorModel, Faults, FlipCount, RandomValue, StuckAt, Words
from .exceptions import PyteiError
from .faultmap import FaultMap
from .injector import SITES, InjectionReport, Injector, Protection, inject
from .mitigation import mitigate
from .targets import COMPONENTS, components, describe, select

if TYPE_CHECKING:  # the lazy names below, for type checkers
    from . import campaign, data, metrics, models, plugins, report, results, stats, train  # noqa: F401
    from .checkpoint import load_checkpoint

__version__ = "0.1.0"

#: Submodules loaded on first access (``pytei.results.load(db)``), so ``import pytei`` stays light:
#: it does not import pandas, matplotlib or the campaign machinery.
_LAZY = ("campaign", "data", "metrics", "models", "plugins", "report", "results", "stats", "train")
#: Names loaded from a submodule on first access: ``load_checkpoint`` needs the data loaders (pandas).
_LAZY_NAMES = {"load_checkpoint": "checkpoint"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        return getattr(import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'pytei' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, *_LAZY_NAMES])


__all__ = [
    "BitFlip",
    "BitLayout",
    "BitRates",
    "Burst",
    "COMPONENTS",
    "ErrorModel",
    "FaultMap",
    "Faults",
    "FlipCount",
    "InjectionReport",
    "Injector",
    "Protection",
    "PyteiError",
    "RandomValue",
    "SITES",
    "StuckAt",
    "Words",
    "components",
    "describe",
    "inject",
    "layout",
    "load_checkpoint",
    "mitigate",
    "select",
    "supported_dtypes",
]
