"""The incremental evaluator on TorchRec models fed KeyedJaggedTensor batches: every trial's outputs equal a
full evaluation bit for bit, for faults in embedding rows (float tables and int8/int4/int2/fp16 TBEs, a table
that serves two features), in MLP weights, in activations and under a clipping mitigation, and the fast
paths are taken: "rows" (only the batches that read a faulted row), "samples" (only the samples that read
it, as an exact KJT sub-batch) and "subgraph".
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections import Counter
from collections.abc import Sequence

import pytest
import torch
from torch import nn

torchrec = pytest.importorskip("torchrec")

from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor  # noqa: E402
from torchrec.inference.modules import quantize_embeddings  # noqa: E402

from pytei import BitFlip  # noqa: E402
from pytei.campaign import parse_spec, plan  # noqa: E402
from pytei.campaign.runner import Evaluation, ModelRunner  # noqa: E402
from pytei.incremental import IncrementalEvaluator  # noqa: E402
from pytei.incremental._jagged import take  # noqa: E402
from pytei.injector import Injector  # noqa: E402
from pytei.mitigation import ClipActivations, mitigate  # noqa: E402

#: Tables: (name, rows, features). ``t0`` serves two features; ``t2`` is tiny, so that most samples of every
#: batch read a faulted row of it (the "rows" path) while a row of ``t0``/``t1`` has few readers ("samples").
TABLES = (("t0", 100, ("f0", "f1")), ("t1", 50, ("f2",)), ("t2", 4, ("f3",)))
KEYS = ("f0", "f1", "f2", "f3")
ROWS = {f: rows for _, rows, features in TABLES for f in features}
DIM, DENSE, N, BATCH = 8, 4, 320, 64
FIELDS = ["codes", "scale", "bias", "padding"]


class TinyRec(nn.Module):
    """A float EBC (one table shared by two features), a dense tower, concatenation and a top MLP."""

    def __init__(self) -> None:
        super().__init__()
        configs = [
            EmbeddingBagConfig(name=n, embedding_dim=DIM, num_embeddings=r, feature_names=list(f))
            for n, r, f in TABLES
        ]
        self.ebc = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
        self.dense = nn.Sequential(nn.Linear(DENSE, 16), nn.ReLU(), nn.Linear(16, DIM))
        self.top = nn.Sequential(nn.Linear(DIM * (1 + len(KEYS)), 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(sparse)
        return self.top(torch.cat([self.dense(dense), pooled.values()], 1)).squeeze(1)


def _kjt(rows: int, g: torch.Generator) -> KeyedJaggedTensor:
    """A multi-hot batch: 0-3 ids per sample and key (1-2 for ``f3``)."""
    lengths, values = [], []
    for key in KEYS:
        low, high = (1, 3) if key == "f3" else (0, 4)
        n = torch.randint(low, high, (rows,), generator=g)
        lengths.append(n)
        values.append(torch.randint(0, ROWS[key], (int(n.sum()),), generator=g))
    return KeyedJaggedTensor(keys=list(KEYS), values=torch.cat(values), lengths=torch.cat(lengths))


def _batches() -> list[tuple[torch.Tensor, KeyedJaggedTensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, DENSE, generator=g), _kjt(BATCH, g)) for _ in range(N // BATCH)]


def _model(kind: str) -> nn.Module:
    """``float``, or the same model with its tables quantized (``int8``, ``int4``, ``int2``, ``fp16``) by
    torchrec into FBGEMM TBEs."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyRec().eval()
    dtypes = {"int8": torch.qint8, "int4": torch.quint4x2, "int2": torch.quint2x4, "fp16": torch.float16}
    if kind != "float":
        model = quantize_embeddings(copy.deepcopy(model), dtype=dtypes[kind], inplace=True).eval()
    return model


@torch.no_grad()
def _full(model: nn.Module, batches: Sequence[tuple]) -> torch.Tensor:
    return torch.cat([model(*b).float().reshape(-1) for b in batches])


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def _evaluator(model: nn.Module, per_sample: bool = True) -> IncrementalEvaluator:
    ev = IncrementalEvaluator(model, _batches())
    ev.prepare("none", _full(model, ev.batches), per_sample=per_sample)
    assert ev.incremental, ev.reason
    return ev


