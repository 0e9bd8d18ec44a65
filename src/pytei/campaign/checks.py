"""Checkers of campaign-spec values: ``(value, key path) -> normalized value``, or a SpecError.

Shared by the spec parser and the model sources, so every key of a spec is checked the same way
and every error names its key path (``errors.rates[3]``) and what is allowed.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from typing import Any

from ..exceptions import PyteiError

__all__ = [
    "REQUIRED",
    "TOP_KEYS",
    "Check",
    "SpecError",
    "Table",
    "choice",
    "integer",
    "many",
    "number",
    "show",
    "string",
    "target_name",
]

#: Top-level keys of a spec (a hint names them when one is written below a [table] by mistake).
TOP_KEYS = (
    "name",
    "seed",
    "runs",
    "confidence",
    "models",
    "data",
    "errors",
    "targets",
    "sites",
    "mitigations",
    "metrics",
    "plugins",
    "host_faults",
)
REQUIRED = object()

Check = Callable[[Any, str], Any]


class SpecError(PyteiError, ValueError):
    """A campaign spec that cannot be run; ``path`` is the offending key (``errors.rates[3]``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


# --- checkers: (value, key path) -> normalized value, or SpecError -------------------------------


def show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def integer(minimum: int, maximum: int | None = None) -> Check:
    def check(value: Any, path: str) -> int:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if not (is_int and value >= minimum and (maximum is None or value <= maximum)):
            bound = f"in {minimum}..{maximum}" if maximum is not None else f">= {minimum}"
            raise SpecError(path, f"must be an int {bound}, got {show(value)}")
        return value

    return check


def number(low: float = -math.inf, high: float = math.inf, *, open_low: bool = False) -> Check:
    def check(value: Any, path: str) -> float:
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and low <= value <= high
        )
        if not ok or (open_low and value == low):
            raise SpecError(path, f"must be a {describe_range(low, high, open_low)}, got {show(value)}")
        return float(value)

    return check


def describe_range(low: float, high: float, open_low: bool) -> str:
    if math.isinf(low):
        return "finite number"
    if math.isinf(high):
        return f"number {'>' if open_low else '>='} {low:g}"
    return f"number in {'(' if open_low else '['}{low:g}, {high:g}]"


def string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(path, f"must be a non-empty string, got {show(value)}")
    return value


def choice(allowed: Sequence[str]) -> Check:
    def check(value: Any, path: str) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise SpecError(path, f"must be one of {', '.join(allowed)}; got {show(value)}")
        return value

    return check


def many(
    check: Check, *, scalar: bool = True, distinct: bool = True, key: Callable[[Any], Any] | None = None
) -> Check:
    """A non-empty list of items passing ``check``, distinct (by ``key``) if asked; one bare item if
    ``scalar`` (``sites = "weights"``)."""

    def many(value: Any, path: str) -> tuple:
        if not isinstance(value, list):
            if scalar:
                return (check(value, path),)
            raise SpecError(path, f"must be a list, got {show(value)}")
        if not value:
            raise SpecError(path, "must not be empty")
        items = tuple(check(v, f"{path}[{i}]") for i, v in enumerate(value))
        keys = [key(v) if key else v for v in items] if distinct else []
        for i, k in enumerate(keys):
            if keys.index(k) != i:
                raise SpecError(f"{path}[{i}]", f"repeats {path}[{keys.index(k)}] ({k!r})")
        return items

    return many


class Table:
    """One TOML table: rejects unknown keys up front, then hands out checked values by key."""

    def __init__(self, value: Any, path: str, keys: Sequence[str]) -> None:
        if not isinstance(value, dict):
            raise SpecError(path, f"must be a table, got {show(value)}")
        self.value, self.path = value, path
        for k in value:
            if k not in keys:
                raise SpecError(self.key(k), f"unknown key{self._hint(k, keys)}; allowed: {', '.join(keys)}")

    def _hint(self, k: str, keys: Sequence[str]) -> str:
        if self.path and k in TOP_KEYS:  # the classic TOML slip: a top-level key below a [table]
            header = self.path.split(".")[0].split("[")[0]
            return f" (in TOML, keys below a [{header}] header belong to it: put {k} above the first table)"
        close = difflib.get_close_matches(k, keys, n=1)
        return f" (did you mean {close[0]!r}?)" if close else ""

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return name in self.value

    def get(self, name: str, check: Check, default: Any = REQUIRED) -> Any:
        if name in self.value:
            return check(self.value[name], self.key(name))
        if default is REQUIRED:
            raise SpecError(self.key(name), "required")
        return default


def target_name(table: dict[str, Any]) -> str:
    """The display name of a ``targets`` table: its ``label``, else its component(s) joined by ``+``
    with its include/exclude patterns (``mlp[-predictor.*]``) and table fields (``embedding.scale+bias``)."""
    if table.get("label"):
        return str(table["label"])
    component = table.get("component", ["all"])
    component = [component] if isinstance(component, str) else list(component)
    include, exclude = table.get("include") or [], table.get("exclude") or []
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else exclude
    patterns = [*include, *(f"-{p}" for p in exclude)]
    fields = table.get("fields") or []
    fields = [fields] if isinstance(fields, str) else list(fields)
    name = "+".join(component) + (f"[{','.join(patterns)}]" if patterns else "")
    name += f".{'+'.join(fields)}" if fields else ""
    return name + (f"@{table['bounds']}" if table.get("bounds") else "")
