"""Injection speed and memory on a Criteo-sized model, as ratios against two references.

Model: an 18.4M-parameter float32 embedding table plus an MLP (~19M parameters, like the paper's
Criteo models). For each BER it prints the median time of inject + restore with pytei, and
  (a) one full copy of all parameters: the memory-bandwidth floor of any approach that touches
      every value (e.g. snapshot-and-restore), and
  (b) a dense per-bit reference: a Bernoulli draw for every bit of every parameter, packed into
      XOR masks (how the original PyTEI works; it needs ~32 floats per parameter).
Peak extra memory is measured in a fresh subprocess per case (CPU: growth of the peak RSS mark,
reset just before the trial; CUDA: torch.cuda.max_memory_allocated).

``--torchrec`` (needs ``pytei[torchrec]``) times the production stack instead: a TorchRec
EmbeddingBagCollection of the same 18.4M parameters quantized to int8 rows (FBGEMM TBE, per-row fp16
scale and bias, 16-byte rows), injected over the same target as the float rows (every table, its
codes, scale and bias; padding excluded), against one copy of the tables' bytes into a preallocated
buffer (the memory-bandwidth floor, without allocation or page faults). Each repeat runs the
copy and the injection back to back (paired, alternating order); it prints the median of the
per-pair ratios.

    python benchmarks/injection.py [--device cuda] [--bers 1e-9 1e-6 1e-3 1e-2] [--quick]
    python benchmarks/injection.py --torchrec [--bers 1e-6 1e-5 1e-4 1e-3 1e-2] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import pytei
import pytei.torchrec
from pytei.bits import bit_values

EMB_ROWS, EMB_DIM = 1_150_000, 16  # 18.4M parameters


def build_model(device: str) -> nn.Module:
    """Criteo-shaped model, filled in place (no temporaries, so RSS reflects the model alone)."""
    with torch.device("meta"):
        model = nn.Sequential(
            nn.Embedding(EMB_ROWS, EMB_DIM),
            nn.Linear(39 * EMB_DIM, 400),
            nn.ReLU(),
            nn.Linear(400, 400),
            nn.ReLU(),
            nn.Linear(400, 1),
        )
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05, generator=gen)
    return model


def pytei_trial(model: nn.Module, ber: float, seed: int) -> None:
    injector = pytei.Injector(pytei.BitFlip(ber), seed=seed)
    injector.apply(model)
    injector.restore()


def copy_trial(model: nn.Module, ber: float, seed: int) -> None:
    copies = [p.detach().clone() for p in model.parameters()]
    del copies


def dense_trial(model: nn.Module, ber: float, seed: int) -> None:
    """Per-bit Bernoulli masks for every bit of every parameter, XOR in, XOR out."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            words = p.detach().view(torch.int32)
            shifts = bit_values(32).to(words.device)
            bits = torch.rand(p.numel(), 32, device=words.device, generator=gen) < ber
            mask = (bits.to(torch.int64) * shifts).sum(1).to(torch.int32).view(p.shape)
            words ^= mask
            words ^= mask


TRIALS = {"pytei": pytei_trial, "copy": copy_trial, "dense": dense_trial}


