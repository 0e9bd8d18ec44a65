"""Injection into TorchRec and FBGEMM storage: row fields of every format, packed codes, aliases, restore."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import pytei
from pytei.errors import FlipCount
from pytei.exceptions import ArgumentError, MissingExtraError
from pytei.targets import describe, select

torchrec = pytest.importorskip("torchrec")
warnings.filterwarnings("ignore", module="torchrec")

from fbgemm_gpu.split_embedding_configs import SparseType  # noqa: E402
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation  # noqa: E402
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (  # noqa: E402
    IntNBitTableBatchedEmbeddingBagsCodegen,
)
from torchrec.inference.modules import quantize_embeddings  # noqa: E402
from torchrec.modules.embedding_configs import EmbeddingBagConfig  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from pytei.torchrec import row_fields, table_of, tables  # noqa: E402

#: Formats of FBGEMM's inference TBE on CPU (bf16 rows are not supported there: fbgemm 1.8 KeyError).
FORMATS = ("fp32", "fp16", "fp8", "int8", "int4", "int2")
QUANTIZE = {"int8": torch.qint8, "int4": torch.quint4x2, "int2": torch.quint2x4, "fp16": torch.float16}


class Tower(nn.Module):
    """A float EBC of two tables, one read by two features."""

    def __init__(self) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name="t0", embedding_dim=8, num_embeddings=200, feature_names=["f0", "f2"]
                ),
                EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=60, feature_names=["f1"]),
            ],
            device=torch.device("cpu"),
        )

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.ebc(kjt).values()


def _kjt(batch: int = 64, seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 3, (3 * batch,), generator=g)
    rows = torch.tensor([200, 60, 200]).repeat_interleave(batch).repeat_interleave(lengths)
    values = (torch.rand(int(lengths.sum()), generator=g) * rows).long()
    return KeyedJaggedTensor.from_lengths_sync(keys=["f0", "f1", "f2"], values=values, lengths=lengths)


def _tower() -> Tower:
    torch.manual_seed(0)
    return Tower()


def _tbe(fmt: str, rows: int = 50, dim: int = 16) -> IntNBitTableBatchedEmbeddingBagsCodegen:
    torch.manual_seed(0)
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        [
            ("a", rows, dim, SparseType(fmt), EmbeddingLocation.HOST),
            ("b", 7, 8, SparseType(fmt), EmbeddingLocation.HOST),
        ],
        device="cpu",
        output_dtype=SparseType.FP32,
        row_alignment=16,
    )
    tbe.fill_random_weights()
    if fmt in ("fp32", "fp16"):  # random bytes of a float table hold NaNs: give it finite values
        for t in tables(Holder(tbe)):
            values = t.site("codes").tensor
            values.copy_(torch.randn(values.shape, dtype=torch.float32))
    return tbe


class Holder(nn.Module):
    def __init__(self, tbe: nn.Module) -> None:
        super().__init__()
        self.tbe = tbe

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.tbe(indices, offsets)


def _tbe_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 50, (40,), generator=g)
    b = torch.randint(0, 7, (40,), generator=g)
    indices = torch.cat([a, b]).int()
    return indices, torch.arange(0, 81, 1, dtype=torch.int32)


def _bytes(model: nn.Module) -> list[torch.Tensor]:
    return [t.row_bytes.clone() for t in tables(model)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gets_faults_in_its_fields_and_restores_bit_exactly(fmt):
    model = Holder(_tbe(fmt))
    x = _tbe_inputs()
    before, ref = _bytes(model), model(*x)
    found = {t.table: t for t in tables(model)}
    assert set(found) == {"a", "b"} and found["a"].sparse_type == fmt and found["a"].rows == 50
    width = found["a"].row_bytes.shape[1]
    assert width % 16 == 0, "torchrec's alignment: rows padded to 16 bytes"
    assert found["a"].fields == row_fields(fmt, 16, width)
    sites = select(model, "embedding", fields=["codes", "scale", "bias", "padding"])
    names = {s.name for s in sites}
    assert "tbe.a.weight" in names and ("tbe.a.weight_qscale" in names) == fmt.startswith("int")
    # the sites cover every stored byte once, and nothing else of the TBE (weights_host etc.) is a site
    stored = sum(t.row_bytes.numel() for t in tables(model))
    assert sum(s.tensor.numel() * s.tensor.element_size() for s in sites) == stored
    with pytei.inject(
        model, pytei.BitFlip(ber=2e-2), fields=["codes", "scale", "bias", "padding"], seed=3
    ) as r:
        out = model(*x)
        assert r.n_faults > 0 and r.targeted_bits == stored * 8
        assert not torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(before, _bytes(model), strict=True))
    assert torch.equal(model(*x), ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_ber_is_counted_over_the_targeted_fields_and_padding_is_excluded_by_default(fmt):
    model = Holder(_tbe(fmt))
    t = {t.table: t for t in tables(model)}
    default = select(model, "embedding")
    assert all(s.field != "padding" for s in default)
    expected = sum(
        (hi - lo) * x.rows * 8 for x in t.values() for f, (lo, hi) in x.fields.items() if f != "padding"
    )
    with pytei.inject(model, pytei.BitFlip(ber=1e-3), seed=0) as r:
        assert r.targeted_bits == expected
        assert "padding" not in r.per_row_field


def test_padding_flips_are_reported_and_never_change_outputs():
    model = Holder(_tbe("int8"))
    x = _tbe_inputs()
    ref = model(*x)
    with pytei.inject(model, pytei.BitFlip(ber=0.05), fields="padding", seed=1) as r:
        assert r.per_row_field["padding"] == r.n_faults > 0
        assert torch.equal(model(*x), ref)


@pytest.mark.parametrize("fmt,bits", [("int8", 8), ("int4", 4), ("int2", 2)])
def test_packed_code_bits_are_where_the_layout_says(fmt, bits):
    """Byte bit b of a codes byte is bit b % bits of code b // bits, the first code in the low bits."""
    tbe = _tbe(fmt, rows=4, dim=16)
    model = Holder(tbe)
    table = next(t for t in tables(model) if t.table == "a")
    codes = table.site("codes")
    assert codes.layout.fields == {f"code_bit{k}": tuple(range(k, 8, bits)) for k in range(bits)}
    table.site("scale").tensor[0, 0] = scale = 0.25
    table.site("bias").tensor[0, 0] = 0.0
    one = (torch.tensor([0], dtype=torch.int32), torch.tensor([0, 1, 1], dtype=torch.int32))
    for b in range(8):
        ref = model(*one)[0, :16].double()
        codes.tensor[0, 0] ^= 1 << b
        delta = model(*one)[0, :16].double() - ref
        codes.tensor[0, 0] ^= 1 << b
        code = b // bits
        assert torch.count_nonzero(delta) == 1 and delta[code].abs().item() == pytest.approx(
            scale * 2 ** (b % bits), rel=1e-3
        )


