"""Quantized TorchRec models: every dtype within its documented error, checkpoints bit for bit, the CLI."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("torchrec")

from torchrec import (  # noqa: E402 - after the skip
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
)

from conftest import assert_bit_identical, snapshot  # noqa: E402
from pytei import metrics, models  # noqa: E402
from pytei.checkpoint import WEIGHTS, load_checkpoint, save_checkpoint  # noqa: E402
from pytei.cli import main  # noqa: E402
from pytei.data import load  # noqa: E402
from pytei.exceptions import ArgumentError, CheckpointError  # noqa: E402
from pytei.models import RecModel  # noqa: E402
from pytei.torchrec.quantize import (  # noqa: E402
    UNSUPPORTED,
    load_quantized_state,
    quantization_of,
    quantize,
    quantized_state,
    table_bytes,
    types,
)
from pytei.train import predict  # noqa: E402

DTYPES = ("int8", "int4", "int2", "fp16")
FIELD_DIMS, DENSE_DIM, EMBED_DIM = [50, 40, 30], 4, 8
DATA_OPTIONS = {"n_rows": 3000, "field_dims": FIELD_DIMS, "dense_dim": DENSE_DIM}

warnings.filterwarnings("ignore", module="torchrec")  # torchrec's fx-tracing notice, not ours to fix


class QuantTestRec(RecModel):
    """A small TorchRec model: one EBC table per field, an EC table on field 0, a linear head.

    ``forward(dense, sparse: Long[B, F])`` builds the KJT itself, so ``pytei train`` trains it on
    synthetic-ctr's dense+sparse layout. The head is linear, so the output error of a quantized
    copy is bounded by ``sum_j |w_j| * (error of input j)``.
    """

    input_layout = "dense+sparse"

    def __init__(
        self, *, field_dims: list[int], dense_dim: int = DENSE_DIM, embed_dim: int = EMBED_DIM
    ) -> None:
        super().__init__(field_dims=list(field_dims), dense_dim=dense_dim, embed_dim=embed_dim)
        self.keys = [f"f{i}" for i in range(len(field_dims))]
        bags = [
            EmbeddingBagConfig(name=f"t{i}", embedding_dim=embed_dim, num_embeddings=n, feature_names=[k])
            for i, (n, k) in enumerate(zip(field_dims, self.keys, strict=True))
        ]
        seq = EmbeddingConfig(
            name="s0", embedding_dim=embed_dim, num_embeddings=field_dims[0], feature_names=["s0"]
        )
        self.ebc = EmbeddingBagCollection(tables=bags, device=torch.device("cpu"))
        self.ec = EmbeddingCollection(tables=[seq], device=torch.device("cpu"))
        self.top = nn.Linear(dense_dim + (len(field_dims) + 1) * embed_dim, 1)

    def embed(self, sparse: torch.Tensor) -> torch.Tensor:
        """``[B, (F + 1) * D]``: the EBC's pooled rows (one id a bag), then the EC's row of field 0."""
        ones = torch.ones(sparse.numel(), dtype=torch.long)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=self.keys, values=sparse.t().reshape(-1), lengths=ones)
        one = KeyedJaggedTensor.from_lengths_sync(
            keys=["s0"], values=sparse[:, 0].contiguous(), lengths=ones[: sparse.shape[0]]
        )
        return torch.cat([self.ebc(kjt).values(), self.ec(one)["s0"].values()], dim=1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.top(torch.cat([dense, self.embed(sparse)], dim=1)).squeeze(1)


@pytest.fixture(scope="module", autouse=True)
def registered():
    models.register("quant-test-rec", QuantTestRec)
    yield
    models.register.remove("quant-test-rec")


def _model(seed: int = 0) -> QuantTestRec:
    torch.manual_seed(seed)
    model = QuantTestRec(field_dims=FIELD_DIMS)
    with torch.no_grad():  # rows of different spreads, so that per-row scales differ
        for table in model.ebc.embedding_bags.values():
            table.weight.mul_(torch.logspace(-2, 1, table.weight.shape[0]).unsqueeze(1))
    return model.eval()


def _inputs(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, d, (n,), generator=gen) for d in FIELD_DIMS], dim=1)
    return torch.randn(n, DENSE_DIM, generator=gen), sparse


def _float_rows(model: QuantTestRec, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float rows each embedded input reads ``[B, F + 1, D]`` and their tables' error bounds per
    dtype are taken from these rows."""
    tables = [model.ebc.embedding_bags[f"t{i}"].weight for i in range(len(FIELD_DIMS))]
    tables.append(model.ec.embeddings["s0"].weight)
    ids = torch.cat([sparse, sparse[:, :1]], dim=1)
    rows = torch.stack([t[ids[:, j]] for j, t in enumerate(tables)], dim=1).detach()
    return rows, ids


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_reads_rows_within_its_documented_error(dtype):
    model, (dense, sparse) = _model(), _inputs()
    snap = snapshot(model)
    quant = quantize(model, dtype)
    assert_bit_identical(model, snap)  # a copy: the float model is untouched
    assert quantization_of(quant) == dtype and quantization_of(model) is None
    assert quant.name == "quant-test-rec" and quant.config == model.config
    assert type(quant.ebc).__module__ == "torchrec.quant.embedding_modules"
    assert type(quant.ec).__module__ == "torchrec.quant.embedding_modules"
    assert quant.top.weight.dtype == torch.float32 and torch.equal(quant.top.weight, model.top.weight)
    qtype = types.get(dtype)
    width = {k: v.shape[1] for k, v in table_bytes(quant).items()}
    payload = EMBED_DIM * qtype.bits // 8 + (4 if qtype.rowwise else 0)
    assert set(width.values()) == {-(-payload // 16) * 16}, width  # rows padded to 16 bytes

    rows, _ = _float_rows(model, sparse)
    with torch.no_grad():
        read = quant.embed(sparse).view(len(sparse), -1, EMBED_DIM)
        bound = torch.stack([qtype.error_bound(rows[:, j]) for j in range(rows.shape[1])], dim=1)
        err = (read.double() - rows.double()).abs().amax(dim=2)
        assert bool((err <= bound).all()), (err / bound).max()
        assert float(err.max()) > 0  # really quantized
        # The linear head turns input errors into an output error of at most sum_j |w_j| err_j.
        w = quant.top.weight.detach().double().abs().view(-1)[DENSE_DIM:].view(-1, EMBED_DIM)
        out_bound = (bound.unsqueeze(2) * w.unsqueeze(0)).sum(dim=(1, 2))
        diff = (quant(dense, sparse).double() - model(dense, sparse).double()).abs()
        assert bool((diff <= out_bound + 1e-5).all())


def test_error_bounds_shrink_with_more_bits():
    rows, _ = _float_rows(_model(), _inputs()[1])
    bounds = {d: types.get(d).error_bound(rows[:, 0]).mean() for d in DTYPES}
    assert bounds["fp16"] < bounds["int8"] < bounds["int4"] < bounds["int2"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_saved_quantized_checkpoint_loads_bit_for_bit(tmp_path, dtype):
    data = load("synthetic-ctr", seed=0, layout="dense+sparse", **DATA_OPTIONS)
    quant = quantize(_model(), dtype)
    out = save_checkpoint(tmp_path / dtype, quant, data, data_options=DATA_OPTIONS)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model"]["quantization"] == {"dtype": dtype}
    assert {"torchrec", "fbgemm-gpu-cpu"} <= set(meta["versions"])
    from safetensors.torch import load_file

    stored = load_file(str(out / WEIGHTS))  # safetensors: no pickle
    assert all(type(t) is torch.Tensor for t in stored.values())
    assert {k for k in stored if "embedding" in k} == set(table_bytes(quant))

    ckpt = load_checkpoint(out)
    again = ckpt.model
    assert quantization_of(again) == dtype and ckpt.data is not None
    before, after = table_bytes(quant), table_bytes(again)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key  # every byte: codes, scale, bias, padding
    dense, sparse = _inputs()
    with torch.no_grad():
        assert torch.equal(again(dense, sparse), quant(dense, sparse))
    assert torch.equal(predict(again, ckpt.test), predict(quant, data.test))


def test_a_table_written_into_the_quantized_model_is_what_it_reads():
    quant = quantize(_model(), "int8")
    state = quantized_state(quant)
    key = "ebc.embedding_bags.t0.weight"
    state[key][:, :] = 0  # scale 0, bias 0: every row of t0 reads zeros
    load_quantized_state(quant, state)
    _, sparse = _inputs()
    with torch.no_grad():
        assert not bool(quant.embed(sparse)[:, :EMBED_DIM].any())
    state[key] = state[key][:, :8]
    with pytest.raises(ValueError, match=r"ebc\.embedding_bags\.t0\.weight: stored torch\.uint8 \(50, 8\)"):
        load_quantized_state(quant, state)
    del state[key]
    with pytest.raises(ValueError, match="missing"):
        load_quantized_state(quant, state)


def test_fp8_is_refused_with_the_reason_torchrec_cannot_make_it():
    with pytest.raises(ArgumentError, match="nfp8") as err:
        quantize(_model(), "fp8")
    assert "allowed: fp16, int2, int4, int8" in str(err.value) and "fp8" in UNSUPPORTED
    # The reason holds for the installed torchrec / FBGEMM: when it no longer does, offer fp8.
    from torchrec.inference.modules import quantize_inference_model

    with pytest.raises(KeyError, match="nfp8"):
        quantize_inference_model(_model(), quantization_dtype=torch.float8_e4m3fn)


def test_bad_requests_are_argument_errors_naming_the_value():
    with pytest.raises(
        ArgumentError, match=r"unknown quantization dtype 'int3'; allowed: fp16, int2, int4, int8"
    ):
        quantize(_model(), "int3")
    dlrm = models.create("dlrm", field_dims=FIELD_DIMS, dense_dim=DENSE_DIM)
    with pytest.raises(ArgumentError, match=r"model 'dlrm' has no TorchRec EmbeddingBagCollection"):
        quantize(dlrm, "int8")
    with pytest.raises(ArgumentError, match=r"already quantized \(int4\)"):
        quantize(quantize(_model(), "int4"), "int8")

    class MyEBC(EmbeddingBagCollection):
        pass

    model = _model()
    model.ebc = MyEBC(tables=model.ebc.embedding_bag_configs(), device=torch.device("cpu"))
    with pytest.raises(ArgumentError, match=r"left ebc of 'quant-test-rec' float \(.*MyEBC: .*exact type"):
        quantize(model, "int8")
    model = _model()
    with torch.no_grad():
        model.ebc.embedding_bags["t1"].weight[3, 0] = 1e6
    with pytest.raises(ArgumentError, match=r"ebc\.embedding_bags\.t1\.weight: a value of magnitude 1e\+06"):
        quantize(model, "int8")


@pytest.mark.parametrize(("dtype", "multiple"), [("int8", 2), ("int4", 4), ("int2", 8)])
def test_an_embedding_dim_fbgemm_cannot_pack_is_refused(dtype, multiple):
    torch.manual_seed(0)
    model = QuantTestRec(field_dims=FIELD_DIMS, embed_dim=multiple + multiple // 2)
    with pytest.raises(
        ArgumentError, match=rf"embedding_dim {multiple + multiple // 2} .* a multiple of {multiple}"
    ):
        quantize(model, dtype)
    quantize(QuantTestRec(field_dims=FIELD_DIMS, embed_dim=multiple), dtype)
    quantize(QuantTestRec(field_dims=FIELD_DIMS, embed_dim=3), "fp16")


def test_a_checkpoint_whose_recorded_dtype_was_edited_is_refused(tmp_path):
    data = load("synthetic-ctr", seed=0, layout="dense+sparse", **DATA_OPTIONS)
    out = save_checkpoint(tmp_path / "q", quantize(_model(), "int8"), data, data_options=DATA_OPTIONS)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["quantization"]["dtype"] = "int4"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError, match=r"records quantization 'int4', but the tables in .* are 'int8'"
    ):
        load_checkpoint(out, with_data=False)
    meta["model"]["quantization"]["dtype"] = "int3"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"cannot quantize the model as recorded: unknown .* 'int3'"):
        load_checkpoint(out, with_data=False)


# --- the CLI ---------------------------------------------------------------------------------------


def _train(tmp_path: Path, model: str, capsys) -> Path:
    ckpt = tmp_path / model
    argv = [
        "train",
        "--model",
        model,
        "--dataset",
        "synthetic-ctr",
        "--data-options",
        json.dumps(DATA_OPTIONS),
    ]
    assert main([*argv, "--out", str(ckpt), "--epochs", "2", "--batch-size", "256", "--lr", "0.01"]) == 0
    capsys.readouterr()
    return ckpt


def test_quantize_cli_end_to_end(tmp_path, capsys):
    ckpt = _train(tmp_path, "dlrm-torchrec", capsys)
    out = tmp_path / "int4"
    assert main(["quantize", str(ckpt), "--dtype", "int4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    found = re.search(r"test AUC fp32 (\d\.\d+), int4 (\d\.\d+) \(change ([-+]\d\.\d+)\)", text)
    assert found, text

    float_ckpt, quant_ckpt = load_checkpoint(ckpt), load_checkpoint(out)
    test = float_ckpt.test
    assert torch.equal(quant_ckpt.test.labels, test.labels)  # the same split
    float_auc = metrics.auc(predict(float_ckpt.model, test), test.labels)["auc"]
    quant_auc = metrics.auc(predict(quant_ckpt.model, test), test.labels)["auc"]
    assert found.group(1) == f"{float_auc:.6f}" and found.group(2) == f"{quant_auc:.6f}"
    scores = quant_ckpt.meta["scores"]
    assert scores["test_auc"] == quant_auc and scores["float_test_auc"] == float_auc
    assert float_auc > 0.55 and abs(quant_auc - float_auc) < 0.05  # a trained model, int4 close to it
    origin = quant_ckpt.meta["origin"]
    assert origin["weights_sha256"] == float_ckpt.meta["weights"]["sha256"]

    # A campaign model source: the quantized checkpoint scored on its test split.
    from pytei.campaign.sources import sources

    source = sources.get("checkpoint")
    spec = {"checkpoint": str(out), "split": "test", "max_rows": 0}
    evaluation = source.load("ckpt:q", spec, batch_size=128)
    assert quantization_of(evaluation.model) == "int4"
    with torch.no_grad():
        logits = torch.cat([evaluation.model(*batch) for batch in evaluation.batches])
    assert torch.equal(logits, predict(quant_ckpt.model, test))


def test_quantize_cli_user_errors_are_one_line(tmp_path, capsys, monkeypatch):
    ckpt = _train(tmp_path, "dlrm-torchrec", capsys)

    def fails(*argv: str) -> str:
        assert main(["quantize", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert "'int3'; allowed: fp16, int2, int4, int8" in fails(
        str(ckpt), "--dtype", "int3", "--out", str(tmp_path / "x")
    )
    assert "nfp8" in fails(str(ckpt), "--dtype", "fp8", "--out", str(tmp_path / "x"))
    assert "the float checkpoint itself" in fails(str(ckpt), "--dtype", "int8", "--out", str(ckpt))
    assert "no checkpoint directory" in fails(
        str(tmp_path / "nope"), "--dtype", "int8", "--out", str(tmp_path / "x")
    )
    dlrm = _train(tmp_path, "dlrm", capsys)
    assert "has no TorchRec EmbeddingBagCollection" in fails(
        str(dlrm), "--dtype", "int8", "--out", str(tmp_path / "x")
    )
    quant = tmp_path / "int8"
    assert main(["quantize", str(ckpt), "--dtype", "int8", "--out", str(quant)]) == 0
    capsys.readouterr()
    assert "already quantized (int8)" in fails(str(quant), "--dtype", "int4", "--out", str(tmp_path / "x"))
    monkeypatch.setitem(sys.modules, "torchrec", None)  # as if the extra were not installed
    err = fails(str(ckpt), "--dtype", "int8", "--out", str(tmp_path / "x"))
    assert "pytei quantize needs the optional extra pytei[torchrec]; missing: torchrec" in err
    assert not (tmp_path / "x").exists()


def test_a_quantized_checkpoint_runs_in_a_campaign(tmp_path, capsys):
    from pytei.results import load as load_trials

    ckpt = _train(tmp_path, "dlrm-torchrec", capsys)
    quant = tmp_path / "int8"
    assert main(["quantize", str(ckpt), "--dtype", "int8", "--out", str(quant)]) == 0
    spec = tmp_path / "spec.toml"
    spec.write_text(
        'name = "quantized"\nruns = 2\nmetrics = ["auc", "rmse"]\n'
        'targets = [{ component = "embedding", fields = ["codes"] }, '
        '{ component = "embedding", fields = ["scale", "bias"] }]\n'
        f'[[models]]\ncheckpoint = "{quant}"\nlabel = "int8"\n'
        '[errors]\nmodel = "BitFlip"\nrates = [1e-2]\n'
    )
    db = tmp_path / "q.db"
    assert main(["campaign", "run", str(spec), "--db", str(db)]) == 0
    trials = load_trials(db)
    assert len(trials) == 4 and set(trials["status"]) == {"ok"}
    assert (trials["n_faults"] > 0).all()
    baseline = load_checkpoint(quant).meta["scores"]["test_auc"]
    assert set(trials["baseline_auc"]) == {baseline}  # the campaign scored the quantized model
