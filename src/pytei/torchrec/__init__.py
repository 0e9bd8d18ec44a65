"""TorchRec and FBGEMM: embedding tables (float, table-batched, quantized) as injection sites.

Needs the optional extra ``pytei[torchrec]``. Importing this package does not import torchrec; its
functions do (through :func:`require`). Once ``fbgemm_gpu`` is imported (torchrec imports it),
``pytei.targets.select`` finds the tables of quantized collections and TBEs by itself, one site per
row field (see ``pytei.torchrec._storage``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._require import INSTALL, require

if TYPE_CHECKING:
    from ._storage import TableStorage, table_of, tables

__all__ = ["INSTALL", "SPARSE_TYPES", "TableStorage", "require", "row_fields", "table_of", "tables"]

_LAZY = {"TableStorage", "table_of", "tables", "SPARSE_TYPES", "row_fields"}


def __getattr__(name: str) -> Any:
    """The storage API, imported on first use (it imports torchrec)."""
    if name in _LAZY:
        require(f"pytei.torchrec.{name}")
        from . import _storage

        return getattr(_storage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
