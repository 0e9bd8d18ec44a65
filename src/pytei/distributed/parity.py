"""Erasure-coded parity of hosts' shards (in the spirit of ECRM): rebuild a lost host from the others.

The shards of ``g`` hosts are encoded into one parity block kept on another host: XOR of their raw
bytes, or the sum of their values. When one host is lost, its block is the parity minus (XOR: XOR
with) the blocks of the ``g - 1`` survivors. XOR parity rebuilds the bytes exactly. Sum parity
rebuilds values up to rounding: the float sum of ``g`` blocks is rounded once per addition, so
``parity - sum(survivors)`` differs from the lost values by up to about ``g`` units in the last place
of the largest value summed at that position (and exactly 0 where every other block is 0).
Blocks of different lengths are padded with zeros to the longest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["sum_parity", "sum_rebuild", "xor_parity", "xor_rebuild"]


def _padded(blocks: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``[len(blocks), longest]``: the 1-D ``blocks`` of ``dtype`` as rows, zero-padded."""
    if not blocks:
        raise ValueError("parity needs at least one block")
    bad = [b.dtype for b in blocks if b.dtype != dtype or b.dim() != 1]
    if bad:
        raise ValueError(f"parity blocks must be 1-D {dtype} tensors, got {bad[0]}")
    out = torch.zeros(len(blocks), max(b.numel() for b in blocks), dtype=dtype)
    for i, b in enumerate(blocks):
        out[i, : b.numel()] = b
    return out


def _fold(first: torch.Tensor, others: Sequence[torch.Tensor], op: Callable[..., Any]) -> torch.Tensor:
    """``first`` with each of ``others`` folded into its leading positions by the in-place ``op``."""
    out = first.clone()
    for b in others:
        op(out[: b.numel()], b)
    return out


def xor_parity(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The XOR of the raw-byte ``blocks`` (1-D uint8), as long as the longest."""
    rows = _padded(blocks, torch.uint8)
    return _fold(rows[0], list(rows[1:]), torch.Tensor.bitwise_xor_)


def xor_rebuild(parity: torch.Tensor, survivors: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """The lost block (its first ``length`` bytes) from the parity and every other block: exact."""
    return _fold(parity, survivors, torch.Tensor.bitwise_xor_)[:length]


def sum_parity(blocks: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sum of the value ``blocks`` (1-D ``dtype``), added in order in ``dtype`` as a host would."""
    rows = _padded(blocks, dtype)
    return _fold(rows[0], list(rows[1:]), torch.Tensor.add_)


def sum_rebuild(parity: torch.Tensor, survivors: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """The lost block (its first ``length`` values) from the sum parity and every other block: rounded."""
    return _fold(parity, survivors, torch.Tensor.sub_)[:length]
