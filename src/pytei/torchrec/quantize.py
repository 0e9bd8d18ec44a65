"""Quantized inference models: TorchRec's own ``quantize_inference_model``, and their bytes for checkpoints.

:func:`quantize` turns every float ``EmbeddingBagCollection`` / ``EmbeddingCollection`` of a model into
TorchRec's quantized one, backed by FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen`` (TBE): int8 /
int4 / int2 rows of codes with an fp16 scale and bias per row, or fp16 rows, each row padded to 16
bytes. The dense part (MLPs, interactions) stays fp32. The quantization itself is torchrec's and
FBGEMM's (``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf``), not pytei's.

Row-wise quantization to ``b`` bits (FBGEMM's algorithm): ``bias = fp16(min(row))``,
``scale = fp16((max(row) - bias) / (2**b - 1))``, ``code = clamp(rint((x - bias) / scale), 0, 2**b - 1)``
and the model reads ``scale * code + bias``. :meth:`QuantType.error_bound` states the largest error
this can make on each row; fp16 rows are ``x`` rounded to the nearest fp16.

fp8 is not offered: torchrec 1.8 maps ``torch.float8_e4m3fn`` to ``SparseType.NFP8``, for which
FBGEMM 1.8's inference TBE has no row layout (``unpadded_row_size_in_bytes`` raises ``KeyError:
'nfp8'``), and FBGEMM's own ``SparseType.FP8`` rows cannot be reached through torchrec's quantization.

For checkpoints, :func:`quantized_state` gives the dense tensors and the raw bytes of every table
(``[rows, row width]`` uint8, scale, bias and padding included: int4 / int2 tables are registered as
torchrec ``UInt4Tensor`` / ``UInt2Tensor`` wrappers, which safetensors cannot store), and
:func:`load_quantized_state` writes them back into a model quantized the same way, bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._registry import Registry
from ..exceptions import ArgumentError
from ._require import require

__all__ = [
    "QUANT_ATTR",
    "UNSUPPORTED",
    "QuantType",
    "load_quantized_state",
    "quant_type",
    "quantization_of",
    "quantize",
    "quantized_state",
    "table_bytes",
    "types",
]

#: Attribute a quantized model carries: the name of its :class:`QuantType` (read by checkpoints).
QUANT_ATTR = "pytei_quantization"

_FP16_UNIT = 2.0**-11  # unit roundoff of fp16 (round to nearest): |x - fp16(x)| <= 2**-11 |x| when normal
_FP16_TINY = 2.0**-25  # half the spacing of fp16 subnormals: the absolute error below the normal range
_FP16_MAX = 65504.0
_F32_SLACK = 2.0**-20  # float32 rounding of FBGEMM's (x - bias) * (1 / scale) and scale * code + bias


@dataclass(frozen=True)
class QuantType:
    """A row format of FBGEMM's inference TBE: its torch dtype (what torchrec's quantization takes),
    the bits per stored value, and whether rows carry an fp16 scale and bias."""

    name: str
    dtype: torch.dtype
    bits: int
    rowwise: bool
    doc: str

    def error_bound(self, rows: torch.Tensor) -> torch.Tensor:
        """Largest ``|read - x|`` FBGEMM's quantization can make on each row of float ``rows`` ``[R, D]``.

        Row-wise ``b`` bits, with the stored (fp16-rounded) ``scale`` and ``bias``: the largest of
        ``scale / 2`` (rounding to the nearest code), ``bias - min`` (a value below the rounded bias
        clamps to code 0) and ``max - bias - (2**b - 1) * scale`` (one above the top code clamps to
        it: a scale rounded down, most in fp16's subnormal range below 6.1e-5), plus float32
        rounding. fp16: ``2**-11 |x|`` (``2**-25`` below fp16's normal range).
        """
        x = rows.detach().to(torch.float64)
        if not self.rowwise:
            return (x.abs() * _FP16_UNIT).amax(dim=1) + _FP16_TINY
        low, high = x.amin(dim=1), x.amax(dim=1)
        top = 2**self.bits - 1
        bias = low.to(torch.float16).to(torch.float64)
        scale = ((high - bias) / top).to(torch.float32).to(torch.float16).to(torch.float64)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        slack = _F32_SLACK * (x.abs().amax(dim=1) + scale * top)
        clamped = torch.maximum(bias - low, high - bias - top * scale)
        return torch.maximum(scale / 2, clamped) + slack


def _check_type(name: str, obj: Any, meta: dict[str, Any]) -> QuantType:
    if not isinstance(obj, QuantType) or obj.name != name:
        raise TypeError(f"types({name!r}) registers a QuantType named {name!r}, got {obj!r}")
    return obj


#: The row formats :func:`quantize` offers, by name (``int8``, ``int4``, ``int2``, ``fp16``).
types: Registry[QuantType] = Registry("quantization dtype", _check_type)
types("int8", QuantType("int8", torch.int8, 8, True, "8-bit codes, fp16 scale and bias per row"))
types("int4", QuantType("int4", torch.quint4x2, 4, True, "4-bit codes (2 a byte), fp16 scale and bias"))
types("int2", QuantType("int2", torch.quint2x4, 2, True, "2-bit codes (4 a byte), fp16 scale and bias"))
types("fp16", QuantType("fp16", torch.float16, 16, False, "fp16 values (round to nearest)"))

#: Formats that exist in FBGEMM but that torchrec 1.8's quantization cannot produce, and why.
UNSUPPORTED: dict[str, str] = {
    "fp8": "torchrec 1.8 maps torch.float8_e4m3fn to SparseType.NFP8, for which fbgemm-gpu 1.8's "
    "IntNBitTableBatchedEmbeddingBagsCodegen has no row layout (KeyError 'nfp8' in "
    "unpadded_row_size_in_bytes), and FBGEMM's own SparseType.FP8 rows are not reachable through "
    "torchrec's quantize_embeddings",
}


def quant_type(name: str) -> QuantType:
    """The :class:`QuantType` called ``name``; an ``ArgumentError`` naming the allowed ones otherwise."""
    allowed = ", ".join(types.names())
    if isinstance(name, str) and name in UNSUPPORTED:
        raise ArgumentError(
            f"quantization dtype {name!r} is not supported: {UNSUPPORTED[name]}; allowed: {allowed}"
        )
    if not isinstance(name, str) or name not in types:
        raise ArgumentError(f"unknown quantization dtype {name!r}; allowed: {allowed}")
    return types.get(name)


def quantization_of(model: nn.Module) -> str | None:
    """The quantization dtype name of a model made by :func:`quantize`; None for any other model."""
    value = getattr(model, QUANT_ATTR, None)
    return value if isinstance(value, str) else None


def _float_collections(model: nn.Module) -> list[str]:
    """Dotted paths of the float TorchRec embedding collections in ``model`` ("" for the model itself)."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    return [
        n for n, m in model.named_modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))
    ]


