"""One small registry of named objects, shared by every extension kind (timm's ``register_model`` idea).

Each owning package makes its own instance (``pytei.errors.register``, ``pytei.mitigation.register``,
``pytei.metrics.register``, ``pytei.models.register``, the campaign's model sources and executors), so
a user adds an error model, a mitigation, a metric or a model by decorating it in their own module and
naming it in a campaign spec; nothing in pytei is edited. A registry also checks the options a spec
gives an object against the object's own signature and type hints (:func:`check_options`), so there is
no hand-kept option table to drift out of date.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import math
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import NoneType, UnionType
from typing import Any, Generic, TypeVar

from .exceptions import PyteiError

__all__ = ["Entry", "OptionError", "Registry", "RegistryError", "check_options", "options_of"]

T = TypeVar("T")
O = TypeVar("O")


class RegistryError(PyteiError, ValueError):
    """An unknown or duplicate name in a registry."""


class OptionError(PyteiError, ValueError):
    """An option an object does not take, or a value of the wrong type; ``key`` is the option."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered object under ``name``, with what its registration declared (``meta``)."""

    name: str
    obj: T
    meta: Mapping[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Named objects of one ``kind`` (``"mitigation"``, ``"error model"``, ...).

    ``registry("name", **meta)`` is a decorator; ``registry("name", obj, **meta)`` registers directly.
    ``prepare(name, obj, meta)`` (optional) validates what is registered and returns what is stored,
    e.g. a metric object built around a function; the decorator always returns the original object.
    """

    def __init__(self, kind: str, prepare: Callable[[str, Any, dict[str, Any]], T] | None = None) -> None:
        self.kind = kind
        self._prepare = prepare
        self._entries: dict[str, Entry[T]] = {}

    def __call__(self, name: str, obj: Any = None, /, **meta: Any) -> Any:
        if not isinstance(name, str) or not name:
            raise RegistryError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if obj is not None:
            self._add(name, obj, meta)
            return obj

        def deco(o: O) -> O:
            self._add(name, o, meta)
            return o

        return deco

    def _add(self, name: str, obj: Any, meta: dict[str, Any]) -> None:
        old = self._entries.get(name)
        if old is not None and _origin(old.obj) != _origin(obj):  # same origin: a module re-import
            raise RegistryError(f"{self.kind} name {name!r} is already registered to {_origin(old.obj)}")
        stored = self._prepare(name, obj, meta) if self._prepare else obj
        self._entries[name] = Entry(name, stored, dict(meta))

    def remove(self, name: str) -> None:
        """Unregister ``name`` (tests and interactive sessions that re-register under one name)."""
        self.entry(name)
        del self._entries[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def list(self, filter: str | None = None) -> list[str]:  # noqa: A002 - timm's spelling
        """Registered names matching the fnmatch pattern ``filter`` (``"clip*"``), sorted."""
        return [n for n in self.names() if filter is None or fnmatch.fnmatchcase(n, filter)]

    def entry(self, name: str) -> Entry[T]:
        """The entry registered as ``name``; a RegistryError listing the known names otherwise."""
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RegistryError(f"unknown {self.kind} {name!r}{hint}; registered: {', '.join(self.names())}")
        return self._entries[name]

    def get(self, name: str) -> T:
        """The object registered as ``name``."""
        return self.entry(name).obj

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def _origin(obj: Any) -> str:
    target = getattr(obj, "origin", obj)  # wrappers (metric objects) name what they wrap
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"


# --- options: checked against the object's own signature and type hints ----------------------------


def options_of(obj: Callable[..., Any], skip: Sequence[str] = ()) -> dict[str, inspect.Parameter]:
    """Keyword-passable parameters of ``obj`` (a class: its constructor), annotations resolved."""
    target = obj.__init__ if isinstance(obj, type) else obj  # type: ignore[misc]
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations (a local name in user code): accept any value
        hints = {}
    params = {}
    for name, p in inspect.signature(obj).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY) or name in skip:
            continue
        params[name] = p.replace(annotation=hints.get(name, Any))
    return params


def short(value: Any) -> str:
    """An option value as a label shows it (``-4`` rather than ``-4.0``, lists as ``[1,2]``)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple | list):
        return "[" + ",".join(short(v) for v in value) + "]"
    return str(value)


def check_options(
    obj: Callable[..., Any], options: Mapping[str, Any], *, what: str, skip: Sequence[str] = ()
) -> dict[str, Any]:
    """``options`` converted to ``obj``'s parameter types (TOML lists -> tuples, ints -> floats).

    Raises OptionError naming the key, ``what`` the object is and its allowed options, for a key
    ``obj`` does not take or a value its type hint refuses.
    """
    params = options_of(obj, skip)
    out = {}
    for key, value in options.items():
        if key not in params:
            close = difflib.get_close_matches(key, list(params), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            allowed = ", ".join(params) or "none"
            raise OptionError(key, f"{what} has no option {key!r}{hint}; allowed: {allowed}")
        ok, converted = _convert(value, params[key].annotation)
        if not ok:
            raise OptionError(
                key,
                f"{what} option {key!r} must be {_type_name(params[key].annotation)}, "
                f"got {value!r} ({type(value).__name__})",
            )
        out[key] = converted
    return out


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits ``hint`` and the value converted to it (a small, TOML-sized checker)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True, value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, UnionType):
        for arg in args:
            ok, converted = _convert(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is typing.Literal:
        return value in args, value
    if hint is NoneType or hint is None:
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin in (tuple, list, Sequence, typing.Sequence) or hint in (tuple, list):
        if isinstance(value, str) or not isinstance(value, list | tuple):
            return False, value
        item = args[0] if args and (len(args) == 1 or args[-1] is Ellipsis) else Any
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                return False, value
            pairs = list(zip(value, args, strict=True))
        else:
            pairs = [(v, item) for v in value]
        items = [_convert(v, h) for v, h in pairs]
        if not all(ok for ok, _ in items):
            return False, value
        return True, (list if origin is list else tuple)(c for _, c in items)
    if origin in (dict, Mapping, typing.Mapping) or hint in (dict, Mapping):
        if not isinstance(value, dict):
            return False, value
        key_hint, value_hint = args if len(args) == 2 else (Any, Any)
        pairs_kv = [(_convert(k, key_hint), _convert(v, value_hint)) for k, v in value.items()]
        if not all(k[0] and v[0] for k, v in pairs_kv):
            return False, value
        return True, {k[1]: v[1] for k, v in pairs_kv}
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value  # a hint this checker does not model (a Protocol, a TypeVar): the object checks


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return "None" if hint is NoneType else hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")
