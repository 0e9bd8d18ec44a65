"""The quantization study of ``pytei reproduce``: end to end at a tiny size, paired faults, blast radius."""

import io
import warnings
from dataclasses import replace

import pytest

pytest.importorskip("torchrec")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from pytei import models  # noqa: E402
from pytei import reproduce as rp  # noqa: E402
from pytei.errors import BitFlip  # noqa: E402
from pytei.exceptions import MissingExtraError  # noqa: E402
from pytei.injector import Injector  # noqa: E402
from pytei.quantization_study import DTYPES, QuantizationSizes  # noqa: E402
from pytei.report import write_report  # noqa: E402
from pytei.torchrec import tables  # noqa: E402
from pytei.torchrec.blast import blast_radius, readers  # noqa: E402
from pytei.torchrec.quantize import quantize  # noqa: E402
from pytei.train import TrainConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

TINY = replace(
    rp.PRESETS["quick"],
    train=TrainConfig(lr=3e-3, max_epochs=1, patience=1, batch_size=512),
    synthetic_rows=2000,
    quantization=QuantizationSizes(bers=(1e-3, 1e-2), per_decade=1, runs=2, test_rows=300, blast_rows=6),
)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("quant-study")
    (out / "specs").mkdir()
    console = Console(file=io.StringIO(), width=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extras = rp._quantization_study(out, TINY, 0, console)
        assert extras is not None
        trials = extras["quantization"]
        report = write_report(trials.drop(columns=["dtype", "field"]), out / "report", extras=extras)
    return out, extras, report


def test_the_study_runs_every_version_and_field(study):
    out, extras, _ = study
    trials = extras["quantization"]
    assert (trials["status"] == "ok").all(), trials["error_message"].dropna().unique()
    ran = trials.groupby(["field", "dtype"]).size()
    # 2 BERs x 2 runs per version and field; scale/bias only where rows have them
    assert ran.to_dict() == {
        **{("codes", d): 4 for d in DTYPES},
        **{("scale/bias", d): 4 for d in ("int8", "int4")},
    }
    # the checkpoint architecture names the dtype of a quantized version
    archs = trials.drop_duplicates("dtype").set_index("dtype")["architecture"].to_dict()
    assert archs == {
        "fp32": "dlrm-torchrec",
        "fp16": "dlrm-torchrec/fp16",
        "int8": "dlrm-torchrec/int8",
        "int4": "dlrm-torchrec/int4",
    }
    assert (out / "quantization-blast.csv").is_file()
    assert (out / "specs" / "quantization-scale-bias.toml").is_file()


def test_the_report_has_the_section_its_figures_and_tables(study):
    out, _, report = study
    text = report.read_text()
    section = text[text.index("Does quantization change robustness?") : text.index("Definitions\n")]
    assert "Fault-free AUC of each version" in section
    assert "AUC points: dtype x field x BER" in section
    assert "Blast radius of a single flip: dtype x field" in section
    for dtype in DTYPES:
        assert f"dlrm-torchrec/{dtype} | codes |" in section
    assert "dlrm-torchrec/int4 | scale/bias |" in section
    for name in ("fig-quantization-codes.png", "fig-quantization-scale-bias.png"):
        assert (out / "report" / name).stat().st_size > 1000
        assert name in section
    page = (out / "report" / "report.html").read_text()
    assert "Does quantization change robustness?" in page
    assert 'alt="AUC vs BER, one line per dtype, errors in the embedding scale/bias."' in page


def test_a_rerun_resumes_the_campaigns_and_measures_the_same_blast_radius(study):
    out, extras, _ = study
    console = Console(file=io.StringIO(), width=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = rp._quantization_study(out, TINY, 0, console)
    assert again is not None
    assert "0 trials run" in console.file.getvalue()
    assert len(again["quantization"]) == len(extras["quantization"])
    pd.testing.assert_frame_equal(again["quantization_blast"], extras["quantization_blast"])


def test_without_the_extra_the_study_is_skipped_in_one_line(tmp_path, monkeypatch):
    def missing(feature="TorchRec support"):
        raise MissingExtraError(f"{feature} needs pytei[torchrec]: torchrec is not installed")

    monkeypatch.setattr("pytei.torchrec.require", missing)
    buffer = io.StringIO()
    assert rp._quantization_study(tmp_path, TINY, 0, Console(file=buffer, width=300)) is None
    lines = buffer.getvalue().strip().splitlines()
    assert len(lines) == 1 and "quantization study" in lines[0] and "pytei[torchrec]" in lines[0]


def _model():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = {"field_dims": [40, 30, 20], "dense_dim": 3, "embed_dim": 8, "bottom_mlp": (16, 8)}
        return models.create("dlrm-torchrec", **config).eval()


def _field_bytes(model, field):
    out = {}
    for t in tables(model):
        lo, hi = t.fields[field]
        out[t.name] = t.row_bytes[:, lo:hi].clone()
    return out


def test_paired_faults_coincide_in_scale_and_bias_of_int8_and_int4():
    base = _model()
    versions = {d: quantize(base, d) for d in ("int8", "int4")}
    flips = {}
    for dtype, model in versions.items():
        before = {f: _field_bytes(model, f) for f in ("scale", "bias", "codes")}
        inj = Injector(BitFlip(0.02), seed=1234, target="embedding", fields=["scale", "bias"])
        inj.apply(model)
        after = {f: _field_bytes(model, f) for f in ("scale", "bias", "codes")}
        inj.restore()
        flips[dtype] = {f: {k: before[f][k] ^ after[f][k] for k in before[f]} for f in before}
        assert all(torch.equal(m, torch.zeros_like(m)) for m in flips[dtype]["codes"].values())
    n = 0
    for field in ("scale", "bias"):
        for name, mask in flips["int8"][field].items():
            assert torch.equal(mask, flips["int4"][field][name]), (field, name)
            n += int(mask.bool().sum())
    assert n > 0  # some faults were drawn: 90 rows x 32 bits at 2 %


def _codes(t, row):
    lo, hi = t.fields["codes"]
    raw = t.row_bytes[row, lo:hi]
    if t.sparse_type == "int8":
        return raw.clone()
    return torch.stack([raw & 0xF, raw >> 4], dim=1).reshape(-1)  # int4: the first code in the low bits


def test_blast_radius_is_consistent_and_restores_the_bytes():
    base = _model()
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(64, 3, generator=gen)
    ids = torch.stack([torch.randint(0, r, (64,), generator=gen) for r in (40, 30, 20)], dim=1)
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    keys = _features(base)
    batches = []
    for s in range(0, 64, 32):
        part = ids[s : s + 32]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=keys, values=part.t().reshape(-1), lengths=torch.ones(3 * 32, dtype=torch.int32)
        )
        batches.append((dense[s : s + 32], kjt))
    rows = [(t.name, int(ids[k, i])) for i, t in enumerate(tables(base)) for k in (0, 5)]
    for dtype in ("fp32", "fp16", "int8", "int4"):
        model = base if dtype == "fp32" else quantize(base, dtype)
        snapshot = {t.name: t.row_bytes.clone() for t in tables(model)}
        effects = blast_radius(model, batches, rows, seed=3)
        for t in tables(model):
            assert torch.equal(t.row_bytes, snapshot[t.name])
        by_name = {t.name: t for t in tables(model)}
        fields = ["codes"] if dtype in ("fp32", "fp16") else ["codes", "scale", "bias"]
        assert len(effects) == len(rows) * len(fields)
        for e, (name, row) in zip(effects, [(n, r) for n, r in rows for _ in fields], strict=True):
            t = by_name[name]
            assert e["row"] == row and e["sparse_type"] == dtype
            direct = int((ids[:, _index(base, t)] == row).sum())
            assert e["readers"] == readers(batches, t.features, row) == direct
            assert e["readers"] > 0
            assert 0 <= e["logits_changed"] <= e["readers"]
            if e["field"] == "codes":
                assert e["values_changed"] == 1  # a code flip moves exactly one value
            elif e["field"] == "scale":
                # value = scale * code + bias: every value whose code is not 0 moves (all, if not finite)
                nonzero = int((_codes(t, row) != 0).sum())
                assert e["values_changed"] in (nonzero, e["dim"])
                assert 0 < nonzero < e["dim"]  # the row's minimum has code 0
            else:
                assert e["values_changed"] == e["dim"]  # a bias flip moves every value
            if e["values_changed"] and e["logits_changed"]:
                assert e["max_logit_change"] > 0


def _features(model):
    return [f for t in tables(model) for f in t.features]


def _index(model, table):
    return _features(model).index(table.features[0])
