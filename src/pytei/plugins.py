"""Plugins: user modules that register models, error models, mitigations or metrics.

A plugin is an importable module whose import registers its objects (``@pytei.models.register``,
``@pytei.errors.register``, ``@pytei.mitigation.register``, ``@pytei.metrics.register``). pytei
imports the entry points of the group ``pytei.plugins`` (an installed package declares one in its
``pyproject.toml``: ``[project.entry-points."pytei.plugins"] my_pkg = "my_pkg.models"``) once per
process, plus the modules a spec (``plugins = [...]``) or the CLI (``--plugin MODULE``) names.
Campaign workers (process pool, Ray actors) load the same plugins before their first trial, so a
model registered in user code runs under every executor.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Sequence
from importlib.metadata import entry_points

from .exceptions import PyteiError

__all__ = ["GROUP", "PluginError", "load"]

#: Entry-point group whose entries are imported by :func:`load`.
GROUP = "pytei.plugins"

_entry_points_loaded = False


class PluginError(PyteiError, ImportError):
    """A plugin module (or entry point) that failed to import; the message names it and why."""


def load(modules: Sequence[str] = ()) -> None:
    """Import the ``pytei.plugins`` entry points (once per process) and the named ``modules``.

    Importing an already imported module does nothing, so calling this again is cheap.
    """
    global _entry_points_loaded
    if isinstance(modules, str):
        modules = [modules]
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for ep in entry_points(group=GROUP):
            try:
                ep.load()
            except Exception as err:
                raise PluginError(
                    f"plugin entry point {ep.name!r} ({ep.value}) failed to import: {_why(err)}"
                ) from err
    for name in modules:
        if not isinstance(name, str) or not name:
            raise PluginError(f"a plugin is a module name (such as 'my_pkg.models'), got {name!r}")
        try:
            importlib.import_module(name)
        except Exception as err:
            raise PluginError(f"plugin module {name!r} failed to import: {_why(err)}") from err


def _why(err: BaseException) -> str:
    where = traceback.extract_tb(err.__traceback__)
    at = f" ({where[-1].filename}:{where[-1].lineno})" if where else ""
    hint = " (is it installed, or its folder on PYTHONPATH?)" if isinstance(err, ModuleNotFoundError) else ""
    return f"{type(err).__name__}: {err}{at}{hint}"
