"""Embedding tables of TorchRec and FBGEMM as injection sites: one site per field of each table's rows.

TorchRec's quantized collections keep their tables in FBGEMM table-batched embedding (TBE) modules held
in a plain list (``_emb_modules``, not registered), and re-expose the same bytes as registered buffers
(``embedding_bags.<table>.weight``, int4/int2 wrapped in ``UInt4Tensor``/``UInt2Tensor``, optionally
``weight_qscale``/``weight_qbias``, and ``tbes.N`` with ``register_tbes``). pytei reads the storage the
kernels read, ``split_embedding_weights()``'s row views, once per table, and hides those aliases.

A row of an FBGEMM int8/int4/int2 table is ``[scale fp16 | bias fp16 | codes | padding]`` (the fp16
pair at the end with ``reverse_qparam``), codes packed ``8 // bits`` to a byte, the first in the low
bits; fp32/fp16/bf16/fp8 rows are ``[values | padding]``. Padding fills a row to the TBE's alignment
(16 bytes in torchrec's collections) and is never read. Each field is a site of shape ``[rows, k]``:

- ``<name>`` the codes (``uint8``: int8 codes, int4/int2 bytes of packed codes, fp8 bytes; or the
  ``float32``/``float16``/``bfloat16`` values), with a bit layout per format (``pytei.bits``);
- ``<name>_qscale`` and ``<name>_qbias`` (``float16 [rows, 1]``), ``<name>_padding`` (``uint8``).

``<name>`` is the float collection's parameter name (``<ebc>.embedding_bags.<table>.weight``) so that a
float EBC, a quantized EBC and its TBE share names, and per-name fault streams give them the same faults
where the fields coincide: float values of the same dtype and shape, and the scale/bias of every
int8/int4/int2 version of a table.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..bits import BitLayout, code_layout, fp8_layout
from ..exceptions import ArgumentError
from ..targets import Site, register_storage
from ._require import require

__all__ = ["SPARSE_TYPES", "TableStorage", "table_of", "tables"]

#: Row formats of FBGEMM tables, by ``SparseType`` value.
SPARSE_TYPES = ("fp32", "fp16", "bf16", "fp8", "int8", "int4", "int2")
_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4, "int2": 2}
_FLOAT_VIEWS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
#: Site name suffix of each field.
SUFFIXES = {"codes": "", "scale": "_qscale", "bias": "_qbias", "padding": "_padding", "rows": "_rows"}
#: FBGEMM's scale and bias: two fp16 values per row.
_QPARAM_BYTES = 4


@dataclass(frozen=True)
class TableStorage:
    """One embedding table's stored rows: where they live, who reads them, each field's byte range."""

    name: str
    module: str
    table: str
    features: tuple[str, ...]
    rows: int
    dim: int
    sparse_type: str
    row_bytes: torch.Tensor
    fields: dict[str, tuple[int, int]]
    fp8_exponent_bits: int = 4

    def site(self, field: str) -> Site:
        """The injection site of ``field`` (see ``FIELDS``), or of the whole stored rows (``"rows"``)."""
        if field == "rows":
            spans = tuple((f, lo, hi) for f, (lo, hi) in self.fields.items())
            return Site(self.name + "_rows", self.row_bytes, "embedding", "weight", "rows", None, spans)
        lo, hi = self.fields[field]
        raw = self.row_bytes[:, lo:hi]
        fmt: BitLayout | None = None
        if field in ("scale", "bias"):
            tensor = raw.view(torch.float16)
        elif field == "codes" and self.sparse_type in _FLOAT_VIEWS:
            tensor = raw.view(_FLOAT_VIEWS[self.sparse_type])
        elif field == "codes":
            tensor = raw
            bits = _BITS[self.sparse_type]
            fmt = fp8_layout(self.fp8_exponent_bits) if self.sparse_type == "fp8" else code_layout(bits)
        else:
            tensor = raw
        return Site(self.name + SUFFIXES[field], tensor, "embedding", "weight", field, fmt)

    def sites(self) -> list[Site]:
        """A site per field present (padding included: ``select`` leaves it out unless asked)."""
        return [self.site(f) for f in self.fields]


def row_fields(
    sparse_type: str, dim: int, width: int, *, reverse_qparam: bool = False
) -> dict[str, tuple[int, int]]:
    """Byte range ``[lo, hi)`` of each field in a stored row of ``width`` bytes (empty fields left out)."""
    if sparse_type not in _BITS:
        raise ArgumentError(f"unknown sparse type {sparse_type!r}; allowed: {', '.join(SPARSE_TYPES)}")
    codes = dim * _BITS[sparse_type] // 8
    qparams = _QPARAM_BYTES if sparse_type.startswith("int") else 0
    if codes + qparams > width:
        raise ValueError(
            f"a {sparse_type} row of dim {dim} needs {codes + qparams} bytes, the table stores {width}"
        )
    if not qparams:
        out = {"codes": (0, codes)}
    elif reverse_qparam:
        out = {"codes": (0, codes), "scale": (codes, codes + 2), "bias": (codes + 2, codes + 4)}
    else:
        out = {"scale": (0, 2), "bias": (2, 4), "codes": (4, 4 + codes)}
    if width > codes + qparams:
        out["padding"] = (codes + qparams, width)
    return out


def _tbe_classes() -> tuple[type[nn.Module], type[nn.Module]]:
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        IntNBitTableBatchedEmbeddingBagsCodegen,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

    return IntNBitTableBatchedEmbeddingBagsCodegen, SplitTableBatchedEmbeddingBagsCodegen


def _quant_collections() -> tuple[type[nn.Module], ...]:
    from torchrec.quant.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    return EmbeddingBagCollection, EmbeddingCollection


def _float_collections() -> tuple[type[nn.Module], ...]:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    return EmbeddingBagCollection, EmbeddingCollection


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A ``uint8 [rows, width]`` view of a 2-D row tensor (any dtype) over the same storage."""
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def _intn_tables(
    tbe: Any, path: str, names: list[str], features: list[tuple[str, ...]]
) -> list[TableStorage]:
    """The tables of an ``IntNBitTableBatchedEmbeddingBagsCodegen`` (inference TBE, any row format)."""
    specs = tbe.embedding_specs  # (name, rows, dim, SparseType, location)
    rows_views = tbe.split_embedding_weights(split_scale_shifts=False)
    reverse = bool(getattr(tbe, "reverse_qparam", False))
    exp_bits = getattr(tbe, "fp8_exponent_bits", None) or 4
    out = []
    for spec, (view, _), name, feats in zip(specs, rows_views, names, features, strict=True):
        sparse_type, dim = spec[3].value, int(spec[2])
        row_bytes = _bytes(view)
        fields = row_fields(sparse_type, dim, row_bytes.shape[1], reverse_qparam=reverse)
        out.append(
            TableStorage(
                name, path, spec[0], feats, int(spec[1]), dim, sparse_type, row_bytes, fields, exp_bits
            )
        )
    return out


