"""Injection and bit-exact restore: in place, O(faults), safe under exceptions and Ctrl-C."""

import os
import signal

import pytest
import torch
from torch import nn

import pytei
from conftest import assert_bit_identical, snapshot
from pytei import BitFlip, FaultMap, FlipCount, RandomValue, StuckAt
from pytei.bits import int_view
from pytei.injector import Injector, _Storage


def run(model):
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    idx = torch.randint(0, 500, (4, 3), generator=torch.Generator().manual_seed(0))
    return model(x, idx)


def test_inject_changes_then_restores_exactly(tiny):
    snap = snapshot(tiny)
    clean = run(tiny)
    with pytei.inject(tiny, BitFlip(1e-2), target="mlp", params="weight", seed=0) as report:
        assert report.n_faults > 0
        assert not torch.equal(run(tiny), clean)
        assert set(report.per_parameter) == {
            "bottom.0.weight",
            "bottom.1.weight",
            "top.0.weight",
            "top.2.weight",
        }
        assert sum(report.per_field.values()) == report.n_faults
        assert report.per_component == {"mlp": report.n_faults}
    assert_bit_identical(tiny, snap)
    assert torch.equal(run(tiny), clean)


def test_parameters_keep_their_identity(tiny):
    before = {n: (p, p.data_ptr()) for n, p in tiny.named_parameters()}
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1)
    with pytei.inject(tiny, BitFlip(1e-2), seed=1):
        for n, p in tiny.named_parameters():
            assert p is before[n][0] and p.data_ptr() == before[n][1]
    assert opt.param_groups[0]["params"][0] is tiny.emb.weight


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_restore_after_exception_in_block(tiny, exc):
    snap = snapshot(tiny)
    with pytest.raises(exc), pytei.inject(tiny, BitFlip(0.05), seed=2):
        raise exc()
    assert_bit_identical(tiny, snap)


def test_ctrl_c_during_injection_leaves_model_clean(tiny):
    snap = snapshot(tiny)
    original = _Storage.write
    calls = []

    def write_then_interrupt(self, index, values):
        original(self, index, values)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives half-way through the trial

    _Storage.write = write_then_interrupt
    try:
        with pytest.raises(KeyboardInterrupt), pytei.inject(tiny, BitFlip(0.05), seed=3):
            pytest.fail("the block must not run: the interrupt is raised once faults are in")
    finally:
        _Storage.write = original
    assert_bit_identical(tiny, snap)


def test_failure_while_applying_rolls_back(tiny):
    snap = snapshot(tiny)
    original = _Storage.write
    calls = []

    def flaky(self, index, values):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        original(self, index, values)

    _Storage.write = flaky
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            Injector(BitFlip(0.05), seed=4).apply(tiny)
    finally:
        _Storage.write = original
    assert_bit_identical(tiny, snap)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
    ],
)
@pytest.mark.parametrize("error", [BitFlip(0.3), StuckAt(0.2, 1), RandomValue(0.5, 0, 3), FlipCount(100)])
def test_every_dtype_and_error_model_restores(dtype, error):
    m = nn.Module()
    m.w = nn.Parameter(torch.randint(-100, 100, (64, 33)).to(dtype), requires_grad=dtype.is_floating_point)
    snap = snapshot(m)
    with pytei.inject(m, error, seed=5) as report:
        assert report.n_faults > 0
        assert not torch.equal(int_view(m.w.detach()), snap["w"])
    assert_bit_identical(m, snap)


def test_non_contiguous_parameter():
    m = nn.Module()
    base = torch.randn(50, 40)
    m.w = nn.Parameter(base.t())  # a transposed, non-contiguous view
    assert not m.w.is_contiguous()
    snap = snapshot(m)
    expected = -base.t().clone()  # the Parameter shares base's storage, so copy before injecting
    with pytei.inject(m, BitFlip(1.0, bits=[31]), seed=0):
        assert torch.equal(m.w.detach(), expected)  # every sign flipped, in the right places
    assert_bit_identical(m, snap)


def test_seed_reproducibility_and_nesting(tiny):
    with pytei.inject(tiny, BitFlip(1e-2), seed=9) as a:
        pass
    with pytei.inject(tiny, BitFlip(1e-2), seed=9) as b:
        pass
    with pytei.inject(tiny, BitFlip(1e-2), seed=10) as c:
        pass
    with pytei.inject(tiny, BitFlip(1e-2), target="mlp", seed=9) as sub:
        pass
    assert a.per_parameter == b.per_parameter and a.per_parameter != c.per_parameter
    for name, f in sub.fault_map.faults.items():  # same seed: the MLP faults are those of "all"
        assert torch.equal(f.index, a.fault_map.faults[name].index)
        assert torch.equal(f.mask, a.fault_map.faults[name].mask)


