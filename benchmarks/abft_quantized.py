"""Detection rate of ABFT's quantized-row checksums per bit position, for int8 and int4 tables.

TorchRec's DLRM (``dlrm-torchrec``, 8 tables of 100 rows, dim 16 or ``--dim``, TorchRec's default
initialisation) quantized by ``pytei.torchrec.quantize``; a batch of multi-hot bags (1-3 ids, or
1..``--max-ids``) under
``ABFT(max_retries=0)`` (analytic tolerance, or ``--calibrate`` on clean batches). Each trial flips one
bit, ``FlipCount(1, bits=...)`` restricted to one field of the tables' rows (codes: bit ``k`` of a code,
for int4 either code of a byte; scale and bias: fp16 bit ``k``), with its own seed, in a row the batch
reads (trials whose row the batch does not read are drawn again), and records whether the collection's
check flagged a bag and how much the logits moved. Columns: ``trials``; ``detected`` the share of
trials with a bag flagged; ``missed>1e-3`` the share neither flagged nor harmless (a logit moved by
more than 1e-3); ``no effect`` the share that changed no logit at all.

A flip changes a bag's row sum by ``d`` (``scale * 2**k`` for code bit ``k``, ``(scale' - scale) *
sum(codes)`` for the scale, ``D * (bias' - bias)`` for the bias), caught when ``|d| > tau * m +
|r_clean|`` with ``m ~ L * D * (|bias| + scale * mean code)``: the low code bits of int8 rows are the
first to pass as width ``D`` and bag size ``L`` grow (``--dim 128 --max-ids 40``), harmlessly.

    python benchmarks/abft_quantized.py [--trials 100] [--batch 512] [--dim 16] [--max-ids 3]
                                        [--calibrate] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import torch

import pytei
from pytei import FlipCount
from pytei.mitigation import ABFT, mitigate

FIELD_DIMS, DENSE_DIM = [100] * 8, 13
#: Ids per bag: uniform in 1..MAX_IDS (``--max-ids``); embedding width ``--dim``.
MAX_IDS, DIM = 3, 16
KEYS = [f"cat_{i}" for i in range(len(FIELD_DIMS))]
EBC = "sparse_arch.embedding_bag_collection"
TABLES = f"{EBC}.embedding_bags.*"
HARM = 1e-3


def inputs(batch: int, seed: int, max_ids: int) -> tuple[torch.Tensor, Any]:
    """Dense features and a KJT of multi-hot bags (1..max_ids ids, uniform over each table's rows)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_ids + 1, (len(KEYS) * batch,), generator=g)
    rows = torch.tensor(FIELD_DIMS).repeat_interleave(batch).repeat_interleave(lengths)
    values = (torch.rand(int(lengths.sum()), generator=g) * rows).long()
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=KEYS, values=values, lengths=lengths)
    return torch.randn(batch, DENSE_DIM, generator=g), kjt


def code_bits(dtype: str, k: int) -> list[int]:
    """Byte bits holding bit ``k`` of a code (``8 // bits`` codes a byte, the first in the low bits)."""
    bits = 8 if dtype == "int8" else 4
    return list(range(k, 8, bits))


def read_rows(kjt: Any) -> dict[str, set[int]]:
    """The rows each table (``t_<feature>``) is read at by the batch."""
    return {f"t_{key}": set(kjt[key].values().tolist()) for key in KEYS}


def hit_row(model: torch.nn.Module, report: Any) -> tuple[str, int]:
    """The table and row of a trial's single flip."""
    from pytei.torchrec import table_of

    ((site, faults),) = report.fault_map.faults.items()
    table, field = table_of(model, site)
    width = table.site(field).tensor.shape[1]
    return table.table, int(faults.index[0]) // width


def run(args: argparse.Namespace, dtype: str) -> list[tuple]:
    from pytei.torchrec.quantize import quantize

    torch.manual_seed(args.seed)
    model = pytei.models.create(
        "dlrm-torchrec",
        field_dims=FIELD_DIMS,
        dense_dim=DENSE_DIM,
        embed_dim=args.dim,
        bottom_mlp=(64, args.dim),
    ).eval()
    q = quantize(model, dtype).requires_grad_(False)
    x = inputs(args.batch, args.seed + 1, args.max_ids)
    rows = read_rows(x[1])
    abft = ABFT(max_retries=0)
    if args.calibrate:
        abft.calibrate(q, [inputs(args.batch, args.seed + 100 + i, args.max_ids) for i in range(4)])
    trials = args.trials
    with torch.no_grad():
        clean = q(*x)
    fields = [("codes", 8 if dtype == "int8" else 4), ("scale", 16), ("bias", 16)]
    out = []
    with torch.no_grad(), mitigate(q, abft):
        for field, width in fields:
            for bit in range(width):
                bits = code_bits(dtype, bit) if field == "codes" else [bit]
                done = detected = missed = inert = 0
                draw = 0
                while done < trials:
                    draw += 1
                    abft.reset_stats()
                    error = FlipCount(1, bits=tuple(bits))
                    with pytei.inject(q, error, include=TABLES, fields=[field], seed=draw) as report:
                        logits = q(*x)
                        table, row = hit_row(q, report)
                    if row not in rows[table]:
                        continue
                    done += 1
                    caught = abft.stats["per_layer"][EBC]["detected"] > 0
                    change = float((logits - clean).abs().nan_to_num(float("inf")).max())
                    detected += caught
                    missed += (not caught) and change > HARM
                    inert += change == 0.0
                out.append((dtype, field, bit, done, detected / done, missed / done, inert / done))
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=100, help="flips per (dtype, field, bit)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dim", type=int, default=DIM, help="embedding width")
    parser.add_argument("--max-ids", type=int, default=MAX_IDS, help="ids per bag: 1..max-ids")
    parser.add_argument("--calibrate", action="store_true", help="calibrated tau instead of the analytic one")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tau = "calibrated (margin 8, 4 clean batches)" if args.calibrate else "analytic u*(8*sqrt(n)+4)"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); dlrm-torchrec {len(FIELD_DIMS)} "
        f"tables x {FIELD_DIMS[0]} rows, dim {args.dim}; batch {args.batch}, 1-{args.max_ids} ids a bag; "
        f"tau {tau}; {args.trials} trials per row"
    )
    start = time.perf_counter()
    header = ("dtype", "field", "bit", "trials", "detected", "missed>1e-3", "no effect")
    print("{:<6} {:<6} {:>3} {:>6} {:>9} {:>12} {:>10}".format(*header))
    for dtype in ("int8", "int4"):
        for row in run(args, dtype):
            d, field, bit, n, det, miss, inert = row
            print(f"{d:<6} {field:<6} {bit:>3} {n:>6} {det:>9.3f} {miss:>12.3f} {inert:>10.3f}")
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
