"""Index faults (the ``indices`` site): flips in the ids lookups read, and the bounds policy for ids pushed
out of range — the same on nn.EmbeddingBag, torchrec's float EBC and its quantized (FBGEMM) version."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import pytei
from pytei.indices import IndexFaultError


class Bags(nn.Module):
    """Two nn.EmbeddingBag tables with 1-D ids and offsets."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.EmbeddingBag(50, 4, mode="sum")
        self.b = nn.EmbeddingBag(30, 4, mode="sum")

    def forward(self, ids_a: torch.Tensor, ids_b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(ids_a, offsets), self.b(ids_b, offsets)], dim=1)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randint(0, 50, (20,), generator=g),
        torch.randint(0, 30, (20,), generator=g),
        torch.arange(0, 20, 2),
    )


def test_a_high_bit_pushes_every_id_out_of_range_and_bounds_decide_what_it_reads():
    model, x = Bags(), _inputs()
    every_id_bit40 = pytei.BitFlip(ber=1.0, bits=[40])
    with pytei.inject(model, every_id_bit40, site="indices", target="embedding", seed=0) as r:
        zero = model(*x)
        assert r.indices is not None and r.indices.out_of_range == r.indices.ids == 40
    assert torch.equal(zero, model(torch.zeros_like(x[0]), torch.zeros_like(x[1]), x[2]))
    with pytei.inject(model, every_id_bit40, site="indices", target="embedding", seed=0, bounds="skip"):
        assert torch.equal(model(*x), torch.zeros(10, 8))  # every bag emptied: sum pooling of nothing
    raising = pytei.inject(model, every_id_bit40, site="indices", target="embedding", seed=0, bounds="raise")
    with raising, pytest.raises(IndexFaultError, match=r"out of range \[0, 50\)"):
        model(*x)
    assert not model.a._forward_pre_hooks and not model.b._forward_pre_hooks


def test_low_bit_flips_read_other_rows_and_the_callers_ids_are_untouched():
    model, x = Bags(), _inputs()
    before = [t.clone() for t in x]
    with pytei.inject(model, pytei.BitFlip(ber=1.0, bits=[0]), site="indices", include="a.*", seed=0) as r:
        out = model(*x)
        assert r.indices is not None and r.indices.out_of_range == 0 and r.n_faults == 20
    assert all(torch.equal(a, b) for a, b in zip(x, before, strict=True))
    assert torch.equal(out, model(x[0] ^ 1, x[1], x[2]))


def test_faults_are_fresh_each_pass_and_reproducible_by_seed():
    model, x = Bags(), _inputs()
    outs = []
    for _ in range(2):
        with pytei.inject(model, pytei.BitFlip(ber=0.05), site="indices", seed=4) as r:
            outs.append([model(*x), model(*x)])
            assert r.indices is not None and r.indices.passes == 4  # two lookups per forward
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], outs[0][1])


def test_bad_bounds_and_sites_are_clear_errors():
    with pytest.raises(
        pytei.exceptions.ArgumentError, match=r"unknown bounds 'clamp'; allowed: zero, skip, raise"
    ):
        pytei.Injector(pytei.BitFlip(ber=1e-3), site="indices", bounds="clamp")
    with pytest.raises(ValueError, match="needs site='indices'"):
        pytei.Injector(pytei.BitFlip(ber=1e-3), bounds="skip")
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(pytei.exceptions.ArgumentError, match="takes ids"):
        pytei.Injector(pytei.BitFlip(ber=1e-3), site="indices").apply(model)


# --- torchrec ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def towers():
    pytest.importorskip("torchrec")
    warnings.filterwarnings("ignore", module="torchrec")
    from torchrec.inference.modules import quantize_embeddings
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    class Tower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(
                        name="t0", embedding_dim=8, num_embeddings=40, feature_names=["f0", "f1"]
                    ),
                    EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=25, feature_names=["f2"]),
                ],
                device=torch.device("cpu"),
            )

        def forward(self, kjt):
            return self.ebc(kjt).values()

    torch.manual_seed(0)
    tower = Tower()
    return tower, quantize_embeddings(tower, dtype=torch.qint8, inplace=False)


def _kjt(values=None):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    lengths = torch.tensor([2, 1, 0, 3, 1, 2, 1, 1, 2])  # 3 features x 3 samples
    if values is None:
        g = torch.Generator().manual_seed(1)
        values = torch.cat([torch.randint(0, 40, (9,), generator=g), torch.randint(0, 25, (4,), generator=g)])
    return KeyedJaggedTensor.from_lengths_sync(keys=["f0", "f1", "f2"], values=values, lengths=lengths)


