"""Index faults: bit flips in the ids an embedding lookup reads (the ``indices`` site).

A flipped bit in an id (a KeyedJaggedTensor's ``values``, or the index tensor of an ``nn.Embedding``/
``nn.EmbeddingBag``) makes the lookup read another row, or an id out of the table's range. What happens
then is the serving stack's bounds policy, FBGEMM's ``BoundsCheckMode``, which pytei applies itself so
that every backend (float ``nn.EmbeddingBag``, torchrec collections, FBGEMM TBEs) behaves the same:

- ``"zero"``: the id reads row 0 (FBGEMM's ``WARNING`` and ``IGNORE`` modes, its default);
- ``"skip"``: the id is dropped from its bag, which pools the rest (an empty bag pools to zeros);
- ``"raise"``: the lookup fails with :class:`IndexFaultError` (FBGEMM's ``FATAL``).

Faults are fresh on every forward pass (like the ``activations`` site) and go into a copy of the ids,
never into the caller's tensors. A reader (:class:`IndexReader`) knows how a module takes its ids;
``register_reader`` adds one (pytei.torchrec registers the KeyedJaggedTensor collections).
"""

from __future__ import annotations

import importlib
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .bits import layout, popcount
from .errors import ErrorModel, Words
from .exceptions import ArgumentError, PyteiError

__all__ = [
    "BOUNDS",
    "IndexFaultError",
    "IndexReader",
    "IndexStats",
    "Segment",
    "register_reader",
    "reader_for",
]

#: What an out-of-range id does (see the module docstring).
BOUNDS = ("zero", "skip", "raise")


class IndexFaultError(PyteiError, IndexError):
    """A faulted id out of its table's range under ``bounds="raise"`` (FBGEMM's FATAL bounds check)."""


@dataclass
class IndexStats:
    """What index faults did over all passes: bits flipped, ids changed, ids out of range (zeroed/skipped)."""

    bits: int = 0
    ids: int = 0
    out_of_range: int = 0
    passes: int = 0
    per_module: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Segment:
    """Ids of one table in a module's input: positions ``[lo, hi)`` of the flat ids; ``rows``: table size."""

    lo: int
    hi: int
    rows: int


class IndexReader(ABC):
    """How a kind of module takes its ids: where they are in its inputs and how to put faulted ids back."""

    @abstractmethod
    def accepts(self, module: nn.Module) -> bool:
        """Whether this reader handles ``module``."""

    @abstractmethod
    def segments(
        self, module: nn.Module, args: tuple, kwargs: dict, tables: set[str]
    ) -> tuple[torch.Tensor, list[Segment]]:
        """The flat id tensor of this call and the segments of the selected ``tables`` (site names relative
        to ``module``)."""

    @abstractmethod
    def rebuild(
        self, module: nn.Module, args: tuple, kwargs: dict, ids: torch.Tensor, keep: torch.Tensor | None
    ) -> tuple[tuple, dict]:
        """The call's inputs with ``ids`` in place of its ids, dropping those where ``keep`` is False."""


