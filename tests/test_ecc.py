"""SEC-DED (72,64) Hsiao ECC: the code's properties, exhaustive 1/2/3-bit decoding, and the
protection against a scalar reference decoder on every word size."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import pytest
import torch
from torch import nn

import pytei
from conftest import assert_bit_identical, snapshot
from pytei import BitFlip, Burst, FlipCount, RandomValue, StuckAt
from pytei.bits import bit_values, int_view, layout
from pytei.errors import ErrorModel, Faults, Words
from pytei.mitigation.ecc import (
    CORRECTED,
    DETECTED,
    ECC,
    MISCORRECTED,
    OUTCOMES,
    UNDETECTED,
    check_words,
    decode,
    decode_tensor,
    encode,
    hsiao_columns,
    pack_words,
    parity_check_matrix,
    syndrome,
    unpack_words,
)

COLUMNS = hsiao_columns()
N_BITS = 72


def error_vectors(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, m) distinct bit positions 0..71 -> int64 data masks and 8-bit check masks."""
    data_bits = bit_values(64)
    data = torch.where(positions < 64, data_bits[positions.clamp(max=63)], 0).sum(1)
    check = torch.where(positions >= 64, 1 << (positions - 64).clamp(min=0), 0).sum(1)
    return data, check


def popcounts(x: torch.Tensor, width: int) -> torch.Tensor:
    """Set bits of each int64 value's low ``width`` bits."""
    return sum(((x >> b) & 1 for b in range(width)), torch.zeros_like(x))


def all_patterns(k: int) -> torch.Tensor:
    return torch.tensor(list(combinations(range(N_BITS), k)), dtype=torch.int64)


def words_of(name: str, t: torch.Tensor) -> Words:
    flat = int_view(t).reshape(-1)
    return Words(name, t.numel(), layout(t.dtype), lambda idx: flat[idx].to(torch.int64))


@dataclass(frozen=True, eq=False)
class Planted(ErrorModel):
    """Fixed faults by tensor name (check-bit tensors ``{name}#ecc`` included)."""

    faults: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)

    def draw_one(self, w: Words, generator: torch.Generator) -> Faults:
        if w.name not in self.faults:
            return Faults.none()
        index, mask = self.faults[w.name]
        return Faults(torch.tensor(index, dtype=torch.int64), torch.tensor(mask, dtype=torch.int64))