def test_float_and_quantized_ebc_get_the_same_index_faults(towers):
    tower, quant = towers
    kjt = _kjt()
    stats = []
    for model in (tower, quant):
        with pytei.inject(model, pytei.BitFlip(ber=0.02), site="indices", target="embedding", seed=3) as r:
            model(kjt)
            assert r.indices is not None
            stats.append((r.indices.bits, r.indices.ids, r.indices.out_of_range))
    assert stats[0] == stats[1] and stats[0][0] > 0


def test_zero_matches_fbgemms_own_bounds_check_and_skip_drops_the_id(towers):
    """An out-of-range id given straight to the quantized EBC is set to 0 by FBGEMM (its WARNING mode);
    pytei's ``zero`` gives the same outputs, and ``skip`` equals the bag without that id."""
    _, quant = towers
    values = _kjt().values().clone()
    flip = pytei.BitFlip(ber=1.0, bits=[20])  # every id of t1 (f2) leaves the table's 25 rows
    with pytei.inject(quant, flip, site="indices", include="ebc.embedding_bags.t1.*", seed=0) as r:
        ours = quant(_kjt(values))
        assert r.indices is not None and r.indices.out_of_range == r.indices.ids == 4
    raw = values.clone()
    raw[9:] ^= 1 << 20
    fbgemm = quant(_kjt(raw))  # FBGEMM's bounds check: "Setting idx to zero"
    assert torch.equal(ours, fbgemm)
    with pytei.inject(quant, flip, site="indices", include="ebc.embedding_bags.t1.*", seed=0, bounds="skip"):
        skipped = quant(_kjt(values))
    assert torch.equal(skipped[:, :16], quant(_kjt(values))[:, :16])
    assert torch.equal(skipped[:, 16:], torch.zeros(3, 8))  # f2's bags lost every id


# --- campaigns -----------------------------------------------------------------------------------

INDEX_SPEC = """
name = "indices"
seed = 2
runs = 2
targets = [
    {{ component = "embedding", bounds = "zero" }},
    {{ component = "embedding", bounds = "skip" }},
    {{ component = "embedding", bounds = "raise" }},
]
sites = ["indices"]
mitigations = ["none", {{ name = "clip", low = -0.5, high = 0.5 }}]
metrics = ["auc", "logloss"]

[[models]]
checkpoint = "{ckpt}"

[errors]
model = "BitFlip"
rates = [1e-4, 1e-2]
"""


def test_index_fault_campaigns_are_exact_on_the_fast_path_and_raise_fails_the_trial(tmp_path):
    from pytei import data, models
    from pytei.campaign import parse_spec, plan
    from pytei.campaign.runner import ModelRunner, load_evaluation
    from pytei.checkpoint import save_checkpoint
    from pytei.train import TrainConfig, fit

    options = {"n_rows": 3000, "field_dims": [100, 50, 20, 10]}
    dataset = data.load("synthetic-ctr", layout="dense+sparse", **options)
    torch.manual_seed(0)
    model = models.create(
        "dlrm",
        field_dims=dataset.field_dims,
        dense_dim=dataset.dense_dim,
        embed_dim=8,
        bottom_mlp=(16, 8),
        top_mlp=(16, 8),
    )
    result = fit(
        model, dataset, TrainConfig(lr=3e-3, max_epochs=1, patience=1, batch_size=256), progress=False
    )
    where = save_checkpoint(tmp_path / "ckpt", result.model, dataset, data_options=options)
    trials = plan(parse_spec(INDEX_SPEC.format(ckpt=where.as_posix())))
    assert {t.site for t in trials} == {"indices"} and len(trials) == 3 * 2 * 2 * 2
    fast = ModelRunner(load_evaluation(trials[0], batch_size=64), fast=True)
    full = ModelRunner(load_evaluation(trials[0], batch_size=64), fast=False)
    statuses = {}
    for trial in trials:
        a, b = fast.run(trial), full.run(trial)
        assert a.status == b.status, (a.error_message, b.error_message)
        statuses.setdefault(trial.target, set()).add(a.status)
        if a.status == "failed":
            assert trial.target == "embedding@raise" and "IndexFaultError" in a.error_message
            continue
        assert a.metrics == b.metrics and a.n_faults == b.n_faults and a.extra["path"] == "subgraph"
        assert a.extra["out_of_range"] == b.extra["out_of_range"]
    assert statuses["embedding@zero"] == statuses["embedding@skip"] == {"ok"}
    assert "failed" in statuses["embedding@raise"]  # at 1e-2 a high bit of some id flips
    fast.verify()
    full.verify()
