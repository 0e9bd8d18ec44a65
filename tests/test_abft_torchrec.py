"""ABFT on TorchRec: quantized-row checksums of quantized EmbeddingBagCollections (Li et al. 2022), the
float collection covered through its nn.EmbeddingBags, cross networks refused with their reason."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import pytei
from pytei import FlipCount
from pytei.mitigation import mitigate
from pytei.mitigation.abft import ABFT, _analytic_tau
from pytei.mitigation.checksums import check_class, make_check, uncheckable

pytest.importorskip("torchrec")
warnings.filterwarnings("ignore", module="torchrec")
#: torchrec's quantize_embeddings goes through torch.ao's quantize_dynamic (deprecated, not ours to fix).
pytestmark = pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")

from torchrec.inference.modules import quantize_embeddings  # noqa: E402
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from conftest import assert_bit_identical, snapshot  # noqa: E402
from pytei.mitigation._torchrec_checks import QuantBagCheck  # noqa: E402
from pytei.torchrec import tables  # noqa: E402
from pytei.torchrec.quantize import quantize  # noqa: E402

FIELD_DIMS, DENSE_DIM, EMBED_DIM = [40, 60, 30, 50], 13, 16
KEYS = [f"cat_{i}" for i in range(len(FIELD_DIMS))]
EBC = "sparse_arch.embedding_bag_collection"
TABLES = f"{EBC}.embedding_bags.*"
DTYPES = ("int8", "int4", "int2", "fp16")


@functools.cache
def float_model() -> nn.Module:
    """dlrm-torchrec with rows of different spreads (so that per-row scales and biases differ)."""
    torch.manual_seed(0)
    model = pytei.models.create("dlrm-torchrec", field_dims=FIELD_DIMS, dense_dim=DENSE_DIM)
    bags: Any = model.get_submodule(f"{EBC}.embedding_bags")
    with torch.no_grad():
        for table in bags.values():
            table.weight.mul_(torch.logspace(-2, 1, table.weight.shape[0]).unsqueeze(1))
            table.weight.add_(torch.linspace(-0.5, 0.5, table.weight.shape[0]).unsqueeze(1))
    return model.eval().requires_grad_(False)


@functools.cache
def quantized(dtype: str) -> nn.Module:
    return quantize(float_model(), dtype).requires_grad_(False)


def kjt(batch: int, seed: int, max_len: int = 4) -> KeyedJaggedTensor:
    """Multi-hot bags of 0..max_len ids (empty bags included), key-major like every KJT."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (len(KEYS) * batch,), generator=g)
    rows = torch.tensor(FIELD_DIMS).repeat_interleave(batch).repeat_interleave(lengths)
    values = (torch.rand(int(lengths.sum()), generator=g) * rows).long()
    return KeyedJaggedTensor.from_lengths_sync(keys=KEYS, values=values, lengths=lengths)


def inputs(batch: int, seed: int) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    g = torch.Generator().manual_seed(seed + 10_000)
    return torch.randn(batch, DENSE_DIM, generator=g), kjt(batch, seed)