def test_per_field_counts_split_packed_code_bits():
    model = Holder(_tbe("int4"))
    with pytei.inject(model, pytei.BitFlip(ber=0.02), fields="codes", seed=5) as r:
        per_field = r.per_field
        assert set(per_field) == {"code_bit0", "code_bit1", "code_bit2", "code_bit3"}
        assert sum(per_field.values()) == r.n_faults


def test_fp8_rows_have_fbgemm_fp8_fields():
    model = Holder(_tbe("fp8"))
    codes = next(t for t in tables(model) if t.table == "a").site("codes")
    assert codes.layout.fields == {"sign": (7,), "exponent": (3, 4, 5, 6), "mantissa": (0, 1, 2)}
    one = (torch.tensor([0], dtype=torch.int32), torch.tensor([0, 1, 1], dtype=torch.int32))
    codes.tensor[0, 0] = 0x38  # e4m3 with bias 7: 1.0
    assert model(*one)[0, 0].item() == 1.0
    codes.tensor[0, 0] ^= 0x80  # the sign bit
    assert model(*one)[0, 0].item() == -1.0


@pytest.mark.parametrize("fmt", list(QUANTIZE))
def test_quantized_ebc_tables_are_found_in_their_tbes_and_aliases_are_one_fault_domain(fmt):
    q = quantize_embeddings(_tower(), dtype=QUANTIZE[fmt], inplace=False)
    found = tables(q)
    assert {t.name for t in found} == {"ebc.embedding_bags.t0.weight", "ebc.embedding_bags.t1.weight"}
    assert {t.features for t in found} == {("f0", "f2"), ("f1",)}
    assert all(t.module == "ebc" and t.sparse_type == fmt for t in found)
    # the registered aliases of the same bytes (embedding_bags.*.weight buffers) are no sites of their own
    sites = select(q, buffers=True, fields=["codes", "scale", "bias", "padding"])
    assert sum(s.tensor.numel() * s.tensor.element_size() for s in sites) == sum(
        t.row_bytes.numel() for t in found
    )
    site, field = "ebc.embedding_bags.t0.weight", "codes"
    assert table_of(q, site)[1] == field and table_of(q, site)[0].table == "t0"
    x = _kjt()
    ref = q(x)
    before = _bytes(q)
    with pytei.inject(q, pytei.BitFlip(ber=1e-2), seed=2, buffers=True):
        assert not torch.equal(q(x), ref)
    assert all(torch.equal(a, b) for a, b in zip(before, _bytes(q), strict=True))
    assert torch.equal(q(x), ref)


