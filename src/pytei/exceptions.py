"""User-facing errors: one base class, so callers (and the CLI) can tell a user's mistake from a bug.

Every error pytei raises for bad input (a spec, a data file, a checkpoint, a detected fault) derives
from :class:`PyteiError`. The CLI prints a ``PyteiError`` as one line with exit code 2; any other
exception is a genuine bug and shows its traceback. Subclasses also derive from the builtin class
that fits (``ValueError``, ``RuntimeError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["ArgumentError", "CheckpointError", "MissingExtraError", "PyteiError"]


class PyteiError(Exception):
    """Base of every error pytei raises for bad input or a detected fault (not for its own bugs)."""


class ArgumentError(PyteiError, ValueError):
    """A value given to pytei that is out of range or of the wrong kind (a BER above 1, an unknown
    component, bits that a dtype does not have); the message names the value and what is allowed."""


class CheckpointError(PyteiError, ValueError):
    """A checkpoint folder that cannot be read: corrupt or foreign metadata or weights."""


class MissingExtraError(PyteiError, ImportError):
    """A feature needs an optional extra that is not installed (``pytei[torchrec]``); the message names the
    missing package and the install command."""
