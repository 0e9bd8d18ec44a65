"""The campaign runner's incremental evaluation is exact: ``ModelRunner(fast=True)`` gives bit-identical rows
to a full evaluation of every trial, for every zoo model, target, site and mitigation kind, at several BERs.

The fast runner reuses the clean outputs when no fault landed ("clean"), recomputes only the batches that
read a corrupted embedding row ("rows") or only their affected samples ("samples"), and otherwise re-executes
only the graph nodes downstream of the faults ("subgraph"). The rates and targets are chosen so that each of
these paths is taken.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from pytei import data, models
from pytei.campaign import parse_spec, plan
from pytei.campaign.runner import ModelRunner, load_evaluation
from pytei.checkpoint import save_checkpoint
from pytei.train import TrainConfig, fit

#: Each trained architecture: its data layout, a small configuration, and the glob of its output layer
#: (targeted alone: a fault that reaches only the last nodes of the graph).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "dlrm": {
        "layout": "dense+sparse",
        "config": {"embed_dim": 8, "bottom_mlp": (16, 8), "top_mlp": (16, 8)},
        "last": "top_mlp.*",
    },
    "dcn": {
        "layout": "categorical",
        "config": {"embed_dim": 8, "num_layers": 2, "mlp_dims": (16,)},
        "last": "output.*",
    },
    "wd": {"layout": "categorical", "config": {"embed_dim": 8, "mlp_dims": (16,)}, "last": "mlp.*"},
    "dfm": {"layout": "categorical", "config": {"embed_dim": 8, "mlp_dims": (16,)}, "last": "mlp.*"},
    "afm": {
        "layout": "categorical",
        "config": {"embed_dim": 8, "attn_size": 8},
        "last": "afm.*",
        "component": "attention",
    },
    "fm": {"layout": "categorical", "config": {"embed_dim": 8}, "last": "linear.*", "component": "linear"},
    # TorchRec models fed KeyedJaggedTensor batches (the optional extra pytei[torchrec])
    "dlrm-torchrec": {
        "layout": "dense+kjt",
        "config": {"embed_dim": 8, "bottom_mlp": (16, 8), "top_mlp": (16, 8)},
        "last": "over_arch.*",
    },
    "dcnv2": {
        "layout": "dense+kjt",
        "config": {
            "embed_dim": 8,
            "bottom_mlp": (16, 8),
            "top_mlp": (16, 8),
            "dcn_num_layers": 2,
            "dcn_low_rank_dim": 4,
        },
        "last": "over_arch.*",
    },
}
#: 3,000 rows: 300 test rows, cut into 64-row batches below (5 batches, so "rows" can skip some).
DATA_OPTIONS = {"n_rows": 3000, "field_dims": [100, 50, 20, 10]}
BATCH = 64
DUMMY = (
    "dummy = { mlp_depth = 2, mlp_hidden = 16, embed_dim = 8, sparsity = 0.05, sparse_dim = 64, "
    "dense_dim = 8 }"
)

# Rates per bit over models of ~2-3k float32 weights (~80k bits): at 1e-6 most trials draw no fault
# ("clean"); at 1e-4 embedding-only targets draw a few ("rows"/"samples"); at 1e-2 every target draws many,
# enough for double-bit errors that SEC-DED ECC cannot correct and for non-finite outputs (which must
# compare equal too). Weight faults get two seeds per point, activation faults one.
SPEC = """
name = "fast-{arch}"
seed = 5
runs = 2
targets = [
    "all",
    "embedding",
    "{component}",
    {{ component = "all", include = ["{last}"], label = "last" }},
]
sites = ["weights", "activations"]
mitigations = [
    "none",
    "abft",
    {{ name = "abft", scheme = "fused", label = "abft-fused" }},
    "ecc",
    "protect-bits",
    {{ name = "clip", low = -0.1, high = 0.1 }},
]
metrics = ["auc", "logloss", "rmse"]

[[models]]
{model}

[errors]
model = "BitFlip"
rates = [1e-6, 1e-4, 1e-2]
"""


def _same(a: float | None, b: float | None) -> bool:
    """Exact equality of floats, NaN equal to NaN (and None to None)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a) is type(b)


def _trials(arch: str, tmp: Path) -> list:
    if arch == "dummy":
        text = SPEC.format(arch=arch, last="predictor.*", component="mlp", model=DUMMY + "\nsamples = 300")
    else:
        info = ARCHITECTURES[arch]
        if info["layout"] == "dense+kjt":
            pytest.importorskip("torchrec")
        dataset = data.load("synthetic-ctr", layout=info["layout"], **DATA_OPTIONS)
        extra = {"dense_dim": dataset.dense_dim} if info["layout"] in ("dense+sparse", "dense+kjt") else {}
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = models.create(arch, field_dims=dataset.field_dims, **extra, **info["config"])
        config = TrainConfig(lr=3e-3, max_epochs=1, patience=1, batch_size=256)
        result = fit(model, dataset, config, progress=False)
        where = save_checkpoint(tmp / "ckpt", result.model, dataset, data_options=DATA_OPTIONS)
        model_line = f'checkpoint = "{Path(where).as_posix()}"'
        text = SPEC.format(
            arch=arch, last=info["last"], component=info.get("component", "mlp"), model=model_line
        )
    planned = plan(parse_spec(text))
    return [t for t in planned if t.site == "weights" or t.run == 0]


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "dummy"])
def test_fast_rows_equal_full_rows(arch, tmp_path):
    trials = _trials(arch, tmp_path)
    fast = ModelRunner(load_evaluation(trials[0], batch_size=BATCH), fast=True)
    full = ModelRunner(load_evaluation(trials[0], batch_size=BATCH), fast=False)
    assert fast.evaluator is not None and fast.evaluator.incremental, fast.evaluator.reason
    assert len(fast.ev.batches) == 5  # several batches, so that "rows" can recompute only some
    paths: Counter = Counter()
    by_mitigation: dict[str, set[str]] = {}
    faults: Counter = Counter()
    for trial in trials:
        a, b = fast.run(trial), full.run(trial)
        assert a.status == b.status == "ok", (trial.trial_id, a.error_message, b.error_message)
        assert b.extra["path"] == "full"
        ma, mb = a.metrics, b.metrics
        assert ma.keys() == mb.keys() and {"rmse", "baseline_rmse"} <= ma.keys(), (ma, mb)
        differ = {k: (ma[k], mb[k]) for k in ma if not _same(ma[k], mb[k])}
        assert not differ, (trial.trial_id, a.extra["path"], differ)
        for field in ("n_faults", "n_invalid", "n_outputs"):
            assert getattr(a, field) == getattr(b, field), (trial.trial_id, field)
        path = a.extra["path"]
        paths[path] += 1
        by_mitigation.setdefault(trial.mitigation, set()).add(path)
        faults["none" if a.n_faults == 0 else "some"] += 1
        if trial.site == "activations":
            assert path == "subgraph"  # faults drawn per pass: every batch, below the hooked modules
        elif path == "clean":
            assert a.n_faults == 0 or trial.mitigation in ("ecc", "protect-bits")  # or all filtered out
    assert "full" not in paths, paths
    assert {"clean", "rows", "samples", "subgraph"} <= set(paths), paths
    assert len(by_mitigation) == 6
    for mitigation, taken in by_mitigation.items():
        assert {"clean", "subgraph"} <= taken and taken & {"rows", "samples"}, (mitigation, taken)
    assert faults["none"] and faults["some"], faults
    fast.verify()
    full.verify()  # restore left both models exactly as they were
