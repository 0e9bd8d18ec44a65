"""ABFT's two rounding bounds: detection of small errors vs false alarms on clean data.

For each model and each bound (``norm``: a bound of the absolute terms the check sums; ``variance``:
the standard deviation of the rounding errors as independent roundings, in the spirit of V-ABFT),
with the analytic tolerance and after ``calibrate`` (margin 8 over the largest clean residual):

* false alarms: rows of clean batches (not used to calibrate) that fail the check;
* detection per bit position: single flips (``FlipCount(1, bits=[b])``) in the weights of the dense
  layers (MLPs, cross network, BatchNorm), a fresh seed per trial; a trial counts as detected when
  any row fails its check, and as a harmful miss when no row fails but a logit moved by more than
  ``--harm``.

    python benchmarks/abft_bounds.py [--trials 40] [--batch 2048] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

import pytei
from pytei import FlipCount, models
from pytei.mitigation import ABFT, mitigate

#: Models, their dense layers' weights (the targets), and their inputs.
MODELS = {
    "dlrm": ("dlrm", {"dense_dim": 13}, ["bottom_mlp.*.weight", "top_mlp.*.weight"]),
    "dcn": ("dcn", {}, ["cn.*", "mlp.*.weight", "output.weight"]),
    "wd": ("wd", {}, ["mlp.*"]),
}
BITS = (4, 8, 12, 14, 16, 18, 20, 22, 23, 26, 30)
FIELDS = [1000] * 26


def make(key: str):
    name, extra, _ = MODELS[key]
    torch.manual_seed(0)
    model = models.create(name, field_dims=FIELDS, **extra).eval().requires_grad_(False)
    with torch.no_grad():  # BatchNorm as after training: non-trivial running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def inputs(key: str, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    sparse = torch.randint(0, 1000, (n, len(FIELDS)), generator=g)
    return (torch.randn(n, 13, generator=g), sparse) if key == "dlrm" else (sparse,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40, help="flips per bit position")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--clean", type=int, default=8, help="clean batches for false alarms")
    parser.add_argument("--harm", type=float, default=1e-3, help="|logit change| of a harmful miss")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); batch {args.batch}; "
          f"{args.trials} single flips per bit in the dense layers' weights")  # fmt: skip
    for key in MODELS:
        model = make(key)
        x = inputs(key, args.batch, 0)
        clean_out = model(*x)
        calib = [inputs(key, args.batch, s) for s in (1, 2, 3)]
        clean = [inputs(key, args.batch, s) for s in range(10, 10 + args.clean)]
        include = MODELS[key][2]
        setups = {}
        for bound in ("norm", "variance"):
            setups[f"{bound}/analytic"] = ABFT(bound=bound, max_retries=0)
            calibrated = ABFT(bound=bound, max_retries=0)
            calibrated.calibrate(model, calib)
            setups[f"{bound}/calibrated"] = calibrated
        print(f"\n{key}: false alarms in {args.clean * args.batch} clean rows per layer-check")
        for name, abft in setups.items():
            print(f"  {name:>20}: {abft.measure_false_alarms(model, clean)} false alarms")
        print(f"{key}: detected share per bit (harmful misses, |logit change| > {args.harm:g})")
        print(f"  {'bit':>4} " + " ".join(f"{n:>20}" for n in setups))
        for bit in BITS:
            cells = []
            for abft in setups.values():
                found = harmful = 0
                for seed in range(args.trials):
                    with (
                        mitigate(model, abft),
                        pytei.inject(model, FlipCount(1, bits=[bit]), include=include, seed=seed),
                    ):
                        abft.reset_stats()
                        out = model(*x)
                    hit = abft.stats["detected"] > 0
                    found += hit
                    harmful += (not hit) and bool(((out - clean_out).abs() > args.harm).any())
                cells.append(f"{found / args.trials:>13.2f} ({harmful:>3})")
            print(f"  {bit:>4} " + " ".join(f"{c:>20}" for c in cells))
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
