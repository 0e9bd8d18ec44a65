"""Latency of sharded inference against the unsharded model, per placement strategy and request sparsity.

Lui et al. ("Understanding Capacity-Driven Scale-Out Neural Recommendation Inference") measure what
distributing the tables costs in latency, and find it driven by the table placement and the input
sparsity. This runs that measurement on this machine: a ``dlrm-torchrec`` checkpoint served by
``world_size`` processes (``pytei.distributed.ShardedGroup``, gloo on loopback) per strategy, requests
of ``--batch`` rows per rank with ``pooling`` ids per bag (each row's own and random ones of its
table, ``pytei.distributed._rank.pooled``), against the same requests on the unsharded model in this
process. Blocks alternate reference and sharded runs (paired, interleaved: a machine whose speed
drifts moves both); the ratio reported is the median over blocks of sharded P50 (P99) / unsharded P50
(P99). The ranks and this process use one torch thread each (``--threads``).

    python benchmarks/distributed.py [--checkpoint DIR] [--strategies table_wise,column_wise,data_parallel]
        [--world-sizes 2] [--poolings 1,8,32] [--batch 128] [--requests 30] [--blocks 3]

Without ``--checkpoint`` it saves an untrained ``dlrm-torchrec`` on synthetic-ctr (8 tables of 20,000
rows; latency does not depend on the weights) in a temporary folder.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pytei import data, models
from pytei.checkpoint import load_checkpoint, save_checkpoint
from pytei.distributed import ShardedGroup
from pytei.distributed._rank import pooled


def checkpoint(root: Path) -> Path:
    """An untrained dlrm-torchrec on synthetic-ctr, saved under ``root``."""
    options = {"n_rows": 4000, "field_dims": [20_000] * 8}
    dataset = data.load("synthetic-ctr", layout="dense+kjt", **options)
    torch.manual_seed(0)
    model = models.create("dlrm-torchrec", field_dims=dataset.field_dims, dense_dim=dataset.dense_dim)
    return Path(save_checkpoint(root / "dlrm-torchrec", model, dataset, data_options=options))


def unsharded_ms(model: torch.nn.Module, inputs: tuple, requests: int) -> tuple[float, float]:
    """P50 and P99 (ms) of ``requests`` forward passes of the unsharded model (after one warm-up)."""
    times = []
    with torch.no_grad():
        model(*inputs)
        for _ in range(requests):
            t0 = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - t0)
    t = torch.tensor(times, dtype=torch.float64) * 1e3
    return float(t.quantile(0.5)), float(t.quantile(0.99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--strategies", default="table_wise,column_wise,data_parallel")
    ap.add_argument("--world-sizes", default="2")
    ap.add_argument("--poolings", default="1,8,32")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    poolings = [int(p) for p in args.poolings.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else checkpoint(Path(tmp))
        loaded = load_checkpoint(ckpt)
        assert loaded.data is not None
        model, ctr = loaded.model.eval(), loaded.data
        rank0 = torch.arange(args.batch) % len(ctr.test)  # what rank 0 times: its first rows
        dense, ids = (t[rank0] for t in ctr.test.inputs[:2])
        gen = torch.Generator().manual_seed(0)  # the seed of rank 0's pooled ids
        requests = {
            k: ctr.model_inputs(
                (dense, *pooled(ids, list(ctr.field_dims), k, gen)) if k != 1 else (dense, ids)
            )
            for k in poolings
        }
        print(f"threads {args.threads}; {args.batch} rows per request and rank, {args.requests} requests")
        head = ("strategy", "pooling", "P50 ms", "P99 ms", "ref P50", "ref P99", "P50 x", "P99 x")
        print(" ".join(f"{h:>{20 if i == 0 else 8}}" for i, h in enumerate(head)))
        for world in (int(w) for w in args.world_sizes.split(",")):
            for strategy in args.strategies.split(","):
                with ShardedGroup(
                    ckpt,
                    strategy,
                    world,
                    batch_size=args.batch,
                    test_rows=args.batch * world,
                    threads=args.threads,
                ) as group:
                    for k in poolings:
                        blocks = []  # (reference P50, P99, sharded P50, P99), alternating
                        for _ in range(args.blocks):
                            r50, r99 = unsharded_ms(model, requests[k], args.requests)
                            got = group.latency(batch=args.batch, requests=args.requests, pooling=k)
                            blocks.append((r50, r99, got["p50_ms"], got["p99_ms"]))
                        ref50, ref99, s50, s99 = (statistics.median(b[i] for b in blocks) for i in range(4))
                        x50 = statistics.median(b[2] / b[0] for b in blocks)
                        x99 = statistics.median(b[3] / b[1] for b in blocks)
                        row = (f"{strategy} x{world}", k, s50, s99, ref50, ref99, x50, x99)
                        print(
                            f"{row[0]:>20} {k:>8} " + " ".join(f"{v:>8.2f}" for v in row[2:]),
                            flush=True,
                        )


if __name__ == "__main__":
    main()
