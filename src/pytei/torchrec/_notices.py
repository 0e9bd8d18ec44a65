"""Notices TorchRec 1.8 and torch 2.13 log that are addressed to TorchRec, not to pytei's users: dropped
from their loggers once TorchRec is in use (nothing else those loggers say is touched)."""

from __future__ import annotations

import logging

__all__ = ["quiet_notices"]

#: Notices TorchRec 1.8 and torch 2.13 log once per rank or per table, addressed to TorchRec, not to the
#: user: TorchRec calls torch.fx.is_fx_tracing (deprecated); data-parallel tables ignore caching and,
#: replicated, have no sharding spec (TorchRec's planner says so on the root logger).
_NOTICES = {
    "torch.fx._symbolic_trace": "is_fx_tracing will return true",
    "torchrec.distributed.utils": "caching params will be ignored",
    "": "Sharding spec not found for",
}


class _Drop(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_notices() -> None:
    """Drop ``_NOTICES`` from their loggers (once per process)."""
    for name, text in _NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(text))
