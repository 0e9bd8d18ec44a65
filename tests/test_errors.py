"""Semantics of every error model, checked against its distribution."""

import math

import pytest
import torch
from scipy import stats

from pytei.bits import bit_histogram, bit_values, int_view, layout
from pytei.errors import BitFlip, BitRates, Burst, FlipCount, RandomValue, StuckAt, Words

ALL_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
]


def words_of(t: torch.Tensor, name: str = "t") -> Words:
    flat = int_view(t).view(-1)
    return Words(name, t.numel(), layout(t.dtype), lambda idx: flat[idx].to(torch.int64))


def virtual_words(numel: int, dtype=torch.float32, name: str = "v") -> Words:
    """A tensor too large to allocate; fine for error models that do not read values."""
    return Words(name, numel, layout(dtype), lambda idx: torch.zeros_like(idx))


def sd_ok(count, n, p, k=5.0):
    return abs(count - n * p) <= k * math.sqrt(n * p * (1 - p)) + 1e-9


@pytest.mark.parametrize("ber", [1e-10, 2e-9, 1e-6, 7e-3])
def test_bitflip_count_on_a_trillion_bits(ber):
    w = virtual_words(1 << 35)  # 3.4e10 float32 values = 1.1e12 bits
    f = BitFlip(ber).draw_one(w, torch.Generator().manual_seed(0)) if ber < 1e-5 else None
    if f is None:  # keep the high-rate case small enough to run in milliseconds
        w = virtual_words(1 << 20)
        f = BitFlip(ber).draw_one(w, torch.Generator().manual_seed(0))
    n_bits = w.numel * 32
    flips = int(bit_histogram(f.mask, 32).sum())
    assert sd_ok(flips, n_bits, ber), (flips, n_bits * ber)
    assert bool((f.index[1:] > f.index[:-1]).all()) and bool((f.mask != 0).all())


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_bitflip_positions_uniform_over_bits_for_every_dtype(dtype):
    w = virtual_words(200_000, dtype)
    f = BitFlip(2e-3).draw_one(w, torch.Generator().manual_seed(1))
    width = w.layout.width
    hist = bit_histogram(f.mask, width).double()
    assert sd_ok(int(hist.sum()), w.numel * width, 2e-3)
    chi2 = float(((hist - hist.mean()) ** 2 / hist.mean()).sum())
    assert chi2 < stats.chi2.ppf(1 - 1e-6, width - 1)


def test_half_and_all_bits():
    w = virtual_words(100_000)
    half = BitFlip(0.5).draw_one(w, torch.Generator().manual_seed(2))
    assert sd_ok(int(bit_histogram(half.mask, 32).sum()), w.numel * 32, 0.5)
    every = BitFlip(1.0).draw_one(w, torch.Generator().manual_seed(2))
    assert every.index.numel() == w.numel and bool((every.mask == -1).all())  # all 32 bits of every word


def test_bitflip_restricted_bits():
    w = virtual_words(100_000)
    f = BitFlip(0.01, bits=[30, 31]).draw_one(w, torch.Generator().manual_seed(3))
    hist = bit_histogram(f.mask, 32)
    assert int(hist[:30].sum()) == 0
    assert sd_ok(int(hist.sum()), w.numel * 2, 0.01)
    with pytest.raises(ValueError, match=r"bit positions \[40\] do not exist in torch.float32"):
        BitFlip(0.1, bits=[40]).draw_one(w, torch.Generator())


@pytest.mark.parametrize("bad", [-1e-9, 1.0000001, float("nan"), float("inf")])
def test_bad_ber_names_the_value(bad):
    with pytest.raises(ValueError, match=r"BitFlip ber must be in \[0, 1\], got"):
        BitFlip(bad)


def test_bitrates_per_position():
    w = virtual_words(400_000)
    rates = {31: 1e-3, 30: 1e-2, 0: 0.2}
    f = BitRates(rates).draw_one(w, torch.Generator().manual_seed(4))
    hist = bit_histogram(f.mask, 32)
    for b, r in rates.items():
        assert sd_ok(int(hist[b]), w.numel, r)
    assert int(hist.sum()) == sum(int(hist[b]) for b in rates)
    assert bool((f.index[1:] > f.index[:-1]).all())


