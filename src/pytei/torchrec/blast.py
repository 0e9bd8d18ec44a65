"""Blast radius of one bit flip in an embedding row, measured through the model's own kernels.

For a flip in a row's codes, scale or bias: how many of the row's ``dim`` values the lookup kernel
(the float EBC's ``nn.EmbeddingBag`` or FBGEMM's TBE) returns differently, by how much, how many test
samples read the row and how many of their logits change. Every number is measured by running the
model (a one-id bag reads the row; the whole test set gives the logits) before and after XOR-ing the
bit into the live row bytes (``pytei.torchrec.tables``), then restoring them; nothing is derived from
the quantization formula. Values and logits count as changed when their bits differ.

Flips are drawn per (seed, table, row, field): the same rows and, where a field has the same bit count
(the fp16 scale and bias of int8 and int4 rows), the same bit, in every version of the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ._require import require
from ._storage import TableStorage, tables

__all__ = ["FlipEffect", "blast_radius", "readers"]

#: Bits of one stored value of each field, by row format (codes) or field name (scale, bias: fp16).
_CODE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4, "int2": 2}


@dataclass(frozen=True)
class FlipEffect:
    """What one measured bit flip did (``bit``: position in the field's bits of the row, LSB-first bytes)."""

    sparse_type: str
    field: str
    table: str
    row: int
    bit: int
    dim: int
    values_changed: int
    max_value_change: float
    readers: int
    logits_changed: int
    max_logit_change: float


def _draw(seed: int, table: str, row: int, field: str, n_bits: int) -> int:
    digest = hashlib.sha256(f"pytei.blast\x1f{seed}\x1f{table}\x1f{row}\x1f{field}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n_bits


def _field_bits(t: TableStorage, field: str) -> int:
    lo, hi = t.fields[field]
    return (hi - lo) * 8 if field != "codes" else t.dim * _CODE_BITS[t.sparse_type]


def _bits_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.contiguous().view(torch.int32) != b.contiguous().view(torch.int32)


def _change(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (b.double() - a.double()).abs()
    return float(torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d).max()) if d.numel() else 0.0


def _read_row(model: nn.Module, t: TableStorage, row: int) -> torch.Tensor:
    """The row as the collection's kernel returns it: a one-sample batch whose only id is ``row``."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    collection: Any = model.get_submodule(t.module)
    configs = collection.embedding_bag_configs()
    keys = [f for c in configs for f in c.feature_names]
    lengths = torch.tensor([1 if k == t.features[0] else 0 for k in keys], dtype=torch.int32)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    kjt = KeyedJaggedTensor(
        keys=keys, values=torch.tensor([row], dtype=torch.int64), lengths=lengths, offsets=offsets
    )
    with torch.no_grad():
        return collection(kjt).to_dict()[t.features[0]][0].float().clone()


def readers(batches: Sequence[tuple[Any, ...]], features: Sequence[str], row: int) -> int:
    """How many samples of ``batches`` (``(dense, kjt)``) look up ``row`` through any of ``features``."""
    count = 0
    for batch in batches:
        kjt = batch[1]
        size = int(batch[0].shape[0])
        hit = torch.zeros(size, dtype=torch.bool)
        for f in features:
            jt = kjt[f]
            owner = torch.repeat_interleave(torch.arange(size), jt.lengths().long())
            hit[owner[jt.values() == row]] = True
        count += int(hit.sum())
    return count


def _logits(model: nn.Module, batches: Sequence[tuple[Any, ...]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(*b).float().reshape(-1) for b in batches])


def blast_radius(
    model: nn.Module,
    batches: Sequence[tuple[Any, ...]],
    rows: Sequence[tuple[str, int]],
    *,
    fields: Sequence[str] = ("codes", "scale", "bias"),
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One :class:`FlipEffect` (as a dict) per (table name, row) in ``rows`` and field of ``fields`` the
    table has, each flip measured alone on ``batches`` and undone (the bytes are restored bit for bit)."""
    require("pytei.torchrec.blast_radius")
    by_name = {t.name: t for t in tables(model)}
    model.eval()
    clean = _logits(model, batches)
    out = []
    for name, row in rows:
        t = by_name[name]
        n_readers = readers(batches, t.features, row)
        before = _read_row(model, t, row)
        for field in fields:
            if field not in t.fields:
                continue
            bit = _draw(seed, name, row, field, _field_bits(t, field))
            byte = t.fields[field][0] + bit // 8
            mask = 1 << (bit % 8)
            t.row_bytes[row, byte] ^= mask
            try:
                after = _read_row(model, t, row)
                logits = _logits(model, batches)
            finally:
                t.row_bytes[row, byte] ^= mask
            effect = FlipEffect(
                t.sparse_type,
                field,
                t.table,
                row,
                bit,
                t.dim,
                int(_bits_differ(before, after).sum()),
                _change(before, after),
                n_readers,
                int(_bits_differ(clean, logits).sum()),
                _change(clean, logits),
            )
            out.append(asdict(effect))
    return out
