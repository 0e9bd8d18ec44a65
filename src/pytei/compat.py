"""The original PyTEI code's documented defects, emulated on request so that their effect can be measured.

docs/REPRODUCTION.md attributes the gap between pytei's numbers and the paper's to three defects of the
original code, which pytei does not repeat. ``pytei reproduce --compat FLAG,...`` runs the CTR study
again with any combination of them, on the same data and faults, and reports how each moves the
baseline AUC and the failure BER:

* ``original-mask``: bit masks built as ``(p * dropout(ones, 1 - p)).int()``. A bit is kept by dropout
  with probability ``1 - (1 - p)`` (computed in float64) and its value ``p / (1 - (1 - p))`` in float32
  is truncated to an int: where that rounds below 1, no bit flips at all (e.g. BER 7e-3, 2e-9, 1e-10).
* ``accumulate``: faults injected inside the evaluation loop, once per batch, never restored until the
  end, so batch ``b`` sees ``b + 1`` draws piled up (an effective BER growing with the batch index).
* ``original-split``: the test rows re-drawn from the whole data set, training rows included (the data
  option ``split = "original"``; one seeded draw per model, so trials stay paired).

Importing this module registers the error model ``OriginalBitFlip`` (a campaign names it in ``plugins``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import errors
from .errors import BitFlip, ErrorModel, Faults, Words, check_rate
from .exceptions import ArgumentError

__all__ = ["COMPAT_FLAGS", "OriginalBitFlip", "original_keep", "original_mask_value", "parse_flags"]

#: The defects ``--compat`` can emulate, each with what it changes.
COMPAT_FLAGS = {
    "original-split": "test rows re-drawn from the whole data set (training rows included)",
    "original-mask": "bit masks (p * dropout(ones, 1-p)).int(): rounded to no flip at some BERs",
    "accumulate": "faults injected per evaluation batch and never restored within a trial",
}


def parse_flags(text: str | None) -> tuple[str, ...]:
    """``"original-split,accumulate"`` -> the flags, in ``COMPAT_FLAGS`` order; unknown ones refused."""
    given = [f.strip() for f in (text or "").split(",") if f.strip()]
    unknown = [f for f in given if f not in COMPAT_FLAGS]
    if unknown:
        raise ArgumentError(f"unknown --compat flag {unknown[0]!r}; allowed: {', '.join(COMPAT_FLAGS)}")
    return tuple(f for f in COMPAT_FLAGS if f in given)


def original_keep(ber: float) -> float:
    """The probability with which the original's ``dropout(ones, 1 - ber)`` keeps a bit."""
    return 1.0 - (1.0 - ber)


def original_mask_value(ber: float) -> int:
    """The int a kept bit's mask takes in the original code: ``int(float32(ber * (1 / keep)))``, as torch
    computes ``(ber * dropout(ones, 1 - ber)).int()`` (dropout scales kept values by ``1 / keep``)."""
    if ber <= 0.0:
        return 0
    kept = torch.ones(1, dtype=torch.float32).div_(original_keep(ber))
    return int((ber * kept).int().item())


@dataclass(frozen=True)
class OriginalBitFlip(ErrorModel):
    """Bit flips with the original PyTEI code's defects: ``mask`` (its rounded dropout masks) and
    ``accumulate`` (one draw per evaluation batch, piled up). With both off it is ``BitFlip(ber)``."""

    ber: float
    mask: bool = True
    accumulate: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ber", check_rate("OriginalBitFlip ber", self.ber))
        for name in ("mask", "accumulate"):
            if not isinstance(getattr(self, name), bool):
                raise ArgumentError(
                    f"OriginalBitFlip {name} must be true or false, got {getattr(self, name)!r}"
                )

    @property
    def accumulates(self) -> bool:
        """Whether a campaign draws it afresh before every evaluation batch, restoring only at the end."""
        return self.accumulate

    def draw_one(self, w: Words, generator: torch.Generator) -> Faults:
        if not self.mask:
            return BitFlip(self.ber).draw_one(w, generator)
        if original_mask_value(self.ber) == 0:
            return Faults.none()  # the mask rounded to 0: nothing flips at this BER
        return BitFlip(original_keep(self.ber)).draw_one(w, generator)


if "OriginalBitFlip" not in errors.register:
    errors.register("OriginalBitFlip", OriginalBitFlip, swept="ber")
