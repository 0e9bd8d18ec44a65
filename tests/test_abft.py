"""ABFT: no false alarms on clean data, detection of high-bit flips, re-execution, fallbacks, detach."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pytei
from conftest import assert_bit_identical, snapshot
from pytei import BitFlip, FlipCount
from pytei.mitigation import mitigate
from pytei.mitigation.abft import ABFT, FLOOR_ULPS, ABFTError
from pytei.models import create, dummy_inputs

#: Small zoo models (Kaiming / Xavier / uniform initialisations give realistic activations).
CONFIGS = {
    "dummy": {"dense_dim": 32, "sparse_dim": 1024, "mlp_hidden": 64, "embed_dim": 32, "seed": 0},
    "dlrm": {"field_dims": [100] * 8, "dense_dim": 13},
    "dcn": {"field_dims": [100] * 8},
}


def make(name: str) -> nn.Module:
    """An inference-mode zoo model (eval, no gradients)."""
    torch.manual_seed(0)
    return create(name, **CONFIGS[name]).eval().requires_grad_(False)


def inputs(name: str, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``n`` random samples for model ``name``."""
    if name == "dummy":
        cfg = CONFIGS["dummy"]
        return dummy_inputs(n, cfg["dense_dim"], cfg["sparse_dim"], sparsity=0.01, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    sparse = torch.randint(0, 100, (n, 8), generator=gen)
    return (torch.randn(n, 13, generator=gen), sparse) if name == "dlrm" else (sparse,)


def modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def flip_bit(bit: int, columns):
    """A forward hook that flips ``bit`` of one float32 output value per row, at ``columns(output)``."""
    mask = -(1 << 31) if bit == 31 else 1 << bit

    def hook(module, args, output):
        out = output.clone()
        words, rows, cols = out.view(torch.int32), torch.arange(out.shape[0]), columns(out)
        words[rows, cols] = words[rows, cols] ^ mask
        return out

    return hook


def bound(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """ABFT's magnitude bound m of each row, in float64."""
    w, b = linear.weight.detach().double(), linear.bias.detach().double()
    return x.double().norm(dim=1) * w.abs().sum(0).norm() + b.abs().sum()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def record(store: dict, key: str):
    def hook(module, args, output):
        store[key] = (args[0].detach().clone(), output.detach().clone())

    return hook


SETTINGS = (("global", "norm"), ("fused", "norm"), ("auto", "norm"), ("global", "variance"))


@pytest.mark.parametrize(
    ("name", "scheme", "bound"),
    [
        ("dummy", "global", "norm"),  # the slowest model: the default setting only
        *((name, scheme, bound) for name in ("dlrm", "dcn") for scheme, bound in SETTINGS),
    ],
)
def test_no_false_alarm_in_ten_thousand_clean_batches(name, scheme, bound):
    """10**4 batches of 16 samples (160,000 rows per layer), checked in 20 passes of 8,000 rows,
    plus 100 genuinely small batches: no clean row fails, with calibrated or analytic tolerances,
    under every scheme and bound."""
    model = make(name)
    calibrated = ABFT(scheme=scheme, bound=bound)
    tau = calibrated.calibrate(model, [inputs(name, 512, seed) for seed in range(4)])
    layers = calibrated.protected(model)
    assert set(tau) == set(layers) and calibrated.stats["false_alarms"] == 0
    assert all(t >= FLOOR_ULPS * 2**-24 for t in tau.values())
    analytic = ABFT(scheme=scheme, bound=bound)
    analytic.schemes = dict(calibrated.schemes)  # auto: the choice calibrate made
    big = [inputs(name, 8000, 100 + seed) for seed in range(20)]
    small = [inputs(name, 16, 1000 + seed) for seed in range(100)]
    linears = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
    for abft in (calibrated, analytic):
        assert abft.measure_false_alarms(model, big) == 0
        assert all(abft.stats["per_layer"][n]["clean_checked"] == 160_000 for n in linears)
        assert abft.measure_false_alarms(model, small) == 0
    assert hook_count(model) == 0


CHECKED_LINEARS = [("dlrm", "bottom_mlp.0"), ("dlrm", "top_mlp.0"), ("dlrm", "top_mlp.4"), ("dcn", "mlp.0")]


@pytest.mark.parametrize(("name", "layer"), CHECKED_LINEARS)
def test_every_flip_of_bits_31_to_16_of_the_largest_value_is_detected(name, layer):
    model = make(name)
    abft = ABFT(max_retries=0)
    abft.calibrate(model, [inputs(name, 512, seed) for seed in range(2)])
    batch = inputs(name, 256, 7)
    target = modules(model)[layer]
    with mitigate(model, abft):
        for bit in range(16, 32):
            abft.reset_stats()
            handle = target.register_forward_hook(flip_bit(bit, lambda y: y.abs().argmax(1)), prepend=True)
            try:
                model(*batch)
            finally:
                handle.remove()
            st = abft.stats["per_layer"][layer]
            assert st["detected"] == st["checked"] == 256, f"bit {bit}: {st}"
            assert abft.stats["detected"] == 256  # and no other layer blamed for it


@pytest.mark.parametrize(("name", "layer"), CHECKED_LINEARS)
def test_detection_guarantee_for_any_value(name, layer):
    """A flip of bit b of value v is caught when |v| > 2**max(24 - b, 1) * (1 + 1/margin) * tau * m,
    m = ||x|| * ||sum_j |W_j|||| + sum |b|; the guarantee covers almost every value (>= 99% for the
    exponent and sign bits, >= 80% for bit 16), and what passes undetected is below that bound."""
    model = make(name)
    abft = ABFT(max_retries=0, fallback="zero")  # a detected row comes out as zeros
    tau = abft.calibrate(model, [inputs(name, 512, seed) for seed in range(2)])[layer]
    target = modules(model)[layer]
    batch = inputs(name, 512, 8)
    gen = torch.Generator().manual_seed(0)
    cols = torch.randint(0, target.out_features, (512,), generator=gen)
    seen: dict = {}
    with mitigate(model, abft):
        after = target.register_forward_hook(record(seen, "after"))  # runs after ABFT: sees its output
        for bit in range(16, 32):
            handle = target.register_forward_hook(flip_bit(bit, lambda y: cols), prepend=True)
            try:
                model(*batch)
            finally:
                handle.remove()
            x, out = seen["after"]
            with torch.no_grad():
                v = target.forward(x)[torch.arange(512), cols].double().abs()  # the value before the flip
            guaranteed = v > 2.0 ** max(24 - bit, 1) * (1 + 1 / abft.margin) * tau * bound(target, x)
            detected = (out == 0).all(1)
            assert bool(detected[guaranteed].all()), f"bit {bit}"
            assert float(guaranteed.double().mean()) >= (0.99 if bit >= 23 else 0.8 if bit == 16 else 0.9)
        after.remove()
    assert hook_count(model) == 0


def test_reexecution_clears_transient_activation_errors():
    """Bit-30 flips in top_mlp.0's outputs are always detectable; fresh draws on re-execution pass,
    so every detection is recovered and the output is bit-identical to the clean one."""
    model = make("dlrm")
    batch = inputs("dlrm", 256, 3)
    clean = model(*batch)
    abft = ABFT()
    abft.calibrate(model, [inputs("dlrm", 512, seed) for seed in range(2)])
    faults = dict(error=BitFlip(2e-4, bits=[30]), site="activations", include="top_mlp.0.*")
    with pytei.inject(model, seed=1, **faults):
        assert not torch.equal(model(*batch), clean)  # the faults do matter
    with mitigate(model, abft), pytei.inject(model, seed=1, **faults) as report:
        out = model(*batch)
    st = abft.stats
    assert report.n_faults > 0 and st["detected"] > 0
    assert st["recovered"] == st["detected"] and st["unrecoverable"] == 0
    assert 1 <= st["reexecutions"] <= abft.max_retries and report.passes == 1 + st["reexecutions"]
    assert torch.equal(out, clean)


def test_reexecution_at_moderate_ber_on_all_bits():
    model = make("dlrm")
    batch = inputs("dlrm", 256, 4)
    clean = model(*batch)
    abft = ABFT()
    abft.calibrate(model, [inputs("dlrm", 512, seed) for seed in range(2)])
    faults = dict(error=BitFlip(1e-5), site="activations", target="mlp")
    with pytei.inject(model, seed=2, **faults):
        raw = (model(*batch) - clean).abs().max()
    with mitigate(model, abft), pytei.inject(model, seed=2, **faults) as report:
        out = model(*batch)
    st = abft.stats
    assert report.n_faults > 0 and st["recovered"] == st["detected"] > 0 and st["unrecoverable"] == 0
    assert float((out - clean).abs().max()) < 1e-5 < float(raw)  # left: undetectably small flips


def test_training_graph_is_kept_and_reexecution_is_differentiable():
    """With ABFT attached, a training step computes the same gradients, also when a transient fault
    in the first call of a layer is replaced by its re-execution (the graph goes through the retry)."""
    torch.manual_seed(0)
    model = create("dlrm", **CONFIGS["dlrm"])
    batch = inputs("dlrm", 64, 13)
    model(*batch).sum().backward()
    clean = {n: p.grad.clone() for n, p in model.named_parameters()}
    calls = []

    def first_call_fault(module, args, output):
        calls.append(1)
        return output + (1e3 if len(calls) == 1 else 0.0)  # differentiable, only the first time

    for fault in (False, True):
        model.zero_grad()
        abft = ABFT()
        with mitigate(model, abft):
            if fault:
                model.top_mlp[0].register_forward_hook(first_call_fault, prepend=True)
            model(*batch).sum().backward()
        assert abft.stats["recovered"] == abft.stats["detected"] == (64 if fault else 0)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, clean[name], rtol=1e-5, atol=1e-6, msg=name)


def test_reexecution_cannot_finish_at_high_ber():
    """The paper's finding (Sec. 7) as a number: as the activation BER of a layer grows, more of its
    rows stay wrong after max_retries re-executions, and re-execution is bounded all the same."""
    model = make("dlrm")
    batch = inputs("dlrm", 256, 15)
    unrecoverable = []
    for ber in (1e-5, 1e-3, 1e-2):
        abft = ABFT(max_retries=3, tau=2**-20)
        with (
            mitigate(model, abft),
            pytei.inject(model, BitFlip(ber), site="activations", include="top_mlp.0.*", seed=3),
        ):
            model(*batch)
        st = abft.stats["per_layer"]["top_mlp.0"]
        assert st["reexecutions"] <= abft.max_retries * st["calls"]
        assert st["recovered"] + st["unrecoverable"] == st["detected"]
        unrecoverable.append(st["unrecoverable"] / st["checked"])
    assert unrecoverable[0] == 0 < unrecoverable[1] < unrecoverable[2] > 0.9


def test_weight_errors_are_unrecoverable_within_max_retries():
    model = make("dlrm")
    batch = inputs("dlrm", 256, 5)
    abft = ABFT(max_retries=3)
    abft.calibrate(model, [inputs("dlrm", 512, seed) for seed in range(2)])
    snap = snapshot(model)
    with (
        mitigate(model, abft),
        pytei.inject(model, FlipCount(1, bits=[30]), include="top_mlp.0.weight", seed=0),
    ):
        model(*batch)
        model(*batch)
    st = abft.stats["per_layer"]["top_mlp.0"]
    assert st["detected"] > 0 and st["recovered"] == 0 and st["unrecoverable"] == st["detected"]
    assert st["reexecutions"] == 2 * abft.max_retries  # two calls with a detection, 3 re-runs each
    assert abft.stats["detected"] == st["detected"]  # no other layer is blamed
    assert_bit_identical(model, snap)


def test_fallbacks_keep_zero_and_raise():
    model = make("dlrm")
    batch = inputs("dlrm", 128, 6)
    layer = modules(model)["top_mlp.0"]
    seen: dict = {}
    outputs = {}
    for fallback in ("keep", "zero"):
        abft = ABFT(fallback=fallback, max_retries=1)
        with mitigate(model, abft):
            handle = layer.register_forward_hook(record(seen, fallback))
            with pytei.inject(model, FlipCount(1, bits=[30]), include="top_mlp.0.weight", seed=0):
                outputs[fallback] = model(*batch)
            handle.remove()
        assert abft.stats["unrecoverable"] > 0
    with pytei.inject(model, FlipCount(1, bits=[30]), include="top_mlp.0.weight", seed=0):
        corrupted = model(*batch)
    assert same_bits(outputs["keep"], corrupted)  # keep changes nothing
    zeroed = (seen["zero"][1] == 0).all(1)
    assert int(zeroed.sum()) == abft.stats["unrecoverable"] and torch.isfinite(outputs["zero"]).all()
    with (
        pytest.raises(ABFTError, match=r"layer 'top_mlp.0' still fail .* after 2 re-executions"),
        mitigate(model, ABFT(fallback="raise", max_retries=2)),
        pytei.inject(model, FlipCount(1, bits=[30]), include="top_mlp.0.weight", seed=0),
    ):
        model(*batch)
    assert hook_count(model) == 0


@pytest.mark.parametrize("name", ["dummy", "dlrm", "dcn"])
def test_detach_restores_exact_behaviour(name):
    model = make(name)
    batch = inputs(name, 64, 9)
    clean = model(*batch)
    snap = snapshot(model)
    abft = ABFT()
    abft.attach(model)
    taps = sum(len(check.taps) for check in abft._checks.values())  # composite checks read children
    assert hook_count(model) == len(abft.protected(model)) + taps > 0
    assert torch.equal(model(*batch), clean)  # clean rows pass untouched
    with pytest.raises(RuntimeError, match="already attached"):
        abft.attach(model)
    abft.detach()
    assert hook_count(model) == 0 and torch.equal(model(*batch), clean)
    with pytest.raises(RuntimeError, match="boom"), mitigate(model, ABFT()):
        raise RuntimeError("boom")
    assert hook_count(model) == 0
    assert_bit_identical(model, snap)


def corrupt(table: torch.Tensor, row: int, col: int = 3, bit: int = 30) -> None:
    """Flip one bit of ``table[row, col]`` in place (call again to undo)."""
    with torch.no_grad():
        words = table.view(torch.int32)
        words[row, col] ^= 1 << bit


def test_checksums_are_encoded_once_until_refresh():
    """Later attaches reuse the checksums of the first (clean) encoding, so weights corrupted in
    between are caught; refresh() re-encodes from the weights as they are (here: wrongly, corrupted);
    a dtype change re-encodes by itself."""
    model = make("dlrm")
    batch = inputs("dlrm", 64, 14)
    abft = ABFT(max_retries=0)
    abft.attach(model)
    abft.detach()
    corrupt(model.top_mlp[0].weight, 0, col=0)
    try:
        with mitigate(model, abft):
            model(*batch)
        assert abft.stats["per_layer"]["top_mlp.0"]["detected"] > 0
        abft.refresh()
        abft.reset_stats()
        with mitigate(model, abft):
            model(*batch)
        assert abft.stats["detected"] == 0  # checksums of corrupted weights agree with them
    finally:
        corrupt(model.top_mlp[0].weight, 0, col=0)
    model.double()
    with mitigate(model, abft):
        model(*(t.double() if t.is_floating_point() else t for t in batch))
    assert abft.stats["detected"] == 0


def test_embedding_bag_corrupted_rows_are_caught_only_when_read():
    # dummy: one bag of ~10 active rows per sample, read from one table
    model = make("dummy")
    dense, sparse = inputs("dummy", 128, 10)
    read = int(sparse[0].nonzero()[0])
    unread = int((sparse.sum(0) == 0).nonzero()[0])
    bags_reading = int((sparse[:, read] != 0).sum())
    # dlrm: one index per bag, one table per field
    dlrm = make("dlrm")
    d_dense, d_sparse = inputs("dlrm", 128, 11)
    d_read = int(d_sparse[0, 2])
    d_unread = next(i for i in range(100) if i not in set(d_sparse[:, 2].tolist()))
    cases = [
        (model, (dense, sparse), model.embedding, "embedding", read, bags_reading),
        (model, (dense, sparse), model.embedding, "embedding", unread, 0),
        (
            dlrm,
            (d_dense, d_sparse),
            dlrm.embeddings[2],
            "embeddings.2",
            d_read,
            int((d_sparse[:, 2] == d_read).sum()),
        ),
        (dlrm, (d_dense, d_sparse), dlrm.embeddings[2], "embeddings.2", d_unread, 0),
    ]
    for net, batch, table, name, row, expected in cases:
        abft = ABFT(max_retries=1)
        abft.calibrate(net, [batch])
        with mitigate(net, abft):
            corrupt(table.weight, row)
            try:
                net(*batch)
            finally:
                corrupt(table.weight, row)
        st = abft.stats["per_layer"][name]
        assert st["detected"] == st["unrecoverable"] == expected
        assert abft.stats["detected"] == expected  # downstream layers are not blamed


def test_embedding_lookup_of_fm_family_is_checked():
    model = make("dcn")
    (x,) = inputs("dcn", 128, 12)
    abft = ABFT(max_retries=0)
    abft.calibrate(model, [(x,)])
    row = int(x[0, 1]) + 100  # field 1's rows start at 100 in the shared table
    with mitigate(model, abft):
        corrupt(model.embedding.embedding.weight, row, col=0, bit=31)  # a sign flip
        try:
            model(x)
        finally:
            corrupt(model.embedding.embedding.weight, row, col=0, bit=31)
    assert abft.stats["per_layer"]["embedding.embedding"]["detected"] == int((x[:, 1] == x[0, 1]).sum())


class Bag(nn.Module):
    """One EmbeddingBag, called the way ``case`` says: ``forward(idx, offsets, weights)``."""

    def __init__(self, case: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        options = {
            "mean-offsets": {"mode": "mean"},
            "last-offset": {"include_last_offset": True},
            "padding-mean": {"mode": "mean", "padding_idx": 0},
        }.get(case, {})
        self.case, self.bag = case, nn.EmbeddingBag(50, 8, **{"mode": "sum", **options})

    def forward(self, idx: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.case == "2d":
            return self.bag(idx.reshape(10, 6))
        if self.case == "weighted-kwargs":
            return self.bag(input=idx, offsets=offsets, per_sample_weights=weights)
        if self.case == "last-offset":
            return self.bag(idx, torch.cat([offsets, offsets.new_tensor([idx.numel()])]))
        return self.bag(idx, offsets)


@pytest.mark.parametrize(
    "case", ["sum", "mean-offsets", "weighted-kwargs", "last-offset", "padding-mean", "2d"]
)
@pytest.mark.parametrize("calibrated", [False, True])
def test_embedding_bag_variants(case, calibrated):
    """Ten bags of six indices: clean bags pass; a corrupted row fails exactly the bags that read it."""
    net = Bag(case)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50, (60,), generator=gen)
    idx[idx == 7] = 8  # row 7 is never read
    idx[0] = 5  # row 5 is read by the first bag at least
    batch = (idx, torch.arange(0, 60, 6), torch.rand(60, generator=gen) + 0.5)
    abft = ABFT(max_retries=0)
    if calibrated:
        abft.calibrate(net, [batch])
    with mitigate(net, abft):
        net(*batch)
        assert abft.stats["detected"] == 0 and abft.stats["checked"] == 10
        for row in (7, 5):
            abft.reset_stats()
            corrupt(net.bag.weight, row, bit=29)
            try:
                net(*batch)
            finally:
                corrupt(net.bag.weight, row, bit=29)
            assert abft.stats["detected"] == int((idx.reshape(10, 6) == row).any(1).sum())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_precisions(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).to(dtype)
    x = torch.randn(2048, 64, dtype=dtype)
    abft = ABFT(max_retries=0)
    assert abft.measure_false_alarms(net, [(x,)]) == 0  # analytic tolerance of the layer's dtype
    abft.calibrate(net, [(torch.randn(512, 64, dtype=dtype),)])
    assert abft.measure_false_alarms(net, [(x,)]) == 0
    width = {torch.float16: 16, torch.bfloat16: 16, torch.float64: 64}[dtype]
    view = {16: torch.int16, 64: torch.int64}[width]
    with mitigate(net, abft):
        exponent_top = width - 2  # the highest exponent bit of each format

        def hook(module, args, output):
            out = output.clone()
            out.view(view)[:, 0] ^= 1 << exponent_top
            return out

        net[0].register_forward_hook(hook, prepend=True)
        net(x)
    assert abft.stats["per_layer"]["0"]["detected"] == 2048


def test_rows_with_nan_input_are_skipped_not_reexecuted():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8))
    x = torch.randn(32, 16)
    x[3, 5] = float("nan")
    x[4, 0] = float("inf")
    abft = ABFT()
    with mitigate(net, abft):
        net(x)
    st = abft.stats
    assert st["checked"] == 32 and st["skipped"] == 2 and st["detected"] == st["reexecutions"] == 0


