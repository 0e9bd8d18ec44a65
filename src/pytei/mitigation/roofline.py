"""Arithmetic intensity of layers and the machine balance of a device: is a layer memory- or compute-bound?

A layer that moves ``bytes`` and computes ``flops`` runs at ``flops / bytes`` FLOP per byte (its
arithmetic intensity). A device whose peak GEMM rate is ``F`` FLOP/s and whose memory bandwidth is
``W`` bytes/s has the machine balance ``F / W``: below it a layer is memory-bound (its compute units
idle, waiting for data), above it compute-bound (Williams et al., "Roofline", 2009). Intensity-guided
ABFT (Kosaian & Rashmi, 2021) picks a checksum scheme per layer on this test.

The balance is measured once per device by a short micro-benchmark (a square float32 GEMM and a large
copy, about a second) and cached in ``$PYTEI_CACHE_DIR`` (default ``~/.cache/pytei``) as
``machine-balance.json``, keyed by device name, torch version and thread count.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["Balance", "Cost", "bound", "cache_path", "lookup_cost", "linear_cost", "machine_balance"]

#: A layer within this factor of the balance is "ambiguous": the roofline cannot say, a timing decides.
AMBIGUITY = 2.0


@dataclass(frozen=True)
class Cost:
    """FLOPs computed and bytes moved by one call of a layer (the roofline's two coordinates)."""

    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        """FLOP per byte."""
        return self.flops / self.bytes if self.bytes else float("inf")


@dataclass(frozen=True)
class Balance:
    """A device's measured peak GEMM rate (FLOP/s) and memory bandwidth (bytes/s)."""

    device: str
    threads: int
    flops: float
    bandwidth: float
    torch: str

    @property
    def balance(self) -> float:
        """FLOP per byte at which a layer turns compute-bound."""
        return self.flops / self.bandwidth


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def linear_cost(rows: int, in_features: int, out_features: int, dtype: torch.dtype, bias: bool) -> Cost:
    """``y = x W^T + b`` over ``rows`` input rows: reads x, W (and b), writes y."""
    b = out_features if bias else 0
    moved = rows * in_features + in_features * out_features + rows * out_features + b
    return Cost(2.0 * rows * in_features * out_features + rows * b, float(_size(dtype) * moved))


def lookup_cost(bags: int, ids: int, dim: int, dtype: torch.dtype, row_bytes: int | None = None) -> Cost:
    """A pooled lookup of ``ids`` rows into ``bags`` bags of width ``dim``: reads the rows (``row_bytes``
    each, default ``dim`` values of ``dtype``) and the int64 ids, writes the bags (float32)."""
    row = row_bytes if row_bytes is not None else dim * _size(dtype)
    return Cost(float(ids * dim), float(ids * row + ids * 8 + bags * 8 + bags * dim * 4))


def bound(cost: Cost, balance: Balance, ambiguity: float = AMBIGUITY) -> str:
    """``"memory"``, ``"compute"`` or ``"ambiguous"`` (intensity within ``ambiguity`` x the balance)."""
    ratio = cost.intensity / balance.balance
    if ratio < 1.0 / ambiguity:
        return "memory"
    if ratio > ambiguity:
        return "compute"
    return "ambiguous"


def cache_path() -> Path:
    """Where measured balances are kept (``$PYTEI_CACHE_DIR/machine-balance.json``)."""
    root = Path(os.environ.get("PYTEI_CACHE_DIR") or Path.home() / ".cache" / "pytei")
    return root / "machine-balance.json"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{os.cpu_count()}cpus"


def _best(fn, repeats: int, sync) -> float:
    """Fastest of ``repeats`` timed calls (the peak is what the roofline needs), after one warm-up."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _measure(device: torch.device) -> tuple[float, float]:
    """Peak float32 GEMM FLOP/s and copy bandwidth (bytes read + written per second) on ``device``."""
    cuda = device.type == "cuda"
    n = 4096 if cuda else 1024
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device)
    b = torch.randn(n, n, generator=g, device=device)
    out = torch.empty(n, n, device=device)
    gemm = _best(lambda: torch.mm(a, b, out=out), 5, sync)
    words = (1 << 28 if cuda else 1 << 25) // 4  # 256 MiB on GPUs, 32 MiB here: past every cache level
    src = torch.ones(words, device=device)
    dst = torch.empty_like(src)
    copy = _best(lambda: dst.copy_(src), 5, sync)
    return 2.0 * n**3 / gemm, 2.0 * 4 * words / copy


def machine_balance(device: str | torch.device = "cpu", *, refresh: bool = False) -> Balance:
    """The measured balance of ``device`` at the current thread count, from the cache when there
    (``refresh`` measures again and replaces it)."""
    dev = torch.device(device)
    key = f"{_device_name(dev)}|torch {torch.__version__}|{torch.get_num_threads()} threads"
    path = cache_path()
    cached: dict[str, dict] = {}
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cached = {}  # an unreadable cache is measured again and rewritten
    entry = cached.get(key)
    if entry is not None and not refresh:
        try:
            return Balance(**entry)
        except TypeError:
            pass  # written by another version: measure again
    flops, bandwidth = _measure(dev)
    out = Balance(_device_name(dev), torch.get_num_threads(), flops, bandwidth, torch.__version__)
    cached[key] = asdict(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass  # a read-only home still gets the measurement, just not cached
    return out