def _bag_offsets(offsets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Offsets of bags once the ids where ``keep`` is False are dropped (bag starts, maybe plus the end)."""
    kept_before = torch.cat([keep.new_zeros(1, dtype=torch.int64), keep.to(torch.int64).cumsum(0)])
    return kept_before[offsets.clamp(max=keep.numel())].to(offsets.dtype)


class _TorchLookup(IndexReader):
    """``nn.Embedding`` (ids of any shape) and ``nn.EmbeddingBag`` (1-D ids with offsets, or 2-D bags)."""

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding | nn.EmbeddingBag)

    @staticmethod
    def _ids(args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs["input"]

    def segments(
        self, module: nn.Module, args: tuple, kwargs: dict, tables: set[str]
    ) -> tuple[torch.Tensor, list[Segment]]:
        ids = self._ids(args, kwargs)
        rows = int(module.weight.shape[0])  # type: ignore[index]
        return ids.reshape(-1), [Segment(0, ids.numel(), rows)]

    def rebuild(
        self, module: nn.Module, args: tuple, kwargs: dict, ids: torch.Tensor, keep: torch.Tensor | None
    ) -> tuple[tuple, dict]:
        old = self._ids(args, kwargs)
        rest_args, rest_kwargs = (args[1:], dict(kwargs)) if args else (args, dict(kwargs))
        rest_kwargs.pop("input", None)
        if keep is None:
            return (ids.reshape(old.shape), *rest_args), rest_kwargs
        if isinstance(module, nn.Embedding):
            raise ArgumentError(
                'bounds="skip" drops ids from bags; nn.Embedding has none: use "zero" or "raise"'
            )
        offsets = rest_args[0] if rest_args else rest_kwargs.pop("offsets", None)
        weights = rest_args[1] if len(rest_args) > 1 else rest_kwargs.pop("per_sample_weights", None)
        if old.dim() == 2:  # [B, L] bags: as 1-D ids with offsets
            offsets = torch.arange(0, old.numel(), old.shape[1], dtype=torch.int64, device=old.device)
            weights = weights.reshape(-1) if weights is not None else None
        assert offsets is not None
        new_offsets = _bag_offsets(offsets, keep)
        new_weights = weights[keep] if weights is not None else None
        return (ids[keep], new_offsets), {**rest_kwargs, "per_sample_weights": new_weights}


#: Readers, most specific first; and modules to import when their package is (they register readers).
_READERS: list[IndexReader] = [_TorchLookup()]
_LAZY: dict[str, str] = {"torchrec": "pytei.torchrec._indices"}


def register_reader(reader: IndexReader) -> None:
    """Add a reader; it is asked before the built-in ones."""
    _READERS.insert(0, reader)


def reader_for(module: nn.Module) -> IndexReader | None:
    """The reader of ``module``'s ids, if any."""
    for package, name in list(_LAZY.items()):
        if package in sys.modules:
            del _LAZY[package]
            importlib.import_module(name)
    return next((r for r in _READERS if r.accepts(module)), None)


def lookups(model: nn.Module, site_names: Sequence[str]) -> dict[str, set[str]]:
    """The modules whose ids feed the selected tables: for each site, the outermost module on its path
    that a reader accepts (a torchrec collection rather than its ``nn.EmbeddingBag``s), by dotted path,
    with the site names relative to it."""
    out: dict[str, set[str]] = {}
    for name in site_names:
        parts = name.split(".")[:-1]
        chosen = None
        for depth in range(len(parts) + 1):
            path = ".".join(parts[:depth])
            try:
                module = model.get_submodule(path)
            except AttributeError:
                break
            if reader_for(module) is not None:
                chosen = path
                break
        if chosen is None:
            raise ArgumentError(
                f"{name}: no module on its path takes ids pytei can fault (nn.Embedding, nn.EmbeddingBag, "
                "torchrec collections); select embedding tables for site='indices'"
            )
        out.setdefault(chosen, set()).add(name[len(chosen) + 1 :] if chosen else name)
    return out


def index_hook(
    path: str,
    reader: IndexReader,
    tables: set[str],
    error: ErrorModel,
    generator: torch.Generator,
    bounds: str,
    stats: IndexStats,
) -> Callable[[nn.Module, tuple, dict], tuple[tuple, dict] | None]:
    """A forward pre-hook (``with_kwargs``) that faults a copy of the ids of ``tables`` on every pass."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        ids, segments = reader.segments(module, args, kwargs, tables)
        stats.passes += 1
        if not segments:
            return None
        positions = torch.cat([torch.arange(s.lo, s.hi, dtype=torch.int64) for s in segments])
        rows = torch.cat([torch.full((s.hi - s.lo,), s.rows, dtype=torch.int64) for s in segments])
        source = ids.detach()
        lay = layout(source.dtype)
        where = positions.to(source.device)
        words = Words(
            f"{path}:indices", len(positions), lay, lambda i: source[where[i]].to(torch.int64).cpu()
        )
        with torch.no_grad():
            f = error.draw_one(words, generator)
            if not len(f):
                return None
            faulted = source.clone()
            at = where[f.index.to(source.device)]
            faulted[at] = source[at] ^ f.mask.to(device=source.device, dtype=lay.view_dtype).to(source.dtype)
            limit = rows[f.index].to(source.device)
            new = faulted[at]
            bad = (new < 0) | (new >= limit)
            n_bad = int(bad.sum())
            bits = popcount(f.mask, lay.width)
            stats.bits += bits
            stats.ids += len(f)
            stats.out_of_range += n_bad
            stats.per_module[path] = stats.per_module.get(path, 0) + bits
            keep = None
            if n_bad and bounds == "raise":
                first = int(bad.nonzero()[0, 0])
                raise IndexFaultError(
                    f"{path}: a faulted id {int(new[first])} is out of range [0, {int(limit[first])}) "
                    '(bounds="raise", FBGEMM\'s FATAL bounds check)'
                )
            if n_bad and bounds == "zero":
                faulted[at[bad]] = 0
            elif n_bad:
                keep = torch.ones(source.numel(), dtype=torch.bool, device=source.device)
                keep[at[bad]] = False
        return reader.rebuild(module, args, kwargs, faulted, keep)

    return hook


def check_bounds(bounds: Any) -> str:
    """``bounds`` if it is one of ``BOUNDS``, else a clear error."""
    if bounds not in BOUNDS:
        raise ArgumentError(f"unknown bounds {bounds!r}; allowed: {', '.join(BOUNDS)}")
    return str(bounds)