def test_stats_and_reset():
    model = make("dlrm")
    abft = ABFT()
    abft.calibrate(model, [inputs("dlrm", 64, 0)])
    clean_rows = abft.stats["clean_checked"]
    assert clean_rows == 64 * (5 + 8) and abft.stats["false_alarms"] == 0
    with mitigate(model, abft):
        model(*inputs("dlrm", 32, 1))
    st = abft.stats
    assert st["layers"] == 13 and st["calls"] == 13 and st["checked"] == 32 * 13
    assert set(st["per_layer"]["top_mlp.0"]) == {
        "calls",
        "checked",
        "detected",
        "reexecutions",
        "recovered",
        "unrecoverable",
        "skipped",
        "clean_checked",
        "false_alarms",
    }
    abft.reset_stats()
    assert abft.stats["checked"] == 0 and abft.stats["clean_checked"] == clean_rows
    for _ in range(2):  # two consecutive uses, each after reset_stats: the same counts, not their sum
        with mitigate(model, abft):
            model(*inputs("dlrm", 32, 1))
        assert abft.stats == st
        abft.reset_stats()


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ABFT fallback 'retry'; allowed: keep, zero, raise"):
        ABFT(fallback="retry")
    with pytest.raises(ValueError, match="max_retries must be an int >= 0"):
        ABFT(max_retries=-1)
    with pytest.raises(ValueError, match="margin must be >= 1"):
        ABFT(margin=0.5)
    with pytest.raises(ValueError, match="tau must be a finite float >= 0"):
        ABFT(tau={"x": math.nan})
    model = make("dlrm")
    with pytest.raises(ValueError, match="no module named"):
        ABFT(layers=["nope"]).attach(model)
    with pytest.raises(ValueError, match="cannot protect 'top_mlp.1': it is a ReLU"):
        ABFT(layers=["top_mlp.1"]).attach(model)
    with pytest.raises(ValueError, match="mode='max' is not linear"):
        ABFT(layers=["0"]).attach(nn.Sequential(nn.EmbeddingBag(5, 2, mode="max")))
    assert hook_count(model) == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda():
    model = make("dlrm").cuda()
    batch = tuple(t.cuda() for t in inputs("dlrm", 1024, 0))
    abft = ABFT()
    abft.calibrate(model, [tuple(t.cuda() for t in inputs("dlrm", 1024, s)) for s in (1, 2)])
    assert abft.measure_false_alarms(model, [batch]) == 0
    with (
        mitigate(model, abft),
        pytei.inject(model, FlipCount(1, bits=[30]), include="top_mlp.0.weight", seed=0),
    ):
        model(*batch)
    assert abft.stats["unrecoverable"] > 0 and hook_count(model) == 0


def test_calibrate_takes_tensors_of_a_one_input_model():
    model = create("wd", field_dims=[20, 30]).eval()
    gen = torch.Generator().manual_seed(0)
    tensors = [
        torch.stack([torch.randint(0, d, (64,), generator=gen) for d in (20, 30)], 1) for _ in range(2)
    ]
    tau = ABFT().calibrate(model, tensors)
    assert tau == ABFT().calibrate(model, [(x,) for x in tensors]) and set(tau) >= {"mlp.0", "mlp.4", "mlp.8"}
    with pytest.raises(TypeError, match="ABFT.calibrate: batch 0 is a str"):
        ABFT().calibrate(model, ["x"])