def test_register_tbes_and_split_scale_bias_aliases_are_deduplicated():
    """With ``register_tbes`` (``tbes.0`` in named_modules) and split scale/bias buffers, the same bytes show
    under four names; flips over several seeds are a Binomial over the unique bits."""
    from torchrec.quant.embedding_modules import (
        MODULE_ATTR_QUANT_STATE_DICT_SPLIT_SCALE_BIAS,
        MODULE_ATTR_REGISTER_TBES_BOOL,
    )

    float_model = _tower()
    setattr(float_model.ebc, MODULE_ATTR_REGISTER_TBES_BOOL, True)
    setattr(float_model.ebc, MODULE_ATTR_QUANT_STATE_DICT_SPLIT_SCALE_BIAS, True)
    q = quantize_embeddings(float_model, dtype=torch.qint8, inplace=False)
    assert any(n.startswith("ebc.tbes.") for n, _ in q.named_modules())
    assert any(n.endswith("weight_qscale") for n, _ in q.named_buffers())
    unique_bits = sum(
        (hi - lo) * t.rows * 8 for t in tables(q) for f, (lo, hi) in t.fields.items() if f != "padding"
    )
    ber, seeds = 2e-3, 40
    total = 0
    for seed in range(seeds):
        with pytei.inject(q, pytei.BitFlip(ber=ber), buffers=True, seed=seed) as r:
            assert r.targeted_bits == unique_bits
            total += r.n_faults
    mean, sd = seeds * unique_bits * ber, math.sqrt(seeds * unique_bits * ber * (1 - ber))
    assert abs(total - mean) < 5 * sd, (total, mean, sd)


def test_tied_parameters_of_a_plain_model_are_drawn_once():
    """Two Parameters over one storage (a tied table) are one fault domain: Binomial over the unique bits."""
    model = nn.Module()
    model.a = nn.EmbeddingBag(500, 8)
    model.b = nn.EmbeddingBag(500, 8)
    model.b.weight = nn.Parameter(model.a.weight.data)  # same storage, a different Parameter object
    assert len(list(model.named_parameters())) == 2
    bits, ber, seeds = 500 * 8 * 32, 1e-3, 30
    total = 0
    for seed in range(seeds):
        with pytei.inject(model, pytei.BitFlip(ber=ber), seed=seed) as r:
            assert r.targeted_bits == bits
            total += r.n_faults
    mean, sd = seeds * bits * ber, math.sqrt(seeds * bits * ber * (1 - ber))
    assert abs(total - mean) < 5 * sd


