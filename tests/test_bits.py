"""Bit layouts and mask arithmetic for every supported dtype."""

import pytest
import torch

from pytei.bits import bit_histogram, bit_values, field_masks, int_view, layout, popcount, supported_dtypes

EXPECTED = {
    torch.float32: (32, 1, 8, 23),
    torch.float64: (64, 1, 11, 52),
    torch.float16: (16, 1, 5, 10),
    torch.bfloat16: (16, 1, 8, 7),
    torch.int8: (8, 1, 0, 0),
    torch.uint8: (8, 0, 0, 0),
    torch.int16: (16, 1, 0, 0),
    torch.int32: (32, 1, 0, 0),
    torch.int64: (64, 1, 0, 0),
}


def test_every_dtype_has_a_layout():
    assert set(supported_dtypes()) == set(EXPECTED)
    for dtype, (width, sign, exp, man) in EXPECTED.items():
        lay = layout(dtype)
        assert lay.width == width == torch.empty(0, dtype=dtype).element_size() * 8
        assert len(lay.sign) == sign and len(lay.exponent) == exp and len(lay.mantissa) == man
        covered = sorted(b for bits in lay.fields.values() for b in bits)
        assert covered == list(range(width)), f"{dtype} fields must partition the word"


def test_float32_fields_match_ieee754():
    lay = layout(torch.float32)
    assert lay.sign == (31,) and lay.exponent == tuple(range(23, 31)) and lay.mantissa == tuple(range(23))


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(TypeError, match=r"unsupported dtype torch.complex64.*allowed: float64"):
        layout(torch.complex64)


@pytest.mark.parametrize("width", [8, 16, 32, 64])
def test_bit_values_are_sign_extended_single_bits(width):
    vals = bit_values(width)
    assert vals.dtype == torch.int64 and vals.numel() == width
    view = {8: torch.int8, 16: torch.int16, 32: torch.int32, 64: torch.int64}[width]
    as_view = vals.to(view)  # exact: every mask fits the signed width
    assert torch.equal(as_view.to(torch.int64), vals)
    assert popcount(vals, width) == width
    assert int(vals.sum()) == -1  # all bits set, sign-extended


def test_field_masks_float32():
    masks = field_masks(layout(torch.float32))
    assert masks["mantissa"] == (1 << 23) - 1
    assert masks["exponent"] == 0xFF << 23
    assert masks["sign"] == -(1 << 31)


def test_bit_histogram_counts_positions():
    masks = torch.tensor([0b101, 0b100, -(1 << 31)], dtype=torch.int64)
    hist = bit_histogram(masks, 32)
    assert hist[0] == 1 and hist[2] == 2 and hist[31] == 1 and int(hist.sum()) == 4


def test_flipping_bit_30_of_0625_gives_the_papers_value():
    x = torch.tensor([0.625], dtype=torch.float32)
    int_view(x).bitwise_xor_(bit_values(32)[30].to(torch.int32))
    assert x.item() == 0.625 * 2.0**128  # about 2.13e38: the exponent's top bit moves it up 2**128


def naive_histogram(masks: torch.Tensor, width: int) -> list[int]:
    """The reference: test each bit of each mask with Python ints (bit width-1 is the sign bit)."""
    return [sum((int(m) >> b) & 1 for m in masks.tolist()) for b in range(width)]


@pytest.mark.parametrize("width", [8, 16, 32, 64])
def test_bit_histogram_and_popcount_match_a_naive_reference(width):
    gen = torch.Generator().manual_seed(width)
    view = {8: torch.int8, 16: torch.int16, 32: torch.int32, 64: torch.int64}[width]
    info = torch.iinfo(view)
    masks = torch.randint(info.min, info.max, (500,), generator=gen, dtype=view).to(torch.int64)
    sparse = masks & torch.randint(info.min, info.max, (500,), generator=gen, dtype=view).to(torch.int64)
    extremes = torch.tensor([0, -1, info.min, info.max, 1, info.min + 1], dtype=torch.int64)
    masks = torch.cat([masks, sparse, extremes])
    want = naive_histogram(masks, width)
    hist = bit_histogram(masks, width)
    assert hist.dtype == torch.int64 and hist.tolist() == want
    assert hist[width - 1] == int((masks < 0).sum())  # the sign bit, -2**(width-1) in the int64 mask
    assert popcount(masks, width) == sum(want)


def test_bits_above_the_width_are_ignored():
    masks = torch.tensor([-1, 0x1FF, -(1 << 40)], dtype=torch.int64)  # -1 = all 64 bits set
    assert bit_histogram(masks, 8).tolist() == [2] * 8
    assert popcount(masks, 8) == 16 and popcount(masks, 16) == 16 + 9
    assert popcount(masks, 64) == 64 + 9 + 24


def test_empty_masks_count_zero():
    empty = torch.empty(0, dtype=torch.int64)
    assert bit_histogram(empty, 16).tolist() == [0] * 16 and popcount(empty, 16) == 0


@pytest.mark.parametrize("width", [0, 7, 12, 72, 128])
def test_an_unsupported_width_is_a_clear_error(width):
    with pytest.raises(ValueError, match=rf"width must be one of \(8, 16, 32, 64\).*got {width}"):
        bit_histogram(torch.zeros(3, dtype=torch.int64), width)
    with pytest.raises(ValueError, match="width must be one of"):
        popcount(torch.zeros(3, dtype=torch.int64), width)


def test_masks_of_any_layout_and_integer_dtype_count_the_same():
    masks = torch.tensor([[-1, 5], [-(1 << 15), 0x0F0F]], dtype=torch.int64)
    want = naive_histogram(masks.reshape(-1), 16)
    assert bit_histogram(masks.t(), 16).tolist() == want  # non-contiguous 2-D
    assert bit_histogram(masks.reshape(-1).to(torch.int16), 16).tolist() == want  # a view-dtype tensor
    assert popcount(masks.t(), 16) == sum(want)