def _split_tables(
    tbe: Any, path: str, names: list[str], features: list[tuple[str, ...]]
) -> list[TableStorage]:
    """The tables of a ``SplitTableBatchedEmbeddingBagsCodegen`` (training TBE: fp32/fp16 rows)."""
    sparse_type = tbe.weights_precision.value
    out = []
    for k, (view, name, feats) in enumerate(zip(tbe.split_embedding_weights(), names, features, strict=True)):
        row_bytes = _bytes(view)
        fields = row_fields(sparse_type, int(view.shape[1]), row_bytes.shape[1])
        out.append(
            TableStorage(
                name,
                path,
                f"t{k}",
                feats,
                int(view.shape[0]),
                int(view.shape[1]),
                sparse_type,
                row_bytes,
                fields,
            )
        )
    return out


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules by dotted path, TorchRec collections not entered (they are read whole)."""
    quant, floats = _quant_collections(), _float_collections()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        yield path, module
        if isinstance(module, quant + floats):
            continue
        children = [(f"{path}.{n}" if path else n, c) for n, c in module.named_children()]
        stack.extend(reversed(children))


def _collection_tables(module: Any, path: str) -> list[TableStorage]:
    """Tables of a quantized torchrec EBC/EC, from its TBEs, named like the float collection's parameters."""
    out = []
    group = "embedding_bags" if hasattr(module, "embedding_bags") else "embeddings"
    prefix = f"{path}.{group}" if path else group
    for tables_of_key, tbe in zip(module._key_to_tables.values(), module._emb_modules, strict=True):
        names = [f"{prefix}.{t.name}.weight" for t in tables_of_key]
        features = [tuple(t.feature_names) for t in tables_of_key]
        out += _intn_tables(tbe, path, names, features)
    return out


