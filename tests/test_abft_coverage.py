"""ABFT coverage and its plan: every parameterised layer of the zoo is checked (cross layers, BatchNorm,
the wide term included) or listed unchecked with a reason; the roofline that classifies layers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import pytei
from conftest import ScaledLinear
from pytei import FlipCount
from pytei.mitigation import checksums, mitigate
from pytei.mitigation.abft import ABFT
from pytei.mitigation.checksums import Check, register_check, registered, uncheckable
from pytei.mitigation.roofline import Balance, Cost, bound, linear_cost, lookup_cost, machine_balance
from pytei.models import create

FIELDS = [50] * 6
#: A fixed device profile, so that the plan's classification does not depend on this machine's speed.
PROFILE = Balance(device="test", threads=1, flops=1e11, bandwidth=1e10, torch=torch.__version__)


def zoo(name: str) -> nn.Module:
    torch.manual_seed(0)
    extra = {"dense_dim": 13} if name == "dlrm" else {}
    model = create(name, field_dims=FIELDS, **extra).eval().requires_grad_(False)
    if name in ("dcn", "wd", "dfm"):  # give BatchNorm non-trivial running statistics
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    return model


def batch(name: str, n: int = 256, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    sparse = torch.randint(0, 50, (n, len(FIELDS)), generator=gen)
    return (torch.randn(n, 13, generator=gen), sparse) if name == "dlrm" else (sparse,)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEI_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", ["fm", "dfm", "afm", "dcn", "wd", "dlrm", "dummy"])
def test_every_parameter_of_the_zoo_is_checked(name):
    if name == "dummy":
        torch.manual_seed(0)
        model = create("dummy", dense_dim=16, sparse_dim=256, mlp_hidden=32, embed_dim=8, seed=0).eval()
        x = pytei.models.dummy_inputs(64, 16, 256, sparsity=0.05, seed=0)
    else:
        model, x = zoo(name), batch(name)
    abft = ABFT()
    plan = abft.plan(model, x, repeats=1)
    assert list(plan.columns)[:4] == ["layer", "type", "values", "status"]
    covered = set(plan["layer"])
    for module_name, module in model.named_modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if any(p.is_floating_point() for p in own):
            assert module_name in covered, f"{module_name} missing from the plan"
    unchecked = plan[plan["status"] == "unchecked"]
    assert unchecked.empty, unchecked[["layer", "reason"]].to_string()
    values = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for b in model.buffers() if b.is_floating_point()
    )
    assert int(plan["values"].sum()) == values  # every value counted once, by the module holding it
    called = plan[plan["checked_by"] == plan["layer"]]
    assert called["intensity"].notna().all() and (called["check_ms"] > 0).all()


def test_plan_is_deterministic_for_a_device_profile():
    model, x = zoo("dlrm"), batch("dlrm", 512)
    abft = ABFT()
    first, second = (abft.plan(model, x, balance=PROFILE, repeats=1) for _ in range(2))
    fixed = ["layer", "status", "checked_by", "shape", "flops", "bytes", "intensity", "bound", "scheme"]
    assert first[fixed].equals(second[fixed])
    rows = first.set_index("layer")
    assert rows.loc["embeddings.0", "bound"] == "memory"  # a lookup: ~0.1 FLOP per byte
    for _, row in first.iterrows():
        assert row["bound"] == bound(Cost(row["flops"], row["bytes"]), PROFILE)
    assert set(first["bound"]) >= {"memory", "ambiguous"}


def test_unchecked_layers_are_listed_with_the_reason():
    model = ScaledLinear().eval()
    plan = ABFT().plan(model, torch.randn(8, 4), repeats=1).set_index("layer")
    assert plan.loc["", "status"] == "unchecked"
    assert "ScaledLinear, which has no registered ABFT check" in plan.loc["", "reason"]
    assert plan.loc["fc", "status"] == "checked"
    bag = nn.EmbeddingBag(10, 4, mode="max")
    assert "not linear" in uncheckable(bag)


@pytest.mark.parametrize(
    ("name", "include"),
    [
        ("dcn", "cn.b.*"),  # the cross network's biases: outside ABFT before (audit: undetected, inf harm)
        ("dcn", "mlp.1.*"),  # BatchNorm's affine parameters
        ("dfm", "linear.bias"),  # the wide term's bias
    ],
)
def test_bit30_flips_in_formerly_unchecked_parameters_are_detected(name, include):
    model, x = zoo(name), batch(name, 512)
    clean = model(*x)
    detected = 0
    trials = 12
    for seed in range(trials):
        abft = ABFT(max_retries=1, fallback="zero")
        flip = FlipCount(1, bits=[30])
        with mitigate(model, abft), pytei.inject(model, flip, include=include, seed=seed) as rep:
            out = model(*x)
        assert rep.n_faults == 1
        with torch.no_grad():
            harm = bool(((out - clean).abs() > 1).any())
        detected += abft.stats["detected"] > 0
        assert not harm or abft.stats["detected"] > 0, f"seed {seed}: harmful flip undetected"
    assert detected == trials  # bit 30 turns any |v| >= 2**-126 into >= 1: always caught
    assert torch.equal(model(*x), clean)


def test_batchnorm_running_statistics_are_covered():
    model, x = zoo("wd"), batch("wd", 512)
    for buffer in ("mlp.1.running_mean", "mlp.1.running_var"):
        abft = ABFT(max_retries=0)
        with (
            mitigate(model, abft),
            pytei.inject(model, FlipCount(1, bits=[30]), include=buffer, buffers=True, seed=1),
        ):
            model(*x)
        assert abft.stats["per_layer"]["mlp.1"]["detected"] > 0, buffer


@pytest.mark.parametrize("name", ["dcn", "dfm", "wd"])
def test_no_false_alarms_on_clean_data_with_the_new_checks(name):
    model = zoo(name)
    abft = ABFT()
    abft.calibrate(model, [batch(name, 512, s) for s in range(1, 4)])
    assert abft.measure_false_alarms(model, [batch(name, 1024, s) for s in range(4, 8)]) == 0
    analytic = ABFT()
    assert analytic.measure_false_alarms(model, [batch(name, 1024, s) for s in range(4, 8)]) == 0


def test_batchnorm_in_training_mode_is_not_checked():
    bn = nn.BatchNorm1d(8).train()
    abft = ABFT()
    with mitigate(bn, abft):
        bn(torch.randn(32, 8))
    assert abft.stats["checked"] == 0


def test_a_plugin_registers_a_check_for_its_own_module(monkeypatch):
    monkeypatch.setattr(checksums, "_CHECKS", dict(checksums._CHECKS))  # the registration stays in this test

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.full((4,), 2.0))

        def forward(self, x):
            return x * self.weight

    @register_check(Scale)
    class ScaleCheck(Check):
        def __init__(self, module: Scale) -> None:
            super().__init__(module.weight, 4)
            self.w = module.weight.detach().clone()

        def residual(self, args, kwargs, output):
            x = args[0]
            return self.minus(self.values(output), x @ self.w), x.abs() @ self.w.abs()

        def terms(self, args, kwargs):
            return 8.0

        def cost(self, args, kwargs, output):
            return Cost(float(args[0].numel()), float(8 * args[0].numel()))

    assert registered()[Scale] is ScaleCheck
    model = nn.Sequential(Scale()).eval().requires_grad_(False)
    abft = ABFT(max_retries=0)
    with mitigate(model, abft), pytei.inject(model, FlipCount(1, bits=[30]), seed=0):
        model(torch.ones(3, 4))
    assert abft.stats["per_layer"]["0"]["detected"] == 3


# --------------------------------------------------------------------------- the roofline


def test_costs_and_bounds():
    c = linear_cost(4096, 512, 256, torch.float32, bias=True)
    assert c.flops == 2 * 4096 * 512 * 256 + 4096 * 256
    assert c.bytes == 4 * (4096 * 512 + 512 * 256 + 4096 * 256 + 256)
    lookup = lookup_cost(4096, 4096, 16, torch.float32)
    assert lookup.intensity < 0.2
    assert bound(lookup, PROFILE) == "memory" and bound(c, PROFILE) == "compute"
    assert bound(Cost(10.0, 1.0), PROFILE) == "ambiguous"  # intensity 10 = the balance


def test_machine_balance_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEI_CACHE_DIR", str(tmp_path))
    first = machine_balance("cpu")
    assert first.flops > 1e8 and first.bandwidth > 1e8 and first.balance > 0
    cache = tmp_path / "machine-balance.json"
    stored = json.loads(cache.read_text())
    assert len(stored) == 1
    key = next(iter(stored))
    stored[key]["flops"] = 123.0  # a cached value is used as it is, not measured again
    cache.write_text(json.dumps(stored))
    assert machine_balance("cpu").flops == 123.0
    assert machine_balance("cpu", refresh=True).flops != 123.0
    cache.write_text("{not json")
    assert machine_balance("cpu").flops > 1e8  # an unreadable cache is measured again and rewritten
    assert json.loads(cache.read_text())
