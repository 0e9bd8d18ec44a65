"""Criteo preprocessing: time, peak memory and cache load time, extrapolated to the full 45M rows.

Writes a Criteo-format ``train.txt`` (``pytei.data.synthetic.write_criteo``: real column layout,
empty shares and vocabulary sizes) outside the repository, then in fresh subprocesses:

1. the first ``pytei.data.load("criteo", DIR)``: two streaming passes over the text + cache build;
2. a cached load (memory-mapped), and one pass over the train split in batches of 4096.

Peak memory is the subprocess's peak resident set (``VmHWM``; ``ru_maxrss`` would also count the
parent's RSS at fork time on Linux), also shown above the peak right after ``import pytei.data``
(torch alone is ~0.3 GB). ``--full-scale-counts`` also runs pass 1's value counting on
45M rows of simulated keys with the real file's 33.8M distinct categorical values (no text), which
is the part of the peak that grows with the data; per-block parsing buffers do not grow.

    python benchmarks/criteo_preprocess.py [--rows 2000000] [--dir /tmp/pytei-criteo-bench]
                                           [--reuse] [--repeat N] [--full-scale-counts]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

FULL_ROWS = 45_840_617  # lines of the real train.txt

PEAK_KIB = r"""
def peak_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
"""

CHILD = (
    PEAK_KIB
    + r"""
import json, sys, time
import pytei.data as data
base = peak_kib()
t = time.perf_counter()
ds = data.load("criteo", sys.argv[1])
load_s = time.perf_counter() - t
epoch_s = None
if sys.argv[2] == "epoch":
    t = time.perf_counter()
    for (x,), y in ds.train.batches(4096):
        x.sum()
    epoch_s = time.perf_counter() - t
print(json.dumps({"load_s": load_s, "epoch_s": epoch_s, "base_kib": base, "peak_kib": peak_kib(),
                  "rows": len(ds.train) + len(ds.valid) + len(ds.test)}))
"""
)

COUNTS_CHILD = (
    PEAK_KIB
    + r"""
import json, sys
import numpy as np
from pytei.data.criteo import _ValueCounts
from pytei.data.synthetic import CRITEO_CARDINALITY, zipf_ranks
n_rows, block = int(sys.argv[1]), 131_072
rng = np.random.default_rng(0)
counters = [_ValueCounts() for _ in CRITEO_CARDINALITY]
base = peak_kib()
for start in range(0, n_rows, block):
    n = min(block, n_rows - start)
    for counter, card in zip(counters, CRITEO_CARDINALITY):
        head = zipf_ranks(rng, n, card, 1.05)
        keys = np.where(rng.random(n) < 0.5, head, rng.integers(0, card, n))  # half uniform: real-size tails
        counter.add(*np.unique(keys, return_counts=True))
vocab = [c.frequent(10) for c in counters]
print(json.dumps({"distinct": sum(c.keys.size for c in counters), "kept": sum(v.size for v in vocab),
                  "base_kib": base, "peak_kib": peak_kib()}))
"""
)


WRITE_CHILD = r"""
import sys
from pytei.data.synthetic import write_criteo
write_criteo(sys.argv[1], int(sys.argv[2]), seed=0)
print("{}")
"""


def child(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(kib: float) -> str:
    return f"{kib / 2**20:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/pytei-criteo-bench"))
    parser.add_argument("--reuse", action="store_true", help="keep an existing train.txt of the same size")
    parser.add_argument("--repeat", type=int, default=1, help="best of N first loads (a shared CPU is noisy)")
    parser.add_argument("--full-scale-counts", action="store_true")
    args = parser.parse_args()

    source = args.dir / "train.txt"
    stamp = args.dir / "rows.txt"
    if not (args.reuse and source.exists() and stamp.exists() and stamp.read_text() == str(args.rows)):
        t = time.perf_counter()
        child(WRITE_CHILD, str(source), str(args.rows))  # keeps this process small
        stamp.write_text(str(args.rows))
        print(f"wrote {args.rows:,} rows in {time.perf_counter() - t:.0f} s")
    runs = []
    for _ in range(args.repeat):
        shutil.rmtree(args.dir / ".pytei-cache", ignore_errors=True)
        runs.append(child(CHILD, str(args.dir), "load"))
    first = min(runs, key=lambda r: r["load_s"])
    heavy = max(runs, key=lambda r: r["peak_kib"])
    cached = child(CHILD, str(args.dir), "epoch")
    cache_bytes = sum(f.stat().st_size for f in (args.dir / ".pytei-cache").rglob("*") if f.is_file())
    rows, size, seconds = first["rows"], source.stat().st_size, first["load_s"]
    peak, above = gib(heavy["peak_kib"]), gib(heavy["peak_kib"] - heavy["base_kib"])
    scale = FULL_ROWS / rows
    print(f"rows                         {rows:,} ({size / rows:.0f} B/row)")
    speed = f"{rows / seconds:,.0f} rows/s = {size / seconds / 2**20:.0f} MiB/s"
    print(f"first load (preprocessing)   {seconds:.1f} s = {speed} (best of {args.repeat})")
    print(f"  peak RSS                   {peak} ({above} above import; max of the runs)")
    print(f"cached load                  {cached['load_s'] * 1e3:.1f} ms")
    print(f"  train epoch, batches 4096  {cached['epoch_s']:.2f} s, peak RSS {gib(cached['peak_kib'])}")
    print(f"cache on disk                {cache_bytes / 2**30:.2f} GiB ({cache_bytes / rows:.0f} B/row)")
    print(f"extrapolated to {FULL_ROWS:,} rows (linear):")
    print(f"  preprocessing              {seconds * scale / 60:.1f} min")
    print(f"  cache on disk              {cache_bytes * scale / 2**30:.1f} GiB")
    if args.full_scale_counts:
        counts = child(COUNTS_CHILD, str(FULL_ROWS))
        growth = counts["peak_kib"] - counts["base_kib"]
        print(
            f"pass-1 counting at full scale: {counts['distinct']:,} distinct values, {counts['kept']:,} kept;"
        )
        print(f"  peak RSS {gib(counts['peak_kib'])} ({gib(growth)} above import)")
        print(
            f"  estimated full-scale peak  {gib(first['peak_kib'] + growth)} (this run's peak + that growth)"
        )


if __name__ == "__main__":
    main()
