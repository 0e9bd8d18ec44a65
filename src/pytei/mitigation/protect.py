"""Selective bit protection (paper Sec. 4.2, 7): chosen bit positions of stored values are immune.

The paper protects the sign and exponent bits, which decide a float's magnitude: with them safe,
no stored value can change by a factor of 2 or more. Protection is applied to the drawn faults
before they land, so the same draws (same seed) are compared with and without it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..bits import BitLayout, bit_values, popcount
from ..errors import ErrorModel, Faults, Words
from ..exceptions import ArgumentError
from ..injector import Protection

__all__ = ["ProtectBits"]


def default_bits(lay: BitLayout) -> tuple[int, ...]:
    """Sign + exponent for floats (float32: 31..23); the top bit for integers (sign, or MSB of uint8)."""
    return (*lay.sign, *lay.exponent) if lay.is_float else (lay.width - 1,)


class ProtectBits(Protection):
    """Mask the protected bit positions out of every fault; ``bits=None`` uses :func:`default_bits`.

    Positions are bits of each stored element (0..width-1); there are no check bits, so error
    models naming ECC check positions 64..71 are refused under ProtectBits as without protection.
    """

    def __init__(self, bits: Sequence[int] | None = None) -> None:
        if bits is not None:
            bits = tuple(bits)
            if not bits or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in bits):
                raise ArgumentError(f"ProtectBits bits must be non-negative ints, got {bits!r}")
            if len(set(bits)) != len(bits):
                raise ArgumentError(f"ProtectBits bits must be distinct, got {bits!r}")
        self.bits = bits
        self._stats: dict = {}

    def __repr__(self) -> str:
        return f"ProtectBits({'sign+exponent' if self.bits is None else list(self.bits)})"

    def protected(self, lay: BitLayout, name: str = "") -> tuple[int, ...]:
        """The protected positions for a tensor of layout ``lay``."""
        bits = default_bits(lay) if self.bits is None else self.bits
        bad = [b for b in bits if b >= lay.width]
        if bad:
            raise ArgumentError(
                f"ProtectBits: bits {bad} do not exist in {name} ({lay.dtype}, {lay.width} bits)"
            )
        return bits

    def mask(self, lay: BitLayout, name: str = "") -> int:
        """Sign-extended int64 mask of the protected positions."""
        values = bit_values(lay.width).tolist()
        return sum(values[b] for b in self.protected(lay, name))

    def filter(self, faults: list[Faults], words: list[Words], error: ErrorModel, seed: int) -> list[Faults]:
        blocked = passed = 0
        out = []
        for f, w in zip(faults, words, strict=True):
            keep = f.mask & ~self.mask(w.layout, w.name)
            width = w.layout.width
            n_before = popcount(f.mask, width) if len(f) else 0
            n_after = popcount(keep, width) if len(f) else 0
            blocked += n_before - n_after
            passed += n_after
            out.append(Faults(f.index, keep).nonzero() if len(f) else f)
        self._stats = {"blocked_bits": blocked, "passed_bits": passed}
        return out

    def overhead(self, lay: BitLayout) -> float:
        """Protected bits per stored bit (float32 sign + exponent: 9/32)."""
        return len(self.protected(lay)) / lay.width

    @property
    def stats(self) -> dict:
        return dict(self._stats)
