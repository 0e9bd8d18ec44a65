"""Content fingerprints of a campaign's checkpoints: part of a results database's identity.

A spec names a checkpoint by its path; retraining into that path between a run and its resume
would otherwise let one database hold the trials of two models. The fingerprint is a SHA-256 over
the checkpoint's weights and metadata files (names and bytes), recorded when a campaign is run and
compared on every later run or resume (:meth:`pytei.campaign.store.Store.attach_spec`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..checkpoint import META, WEIGHTS

__all__ = ["checkpoint_fingerprint", "fingerprints"]

_BLOCK = 1 << 20


def checkpoint_fingerprint(directory: str | Path) -> str | None:
    """SHA-256 (hex) of a checkpoint's weights and metadata; None when neither file exists (a missing
    checkpoint: its trials fail and say so)."""
    digest = hashlib.sha256(b"pytei.checkpoint.fingerprint/1")
    found = False
    for name in (WEIGHTS, META):
        path = Path(directory) / name
        if not path.is_file():
            continue
        found = True
        digest.update(f"\x1f{name}\x1f{path.stat().st_size}\x1f".encode())
        with path.open("rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
    return digest.hexdigest() if found else None


def fingerprints(model_specs: Mapping[str, Mapping], others: Iterable[str] = ()) -> dict[str, str]:
    """``{checkpoint path: fingerprint}`` of the checkpoints among a plan's model specs (trained or
    sharded) and of ``others`` (a stale host's checkpoint)."""
    out = {}
    paths = [m.get("checkpoint", m.get("sharded")) for m in model_specs.values()]
    for where in [*paths, *others]:
        if isinstance(where, str):
            digest = checkpoint_fingerprint(where)
            if digest is not None:
                out[where] = digest
    return out
