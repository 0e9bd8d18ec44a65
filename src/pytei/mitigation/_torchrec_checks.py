"""ABFT checks of TorchRec and FBGEMM modules (registered when torchrec is imported).

* TorchRec's quantized ``EmbeddingBagCollection`` (``torchrec.quant.embedding_modules``, "QEBC"): its
  tables live in FBGEMM ``IntNBitTableBatchedEmbeddingBagsCodegen`` modules that it calls directly (no
  module hook fires on them), so the check sits on the collection: checksums of the stored rows
  (Li et al. 2022), pooled per bag with one ``F.embedding_bag`` over every feature, against the row
  sums of each feature's slice of the output ``KeyedTensor``. See :class:`QuantBagCheck`.
* TorchRec's float ``EmbeddingBagCollection`` needs no check of its own: it calls its
  ``nn.EmbeddingBag`` tables as modules, which ``BagCheck`` hooks one by one.
* TorchRec's cross networks (``LowRankCrossNet`` of ``dcnv2``, ``CrossNet``, ``VectorCrossNet``,
  ``LowRankMixtureCrossNet``) are refused with the reason (:class:`CrossNetRefusal`).
"""

from __future__ import annotations

import itertools
import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checksums import _BLOCK, Check, arg, register_check
from .roofline import Cost

__all__ = ["CrossNetRefusal", "QuantBagCheck", "row_checksums_of"]

#: Pooling modes of a QEBC table that a checksum describes (FBGEMM's ``PoolingMode``: SUM, MEAN).
_POOLINGS = ("SUM", "MEAN")
#: Row formats whose stored bytes this module decodes (not FBGEMM's fp8, which torchrec 1.8's
#: collections cannot hold: see ``pytei.torchrec.quantize.UNSUPPORTED``).
_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4", "int2")
_FLOAT_VIEWS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_CODE_BITS = {"int8": 8, "int4": 4, "int2": 2}
#: The QEBC attribute that makes it cache its feature order (``MODULE_ATTR_CACHE_FEATURES_ORDER``).
_CACHE_ORDER = "__cache_features_order"
#: Up to this many features, ids are range-checked by each feature's min and max (else id by id).
_FEATURE_LOOP = 64


def _quant_ebc() -> type[nn.Module]:
    from torchrec.quant.embedding_modules import EmbeddingBagCollection

    return EmbeddingBagCollection


def _ordered_configs(module: Any) -> list[Any]:
    """The QEBC's table configs in the order of its TBEs and of its output (grouped by pooling)."""
    return [cfg for group in module._key_to_tables.values() for cfg in group]


def _storages(module: nn.Module) -> list[Any]:
    """``TableStorage`` of each table of the QEBC, in ``_ordered_configs`` order."""
    from ..torchrec import tables

    found = {t.table: t for t in tables(module)}
    return [found[cfg.name] for cfg in _ordered_configs(module)]