def test_same_seed_same_faults_where_fields_coincide():
    """Float values of one dtype and shape (float EBC vs an fp32 TBE under the same name), and the scale/bias
    of int8/int4/int2 versions of one table, get identical faults from one seed."""
    tower = _tower()
    holder = nn.Module()
    holder.ebc = nn.Module()
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        [
            ("t0", 200, 8, SparseType.FP32, EmbeddingLocation.HOST),
            ("t1", 60, 16, SparseType.FP32, EmbeddingLocation.HOST),
        ],
        device="cpu",
        row_alignment=16,
    )
    tbe.initialize_weights()
    holder.ebc.embedding_bags = tbe
    for t, w in zip(tables(holder), tower.ebc.embedding_bags.values(), strict=True):
        t.row_bytes.view(torch.float32).copy_(w.weight.detach())
    error = pytei.BitFlip(ber=1e-3)
    with pytei.inject(tower, error, seed=9) as a:
        fa = a.fault_map.faults
    with pytei.inject(holder, error, seed=9) as b:
        fb = b.fault_map.faults
    assert set(fa) == set(fb) and fa
    for name in fa:
        assert torch.equal(fa[name].index, fb[name].index) and torch.equal(fa[name].mask, fb[name].mask)
    maps = []
    for fmt in ("int8", "int4", "int2"):
        q = quantize_embeddings(_tower(), dtype=QUANTIZE[fmt], inplace=False)
        with pytei.inject(q, error, seed=9, fields=["scale", "bias"]) as r:
            maps.append({n: (f.index.clone(), f.mask.clone()) for n, f in r.fault_map.faults.items()})
    assert maps[0] and all(m.keys() == maps[0].keys() for m in maps)
    for m in maps[1:]:
        assert all(torch.equal(m[n][0], maps[0][n][0]) and torch.equal(m[n][1], maps[0][n][1]) for n in m)


def test_flip_count_hits_exactly_k_bits_over_quantized_rows():
    q = quantize_embeddings(_tower(), dtype=torch.quint4x2, inplace=False)
    with pytei.inject(q, FlipCount(k=17), seed=0) as r:
        assert r.n_faults == 17


def test_describe_lists_table_fields_with_their_formats():
    q = quantize_embeddings(_tower(), dtype=torch.quint4x2, inplace=False)
    rows = {r.name: r for r in describe(q)}
    assert rows["ebc.embedding_bags.t0.weight"].dtype == "int4"
    assert rows["ebc.embedding_bags.t0.weight_qscale"].field == "scale"
    assert "ebc.embedding_bags.t0.weight_padding" in rows


def test_bad_fields_name_the_value_and_what_is_allowed():
    q = quantize_embeddings(_tower(), dtype=torch.qint8, inplace=False)
    with pytest.raises(
        ArgumentError, match=r"unknown field 'exponent'; allowed: codes, scale, bias, padding"
    ):
        select(q, fields=["exponent"])
    with pytest.raises(ArgumentError, match=r"its tables have fields \['codes'\]"):
        select(_tower(), fields=["scale"])