def _trials(
    model: nn.Module, ev: IncrementalEvaluator, includes: Sequence, variant: str = "none", **target
) -> Counter:
    """Inject over targets x rates x seeds; assert each outcome equals a full evaluation; count paths."""
    paths: Counter = Counter()
    for include, fields in includes:
        for ber in (1e-5, 1e-4, 1e-3, 1e-2):
            for seed in range(3):
                injector = Injector(BitFlip(ber), include=include, seed=seed, fields=fields, **target)
                report = injector.apply(model)
                try:
                    hooked = list(report.per_activation) if injector.site == "activations" else []
                    faults, numels = report.fault_map.faults, report.fault_map.numels
                    outcome = ev.evaluate(variant, faults, hooked, numels=numels)
                    if injector.site == "activations":  # the same faults again for the reference
                        injector.restore()
                        report = injector.apply(model)
                    full = _full(model, ev.batches)
                finally:
                    injector.restore()
                assert outcome is not None, (include, ber, seed)
                assert torch.equal(_bits(outcome.outputs), _bits(full)), (include, ber, seed, outcome.path)
                changed = (_bits(full) != _bits(ev.clean(variant))).nonzero().squeeze(1)
                assert bool(torch.isin(changed, outcome.recomputed).all())  # changed rows are reported
                paths[outcome.path] += 1
    assert torch.equal(_bits(_full(model, ev.batches)), _bits(ev.clean(variant)))  # restore was exact
    return paths


FLOAT_TARGETS = [
    (["ebc.embedding_bags.t0.*"], None),  # the table two features share
    (["ebc.embedding_bags.t1.*"], None),
    (["ebc.embedding_bags.t2.*"], None),  # every batch reads every row: "rows"
    (["top.2.*"], None),
    (None, None),
]


def test_kjt_sub_batches_keep_each_samples_ids_in_order():
    kjt = _batches()[0][1]
    idx = torch.tensor([0, 3, 4, 17, 63])
    sub = take(kjt, idx)
    assert sub.keys() == kjt.keys() and sub.stride() == idx.numel()
    for key in KEYS:
        whole, part = kjt[key].to_dense(), sub[key].to_dense()
        assert len(part) == idx.numel()
        for k, s in enumerate(idx.tolist()):
            assert torch.equal(part[k], whole[s]), (key, s)


def test_float_ebc_paths_are_exact():
    model = _model("float")
    ev = _evaluator(model)
    paths = _trials(model, ev, FLOAT_TARGETS)
    assert {"clean", "rows", "samples", "subgraph"} <= set(paths), paths
    assert "full" not in paths


def test_float_ebc_without_sub_batches_uses_rows():
    model = _model("float")
    ev = _evaluator(model, per_sample=False)
    paths = _trials(model, ev, FLOAT_TARGETS[:2])
    assert "rows" in paths and "samples" not in paths and "full" not in paths, paths


@pytest.mark.parametrize("kind", ["int8", "int4", "int2", "fp16"])
def test_quantized_ebc_paths_are_exact(kind):
    model = _model(kind)
    ev = _evaluator(model)
    rows = FIELDS if kind.startswith("int") else ["codes"]  # fp16 rows: values only, no padding at dim 8
    qparams = (["ebc.embedding_bags.t1.weight_q*"], ["scale", "bias"])
    targets = [
        (["ebc.embedding_bags.t0.*"], rows),  # codes, scale, bias and (never read) padding
        qparams if kind.startswith("int") else (["ebc.embedding_bags.t1.*"], rows),
        (["ebc.embedding_bags.t2.*"], rows),
        (["dense.*"], None),
    ]
    paths = _trials(model, ev, targets)
    assert {"clean", "rows", "samples", "subgraph"} <= set(paths), paths
    assert "full" not in paths


def test_faults_in_row_padding_change_nothing():
    model = _model("int4")
    ev = _evaluator(model)
    injector = Injector(BitFlip(1e-2), include=["ebc.embedding_bags.*_padding"], fields=["padding"], seed=0)
    report = injector.apply(model)
    try:
        assert report.n_faults > 0
        faults, numels = report.fault_map.faults, report.fault_map.numels
        outcome = ev.evaluate("none", faults, numels=numels)
        full = _full(model, ev.batches)
    finally:
        injector.restore()
    assert outcome is not None and outcome.path == "clean"
    assert torch.equal(_bits(outcome.outputs), _bits(full))


