"""TorchRec zoo models (dlrm-torchrec, dcnv2) and KJT batches: build, rebuild, train, campaign, inject."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("torchrec")

from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from conftest import assert_bit_identical, snapshot  # noqa: E402
from pytei import models  # noqa: E402
from pytei.campaign import load_spec, plan  # noqa: E402
from pytei.campaign.execute import run_campaign  # noqa: E402
from pytei.campaign.runner import ModelRunner, load_evaluation  # noqa: E402
from pytei.checkpoint import load_checkpoint  # noqa: E402
from pytei.cli import main  # noqa: E402
from pytei.data import CTRDataset, Split, load  # noqa: E402
from pytei.data.kjt import from_lists, to_kjt  # noqa: E402
from pytei.data.synthetic import write_criteo  # noqa: E402
from pytei.errors import BitFlip  # noqa: E402
from pytei.exceptions import MissingExtraError  # noqa: E402
from pytei.injector import inject  # noqa: E402
from pytei.models.torchrec_zoo import MLPERF_DLRMV2, MLPERF_MULTI_HOT_SIZES  # noqa: E402
from pytei.results import load as load_results  # noqa: E402
from pytei.targets import components  # noqa: E402
from pytei.train import TrainConfig, build, fit, predict  # noqa: E402

MODELS = ["dlrm-torchrec", "dcnv2"]
TABLE = "sparse_arch.embedding_bag_collection.embedding_bags.t_{}.weight"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # torchrec/fbgemm import-time deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


@pytest.fixture(scope="module")
def data():
    return load("synthetic-ctr", layout="dense+kjt", n_rows=12_000)


def _model(name: str, data, seed: int = 0, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create(name, field_dims=data.field_dims, **config).eval()


def _batch(data, n: int = 64):
    return next(data.test.batches(n))[0]


# --- models ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_build_forward_and_rebuild_from_config(name, data):
    model = _model(name, data)
    assert model.input_layout == "dense+kjt" and model.name == name
    dense, kjt = _batch(data)
    logits = model(dense, kjt)
    assert logits.shape == (64,) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    config = json.loads(json.dumps(model.config))  # what a checkpoint records
    assert config["feature_names"] == data.sparse_names == [f"cat_{i}" for i in range(8)]
    again = _model(name, data, **{k: v for k, v in config.items() if k != "field_dims"})
    assert again.config == model.config
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1  # the same seed, the same weights
    assert torch.equal(again(dense, kjt), logits)
    other = _model(name, data, seed=1)
    assert not torch.equal(other(dense, kjt), logits)


@pytest.mark.parametrize("name", MODELS)
def test_components_tag_tables_mlps_and_interaction(name, data):
    model = _model(name, data)
    comps = components(model)
    tables = {TABLE.format(f): "embedding" for f in data.sparse_names}
    assert {n: c for n, c in comps.items() if c == "embedding"} == tables
    assert {c for n, c in comps.items() if n.startswith(("dense_arch.", "over_arch."))} == {"mlp"}
    inter = {c for n, c in comps.items() if n.startswith("inter_arch.")}
    assert inter == ({"interaction"} if name == "dcnv2" else set())  # DLRM's dot interaction has no weights
    assert model.output_layers == ("over_arch.model.1",)
    assert model.get_submodule(model.output_layers[0]).out_features == 1


def test_dcnv2_mlperf_variant_has_mlperf_sizes():
    with torch.device("meta"):  # 26.2e9 parameters (104.5 GB of tables): only shapes
        model = models.create("dcnv2", variant="mlperf")
    config = model.config
    assert {k: config[k] for k in MLPERF_DLRMV2} == MLPERF_DLRMV2 and config["variant"] == "mlperf"
    assert len(MLPERF_MULTI_HOT_SIZES) == len(MLPERF_DLRMV2["field_dims"]) == 26
    tables = sum(p.numel() for n, p in model.named_parameters() if n.startswith("sparse_arch."))
    assert tables == sum(MLPERF_DLRMV2["field_dims"]) * 128 == 26_135_627_264
    width = 27 * 128
    cross = sum(p.numel() for n, p in model.named_parameters() if n.startswith("inter_arch."))
    assert cross == 3 * (2 * width * 512 + width)  # W [512, 3456], V [3456, 512], bias per layer
    over = [m.out_features for m in model.over_arch.modules() if isinstance(m, torch.nn.Linear)]
    assert over == [1024, 1024, 512, 256, 1]
    small = models.create("dcnv2", field_dims=[5, 6])  # the default variant: small sizes
    assert small.config["embed_dim"] == 16 and small.config["variant"] == "small"
    with pytest.raises(ValueError, match="unknown dcnv2 variant 'huge'; allowed: small, mlperf"):
        models.create("dcnv2", field_dims=[5], variant="huge")
    with pytest.raises(ValueError, match="variant 'small' needs field_dims"):
        models.create("dcnv2")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"bottom_mlp": [64, 8]}, r"bottom_mlp must end in embed_dim=16 to interact, got \[64, 8\]"),
        ({"feature_names": ["a", "b"]}, "feature_names must list one name per field"),
        ({"feature_names": ["a"] * 8}, "feature_names must be 8 distinct non-empty strings"),
        ({"dense_dim": 0}, "dense_dim must be an int >= 1, got 0"),
        ({"top_mlp": []}, "top_mlp must be a non-empty sequence"),
    ],
)
@pytest.mark.parametrize("name", MODELS)
def test_bad_configs_name_the_value(name, config, message, data):
    with pytest.raises(ValueError, match=message):
        models.create(name, field_dims=data.field_dims, **config)


def test_forward_refuses_wrong_inputs(data):
    model = _model("dlrm-torchrec", data)
    dense, kjt = _batch(data, 8)
    with pytest.raises(TypeError, match="sparse must be a torchrec KeyedJaggedTensor"):
        model(dense, torch.zeros(8, 8, dtype=torch.int64))
    ids = torch.zeros(8, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"sparse lacks the keys \['cat_0', 'cat_1'\]"):
        model(dense, to_kjt(ids, ["x", "y", *data.sparse_names[2:]]))
    with pytest.raises(ValueError, match="dense and sparse batch sizes differ: 4 vs 8"):
        model(dense[:4], kjt)
    with pytest.raises(ValueError, match=r"dense must be a tensor of shape \[batch, 13\]"):
        model(dense[:, :5], kjt)


def test_without_the_extra_import_works_and_building_names_what_is_missing(monkeypatch, data):
    code = (
        "import sys\n"
        "import pytei, pytei.models, pytei.data, pytei.models.torchrec_zoo, pytei.data.kjt\n"
        "assert not {'torchrec', 'fbgemm_gpu'} & set(sys.modules), 'imported eagerly'\n"
        "assert {'dlrm-torchrec', 'dcnv2'} <= set(pytei.models.names())\n"
        "sys.modules['torchrec'] = None\n"  # import torchrec now raises ImportError
        "try:\n"
        "    pytei.models.create('dlrm-torchrec', field_dims=[3, 4])\n"
        "except pytei.exceptions.MissingExtraError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "model 'dlrm-torchrec' needs the optional extra pytei[torchrec]; missing: torchrec" in out.stdout
    monkeypatch.setitem(sys.modules, "torchrec", None)
    with pytest.raises(MissingExtraError, match="layout 'dense.kjt'.*missing: torchrec"):
        load("synthetic-ctr", layout="dense+kjt", n_rows=100)
    with pytest.raises(MissingExtraError, match="model 'dcnv2' needs the optional extra"):
        models.create("dcnv2", field_dims=[3, 4])


# --- KJT batches from the data layer -----------------------------------------------------------------


def test_dense_kjt_batches_reuse_the_dense_sparse_arrays(data):
    plain = load("synthetic-ctr", layout="dense+sparse", n_rows=12_000)
    assert data.layout == "dense+kjt" and data.field_dims == plain.field_dims
    assert data.dense_dim == plain.dense_dim == 13
    for a, b in zip(data.train.inputs, plain.train.inputs, strict=True):
        assert torch.equal(a, b)  # the same tensors: a batch becomes a KJT only when handed out
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ((dense, kjt), labels), ((dense2, ids), labels2) = (
        next(data.train.batches(100, shuffle=True, generator=g1)),
        next(plain.train.batches(100, shuffle=True, generator=g2)),
    )
    assert isinstance(kjt, KeyedJaggedTensor) and kjt.keys() == data.sparse_names
    assert torch.equal(dense, dense2) and torch.equal(labels, labels2) and kjt.stride() == 100
    assert torch.equal(kjt.lengths(), torch.ones(800, dtype=torch.int64))
    for k, key in enumerate(data.sparse_names):
        assert torch.equal(kjt[key].values(), ids[:, k])
    sample = data.train.take(torch.tensor([3, 1]))
    assert sample.collate is data.train.collate and len(sample) == 2
    assert isinstance(sample.model_inputs(sample.inputs)[1], KeyedJaggedTensor)


def test_criteo_files_load_as_kjt_batches(tmp_path):
    write_criteo(tmp_path / "train.txt", 400, seed=1)
    ds = load("criteo", tmp_path, layout="dense+kjt", min_threshold=2)
    (dense, kjt), labels = next(ds.valid.batches(16))
    assert dense.shape == (16, 13) and kjt.keys() == [f"cat_{i}" for i in range(26)] and kjt.stride() == 16
    plain = load("criteo", tmp_path, layout="dense+sparse", min_threshold=2)
    assert torch.equal(kjt["cat_25"].values(), plain.valid.inputs[1][:16, 25])
    assert ds.fingerprint != plain.fingerprint  # the layout is part of the preprocessing


def test_multi_hot_kjt_pools_each_bag(data):
    bags = [[[1, 2], [3], [], [0, 0, 4], [1], [2], [3], [4]], [[5], [], [6, 7], [1], [0], [0], [0], [0]]]
    kjt = from_lists(bags, data.sparse_names)
    assert kjt.stride() == 2 and kjt["cat_0"].lengths().tolist() == [2, 1]
    assert kjt["cat_2"].values().tolist() == [6, 7] and kjt["cat_1"].lengths().tolist() == [1, 0]
    model = _model("dlrm-torchrec", data)
    pooled = model.sparse_arch(kjt)  # [B, F, D]: sum pooling of each bag
    for n, sample in enumerate(bags):
        for f, bag in enumerate(sample):
            table = model.get_parameter(TABLE.format(data.sparse_names[f]))
            want = table[bag].sum(0) if bag else torch.zeros(16)
            torch.testing.assert_close(pooled[n, f], want, rtol=0, atol=1e-6)
    padded = torch.tensor([[[1, 2, 9], [3, 9, 9]]])
    got = to_kjt(padded, ["a", "b"], torch.tensor([[2, 1]]))
    assert got.values().tolist() == [1, 2, 3] and got.lengths().tolist() == [2, 1]
    with pytest.raises(ValueError, match=r"lengths must be in 0..3 \(the padded bag size\), got 2..4"):
        to_kjt(padded, ["a", "b"], torch.tensor([[2, 4]]))
    with pytest.raises(ValueError, match="KJT keys must name 2 fields, got 1"):
        to_kjt(padded[:, :, 0], ["a"])
    with pytest.raises(ValueError, match="ids must be an int64"):
        to_kjt(padded.float(), ["a", "b"])


def test_a_multi_hot_data_set_batches_and_trains(data):
    """Splits holding padded bags (ids [N, S, H], lengths [N, S]) hand out multi-hot KJTs."""
    gen = torch.Generator().manual_seed(0)

    def bags(split):
        dense, ids = split.inputs
        extra = torch.stack([torch.randint(0, d, (len(split),), generator=gen) for d in data.field_dims], 1)
        lengths = torch.randint(0, 3, ids.shape, generator=gen)  # 0, 1 or 2 ids per bag
        return Split((dense, torch.stack([ids, extra], 2), lengths), split.labels)

    multi = CTRDataset(
        name="synthetic-multi-hot",
        layout="dense+kjt",
        train=bags(data.train),
        valid=bags(data.valid),
        test=bags(data.test),
        field_dims=data.field_dims,
        dense_dim=data.dense_dim,
        fingerprint="-",
        split_seed=0,
    )
    (dense, kjt), _ = next(multi.test.batches(50))
    ids, lengths = multi.test.inputs[1][:50], multi.test.inputs[2][:50]
    assert torch.equal(kjt.lengths(), lengths.t().reshape(-1))
    assert kjt["cat_3"].to_dense()[7].tolist() == ids[7, 3, : lengths[7, 3]].tolist()
    config = TrainConfig(lr=3e-3, batch_size=256, max_epochs=1)
    result = fit(build("dlrm-torchrec", config, field_dims=data.field_dims), multi, config, progress=False)
    assert result.test_auc > 0.55, result.summary()  # a third of the bags are empty: a weaker signal
    with pytest.raises(ValueError, match=r"widths \[13, 8\] or \[13, 8, 8\], got \[13, 4\]"):
        CTRDataset(**{**multi.__dict__, "train": Split((dense, ids[:, :4, 0]), multi.test.labels[:50])})


# --- training, checkpoints, campaigns -----------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_short_training_beats_chance_clearly(name, data):
    config = TrainConfig(lr=3e-3, batch_size=256, max_epochs=2, patience=1)
    result = fit(build(name, config, field_dims=data.field_dims), data, config, progress=False)
    # 1,200 test rows: an AUC of 0.5 has a standard deviation under 0.02; 0.6 is > 5 of them away
    assert result.test_auc > 0.6 and result.valid_auc > 0.6, result.summary()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("trec") / "ckpt"
    options = json.dumps({"n_rows": 6000})
    args = ["train", "--model", "dlrm-torchrec", "--dataset", "synthetic-ctr", "--data-options", options]
    assert main([*args, "--epochs", "1", "--batch-size", "256", "--out", str(out)]) == 0
    return out


def test_train_cli_checkpoint_reloads_with_its_kjt_batches(checkpoint):
    ckpt = load_checkpoint(checkpoint)
    assert ckpt.meta["data"]["layout"] == "dense+kjt" and ckpt.model.name == "dlrm-torchrec"
    assert ckpt.model.config["feature_names"] == ckpt.data.sparse_names
    logits = predict(ckpt.model, ckpt.test)
    from pytei.metrics import auc

    assert math.isclose(auc(logits, ckpt.test.labels)["auc"], ckpt.meta["scores"]["test_auc"], abs_tol=1e-6)


def test_train_cli_refuses_a_data_set_without_the_layout(tmp_path, capsys):
    args = ["train", "--model", "dcnv2", "--dataset", "movielens-100k", "--data-dir", str(tmp_path)]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: data set 'movielens-100k': movielens-100k: unknown layout 'dense+kjt'; allowed: categorical"
    )


def test_dcnv2_trains_on_criteo_files_and_reloads(tmp_path):
    write_criteo(tmp_path / "train.txt", 600, seed=2)
    out = tmp_path / "ckpt"
    args = ["train", "--model", "dcnv2", "--dataset", "criteo", "--data-dir", str(tmp_path)]
    args += ["--data-options", '{"min_threshold": 2}', "--epochs", "1", "--batch-size", "128"]
    assert main([*args, "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.model.config["feature_names"] == [f"cat_{i}" for i in range(26)]
    assert ckpt.model.config["field_dims"] == ckpt.data.field_dims and ckpt.model.config["variant"] == "small"
    assert predict(ckpt.model, ckpt.test).shape == (len(ckpt.test),)


SPEC = """
name = "trec"
seed = 2
runs = 1
targets = [{{ component = "embedding" }}, {{ component = "mlp", params = "weight" }}]
sites = ["weights"]
mitigations = ["none", "clip"]
metrics = ["auc", "rmse"]