def test_import_pytei_does_not_import_torchrec():
    code = "import sys, pytei, pytei.torchrec; assert not {'torchrec', 'fbgemm_gpu'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_extra_is_a_clear_error(monkeypatch):
    import importlib

    from pytei.torchrec import _require

    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name == "torchrec":
            raise ModuleNotFoundError("No module named 'torchrec'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(_require.importlib, "import_module", fake)
    with pytest.raises(MissingExtraError, match=r"; missing: torchrec; install: pip install"):
        _require.require()


def test_ecc_protects_a_quantized_table_as_stored_rows():
    """Under ECC a table is one site over its row bytes: a 64-bit word holds a row's scale, bias, codes and
    padding; single-bit faults per word are corrected, fields= is refused, and restore is bit-exact."""
    from pytei.mitigation.ecc import ECC

    q = quantize_embeddings(_tower(), dtype=torch.qint8, inplace=False)
    x = _kjt()
    ref, before = q(x), _bytes(q)
    sites = pytei.Injector(pytei.BitFlip(ber=1e-4), protect=ECC()).sites(q)
    assert {s.name for s in sites} == {
        "ebc.embedding_bags.t0.weight_rows",
        "ebc.embedding_bags.t1.weight_rows",
    }
    assert sum(s.tensor.numel() for s in sites) == sum(t.row_bytes.numel() for t in tables(q))
    # at most one flip per 64-bit word: every one corrected, the outputs exact
    with pytei.inject(q, FlipCount(k=1), protect=ECC(), seed=0) as r:
        assert torch.equal(q(x), ref) and r.protection["corrected"] == 1
    with pytei.inject(q, pytei.BitFlip(ber=5e-3), protect=ECC(), seed=1) as r:
        assert r.n_faults > 0 and sum(r.per_row_field.values()) == r.n_faults
        assert set(r.per_row_field) == {"scale", "bias", "codes", "padding"}
    assert all(torch.equal(a, b) for a, b in zip(before, _bytes(q), strict=True))
    with pytest.raises(ArgumentError, match="cannot narrow what ECC protects"):
        pytei.Injector(pytei.BitFlip(ber=1e-4), protect=ECC(), fields=["scale"]).sites(q)


def test_an_extra_that_fails_while_importing_is_named_with_its_error(monkeypatch):
    import importlib

    from pytei.torchrec import _require

    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name == "tensordict":
            raise RuntimeError("Tensor.item() cannot be called on meta tensors")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(_require.importlib, "import_module", fake)
    with pytest.raises(MissingExtraError, match=r"fails to import: tensordict \(RuntimeError: Tensor.item"):
        _require.require()


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "bf16"])
def test_training_tbe_tables_are_sites_with_their_float_dtype(fmt):
    """SplitTableBatchedEmbeddingBagsCodegen (training TBE): its flat ``weights_host`` parameter gives way to
    one site per table; bf16 rows are injected and restored too (FBGEMM 1.8 has no bf16 CPU forward)."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import ComputeDevice
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

    specs = [
        (10, 8, EmbeddingLocation.HOST, ComputeDevice.CPU),
        (5, 4, EmbeddingLocation.HOST, ComputeDevice.CPU),
    ]
    model = Holder(SplitTableBatchedEmbeddingBagsCodegen(specs, weights_precision=SparseType(fmt)))
    sites = select(model)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    assert [(s.name, s.tensor.dtype, tuple(s.tensor.shape)) for s in sites] == [
        ("tbe.t0.weight", dtypes[fmt], (10, 8)),
        ("tbe.t1.weight", dtypes[fmt], (5, 4)),
    ]
    with torch.no_grad():
        for s in sites:  # finite values (a new TBE's memory is uninitialised)
            s.tensor.copy_(torch.randn(s.tensor.shape))
    before = _bytes(model)
    x = (torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3, 4]))
    ref = model(*x).detach().clone() if fmt != "bf16" else None
    with pytei.inject(model, pytei.BitFlip(ber=0.05), seed=0) as r:
        assert r.n_faults > 0 and r.targeted_bits == 100 * sites[0].tensor.element_size() * 8
    assert all(torch.equal(a, b) for a, b in zip(before, _bytes(model), strict=True))
    if ref is not None:
        assert torch.equal(model(*x), ref)
