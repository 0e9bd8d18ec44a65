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