def test_activation_faults_on_tables_inside_the_collection():
    model = _model("float")
    ev = _evaluator(model)
    # the hooked EmbeddingBags run inside the EBC's node: it is re-run with them
    paths = _trials(model, ev, [(["ebc.embedding_bags.t1.*"], None), (["top.0.*"], None)], site="activations")
    assert set(paths) == {"subgraph"}, paths


def test_clip_mitigation_variant():
    model = _model("float")
    ev = _evaluator(model)
    clip = ClipActivations(-0.05, 0.05, layers=["dense.0", "top.0"])
    with mitigate(model, clip):
        ev.prepare("clip", _full(model, ev.batches), per_sample=True)
        assert not torch.equal(ev.clean("clip"), ev.clean("none"))  # clipping changes clean outputs
        paths = _trials(model, ev, FLOAT_TARGETS, "clip")
    assert {"rows", "samples", "subgraph"} <= set(paths), paths


def test_hooks_added_since_the_clean_pass_are_rerun():
    """A hook the caller does not name (an index fault XOR-ing a copy of the ids before the EBC runs, a
    scaled layer) still reaches the outputs, exactly."""
    model = _model("int8")
    ev = _evaluator(model)

    def corrupt_ids(module: nn.Module, args: tuple) -> tuple:
        kjt = args[0]
        values = kjt.values().clone()
        values[::7] ^= 1
        return (KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths()),)

    for module, hook in ((model.ebc, corrupt_ids), (model.top[0], None)):
        if hook is not None:
            handle = module.register_forward_pre_hook(hook)
        else:
            handle = module.register_forward_hook(lambda m, a, out: out * 1.5)
        try:
            outcome = ev.evaluate("none", {})
            full = _full(model, ev.batches)
        finally:
            handle.remove()
        assert outcome is not None and outcome.path == "subgraph", outcome
        assert torch.equal(_bits(outcome.outputs), _bits(full))
        assert not torch.equal(_bits(full), _bits(ev.clean("none")))
    assert ev.evaluate("none", {}).path == "clean"  # the hooks are gone: clean again


def test_model_with_hooks_gone_since_the_clean_pass_is_evaluated_in_full():
    model = _model("float")
    clip = ClipActivations(-0.05, 0.05, layers=["top.0"])
    ev = IncrementalEvaluator(model, _batches())
    with mitigate(model, clip):
        ev.prepare("clip", _full(model, ev.batches))
    assert ev.evaluate("clip", {}) is None  # its cached values assume the clipping hook


# --- through the campaign runner ---------------------------------------------------------------------