def reference(data: Faults, check: Faults, w: Words, on_detect: str) -> tuple[dict, dict]:
    """Scalar decoder with Python ints: ({element: sign-extended mask}, {word: outcome code})."""
    width = w.layout.width
    k = 64 // width
    low = (1 << width) - 1
    err: dict[int, int] = {}
    for e, m in zip(data.index.tolist(), data.mask.tolist(), strict=True):
        err[e // k] = err.get(e // k, 0) | (m & low) << (e % k * width)
    cerr = dict(zip(check.index.tolist(), [m & 0xFF for m in check.mask.tolist()], strict=True))
    elements: dict[int, int] = {}
    outcomes: dict[int, int] = {}
    for word in sorted(set(err) | set(cerr)):
        vector = err.get(word, 0) | cerr.get(word, 0) << 64
        s = 0
        for b in range(N_BITS):
            if vector >> b & 1:
                s ^= COLUMNS[b]
        if s == 0:
            outcomes[word], left = UNDETECTED, vector
        elif s in COLUMNS:
            left = vector ^ 1 << COLUMNS.index(s)
            outcomes[word] = CORRECTED if left == 0 else MISCORRECTED
        else:
            outcomes[word], left = DETECTED, vector
            if on_detect == "zero":
                idx = [e for e in range(word * k, word * k + k) if e < w.numel]
                clean = w.read(torch.tensor(idx, dtype=torch.int64)).tolist()
                left = sum((v & low) << (i * width) for i, v in enumerate(clean))
        for slot in range(k):
            v = left >> (slot * width) & low
            v = v - (1 << width) if v >> (width - 1) else v
            if v and word * k + slot < w.numel:
                elements[word * k + slot] = v
    return elements, outcomes


# --- the code ------------------------------------------------------------------------------------


def test_parity_check_matrix_is_hsiao():
    h = parity_check_matrix()
    assert h.shape == (8, 72)
    cols = [int((h[:, j] << torch.arange(8)).sum()) for j in range(72)]
    assert cols == COLUMNS
    assert len(set(cols)) == 72 and 0 not in cols
    assert all(c.bit_count() % 2 == 1 for c in cols)
    assert sorted(c.bit_count() for c in cols[:64]) == [3] * 56 + [5] * 8
    assert torch.equal(h[:, 64:], torch.eye(8, dtype=torch.int64))
    assert h[:, :64].sum(1).tolist() == [26] * 8  # perfectly balanced rows


def test_codewords_have_zero_syndrome():
    g = torch.Generator().manual_seed(0)
    data = torch.randint(-(2**63), 2**63 - 1, (1000,), generator=g, dtype=torch.int64)
    check = encode(data)
    assert bool(((check >= 0) & (check < 256)).all())
    assert not bool(syndrome(data, check).any())
    assert encode(torch.tensor([0], dtype=torch.int64)).item() == 0


def test_every_single_bit_error_is_corrected():
    data, check = error_vectors(all_patterns(1))
    left, outcome = decode(data, check)
    assert outcome.tolist() == [CORRECTED] * 72
    assert not bool(left.any())


def test_every_double_bit_error_is_detected():
    patterns = all_patterns(2)
    assert len(patterns) == 72 * 71 // 2
    data, check = error_vectors(patterns)
    left, outcome = decode(data, check)
    assert bool((outcome == DETECTED).all())
    assert torch.equal(left, data)  # a DUE leaves the data error as it is


def test_triple_bit_errors():
    """All C(72, 3) = 59,640 triple errors: none undetected (odd weight -> non-zero syndrome);
    26,072 detected (43.72 %) and 33,568 miscorrected (56.28 %): the syndrome, of weight 1, 3, 5
    or 7, equals one of the 72 columns in 33,568 cases and the decoder flips a fourth bit."""
    patterns = all_patterns(3)
    assert len(patterns) == 59_640
    data, check = error_vectors(patterns)
    left, outcome = decode(data, check)
    counts = torch.bincount(outcome, minlength=4).tolist()
    assert dict(zip(OUTCOMES, counts, strict=True)) == {
        "corrected": 0,
        "detected": 26_072,
        "miscorrected": 33_568,
        "undetected": 0,
    }
    column_set = set(COLUMNS)
    expected = sum((COLUMNS[a] ^ COLUMNS[b] ^ COLUMNS[c]) in column_set for a, b, c in patterns.tolist())
    assert expected == 33_568  # independent count from the columns
    mis = outcome == MISCORRECTED
    assert bool(left[mis].ne(0).all())  # a miscorrection always corrupts data


# --- packing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [8, 16, 32, 64])
def test_pack_unpack_round_trip(width):
    k = 64 // width
    index = torch.tensor([0, 1, k - 1, k, 3 * k + 1, 5 * k - 1], dtype=torch.int64).unique()
    top = bit_values(width)[-1].item()  # sign bit, sign-extended
    mask = torch.full_like(index, top) + torch.arange(1, index.numel() + 1, dtype=torch.int64)
    words, wmask = pack_words(index, mask, width)
    assert words.tolist() == sorted({int(i) // k for i in index})
    back = unpack_words(words, wmask, width, numel=5 * k)
    assert torch.equal(back.index, index) and torch.equal(back.mask, mask)


def test_float32_element_layout_is_little_endian():
    words, masks = pack_words(torch.tensor([1, 2]), torch.tensor([-(2**31), 1]), 32)
    assert words.tolist() == [0, 1] and masks.tolist() == [-(2**63), 1]


# --- the protection ------------------------------------------------------------------------------


def test_on_detect_is_validated():
    with pytest.raises(ValueError, match=r"on_detect must be one of zero, flag, got 'drop'"):
        ECC(on_detect="drop")
    assert ECC().overhead(layout(torch.float16)) == 0.125
    assert repr(ECC("flag")) == "ECC(on_detect='flag')"


def test_single_flips_are_corrected_end_to_end():
    torch.manual_seed(0)
    model = nn.Linear(256, 256)
    snap = snapshot(model)
    with pytei.inject(model, BitFlip(1e-5), seed=0) as raw:
        pass
    with pytei.inject(model, BitFlip(1e-5), seed=0, protect=ECC()) as report:
        assert_bit_identical(model, snap)  # every fault corrected: no data bit changed
    assert raw.n_faults == 28
    assert report.n_faults == 0
    assert report.protection == {
        "words_with_errors": 30,  # 28 data words + 2 check bytes, each with one flipped bit
        "corrected": 30,
        "detected": 0,
        "miscorrected": 0,
        "undetected": 0,
        "bits_reaching_memory": 0,
        "data_bits_hit": 28,
        "check_bits_hit": 2,
    }
    assert_bit_identical(model, snap)
    with pytei.inject(model, FlipCount(1), seed=3, protect=ECC()) as report:
        assert_bit_identical(model, snap)
    assert report.protection["corrected"] == report.protection["words_with_errors"] >= 1


@pytest.mark.parametrize("on_detect", ["zero", "flag"])
def test_due_words_are_zeroed_or_flagged(on_detect):
    model = nn.Linear(4, 2, bias=False)  # 8 float32 values: 4 memory words
    with torch.no_grad():
        model.weight.copy_(torch.arange(1.0, 9.0).view(2, 4))
    snap = snapshot(model)
    planted = Planted(
        {
            "weight": ([0, 5], [0b11, 1 << 3]),  # word 0: double data error; word 2: one data bit
            "weight#ecc": ([2, 3], [1, -128]),  # word 2: + one check bit (DUE); word 3: check bit 7
        }
    )
    with pytei.inject(model, planted, seed=0, protect=ECC(on_detect)) as report:
        values = model.weight.detach().flatten()
        bits = int_view(values)
        if on_detect == "zero":
            assert values.tolist() == [0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 7.0, 8.0]
        else:
            clean = int_view(torch.arange(1.0, 9.0))
            assert (bits ^ clean).tolist() == [0b11, 0, 0, 0, 0, 1 << 3, 0, 0]
    assert report.protection["detected"] == 2 and report.protection["corrected"] == 1
    assert report.protection["words_with_errors"] == 3
    assert_bit_identical(model, snap)


def test_burst_of_two_in_one_word_is_always_detected():
    t = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    w = words_of("w", t)
    error = Burst(0.05, length=2)
    data = error.draw([w], 7)[0]
    check = error.draw([check_words(w)], 7)[0]
    result = decode_tensor(data, check, w)
    data_words, data_masks = pack_words(data.index, data.mask, 32)
    bits = torch.zeros(result.words.numel(), dtype=torch.int64)
    bits[torch.searchsorted(result.words, data_words)] += popcounts(data_masks, 64)
    bits[torch.searchsorted(result.words, check.index)] += popcounts(check.mask, 8)
    one_burst = bits == 2
    assert int(one_burst.sum()) > 100
    assert bool((result.outcome[one_burst] == DETECTED).all())


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.float64]
)
@pytest.mark.parametrize("on_detect", ["zero", "flag"])
def test_matches_scalar_reference_on_every_word_size(dtype, on_detect):
    g = torch.Generator().manual_seed(1)
    n = 1001  # not a multiple of the elements per word: the last word is padded
    if dtype.is_floating_point:
        t = torch.randn(n, generator=g).to(dtype)
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(info.min, info.max + 1, (n,), generator=g, dtype=torch.int64).to(dtype)
    w = words_of("t", t)
    error = BitFlip(0.01)  # ~0.7 flips per 72-bit word: every outcome occurs
    ecc = ECC(on_detect)
    data = error.draw([w], 3)[0]
    out = ecc.filter([data], [w], error, 3)[0]
    check = error.draw([check_words(w)], 3)[0]
    elements, outcomes = reference(data, check, w, on_detect)
    assert out.index.tolist() == sorted(elements)
    assert out.mask.tolist() == [elements[e] for e in sorted(elements)]
    assert bool((out.mask != 0).all())
    counts = [list(outcomes.values()).count(code) for code in range(len(OUTCOMES))]
    stats = ecc.stats
    assert [stats[name] for name in OUTCOMES] == counts
    assert stats["words_with_errors"] == len(outcomes)
    assert counts[DETECTED] > 0 and counts[MISCORRECTED] > 0 and counts[CORRECTED] > 0
    assert stats["bits_reaching_memory"] == int(popcounts(out.mask, w.layout.width).sum())
    if on_detect == "zero":  # a zeroed word holds 0 in every element after injection
        zeroed = [word for word, o in outcomes.items() if o == DETECTED]
        k = 64 // w.layout.width
        for word in zeroed:
            for e in range(word * k, min(word * k + k, n)):
                after = w.read(torch.tensor([e])).item() ^ elements.get(e, 0)
                assert after == 0


def test_check_bits_read_clean_bytes_for_value_dependent_models():
    t = torch.randn(37, generator=torch.Generator().manual_seed(2)).half()  # 10 words, last padded
    w = words_of("t", t)
    cw = check_words(w)
    assert (cw.name, cw.numel, cw.layout.width) == ("t#ecc", 10, 8)
    check = cw.read(torch.arange(10))
    assert bool(((check >= -128) & (check < 128)).all())
    padded = torch.cat([int_view(t).to(torch.int64), torch.zeros(3, dtype=torch.int64)]).view(10, 4)
    words = ((padded & 0xFFFF) << torch.tensor([0, 16, 32, 48])).sum(1)
    assert torch.equal(check & 0xFF, encode(words))
    stuck = StuckAt(1.0, value=1).draw([cw], 0)[0]  # every check bit forced to 1
    after = check.clone()
    after[stuck.index] ^= stuck.mask
    assert bool(((after & 0xFF) == 0xFF).all())
    assert len(stuck) == int(((check & 0xFF) != 0xFF).sum())
    new = RandomValue(1.0, -100, 100).draw([cw], 0)[0]
    replaced = check[new.index] ^ new.mask
    assert bool(((replaced >= -100) & (replaced <= 100)).all())


def test_protected_faults_are_a_subset_of_the_raw_draws():
    """Same seed: every bit ECC lets through was drawn without ECC, except in words it zeroes
    (DUE) or miscorrects (which flips one extra bit)."""
    torch.manual_seed(0)
    model = nn.Linear(32, 32)
    snap = snapshot(model)
    error = BitFlip(0.01)
    with pytei.inject(model, error, seed=5) as raw:
        pass
    with pytei.inject(model, error, seed=5, protect=ECC()) as prot:
        pass
    assert_bit_identical(model, snap)
    for name, tensor in model.named_parameters():
        w = words_of(name, tensor.detach())
        drawn = raw.fault_map.faults[name]
        check = error.draw([check_words(w)], 5)[0]
        _, outcomes = reference(drawn, check, w, "zero")
        got = prot.fault_map.faults.get(name, Faults.none())
        raw_mask = dict(zip(drawn.index.tolist(), drawn.mask.tolist(), strict=True))
        for e, m in zip(got.index.tolist(), got.mask.tolist(), strict=True):
            if outcomes[e // 2] in (DETECTED, MISCORRECTED):
                continue
            assert m & ~raw_mask[e] == 0, (name, e)
        assert prot.protection["words_with_errors"] > prot.protection["corrected"] > 0
