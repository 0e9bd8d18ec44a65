"""Training with early stopping, and checkpoints that rebuild the model and its exact test split."""

import json

import pytest
import torch

from pytei import models
from pytei.checkpoint import load_checkpoint, save_checkpoint
from pytei.data import load
from pytei.train import TrainConfig, build, fit, predict


@pytest.fixture(scope="module")
def data():
    return load("synthetic-ctr", n_rows=100_000)


@pytest.fixture(scope="module")
def trained(data):
    torch.manual_seed(0)
    model = models.create("dcn", field_dims=data.field_dims)
    return fit(model, data, TrainConfig(lr=3e-3, max_epochs=3, patience=2), progress=False)


def test_short_training_reaches_auc_above_07(trained):
    assert trained.test_auc > 0.7 and trained.valid_auc > 0.7


def test_best_epoch_is_reloaded_and_scored(trained, data):
    aucs = [h["valid_auc"] for h in trained.history]
    assert trained.best_epoch == max(range(len(aucs)), key=aucs.__getitem__)
    assert trained.valid_auc == aucs[trained.best_epoch]
    from pytei.metrics import auc

    assert auc(predict(trained.model, data.test), data.test.labels)["auc"] == trained.test_auc


def test_early_stopping_stops(data):
    torch.manual_seed(0)
    model = models.create("fm", field_dims=data.field_dims)
    # lr so large that validation AUC cannot keep improving: stops after `patience` bad epochs
    result = fit(model, data, TrainConfig(lr=5.0, max_epochs=50, patience=2), progress=False)
    assert len(result.history) == result.best_epoch + 1 + 2 < 50


def test_bad_config():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(lr=0.0)


def test_checkpoint_round_trip(trained, data, tmp_path):
    path = save_checkpoint(
        tmp_path / "ckpt", trained.model, data, data_options={"n_rows": 100_000}, scores=trained.summary()
    )
    meta = json.loads((path / "meta.json").read_text())
    assert meta["model"]["name"] == "dcn" and meta["data"]["split_seed"] == 0
    assert meta["scores"]["test_auc"] == trained.test_auc and "torch" in meta["versions"]
    ckpt = load_checkpoint(path)
    for a, b in zip(ckpt.data.test.inputs, data.test.inputs, strict=True):
        assert torch.equal(a, b)  # the SAME held-out rows
    assert torch.equal(ckpt.test.labels, data.test.labels)
    assert torch.equal(predict(ckpt.model, ckpt.test), predict(trained.model, data.test))


def test_corrupt_or_missing_checkpoints_are_clear_errors(trained, data, tmp_path):
    path = save_checkpoint(tmp_path / "c", trained.model, data, data_options={"n_rows": 100_000})
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_checkpoint(tmp_path / "nope")
    weights = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="corrupt checkpoint weights"):
        load_checkpoint(path, with_data=False)
    (path / "model.safetensors").write_bytes(weights)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt checkpoint metadata"):
        load_checkpoint(path, with_data=False)
    (path / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a pytei.checkpoint/1 file"):
        load_checkpoint(path, with_data=False)
    (path / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        load_checkpoint(path)


def test_changed_data_is_refused(trained, data, tmp_path):
    path = save_checkpoint(tmp_path / "c", trained.model, data, data_options={"n_rows": 100_000})
    meta = json.loads((path / "meta.json").read_text())
    meta["data"]["options"]["n_rows"] = 90_000  # the data set it would rebuild is not the trained one
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="differs from the one this checkpoint was trained on"):
        load_checkpoint(path)


def test_weights_only_no_pickle(trained, data, tmp_path):
    path = save_checkpoint(tmp_path / "c", trained.model, data, data_options={"n_rows": 100_000})
    assert (path / "model.safetensors").read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors"]


def test_training_is_a_function_of_the_seed(data):
    """Same seed: bit-identical weights (init, shuffling and dropout all seeded); other seed: not.
    The global RNG is left as it was."""
    cfg = TrainConfig(lr=3e-3, max_epochs=2, patience=2, seed=7)

    def run(config):
        model = build("dfm", config, field_dims=data.field_dims)  # dfm has dropout
        return fit(model, data, config, progress=False).model.state_dict()

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = run(cfg)
    assert torch.equal(torch.rand(3), before)
    second = run(cfg)
    other = run(TrainConfig(lr=3e-3, max_epochs=2, patience=2, seed=8))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
