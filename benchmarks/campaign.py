"""Campaign throughput: pytei's runner (incremental evaluation) against plain loops, paired and interleaved.

For each workload the same planned trials run three ways, in alternating blocks in one process:

* pytei: ``ModelRunner`` (model loaded once; clean node values cached; per trial only the graph nodes,
  batches and samples the faults reach are recomputed; bit-identical to full evaluation);
* plain: ``with pytei.inject(model, ...)`` + a full evaluation of every row + ``metrics.score``;
* naive (DLRM mixed targets only): reload the checkpoint from disk per trial, inject, evaluate, score.

Load and golden outputs are outside the timed loops for all. Prints trials/s, the ratios, the paths the
runner took (clean / rows / samples / subgraph / full) and its cache's measured memory.

    python benchmarks/campaign.py [--rows 200000] [--vocab 50000] [--trials 40] [--threads 1]

Targets (issue 12): DLRM (26 tables x 50,000 rows), BER 1e-5 into MLP weights, AUC on 20,000 rows:
>= 10x the plain loop; DLRM mixed targets over BER 1e-7..1e-3: >= 20x the naive loop.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import pytei
from pytei import metrics, models
from pytei.campaign import parse_spec, plan
from pytei.campaign.plan import Trial, build_error
from pytei.campaign.runner import ModelRunner, load_evaluation
from pytei.checkpoint import load_checkpoint, save_checkpoint
from pytei.data import load
from pytei.train import predict

BLOCK = 5  # trials per timed block; blocks alternate between the methods


@models.register("bench_two_tower")
class TwoTower(nn.Module):
    """A model outside the zoo: embedding bags per field + a dense tower, concatenated into an MLP head."""

    input_layout = "custom"

    def __init__(self, fields: int = 8, rows: int = 20_000, dim: int = 16) -> None:
        super().__init__()
        self.fields, self.rows = fields, rows
        self.tables = nn.ModuleList(nn.EmbeddingBag(rows, dim, mode="sum") for _ in range(fields))
        self.tables.pytei_component = "embedding"
        self.dense = nn.Sequential(nn.Linear(13, 64), nn.ReLU(), nn.Linear(64, dim))
        self.head = nn.Sequential(nn.Linear(dim * (fields + 1), 128), nn.ReLU(), nn.Linear(128, 1))
        self.dense.pytei_component = self.head.pytei_component = "mlp"

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(sparse.shape[0])
        pooled = [t(sparse[:, k], offsets) for k, t in enumerate(self.tables)]
        return self.head(torch.cat([self.dense(dense), *pooled], 1)).squeeze(1)

    def example_inputs(self, n: int, seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        dense = torch.randn(n, 13, generator=g, dtype=torch.float32)
        return dense, torch.randint(0, self.rows, (n, self.fields), generator=g, dtype=torch.int64)


def make_checkpoint(directory: Path, arch: str, rows: int, vocab: int) -> Path:
    """A Criteo-shaped model (26 tables of ``vocab`` rows; DLRM also 13 dense features) on synthetic CTR
    data. Untrained: speed does not depend on the weights' values."""
    layout = "dense+sparse" if arch == "dlrm" else "categorical"
    options = {"n_rows": rows, "field_dims": [vocab] * 26}
    data = load("synthetic-ctr", layout=layout, **options)
    extra = {"dense_dim": data.dense_dim} if arch == "dlrm" else {}
    model = models.create(arch, field_dims=data.field_dims, **extra)
    return save_checkpoint(directory / arch, model, data, data_options=options)


def spec(model: str, targets: str, rates: str, runs: int, metric: str = "auc") -> list[Trial]:
    text = f"""
name = "bench"
runs = {runs}
targets = [{targets}]
metrics = {sorted({metric, "rmse"})}
[[models]]
{model}
[errors]
model = "BitFlip"
rates = {rates}
"""
    return plan(parse_spec(text))