def _quant_collections(model: nn.Module) -> Iterator[tuple[str, str, Any]]:
    """``(path, table attribute, module)`` of every quantized TorchRec collection in ``model`` (Any: torchrec
    is not typed for mypy here)."""
    from torchrec.quant.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    for path, module in model.named_modules():
        if isinstance(module, EmbeddingBagCollection):
            yield path, "embedding_bags", module
        elif isinstance(module, EmbeddingCollection):
            yield path, "embeddings", module


def _model_name(model: nn.Module) -> str:
    name = getattr(model, "name", "")
    return repr(name) if isinstance(name, str) and name else type(model).__name__


def _check_tables(model: nn.Module, qtype: QuantType) -> None:
    """Refuse float tables that FBGEMM cannot store as ``qtype``: a row of codes must fill whole
    2-byte words (the fp16 scale and bias after it must be aligned), and fp16 must hold the values."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    for path, module in model.named_modules():
        if not isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
            continue
        for name, tensor in module.state_dict().items():
            values = tensor.detach()
            dim = values.shape[1]
            if qtype.rowwise and dim * qtype.bits % 16:
                raise ArgumentError(
                    f"{path}.{name}: embedding_dim {dim} cannot be quantized to {qtype.name}: FBGEMM needs "
                    f"a multiple of {16 // qtype.bits} (codes in whole 2-byte words)"
                )
            if not bool(torch.isfinite(values).all()):
                raise ArgumentError(
                    f"{path}.{name}: the table holds NaN or Inf values; it cannot be quantized"
                )
            top = float(values.abs().max()) if values.numel() else 0.0
            if top > _FP16_MAX:
                raise ArgumentError(
                    f"{path}.{name}: a value of magnitude {top:.4g} exceeds fp16's range ({_FP16_MAX}); "
                    f"{qtype.name} rows store it (or their scale and bias) in fp16"
                )


def quantize(model: nn.Module, dtype: str, *, inplace: bool = False) -> nn.Module:
    """``model`` with every float TorchRec embedding collection quantized to ``dtype`` (in eval mode).

    A copy unless ``inplace`` (the float model stays usable, e.g. to compare their outputs). It keeps
    the model's registry ``name`` and ``config``, and records ``dtype`` in :data:`QUANT_ATTR`. Raises
    ``ArgumentError`` for an unknown dtype, a model without TorchRec collections or one already
    quantized, and ``MissingExtraError`` without the ``pytei[torchrec]`` extra.
    """
    require("quantization")
    qtype = quant_type(dtype)
    done = quantization_of(model)
    if done is not None:
        raise ArgumentError(
            f"model {_model_name(model)} is already quantized ({done}); quantize its float model"
        )
    paths = _float_collections(model)
    if not paths:
        raise ArgumentError(
            f"model {_model_name(model)} has no TorchRec EmbeddingBagCollection or EmbeddingCollection to "
            "quantize; quantization needs a TorchRec model (e.g. dlrm-torchrec, dcnv2)"
        )
    if "" in paths:
        raise ArgumentError(
            f"{type(model).__name__} is itself a TorchRec collection: quantize the model that holds it"
        )
    _check_tables(model, qtype)
    from torchrec.inference.modules import quantize_inference_model

    target = model if inplace else copy.deepcopy(model)
    quantize_inference_model(target, quantization_dtype=qtype.dtype)
    left = _float_collections(target)
    if left:
        kinds = ", ".join(sorted({type(target.get_submodule(p)).__qualname__ for p in left}))
        raise ArgumentError(
            f"torchrec's quantize_inference_model left {', '.join(left)} of {_model_name(model)} float "
            f"({kinds}: it converts EmbeddingBagCollection and EmbeddingCollection by their exact type, "
            "not subclasses)"
        )
    setattr(target, QUANT_ATTR, qtype.name)  # noqa: B010 - nn.Module's __setattr__ types Tensor | Module
    return target.eval()


def table_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Live bytes of every quantized table, by torchrec's state-dict key of its weight.

    Each value is the table's ``row_bytes`` from :func:`pytei.torchrec.tables` (the one reader of
    table storage): a uint8 view ``[rows, row width]`` into its TBE's storage (codes, scale, bias and
    the padding to 16 bytes), so writing into it changes what the model reads.
    """
    from ._storage import tables

    quantized = {path for path, _, _ in _quant_collections(model)}
    return {t.name: t.row_bytes for t in tables(model) if t.module in quantized}


