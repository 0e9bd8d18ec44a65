"""Speed of ``pytei.bits.bit_histogram`` and ``popcount`` against the per-bit loop they replaced.

The old implementation made one Python-level pass over the masks per bit position (64 passes for a
64-bit word); the new one makes one vectorised pass (a byte-value histogram per byte position, then
a 256-entry table). For each width and number of masks it prints the median time of old and new and
the ratio new/old (below 1 = faster), measured paired and interleaved (old, new, new, old, ...) on
one thread, so drift and other load on the machine hit both alike. Results are checked equal.

    python benchmarks/bit_histogram.py [--repeats 21] [--sizes 100 10000 1000000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from pytei.bits import bit_histogram, popcount


def old_bit_histogram(masks: torch.Tensor, width: int) -> torch.Tensor:
    """The replaced implementation, verbatim: one pass over ``masks`` per bit position."""
    masks = masks.to(torch.int64)
    counts = [int(((masks >> b) & 1).sum()) for b in range(width)] if masks.numel() else [0] * width
    return torch.tensor(counts, dtype=torch.int64)


def old_popcount(masks: torch.Tensor, width: int) -> int:
    """The replaced ``popcount``: the sum of the old histogram."""
    return int(old_bit_histogram(masks, width).sum())


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired(old: Callable[[], object], new: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of ``old`` and ``new``, run in ABBA order ``repeats`` times each."""
    t_old: list[float] = []
    t_new: list[float] = []
    for i in range(repeats):
        if i % 2:
            t_new.append(_seconds(new))
            t_old.append(_seconds(old))
        else:
            t_old.append(_seconds(old))
            t_new.append(_seconds(new))
    return statistics.median(t_old), statistics.median(t_new)


def masks_of(width: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random sign-extended ``width``-bit masks (int64), as a fault map holds them."""
    view = {8: torch.int8, 16: torch.int16, 32: torch.int32, 64: torch.int64}[width]
    info = torch.iinfo(view)
    return torch.randint(info.min, info.max, (n,), generator=gen, dtype=view).to(torch.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21, help="timed runs of each (default 21)")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[100, 10_000, 1_000_000], help="numbers of masks"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print(f"{'width':>5} {'masks':>9} {'function':>13} {'old ms':>9} {'new ms':>9} {'new/old':>8}")
    for width in (8, 16, 32, 64):
        for n in args.sizes:
            masks = masks_of(width, n, gen)
            assert torch.equal(bit_histogram(masks, width), old_bit_histogram(masks, width))
            assert popcount(masks, width) == old_popcount(masks, width)
            cases: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
                "bit_histogram": (
                    lambda m=masks, w=width: old_bit_histogram(m, w),
                    lambda m=masks, w=width: bit_histogram(m, w),
                ),
                "popcount": (
                    lambda m=masks, w=width: old_popcount(m, w),
                    lambda m=masks, w=width: popcount(m, w),
                ),
            }
            for name, (old, new) in cases.items():
                old(), new()  # warm-up
                t_old, t_new = paired(old, new, args.repeats)
                ms = f"{t_old * 1e3:>9.3f} {t_new * 1e3:>9.3f}"
                print(f"{width:>5} {n:>9} {name:>13} {ms} {t_new / t_old:>8.3f}")


if __name__ == "__main__":
    main()
