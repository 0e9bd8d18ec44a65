"""Exact random position sampling whose cost grows with the number of faults, not of bits.

``bernoulli_positions(n, p)`` returns the successes of ``n`` independent Bernoulli(p) trials.
For small ``p`` it walks the Bernoulli process by its geometric gaps: the number of failures
before each success is ``floor(log(U) / log(1 - p))`` with ``U`` uniform on (0, 1], drawn in
float64 (53-bit uniforms, ``log1p`` for accuracy down to p = 1e-12 and below). That *is* the
per-bit Bernoulli law, so there is no rounding of ``p`` to a representable mask and no two draws
can land on the same bit and cancel. Above ``DENSE_P`` (where successes are a sizeable fraction
of all trials) a chunked dense comparison ``U < p`` in float64 is faster and equally exact.

All draws run on the CPU from a ``torch.Generator``: the same seed gives the same positions for a
model on any device, and moving O(faults) indices to an accelerator is cheap.
"""

from __future__ import annotations

import hashlib
import math

import torch

from .exceptions import ArgumentError

__all__ = [
    "DENSE_P",
    "MAX_TRIALS",
    "bernoulli_positions",
    "sample_without_replacement",
    "generator_for",
    "check_rate",
]

#: Above this success probability the dense path is faster than walking geometric gaps.
DENSE_P = 0.15
#: Largest number of trials in one call (float64 partial sums stay exact below 2**53).
MAX_TRIALS = 1 << 52
_DENSE_CHUNK = 1 << 22


def check_rate(name: str, p: float) -> float:
    """Validate a probability: a float in [0, 1], with a message naming the bad value."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {p!r}")
    p = float(p)
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ArgumentError(f"{name} must be in [0, 1], got {p!r}")
    return p


def generator_for(seed: int, *keys: object) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``keys`` by a stable hash.

    Deriving one stream per tensor name makes each tensor's faults independent of which other
    tensors are selected and in what order: the faults of a sub-selection with the same seed are
    exactly the corresponding subset of a larger selection's faults.
    """
    text = "\x1f".join([str(int(seed)), *map(str, keys)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _geometric_positions(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    log_q = math.log1p(-p)
    expected = n * p
    draw = int(expected + 6.0 * math.sqrt(expected) + 64)
    start = -1.0
    pieces: list[torch.Tensor] = []
    while True:
        u = torch.rand(draw, dtype=torch.float64, generator=g)
        gaps = torch.floor(torch.log1p(-u) / log_q).add_(1.0).clamp_(max=float(n + 1))
        pos = torch.cumsum(gaps, 0).add_(start)
        keep = pos < n
        # Partial sums below n <= 2**52 are exact integers; once one reaches n the walk is done.
        pieces.append(pos[keep].to(torch.int64))
        if not bool(keep[-1]):
            break
        start = float(pos[-1])
        draw = max(64, int(6.0 * math.sqrt(expected)) + 64)
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _dense_positions(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    pieces = []
    for lo in range(0, n, _DENSE_CHUNK):
        m = min(_DENSE_CHUNK, n - lo)
        hit = torch.rand(m, dtype=torch.float64, generator=g) < p
        pieces.append(hit.nonzero().squeeze(1).add_(lo))
    return torch.cat(pieces)


def bernoulli_positions(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Sorted int64 indices in ``[0, n)`` of successes of ``n`` independent Bernoulli(p) trials."""
    p = check_rate("probability", p)
    if n < 0 or n > MAX_TRIALS:
        raise ValueError(f"number of trials must be in [0, 2**52], got {n}")
    if n == 0 or p == 0.0:
        return torch.empty(0, dtype=torch.int64)
    if p == 1.0:
        return torch.arange(n, dtype=torch.int64)
    if p >= DENSE_P:
        return _dense_positions(n, p, generator)
    return _geometric_positions(n, p, generator)


def sample_without_replacement(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted int64 sample of ``k`` distinct indices drawn uniformly from ``[0, n)``.

    Draws uniform integers until ``k`` distinct ones are seen, then keeps a uniformly random
    ``k``-subset of them: by symmetry of the draws over ``[0, n)``, that subset is uniform over
    all ``k``-subsets. Cost O(k log k) while ``k`` is a small fraction of ``n``.
    """
    if k < 0 or k > n:
        raise ArgumentError(f"cannot choose {k} distinct positions out of {n}")
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if 4 * k >= n:
        return torch.randperm(n, generator=generator)[:k].sort().values
    seen = torch.empty(0, dtype=torch.int64)
    while seen.numel() < k:
        need = k - seen.numel()
        fresh = torch.randint(0, n, (need + need // 8 + 16,), generator=generator, dtype=torch.int64)
        seen = torch.unique(torch.cat([seen, fresh]))
    if seen.numel() > k:
        keep = torch.randperm(seen.numel(), generator=generator)[:k]
        seen = seen[keep].sort().values
    return seen
