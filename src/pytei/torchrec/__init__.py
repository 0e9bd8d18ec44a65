"""TorchRec and FBGEMM: storage of embedding tables (float, table-batched, quantized) as injection sites.

Needs the optional extra ``pytei[torchrec]``; importing this package does not import torchrec (its
functions do, through :func:`require`).
"""

from __future__ import annotations

from ._require import INSTALL, require

__all__ = ["INSTALL", "require"]
