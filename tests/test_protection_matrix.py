"""Every error model under every memory protection (none, ProtectBits, ECC), and how each model
extends to the ECC check bits of the 72-bit codeword (issue 15, "Protections composed with every
error model")."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

import pytei
from conftest import assert_bit_identical, snapshot
from pytei import errors
from pytei.bits import bit_histogram, int_view, popcount
from pytei.errors import BitFlip, BitRates, Burst, ErrorModel, FlipCount, RandomValue, StuckAt
from pytei.exceptions import ArgumentError
from pytei.faultmap import FaultMap
from pytei.mitigation.ecc import ECC, encode, read_data_words
from pytei.mitigation.protect import ProtectBits


def linear(dtype: torch.dtype = torch.float32, n: int = 64, seed: int = 0) -> nn.Module:
    """One weight of ``n`` x ``n`` + 1 values (the last 64-bit word of float32/16 is padded)."""
    m = nn.Module()
    g = torch.Generator().manual_seed(seed)
    m.w = nn.Parameter(torch.randn(n, n + 1, generator=g).to(dtype))
    return m


def stored_bits_changed(model: nn.Module, snap: dict[str, torch.Tensor]) -> int:
    """Bits that differ between the model's parameters and their snapshot."""
    total = 0
    for name, p in model.named_parameters():
        now = int_view(p.detach()).reshape(-1).to(torch.int64)
        total += popcount(now ^ snap[name].reshape(-1).to(torch.int64), p.element_size() * 8)
    return total


def binomial_ok(count: int, n: int, p: float, alpha: float = 1e-6) -> bool:
    """``count`` lies in the two-sided ``1 - alpha`` interval of Binomial(n, p)."""
    lo, hi = stats.binom.ppf(alpha / 2, n, p), stats.binom.isf(alpha / 2, n, p)
    return lo <= count <= hi


# --- regressions: one per defect of issue 15 ---------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 40])
def test_flipcount_under_ecc_flips_k_bits_of_the_codewords(k):
    model = linear()
    ecc = ECC()
    with pytei.inject(model, FlipCount(k), seed=3, protect=ecc) as report:
        pass
    s = report.protection
    assert s["data_bits_hit"] + s["check_bits_hit"] == k
    assert s["words_with_errors"] <= k


def test_flipcount_check_positions_do_not_echo_data_positions():
    """Over many seeds the word indices of check faults and data faults are unrelated."""
    model = linear(torch.float64, n=8)  # 72 words: every element is one word
    same = total = 0
    for seed in range(300):
        ecc = ECC()
        with pytei.inject(model, FlipCount(1), seed=seed, protect=ecc):
            pass
        record = ecc.fault_map
        if "w#ecc" in record.faults:
            total += 1
            data = FlipCount(1).draw(
                [pytei.errors.Words("w", 72, pytei.bits.layout(torch.float64), lambda i: i)], seed
            )[0]
            same += int(int(record.faults["w#ecc"].index[0]) == int(data.index[0]))
    # P(check fault) = 8 / 72 per seed; P(same word | independent) = 1 / 72.
    assert binomial_ok(total, 300, 8 / 72)
    assert same <= stats.binom.isf(1e-6, max(total, 1), 1 / 72)


def test_faultmap_replay_under_ecc_gives_the_same_faults_and_outcome(tmp_path):
    model = linear()
    snap = snapshot(model)
    ecc = ECC()
    with pytei.inject(model, BitFlip(5e-3), seed=1, protect=ecc) as first:
        pass
    record = ecc.fault_map
    assert "w#ecc" in record.faults  # check-bit faults are recorded
    path = tmp_path / "ecc.faults"
    record.save(path)
    for replay in (record, FaultMap.load(path)):
        again = ECC()
        with pytei.inject(model, replay, seed=99, protect=again) as second:
            pass
        assert second.protection == first.protection
        f1, f2 = first.fault_map.faults["w"], second.fault_map.faults["w"]
        assert torch.equal(f1.index, f2.index) and torch.equal(f1.mask, f2.mask)
    # What reached storage (the report's map) replays under ECC as data errors, without a bad message.
    with pytei.inject(model, first.fault_map, seed=0, protect=ECC()) as third:
        assert third.protection["check_bits_hit"] == 0
    assert_bit_identical(model, snap)