def bag_sums(values: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """Feature-major ``[F * B]`` row sums (float64) of each feature's slice of ``[B, sum D]``."""
    return torch.stack([s.double().sum(1) for s in values.split(dims, dim=1)]).reshape(-1)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------------------- registry


def test_checks_sit_on_the_quantized_collection_and_on_the_float_collections_bags():
    q = quantized("int8")
    ebc = q.get_submodule(EBC)
    assert check_class(ebc) is QuantBagCheck and uncheckable(ebc) is None
    assert QuantBagCheck.covers_descendants  # its tables' buffers are its own
    protected = ABFT().protected(q)
    assert EBC in protected and not any(n.startswith(f"{EBC}.") for n in protected)
    # the float collection calls its nn.EmbeddingBags as modules: BagCheck covers them, no check of its own
    f = float_model()
    assert "no registered ABFT check" in (uncheckable(f.get_submodule(EBC)) or "")
    checked = [n for n in ABFT().protected(f) if n.startswith(f"{EBC}.embedding_bags.")]
    assert len(checked) == len(FIELD_DIMS)
    abft = ABFT(max_retries=0)
    x = inputs(128, 3)
    clean = f(*x)
    name = f"{EBC}.embedding_bags.t_cat_0"
    with mitigate(f, abft):
        assert torch.equal(f(*x), clean) and abft.stats["detected"] == 0
        with pytei.inject(f, FlipCount(1, bits=[30]), include=f"{name}.weight", seed=0) as report:
            f(*x)
    row = int(report.fault_map.faults[f"{name}.weight"].index[0]) // EMBED_DIM
    bags = x[1]["cat_0"]
    reading = torch.repeat_interleave(torch.arange(128), bags.lengths())[bags.values() == row].unique()
    assert reading.numel() > 0
    assert abft.stats["per_layer"][name]["detected"] == reading.numel()


def test_torchrec_cross_networks_are_unchecked_with_the_reason():
    torch.manual_seed(0)
    model = pytei.models.create("dcnv2", field_dims=FIELD_DIMS).eval()
    names = {type(m).__name__: n for n, m in model.named_modules()}
    crossnet = model.get_submodule(names["LowRankCrossNet"])
    reason = uncheckable(crossnet)
    assert reason is not None and "x_0 and x_L" in reason and "re-running" in reason
    assert names["LowRankCrossNet"] not in ABFT().protected(model)
    with pytest.raises(ValueError, match="cannot check this LowRankCrossNet"):
        make_check(crossnet)


# ------------------------------------------------------------------------------------ clean runs


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_false_alarm_on_clean_batches_analytic_and_calibrated(dtype):
    q = quantized(dtype)
    big = [inputs(2048, 100 + s) for s in range(3)]
    small = [inputs(8, 200 + s) for s in range(20)]
    analytic = ABFT()
    assert analytic.measure_false_alarms(q, big) == 0
    assert analytic.stats["per_layer"][EBC]["clean_checked"] == 3 * 2048 * len(FIELD_DIMS)
    assert analytic.measure_false_alarms(q, small) == 0
    calibrated = ABFT()
    tau = calibrated.calibrate(q, [inputs(1024, s) for s in range(2)])
    assert EBC in tau and calibrated.stats["false_alarms"] == 0
    assert calibrated.measure_false_alarms(q, big) == 0
    assert calibrated.measure_false_alarms(q, small) == 0
    assert hook_count(q) == 0


class Tower(nn.Module):
    """A collection with a table shared by two features, unequal dims, a MEAN table, optional weights."""

    def __init__(self, weighted: bool) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name="t0", embedding_dim=8, num_embeddings=200, feature_names=["f0", "f2"]
                ),
                EmbeddingBagConfig(
                    name="t1",
                    embedding_dim=16,
                    num_embeddings=60,
                    feature_names=["f1"],
                    pooling=PoolingType.MEAN,
                ),
                EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=30, feature_names=["f3"]),
            ],
            is_weighted=weighted,
            device=torch.device("cpu"),
        )

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.ebc(features).values()


def tower_kjt(batch: int, seed: int, weighted: bool) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (4 * batch,), generator=g)
    rows = torch.tensor([200, 60, 200, 30]).repeat_interleave(batch).repeat_interleave(lengths)
    values = (torch.rand(int(lengths.sum()), generator=g) * rows).long()
    weights = torch.rand(values.numel(), generator=g) * 2 - 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1", "f2", "f3"], values=values, lengths=lengths, weights=weights
    )


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.qint8, torch.quint4x2, torch.float16])
def test_shared_tables_unequal_dims_mean_pooling_weights_and_odd_ids(dtype, weighted):
    torch.manual_seed(0)
    q = quantize_embeddings(Tower(weighted), dtype=dtype, inplace=False)
    ebc = q.ebc
    check = make_check(ebc)
    assert check.features == ["f0", "f2", "f3", "f1"]  # the collection's order: SUM tables, then MEAN
    abft = ABFT(max_retries=0)
    batches = [(tower_kjt(512, s, weighted),) for s in range(3)]
    odd = tower_kjt(4, 9, weighted)
    odd.values()[:3] = torch.tensor([-1, 10**6, -7])  # pruned id, out of range (FBGEMM reads row 0)
    assert abft.measure_false_alarms(q, [*batches, (odd,)]) == 0
    clean = q(batches[0][0])
    t1 = next(t for t in tables(q) if t.table == "t1")
    field = "codes" if dtype == torch.float16 else "scale"
    bit = 14 if dtype == torch.float16 else 13
    error = FlipCount(1, bits=[bit])
    with (
        mitigate(q, abft),
        pytei.inject(q, error, include="ebc.embedding_bags.t1*", fields=[field], seed=1) as r,
    ):
        faulty = q(batches[0][0])
    (idx,) = [f.index for f in r.fault_map.faults.values()]
    row = int(idx[0]) // (1 if field == "scale" else t1.dim)
    assert not torch.equal(faulty, clean)
    f1 = batches[0][0]["f1"]
    bags = torch.repeat_interleave(torch.arange(f1.lengths().numel()), f1.lengths())
    reading = int(torch.unique(bags[f1.values() == row]).numel())
    assert abft.stats["per_layer"]["ebc"]["detected"] == reading > 0


# ------------------------------------------------------------------------------------ detection


CASES = [(d, f) for d in ("int8", "int4", "int2") for f in ("codes", "scale", "bias")] + [("fp16", "codes")]