def row_checksums_of(storage: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[rows, 2]``: per stored row (a ``pytei.torchrec.TableStorage``) the sum ``C`` of the values the
    kernel reads and ``A`` the sum of the absolute values of its terms, in float64, stored as ``dtype``.

    int8/int4/int2 rows (``value = scale * q + bias``): ``C = scale * sum_d q_d + D * bias`` and
    ``A = |scale| * sum_d q_d + D * |bias|`` (codes are unsigned); fp32/fp16/bf16 rows: the sum and
    the sum of absolute values of the values. Reads the live bytes: call it on clean tables.
    """
    rows_bytes = storage.row_bytes
    kind, dim = storage.sparse_type, storage.dim
    lo, hi = storage.fields["codes"]
    out = torch.empty(storage.rows, 2, dtype=dtype, device=rows_bytes.device)
    with torch.no_grad():
        for start in range(0, storage.rows, _BLOCK):
            block = rows_bytes[start : start + _BLOCK]
            codes = block[:, lo:hi]
            if kind in _CODE_BITS:
                bits = _CODE_BITS[kind]
                mask = (1 << bits) - 1
                q = torch.stack([(codes >> s) & mask for s in range(0, 8, bits)]).sum(
                    (0, 2), dtype=torch.int64
                )
                qsum = q.to(torch.float64)
                scale = _fp16(block, storage.fields["scale"])
                bias = _fp16(block, storage.fields["bias"])
                out[start : start + _BLOCK, 0] = scale * qsum + dim * bias
                out[start : start + _BLOCK, 1] = scale.abs() * qsum + dim * bias.abs()
                continue
            values = codes.contiguous().view(_FLOAT_VIEWS[kind]).to(torch.float64)
            out[start : start + _BLOCK, 0] = values.sum(1)
            out[start : start + _BLOCK, 1] = values.abs().sum(1)
    return out


def _fp16(block: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """The fp16 value (scale or bias) stored in bytes ``span`` of each row, in float64."""
    return block[:, span[0] : span[1]].contiguous().view(torch.float16).reshape(-1).to(torch.float64)


def _signature(module: nn.Module) -> tuple:
    """What the checksums of a QEBC follow: each table's device, address, shape and format."""
    return tuple(
        (t.row_bytes.device, t.row_bytes.data_ptr(), tuple(t.row_bytes.shape), t.sparse_type)
        for t in _storages(module)
    )


class QuantBagCheck(Check):
    """TorchRec's quantized ``EmbeddingBagCollection``: per bag (feature x sample), the row sum of the
    feature's slice of the output against the pooled checksums of the stored rows it read.

    The clean checksums (:func:`row_checksums_of`) of all tables sit in one ``[rows, 2]`` table, a zero
    row before each table (FBGEMM skips the id -1, a pruned row): a batch's checks are one
    ``F.embedding_bag`` over the KJT's ids shifted to their table's rows (two when the collection is
    weighted: ``A`` pools ``|w|``), divided by the bag size for MEAN tables, and the row sums of the
    output ``[B, sum D]`` (a reshape-sum when all dims are equal). Ids out of a table's range are read
    as row 0, as FBGEMM's bounds check does. The units are the bags, feature-major (the KJT's order);
    a failing bag flags its sample, whose whole output row a re-execution replaces.

    ``m`` is the pooled ``A = |scale| * sum_d q_d + D * |bias|`` (or ``sum |values|``), ``n = 3L + D``
    terms (``L`` ids in the bag: FBGEMM's ``scale * q + bias`` and its accumulation, the pooled
    checksum; ``D`` values summed). What is detected: a change ``d`` of a bag's row sum is caught when
    ``|d| > tau * m + |r_clean|`` (``r_clean`` the bag's residual without the fault, ``|r_clean| <=
    tau * m / margin`` after calibration). A flip changes a row's sum by ``d = scale * 2**b`` (code bit
    ``b``, times the id's weight), ``d = (scale' - scale) * sum_d q_d`` (scale) or ``d = D * (bias' -
    bias)`` (bias), each pooled into every bag that reads the row; flips that leave the row sum
    unchanged (a scale flip of an all-zero row of codes) change no output and are not detectable.
    """

    covers_descendants = True

    def __init__(self, module: nn.Module) -> None:
        mod: Any = module
        configs = _ordered_configs(mod)
        storages = _storages(module)
        device = storages[0].row_bytes.device
        self._setup(torch.float32, 0, _signature(module))  # width: set below, from the tables
        parts, bases, feature_rows, dims, means = [], [], [], [], []
        start = 0
        zero = torch.zeros(1, 2, dtype=self.dtype, device=device)
        for cfg, storage in zip(configs, storages, strict=True):
            parts += [zero, row_checksums_of(storage, self.dtype)]
            base = start + 1  # the zero row before the table takes id -1
            start = base + storage.rows
            for _ in cfg.feature_names:
                bases.append(base)
                feature_rows.append(storage.rows)
                dims.append(storage.dim)
                means.append(cfg.pooling.name == "MEAN")
        self.table = torch.cat(parts)
        self.features = [f for cfg in configs for f in cfg.feature_names]
        self.dims = dims
        self.width = sum(dims)
        self.base = torch.tensor(bases, dtype=torch.int64, device=device)
        self.rows = torch.tensor(feature_rows, dtype=torch.int64, device=device)
        self.dim_of = torch.tensor(dims, dtype=self.dtype, device=device)
        self.mean = torch.tensor(means, dtype=torch.bool, device=device) if any(means) else None
        self.weighted = bool(mod._is_weighted)
        self.row_bytes = [
            s.row_bytes.shape[1] for cfg, s in zip(configs, storages, strict=True) for _ in cfg.feature_names
        ]
        self.runs = _runs(dims)
        self._module = weakref.ref(module)  # its cached feature order, if any (see _order)
        self._orders: dict[tuple[str, ...], list[int]] = {}

    # --- what the checksums follow -------------------------------------------------------------

    @staticmethod
    def weight_of(module: nn.Module) -> torch.Tensor:
        """The stored rows of the first table (the checksums follow every table: see ``stale``)."""
        first: torch.Tensor = _storages(module)[0].row_bytes
        return first

    def stale(self, module: nn.Module) -> bool:
        """Whether a table of ``module`` moved (device, storage), changed shape or format."""
        return self.encoded != _signature(module)

    @classmethod
    def why_not(cls, module: nn.Module) -> str | None:
        mod: Any = module
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
            IntNBitTableBatchedEmbeddingBagsCodegen,
        )

        for tbe in mod._emb_modules:
            if type(tbe) is not IntNBitTableBatchedEmbeddingBagsCodegen:
                return f"its tables are in a {type(tbe).__name__}, whose rows pytei cannot read"
            if _remaps(tbe):
                return "its tables are pruned (index remapping), so ids do not name stored rows"
        for cfg in _ordered_configs(mod):
            if cfg.pooling.name not in _POOLINGS:
                return f"table {cfg.name!r} pools by {cfg.pooling.name}, which is not linear"
        kinds = {t.sparse_type for t in _storages(module)}
        if not kinds <= set(_FORMATS):
            return f"its rows are stored as {sorted(kinds - set(_FORMATS))}, which pytei cannot decode"
        return None

    # --- units: bags (feature x sample); rows: samples ---------------------------------------------

    def values(self, output: Any) -> torch.Tensor:
        out: torch.Tensor = output.values()
        return out

    def row_mask(self, bad: torch.Tensor) -> torch.Tensor:
        return bad.reshape(len(self.features), -1).any(0)

    def rebuild(self, output: Any, values: torch.Tensor) -> Any:
        from torchrec.sparse.jagged_tensor import KeyedTensor

        return KeyedTensor(
            keys=output.keys(),
            length_per_key=output.length_per_key(),
            values=values,
            key_dim=output.key_dim(),
        )

    # --- the check ---------------------------------------------------------------------------------

    def _order(self, kjt: Any) -> list[int] | None:
        """Where each of the collection's features is among the KJT's keys, as its forward permutes
        them: by the keys, or by the order it cached on its first call (``cache_features_order``, which
        assumes every batch's keys come in the same order); None if the KJT is in its order already."""
        module: Any = self._module()
        cached = getattr(module, _CACHE_ORDER, False) and getattr(module, "_features_order", None)
        keys = tuple(kjt.keys())
        if cached:
            order = list(cached)
        elif list(keys) == self.features:
            return None
        else:
            order = self._orders.get(keys) or self._orders.setdefault(
                keys, [keys.index(f) for f in self.features]
            )
        return None if order == list(range(len(keys))) else order

    def _lengths(self, kjt: Any) -> torch.Tensor:
        """The bag sizes ``[F * B]``, feature-major in the collection's order."""
        order, lengths = self._order(kjt), kjt.lengths()
        return lengths if order is None else lengths.reshape(-1, kjt.stride())[order].reshape(-1)

    def _ids(self, kjt: Any) -> torch.Tensor:
        """The KJT's ids (in the collection's order) as rows of the checksum table: each shifted to its
        table's rows; one out of its table's range (FBGEMM reads row 0 then) to the table's row 0."""
        ids = kjt.values()
        ids = ids if ids.dtype == torch.int64 else ids.long()
        per_key = kjt.length_per_key()
        counts = torch.tensor(per_key, dtype=torch.int64, device=ids.device)
        base = torch.repeat_interleave(self.base, counts, output_size=ids.numel())
        idx = ids + base
        if not self._in_range(ids, kjt.offset_per_key()):
            rows = torch.repeat_interleave(self.rows, counts, output_size=ids.numel())
            idx = torch.where((ids < -1) | (ids >= rows), base, idx)
        return idx

    def _in_range(self, ids: torch.Tensor, offsets: list[int]) -> bool:
        """Whether every id is -1 or within its table, from each feature's min and max (one sync); False
        when there are too many features to ask one by one (then every id is tested)."""
        spans = [(f, a, b) for f, (a, b) in enumerate(itertools.pairwise(offsets)) if b > a]
        if not spans:
            return True
        if len(spans) > _FEATURE_LOOP:
            return False
        bounds = torch.stack([torch.stack(torch.aminmax(ids[a:b])) for _, a, b in spans])
        rows = self.rows[[f for f, _, _ in spans]]
        return bool(((bounds[:, 0] >= -1) & (bounds[:, 1] < rows)).all())

    def _pool(self, kjt: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Per bag, feature-major: the pooled checksum and the pooled bound ``A``."""
        order = self._order(kjt)
        kjt = kjt if order is None else kjt.permute(order)
        idx, offsets, batch = self._ids(kjt), kjt.offsets(), kjt.stride()
        offsets = offsets if offsets.dtype == torch.int64 else offsets.long()
        weights = kjt.weights_or_none() if self.weighted else None
        if weights is None:
            expected, m = F.embedding_bag(
                idx, self.table, offsets, mode="sum", include_last_offset=True
            ).unbind(1)
        else:
            weights = self.cast(weights.detach())
            expected = F.embedding_bag(
                idx, self.table, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True
            )[:, 0]
            m = F.embedding_bag(
                idx,
                self.table,
                offsets,
                mode="sum",
                per_sample_weights=weights.abs(),
                include_last_offset=True,
            )[:, 1]
        if self.mean is not None:  # FBGEMM's MEAN divides the (weighted) sum by the bag size
            size = kjt.lengths().to(self.dtype).clamp_min(1.0).reshape(-1, batch)
            size = torch.where(self.mean[:, None], size, 1.0).reshape(-1)
            expected, m = expected / size, m / size
        return expected, m

    def _row_sums(self, values: torch.Tensor) -> torch.Tensor:
        """``[F, B]``: the row sum of each feature's slice of the output ``[B, sum D]``."""
        batch = values.shape[0]
        sums = []
        col = 0
        for count, dim in self.runs:
            block = values[:, col : col + count * dim].reshape(batch, count, dim)
            sums.append(block.sum(2, dtype=self.dtype))
            col += count * dim
        return (sums[0] if len(sums) == 1 else torch.cat(sums, 1)).t()

    def residual(self, args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.values(output).detach()
        expected, m = self._pool(arg(args, kwargs, 0, "features"))
        r = self._row_sums(values).reshape(-1).sub_(expected)
        return r, m

    def terms(self, args: tuple, kwargs: dict) -> torch.Tensor | float:
        """``3 L + D`` per bag: FBGEMM's decoding and accumulation of the ``L`` rows, the pooled
        checksum, and the ``D`` values of the output's row sum."""
        kjt = arg(args, kwargs, 0, "features")
        lengths = self._lengths(kjt).to(self.dtype)
        return (3.0 * lengths).add_(self.dim_of.repeat_interleave(kjt.stride()))

    def cost(self, args: tuple, kwargs: dict, output: Any) -> Cost:
        """The lookup: reads each id (8 bytes) and its stored row, decodes and pools it (2 FLOPs per
        value), writes the output (float32)."""
        kjt = arg(args, kwargs, 0, "features")
        order, per_key = self._order(kjt), kjt.length_per_key()
        ids = per_key if order is None else [per_key[k] for k in order]
        bags = kjt.stride()
        flops = sum(2.0 * n * d for n, d in zip(ids, self.dims, strict=True))
        moved = sum(n * (8 + w) for n, w in zip(ids, self.row_bytes, strict=True))
        moved += len(self.dims) * (bags + 1) * 8 + bags * self.width * 4
        return Cost(flops, float(moved))


def _runs(dims: list[int]) -> list[tuple[int, int]]:
    """``(count, dim)`` runs of consecutive equal dims (one run when all dims are equal)."""
    runs: list[tuple[int, int]] = []
    for d in dims:
        if runs and runs[-1][1] == d:
            runs[-1] = (runs[-1][0] + 1, d)
        else:
            runs.append((1, d))
    return runs


def _remaps(tbe: Any) -> bool:
    """Whether an FBGEMM inference TBE remaps ids (pruned tables)."""
    tables = [getattr(tbe, n, None) for n in ("index_remapping_hash_table", "index_remappings_array")]
    return getattr(tbe, "index_remapping_hash_table_cpu", None) is not None or any(
        isinstance(t, torch.Tensor) and t.numel() > 0 for t in tables
    )


register_check(_quant_ebc())(QuantBagCheck)


class CrossNetRefusal(Check):
    """TorchRec's cross networks cannot be checked soundly at module level; ``why_not`` says why.

    ``LowRankCrossNet`` computes ``x_{l+1} = x_0 * (W_l (V_l x_l) + b_l) + x_l`` with ``W_l``, ``V_l`` and
    ``b_l`` in ``ParameterList``s, inside its own forward: no submodule is called, so a hook sees only
    ``x_0`` and ``x_L``. A row-sum identity needs each layer's ``x_l``
    (``sum(x_{l+1}) = (W_l^T x_0) . (V_l x_l) + x_0 . b_l + sum(x_l)``), and ``x_L`` is a polynomial of
    degree ``L + 1`` in ``x_0``: the only checksum of it from ``x_0`` and ``x_L`` alone propagates a
    vector back through every layer, ``c_l = c_{l+1} + V_l^T (W_l^T (c_{l+1} * x_0))`` per sample, two
    GEMMs per layer of the network's own size: it costs what re-running the network costs (duplicated
    execution), not a pass over the activations. The same holds for ``CrossNet`` (full-rank ``W_l``),
    ``VectorCrossNet`` (``x_0 (w_l . x_l)``) and ``LowRankMixtureCrossNet`` (gated experts).

    ``covers_descendants``: the refusal is the reason for the ParameterLists that hold the layers.
    """

    covers_descendants = True

    @classmethod
    def why_not(cls, module: nn.Module) -> str | None:
        return (
            f"a {type(module).__name__} runs all its layers (weights in ParameterLists) in one forward, "
            "so a hook sees only x_0 and x_L; its row-sum identity needs every intermediate x_l, and a "
            "checksum of x_L from x_0 alone costs two GEMMs per layer, as much as re-running it"
        )

    def residual(self, args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("TorchRec's cross networks are never checked (make_check refuses them)")

    def terms(self, args: tuple, kwargs: dict) -> float:
        return math.nan

    def cost(self, args: tuple, kwargs: dict, output: Any) -> Cost:
        return Cost(0.0, 0.0)


def _crossnets() -> tuple[type[nn.Module], ...]:
    from torchrec.modules import crossnet

    names = ("LowRankCrossNet", "CrossNet", "VectorCrossNet", "LowRankMixtureCrossNet")
    return tuple(getattr(crossnet, n) for n in names if hasattr(crossnet, n))


register_check(*_crossnets())(CrossNetRefusal)