def test_stuck_at_forces_bits():
    t = torch.zeros(200_000, dtype=torch.int32)
    ones = StuckAt(1e-2, 1).draw_one(words_of(t), torch.Generator().manual_seed(5))
    assert sd_ok(int(bit_histogram(ones.mask, 32).sum()), t.numel() * 32, 1e-2)
    assert StuckAt(0.5, 0).draw_one(words_of(t), torch.Generator()).index.numel() == 0  # already 0
    t2 = torch.full((1000,), -1, dtype=torch.int32)  # all ones
    zeros = StuckAt(1.0, 0, bits=[3]).draw_one(words_of(t2), torch.Generator())
    assert zeros.index.numel() == 1000 and bool((zeros.mask == 8).all())
    with pytest.raises(ValueError, match="0 or 1"):
        StuckAt(0.1, 2)


def test_random_value_replaces_elements():
    t = torch.full((100_000,), 100.0)
    f = RandomValue(0.01, -2.0, 3.0).draw_one(words_of(t), torch.Generator().manual_seed(6))
    assert sd_ok(f.index.numel(), t.numel(), 0.01)
    flat = int_view(t).view(-1)
    new = (flat[f.index].to(torch.int64) ^ f.mask).to(torch.int32).view(torch.float32)
    assert bool(((new >= -2.0) & (new < 3.0)).all())
    ti = torch.zeros(10_000, dtype=torch.int8)
    fi = RandomValue(1.0, -3, 3).draw_one(words_of(ti), torch.Generator().manual_seed(0))
    vals = (fi.mask).to(torch.int8)  # old words are 0, so the mask is the new value
    assert set(vals.tolist()) == {-3, -2, -1, 1, 2, 3}  # 0 is "no change" and not a fault
    with pytest.raises(ValueError, match="does not fit torch.int8"):
        RandomValue(0.5, -1000, 1000).draw_one(words_of(ti), torch.Generator())
    with pytest.raises(ValueError, match="low < high"):
        RandomValue(0.1, 1.0, 1.0)


def test_flip_count_exact_across_tensors():
    ws = [virtual_words(10, name="a"), virtual_words(1_000_000, name="b"), virtual_words(3, torch.int8, "c")]
    for k in (0, 1, 17, 5000):
        faults = FlipCount(k).draw(ws, seed=k)
        total = sum(int(bit_histogram(f.mask, w.layout.width).sum()) for f, w in zip(faults, ws, strict=True))
        assert total == k
        for f, w in zip(faults, ws, strict=True):
            assert f.index.numel() == 0 or int(f.index.max()) < w.numel
    every = FlipCount(10 * 32 + 3 * 8).draw([ws[0], ws[2]], seed=0)
    assert all(
        bool((f.mask == -1).all()) and f.index.numel() == w.numel
        for f, w in zip(every, [ws[0], ws[2]], strict=True)
    )
    with pytest.raises(ValueError, match="exceeds the 344 targeted bits"):
        FlipCount(345).draw([ws[0], ws[2]], seed=0)


def test_burst_flips_adjacent_bits():
    w = virtual_words(100_000)
    f = Burst(1e-2, length=3).draw_one(w, torch.Generator().manual_seed(7))
    assert sd_ok(f.index.numel(), w.numel, 1e-2)
    valid = {int(bit_values(32)[s : s + 3].sum()) for s in range(30)}
    assert set(f.mask.tolist()) <= valid and len(set(f.mask.tolist())) == 30
    with pytest.raises(ValueError, match="exceeds the 8-bit words"):
        Burst(0.1, length=9).draw_one(virtual_words(10, torch.int8), torch.Generator())


def test_custom_error_model_by_subclassing():
    from dataclasses import dataclass

    from pytei.errors import ErrorModel, Faults

    @dataclass(frozen=True)
    class SignOnly(ErrorModel):
        """Flip the sign bit of the first element only."""

        def draw_one(self, w, generator):
            return Faults(torch.tensor([0]), bit_values(w.layout.width)[-1:].clone())

    assert SignOnly().draw([virtual_words(5)], seed=0)[0].index.tolist() == [0]
    assert SignOnly().spec == {"model": "SignOnly"}
