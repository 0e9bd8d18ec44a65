"""Selective bit protection: protected bits never change, magnitudes stay within a factor of 2."""

import pytest
import torch
from torch import nn

import pytei
from conftest import assert_bit_identical, snapshot
from pytei import BitFlip, Burst, RandomValue, StuckAt
from pytei.bits import bit_histogram, int_view, layout
from pytei.mitigation.protect import ProtectBits

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def model_of(dtype, seed=0):
    m = nn.Module()
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(64, 65, generator=g).clamp(-50, 50)  # normal, non-zero values
    m.w = nn.Parameter(values.to(dtype))
    return m


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("ber", [1e-3, 0.1, 0.5, 1.0])
def test_sign_and_exponent_protected_at_any_ber(dtype, ber):
    m = model_of(dtype)
    before = m.w.detach().double().clone()
    snap = snapshot(m)
    with pytei.inject(m, BitFlip(ber), seed=1, protect=ProtectBits()) as report:
        after = m.w.detach().double()
        ratio = after / before
        assert bool(((ratio > 0.5) & (ratio < 2.0)).all()), "a magnitude changed by a factor of 2 or more"
        assert report.per_field.get("sign", 0) == report.per_field.get("exponent", 0) == 0
        if ber >= 0.1:
            assert report.per_field["mantissa"] > 0
    assert_bit_identical(m, snap)


def test_protection_filters_the_same_draws():
    m = model_of(torch.float32)
    with pytei.inject(m, BitFlip(0.05), seed=2) as raw:
        pass
    protect = ProtectBits()
    with pytei.inject(m, BitFlip(0.05), seed=2, protect=protect) as prot:
        pass
    assert prot.per_field["mantissa"] == raw.per_field["mantissa"]
    blocked = raw.per_field["sign"] + raw.per_field["exponent"]
    assert prot.protection == {"blocked_bits": blocked, "passed_bits": raw.per_field["mantissa"]}
    assert prot.n_faults == raw.n_faults - blocked


@pytest.mark.parametrize("error", [StuckAt(0.3, 1), RandomValue(0.5, -100.0, 100.0), Burst(0.5, length=4)])
def test_every_error_model(error):
    m = model_of(torch.float32)
    with pytei.inject(m, error, seed=3, protect=ProtectBits()) as report:
        hist = report.per_bit("w")
        assert int(hist[23:].sum()) == 0 and int(hist[:23].sum()) > 0


def test_explicit_bits_and_integer_default():
    m = nn.Module()
    m.register_buffer("table", torch.randint(-100, 100, (1000,), dtype=torch.int8))
    with pytei.inject(m, BitFlip(0.5), buffers=True, seed=4, protect=ProtectBits()) as report:
        assert int(report.per_bit("table")[7]) == 0  # sign bit of int8 protected by default
    w = model_of(torch.float32)
    with pytei.inject(w, BitFlip(0.5), seed=5, protect=ProtectBits([30, 29, 0])) as report:
        hist = report.per_bit("w")
        assert int(hist[[0, 29, 30]].sum()) == 0 and int(hist[31]) > 0


def test_overhead_and_errors():
    assert ProtectBits().overhead(layout(torch.float32)) == 9 / 32
    assert ProtectBits().overhead(layout(torch.float16)) == 6 / 16
    assert ProtectBits([31]).overhead(layout(torch.float32)) == 1 / 32
    with pytest.raises(ValueError, match="non-negative ints"):
        ProtectBits([-1])
    with pytest.raises(ValueError, match="distinct"):
        ProtectBits([3, 3])
    with pytest.raises(ValueError, match=r"bits \[40\] do not exist in w \(torch.float32, 32 bits\)"):
        pytei.inject(model_of(torch.float32), BitFlip(0.1), seed=0, protect=ProtectBits([40])).__enter__()


def test_report_counts_match_stored_changes():
    m = model_of(torch.float32)
    before = int_view(m.w.detach()).clone()
    with pytei.inject(m, BitFlip(0.2), seed=6, protect=ProtectBits()) as report:
        diff = (int_view(m.w.detach()) ^ before).reshape(-1).to(torch.int64)
        assert int(bit_histogram(diff, 32).sum()) == report.n_faults