def time_trial(name: str, model: nn.Module, ber: float, repeats: int) -> float:
    fn = TRIALS[name]
    fn(model, ber, 0)  # warm-up
    times = []
    for i in range(repeats):
        if model[0].weight.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(model, ber, i + 1)
        if model[0].weight.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_memory(name: str, ber: float, device: str) -> int:
    """Peak extra bytes of one trial, in a fresh process (run as ``--memory NAME BER``)."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory", name, str(ber), "--device", device],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def _memory_child(name: str, ber: float, device: str) -> None:
    model = build_model(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        TRIALS[name](model, ber, 1)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:  # Linux: reset the peak-RSS mark (VmHWM) to the current RSS, run, read the new peak
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _status_kib("VmRSS")
        TRIALS[name](model, ber, 1)
        extra = (_status_kib("VmHWM") - base) * 1024
    print(json.dumps({"extra_bytes": extra}))


#: The quantized EBC: four tables of the float model's 1.15M x 16 rows.
TORCHREC_TABLES = 4


def build_torchrec(device: str) -> nn.Module:
    """An int8-quantized TorchRec EBC of ``EMB_ROWS x EMB_DIM`` parameters (FBGEMM IntNBit TBE rows)."""
    from torchrec.inference.modules import quantize_embeddings
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    rows = EMB_ROWS // TORCHREC_TABLES
    configs = [
        EmbeddingBagConfig(name=f"t{k}", embedding_dim=EMB_DIM, num_embeddings=rows, feature_names=[f"f{k}"])
        for k in range(TORCHREC_TABLES)
    ]
    holder = nn.Module()
    holder.ebc = EmbeddingBagCollection(tables=configs, device=torch.device(device))
    return quantize_embeddings(holder, dtype=torch.qint8, inplace=True)


def torchrec_section(bers: list[float], device: str, repeats: int) -> None:
    """Inject + restore on the int8 EBC vs one copy of its tables' bytes, paired per repeat."""
    pytei.torchrec.require("the --torchrec benchmark")
    model = build_torchrec(device)
    tables = pytei.torchrec.tables(model)
    n_params = sum(t.rows * t.dim for t in tables)
    n_bytes = sum(t.row_bytes.numel() for t in tables)
    with pytei.inject(model, pytei.BitFlip(1e-9), target="embedding", seed=0) as report:
        bits = report.targeted_bits
    print(
        f"torchrec: int8 EmbeddingBagCollection, {len(tables)} tables, {n_params / 1e6:.1f}M parameters, "
        f"{n_bytes / 2**20:.0f} MiB of rows, {bits / 1e9:.2f}G targeted bits (codes, scale, bias) on {device}"
    )

    buffers = [torch.empty_like(t.row_bytes) for t in tables]  # preallocated: the bandwidth floor only

    def copy() -> None:
        for buffer, t in zip(buffers, tables, strict=True):
            buffer.copy_(t.row_bytes)

    def inject(ber: float, seed: int) -> None:
        injector = pytei.Injector(pytei.BitFlip(ber), target="embedding", seed=seed)
        injector.apply(model)
        injector.restore()

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    before = [t.row_bytes.clone() for t in tables]
    print(f"{'BER':>8} {'flips':>10} {'pytei ms':>10} {'copy ms':>10} {'pytei/copy':>11}")
    for ber in bers:
        with pytei.inject(model, pytei.BitFlip(ber), target="embedding", seed=123) as report:
            flips = report.n_faults
        copy()
        inject(ber, 0)  # warm-up
        ours, theirs, ratios = [], [], []
        for i in range(repeats if ber < 1e-2 else max(3, repeats // 2)):
            ours_fn = functools.partial(inject, ber, i + 1)
            pair = (ours_fn, copy) if i % 2 == 0 else (copy, ours_fn)
            a, b = timed(pair[0]), timed(pair[1])
            t_ours, t_copy = (a, b) if i % 2 == 0 else (b, a)
            ours.append(t_ours)
            theirs.append(t_copy)
            ratios.append(t_ours / t_copy)
        print(
            f"{ber:>8.0e} {flips:>10,} {statistics.median(ours) * 1e3:>10.2f} "
            f"{statistics.median(theirs) * 1e3:>10.2f} {statistics.median(ratios):>10.2f}x",
            flush=True,
        )
    assert all(torch.equal(a, t.row_bytes) for a, t in zip(before, tables, strict=True)), "restore failed"
    print("restore: every table's bytes bit-identical to before")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bers", type=float, nargs="+", default=None)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, skip memory")
    parser.add_argument("--torchrec", action="store_true", help="the quantized TorchRec EBC section")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a loaded machine)")
    parser.add_argument("--memory", nargs=2, metavar=("TRIAL", "BER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        _memory_child(args.memory[0], float(args.memory[1]), args.device)
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    if args.torchrec:
        bers = args.bers or [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]
        torchrec_section(bers, args.device, 3 if args.quick else 9)
        return
    args.bers = args.bers or [1e-9, 1e-6, 1e-3, 1e-2]

    model = build_model(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {n_params / 1e6:.1f}M float32 parameters ({n_params * 32 / 1e9:.2f}G bits) on {args.device}"
    )
    reps = 3 if args.quick else 7
    t_copy = time_trial("copy", model, 0.0, reps)
    m_copy = 0 if args.quick else measure_memory("copy", 0.0, args.device)
    print(f"(a) full copy of all parameters: {t_copy * 1e3:.1f} ms, {m_copy / 2**20:.0f} MiB extra")
    header = (
        f"{'BER':>8} {'flips':>10} {'pytei ms':>10} {'pytei MiB':>10} {'dense ms':>10} {'dense MiB':>10}"
        f" {'pytei/copy':>11} {'dense/pytei':>12}"
    )
    print(header)
    for ber in args.bers:
        with pytei.inject(model, pytei.BitFlip(ber), seed=123) as report:
            flips = report.n_faults
        t_ours = time_trial("pytei", model, ber, reps if ber < 1e-2 else 3)
        t_dense = time_trial("dense", model, ber, 1)
        m_ours = 0 if args.quick else measure_memory("pytei", ber, args.device)
        m_dense = 0 if args.quick else measure_memory("dense", ber, args.device)
        print(
            f"{ber:>8.0e} {flips:>10,} {t_ours * 1e3:>10.2f} {m_ours / 2**20:>10.1f} {t_dense * 1e3:>10.0f}"
            f" {m_dense / 2**20:>10.0f} {t_ours / t_copy:>10.2f}x {t_dense / t_ours:>11.0f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