def _dense_keys(model: nn.Module) -> Callable[[str], bool]:
    """Whether a state-dict key of ``model`` is outside its quantized collections (a dense tensor)."""
    prefixes = tuple(f"{path}." for path, _, _ in _quant_collections(model))
    return lambda key: not key.startswith(prefixes)


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of a quantized model: its dense tensors and every table's bytes.

    Plain contiguous CPU tensors that share no storage (what ``safetensors`` saves). The TBEs' other
    buffers (offsets, row counts, the bounds-check warning counter) follow from the config and are
    rebuilt by :func:`quantize`, not stored.
    """
    dense = _dense_keys(model)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if dense(k)}
    state.update({k: v.detach().cpu().clone() for k, v in table_bytes(model).items()})
    return state


def load_quantized_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Write ``state`` (from :func:`quantized_state`) into ``model``, quantized the same way.

    Every key must be there with its shape and dtype; a ``ValueError`` names the first that is not.
    """
    tables = table_bytes(model)
    dense = _dense_keys(model)
    expected = {k: v for k, v in model.state_dict().items() if dense(k)} | tables
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"the stored state does not fit the quantized model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )
    for key, live in expected.items():
        stored = state[key]
        if stored.shape != live.shape or stored.dtype != live.dtype:
            raise ValueError(
                f"{key}: stored {stored.dtype} {tuple(stored.shape)}, the quantized model has "
                f"{live.dtype} {tuple(live.shape)}"
            )
    with torch.no_grad():
        for key, live in tables.items():
            live.copy_(state[key])
    result = model.load_state_dict({k: state[k] for k in expected if k not in tables}, strict=False)
    left = [k for k in result.missing_keys if dense(k)]
    if left or result.unexpected_keys:
        raise ValueError(f"dense tensors not loaded: {left[:5]}, unexpected {result.unexpected_keys[:5]}")