@pytest.mark.parametrize(("dtype", "field"), CASES)
def test_a_flip_is_caught_when_it_changes_a_bags_sum_by_more_than_the_threshold(dtype, field):
    """Per bag: flagged iff ``|r| > tau * m``; every bag whose row sum moved by ``|d| > tau * m +
    |r_clean|`` is flagged, and no bag whose sum did not move is."""
    q = quantized(dtype)
    ebc = q.get_submodule(EBC)
    check = make_check(ebc)
    x = kjt(256, 7)
    dims = check.dims
    clean_out = ebc(x)
    r_clean, m = check.residual((x,), {}, clean_out)
    tau = _analytic_tau(check.terms((x,), {}), torch.float32)
    assert bool((r_clean.abs() <= tau * m).all())
    clean_sums = bag_sums(clean_out.values(), dims)
    width = {"codes": 8 if dtype.startswith("int") else 16, "scale": 16, "bias": 16}[field]
    caught = moved = 0
    for bit in range(width):
        for seed in range(2):
            with pytei.inject(q, FlipCount(1, bits=[bit]), include=TABLES, fields=[field], seed=seed):
                out = ebc(x)
                r, m_faulty = check.residual((x,), {}, out)
            assert torch.equal(m_faulty, m)  # m comes from the clean checksums
            flagged = ~(r.abs() <= tau * m)
            d = bag_sums(out.values(), dims) - clean_sums
            must = d.abs() > (tau * m + r_clean.abs()).double() * (1 + 1e-3)
            assert bool(flagged[must].all()), f"bit {bit} seed {seed}: a bag above the threshold passed"
            assert not bool(flagged[d == 0].any()), f"bit {bit} seed {seed}: an unchanged bag was flagged"
            caught += int(flagged.any())
            moved += int(must.any())
    assert caught >= moved and moved >= width  # most flips of rows the batch reads are caught


def test_recovery_with_fallback_zero_zeroes_exactly_the_affected_samples():
    q = quantized("int8")
    ebc = q.get_submodule(EBC)
    x = inputs(256, 11)
    features = x[1]
    clean = ebc(features).values().clone()
    abft = ABFT(max_retries=1, fallback="zero")
    seen: dict[str, torch.Tensor] = {}
    with mitigate(q, abft):
        handle = ebc.register_forward_hook(
            lambda mod, args, out: seen.__setitem__("out", out.values().clone())
        )
        try:
            with pytei.inject(q, FlipCount(1, bits=[14]), include=TABLES, fields=["scale"], seed=4) as report:
                q(*x)
        finally:
            handle.remove()
    ((site, faults),) = report.fault_map.faults.items()
    row = int(faults.index[0])
    table = site.removeprefix(f"{EBC}.embedding_bags.").removesuffix(".weight_qscale")
    feature = table.removeprefix("t_")
    f = features[feature]
    samples = torch.repeat_interleave(torch.arange(f.lengths().numel()), f.lengths())
    hit = torch.zeros(clean.shape[0], dtype=torch.bool)
    hit[samples[f.values() == row]] = True
    assert hit.any(), "the flipped row must be read by the batch"
    out = seen["out"]
    zeroed = (out == 0).all(1)
    assert torch.equal(zeroed, hit)
    assert torch.equal(out[~hit], clean[~hit])
    st = abft.stats["per_layer"][EBC]
    assert st["detected"] == st["unrecoverable"] == int(hit.sum()) and st["reexecutions"] == 1


# ---------------------------------------------------------------------------------- transparency


def test_mitigated_quantized_dlrm_is_bit_identical_on_clean_data_and_detach_restores_it():
    q = quantized("int8")
    x = inputs(512, 21)
    clean = q(*x)
    snap = snapshot(q)
    analytic = ABFT()
    with mitigate(q, analytic):
        assert torch.equal(q(*x), clean)
        st = analytic.stats["per_layer"][EBC]
        assert st["checked"] == 512 * len(FIELD_DIMS) and st["detected"] == 0
    assert hook_count(q) == 0 and torch.equal(q(*x), clean)
    calibrated = ABFT()
    calibrated.calibrate(q, [inputs(512, 30)])
    with mitigate(q, calibrated):
        assert torch.equal(q(*x), clean)
    assert hook_count(q) == 0 and torch.equal(q(*x), clean)
    assert_bit_identical(q, snap)
    # the checksums were encoded once per collection and are reused (no re-encode on re-attach)
    abft = ABFT()
    abft.attach(q)
    first = abft._checks[q.get_submodule(EBC)]
    abft.detach()
    abft.attach(q)
    assert abft._checks[q.get_submodule(EBC)] is first and not first.stale(q.get_submodule(EBC))
    abft.detach()