[[models]]
checkpoint = "{checkpoint}"

[errors]
model = "BitFlip"
rates = [1e-4, 1e-2]
"""


def test_campaign_runs_a_dlrm_torchrec_checkpoint_end_to_end(checkpoint, tmp_path):
    path = tmp_path / "trec.toml"
    path.write_text(SPEC.format(checkpoint=checkpoint))
    spec = load_spec(path)
    result = run_campaign(spec, tmp_path / "r.db", progress=False)
    df = load_results(tmp_path / "r.db")
    assert len(df) == len(plan(spec)) == 8 and set(df.status) == {"ok"}, result
    assert (df.n_faults > 0).all() and set(df.target) == {"embedding", "mlp"}
    assert set(df.mitigation) == {"none", "clip"}
    plain = df[df.mitigation == "none"]
    worst = plain[plain.rate == 1e-2].auc
    assert (worst < plain.baseline_auc.iloc[0] - 0.01).all()  # 1e-2 of the bits flipped hurts AUC
    trials = plan(spec)
    fast = ModelRunner(load_evaluation(trials[0], batch_size=256))
    full = ModelRunner(load_evaluation(trials[0], batch_size=256), fast=False)
    for t in trials:  # the fast paths (or their fallback) give the full evaluation's numbers
        a, b = fast.run(t), full.run(t)
        assert a.metrics == pytest.approx(b.metrics, rel=0, abs=0, nan_ok=True), (t.target, t.rate)


@pytest.mark.parametrize("name", MODELS)
def test_faults_in_ebc_tables_change_logits_and_restore_bit_exact(name, data):
    model = _model(name, data)
    dense, kjt = _batch(data, 512)
    clean, before = model(dense, kjt), snapshot(model)
    with inject(model, BitFlip(1e-3), target="embedding", seed=4) as report:
        faulted = model(dense, kjt)
        hit = set(report.fault_map.faults)
    assert report.n_faults > 0 and hit and all(n.startswith("sparse_arch.") for n in hit), hit
    assert not torch.equal(faulted.view(torch.int32), clean.view(torch.int32))
    assert_bit_identical(model, before)
    assert torch.equal(model(dense, kjt).view(torch.int32), clean.view(torch.int32))
