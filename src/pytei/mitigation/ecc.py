"""SEC-DED (72,64) Hsiao ECC over 64-bit memory words, emulated with its real parity-check matrix.

A tensor's bytes are grouped into consecutive 64-bit words (float32: 2 elements, float16: 4,
int8: 8), each stored with 8 check bits that are exposed to errors too. For every word with a
fault the decoder computes the syndrome of the 72-bit error vector exactly as hardware does:
zero means nothing is seen, a column of H is "corrected" (possibly wrongly: a miscorrection),
anything else is a detected uncorrectable error (DUE). Only faulty words are decoded: O(faults).

Codeword positions: 0..63 are the data bits of the 64-bit word (element ``e % k`` of the word holds
bits ``[(e % k) * width, (e % k + 1) * width)``), 64..71 its check bits 0..7. How each error model
extends to the check bits is registered per model class (:data:`codeword_models`, :func:`extend`):

* ``BitFlip``, ``BitRates``, ``StuckAt``: each check bit is one more targeted bit, with the same
  rate. A bit set (``bits``, ``rates``) names element bits ``0..width-1`` (bit ``b`` of every element,
  as without ECC, so the data draws are identical: for 64-bit dtypes these are exactly codeword
  positions 0..63) and check bits ``64..71``; other positions are refused. A set without 64..71
  leaves the check bits alone.
* ``FlipCount(k)``: exactly ``k`` distinct bits over data and check bits of all tensors jointly.
* ``RandomValue``: elements as without ECC; each check byte is replaced with probability ``rate``
  by a uniform random 8-bit pattern (a check byte holds no number).
* ``Burst(rate, length)``: each 72-bit codeword is hit with probability ``rate`` by ``length <= 72``
  adjacent bits of positions 0..71, the lowest uniform over where the burst fits (bits falling in
  the padding past a tensor's last element are not stored and are lost).
* ``FaultMap``: entries ``{name}#ecc`` (int8, one byte per word) are check-bit faults; ``ECC.fault_map``
  records a trial's data and check faults so that replaying it under ECC gives the same outcome.
* Any other model acts on the check bytes as on a virtual int8 tensor ``{name}#ecc``.

Check-bit draws use streams of their own (``{name}#ecc``), independent of the data draws.

Reference: M. Y. Hsiao, "A class of optimal minimum odd-weight-column SEC-DED codes", IBM J. Res.
Dev. 14(4), 1970.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..bits import BitLayout, bit_values, layout, popcount
from ..errors import (
    BitFlip,
    BitRates,
    Burst,
    ErrorModel,
    Faults,
    FlipCount,
    RandomValue,
    StuckAt,
    Words,
    merge_bits,
)
from ..exceptions import ArgumentError
from ..faultmap import FaultMap
from ..injector import Protection
from ..sampling import bernoulli_positions, generator_for, sample_without_replacement

__all__ = [
    "ECC",
    "DATA_BITS",
    "CHECK_BITS",
    "OUTCOMES",
    "ON_DETECT",
    "hsiao_columns",
    "parity_check_matrix",
    "encode",
    "syndrome",
    "decode",
    "pack_words",
    "unpack_words",
    "read_data_words",
    "n_words",
    "check_words",
    "TensorDecode",
    "decode_tensor",
    "CHECK_SUFFIX",
    "CodewordModel",
    "codeword_models",
    "codeword_model",
    "extend",
]

DATA_BITS = 64
CHECK_BITS = 8
#: Per-word decoder outcomes, indexed by the codes :func:`decode` returns.
OUTCOMES = ("corrected", "detected", "miscorrected", "undetected")
CORRECTED, DETECTED, MISCORRECTED, UNDETECTED = range(len(OUTCOMES))
#: What a DUE does to the data: read as 0 (``zero``), or keep the corrupted data (``flag``).
ON_DETECT = ("zero", "flag")
_BYTE = 0xFF


def hsiao_columns() -> list[int]:
    """The 72 columns of H as 8-bit ints (bit r = row r): data bits 0..63, then check bits 64..71.

    Data columns are all 56 weight-3 vectors (ascending) and the 8 rotations of 0b00011111, so
    every row holds 21 + 5 = 26 data ones (perfectly balanced); check columns are unit vectors.
    """
    weight3 = [v for v in range(256) if v.bit_count() == 3]
    weight5 = [((0x1F << r) | (0x1F >> (CHECK_BITS - r))) & _BYTE for r in range(CHECK_BITS)]
    return weight3 + weight5 + [1 << r for r in range(CHECK_BITS)]


def parity_check_matrix() -> torch.Tensor:
    """H as an 8 x 72 int64 matrix of 0/1."""
    cols = torch.tensor(hsiao_columns(), dtype=torch.int64)
    return (cols.unsqueeze(0) >> torch.arange(CHECK_BITS, dtype=torch.int64).unsqueeze(1)) & 1


def _syndrome_tables(columns: list[int]) -> torch.Tensor:
    """(8, 256) int64: entry [b, v] is the XOR of the data columns of the set bits of byte b = v."""
    rows = []
    for b in range(DATA_BITS // 8):
        row = [0] * 256
        for v in range(1, 256):
            low = (v & -v).bit_length() - 1  # lowest set bit: reuse the entry without it
            row[v] = row[v & (v - 1)] ^ columns[8 * b + low]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)


def _position_table(columns: list[int]) -> torch.Tensor:
    """(256,) int64: the bit position whose column equals a syndrome, -1 where none does."""
    pos = torch.full((256,), -1, dtype=torch.int64)
    pos[torch.tensor(columns, dtype=torch.int64)] = torch.arange(len(columns), dtype=torch.int64)
    return pos


_COLUMNS = hsiao_columns()
_TABLES = _syndrome_tables(_COLUMNS)
_POSITION = _position_table(_COLUMNS)
_DATA_BIT = bit_values(DATA_BITS)


def _data_syndrome(data: torch.Tensor) -> torch.Tensor:
    """XOR of the H columns of the set bits of int64 64-bit ``data`` words, via per-byte tables."""
    out = _TABLES[0][data & _BYTE]
    for b in range(1, DATA_BITS // 8):
        out ^= _TABLES[b][(data >> (8 * b)) & _BYTE]
    return out


def encode(data: torch.Tensor) -> torch.Tensor:
    """The 8 check bits (0..255, int64) of each int64 data word: they make the syndrome zero."""
    return _data_syndrome(data)


def syndrome(data: torch.Tensor, check: torch.Tensor) -> torch.Tensor:
    """H * e over GF(2) for error vectors given as int64 data masks and 8-bit check masks."""
    return _data_syndrome(data) ^ (check & _BYTE)


def decode(data_err: torch.Tensor, check_err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode words holding the error vectors (``data_err``, ``check_err``).

    Returns the data error left after the decoder's single-bit correction (int64 per word) and
    the outcome code per word (index into :data:`OUTCOMES`); DUE words keep their data error.
    Words whose error vector is zero come out ``undetected`` with nothing left: pass faulty words.
    """
    s = syndrome(data_err, check_err)
    pos = _POSITION[s]
    flip = (pos >= 0) & (pos < DATA_BITS)
    data_fix = torch.where(flip, _DATA_BIT[pos.clamp(0, DATA_BITS - 1)], 0)
    check_fix = torch.where(pos >= DATA_BITS, 1 << (pos - DATA_BITS).clamp(min=0), 0)
    seen = pos >= 0
    data_left = data_err ^ data_fix
    check_left = (check_err & _BYTE) ^ check_fix
    outcome = torch.full_like(s, DETECTED)
    outcome[s == 0] = UNDETECTED
    clean = (data_left == 0) & (check_left == 0)
    outcome[seen & clean] = CORRECTED
    outcome[seen & ~clean] = MISCORRECTED
    return data_left, outcome