SPEC = """
name = "fast-torchrec"
seed = 5
runs = 1
targets = ["all"]
sites = ["weights"]
mitigations = ["none", "ecc", { name = "clip", low = -0.05, high = 0.05 }]
metrics = ["rmse"]

[[models]]
dummy = { mlp_depth = 1, mlp_hidden = 8, embed_dim = 4, sparsity = 0.05, sparse_dim = 8, dense_dim = 4 }
samples = 100

[errors]
model = "BitFlip"
rates = [1e-4]
"""


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_runner_fast_rows_equal_full_rows(kind):
    """``ModelRunner(fast=True)`` on a KJT model gives the rows of a full evaluation, bit for bit, with and
    without mitigations (ECC sees a TBE table's rows as stored: one site over their bytes)."""
    batches = _batches()
    labels = (torch.arange(N) % 3 == 0).float()
    runners = [
        ModelRunner(Evaluation("tiny", "tinyrec", "synthetic", _model(kind), batches, labels), fast=fast)
        for fast in (True, False)
    ]
    assert runners[0].evaluator is not None and runners[0].evaluator.incremental
    template = plan(parse_spec(SPEC))
    targets = [
        {"target": "embedding", "include": ["ebc.embedding_bags.t0.*"]},
        {"target": "embedding", "include": ["ebc.embedding_bags.t2.*"]},
        {"target": "mlp", "include": ["top.*"]},
    ]
    if kind != "float":
        targets[0]["fields"] = ["codes", "scale", "bias"]
    paths: Counter = Counter()
    by_mitigation: dict[str, set[str]] = {}
    n = 0
    for trial in template:
        for spec in targets:
            for ber in (1e-3, 1e-2):
                for seed in range(2):
                    n += 1
                    t = dataclasses.replace(
                        trial,
                        trial_id=f"t{n}",
                        target_spec={
                            "params": "all",
                            "exclude": None,
                            **{k: v for k, v in spec.items() if k != "fields" or trial.mitigation != "ecc"},
                        },
                        error={"model": "BitFlip", "ber": ber, "bits": None},
                        rate=ber,
                        seed=seed,
                        metrics=("auc", "logloss", "rmse"),
                    )
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        fast, full = (r.run(t) for r in runners)
                    assert fast.status == full.status == "ok", (fast.error_message, full.error_message)
                    assert full.extra["path"] == "full" and fast.n_faults == full.n_faults
                    differ = {k: v for k, v in fast.metrics.items() if not _same(v, full.metrics[k])}
                    assert fast.metrics.keys() == full.metrics.keys() and not differ, (t.target_spec, differ)
                    paths[fast.extra["path"]] += 1
                    by_mitigation.setdefault(t.mitigation, set()).add(fast.extra["path"])
    assert {"rows", "samples", "subgraph"} <= set(paths) and "full" not in paths, paths
    assert len(by_mitigation) == 3, by_mitigation
    assert all(taken & {"rows", "samples"} for taken in by_mitigation.values()), by_mitigation
    for r in runners:
        r.verify()


CKPT_SPEC = """
name = "fast-quantized"
seed = 3
runs = 2
targets = ["all", "embedding", {{ component = "all", include = ["over_arch.*"], label = "last" }}]
sites = ["weights"]
mitigations = ["none", "ecc", {{ name = "clip", low = -0.1, high = 0.1 }}]
metrics = ["auc", "logloss", "rmse"]

[[models]]
checkpoint = "{checkpoint}"

[errors]
model = "BitFlip"
rates = [1e-4, 1e-3, 1e-2]
"""


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_campaign_on_a_quantized_zoo_checkpoint_is_exact(dtype, tmp_path):
    """dlrm-torchrec quantized by ``pytei.torchrec.quantize``, saved and loaded as a campaign checkpoint."""
    from pytei import data, models
    from pytei.campaign.runner import load_evaluation
    from pytei.checkpoint import save_checkpoint
    from pytei.torchrec.quantize import quantize

    options = {"n_rows": 2000, "field_dims": [100, 50, 20, 10]}
    dataset = data.load("synthetic-ctr", layout="dense+kjt", **options)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = models.create(
            "dlrm-torchrec", field_dims=dataset.field_dims, dense_dim=dataset.dense_dim, embed_dim=8,
            bottom_mlp=(16, 8), top_mlp=(16, 8),
        )  # fmt: skip
    where = save_checkpoint(tmp_path / "q", quantize(model, dtype), dataset, data_options=options)
    trials = plan(parse_spec(CKPT_SPEC.format(checkpoint=where.as_posix())))
    fast, full = (ModelRunner(load_evaluation(trials[0], batch_size=BATCH), fast=f) for f in (True, False))
    assert fast.evaluator is not None and fast.evaluator.incremental, fast.evaluator.reason
    assert len(fast.ev.batches) > 1
    paths: Counter = Counter()
    for trial in trials:
        a, b = fast.run(trial), full.run(trial)
        assert a.status == b.status == "ok", (a.error_message, b.error_message)
        differ = {k: v for k, v in a.metrics.items() if not _same(v, b.metrics[k])}
        assert a.metrics.keys() == b.metrics.keys() and not differ, (trial.target, trial.mitigation, differ)
        assert a.n_faults == b.n_faults and b.extra["path"] == "full"
        paths[a.extra["path"]] += 1
    assert {"clean", "rows", "subgraph"} <= set(paths) and "full" not in paths, paths
    fast.verify()
    full.verify()