def _float_tables(module: Any, path: str) -> list[TableStorage]:
    """Tables of a float torchrec EBC/EC: its ``nn.EmbeddingBag``/``nn.Embedding`` weights (already sites)."""
    group = "embedding_bags" if hasattr(module, "embedding_bags") else "embeddings"
    configs = module.embedding_bag_configs() if group == "embedding_bags" else module.embedding_configs()
    prefix = f"{path}.{group}" if path else group
    out = []
    for cfg in configs:
        weight = getattr(module, group)[cfg.name].weight
        sparse_type = _DTYPE_TYPES.get(weight.dtype)
        if sparse_type is None:
            continue
        row_bytes = weight.detach().view(torch.uint8)
        out.append(
            TableStorage(
                f"{prefix}.{cfg.name}.weight",
                path,
                cfg.name,
                tuple(cfg.feature_names),
                int(weight.shape[0]),
                int(weight.shape[1]),
                sparse_type,
                row_bytes,
                {"codes": (0, row_bytes.shape[1])},
            )
        )
    return out


def _specs(tbe: Any) -> list[Any]:
    """A TBE's ``embedding_specs`` (one tuple per table)."""
    return list(tbe.embedding_specs)


def _scan(model: nn.Module) -> tuple[list[TableStorage], list[str]]:
    """Every table of ``model`` (deduplicated by storage) and the module paths whose tensors they replace."""
    intn, split = _tbe_classes()
    quant, floats = _quant_collections(), _float_collections()
    found: list[TableStorage] = []
    covered: list[str] = []
    seen: set[int] = set()
    for path, found_module in _walk(model):
        module: Any = found_module
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, quant):
            found += _collection_tables(module, path)
            covered.append(path)
            seen.update(id(t) for t in getattr(module, "_emb_modules"))  # noqa: B009 - untyped attribute
        elif isinstance(module, floats):
            found += _float_tables(module, path)
        elif isinstance(module, intn):
            names = [f"{path}.{spec[0]}.weight" for spec in _specs(module)]
            found += _intn_tables(module, path, names, [()] * len(names))
            covered.append(path)
        elif isinstance(module, split):
            names = [f"{path}.t{k}.weight" for k in range(len(_specs(module)))]
            found += _split_tables(module, path, names, [()] * len(names))
            covered.append(path)
    unique: dict[tuple[str, int, int], TableStorage] = {}
    for t in found:  # the same TBE reached twice (a shared module) is one table
        key = (str(t.row_bytes.device), t.row_bytes.data_ptr(), t.row_bytes.numel())
        unique.setdefault(key, t)
    return list(unique.values()), covered


def tables(model: nn.Module) -> list[TableStorage]:
    """Every embedding table in ``model``: float torchrec collections, quantized ones and bare FBGEMM TBEs."""
    require("pytei.torchrec.tables")
    return _scan(model)[0]


def table_of(model: nn.Module, site_name: str) -> tuple[TableStorage, str]:
    """The table a site of ``model`` belongs to, and the site's field."""
    for t in tables(model):
        for field, suffix in SUFFIXES.items():
            if (field in t.fields or field == "rows") and site_name == t.name + suffix:
                return t, field
    raise ArgumentError(f"{site_name!r} is no table site of {type(model).__name__}")


def _provide(model: nn.Module, raw: bool) -> tuple[list[Site], list[str]]:
    """Storage provider for ``pytei.targets``: the sites of tables outside ``named_parameters`` (with
    ``raw``, one per table over its stored rows)."""
    found, covered = _scan(model)
    held = [t for t in found if t.module in covered]
    sites = [t.site("rows") for t in held] if raw else [s for t in held for s in t.sites()]
    return sites, covered


register_storage("fbgemm_gpu", _provide)
