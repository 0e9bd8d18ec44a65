"""Activation clipping: both variants, NaN handling, profiled bounds, reversibility, effect."""

import math

import pytest
import torch
from torch import nn

import pytei
from pytei import BitFlip
from pytei.metrics import rmse
from pytei.mitigation import mitigate
from pytei.mitigation.clip import ClipActivations, zero_outside
from pytei.models import create, dummy_inputs


class Probe(nn.Module):
    """One hidden Linear whose output we can set freely, then an output Linear."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.hidden = nn.Linear(values.numel(), values.numel())
        self.out = nn.Linear(values.numel(), 1)
        with torch.no_grad():
            self.hidden.weight.zero_()
            self.hidden.bias.copy_(values)
        self.output_layers = ("out",)
        self.seen = []
        self.out.register_forward_pre_hook(lambda m, i: self.seen.append(i[0].clone()))

    def forward(self, x):
        return self.out(self.hidden(x))


VALUES = torch.tensor([-100.0, -6.0, -1.0, 0.0, 2.5, 6.0, 7.0, float("inf"), float("-inf")])


def test_clamp_is_eq2_and_nan_becomes_zero():
    m = Probe(VALUES)
    with mitigate(m, ClipActivations(count=True)) as (clip,):
        m(torch.zeros(1, VALUES.numel()))
    assert m.seen[-1][0].tolist() == [-6.0, -6.0, -1.0, 0.0, 2.5, 6.0, 6.0, 6.0, -6.0]
    assert clip.stats["clipped"] == 4
    nan = Probe(torch.tensor([float("nan"), 1.0]))
    with mitigate(nan, ClipActivations()):
        nan(torch.zeros(1, 2))
    assert nan.seen[-1][0].tolist() == [0.0, 1.0]


def test_zero_is_eq1():
    m = Probe(torch.cat([VALUES, torch.tensor([float("nan")])]))
    with mitigate(m, ClipActivations(-6, 6, mode="zero")):
        m(torch.zeros(1, VALUES.numel() + 1))
    assert m.seen[-1][0].tolist() == [0.0, -6.0, -1.0, 0.0, 2.5, 6.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("lo", "hi"), [(-6.0, 6.0), (-2.5, 7.25), (0.5, 3.0), (-9.0, -1.0)])
def test_zero_outside_matches_the_mask_definition(dtype, lo, hi):
    gen = torch.Generator().manual_seed(0)
    specials = torch.tensor([lo, hi, -0.0, float("nan"), float("inf"), float("-inf"), 1e30, -1e30])
    y = torch.cat([torch.randn(5000, generator=gen) * 8, specials]).to(dtype)
    want = torch.where((y >= lo) & (y <= hi), y, torch.zeros((), dtype=dtype))
    got = zero_outside(y, lo, hi)
    assert got.dtype == dtype
    assert torch.equal(got, want)


def test_default_layers_skip_the_output_layer():
    m = Probe(VALUES)
    clip = ClipActivations()
    clip.attach(m)
    assert len(m.hidden._forward_hooks) == 1 and len(m.out._forward_hooks) == 0
    clip.detach()
    for name in ("dummy", "dlrm", "dcn"):
        kw = {} if name == "dummy" else {"field_dims": [5, 6, 7]}
        model = create(name, **kw)
        with mitigate(model, ClipActivations()):
            for layer in model.output_layers:
                assert not dict(model.named_modules())[layer]._forward_hooks


def test_detach_restores_exact_behaviour():
    model = create("dummy", mlp_hidden=64, embed_dim=64, seed=0).eval()
    dense, sparse = dummy_inputs(256, sparsity=0.01, seed=0)
    clean = model(dense, sparse)
    with mitigate(model, ClipActivations(-0.01, 0.01)):
        assert not torch.equal(model(dense, sparse), clean)
    assert torch.equal(model(dense, sparse), clean)
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"), mitigate(model, ClipActivations(-0.01, 0.01)):
        raise RuntimeError("boom")
    assert torch.equal(model(dense, sparse), clean)


def test_profiled_bounds_contain_all_clean_activations():
    model = create("dlrm", field_dims=[50] * 4, dense_dim=5).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(128, 5, generator=gen), torch.randint(0, 50, (128, 4), generator=gen)) for _ in range(8)
    ]
    clip = ClipActivations.profile(model, batches, margin=0.1, count=True)
    assert set(clip.bounds) == {"bottom_mlp.0", "bottom_mlp.2", "top_mlp.0", "top_mlp.2"}
    seen = {}
    for name in clip.bounds:
        dict(model.named_modules())[name].register_forward_hook(
            lambda m, i, o, name=name: seen.setdefault(name, []).append(o.detach().clone())
        )
    clean = [model(*b) for b in batches]
    for name, (lo, hi) in clip.bounds.items():
        acts = torch.cat([a.reshape(-1) for a in seen[name]])
        assert float(acts.min()) > lo and float(acts.max()) < hi
    with mitigate(model, clip):
        assert all(torch.equal(model(*b), c) for b, c in zip(batches, clean, strict=True))
    assert clip.stats["clipped"] == 0


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown clipping mode 'relu6'; allowed: clamp, zero"):
        ClipActivations(mode="relu6")
    with pytest.raises(ValueError, match=r"low < high, got range = \(6, -6\)"):
        ClipActivations(6, -6)
    with pytest.raises(ValueError, match="no module named"):
        ClipActivations(layers=["nope"]).attach(create("dummy"))


def test_clipping_recovers_output_quality_under_mlp_errors():
    """Paired trials (same seeds): clipping turns inf/nan outputs into finite, smaller deviations."""
    model = create("dummy", mlp_depth=2, mlp_hidden=256, embed_dim=64, seed=0).eval()
    dense, sparse = dummy_inputs(512, sparsity=0.01, seed=1)
    with torch.no_grad():
        golden = model(dense, sparse)
        raw, clipped = [], []
        for seed in range(8):
            with pytei.inject(model, BitFlip(1e-4), target="mlp", params="weight", seed=seed):
                raw.append(rmse(model(dense, sparse), golden)["rmse"])
                with mitigate(model, ClipActivations()):
                    clipped.append(rmse(model(dense, sparse), golden)["rmse"])
    assert all(math.isfinite(c) for c in clipped)
    assert sum(not math.isfinite(r) or r > 1e6 for r in raw) >= 4  # errors alone blow the output up
    assert all(c <= r or not math.isfinite(r) for c, r in zip(clipped, raw, strict=True))


def test_reset_stats_starts_every_use_from_zero():
    m = Probe(VALUES)
    clip = ClipActivations(count=True)
    x = torch.zeros(1, VALUES.numel())
    with mitigate(m, clip):
        m(x)
    first = clip.stats
    assert first["clipped"] == 4 and first["per_layer"] == {"hidden": 4}
    with mitigate(m, clip):
        m(x)
    assert clip.stats["clipped"] == 8  # without a reset, counts add up over uses
    for _ in range(2):  # two consecutive uses, each after reset_stats: the same counts, not their sum
        clip.reset_stats()
        assert clip.stats == {"layers": 1, "clipped": 0, "per_layer": {"hidden": 0}}
        with mitigate(m, clip):
            m(x)
        assert clip.stats == first


def test_every_mitigation_can_reset_its_stats():
    from pytei.mitigation import Mitigation

    class Nothing(Mitigation):
        def attach(self, model):
            pass

        def detach(self):
            pass

    none = Nothing()
    none.reset_stats()  # the base keeps no counters: a no-op, not an AttributeError
    assert none.stats == {}


def test_profile_takes_tensors_tuples_or_one_tensor_and_says_what_it_needs():
    model = create("dfm", field_dims=[50] * 3).eval()  # a one-input model: forward(x)
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randint(0, 50, (256, 3), generator=gen) for _ in range(4)]
    from_tensors = ClipActivations.profile(model, tensors)  # was: "takes 2 positional arguments but 257"
    assert set(from_tensors.bounds) == {"mlp.0", "mlp.4"}
    assert ClipActivations.profile(model, [(x,) for x in tensors]).bounds == from_tensors.bounds
    assert ClipActivations.profile(model, iter([[x] for x in tensors])).bounds == from_tensors.bounds
    one = ClipActivations.profile(model, torch.cat(tensors))  # a bare tensor is one batch
    for name, (lo, hi) in one.bounds.items():
        assert lo == pytest.approx(from_tensors.bounds[name][0]) and hi == pytest.approx(
            from_tensors.bounds[name][1]
        )
    with pytest.raises(
        TypeError, match=r"batch 1 is a ndarray; each batch must be a tensor .* or a tuple of tensors"
    ):
        ClipActivations.profile(model, [tensors[0], tensors[1].numpy()])
    with pytest.raises(TypeError, match=r"batch 0 is a tuple of \(Tensor, int\)"):
        ClipActivations.profile(model, [(tensors[0], 3)])
    with pytest.raises(TypeError, match=r"ClipActivations.profile takes an iterable of batches.*got int"):
        ClipActivations.profile(model, 5)