def test_seed_none_is_recorded_and_replayable(tiny):
    with pytei.inject(tiny, BitFlip(1e-2)) as a:
        pass
    with pytei.inject(tiny, BitFlip(1e-2), seed=a.seed) as b:
        pass
    assert isinstance(a.seed, int) and a.per_parameter == b.per_parameter


def test_fault_map_save_load_replay(tiny, tmp_path):
    snap = snapshot(tiny)
    with pytei.inject(tiny, StuckAt(0.01, 1), seed=11) as report:
        corrupted = snapshot(tiny)
    path = tmp_path / "trial.safetensors"
    report.fault_map.save(path)
    loaded = FaultMap.load(path)
    assert loaded.meta["seed"] == 11 and loaded.meta["error"]["model"] == "StuckAt"
    with pytei.inject(tiny, loaded) as replay:
        assert_bit_identical(tiny, corrupted)
        assert replay.n_faults == report.n_faults
    assert_bit_identical(tiny, snap)


def test_fault_map_errors(tiny, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a pytei fault map"):
        FaultMap.load(bad)
    with pytest.raises(FileNotFoundError, match="no fault map at"):
        FaultMap.load(tmp_path / "missing.safetensors")
    with pytei.inject(tiny, BitFlip(0.01), seed=0) as report:
        pass
    with pytest.raises(ValueError, match="outside the selection"):
        pytei.inject(tiny, report.fault_map, target="embedding").__enter__()


def test_injector_non_context_form(tiny):
    snap = snapshot(tiny)
    inj = pytei.Injector(BitFlip(1e-2), target="embedding", seed=0)
    report = inj.apply(tiny)
    assert inj.active and report.n_faults > 0 and set(report.per_parameter) == {"emb.weight"}
    with pytest.raises(RuntimeError, match="already applied"):
        inj.apply(tiny)
    inj.restore()
    assert not inj.active
    assert_bit_identical(tiny, snap)


def test_bad_arguments(tiny):
    with pytest.raises(TypeError, match="must be a pytei ErrorModel"):
        pytei.Injector(1e-3)
    with pytest.raises(TypeError, match="seed must be an int"):
        pytei.Injector(BitFlip(1e-3), seed="0")


def test_report_counts_agree(tiny):
    with pytei.inject(tiny, BitFlip(0.02, bits=[23, 24, 30, 31]), seed=12) as r:
        pass
    assert r.per_field["mantissa"] == 0 and r.per_field["sign"] > 0 and r.per_field["exponent"] > 0
    assert r.n_faults == sum(r.per_parameter.values()) == sum(r.per_field.values())
    assert int(r.per_bit("emb.weight")[[23, 24, 30, 31]].sum()) == r.per_parameter["emb.weight"]
    assert r.targeted_bits == 32 * r.targeted_values


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(tiny):
    gpu = type(tiny)().cuda().eval()
    snap = snapshot(gpu)
    with (
        pytei.inject(tiny, BitFlip(1e-2), seed=13) as cpu_r,
        pytei.inject(gpu, BitFlip(1e-2), seed=13) as gpu_r,
    ):
        for (n, p), q in zip(tiny.named_parameters(), gpu.parameters(), strict=True):
            assert torch.equal(int_view(p.detach()), int_view(q.detach()).cpu()), n
    assert cpu_r.per_parameter == gpu_r.per_parameter
    assert_bit_identical(gpu, snap)


def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_activation_errors_are_fresh_each_pass_and_removed(tiny):
    snap = snapshot(tiny)
    clean = run(tiny)
    with pytei.inject(tiny, BitFlip(0.01), site="activations", target="mlp", seed=0) as report:
        first, second = run(tiny), run(tiny)
        assert not torch.equal(first, clean) and not torch.equal(first, second)
        assert report.passes == 2 * 4 and report.n_faults == sum(report.per_activation.values()) > 0
        assert set(report.per_activation) == {"bottom.0", "bottom.1", "top.0", "top.2"}
        assert sum(report.per_field.values()) == report.n_faults
        assert_bit_identical(tiny, snap)  # weights are never touched
    assert _hooks(tiny) == 0 and torch.equal(run(tiny), clean)
    with pytei.inject(tiny, BitFlip(0.01), site="activations", target="mlp", seed=0):
        assert torch.equal(run(tiny), first) and torch.equal(run(tiny), second)  # reproducible sequence


def test_activation_faults_precede_other_hooks(tiny):
    seen = []
    tiny.top[2].register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    with pytei.inject(tiny, BitFlip(1.0, bits=[31]), site="activations", include="top.2.*", seed=0):
        out = run(tiny)
    assert torch.equal(seen[-1].squeeze(1), out)  # a later hook (e.g. a check) sees the corrupted output


class DropExponentFaults(pytei.Protection):
    """Test protection: exponent bits of float32 are immune."""

    def filter(self, faults, words, error, seed):
        self._blocked = 0
        out = []
        for f in faults:
            mask = f.mask & ~(0xFF << 23)
            self._blocked += int((mask != f.mask).sum())
            out.append(pytei.Faults(f.index, mask).nonzero())
        return out

    @property
    def stats(self):
        return {"words_changed_by_protection": self._blocked}


def test_protection_filters_the_same_draws(tiny):
    with pytei.inject(tiny, BitFlip(0.05), seed=1) as raw:
        pass
    with pytei.inject(tiny, BitFlip(0.05), seed=1, protect=DropExponentFaults()) as prot:
        pass
    assert prot.per_field.get("exponent", 0) == 0
    assert prot.per_field["mantissa"] == raw.per_field["mantissa"]  # same draws, exponent hits removed
    assert prot.protection["words_changed_by_protection"] > 0
    with pytest.raises(ValueError, match="needs site='weights'"):
        pytei.Injector(BitFlip(0.1), site="activations", protect=DropExponentFaults())
    with pytest.raises(ValueError, match="unknown site 'memory'"):
        pytei.Injector(BitFlip(0.1), site="memory")


def test_parameter_digest_sees_one_flipped_bit_and_the_restore(tiny):
    from pytei.injector import parameter_digest

    tiny.scale = nn.Parameter(torch.tensor(0.5))  # a 0-dim parameter is hashed too
    clean = parameter_digest(tiny)
    assert clean == parameter_digest(tiny) and len(clean) == 64
    with pytei.inject(tiny, FlipCount(1), include="scale", seed=0):
        assert parameter_digest(tiny) != clean
    assert parameter_digest(tiny) == clean
    with pytei.inject(tiny, FlipCount(1), include="emb.weight", seed=0):
        assert parameter_digest(tiny) != clean
    assert parameter_digest(tiny) == clean


def test_report_repr_is_short_and_names_the_totals(tiny):
    with pytei.inject(tiny, BitFlip(0.05), seed=3) as report:
        pass
    text = repr(report)
    assert text == str(report) and "\n" not in text and len(text) < 300
    assert "tensor(" not in text  # no fault tensor is dumped
    hit = {n: c for n, c in report.per_parameter.items() if c}
    assert len(hit) > 3  # so the repr has to leave some out
    top = max(hit, key=hit.get)
    assert text.startswith("InjectionReport(site='weights', seed=3, error=BitFlip(ber=0.05), ")
    assert (
        f"n_faults={report.n_faults}" in text
        and f"tensors_hit={len(hit)}/{len(report.per_parameter)}" in text
    )
    assert f"{top!r}: {hit[top]}" in text and f"+{len(hit) - 3} more" in text
    with pytei.inject(tiny, BitFlip(0.05), target="mlp", site="activations", seed=3) as live:
        run(tiny)
    assert f"n_faults={live.n_faults}" in repr(live) and "passes=" in repr(live)


def test_inject_has_the_injector_keywords_and_refuses_others(tiny):
    import inspect

    def keywords(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert keywords(pytei.inject)[2:] == keywords(Injector)[1:]  # same names, keyword-only, defaults
    with (
        pytest.raises(TypeError, match="unexpected keyword argument 'targets'"),
        pytei.inject(tiny, BitFlip(1e-3), targets="mlp"),
    ):
        pass
    with pytest.raises(TypeError, match="positional"), pytei.inject(tiny, BitFlip(1e-3), "mlp"):  # type: ignore[misc]
        pass


# --- issue 15: restore order, activation views, aliased storage, fault-map validation ---------------


def test_restore_out_of_order_is_refused_clearly_and_lifo_is_exact(tiny):
    from pytei.exceptions import PyteiError

    snap = snapshot(tiny)
    a, b = Injector(BitFlip(0.05), seed=1), Injector(BitFlip(0.05), seed=2)
    a.apply(tiny)
    b.apply(tiny)
    with pytest.raises(PyteiError, match=r"TinyRec.*restore the later one first") as err:
        a.restore()
    assert "BitFlip(ber=0.05)" in str(err.value) and "seed=2" in str(err.value)
    assert a.active  # refused: nothing was written
    b.restore()
    a.restore()
    assert_bit_identical(tiny, snap)


def test_weights_and_activation_injectors_restore_in_any_order(tiny):
    snap = snapshot(tiny)
    w, act = Injector(BitFlip(0.05), seed=1), Injector(BitFlip(0.05), site="activations", seed=2)
    w.apply(tiny)
    act.apply(tiny)
    w.restore()
    act.restore()
    assert_bit_identical(tiny, snap) and _hooks(tiny) == 0


class PositionalTable(nn.Module):
    """Returns a view of its own parameter (a frozen positional table)."""

    def __init__(self) -> None:
        super().__init__()
        self.pe = nn.Parameter(torch.randn(1, 16, 8), requires_grad=False)

    def forward(self, n: int) -> torch.Tensor:
        return self.pe[:, :n]


def test_activation_faults_never_write_into_a_parameter_the_output_views():
    m = PositionalTable().eval()
    snap = snapshot(m)
    with torch.no_grad(), pytei.inject(m, BitFlip(0.05), site="activations", seed=0) as report:
        out = m(10)
        assert report.n_faults > 0 and not torch.equal(out, m.pe[:, :10])
        assert_bit_identical(m, snap)
    assert_bit_identical(m, snap)


def _raw(t):
    """The raw bytes of ``t``'s whole storage (what really is in memory)."""
    return torch.tensor(bytearray(t.untyped_storage()), dtype=torch.uint8)


def _bits_changed(before, after):
    return int(((before ^ after).unsqueeze(1) >> torch.arange(8, dtype=torch.uint8) & 1).sum())


def _aliased_models():
    base = torch.randn(40, 8)
    overlap = nn.Module()
    overlap.a = nn.Parameter(base[:30])
    overlap.b = nn.Parameter(base[10:])  # rows 10..29 are shared with a
    expanded = nn.Module()
    expanded.w = nn.Parameter(torch.randn(1, 8).expand(64, 8))  # stride 0: 8 stored words, 512 elements
    mixed = nn.Module()
    store = torch.randn(16, 16)
    mixed.t = nn.Parameter(store.t())
    mixed.row = nn.Parameter(store[3:5])  # overlaps the transposed view
    return {"overlap": (overlap, base), "expanded": (expanded, expanded.w), "mixed": (mixed, store)}


@pytest.mark.parametrize("case", ["overlap", "expanded", "mixed"])
@pytest.mark.parametrize("error", [BitFlip(0.05), FlipCount(40), StuckAt(0.2, 1)])
def test_aliased_storage_counts_the_bits_really_changed_and_restores_exactly(case, error):
    model, store = _aliased_models()[case]
    before = _raw(store)
    with pytei.inject(model, error, seed=3) as report:
        during = _raw(store)
    assert torch.equal(_raw(store), before)  # bit-exact restore
    changed = _bits_changed(before, during)
    assert changed > 0 and report.n_faults == changed == sum(report.per_field.values())
    if isinstance(error, FlipCount):
        assert changed == 40  # k flips over the distinct stored bits
    assert report.targeted_values == before.numel() // 4 or case == "mixed"


def test_aliased_fault_map_replays_exactly(tmp_path):
    model, store = _aliased_models()["overlap"]
    before = _raw(store)
    with pytei.inject(model, BitFlip(0.05), seed=4) as report:
        during = _raw(store)
    report.fault_map.save(tmp_path / "m.safetensors")
    with pytei.inject(model, FaultMap.load(tmp_path / "m.safetensors")) as replay:
        assert torch.equal(_raw(store), during)
    assert replay.n_faults == report.n_faults and torch.equal(_raw(store), before)


def test_tied_weight_gets_each_bit_drawn_once():
    m = nn.Module()
    m.enc, m.dec = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
    m.dec.weight = m.enc.weight  # one Parameter under two names
    before = _raw(m.enc.weight)
    with pytei.inject(m, BitFlip(0.1), seed=5) as report:
        during = _raw(m.enc.weight)
    assert list(report.per_parameter) == ["enc.weight"]
    assert report.n_faults == _bits_changed(before, during) and torch.equal(_raw(m.enc.weight), before)


def _map_file(tmp_path, tensors, header=None, name="m.safetensors"):
    import json

    from safetensors.torch import save_file

    header = header if header is not None else {
        "format": "pytei.faultmap/1",
        "dtypes": {"w": "float32"},
        "numels": {"w": 10},
        "meta": {},
    }
    path = tmp_path / name
    save_file(tensors, str(path), metadata={"pytei": json.dumps(header)})
    return path


def _i64(*values):
    return torch.tensor(values, dtype=torch.int64)


@pytest.mark.parametrize(
    ("tensors", "header", "message"),
    [
        ({"w/index": _i64(-1), "w/mask": _i64(1)}, None, r"w/index.*-1.*\[0, 10\)"),
        ({"w/index": _i64(3, 10), "w/mask": _i64(1, 1)}, None, r"w/index.*10.*\[0, 10\)"),
        ({"w/index": _i64(1, 2, 3), "w/mask": _i64(1)}, None, r"w/mask has 1 entries.*w/index has 3"),
        ({"w/index": _i64(2, 2), "w/mask": _i64(1, 2)}, None, r"w/index.*duplicate.*2"),
        ({"w/index": _i64(3, 1), "w/mask": _i64(1, 2)}, None, r"w/index.*ascending"),
        ({"w/index": _i64(1), "w/mask": _i64(1 << 40)}, None, r"w/mask.*1099511627776.*32-bit"),
        ({"w/index": _i64(1), "w/mask": _i64(0)}, None, r"w/mask.*0"),
        ({"w/index": _i64(1)}, None, r"w/mask is missing"),
        ({"w/index": _i64(1), "w/mask": _i64(1), "v/index": _i64(0), "v/mask": _i64(1)}, None, r"'v'"),
        ({"w/index": torch.tensor([1], dtype=torch.int32), "w/mask": _i64(1)}, None, r"w/index.*int32"),
        ({}, {"format": "pytei.faultmap/1", "dtypes": {"w": "float32"}}, r"header.*'numels'"),
        ({}, {"format": "pytei.faultmap/1", "dtypes": {"w": "float7"}, "numels": {"w": 3}}, r"'float7'"),
        ({}, {"format": "pytei.faultmap/1", "dtypes": {"w": "float32"}, "numels": {"w": -2}}, r"numels.*-2"),
        ({}, {"format": "pytei.faultmap/1", "dtypes": {}, "numels": {"w": 3}}, r"dtypes.*'w'"),
        ({}, ["not", "an", "object"], r"header"),
        ({}, {"format": "pytei.faultmap/1", "dtypes": {"w": "float32"}, "numels": {"w": 3}, "meta": 5},
         r"meta"),
    ],
)
def test_fault_map_load_validates_everything_naming_the_file(tmp_path, tensors, header, message):
    from pytei.faultmap import FaultMapError

    path = _map_file(tmp_path, tensors, header)
    with pytest.raises(FaultMapError, match=message) as err:
        FaultMap.load(path)
    assert str(path) in str(err.value) and isinstance(err.value, ValueError)


def test_fault_map_load_refuses_a_header_that_is_not_json(tmp_path):
    from safetensors.torch import save_file

    from pytei.faultmap import FaultMapError

    path = tmp_path / "h.safetensors"
    save_file({"w/index": _i64(1)}, str(path), metadata={"pytei": "{oops"})
    with pytest.raises(FaultMapError, match=f"{path}.*not a pytei fault map"):
        FaultMap.load(path)
    save_file({"w/index": _i64(1)}, str(path), metadata={"other": "x"})
    with pytest.raises(FaultMapError, match=f"{path}.*no 'pytei' header"):
        FaultMap.load(path)


def test_aliasing_with_different_word_widths_is_refused():
    from pytei.exceptions import ArgumentError

    m = nn.Module()
    m.w = nn.Parameter(torch.randn(8))
    m.raw = nn.Parameter(m.w.detach().view(torch.int16), requires_grad=False)
    with pytest.raises(ArgumentError, match=r"w \(torch.float32\) and raw \(torch.int16\) share stored"):
        pytei.inject(m, BitFlip(0.1), seed=0).__enter__()