@pytest.mark.parametrize("length", [9, 20, 40, 72])
def test_burst_longer_than_a_check_byte_spans_the_codeword(length):
    model = linear()
    snap = snapshot(model)
    ecc = ECC()
    with pytei.inject(model, Burst(0.05, length=length), seed=2, protect=ecc) as report:
        assert stored_bits_changed(model, snap) == report.n_faults
    s = report.protection
    assert s["words_with_errors"] > 0 and (s["data_bits_hit"] + s["check_bits_hit"]) % length == 0
    assert_bit_identical(model, snap)
    with pytest.raises(ArgumentError, match=r"Burst length 73 exceeds the 72-bit codeword"):
        pytei.inject(model, Burst(0.05, length=73), seed=2, protect=ECC()).__enter__()


@pytest.mark.parametrize(
    "error",
    [BitFlip(0.05, bits=[30]), BitRates({30: 0.05}), StuckAt(0.3, 1, bits=[12, 30])],
    ids=["bitflip", "bitrates", "stuckat"],
)
def test_bit_sets_under_ecc_name_element_bits_and_never_check_bits(error):
    model = linear()
    ecc = ECC("flag")
    with pytei.inject(model, error, seed=4, protect=ecc) as report:
        pass
    assert report.protection["check_bits_hit"] == 0 and report.protection["data_bits_hit"] > 0
    assert set(ecc.fault_map.faults) == {"w"}


def test_bit_sets_64_to_71_name_check_bits():
    model = linear()
    ecc = ECC("flag")
    with pytei.inject(model, BitFlip(0.2, bits=[64, 71]), seed=5, protect=ecc) as report:
        pass
    s = report.protection
    assert s["data_bits_hit"] == 0 and binomial_ok(s["check_bits_hit"], 2 * 2080, 0.2)
    assert report.n_faults == 0  # check-bit errors only: corrected, or detected with the data intact
    assert s["corrected"] > 0 and s["detected"] > 0 and s["miscorrected"] == s["undetected"] == 0
    hist = bit_histogram(ecc.fault_map.faults["w#ecc"].mask, 8)
    assert int(hist[1:7].sum()) == 0 and int(hist[0]) > 0 and int(hist[7]) > 0
    with pytest.raises(ArgumentError, match=r"bit positions \[64\] do not exist in torch.float32"):
        pytei.inject(model, BitFlip(0.2, bits=[64]), seed=5).__enter__()  # no ECC: no check bits
    with pytest.raises(ArgumentError, match=r"bit positions \[40\] do not exist in torch.float32"):
        pytei.inject(model, BitFlip(0.2, bits=[40]), seed=5, protect=ECC()).__enter__()


def test_random_value_writes_random_check_bytes():
    model = linear(n=128)
    ecc = ECC("flag")
    with pytei.inject(model, RandomValue(0.2), seed=6, protect=ecc):
        pass
    check = ecc.fault_map.faults["w#ecc"]
    flat = int_view(model.w.detach()).reshape(-1)
    clean = encode(read_data_words(_words("w", flat, model.w.dtype), check.index))
    new = (clean ^ check.mask) & 0xFF
    counts = torch.bincount(new, minlength=256)
    assert int((counts > 0).sum()) > 200  # random byte patterns, not the values -1, 0, 1
    # Each replaced byte is uniform over the 255 bytes other than its clean one.
    clean_counts = torch.bincount(clean & 0xFF, minlength=256).double()
    expected = (check.index.numel() - clean_counts) / 255
    chi2 = float(((counts.double() - expected) ** 2 / expected).sum())
    assert chi2 < stats.chi2.isf(1e-6, 255)