def _field(width: int) -> int:
    """Mask of the low ``width`` bits as an int64 value (-1 for 64)."""
    return -1 if width == 64 else (1 << width) - 1


def pack_words(index: torch.Tensor, mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted element faults of ``width``-bit elements -> (sorted unique word index, 64-bit word mask).

    Element e sits at bits [(e % k) * width, (e % k + 1) * width) of word e // k, k = 64 / width.
    """
    per_word = DATA_BITS // width
    if index.numel() == 0:
        return index, mask
    shift = (index % per_word) * width
    fields = (mask & _field(width)) << shift
    words, inverse = torch.unique_consecutive(index // per_word, return_inverse=True)
    # Disjoint bit fields: their (wrapping) sum is their OR.
    return words, torch.zeros(words.numel(), dtype=torch.int64).index_add_(0, inverse, fields)


def unpack_words(words: torch.Tensor, masks: torch.Tensor, width: int, numel: int) -> Faults:
    """Inverse of :func:`pack_words`: non-zero sign-extended element masks, sorted by element."""
    per_word = DATA_BITS // width
    slots = torch.arange(per_word, dtype=torch.int64)
    elements = (words.unsqueeze(1) * per_word + slots).reshape(-1)
    fields = ((masks.unsqueeze(1) >> (slots * width)) & _field(width)).reshape(-1)
    if width < DATA_BITS:
        sign = 1 << (width - 1)
        fields = (fields ^ sign) - sign
    keep = (fields != 0) & (elements < numel)
    return Faults(elements[keep], fields[keep])


def read_data_words(w: Words, words: torch.Tensor) -> torch.Tensor:
    """Clean 64-bit data words at word indices ``words`` of ``w`` (the last one zero-padded)."""
    width = w.layout.width
    per_word = DATA_BITS // width
    slots = torch.arange(per_word, dtype=torch.int64)
    elements = words.unsqueeze(1) * per_word + slots
    valid = elements < w.numel
    values = torch.zeros(elements.shape, dtype=torch.int64)
    if bool(valid.any()):
        values[valid] = w.read(elements[valid]).to(torch.int64)
    return ((values & _field(width)) << (slots * width)).sum(dim=1)  # disjoint fields: sum = OR


def n_words(w: Words) -> int:
    """Number of 64-bit words tensor ``w`` occupies."""
    per_word = DATA_BITS // w.layout.width
    return -(-w.numel // per_word)


_CHECK_LAYOUT = layout(torch.int8)


def check_words(w: Words) -> Words:
    """The check bits of ``w`` as a virtual int8 tensor ``{name}#ecc``: one byte per data word.

    Its ``read`` encodes the clean data, so value-dependent error models act on real check bits.
    """

    def read(index: torch.Tensor) -> torch.Tensor:
        check = encode(read_data_words(w, index.to(torch.int64).cpu()))
        return (check ^ 0x80) - 0x80  # sign-extend the byte like every int8 word

    return Words(f"{w.name}#ecc", n_words(w), _CHECK_LAYOUT, read)


@dataclass(frozen=True)
class TensorDecode:
    """One tensor through the decoder: the faults that reach storage, and per faulty word its
    index and outcome code (see :data:`OUTCOMES`)."""

    faults: Faults
    words: torch.Tensor
    outcome: torch.Tensor


def decode_tensor(data: Faults, check: Faults, w: Words, on_detect: str = "zero") -> TensorDecode:
    """Decode every word of ``w`` with a data fault in ``data`` or a check fault in ``check``."""
    width = w.layout.width
    data_words, data_masks = pack_words(data.index, data.mask, width)
    words = torch.unique(torch.cat([data_words, check.index]))
    data_err = torch.zeros(words.numel(), dtype=torch.int64)
    check_err = torch.zeros(words.numel(), dtype=torch.int64)
    data_err[torch.searchsorted(words, data_words)] = data_masks
    check_err[torch.searchsorted(words, check.index)] = check.mask & _BYTE
    left, outcome = decode(data_err, check_err)
    due = outcome == DETECTED
    if on_detect == "zero" and bool(due.any()):
        left[due] = read_data_words(w, words[due])  # XOR with the clean word reads as 0
    return TensorDecode(unpack_words(words, left, width, w.numel), words, outcome)


# --- how each error model extends to the check bits -----------------------------------------------

#: Name suffix of the virtual check-byte tensor of a tensor (and of its entries in a fault map).
CHECK_SUFFIX = "#ecc"
_CHECK_POSITIONS = range(DATA_BITS, DATA_BITS + CHECK_BITS)
_CODEWORD_BITS = DATA_BITS + CHECK_BITS


class CodewordModel:
    """How an error model acts on 72-bit codewords. The default: data faults as drawn without ECC,
    check faults from the same model on the virtual int8 check tensors (streams ``{name}#ecc``)."""

    def data(self, error: ErrorModel, words: Sequence[Words], seed: int) -> list[Faults]:
        """The data faults (what the injector draws under ECC)."""
        return error.draw(words, seed)

    def codeword(
        self,
        error: ErrorModel,
        data: list[Faults],
        words: Sequence[Words],
        checks: Sequence[Words],
        seed: int,
    ) -> tuple[list[Faults], list[Faults]]:
        """(data faults, check faults) of every tensor, given the data faults :meth:`data` drew."""
        return data, error.draw(checks, seed)


#: Codeword behaviour by error-model class; a subclass uses its nearest registered base.
codeword_models: dict[type[ErrorModel], CodewordModel] = {}


def extend(cls: type[ErrorModel]) -> Callable[[type[CodewordModel]], type[CodewordModel]]:
    """Class decorator registering a :class:`CodewordModel` for error models of class ``cls``."""

    def deco(model: type[CodewordModel]) -> type[CodewordModel]:
        codeword_models[cls] = model()
        return model

    return deco


def codeword_model(error: ErrorModel) -> CodewordModel:
    """The registered codeword behaviour of ``error`` (by its class's MRO), else the default."""
    for cls in type(error).__mro__:
        if cls in codeword_models:
            return codeword_models[cls]
    return _DEFAULT


_DEFAULT = CodewordModel()


def _split_bits(
    bits: Sequence[int], words: Sequence[Words], who: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Codeword positions -> (element bit positions, check bit positions 0..7); refuses the rest."""
    data = tuple(b for b in bits if b not in _CHECK_POSITIONS)
    check = tuple(b - DATA_BITS for b in bits if b in _CHECK_POSITIONS)
    for w in words:
        bad = [b for b in data if not 0 <= b < w.layout.width]
        if bad:
            raise ArgumentError(
                f"{who}: bit positions {bad} do not exist in {w.layout.dtype} under ECC (allowed 0.."
                f"{w.layout.width - 1} for the bits of each element, 64..71 for the check bits)"
            )
    return data, check


def _draw(model: ErrorModel | None, words: Sequence[Words], seed: int) -> list[Faults]:
    """``model``'s faults in ``words``; none at all where a split left no model for them."""
    return model.draw(words, seed) if model is not None else [Faults.none() for _ in words]


class _BitSets(CodewordModel):
    """Models with a bit set: the set's element positions act on data, 64..71 on the check bits."""

    def split(self, error: ErrorModel, words: Sequence[Words]) -> tuple[ErrorModel | None, ErrorModel | None]:
        """(model for the data bits, model for the check bits); None where the set names none."""
        bits = getattr(error, "bits")  # noqa: B009 - every registered subclass has ``bits``
        if bits is None:
            return error, error
        data, check = _split_bits(bits, words, type(error).__name__)
        return (
            dataclasses.replace(error, bits=data) if data else None,  # type: ignore[type-var]
            dataclasses.replace(error, bits=check) if check else None,  # type: ignore[type-var]
        )

    def data(self, error: ErrorModel, words: Sequence[Words], seed: int) -> list[Faults]:
        model = self.split(error, words)[0]
        return _draw(model, words, seed)

    def codeword(
        self,
        error: ErrorModel,
        data: list[Faults],
        words: Sequence[Words],
        checks: Sequence[Words],
        seed: int,
    ) -> tuple[list[Faults], list[Faults]]:
        model = self.split(error, words)[1]
        return data, _draw(model, checks, seed)


extend(BitFlip)(_BitSets)
extend(StuckAt)(_BitSets)


@extend(BitRates)
class _Rates(_BitSets):
    """``BitRates``: rates of element positions act on data, those of 64..71 on the check bits."""

    def split(self, error: ErrorModel, words: Sequence[Words]) -> tuple[ErrorModel | None, ErrorModel | None]:
        assert isinstance(error, BitRates)
        rates = dict(error.rates)
        data, check = _split_bits(list(rates), words, "BitRates")
        return (
            BitRates({b: rates[b] for b in data}) if data else None,
            BitRates({b: rates[b + DATA_BITS] for b in check}) if check else None,
        )


@extend(RandomValue)
class _RandomBytes(CodewordModel):
    """``RandomValue``: each check byte is replaced with probability ``rate`` by a random 8-bit pattern."""

    def codeword(
        self,
        error: ErrorModel,
        data: list[Faults],
        words: Sequence[Words],
        checks: Sequence[Words],
        seed: int,
    ) -> tuple[list[Faults], list[Faults]]:
        assert isinstance(error, RandomValue)
        out = []
        for c in checks:
            g = generator_for(seed, c.name)
            index = bernoulli_positions(c.numel, error.rate, g)
            new = torch.randint(0, 256, (index.numel(),), generator=g, dtype=torch.int64)
            mask = ((c.read(index) ^ new) & _BYTE ^ 0x80) - 0x80  # sign-extended like every int8 word
            out.append(Faults(index, mask).nonzero())
        return data, out


@extend(FlipCount)
class _JointCount(CodewordModel):
    """``FlipCount(k)``: ``k`` distinct bits over the data and check bits of all tensors jointly.

    The data draw is ``FlipCount(min(k, data bits))`` (the draw without ECC when ``k`` fits); then,
    from the stream ``FlipCount#ecc``, ``k`` positions over data + check bits decide how many land in
    check bits (``m``, hypergeometric) and where; a uniform ``k - m``-subset of the drawn data flips is
    kept. A uniform subset of a uniform subset is uniform, so the ``k`` bits are uniform over the union.
    """

    def positions(self, error: FlipCount, words: Sequence[Words]) -> tuple[FlipCount | None, tuple[int, ...]]:
        """(model of the data draw, check positions 0..7), before ``k`` is capped."""
        if error.bits is None:
            return error, tuple(range(CHECK_BITS))
        data, check = _split_bits(error.bits, words, "FlipCount")
        return (dataclasses.replace(error, bits=data) if data else None), check

    def sizes(self, error: FlipCount, words: Sequence[Words]) -> tuple[FlipCount | None, int, list[int]]:
        """(data model with ``k`` capped, targeted data bits, targeted check bits per tensor)."""
        model, check = self.positions(error, words)
        n_data = 0
        if model is not None:
            per = len(model.bits) if model.bits is not None else None
            n_data = sum(w.numel * (per if per is not None else w.layout.width) for w in words)
        n_check = [n_words(w) * len(check) for w in words]
        total = n_data + sum(n_check)
        if error.k > total:
            raise ArgumentError(
                f"FlipCount k={error.k} exceeds the {total} targeted bits under ECC "
                f"({n_data} data + {sum(n_check)} check bits)"
            )
        capped = dataclasses.replace(model, k=min(error.k, n_data)) if model is not None else None
        return capped, n_data, n_check

    def data(self, error: ErrorModel, words: Sequence[Words], seed: int) -> list[Faults]:
        assert isinstance(error, FlipCount)
        model = self.sizes(error, words)[0]
        return _draw(model, words, seed)

    def codeword(
        self,
        error: ErrorModel,
        data: list[Faults],
        words: Sequence[Words],
        checks: Sequence[Words],
        seed: int,
    ) -> tuple[list[Faults], list[Faults]]:
        assert isinstance(error, FlipCount)
        _, check_positions = self.positions(error, words)
        _, n_data, n_check = self.sizes(error, words)
        flips = [_single_bits(f, w.layout.width) for f, w in zip(data, words, strict=True)]
        n_drawn = sum(int(e.numel()) for e, _ in flips)
        if n_drawn != min(error.k, n_data):
            raise ValueError(
                f"ECC: FlipCount({error.k}) data faults hold {n_drawn} flips, expected "
                f"{min(error.k, n_data)} (draw them with ECC.draw)"
            )
        g = generator_for(seed, "FlipCount", CHECK_SUFFIX)
        pos = sample_without_replacement(n_data + sum(n_check), error.k, g)
        in_check = pos[pos >= n_data] - n_data
        keep = torch.randperm(n_drawn, generator=g)[: error.k - in_check.numel()]
        owner = torch.repeat_interleave(
            torch.arange(len(flips)), torch.tensor([int(e.numel()) for e, _ in flips], dtype=torch.int64)
        )
        elements = torch.cat([e for e, _ in flips]) if flips else torch.empty(0, dtype=torch.int64)
        masks = torch.cat([m for _, m in flips]) if flips else torch.empty(0, dtype=torch.int64)
        keep = keep.sort().values  # flips are sorted by tensor, then element
        elements, masks, owner = elements[keep], masks[keep], owner[keep]
        kept_data = [merge_bits(elements[owner == i], masks[owner == i]) for i in range(len(flips))]
        table = (
            _CHECK_LAYOUT_BITS[torch.tensor(check_positions, dtype=torch.int64)] if check_positions else None
        )
        ends = torch.cumsum(torch.tensor(n_check, dtype=torch.int64), 0)
        owner_c = torch.searchsorted(ends, in_check, right=True)
        kept_check = []
        for i, n in enumerate(n_check):
            local = in_check[owner_c == i] - (ends[i] - n)
            if table is None or not local.numel():
                kept_check.append(Faults.none())
                continue
            nb = table.numel()
            kept_check.append(merge_bits(local // nb, table[local % nb]))
        return kept_data, kept_check


_CHECK_LAYOUT_BITS = bit_values(CHECK_BITS)


def _single_bits(f: Faults, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The faults as single-bit (element, sign-extended mask) pairs, sorted by element then bit."""
    if not len(f):
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty
    values = bit_values(width)
    hit = ((f.mask.unsqueeze(1) >> torch.arange(width, dtype=torch.int64)) & 1).bool()
    row, bit = hit.nonzero(as_tuple=True)
    return f.index[row], values[bit]


@extend(Burst)
class _CodewordBurst(CodewordModel):
    """``Burst(rate, length)``: per 72-bit codeword, with probability ``rate``, ``length`` adjacent
    bits of positions 0..71 flip, the lowest uniform over the ``73 - length`` places it fits."""

    def bursts(self, error: Burst, w: Words, seed: int) -> tuple[Faults, Faults]:
        """(data faults, check faults) of tensor ``w``, from the stream ``{name}#ecc-burst``."""
        if error.length > _CODEWORD_BITS:
            raise ArgumentError(
                f"Burst length {error.length} exceeds the {_CODEWORD_BITS}-bit codeword of ECC ({w.name})"
            )
        g = generator_for(seed, w.name, "#ecc-burst")
        hit = bernoulli_positions(n_words(w), error.rate, g)
        if not hit.numel():
            return Faults.none(), Faults.none()
        starts = _CODEWORD_BITS - error.length + 1
        start = torch.randint(0, starts, (hit.numel(),), generator=g, dtype=torch.int64)
        spans = [((1 << error.length) - 1) << s for s in range(starts)]  # Python ints: 72 bits
        data_table = torch.tensor([((v & ((1 << 64) - 1)) ^ (1 << 63)) - (1 << 63) for v in spans])
        check_table = torch.tensor([(((v >> 64) & _BYTE) ^ 0x80) - 0x80 for v in spans])
        data_mask, check_mask = data_table[start], check_table[start]
        d = data_mask != 0
        c = check_mask != 0
        return unpack_words(hit[d], data_mask[d], w.layout.width, w.numel), Faults(hit[c], check_mask[c])

    def data(self, error: ErrorModel, words: Sequence[Words], seed: int) -> list[Faults]:
        assert isinstance(error, Burst)
        return [self.bursts(error, w, seed)[0] for w in words]

    def codeword(
        self,
        error: ErrorModel,
        data: list[Faults],
        words: Sequence[Words],
        checks: Sequence[Words],
        seed: int,
    ) -> tuple[list[Faults], list[Faults]]:
        assert isinstance(error, Burst)
        pairs = [self.bursts(error, w, seed) for w in words]
        return [d for d, _ in pairs], [c for _, c in pairs]


@extend(FaultMap)
class _Replay(CodewordModel):
    """``FaultMap``: entries ``{name}#ecc`` are check-bit faults, the others data faults; a map
    without check entries (what reached storage) replays as data errors only."""

    @staticmethod
    def part(fault_map: FaultMap, check: bool) -> FaultMap:
        names = [n for n in fault_map.numels if n.endswith(CHECK_SUFFIX) == check]
        names += [n for n in fault_map.faults if n.endswith(CHECK_SUFFIX) == check and n not in names]
        return FaultMap(
            {n: fault_map.faults[n] for n in names if n in fault_map.faults},
            {n: fault_map.dtypes[n] for n in names if n in fault_map.dtypes},
            {n: fault_map.numels[n] for n in names if n in fault_map.numels},
            fault_map.meta,
        )

    def data(self, error: ErrorModel, words: Sequence[Words], seed: int) -> list[Faults]:
        assert isinstance(error, FaultMap)
        return self.part(error, check=False).draw(words, seed)

    def codeword(
        self,
        error: ErrorModel,
        data: list[Faults],
        words: Sequence[Words],
        checks: Sequence[Words],
        seed: int,
    ) -> tuple[list[Faults], list[Faults]]:
        assert isinstance(error, FaultMap)
        return data, self.part(error, check=True).draw(checks, seed)


class ECC(Protection):
    """SEC-DED (72,64) Hsiao ECC on 64-bit words; check bits draw their own faults.

    Each error model acts on the 72-bit codeword as its :class:`CodewordModel` says (see the module
    docstring: bit sets name element bits and check bits 64..71, ``FlipCount`` spans data and check
    bits, ``Burst`` the codeword); check bits use streams of their own, so data draws are those
    without ECC wherever the model allows. A DUE zeroes the word (``on_detect="zero"``) or leaves
    its corrupted data in place (``"flag"``). ``fault_map`` records the last trial's data and check
    faults before decoding: replayed under ECC, it gives the same faults and outcomes.

    An FBGEMM table (``pytei.torchrec``) is protected as stored: its rows are one site over their bytes,
    so a 64-bit word holds a row's scale, bias, codes and padding together (``raw_rows``), and ``fields=``
    is refused with ECC.
    """

    raw_rows = True

    def __init__(self, on_detect: str = "zero") -> None:
        if on_detect not in ON_DETECT:
            raise ArgumentError(f"ECC on_detect must be one of {', '.join(ON_DETECT)}, got {on_detect!r}")
        self.on_detect = on_detect
        self._stats: dict = {}
        self._record = FaultMap({}, {}, {}, {})

    def __repr__(self) -> str:
        return f"ECC(on_detect={self.on_detect!r})"

    def draw(self, error: ErrorModel, words: list[Words], seed: int) -> list[Faults]:
        """The data faults of ``error`` under ECC (bit sets without check positions, capped counts)."""
        return codeword_model(error).data(error, words, seed)

    def filter(self, faults: list[Faults], words: list[Words], error: ErrorModel, seed: int) -> list[Faults]:
        checks = [check_words(w) for w in words]
        data, check_faults = codeword_model(error).codeword(error, faults, words, checks, seed)
        counts = torch.zeros(len(OUTCOMES), dtype=torch.int64)
        bits = data_hit = check_hit = 0
        out = []
        for f, cf, w in zip(data, check_faults, words, strict=True):
            if not len(f) and not len(cf):
                out.append(f)
                continue
            data_hit += popcount(f.mask, w.layout.width) if len(f) else 0
            check_hit += popcount(cf.mask, CHECK_BITS) if len(cf) else 0
            result = decode_tensor(f, cf, w, self.on_detect)
            counts += torch.bincount(result.outcome, minlength=len(OUTCOMES))
            bits += popcount(result.faults.mask, w.layout.width)
            out.append(result.faults)
        self._stats = {
            "words_with_errors": int(counts.sum()),
            **{name: int(c) for name, c in zip(OUTCOMES, counts.tolist(), strict=True)},
            "bits_reaching_memory": bits,
            "data_bits_hit": data_hit,
            "check_bits_hit": check_hit,
        }
        self._record = _record(data, check_faults, words, checks, error, seed, self.on_detect)
        return out

    def overhead(self, lay: BitLayout) -> float:
        """8 check bits per 64 data bits, whatever the dtype."""
        return CHECK_BITS / DATA_BITS

    @property
    def stats(self) -> dict:
        return dict(self._stats)

    @property
    def fault_map(self) -> FaultMap:
        """The last trial's faults before decoding: data entries by tensor name, check-bit entries
        ``{name}#ecc`` (int8, one byte per word). Replay it with ``protect=ECC(...)``."""
        return self._record


def _record(
    data: list[Faults],
    check: list[Faults],
    words: Sequence[Words],
    checks: Sequence[Words],
    error: ErrorModel,
    seed: int,
    on_detect: str,
) -> FaultMap:
    """A :class:`FaultMap` of data and check faults (dtypes and sizes of every tensor)."""
    faults: dict[str, Faults] = {}
    dtypes: dict[str, torch.dtype] = {}
    numels: dict[str, int] = {}
    for f, cf, w, c in zip(data, check, words, checks, strict=True):
        for name, entry, lay, numel in ((w.name, f, w.layout, w.numel), (c.name, cf, c.layout, c.numel)):
            dtypes[name], numels[name] = lay.dtype, numel
            if len(entry):
                faults[name] = entry
    meta = {"seed": seed, "error": error.spec, "protection": f"ECC(on_detect={on_detect!r})"}
    return FaultMap(faults, dtypes, numels, meta)
