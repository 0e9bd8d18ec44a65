"""TorchRec inputs from CTR batches: the sparse id block as a ``KeyedJaggedTensor`` (layout ``"dense+kjt"``).

The data layer keeps one representation of the categorical features, the row-aligned ``int64 [N, S]``
id block of the ``"dense+sparse"`` layout; a batch becomes a KJT only when it is handed to a model
(:class:`DenseKJT`, a ``Split``'s ``collate``), so splitting, shuffling, slicing and caching stay
tensor operations, and both layouts share the same arrays.

A KJT stores its ids key-major: all ids of key 0 (sample 0's, then sample 1's, ...), then key 1's,
with ``lengths`` ``[S * N]`` the number of ids of each (key, sample) bag. One id per bag (what every
data set holds today) is the one-hot case; :func:`to_kjt` also takes multi-hot bags, padded
(``ids [N, S, H]`` with ``lengths [N, S]``), and :func:`from_lists` takes them as Python lists.
TorchRec is imported only when a KJT is built; :func:`DenseKJT` checks for it up front.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # the optional extra pytei[torchrec]; imported at run time only where a KJT is built
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["DenseKJT", "check_keys", "default_keys", "from_lists", "to_kjt"]

_ID_DTYPES = (torch.int32, torch.int64)


def default_keys(n: int) -> list[str]:
    """KJT keys of ``n`` categorical fields when a data set names none: ``cat_0 .. cat_{n-1}``
    (TorchRec's Criteo naming, ``torchrec.datasets.criteo.DEFAULT_CAT_NAMES``)."""
    return [f"cat_{i}" for i in range(n)]


def check_keys(keys: Any, n: int | None = None, *, what: str = "keys") -> list[str]:
    """``keys`` as a list of distinct non-empty strings (``n`` of them, if given); a ``ValueError``
    naming the bad value otherwise."""
    if isinstance(keys, str | bytes) or not isinstance(keys, Sequence) or not keys:
        raise ValueError(f"{what} must be a non-empty list of strings, got {keys!r}")
    bad = [k for k in keys if not isinstance(k, str) or not k]
    if bad:
        raise ValueError(f"{what} must be non-empty strings, got {bad[0]!r} in {list(keys)!r}")
    repeated = sorted({k for k in keys if list(keys).count(k) > 1})
    if repeated:
        raise ValueError(f"{what} must be distinct, got {repeated} more than once")
    if n is not None and len(keys) != n:
        raise ValueError(f"{what} must name {n} fields, got {len(keys)}: {list(keys)!r}")
    return list(keys)


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``[0, cumsum(lengths)]``: given to the KJT, so no FBGEMM kernel has to compute it (on any device)."""
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0, dtype=lengths.dtype)])


def _kjt_class() -> type[KeyedJaggedTensor]:
    from ..torchrec import require

    require("KeyedJaggedTensor batches (layout 'dense+kjt')")
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    return KeyedJaggedTensor


def to_kjt(ids: torch.Tensor, keys: Sequence[str], lengths: torch.Tensor | None = None) -> KeyedJaggedTensor:
    """A ``KeyedJaggedTensor`` of a batch's ids, keyed by ``keys`` (one per field, in column order).

    ``ids``: ``[N, S]`` (one id per sample and field; ``lengths`` must be None), or ``[N, S, H]``
    padded multi-hot bags with ``lengths`` ``[N, S]`` (each in ``0..H``: the first ``lengths[n, s]``
    ids of bag ``(n, s)`` count, the rest is padding). Ids keep their dtype (int64 or int32); lengths
    take it too, as ``nn.EmbeddingBag`` wants ids and offsets of one dtype. Ids are not range-checked
    here (that would synchronise with the device on every batch): the model's tables do.
    """
    cls = _kjt_class()
    if not isinstance(ids, torch.Tensor) or ids.dtype not in _ID_DTYPES or ids.dim() not in (2, 3):
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"ids must be an int64 (or int32) tensor [N, S] or [N, S, H], got {got}")
    n, s = ids.shape[0], ids.shape[1]
    names = check_keys(keys, s, what="KJT keys")
    if ids.dim() == 2:
        if lengths is not None:
            raise ValueError("lengths go with padded multi-hot ids [N, S, H]; ids [N, S] have one id per bag")
        values = ids.t().reshape(-1)  # key-major: field 0 of every sample, then field 1, ...
        ones = torch.ones(s * n, dtype=ids.dtype, device=ids.device)
        return cls(keys=names, values=values, lengths=ones, offsets=_offsets(ones))
    if lengths is None:
        raise ValueError(f"padded multi-hot ids {tuple(ids.shape)} need lengths [N, S] = [{n}, {s}]")
    if lengths.shape != (n, s) or lengths.dtype not in _ID_DTYPES:
        raise ValueError(
            f"lengths must be an integer tensor [{n}, {s}] for ids {tuple(ids.shape)}, "
            f"got {lengths.dtype} {tuple(lengths.shape)}"
        )
    if bool((lengths < 0).any()) or bool((lengths > ids.shape[2]).any()):
        raise ValueError(
            f"lengths must be in 0..{ids.shape[2]} (the padded bag size), got "
            f"{int(lengths.min())}..{int(lengths.max())}"
        )
    kept = torch.arange(ids.shape[2], device=ids.device) < lengths.t().unsqueeze(2)  # [S, N, H]
    values = ids.permute(1, 0, 2)[kept]
    flat = lengths.t().reshape(-1).to(ids.dtype)
    return cls(keys=names, values=values, lengths=flat, offsets=_offsets(flat))


def from_lists(bags: Sequence[Sequence[Sequence[int]]], keys: Sequence[str]) -> KeyedJaggedTensor:
    """A KJT of multi-hot bags given as lists: ``bags[n][s]`` the ids of sample ``n`` in field ``s``
    (int64; an empty list is an empty bag)."""
    names = check_keys(keys, what="KJT keys")
    rows = [list(sample) for sample in bags]
    wrong = [i for i, sample in enumerate(rows) if len(sample) != len(names)]
    if wrong:
        raise ValueError(
            f"sample {wrong[0]} has {len(rows[wrong[0]])} bags; every sample needs one per key {names}"
        )
    width = max((len(bag) for sample in rows for bag in sample), default=0)
    ids = torch.zeros(len(rows), len(names), max(width, 1), dtype=torch.int64)
    lengths = torch.zeros(len(rows), len(names), dtype=torch.int64)
    for i, sample in enumerate(rows):
        for j, bag in enumerate(sample):
            ids[i, j, : len(bag)] = torch.as_tensor(list(bag), dtype=torch.int64)
            lengths[i, j] = len(bag)
    return to_kjt(ids, names, lengths)


@dataclass(frozen=True)
class DenseKJT:
    """A ``Split`` collate for layout ``"dense+kjt"``: ``(dense [B, D], ids [B, S]) -> (dense, KJT)``, or
    with multi-hot bags ``(dense, ids [B, S, H], lengths [B, S]) -> (dense, KJT)`` (see :func:`to_kjt`).

    ``keys`` are the KJT keys of the id columns, in order. Building one checks that TorchRec is
    installed (a :class:`pytei.exceptions.MissingExtraError` naming what is missing otherwise).
    """

    keys: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(check_keys(list(self.keys), what="KJT keys")))
        _kjt_class()

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
        if len(inputs) not in (2, 3):
            raise ValueError(
                f"layout 'dense+kjt' batches are (dense, ids) or (dense, ids, lengths), "
                f"got {len(inputs)} tensors"
            )
        return inputs[0], to_kjt(inputs[1], self.keys, inputs[2] if len(inputs) == 3 else None)
