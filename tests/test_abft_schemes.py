"""ABFT's schemes: the fused form (checksums from the layer's own kernel call) detects what the global
check detects, leaves the model exactly as it was, and ``auto`` picks per layer by the roofline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pytei
from conftest import assert_bit_identical, snapshot
from pytei import BitFlip, FlipCount
from pytei.mitigation import mitigate
from pytei.mitigation._abft_plan import choose
from pytei.mitigation.abft import ABFT
from pytei.mitigation.roofline import Balance
from pytei.models import create

FIELDS = [50] * 6
#: Bits flipped one at a time: mantissa (low, middle, top), exponent, sign.
BITS = (0, 12, 20, 22, 23, 26, 29, 30, 31)
PROFILE = Balance(device="test", threads=1, flops=1e11, bandwidth=1e10, torch=torch.__version__)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEI_CACHE_DIR", str(tmp_path / "cache"))


def zoo(name: str) -> nn.Module:
    torch.manual_seed(0)
    extra = {"dense_dim": 13} if name == "dlrm" else {}
    return create(name, field_dims=FIELDS, **extra).eval().requires_grad_(False)


def batch(name: str, n: int = 256, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    sparse = torch.randint(0, 50, (n, len(FIELDS)), generator=gen)
    return (torch.randn(n, 13, generator=gen), sparse) if name == "dlrm" else (sparse,)


def fused_layers(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if "forward" in m.__dict__}


@pytest.mark.parametrize("name", ["dlrm", "dcn", "dfm", "afm"])
def test_fused_runs_clean_data_without_alarms_and_detaches_exactly(name):
    model, x = zoo(name), batch(name)
    clean = model(*x)
    before = snapshot(model)
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    abft = ABFT(scheme="fused")
    with mitigate(model, abft):
        fused = fused_layers(model)
        assert fused  # every Linear, Embedding and EmbeddingBag of the zoo has a fused form
        out = model(*x)
    assert abft.stats["detected"] == 0 and abft.stats["checked"] > 0
    torch.testing.assert_close(out, clean, rtol=1e-5, atol=1e-6)  # GEMMs one column wider: rounding only
    assert fused_layers(model) == set()
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    assert_bit_identical(model, before)
    assert torch.equal(model(*x), clean)
    calibrated = ABFT(scheme="fused")
    calibrated.calibrate(model, [batch(name, 256, s) for s in (1, 2)])
    assert calibrated.measure_false_alarms(model, [batch(name, 512, s) for s in (3, 4)]) == 0


@pytest.mark.parametrize("order", ["mitigate-outside", "inject-outside"])
def test_faults_and_fusion_nest_either_way_and_leave_the_model_clean(order):
    model, x = zoo("dlrm"), batch("dlrm")
    clean, before = model(*x), snapshot(model)
    abft = ABFT(scheme="fused", max_retries=0)
    abft.attach(model)  # checksums are encoded from clean weights, once (as when a model is loaded)
    abft.detach()
    if order == "mitigate-outside":
        with mitigate(model, abft), pytei.inject(model, BitFlip(1e-3), seed=3) as rep:
            model(*x)
    else:
        with pytei.inject(model, BitFlip(1e-3), seed=3) as rep, mitigate(model, abft):
            model(*x)
    assert rep.n_faults > 0 and abft.stats["detected"] > 0  # the faults reached the fused kernels
    assert_bit_identical(model, before)
    assert torch.equal(model(*x), clean)


@pytest.mark.parametrize("name", ["dlrm", "dcn", "dfm"])
def test_fused_detects_the_same_single_bit_errors_as_global(name):
    """Per bit position, the same flips (FlipCount(1) over every weight, fixed seeds) are detected
    under both schemes: the check and its tolerance are the same, only the rounding of the expected
    sum differs, far below the changes of these flips or far above."""
    model, x = zoo(name), batch(name, 512)
    table = {}
    for bit in BITS:
        seen = {}
        for scheme in ("global", "fused"):
            hits = []
            for seed in range(6):
                abft = ABFT(scheme=scheme, max_retries=0)
                with mitigate(model, abft), pytei.inject(model, FlipCount(1, bits=[bit]), seed=seed):
                    model(*x)
                hits.append(abft.stats["detected"] > 0)
            seen[scheme] = hits
        table[bit] = seen
        assert seen["fused"] == seen["global"], (bit, seen)
    assert all(table[30]["global"]) and not any(table[0]["global"])  # exponent MSB always, mantissa LSB never


@pytest.mark.parametrize("scheme", ["global", "fused"])
def test_transient_activation_faults_are_detected_and_recovered_under_both_schemes(scheme):
    """An activation fault replaces a layer's output after its kernel ran: the fused check must read
    the corrupted output, not the augmented one its kernel left."""
    model, x = zoo("dlrm"), batch("dlrm", 512)
    clean = model(*x)
    abft = ABFT(scheme=scheme, max_retries=3)
    flips = FlipCount(1, bits=[30])
    with mitigate(model, abft), pytei.inject(model, flips, site="activations", include="top_mlp.0.*", seed=0):
        out = model(*x)
    st = abft.stats
    assert st["detected"] >= 1 and st["recovered"] == st["detected"] and st["unrecoverable"] == 0
    torch.testing.assert_close(out, clean, rtol=1e-5, atol=1e-6)


def test_auto_fuses_memory_bound_layers_and_keeps_compute_bound_ones_global():
    model, x = zoo("dlrm"), batch("dlrm", 512)
    abft = ABFT(scheme="auto")
    plan = abft.plan(model, x, balance=PROFILE, repeats=1).set_index("layer")
    assert plan.loc["embeddings.0", "bound"] == "memory" and plan.loc["embeddings.0", "scheme"] == "fused"
    for layer, row in plan[plan["checked_by"] == plan.index].iterrows():
        total = row["layer_ms"] + row["check_ms"]
        assert row["scheme"] == choose("auto", row["bound"], True, total, row["fused_ms"])
        assert abft.schemes[layer] == row["scheme"]
    with mitigate(model, abft):
        assert fused_layers(model) == {k for k, v in abft.schemes.items() if v == "fused"}


def test_scheme_choice_rules():
    assert choose("auto", "memory", True, 2.0, 3.0) == "fused"  # the roofline decides, not the timing
    assert choose("auto", "compute", True, 3.0, 2.0) == "global"
    assert choose("auto", "ambiguous", True, 3.0, 2.0) == "fused"  # ambiguous: the faster measured
    assert choose("auto", "ambiguous", True, 2.0, 3.0) == "global"
    assert choose("auto", "memory", False, 2.0, None) == "global"  # no fused form
    assert choose("fused", "compute", True, 2.0, 3.0) == "fused"
    assert choose("global", "memory", True, 3.0, 2.0) == "global"


def test_bad_scheme_names_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"unknown ABFT scheme 'thread'; allowed: global, fused, auto"):
        ABFT(scheme="thread")


def test_calibrate_with_auto_chooses_schemes_first():
    model = zoo("dfm")
    abft = ABFT(scheme="auto")
    abft.calibrate(model, [batch("dfm", 256, s) for s in (1, 2)])
    assert set(abft.schemes) >= {"embedding.embedding", "mlp.0"} and set(abft.schemes.values()) <= {
        "global",
        "fused",
    }
