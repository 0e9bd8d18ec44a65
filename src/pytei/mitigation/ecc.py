"""SEC-DED (72,64) Hsiao ECC over 64-bit memory words, emulated with its real parity-check matrix.

A tensor's bytes are grouped into consecutive 64-bit words (float32: 2 elements, float16: 4,
int8: 8), each stored with 8 check bits that are exposed to errors too. For every word with a
fault the decoder computes the syndrome of the 72-bit error vector exactly as hardware does:
zero means nothing is seen, a column of H is "corrected" (possibly wrongly: a miscorrection),
anything else is a detected uncorrectable error (DUE). Only faulty words are decoded: O(faults).

Reference: M. Y. Hsiao, "A class of optimal minimum odd-weight-column SEC-DED codes", IBM J. Res.
Dev. 14(4), 1970.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..bits import BitLayout, bit_values, layout, popcount
from ..errors import ErrorModel, Faults, Words
from ..injector import Protection

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


class ECC(Protection):
    """SEC-DED (72,64) Hsiao ECC on 64-bit words; check bits draw their own faults.

    Check-bit faults come from ``error`` on a virtual int8 tensor ``{name}#ecc`` per tensor (its
    own stream of the same seed), so the data draws are the same as without ECC. A DUE zeroes the
    word (``on_detect="zero"``) or leaves its corrupted data in place (``"flag"``).
    """

    def __init__(self, on_detect: str = "zero") -> None:
        if on_detect not in ON_DETECT:
            raise ValueError(f"ECC on_detect must be one of {', '.join(ON_DETECT)}, got {on_detect!r}")
        self.on_detect = on_detect
        self._stats: dict = {}

    def __repr__(self) -> str:
        return f"ECC(on_detect={self.on_detect!r})"

    def filter(self, faults: list[Faults], words: list[Words], error: ErrorModel, seed: int) -> list[Faults]:
        checks = [check_words(w) for w in words]
        check_faults = error.draw(checks, seed)
        counts = torch.zeros(len(OUTCOMES), dtype=torch.int64)
        bits = 0
        out = []
        for f, cf, w in zip(faults, check_faults, words, strict=True):
            if not len(f) and not len(cf):
                out.append(f)
                continue
            result = decode_tensor(f, cf, w, self.on_detect)
            counts += torch.bincount(result.outcome, minlength=len(OUTCOMES))
            bits += popcount(result.faults.mask, w.layout.width)
            out.append(result.faults)
        self._stats = {
            "words_with_errors": int(counts.sum()),
            **{name: int(c) for name, c in zip(OUTCOMES, counts.tolist(), strict=True)},
            "bits_reaching_memory": bits,
        }
        return out

    def overhead(self, lay: BitLayout) -> float:
        """8 check bits per 64 data bits, whatever the dtype."""
        return CHECK_BITS / DATA_BITS

    @property
    def stats(self) -> dict:
        return dict(self._stats)
