"""The campaign runner's shortcuts are exact: ``ModelRunner(fast=True)`` gives bit-identical rows to a full
evaluation of every trial, on trained DLRM and DCN checkpoints, under every mitigation kind.

The fast runner reuses the clean outputs when no fault landed ("clean"), recomputes only the batches that
read a corrupted embedding row ("rows"), or reruns only the layers after ``forward_prefix`` when every fault
is there ("suffix"). The rates and targets are chosen so that each of these paths is taken, for each model.
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

#: Each architecture: its data layout, a small configuration, and the dotted prefix of its suffix layers
#: (``suffix_modules``), targeted alone so that the "suffix" path is taken.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "dlrm": {
        "layout": "dense+sparse",
        "config": {"embed_dim": 8, "bottom_mlp": (16, 8), "top_mlp": (16, 8)},
        "suffix": "top_mlp.*",
    },
    "dcn": {
        "layout": "categorical",
        "config": {"embed_dim": 8, "num_layers": 2, "mlp_dims": (16,)},
        "suffix": "output.*",
    },
}
#: 3,000 rows: 300 test rows, cut into 64-row batches below (5 batches, so "rows" can skip some).
DATA_OPTIONS = {"n_rows": 3000, "field_dims": [100, 50, 20, 10]}
BATCH = 64

# Rates per bit over models of ~2-3k float32 weights (~80k bits): at 1e-6 most trials draw no fault
# ("clean"); at 1e-4 embedding-only targets draw a few ("rows") and suffix-only targets sometimes one; at
# 1e-2 every target draws many, enough for double-bit errors that SEC-DED ECC cannot correct (so "rows"
# and "suffix" are reached under ECC too) and for non-finite outputs (which must compare equal too).
# ``runs = 3`` draws three seeds per point.
SPEC = """
name = "fast-{arch}"
seed = 5
runs = 3
targets = [
    "all",
    "embedding",
    "mlp",
    {{ component = "mlp", include = ["{suffix}"], label = "suffix" }},
]
sites = ["weights", "activations"]
mitigations = ["none", "abft", "ecc", "protect-bits", {{ name = "clip", low = -0.1, high = 0.1 }}]
metrics = ["auc", "logloss", "rmse"]

[[models]]
checkpoint = "{checkpoint}"

[errors]
model = "BitFlip"
rates = [1e-6, 1e-4, 1e-2]
"""


def _metrics(row: Any) -> dict[str, float]:
    """A row's metrics by name: ``row.metrics`` where TrialRow has it, else its per-metric fields."""
    if hasattr(row, "metrics"):
        return dict(row.metrics)
    names = ("auc", "logloss", "rmse", "rmse_valid", "invalid_frac")
    found = {n: getattr(row, n) for n in names if hasattr(row, n)}
    found.update(
        {f"baseline_{n}": getattr(row, f"baseline_{n}") for n in names if hasattr(row, f"baseline_{n}")}
    )
    return found


def _same(a: float | None, b: float | None) -> bool:
    """Exact equality of floats, NaN equal to NaN (and None to None)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a) is type(b)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def trials(request, tmp_path_factory) -> list:
    """The planned trials of a campaign on a freshly trained one-epoch checkpoint of the architecture."""
    arch = request.param
    info = ARCHITECTURES[arch]
    dataset = data.load("synthetic-ctr", layout=info["layout"], **DATA_OPTIONS)
    extra = {"dense_dim": dataset.dense_dim} if info["layout"] == "dense+sparse" else {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = models.create(arch, field_dims=dataset.field_dims, **extra, **info["config"])
    result = fit(
        model, dataset, TrainConfig(lr=3e-3, max_epochs=1, patience=1, batch_size=256), progress=False
    )
    where = save_checkpoint(
        tmp_path_factory.mktemp(arch) / "ckpt", result.model, dataset, data_options=DATA_OPTIONS
    )
    text = SPEC.format(arch=arch, suffix=info["suffix"], checkpoint=Path(where).as_posix())
    planned = plan(parse_spec(text))
    # Activation faults always take the full path in both runners: one seed of them is enough.
    return [t for t in planned if t.site == "weights" or t.run == 0]


def test_fast_rows_equal_full_rows(trials):
    evaluation = load_evaluation(trials[0], batch_size=BATCH)
    fast = ModelRunner(evaluation, fast=True)
    full = ModelRunner(load_evaluation(trials[0], batch_size=BATCH), fast=False)
    assert len(evaluation.batches) == 5  # several batches, so that "rows" can recompute only some
    paths: Counter = Counter()
    by_mitigation: dict[str, set[str]] = {}
    faults: Counter = Counter()
    clip_baselines: set[float] = set()
    for trial in trials:
        a, b = fast.run(trial), full.run(trial)
        assert a.status == b.status == "ok", (trial.trial_id, a.error_message, b.error_message)
        assert b.extra["path"] == "full"
        ma, mb = _metrics(a), _metrics(b)
        assert ma.keys() == mb.keys() and {"auc", "rmse", "baseline_auc"} <= ma.keys(), (ma, mb)
        differ = {k: (ma[k], mb[k]) for k in ma if not _same(ma[k], mb[k])}
        assert not differ, (trial.trial_id, a.extra["path"], differ)
        for field in ("n_faults", "n_invalid", "n_outputs"):
            assert getattr(a, field) == getattr(b, field), (trial.trial_id, field)
        path = a.extra["path"]
        paths[path] += 1
        by_mitigation.setdefault(trial.mitigation, set()).add(path)
        faults["none" if a.n_faults == 0 else "some"] += 1
        if trial.mitigation.startswith("clip"):
            clip_baselines.add(ma["baseline_rmse"])
        if trial.site == "activations":
            assert path == "full"  # the shortcuts are for weight faults only
        elif path == "clean":
            assert a.n_faults == 0 or trial.mitigation in ("ecc", "protect-bits")  # or all filtered out
    # Every shortcut was taken, under every mitigation; and some trials
    # still needed the full evaluation (faults before and after forward_prefix).
    assert {"clean", "rows", "suffix", "full"} <= set(paths), paths
    assert len(by_mitigation) == 5
    for mitigation in by_mitigation:
        taken = by_mitigation[mitigation]
        assert {"clean", "rows", "suffix"} <= taken, (mitigation, taken)
    assert faults["none"] and faults["some"], faults
    # Clipping to [-0.1, 0.1] changes the clean outputs, so the "clean" path must return the mitigated
    # clean outputs, not the unmitigated ones (under the default +-6 both are the same on these models).
    assert len(clip_baselines) == 1 and clip_baselines.pop() > 0.0
    # Three seeds of weight faults under all five mitigations; one seed of activation faults, under the
    # three that act on activations (ecc and protect-bits are planned for weights only).
    assert Counter(t.site for t in trials) == {"weights": 4 * 3 * 3 * 5, "activations": 4 * 3 * 1 * 3}
    fast.verify()
    full.verify()  # restore left both models exactly as they were
