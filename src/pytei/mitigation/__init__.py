"""Mitigations: compute-side ones wrap a model (``pytei.mitigate``), memory-side ones filter
faults before they land (``pytei.inject(..., protect=...)``)."""

from ._registry import MitigationType, register
from .abft import ABFT, ABFTError
from .base import Mitigation, hidden_linears, mitigate
from .clip import ClipActivations
from .ecc import ECC
from .protect import ProtectBits

__all__ = [
    "ABFT",
    "ABFTError",
    "ClipActivations",
    "ECC",
    "Mitigation",
    "MitigationType",
    "ProtectBits",
    "hidden_linears",
    "mitigate",
    "register",
]
