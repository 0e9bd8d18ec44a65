"""Checks of the paths a command will write, made *before* its work starts.

A training run or a campaign that finds out only at the end that its output cannot be written has
wasted its time; these checks refuse such a path first, naming the flag, the path and why. They are
checks of intent, not guarantees (the disk may still fill up meanwhile): writers stay atomic.
"""

from __future__ import annotations

import os
from pathlib import Path

from .exceptions import ArgumentError

__all__ = ["OutputPathError", "check_output_dir", "check_output_file"]


class OutputPathError(ArgumentError):
    """An output path that cannot or must not be written (a file where a folder is needed, a folder
    where a file is needed, an existing file without ``--force``, a read-only folder)."""


def _writable_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a folder this process may write into."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {path}: the folder {parent} is not writable")


def check_output_dir(path: str | Path, flag: str) -> Path:
    """``path`` as a folder to create or write into: refused if it is a file or cannot be written."""
    path = Path(path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise OutputPathError(f"{flag} {path} is a file; a folder is needed (a new or existing folder)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"{flag} {path}: the folder {path} is not writable")
        return path
    _writable_parent(path, flag)
    return path


def check_output_file(path: str | Path, flag: str, *, force: bool = True) -> Path:
    """``path`` as a file to write: refused if it is a folder, cannot be written, or (unless
    ``force``) already exists."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputPathError(f"{flag} {path} is a directory; a file path is needed")
    if path.exists():
        if not force:
            raise OutputPathError(f"{flag} {path} already exists; pass --force to overwrite it")
        if not os.access(path, os.W_OK):
            raise OutputPathError(f"{flag} {path} is not writable")
    _writable_parent(path, flag)
    return path
