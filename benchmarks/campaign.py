"""Campaign throughput: pytei's runner against the naive loop, in the same run.

Naive loop (what a script without pytei's runner does): for every trial, reload the model from its
checkpoint on disk, inject, evaluate every test row, score, restore. pytei's runner loads each model
once, keeps golden outputs, and recomputes only what a trial's faults can reach (no landed fault:
nothing; embedding faults: the batches that read a corrupted row; top-MLP faults: the top MLP over
cached bottom activations). Prints trials per second and the speed-up for MLP-only targets and for
a mix of targets.

    python benchmarks/campaign.py [--rows 200000] [--runs 3] [--vocab 50000] [--top-mlp 64,32]

Targets: >= 10x on MLP-only (top MLP) targets, >= 3x overall.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pytei import metrics, models
from pytei.campaign import parse_spec, plan
from pytei.campaign.plan import build_error
from pytei.campaign.runner import ModelRunner, load_evaluation
from pytei.checkpoint import load_checkpoint, save_checkpoint
from pytei.data import load
from pytei.injector import Injector
from pytei.train import predict


def make_checkpoint(directory: Path, rows: int, vocab: int, top_mlp: tuple[int, ...]) -> Path:
    """A Criteo-shaped DLRM (13 dense features, 26 tables of ``vocab`` rows) on synthetic CTR data.

    Untrained: speed does not depend on the weights' values."""
    options = {"n_rows": rows, "field_dims": [vocab] * 26}
    data = load("synthetic-ctr", layout="dense+sparse", **options)
    model = models.create("dlrm", field_dims=data.field_dims, dense_dim=data.dense_dim, top_mlp=top_mlp)
    return save_checkpoint(directory / "dlrm", model, data, data_options=options)


def spec_text(ckpt: Path, targets: str, runs: int) -> str:
    return f"""
name = "bench"
runs = {runs}
targets = [{targets}]
metrics = ["auc", "rmse"]
[[models]]
checkpoint = "{ckpt}"
[errors]
model = "BitFlip"
rates = {{ start = 1e-7, stop = 1e-3, per_decade = 1 }}
"""


def naive(trials, ckpt: Path) -> float:
    data = load_checkpoint(ckpt).test
    golden = predict(load_checkpoint(ckpt, with_data=False).model, data)
    t0 = time.perf_counter()
    for t in trials:
        model = load_checkpoint(ckpt, with_data=False).model
        with torch.no_grad():
            inj = Injector(build_error(t.error), seed=t.seed, **t.target_spec)
            inj.apply(model)
            try:
                out = predict(model, data, batch_size=2048)
            finally:
                inj.restore()
        metrics.score(out, data.labels, golden)
    return time.perf_counter() - t0


def fast(trials) -> float:
    runner = ModelRunner(load_evaluation(trials[0]))  # load + golden outside the timed loop, like naive
    t0 = time.perf_counter()
    for t in trials:
        runner.run(t)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=50_000, help="rows per embedding table")
    parser.add_argument("--top-mlp", default="64,32", help="DLRM top MLP widths (default: pytei's default)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        top = tuple(int(w) for w in args.top_mlp.split(","))
        ckpt = make_checkpoint(Path(tmp), args.rows, args.vocab, top)
        cases = {
            "top MLP only": '{ component = "mlp", include = ["top_mlp.*"], label = "top" }',
            "mix (all, mlp, embedding, top MLP)": (
                '{ component = "all" }, { component = "mlp" }, { component = "embedding" }, '
                '{ component = "mlp", include = ["top_mlp.*"], label = "top" }'
            ),
        }
        print(
            f"DLRM (top MLP {top}), 26 tables x {args.vocab:,} rows, synthetic CTR data, "
            f"{args.rows // 10:,} test rows, BER 1e-7..1e-3, {args.runs} runs"
        )
        print(f"{'targets':>36} {'trials':>7} {'naive trials/s':>15} {'pytei trials/s':>15} {'speed-up':>9}")
        for name, targets in cases.items():
            trials = plan(parse_spec(spec_text(ckpt, targets, args.runs)))
            t_naive, t_fast = naive(trials, ckpt), fast(trials)
            n = len(trials)
            print(
                f"{name:>36} {n:>7} {n / t_naive:>15.1f} {n / t_fast:>15.1f} {t_naive / t_fast:>8.1f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