def _words(name: str, flat: torch.Tensor, dtype: torch.dtype) -> pytei.errors.Words:
    return pytei.errors.Words(name, flat.numel(), pytei.bits.layout(dtype), lambda i: flat[i].to(torch.int64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_random_value_stays_below_high_after_rounding(dtype):
    t = torch.zeros(1_000_000, dtype=dtype)
    flat = int_view(t).reshape(-1)
    f = RandomValue(1.0, 0.0, 1.0).draw_one(_words("t", flat, dtype), torch.Generator().manual_seed(0))
    new = (flat[f.index].to(torch.int64) ^ f.mask).to(flat.dtype).view(dtype).double()
    assert float(new.min()) >= 0.0 and float(new.max()) < 1.0


@pytest.mark.parametrize(
    ("low", "high", "dtype", "message"),
    [
        (-math.inf, math.inf, torch.float32, r"RandomValue low and high must be finite, got low=-inf"),
        (0.0, math.nan, torch.float32, r"RandomValue low and high must be finite, got .*high=nan"),
        (0.0, 1e5, torch.float16, r"RandomValue range \[0.0, 100000.0\) exceeds torch.float16's finite"),
        (-1e39, 0.0, torch.float32, r"RandomValue range \[-1e\+39, 0.0\) exceeds torch.float32's finite"),
        (1.001, 1.002, torch.bfloat16, r"RandomValue range \[1.001, 1.002\) holds no torch.bfloat16 value"),
    ],
)
def test_random_value_ranges_beyond_the_dtype_are_refused(low, high, dtype, message):
    t = torch.zeros(100, dtype=dtype)
    with pytest.raises(ArgumentError, match=message):
        RandomValue(0.5, low, high).draw_one(_words("t", int_view(t), dtype), torch.Generator())


# --- the matrix: every error model x every protection x word sizes ---------------------------------

#: One instance per error model registered by pytei itself (a new registration must add one here).
REGISTERED = {
    "BitFlip": BitFlip(1e-3),
    "StuckAt": StuckAt(2e-3, 1),
    "RandomValue": RandomValue(0.02, -2.0, 2.0),
    "Burst": Burst(0.02, length=3),
    "FlipCount": FlipCount(25),
}
#: Unregistered models and variants that must compose as well (bit sets valid for every dtype).
EXTRA = {
    "BitRates": BitRates({0: 5e-3, 7: 5e-3}),
    "StuckAt-bits": StuckAt(0.05, 0, bits=[3]),
    "FaultMap": None,  # recorded from BitFlip under the same protection, then replayed
}
PROTECTIONS = {
    "none": lambda: None,
    "protect-bits": ProtectBits,
    "ecc-zero": lambda: ECC("zero"),
    "ecc-flag": lambda: ECC("flag"),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.int8]


def test_every_builtin_registered_error_model_is_in_the_matrix():
    builtin = {n for n in errors.register.names() if errors.register.get(n).__module__ == "pytei.errors"}
    assert builtin == set(REGISTERED)
    for name, error in REGISTERED.items():
        assert isinstance(error, errors.register.get(name))


def matrix_model(dtype: torch.dtype) -> nn.Module:
    """64 x 65 values: a whole number of 64-bit words for every dtype (no padding)."""
    m = nn.Module()
    g = torch.Generator().manual_seed(7)
    if dtype.is_floating_point:
        m.w = nn.Parameter(torch.randn(64, 65, generator=g).to(dtype))
    else:
        m.w = nn.Parameter(torch.randint(-128, 128, (64, 65), generator=g, dtype=dtype), requires_grad=False)
    return m


def _popcount(f, width: int) -> int:
    return popcount(f.mask, width) if f is not None and len(f) else 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("protection", list(PROTECTIONS))
@pytest.mark.parametrize("name", [*REGISTERED, *EXTRA])
def test_error_model_x_protection(name, protection, dtype):
    model = matrix_model(dtype)
    snap = snapshot(model)
    width = torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits
    numel, n_words = 64 * 65, 64 * 65 * width // 64
    protect = PROTECTIONS[protection]()
    error: ErrorModel | None = REGISTERED.get(name) or EXTRA.get(name)
    if name == "FaultMap":  # record a trial under this protection, then replay it
        with pytei.inject(model, BitFlip(1e-3), seed=11, protect=protect) as recorded:
            pass
        error = protect.fault_map if isinstance(protect, ECC) else recorded.fault_map
        if protect is not None:
            protect = PROTECTIONS[protection]()
    assert error is not None
    with pytei.inject(model, error, seed=11, protect=protect) as report:
        assert stored_bits_changed(model, snap) == report.n_faults  # counted = changed
    assert_bit_identical(model, snap)  # restore is bit-exact
    s = report.protection
    if isinstance(protect, ECC):
        record = protect.fault_map
        assert s["bits_reaching_memory"] == report.n_faults
        assert s["data_bits_hit"] == _popcount(record.faults.get("w"), width)
        assert s["check_bits_hit"] == _popcount(record.faults.get("w#ecc"), 8)
        outcomes = ("corrected", "detected", "miscorrected", "undetected")
        assert sum(s[o] for o in outcomes) == s["words_with_errors"]
        drawn_data, drawn_check = s["data_bits_hit"], s["check_bits_hit"]
    elif isinstance(protect, ProtectBits):
        assert s["passed_bits"] == report.n_faults
        drawn_data, drawn_check = s["passed_bits"] + s["blocked_bits"], 0
    else:
        drawn_data, drawn_check = report.n_faults, 0
    ecc = isinstance(protect, ECC)
    if name == "FlipCount":  # exactly k over the (code)words
        assert drawn_data + drawn_check == 25
    elif name == "BitFlip":
        assert binomial_ok(drawn_data, numel * width, 1e-3)
        assert binomial_ok(drawn_check, n_words * 8, 1e-3) if ecc else drawn_check == 0
    elif name == "BitRates":
        assert binomial_ok(drawn_data, 2 * numel, 5e-3) and drawn_check == 0
    elif name == "Burst" and ecc:  # one burst of 3 bits per hit codeword
        assert binomial_ok(s["words_with_errors"], n_words, 0.02)
        assert drawn_data + drawn_check == 3 * s["words_with_errors"]
    elif name == "Burst":
        hit = len(report.fault_map.faults.get("w", ())) if protect is None else None
        assert hit is None or (binomial_ok(hit, numel, 0.02) and drawn_data == 3 * hit)
    elif name == "RandomValue" and ecc:  # a random byte differs from the clean one with p 255/256
        checks = len(protect.fault_map.faults.get("w#ecc", ()))
        assert binomial_ok(checks, n_words, 0.02 * 255 / 256)
    elif name == "RandomValue" and protect is None and dtype in (torch.float32, torch.float64):
        assert binomial_ok(report.n_values, numel, 0.02)  # a new value equals the old with p ~ 0
    elif name == "RandomValue" and protect is None:  # coarse dtypes: some new values equal the old
        assert report.n_values <= stats.binom.isf(1e-6, numel, 0.02)
    elif name == "FaultMap" and protect is None:
        assert report.n_faults == recorded.n_faults
    elif name == "FaultMap" and ecc:
        assert s == recorded.protection  # same faults on replay, same outcome
    elif name == "FaultMap":  # the map holds what got through: all of it gets through again
        assert s == {"blocked_bits": 0, "passed_bits": recorded.protection["passed_bits"]}


def test_flipcount_under_ecc_reaches_every_codeword_bit():
    m = nn.Module()
    m.w = nn.Parameter(torch.randn(1, dtype=torch.float64))  # one codeword: 64 data + 8 check bits
    ecc = ECC("flag")
    with pytei.inject(m, FlipCount(70), seed=0, protect=ecc) as report:
        pass
    assert report.protection["data_bits_hit"] + report.protection["check_bits_hit"] == 70
    assert report.protection["check_bits_hit"] >= 6  # at most 64 of the 70 fit in the data bits
    with pytest.raises(ArgumentError, match=r"FlipCount k=73 exceeds the 72 targeted bits under ECC"):
        pytei.inject(m, FlipCount(73), seed=0, protect=ECC()).__enter__()
    with pytest.raises(ArgumentError, match=r"k=65 exceeds the 64 targeted bits"):
        pytei.inject(m, FlipCount(65), seed=0).__enter__()  # no ECC: no check bits
    with pytei.inject(m, FlipCount(3, bits=[64, 65, 66]), seed=0, protect=ecc) as report:
        # check bits 0, 1, 2: syndrome 0b111, the column of data bit 0 -> miscorrected into the data
        assert report.protection["check_bits_hit"] == 3 and report.protection["miscorrected"] == 1
        assert report.n_faults == 1 and report.per_bit("w").tolist()[0] == 1


def test_protect_bits_has_no_check_bits():
    with pytest.raises(ArgumentError, match=r"bit positions \[66\] do not exist in torch.float32"):
        pytei.inject(linear(), BitFlip(0.1, bits=[66]), seed=0, protect=ProtectBits()).__enter__()


def test_flipcount_under_ecc_is_uniform_over_the_72_codeword_positions():
    m = nn.Module()
    m.w = nn.Parameter(torch.randn(8, dtype=torch.float64))  # 8 codewords
    hist = torch.zeros(72, dtype=torch.float64)
    for seed in range(400):
        ecc = ECC("flag")
        with pytei.inject(m, FlipCount(4), seed=seed, protect=ecc):
            pass
        faults = ecc.fault_map.faults
        if "w" in faults:
            hist[:64] += bit_histogram(faults["w"].mask, 64).double()
        if "w#ecc" in faults:
            hist[64:] += bit_histogram(faults["w#ecc"].mask, 8).double()
    assert int(hist.sum()) == 1600
    chi2 = float(((hist - hist.mean()) ** 2 / hist.mean()).sum())
    assert chi2 < stats.chi2.isf(1e-6, 71)
