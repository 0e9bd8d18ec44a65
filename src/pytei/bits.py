"""Bit layouts of the dtypes models are stored in, and pure functions over bit masks.

Bit 0 is the least significant bit. Every tensor is manipulated through a *signed* integer view
of the same width (uint8 through int8), so that one set of masks serves all dtypes. Masks are
carried as int64 holding the sign-extended value of the view's width: for a 32-bit word, bit 31
is ``-2**31``. Because distinct bits never carry into each other, the sum of distinct single-bit
masks equals their bitwise OR, and every mask casts to the view dtype exactly.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

__all__ = [
    "BitLayout",
    "code_layout",
    "fp8_layout",
    "layout",
    "supported_dtypes",
    "bit_values",
    "field_masks",
    "bit_histogram",
    "popcount",
    "WIDTHS",
    "int_view",
]


@dataclass(frozen=True)
class BitLayout:
    """Width and field positions of one dtype (bit 0 = least significant)."""

    dtype: torch.dtype
    width: int
    view_dtype: torch.dtype
    is_float: bool
    sign: tuple[int, ...]
    exponent: tuple[int, ...]
    mantissa: tuple[int, ...]
    #: A format stored in ``dtype`` words that is not ``dtype`` itself (``"int4"``: two packed codes per
    #: byte; ``"fp8"``); empty for the dtype's own layout.
    format: str = ""
    #: Named fields of such a format, overriding the dtype's (e.g. ``code_bit0`` ... of packed codes).
    named_fields: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def fields(self) -> dict[str, tuple[int, ...]]:
        """Named bit fields: sign/exponent/mantissa for floats, sign/value for integers, the format's own
        fields for a packed format."""
        if self.named_fields:
            return dict(self.named_fields)
        if self.is_float:
            return {"sign": self.sign, "exponent": self.exponent, "mantissa": self.mantissa}
        if self.sign:
            return {"sign": self.sign, "value": tuple(range(self.width - 1))}
        return {"value": tuple(range(self.width))}


def _float(dtype: torch.dtype, view: torch.dtype, width: int, exp_bits: int) -> BitLayout:
    man = width - 1 - exp_bits
    return BitLayout(
        dtype=dtype,
        width=width,
        view_dtype=view,
        is_float=True,
        sign=(width - 1,),
        exponent=tuple(range(man, width - 1)),
        mantissa=tuple(range(man)),
    )


def _int(dtype: torch.dtype, view: torch.dtype, width: int, signed: bool) -> BitLayout:
    return BitLayout(
        dtype=dtype,
        width=width,
        view_dtype=view,
        is_float=False,
        sign=(width - 1,) if signed else (),
        exponent=(),
        mantissa=(),
    )


_LAYOUTS: dict[torch.dtype, BitLayout] = {
    torch.float64: _float(torch.float64, torch.int64, 64, 11),
    torch.float32: _float(torch.float32, torch.int32, 32, 8),
    torch.float16: _float(torch.float16, torch.int16, 16, 5),
    torch.bfloat16: _float(torch.bfloat16, torch.int16, 16, 8),
    torch.int64: _int(torch.int64, torch.int64, 64, True),
    torch.int32: _int(torch.int32, torch.int32, 32, True),
    torch.int16: _int(torch.int16, torch.int16, 16, True),
    torch.int8: _int(torch.int8, torch.int8, 8, True),
    torch.uint8: _int(torch.uint8, torch.int8, 8, False),
}


def code_layout(bits: int) -> BitLayout:
    """Unsigned ``bits``-bit codes packed ``8 // bits`` to a byte, the first code in the lowest bits
    (FBGEMM's int8/int4/int2 rows): byte bit ``b`` is bit ``b % bits`` of code ``b // bits``. Field
    ``code_bit{k}`` holds bit ``k`` (weight ``2**k``) of every code in the byte."""
    if bits not in (2, 4, 8):
        raise ValueError(f"packed codes have 2, 4 or 8 bits, got {bits!r}")
    named = tuple((f"code_bit{k}", tuple(range(k, 8, bits))) for k in range(bits))
    return BitLayout(torch.uint8, 8, torch.int8, False, (), (), (), f"int{bits}", named)


def fp8_layout(exponent_bits: int = 4) -> BitLayout:
    """FBGEMM's FP8 row format in a byte: sign bit 7, ``exponent_bits`` exponent bits, the rest mantissa
    (``SparseType.FP8``: 4 exponent bits, bias 7 by default)."""
    if not 1 <= exponent_bits <= 6:
        raise ValueError(f"fp8 exponent_bits must be in 1..6, got {exponent_bits!r}")
    base = _float(torch.uint8, torch.int8, 8, exponent_bits)
    return BitLayout(
        torch.uint8, 8, torch.int8, True, base.sign, base.exponent, base.mantissa, f"fp8_e{exponent_bits}"
    )


def supported_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes pytei can inject errors into."""
    return tuple(_LAYOUTS)


def layout(dtype: torch.dtype) -> BitLayout:
    """The bit layout of ``dtype``; a clear ``TypeError`` for anything unsupported."""
    try:
        return _LAYOUTS[dtype]
    except KeyError:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in _LAYOUTS)
        raise TypeError(f"unsupported dtype {dtype} for bit-level errors; allowed: {allowed}") from None


