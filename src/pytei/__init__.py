"""pytei: emulated hardware-error injection for deep recommendation models on PyTorch.

Data flow: ``bits`` (dtype layouts) -> ``errors`` (error models) -> ``targets`` (which tensors) ->
``injector`` (apply / restore) -> models and data -> metrics -> mitigation -> campaign -> report.
"""

from .bits import BitLayout, layout, supported_dtypes
from .checkpoint import load_checkpoint
from .errors import BitFlip, BitRates, Burst, ErrorModel, Faults, FlipCount, RandomValue, StuckAt, Words
from .faultmap import FaultMap
from .injector import SITES, InjectionReport, Injector, Protection, inject
from .mitigation import mitigate
from .targets import COMPONENTS, components, describe, select

__version__ = "0.1.0"

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
