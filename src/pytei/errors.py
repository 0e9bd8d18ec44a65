"""Error models: what goes wrong in a tensor's bits.

An error model turns a tensor's words into *faults*: sorted unique flat element indices and, for
each, the XOR mask of the bits that change (int64, sign-extended to the word width, never 0).
Expressing every fault as an XOR mask against the current words makes injection, restore,
protection (masking bits out) and replay one mechanism for every model.

Write a new model by subclassing :class:`ErrorModel` and implementing :meth:`ErrorModel.draw_one`;
override :meth:`ErrorModel.draw` instead when faults must be drawn jointly across tensors.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ._registry import Registry
from .bits import BitLayout, bit_values
from .exceptions import ArgumentError
from .sampling import bernoulli_positions, check_rate, generator_for, sample_without_replacement

__all__ = [
    "Faults",
    "Words",
    "ErrorModel",
    "BitFlip",
    "BitRates",
    "StuckAt",
    "RandomValue",
    "FlipCount",
    "Burst",
    "merge_bits",
    "register",
]


@dataclass(frozen=True)
class Faults:
    """Faults of one tensor: sorted unique flat ``index`` (int64) and non-zero XOR ``mask`` (int64)."""

    index: torch.Tensor
    mask: torch.Tensor

    @staticmethod
    def none() -> Faults:
        empty = torch.empty(0, dtype=torch.int64)
        return Faults(empty, empty)

    def __len__(self) -> int:
        return int(self.index.numel())

    def nonzero(self) -> Faults:
        """Drop entries whose mask is 0 (bits that were already at their faulty value)."""
        keep = self.mask != 0
        return self if bool(keep.all()) else Faults(self.index[keep], self.mask[keep])


@dataclass(frozen=True)
class Words:
    """A tensor as an error model sees it: its name, size, bit layout and a reader of its words."""

    name: str
    numel: int
    layout: BitLayout
    read: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    """``read(index)`` returns the current words at flat ``index`` as sign-extended int64 on CPU."""


def merge_bits(elements: torch.Tensor, masks: torch.Tensor) -> Faults:
    """Combine single-bit ``masks`` per element into one XOR mask per distinct element.

    ``elements`` must be sorted and each (element, bit) pair distinct, so summing the
    sign-extended single-bit masks equals OR-ing them.
    """
    if elements.numel() == 0:
        return Faults.none()
    index, inverse = torch.unique_consecutive(elements, return_inverse=True)
    merged = torch.zeros(index.numel(), dtype=torch.int64).index_add_(0, inverse, masks)
    return Faults(index, merged)


def _bit_table(bits: Sequence[int] | None, lay: BitLayout, who: str) -> torch.Tensor:
    """Sign-extended single-bit masks of the chosen positions (all positions when ``bits`` is None)."""
    values = bit_values(lay.width)
    if bits is None:
        return values
    bad = [b for b in bits if not 0 <= b < lay.width]
    if bad:
        check = all(64 <= b < 72 for b in bad)
        hint = "; 64..71 name ECC check bits, which exist under protect=ECC()" if check else ""
        raise ArgumentError(
            f"{who}: bit positions {bad} do not exist in {lay.dtype} (allowed 0..{lay.width - 1}){hint}"
        )
    return values[torch.tensor(list(bits), dtype=torch.int64)]


def _check_bits(bits: Sequence[int] | None, who: str) -> tuple[int, ...] | None:
    if bits is None:
        return None
    out = tuple(bits)
    if not out or any(isinstance(b, bool) or not isinstance(b, int) for b in out):
        raise ArgumentError(f"{who}: bits must be a non-empty list of bit positions (ints), got {bits!r}")
    if len(set(out)) != len(out):
        raise ArgumentError(f"{who}: bits must be distinct, got {bits!r}")
    return tuple(sorted(out))


def _bernoulli_bits(w: Words, rate: float, table: torch.Tensor, g: torch.Generator) -> Faults:
    """Each of the ``len(table)`` chosen bits of every word is hit independently with ``rate``."""
    nb = table.numel()
    pos = bernoulli_positions(w.numel * nb, rate, g)
    return merge_bits(pos // nb, table[pos % nb])


class ErrorModel(ABC):
    """Base class of error models. Subclasses are frozen dataclasses with validated fields."""

    def draw(self, words: Sequence[Words], seed: int) -> list[Faults]:
        """Faults for each tensor, each from its own stream derived from ``seed`` and its name."""
        return [self.draw_one(w, generator_for(seed, w.name)) for w in words]

    @abstractmethod
    def draw_one(self, w: Words, generator: torch.Generator) -> Faults:
        """Faults of one tensor."""

    @property
    def spec(self) -> dict:
        """JSON-serialisable description (class name and fields), for stores and reports."""
        return {"model": type(self).__name__, **{k: v for k, v in vars(self).items()}}


@dataclass(frozen=True)
class BitFlip(ErrorModel):
    """Every targeted bit flips independently with probability ``ber`` (optionally only ``bits``).

    ``bits`` are positions in each stored element (0 = least significant). Under ``protect=ECC()``
    positions 64..71 name the 8 check bits of each 72-bit codeword as well (``pytei.mitigation.ecc``).
    """

    ber: float
    bits: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ber", check_rate("BitFlip ber", self.ber))
        object.__setattr__(self, "bits", _check_bits(self.bits, "BitFlip"))

    def draw_one(self, w: Words, generator: torch.Generator) -> Faults:
        return _bernoulli_bits(w, self.ber, _bit_table(self.bits, w.layout, "BitFlip"), generator)


@dataclass(frozen=True)
class BitRates(ErrorModel):
    """Per-bit-position error rates: bit ``b`` of every word flips independently with ``rates[b]``.

    Under ``protect=ECC()`` positions 64..71 are the codeword's check bits (``pytei.mitigation.ecc``).
    """

    rates: Mapping[int, float]

    def __post_init__(self) -> None:
        if not self.rates:
            raise ArgumentError("BitRates needs at least one {bit: rate} entry")
        checked = {}
        for b, r in dict(self.rates).items():
            _check_bits([b], "BitRates")
            checked[int(b)] = check_rate(f"BitRates rate of bit {b}", r)
        object.__setattr__(self, "rates", dict(sorted(checked.items())))

    def draw_one(self, w: Words, generator: torch.Generator) -> Faults:
        table = _bit_table(list(self.rates), w.layout, "BitRates")
        elements, masks = [], []
        for value, rate in zip(table.tolist(), self.rates.values(), strict=True):
            pos = bernoulli_positions(w.numel, rate, generator)
            elements.append(pos)
            masks.append(torch.full_like(pos, value))
        elem = torch.cat(elements)
        order = torch.sort(elem, stable=True).indices
        return merge_bits(elem[order], torch.cat(masks)[order])


@dataclass(frozen=True)
class StuckAt(ErrorModel):
    """Each targeted bit is forced to ``value`` (0 or 1) with probability ``rate``: a permanent fault.

    A bit that already holds ``value`` is hit but unchanged, so it is not counted as a fault.
    Under ``protect=ECC()`` positions 64..71 of ``bits`` are the codeword's check bits.
    """

    rate: float
    value: int
    bits: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate", check_rate("StuckAt rate", self.rate))
        if self.value not in (0, 1) or isinstance(self.value, bool):
            raise ArgumentError(f"StuckAt value must be 0 or 1, got {self.value!r}")
        object.__setattr__(self, "bits", _check_bits(self.bits, "StuckAt"))

    def draw_one(self, w: Words, generator: torch.Generator) -> Faults:
        hit = _bernoulli_bits(w, self.rate, _bit_table(self.bits, w.layout, "StuckAt"), generator)
        if not len(hit):
            return hit
        current = w.read(hit.index)
        mask = hit.mask & ~current if self.value == 1 else hit.mask & current
        return Faults(hit.index, mask).nonzero()


@dataclass(frozen=True)
class RandomValue(ErrorModel):
    """Each targeted element is replaced, with probability ``rate``, by a uniform random value.

    Floats are drawn uniformly from the reals in [low, high) and rounded to the dtype; a value
    that rounds outside [low, high) is drawn again, so every stored value lies in [low, high)
    (bfloat16 would otherwise round values near ``high`` up to it). ``low`` and ``high`` must be
    finite and within the dtype's finite range. Integer dtypes draw from the integers in
    [low, high] (``low`` and ``high`` truncated to ints).
    """

    rate: float
    low: float = -1.0
    high: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate", check_rate("RandomValue rate", self.rate))
        for name in ("low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ArgumentError(f"RandomValue {name} must be a number, got {value!r}")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ArgumentError(
                f"RandomValue low and high must be finite, got low={self.low!r}, high={self.high!r}"
            )
        if not float(self.low) < float(self.high):
            raise ArgumentError(f"RandomValue needs low < high, got low={self.low!r}, high={self.high!r}")

    def draw_one(self, w: Words, generator: torch.Generator) -> Faults:
        index = bernoulli_positions(w.numel, self.rate, generator)
        if index.numel() == 0:
            return Faults.none()
        lay = w.layout
        if lay.is_float:
            new = _uniform_floats(index.numel(), float(self.low), float(self.high), lay.dtype, generator)
        else:
            lo, hi = int(self.low), int(self.high)
            info = torch.iinfo(lay.dtype)
            if lo < info.min or hi > info.max:
                raise ArgumentError(
                    f"RandomValue range [{lo}, {hi}] does not fit {lay.dtype} ({info.min}..{info.max})"
                )
            new = torch.randint(lo, hi + 1, (index.numel(),), generator=generator, dtype=torch.int64)
            new = new.to(lay.dtype)
        new_words = new.view(lay.view_dtype).to(torch.int64)
        return Faults(index, w.read(index) ^ new_words).nonzero()


def _uniform_floats(n: int, low: float, high: float, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """``n`` values of ``dtype`` in [low, high): uniform reals rounded to ``dtype``, redrawn where the
    rounding leaves the range (at most about half of the draws, so the loop ends fast)."""
    info = torch.finfo(dtype)
    if low < info.min or high > info.max:
        raise ArgumentError(
            f"RandomValue range [{low!r}, {high!r}) exceeds {dtype}'s finite range [{info.min}, {info.max}]"
        )
    first = torch.tensor(low, dtype=torch.float64).to(dtype)  # smallest dtype value >= low
    if float(first) < low:
        first = torch.nextafter(first, torch.tensor(math.inf, dtype=dtype))
    if float(first) >= high:
        raise ArgumentError(f"RandomValue range [{low!r}, {high!r}) holds no {dtype} value")
    out = torch.empty(n, dtype=dtype)
    todo = torch.arange(n)
    while todo.numel():
        u = torch.rand(todo.numel(), dtype=torch.float64, generator=g)
        value = ((1.0 - u) * low + u * high).to(dtype)  # no high - low: it overflows for +-max
        back = value.to(torch.float64)
        ok = (back >= low) & (back < high)
        out[todo[ok]] = value[ok]
        todo = todo[~ok]
    return out


@dataclass(frozen=True)
class FlipCount(ErrorModel):
    """Exactly ``k`` distinct bits flip, uniformly over all targeted bits (of all tensors together).

    Under ``protect=ECC()`` the targeted bits are the data and check bits of the codewords jointly.
    """

    k: int
    bits: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ArgumentError(f"FlipCount k must be a non-negative int, got {self.k!r}")
        object.__setattr__(self, "bits", _check_bits(self.bits, "FlipCount"))

    def draw(self, words: Sequence[Words], seed: int) -> list[Faults]:
        tables = [_bit_table(self.bits, w.layout, "FlipCount") for w in words]
        sizes = torch.tensor(
            [w.numel * t.numel() for w, t in zip(words, tables, strict=True)], dtype=torch.int64
        )
        total = int(sizes.sum())
        if self.k > total:
            raise ArgumentError(f"FlipCount k={self.k} exceeds the {total} targeted bits")
        pos = sample_without_replacement(total, self.k, generator_for(seed, "FlipCount"))
        ends = torch.cumsum(sizes, 0)
        owner = torch.searchsorted(ends, pos, right=True)
        starts = ends - sizes
        out = []
        for i, table in enumerate(tables):
            local = pos[owner == i] - starts[i]
            nb = table.numel()
            out.append(merge_bits(local // nb, table[local % nb]))
        return out

    def draw_one(self, w: Words, generator: torch.Generator) -> Faults:
        return self.draw([w], int(torch.randint(0, 2**62, (1,), generator=generator)))[0]


@dataclass(frozen=True)
class Burst(ErrorModel):
    """Multi-bit upsets: with probability ``rate`` per word, ``length`` adjacent bits flip together.

    The burst's lowest bit is uniform over the positions where it fits in the word. Under
    ``protect=ECC()`` the word is the 72-bit codeword (data and check bits, ``length <= 72``).
    """

    rate: float
    length: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate", check_rate("Burst rate", self.rate))
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise ArgumentError(f"Burst length must be a positive int, got {self.length!r}")

    def draw_one(self, w: Words, generator: torch.Generator) -> Faults:
        width = w.layout.width
        if self.length > width:
            raise ArgumentError(f"Burst length {self.length} exceeds the {width}-bit words of {w.name}")
        index = bernoulli_positions(w.numel, self.rate, generator)
        if index.numel() == 0:
            return Faults.none()
        values = bit_values(width)
        starts = width - self.length + 1
        table = torch.stack([values[s : s + self.length].sum() for s in range(starts)])
        start = torch.randint(0, starts, (index.numel(),), generator=generator, dtype=torch.int64)
        return Faults(index, table[start])


# --- registry ----------------------------------------------------------------------------------


def _check_error_model(name: str, cls: type, meta: dict) -> type:
    """A registered error model is an ErrorModel subclass that declares its swept argument."""
    if not (isinstance(cls, type) and issubclass(cls, ErrorModel)):
        raise TypeError(f"errors.register({name!r}) decorates ErrorModel subclasses, got {cls!r}")
    swept = meta.get("swept")
    if swept not in inspect.signature(cls).parameters:
        raise ValueError(
            f"errors.register({name!r}, swept=...) must name the argument of {cls.__qualname__} that a "
            f"campaign sweeps (its x axis), got {swept!r}"
        )
    return cls


#: Error models a campaign can sweep, by name: ``register("Name", swept="rate")`` on a subclass.
#: ``swept`` is the argument a campaign's ``errors.rates`` fills (the figures' x axis).
register: Registry[type[ErrorModel]] = Registry("error model", _check_error_model)
register("BitFlip", BitFlip, swept="ber")
register("StuckAt", StuckAt, swept="rate")
register("RandomValue", RandomValue, swept="rate")
register("Burst", Burst, swept="rate")
register("FlipCount", FlipCount, swept="k")