def int_view(t: torch.Tensor) -> torch.Tensor:
    """A same-width signed integer view of ``t``'s storage (writes go to ``t``)."""
    return t.view(layout(t.dtype).view_dtype)


def bit_values(width: int) -> torch.Tensor:
    """int64 tensor whose entry b is the sign-extended mask of bit b in a ``width``-bit word."""
    vals = [1 << b for b in range(width - 1)] + [-(1 << (width - 1))]
    return torch.tensor(vals, dtype=torch.int64)


def field_masks(lay: BitLayout) -> dict[str, int]:
    """Sign-extended int64 mask of each named field of ``lay``."""
    vals = bit_values(lay.width).tolist()
    return {name: sum(vals[b] for b in bits) for name, bits in lay.fields.items()}


#: Widths (bits) of the words masks describe: those of ``supported_dtypes()``'s integer views.
WIDTHS = (8, 16, 32, 64)

#: ``_BYTE_BITS[v, j]`` is bit ``j`` of the byte value ``v``: the lookup table behind ``bit_histogram``.
_BYTE_BITS = (torch.arange(256, dtype=torch.int64).unsqueeze(1) >> torch.arange(8, dtype=torch.int64)) & 1
#: ``_BYTE_POPCOUNT[v]`` is the number of set bits of the byte value ``v``: the table behind ``popcount``.
_BYTE_POPCOUNT = _BYTE_BITS.sum(dim=1)


def _byte_counts(masks: torch.Tensor, width: int) -> torch.Tensor:
    """``[width // 8, 256]``: how many masks hold each byte value at each byte position (0 = lowest).

    Reads the masks' int64 storage as bytes (no copy for contiguous int64 masks), one ``bincount``
    per byte position, in the machine's byte order. Bits above ``width`` are ignored.
    """
    if width not in WIDTHS:
        raise ValueError(f"width must be one of {WIDTHS} (bits of a word), got {width!r}")
    as_bytes = masks.to(torch.int64).reshape(-1).contiguous().view(torch.uint8).view(-1, 8)
    positions = range(width // 8) if sys.byteorder == "little" else range(7, 7 - width // 8, -1)
    return torch.stack([torch.bincount(as_bytes[:, j], minlength=256) for j in positions])


def bit_histogram(masks: torch.Tensor, width: int) -> torch.Tensor:
    """Count of set bits at each position 0..width-1 over int64 ``masks``: an int64 CPU tensor.

    Vectorised: a histogram of byte values per byte position times a byte value -> bits table.
    """
    counts = _byte_counts(masks, width)
    return (counts.unsqueeze(2) * _BYTE_BITS.to(counts.device)).sum(dim=1).reshape(width).cpu()


def popcount(masks: torch.Tensor, width: int) -> int:
    """Total number of set bits in int64 ``masks`` of ``width``-bit words (bits above ``width`` ignored)."""
    counts = _byte_counts(masks, width)
    return int((counts * _BYTE_POPCOUNT.to(counts.device)).sum())
