"""How much memory the incremental evaluator may keep, and how to size tensors for it."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from ._jagged import is_torchrec_value

__all__ = [
    "BUDGET_VARIABLE",
    "DEFAULT_FRACTION",
    "available_memory",
    "default_budget",
    "parse_budget",
    "storage_ptr",
    "storages",
    "tensors_in",
]

#: Share of the memory available when an evaluator starts that its cache may hold by default.
DEFAULT_FRACTION = 0.25
#: Environment variable that sets the default budget (what ``--cache-budget`` sets; workers inherit it).
BUDGET_VARIABLE = "PYTEI_CACHE_BUDGET"
_FALLBACK = 1 << 30
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
}


def available_memory() -> int:
    """Bytes of RAM available now (``MemAvailable`` on Linux, free pages elsewhere, else 1 GiB)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return _FALLBACK


def parse_budget(text: str) -> int:
    """Bytes from ``"1073741824"``, ``"512MiB"``, ``"2GB"`` or ``"10%"`` (of the memory available now)."""
    value = str(text).strip().lower().replace(" ", "")
    try:
        if value.endswith("%"):
            share = float(value[:-1])
            if not 0 <= share <= 100:
                raise ValueError
            return int(available_memory() * share / 100)
        number = value.rstrip("kmgib")
        unit = value[len(number) :]
        amount = float(number) * _UNITS[unit]
        if not amount >= 0 or amount == float("inf"):
            raise ValueError
        return int(amount)
    except (KeyError, ValueError):
        raise ValueError(
            f"cache budget {text!r} is not a size; allowed: bytes (1073741824), a size with a unit "
            f"({', '.join(u for u in _UNITS if u)}; e.g. 512MiB) or a share of available memory (10%)"
        ) from None


def default_budget() -> int:
    """The default cache budget: ``$PYTEI_CACHE_BUDGET`` if set, else ``DEFAULT_FRACTION`` of the memory
    available now."""
    if os.environ.get(BUDGET_VARIABLE):
        return parse_budget(os.environ[BUDGET_VARIABLE])
    return int(available_memory() * DEFAULT_FRACTION)


def tensors_in(value: Any) -> Iterable[torch.Tensor]:
    """The tensors held by a node value (a tensor, tuples/lists/dicts of them, torchrec's KJTs,
    JaggedTensors and KeyedTensors)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)
    elif is_torchrec_value(value):
        yield from tensors_in(vars(value))


def _stored(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage holds ``t``'s data: ``t``, or the one a wrapper subclass without storage
    of its own wraps (torchrec's ``UInt4Tensor``/``UInt2Tensor`` hold theirs in ``elem``)."""
    inner = getattr(t, "elem", None)
    return _stored(inner) if type(t) is not torch.Tensor and isinstance(inner, torch.Tensor) else t


def storage_ptr(t: torch.Tensor) -> int:
    """The data pointer of the storage holding ``t``'s data (its wrapped tensor's, for a wrapper)."""
    return _stored(t).untyped_storage().data_ptr()


def storages(value: Any) -> dict[int, int]:
    """``{storage pointer: bytes}`` of the storages a node value keeps alive."""
    out: dict[int, int] = {}
    for t in tensors_in(value):
        s = _stored(t).untyped_storage()
        out[s.data_ptr()] = s.nbytes()
    return out