class Plain:
    """``pytei.inject`` + full evaluation + scoring per trial, on its own copy of the model."""

    def __init__(self, trial: Trial, reload: Path | None = None) -> None:
        self.ev = load_evaluation(trial)
        self.reload = reload
        with torch.no_grad():
            self.golden = torch.cat([self.ev.model(*b).float().reshape(-1) for b in self.ev.batches])

    def __call__(self, t: Trial) -> None:
        model = self.ev.model if self.reload is None else load_checkpoint(self.reload, with_data=False).model
        with torch.no_grad(), pytei.inject(model, build_error(t.error), seed=t.seed, **t.target_spec):
            if self.reload is None:
                out = torch.cat([model(*b).float().reshape(-1) for b in self.ev.batches])
            else:
                out = predict(model, load_checkpoint(self.reload).test, batch_size=2048)
        metrics.score(out, self.ev.labels, self.golden, metrics=t.metrics)


def interleaved(trials: list[Trial], methods: dict[str, Callable[[Trial], object]]) -> dict[str, float]:
    """Seconds per method over all trials, run in alternating blocks of ``BLOCK`` trials."""
    spent = dict.fromkeys(methods, 0.0)
    names = list(methods)
    for k in range(0, len(trials), BLOCK):
        block = trials[k : k + BLOCK]
        for name in names if (k // BLOCK) % 2 == 0 else reversed(names):
            started = time.perf_counter()
            for t in block:
                methods[name](t)
            spent[name] += time.perf_counter() - started
    return spent


def run(title: str, trials: list[Trial], naive: Path | None = None) -> None:
    runner = ModelRunner(load_evaluation(trials[0]))
    paths: Counter = Counter()

    def pytei_trial(t: Trial) -> None:
        paths[runner.run(t).extra["path"]] += 1

    methods: dict[str, Callable[[Trial], object]] = {"pytei": pytei_trial, "plain": Plain(trials[0])}
    if naive is not None:
        methods["naive"] = Plain(trials[0], reload=naive)
    spent = interleaved(trials, methods)
    n = len(trials)
    rates = "  ".join(f"{name} {n / s:7.1f}/s" for name, s in spent.items())
    ratios = "  ".join(
        f"vs {name} {s / spent['pytei']:5.1f}x" for name, s in spent.items() if name != "pytei"
    )
    assert runner.evaluator is not None
    print(f"{title}: {n} trials  {rates}  {ratios}", flush=True)
    print(f"    paths {dict(paths)}; {runner.evaluator.cache_report()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="data set rows (a tenth are scored)")
    parser.add_argument("--vocab", type=int, default=50_000, help="rows per embedding table")
    parser.add_argument("--trials", type=int, default=40, help="seeds of the single-rate workloads")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a loaded machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch threads: {torch.get_num_threads()}; test rows: {args.rows // 10:,}; "
        f"tables: 26 x {args.vocab:,}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        dlrm = make_checkpoint(Path(tmp), "dlrm", args.rows, args.vocab)
        dcn = make_checkpoint(Path(tmp), "dcn", args.rows, args.vocab)
        ckpt = f'checkpoint = "{dlrm.as_posix()}"'
        mlp = '{ component = "mlp" }'
        mixed = (
            '{ component = "all" }, { component = "mlp" }, { component = "embedding" }, '
            '{ component = "mlp", include = ["top_mlp.*"], label = "top" }'
        )
        sweep = "{ start = 1e-7, stop = 1e-3, per_decade = 1 }"
        run("dlrm  mlp       BER 1e-5", spec(ckpt, mlp, "[1e-5]", args.trials))
        run("dlrm  mixed     BER 1e-7..1e-3", spec(ckpt, mixed, sweep, 2), naive=dlrm)
        dcn_spec = f'checkpoint = "{dcn.as_posix()}"'
        run("dcn   mlp       BER 1e-5", spec(dcn_spec, mlp, "[1e-5]", args.trials))
        run("dcn   embedding BER 1e-7..1e-5", spec(dcn_spec, '"embedding"', "[1e-7, 1e-6, 1e-5]", 8))
        user = 'model = "bench_two_tower"\nsamples = 20000'
        both = '{ component = "mlp" }, { component = "embedding" }'
        run("user  mlp+emb   BER 1e-6..1e-4", spec(user, both, "[1e-6, 1e-5, 1e-4]", 6, metric="rmse"))


if __name__ == "__main__":
    main()
