"""TorchRec values in a captured graph: batch inputs that are ``KeyedJaggedTensor`` (KJT), embedding
collections kept as graph leaves, and which sample of a KJT batch reads which row of which table.

Nothing here imports torchrec: a model can only hold torchrec modules or be fed KJTs once torchrec has
been imported, so values are recognised by their class's module, torchrec's classes are looked up in
``sys.modules`` only, and the tables (``pytei.torchrec.tables``) are asked for only when a model holds
one of those modules.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "Collection",
    "batch_rows",
    "collections",
    "feature_reads",
    "is_collection",
    "is_tbe",
    "is_torchrec_value",
    "take",
]

#: torchrec's embedding collection interfaces (float and quantized EBC/EC derive from them).
_COLLECTION_CLASSES = (
    ("torchrec.modules.embedding_modules", "EmbeddingBagCollectionInterface"),
    ("torchrec.modules.embedding_modules", "EmbeddingCollectionInterface"),
)
#: FBGEMM's table-batched embedding modules: (module path, class name).
_TBE_CLASSES = (
    ("fbgemm_gpu.split_table_batched_embeddings_ops_inference", "IntNBitTableBatchedEmbeddingBagsCodegen"),
    ("fbgemm_gpu.split_table_batched_embeddings_ops_training", "SplitTableBatchedEmbeddingBagsCodegen"),
)


def is_torchrec_value(value: Any) -> bool:
    """Whether ``value`` is one of torchrec's sparse values (KJT, JaggedTensor, KeyedTensor)."""
    return type(value).__module__.startswith("torchrec.sparse")


def _is_kjt(value: Any) -> bool:
    return is_torchrec_value(value) and type(value).__name__ == "KeyedJaggedTensor"


def batch_rows(value: Any) -> int | None:
    """Samples in one batch input: a tensor's first dimension, a KJT's stride; None for anything else
    (or a KJT whose keys have different batch sizes)."""
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.dim() else None
    if _is_kjt(value) and not value.variable_stride_per_key() and value.inverse_indices_or_none() is None:
        return int(value.stride())
    return None


def take(value: Any, idx: torch.Tensor) -> Any:
    """Samples ``idx`` (sorted int64) of one batch input: a tensor's rows, or a KJT holding, for every
    key, those samples' ids (and weights) in their original order."""
    if isinstance(value, torch.Tensor):
        return value[idx]
    if batch_rows(value) is None:
        raise TypeError(f"cannot take samples of a {type(value).__name__}")
    keys, rows = value.keys(), value.stride()
    lengths = value.lengths()
    idx = idx.to(lengths.device)
    per_key = lengths.view(len(keys), rows).to(torch.int64)
    starts = value.offsets()[:-1].view(len(keys), rows).to(torch.int64)
    kept_lengths = per_key[:, idx].reshape(-1)
    kept_starts = starts[:, idx].reshape(-1)
    ends = torch.cumsum(kept_lengths, 0)
    total = int(ends[-1]) if ends.numel() else 0
    pos = torch.repeat_interleave(kept_starts - (ends - kept_lengths), kept_lengths) + torch.arange(
        total, dtype=torch.int64, device=lengths.device
    )
    weights = value.weights_or_none()
    return type(value)(
        keys=keys,
        values=value.values()[pos],
        weights=weights[pos] if weights is not None else None,
        lengths=kept_lengths.to(lengths.dtype),
        offsets=torch.cat([ends.new_zeros(1), ends]).to(value.offsets().dtype),
        stride=int(idx.numel()),
    )


def feature_reads(kjt: Any, features: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, sample of each id) that ``features`` of one KJT batch look up, as int64 on CPU."""
    ids, samples = [], []
    for key in features:
        jagged = kjt[key]
        lengths = jagged.lengths().to(torch.int64).cpu()
        ids.append(jagged.values().detach().to(torch.int64).cpu())
        samples.append(torch.repeat_interleave(torch.arange(lengths.numel(), dtype=torch.int64), lengths))
    if not ids:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty
    return torch.cat(ids), torch.cat(samples)


def _imported(classes: Sequence[tuple[str, str]]) -> tuple[type, ...]:
    """The classes ``(module path, name)`` whose modules are already imported."""
    found = []
    for path, name in classes:
        module = sys.modules.get(path)
        if module is not None and hasattr(module, name):
            found.append(getattr(module, name))
    return tuple(found)


def is_tbe(module: nn.Module) -> bool:
    """Whether ``module`` is one of FBGEMM's table-batched embedding modules."""
    types = _imported(_TBE_CLASSES)
    return bool(types) and isinstance(module, types)


def is_collection(module: nn.Module) -> bool:
    """Whether ``module`` is a torchrec embedding collection (float or quantized EBC/EC) or an FBGEMM
    TBE: a graph leaf, run as one call (their forwards read unregistered modules and fbgemm ops that
    tracing would bake in)."""
    types = _imported(_COLLECTION_CLASSES + _TBE_CLASSES)
    return bool(types) and isinstance(module, types)


@dataclass(frozen=True)
class Collection:
    """The embedding tables one module reads (a torchrec EBC/EC, float or quantized, or a TBE): per
    table, the KJT keys that look it up and its rows, and per injection-site name (every field's), its
    table."""

    path: str
    features: Mapping[str, tuple[str, ...]]
    rows: Mapping[str, int]
    sites: Mapping[str, str]
    padding: frozenset[str]
    """The sites of rows' padding (bytes up to the row alignment, which no kernel reads)."""
    own_weights: bool
    """Its tables are its own registered weights (a float collection): those are the sites."""
    remapped: bool
    """Ids go through a pruning remap before reaching rows: which sample reads which row is unknown."""


def _remapped(module: nn.Module) -> bool:
    for tbe in [*getattr(module, "_emb_modules", ()), module]:
        for attr in ("index_remapping_hash_table", "index_remappings_array"):
            t = getattr(tbe, attr, None)
            if isinstance(t, torch.Tensor) and t.numel() > 0:
                return True
        if getattr(tbe, "index_remapping_hash_table_cpu", None) is not None:
            return True
    return False


def collections(model: nn.Module) -> dict[str, Collection]:
    """The modules of ``model`` that read torchrec/FBGEMM embedding tables, by dotted path, with their
    tables as ``pytei.torchrec.tables`` finds them; empty unless torchrec is imported."""
    if "torchrec" not in sys.modules or not any(is_collection(m) for m in model.modules()):
        return {}
    from ..torchrec import tables
    from ..torchrec._storage import SUFFIXES

    grouped: dict[str, list[Any]] = {}
    for t in tables(model):
        grouped.setdefault(t.module, []).append(t)
    out = {}
    for path, found in grouped.items():
        module = model.get_submodule(path)
        out[path] = Collection(
            path,
            {t.table: tuple(t.features) for t in found},
            {t.table: int(t.rows) for t in found},
            {t.name + suffix: t.table for t in found for suffix in SUFFIXES.values()},
            frozenset(t.name + SUFFIXES["padding"] for t in found),
            own_weights=not hasattr(module, "_emb_modules") and not is_tbe(module),
            remapped=_remapped(module),
        )
    return out
