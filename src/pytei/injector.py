"""Put errors into a model's tensors and take them out again, bit-exactly, in O(faults).

Faults are XOR-ed into the existing storage through same-width integer views, so Parameter
objects (and optimizers or hooks that hold them) are untouched. The original words at every
changed index are kept; restore writes them back. A trial is atomic with respect to Ctrl-C: from the
first write until the last word is back, a SIGINT handler of pytei's own holds Ctrl-C while faults go
in or come out (and at the entry of ``restore``), so a model is never left corrupted; any exception
while applying undoes what was applied. Tensors that share storage (overlapping views, stride-0
``expand``) are deduplicated by stored word, so each stored bit is drawn once and the report counts
the bits that really changed. Live injections are registered per model: another thread's injection
into a held model is refused, and out-of-order restores over the same storage are refused.
"""

from __future__ import annotations

import hashlib
import secrets
import signal
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import CodeType, FrameType, TracebackType
from typing import TypedDict

import torch
from torch import nn

from .bits import BitLayout, bit_histogram, field_masks, int_view, layout, popcount
from .errors import ErrorModel, Faults, Words
from .exceptions import ArgumentError, PyteiError
from .faultmap import FaultMap
from .indices import IndexStats, check_bounds, index_hook, lookups, reader_for
from .sampling import generator_for
from .targets import Site, select

__all__ = [
    "Injector",
    "InjectionReport",
    "InjectionConflictError",
    "InjectionOrderError",
    "Protection",
    "SITES",
    "inject",
    "parameter_digest",
]

#: Where errors go: stored tensors (memory errors), layer outputs (transient compute errors) or the ids
#: embedding lookups read (``pytei.indices``: faults in the sparse inputs on their way to the tables).
SITES = ("weights", "activations", "indices")


class Protection(ABC):
    """A memory-side protection: decides which drawn faults actually reach the stored values.

    It sees the faults drawn for every selected tensor *before* they land and returns the ones
    that get through (e.g. masked bits, ECC-corrected words), so the same draws (same seed) can be
    compared with and without protection. ``stats`` describes what it did on the last call.
    """

    @abstractmethod
    def filter(self, faults: list[Faults], words: list[Words], error: ErrorModel, seed: int) -> list[Faults]:
        """The faults that reach storage, one entry per tensor of ``words``."""

    def draw(self, error: ErrorModel, words: list[Words], seed: int) -> list[Faults]:
        """The data faults ``error`` draws under this protection (ECC extends bit sets to check bits)."""
        return error.draw(words, seed)

    #: Whether it protects memory words as stored: an embedding table's rows are then one site over their
    #: bytes (codes, scale, bias, padding together in its words) instead of one site per row field.
    raw_rows: bool = False

    def overhead(self, lay: BitLayout) -> float:
        """Extra storage as a fraction of the protected data (0.125 for a (72,64) code)."""
        return 0.0

    @property
    def stats(self) -> dict:
        """Counters of the last ``filter`` call (e.g. corrected, detected, silent)."""
        return {}


class InjectionConflictError(PyteiError, RuntimeError):
    """An injection into a model (or storage) that an injector applied from another thread still holds."""


class InjectionOrderError(PyteiError, RuntimeError):
    """``restore`` of an injector while a later one over the same storage is still applied."""


class _Guard:
    """pytei's SIGINT handler from the start of ``apply`` to the end of ``restore`` (main thread only).

    While ``held`` (faults going in or out) a Ctrl-C is kept pending; otherwise it goes straight to the
    previous handler, except when it lands at the entry of the owner's ``restore`` (or of ``inject``'s
    ``__exit__``), before that code could hold it: such a Ctrl-C is kept too. ``stop`` puts the
    previous handler back and delivers a kept Ctrl-C to it, once the model is clean.
    """

    __slots__ = ("owner", "held", "pending", "previous", "installed")

    def __init__(self, owner: Injector) -> None:
        self.owner = owner
        self.held = True
        self.pending = False
        self.previous: object = signal.SIG_DFL
        self.installed = False

    @classmethod
    def start(cls, owner: Injector) -> _Guard:
        """A held guard, installed as the SIGINT handler when running in the main thread."""
        guard = cls(owner)
        if threading.current_thread() is threading.main_thread():
            guard.previous = signal.getsignal(signal.SIGINT)
            guard.installed = True  # before the handler goes in: from then on it holds every Ctrl-C
            signal.signal(signal.SIGINT, guard)
        return guard

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.installed and (self.held or self._at_entry(frame)):
            self.pending = True
            return
        self._forward(signum, frame)

    def _at_entry(self, frame: FrameType | None) -> bool:
        """Whether the interrupted code (or what a signal handler interrupted) is the owner's
        ``apply``/``restore`` or ``inject``'s ``__enter__``/``__exit__``."""
        for _ in range(_ENTRY_DEPTH):
            if frame is None:
                return False
            if frame.f_code in _ENTRY_CODES:
                owner = frame.f_locals.get("self")
                if owner is self.owner or getattr(owner, "injector", None) is self.owner:
                    return True
            frame = frame.f_back
        return False

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        previous = self.previous
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    def release(self) -> None:
        """Stop holding; a Ctrl-C kept so far goes to the previous handler now."""
        self.held = False
        if self.pending:
            self.pending = False
            self._forward(signal.SIGINT, None)

    def stop(self) -> None:
        """Put the previous handler back (the model is clean) and deliver a kept Ctrl-C to it."""
        if not self.installed:
            return
        previous = self.previous if self.previous is not None else signal.SIG_DFL
        main = threading.current_thread() is threading.main_thread()  # only it may set handlers
        if main and signal.getsignal(signal.SIGINT) is self:  # else it stays, forwarding every Ctrl-C
            signal.signal(signal.SIGINT, previous)  # type: ignore[arg-type]
        self.installed = False
        if self.pending:
            self.pending = False
            signal.raise_signal(signal.SIGINT)


#: How many frames up from the interrupted one ``_Guard`` looks for an entry it must protect (a
#: Python signal handler that re-sends SIGINT adds one frame).
_ENTRY_DEPTH = 4
#: Code objects whose entry ``_Guard`` protects; filled below, once the functions exist.
_ENTRY_CODES: set[CodeType] = set()


class _Storage:
    """Flat word-level reads and writes of one tensor, contiguous or not.

    Reads and writes go through a flat view: of the tensor itself when it is contiguous, else of its
    whole storage, at the storage element of each flat index (``address``, given for tensors that share
    storage so stride-0 and overlapping views are written once per stored word; else computed from the
    strides, O(faults): a table field's ``[rows, k]`` view of FBGEMM rows).
    """

    def __init__(self, tensor: torch.Tensor, address: torch.Tensor | None = None) -> None:
        self.view = int_view(tensor.detach())
        self.device = tensor.device
        self.address = None if address is None else address.to(self.device)
        self.strided = address is None and not self.view.is_contiguous()
        if address is not None or self.strided:
            itemsize = self.view.element_size()
            self.flat = self.view.as_strided((self.view.untyped_storage().nbytes() // itemsize,), (1,), 0)
        else:
            self.flat = self.view.view(-1)

    def _where(self, index: torch.Tensor) -> torch.Tensor:
        index = index.to(self.device)
        if self.address is not None:
            return self.address[index]
        if not self.strided:
            return index
        where = torch.full_like(index, int(self.view.storage_offset()))
        rest = index
        for size, stride in zip(reversed(self.view.shape), reversed(self.view.stride()), strict=True):
            where += (rest % size) * stride
            rest = rest // size
        return where

    def read(self, index: torch.Tensor) -> torch.Tensor:
        return self.flat[self._where(index)]

    def read_words(self, index: torch.Tensor) -> torch.Tensor:
        """The words at ``index`` as int64 on the CPU (how error models read values)."""
        return self.read(index).to(torch.int64).cpu()

    def write(self, index: torch.Tensor, values: torch.Tensor) -> None:
        self.flat[self._where(index)] = values


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    """Identity of the memory ``t`` lives in (device and storage address)."""
    return str(t.device), t.untyped_storage().data_ptr()


def _span(t: torch.Tensor) -> tuple[int, int]:
    """``[lo, hi)``: the storage elements (of ``t``'s dtype) that ``t`` can touch."""
    extent = sum(int(size - 1) * int(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
    return int(t.storage_offset()), int(t.storage_offset()) + extent + 1


def _may_self_overlap(t: torch.Tensor) -> bool:
    """False when no two elements of ``t`` can share a stored word (strides sorted, each past the last)."""
    reach = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape, strict=True) if sz > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def _row_bytes(t: torch.Tensor) -> tuple[int, int, int] | None:
    """``(row stride, first byte, bytes per row)`` of a 2-D view with contiguous rows, in bytes; else None."""
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        return None
    size = t.element_size()
    return int(t.stride(0)) * size, int(t.storage_offset()) * size, int(t.shape[1]) * size


def _disjoint_columns(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two row views of one storage with the same row stride read disjoint bytes of every row
    (exact and O(1): each reads a fixed byte range in every period of the row stride)."""
    ra, rb = _row_bytes(a), _row_bytes(b)
    if ra is None or rb is None or ra[0] != rb[0] or ra[0] <= 0:
        return False
    stride, (oa, wa), (ob, wb) = ra[0], ra[1:], rb[1:]
    if wa > stride or wb > stride:
        return False
    return (ob - oa) % stride >= wa and (oa - ob) % stride >= wb


def _addresses(t: torch.Tensor) -> torch.Tensor:
    """The storage element of every flat (row-major) index of ``t``: int64 on the CPU."""
    addr = torch.tensor(t.storage_offset(), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride(), strict=True):
        addr = addr.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    return addr.reshape(-1)


@dataclass(frozen=True)
class _Exposure:
    """Which flat indices of a selected tensor are its own stored words (``owned``; None: all) and the
    storage element of each flat index (``address``; None when it shares storage with no other)."""

    owned: torch.Tensor | None
    address: torch.Tensor | None


def _exposures(sites: list[Site]) -> list[_Exposure]:
    """Deduplicate the selected tensors by stored word: a word seen through several tensors (or several
    indices of one stride-0 tensor) belongs to the first flat index, in selection order, that reaches it."""
    spans = [(_storage_key(s.tensor), *_span(s.tensor)) if s.tensor.numel() else None for s in sites]
    aliased = [s.tensor.numel() > 0 and _may_self_overlap(s.tensor) for s in sites]
    by_storage: dict[tuple[str, int], list[int]] = {}
    for i, span in enumerate(spans):
        if span is not None:
            by_storage.setdefault(span[0], []).append(i)
    pairs = [(i, j) for group in by_storage.values() for k, i in enumerate(group) for j in group[:k]]
    for i, j in pairs:  # only tensors over one storage (usually none) are compared
        a, b = spans[i], spans[j]
        assert a is not None and b is not None
        size_a, size_b = sites[i].tensor.element_size(), sites[j].tensor.element_size()
        if a[1] * size_a < b[2] * size_b and b[1] * size_b < a[2] * size_a:  # byte ranges intersect
            if _disjoint_columns(sites[i].tensor, sites[j].tensor):
                continue  # fields of the same rows (a table's codes and scale): no shared byte
            if size_a != size_b:
                raise ArgumentError(
                    f"{sites[j].name} ({sites[j].tensor.dtype}) and {sites[i].name} "
                    f"({sites[i].tensor.dtype}) share stored bytes with different word widths; "
                    "select only one of them (exclude=...)"
                )
            aliased[i] = aliased[j] = True
    out: list[_Exposure] = []
    claimed: dict[tuple[str, int], torch.Tensor] = {}
    for site, is_aliased, span in zip(sites, aliased, spans, strict=True):
        if not is_aliased or span is None:
            out.append(_Exposure(None, None))
            continue
        n = site.tensor.numel()
        addr = _addresses(site.tensor)
        uniq, inverse = torch.unique(addr, return_inverse=True)
        first = torch.full((len(uniq),), n, dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(n, dtype=torch.int64), "amin")
        taken = claimed.get(span[0], torch.empty(0, dtype=torch.int64))
        fresh = ~torch.isin(uniq, taken)
        claimed[span[0]] = torch.cat([taken, uniq[fresh]])
        owned = first[fresh].sort().values
        out.append(_Exposure(None if len(owned) == n else owned, addr))
    return out


@dataclass(eq=False)
class _Claim:
    """A live injection: who applied it, from which thread, and what it holds."""

    injector: Injector
    model: nn.Module
    thread: threading.Thread
    modules: frozenset[int]
    storages: frozenset[tuple[str, int]]
    writes: frozenset[tuple[str, int]]
    """Storages it wrote faults into (the weights site): their restores must come in reverse order."""


#: Injections applied and not yet restored, oldest first.
_LIVE: list[_Claim] = []
_LIVE_LOCK = threading.Lock()


def _claim(injector: Injector, model: nn.Module, sites: list[Site]) -> _Claim:
    """Register a live injection; refuse one into a model another thread's injection holds."""
    here = threading.current_thread()
    storages = frozenset(_storage_key(s.tensor) for s in sites if s.tensor.numel())
    writes = storages if injector.site == "weights" else frozenset()
    claim = _Claim(injector, model, here, frozenset(map(id, model.modules())), storages, writes)
    with _LIVE_LOCK:
        for other in _LIVE:
            if other.thread is not here and (other.modules & claim.modules or other.storages & storages):
                held = f"{type(other.model).__name__} (id {id(other.model):#x})"
                what = held if other.model is model else f"{type(model).__name__}, which overlaps {held},"
                raise InjectionConflictError(
                    f"{what} is held by {other.injector!r}, applied in "
                    f"thread {other.thread.name!r} and not restored; pytei corrupts a model from one thread "
                    "at a time: give each thread its own copy (copy.deepcopy(model)) or run the trials "
                    "one after another"
                )
        _LIVE.append(claim)
    return claim


def _check_order(claim: _Claim) -> None:
    """Refuse to restore ``claim`` while a later live injection over its storage is applied."""
    with _LIVE_LOCK:
        later = _LIVE[_LIVE.index(claim) + 1 :] if claim in _LIVE else []
        blocking = [c for c in later if c.writes & claim.writes]
        if blocking:
            names = ", ".join(repr(c.injector) for c in blocking)
            raise InjectionOrderError(
                f"cannot restore {claim.injector!r} on {type(claim.model).__name__}: {names} was applied "
                "after it to the same tensors and is still applied; restore the later one first (restore "
                "in the reverse order of apply, as nested `with pytei.inject(...)` blocks do)"
            )


def _unclaim(claim: _Claim) -> None:
    """Drop a live injection, once the model is clean: until then other threads stay refused (one that got
    in earlier would read this injection's faulty words as clean ones and leave them behind)."""
    with _LIVE_LOCK:
        if claim in _LIVE:
            _LIVE.remove(claim)


#: Tensors (the most hit first) whose fault counts ``repr(InjectionReport)`` shows.
_REPR_TENSORS = 3


@dataclass
class InjectionReport:
    """What one injection did. Weight-fault counts are computed on first use from the sparse map;
    activation-fault counts accumulate with every forward pass while the injection is active."""

    seed: int
    site: str
    error: dict
    fault_map: FaultMap
    components: dict[str, str]
    targeted_values: int
    layouts: dict[str, BitLayout] = field(repr=False)
    protection: dict = field(default_factory=dict)
    per_activation: dict[str, int] = field(default_factory=dict)
    passes: int = 0
    #: Index faults (the ``indices`` site): bits, ids changed and ids out of range over all passes.
    indices: IndexStats | None = None
    #: Stored words each tensor exposes (fewer than its numel when it shares storage); absent: numel.
    exposed: dict[str, int] = field(default_factory=dict, repr=False)
    #: The table field (``codes``, ``scale``, ``bias``, ``padding``, ``rows``) of each targeted table site.
    fields: dict[str, str] = field(default_factory=dict, repr=False)
    #: For a table's whole stored rows: the row width in bytes and ``(field, lo, hi)`` byte ranges.
    row_fields: dict[str, tuple[int, tuple[tuple[str, int, int], ...]]] = field(
        default_factory=dict, repr=False
    )
    _activation_fields: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def targeted_bits(self) -> int:
        """Number of distinct stored bits exposed to errors (weights site)."""
        numels = self.fault_map.numels
        return sum(self.exposed.get(n, numels[n]) * lay.width for n, lay in self.layouts.items())

    @cached_property
    def per_parameter(self) -> dict[str, int]:
        """Bits changed in each targeted tensor (0 included); empty for the activations site."""
        return {
            n: popcount(self.fault_map.faults[n].mask, lay.width) if n in self.fault_map.faults else 0
            for n, lay in self.layouts.items()
        }

    @property
    def n_faults(self) -> int:
        """Total bits changed (in stored tensors, or in layer outputs or ids over all passes so far)."""
        return sum(self.per_parameter.values()) + sum(self.per_activation.values())

    @property
    def n_values(self) -> int:
        """Number of stored values (words) with at least one changed bit."""
        return sum(len(f) for f in self.fault_map.faults.values())

    @cached_property
    def _weight_fields(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n, f in self.fault_map.faults.items():
            _add_fields(out, f.mask, self.layouts[n])
        return out

    @property
    def per_field(self) -> dict[str, int]:
        """Bits changed per field: sign/exponent/mantissa for floats (value for integers)."""
        out = dict(self._weight_fields)
        for k, v in self._activation_fields.items():
            out[k] = out.get(k, 0) + v
        return out

    @property
    def per_row_field(self) -> dict[str, int]:
        """Bits changed per field of embedding tables' rows (``codes``, ``scale``, ``bias``, ``padding``:
        flips in padding are never read, so a model cannot notice them)."""
        out: dict[str, int] = {}
        for n, count in self.per_parameter.items():
            if n in self.row_fields:  # whole rows: split by the byte column each fault is in
                width, spans = self.row_fields[n]
                f = self.fault_map.faults.get(n)
                for name, lo, hi in spans:
                    hit = 0
                    if f is not None:
                        column = f.index % width
                        hit = popcount(f.mask[(column >= lo) & (column < hi)], 8)
                    out[name] = out.get(name, 0) + hit
            elif n in self.fields:
                out[self.fields[n]] = out.get(self.fields[n], 0) + count
        return out

    @property
    def per_component(self) -> dict[str, int]:
        """Bits changed per component (embedding, mlp, ...)."""
        out: dict[str, int] = {}
        for counts in (self.per_parameter, self.per_activation):
            for n, count in counts.items():
                out[self.components[n]] = out.get(self.components[n], 0) + count
        return out

    def __repr__(self) -> str:
        """One line: site, seed, error, totals and the most-hit tensors (never the fault tensors)."""
        counts = self.per_parameter if self.site == "weights" else self.per_activation
        hit = {n: c for n, c in counts.items() if c}
        top = sorted(hit.items(), key=lambda item: (-item[1], item[0]))[:_REPR_TENSORS]
        shown = ", ".join(f"{n!r}: {c}" for n, c in top)
        more = f", +{len(hit) - len(top)} more" if len(hit) > len(top) else ""
        error = _error_text(self.error)
        passes = f", passes={self.passes}" if self.site == "activations" else ""
        if self.indices is not None:
            passes = f", passes={self.indices.passes}, out_of_range={self.indices.out_of_range}"
        return (
            f"InjectionReport(site={self.site!r}, seed={self.seed}, error={error}, "
            f"n_faults={self.n_faults}, tensors_hit={len(hit)}/{len(counts)}{passes}, "
            f"faults_per_tensor={{{shown}{more}}})"
        )

    def per_bit(self, name: str) -> torch.Tensor:
        """Changed-bit count at each bit position of stored tensor ``name``."""
        lay = self.layouts[name]
        f = self.fault_map.faults.get(name)
        return (
            bit_histogram(f.mask, lay.width) if f is not None else torch.zeros(lay.width, dtype=torch.int64)
        )


def _error_text(spec: dict) -> str:
    """``BitFlip(ber=0.05)``: an error model's spec as one short call (``None`` values left out)."""
    given = {k: v for k, v in spec.items() if k != "model" and v is not None}
    return f"{spec.get('model')}({', '.join(f'{k}={_short(v)}' for k, v in given.items())})"


def _short(value: object, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _add_fields(out: dict[str, int], mask: torch.Tensor, lay: BitLayout) -> None:
    for name, fmask in field_masks(lay).items():
        out[name] = out.get(name, 0) + popcount(mask & fmask, lay.width)


class _Selection(TypedDict):
    """The keywords of :func:`pytei.targets.select` an injector was given."""

    target: str | Sequence[str]
    params: str
    include: str | Sequence[str] | None
    exclude: str | Sequence[str] | None
    buffers: bool
    fields: str | Sequence[str] | None


class Injector:
    """Reusable description of an injection; ``apply`` corrupts a model, ``restore`` undoes it.

    ``error`` is an :class:`~pytei.errors.ErrorModel` (or a :class:`~pytei.faultmap.FaultMap` to
    replay). ``target``, ``params``, ``include``, ``exclude`` and ``buffers`` select tensors as in
    :func:`pytei.targets.select`. ``seed`` makes the faults reproducible; with ``None`` a fresh
    seed is drawn and recorded in the report.

    ``site="weights"`` (default) corrupts stored tensors once (memory errors); ``protect`` is a
    :class:`Protection` that filters those faults before they land. ``site="activations"``
    corrupts the outputs of the modules that own the selected parameters on every forward pass
    while applied, with fresh faults each pass (transient compute errors, for inference).
    ``site="indices"`` corrupts a copy of the ids that the selected embedding tables' lookups read, on
    every pass; ``bounds`` says what an id pushed out of its table's range does (:mod:`pytei.indices`).
    """

    def __init__(
        self,
        error: ErrorModel,
        *,
        target: str | Sequence[str] = "all",
        params: str = "all",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        buffers: bool = False,
        fields: str | Sequence[str] | None = None,
        seed: int | None = None,
        site: str = "weights",
        protect: Protection | None = None,
        bounds: str = "zero",
    ) -> None:
        if not isinstance(error, ErrorModel):
            raise TypeError(f"error must be a pytei ErrorModel (e.g. BitFlip(ber=1e-6)), got {error!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        if site not in SITES:
            raise ValueError(f"unknown site {site!r}; allowed: {', '.join(SITES)}")
        if protect is not None and not isinstance(protect, Protection):
            raise TypeError(f"protect must be a pytei Protection (e.g. ProtectBits()), got {protect!r}")
        if protect is not None and site != "weights":
            raise ValueError("protect= filters memory errors and needs site='weights'")
        check_bounds(bounds)
        if bounds != "zero" and site != "indices":
            raise ValueError(f"bounds={bounds!r} is what an out-of-range id does and needs site='indices'")
        self.bounds = bounds
        self.error = error
        self.selection = _Selection(
            target=target, params=params, include=include, exclude=exclude, buffers=buffers, fields=fields
        )
        self.seed = seed
        self.site = site
        self.protect = protect
        self._applied: list[tuple[_Storage, torch.Tensor, torch.Tensor]] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._active = False
        self._guard: _Guard | None = None
        self._claim: _Claim | None = None
        self._last_seed: int | None = None

    def __repr__(self) -> str:
        seed = self.seed if self.seed is not None else self._last_seed
        return f"Injector({_error_text(self.error.spec)}, site={self.site!r}, seed={seed})"

    @property
    def active(self) -> bool:
        """Whether faults are currently in a model."""
        return self._active

    def sites(self, model: nn.Module) -> list[Site]:
        """The tensors this injector would corrupt in ``model`` (their modules, for activations)."""
        raw = self.protect is not None and self.protect.raw_rows
        return select(model, **self.selection, raw=raw)

    def apply(self, model: nn.Module) -> InjectionReport:
        """Corrupt ``model`` in place (or hook its layer outputs) and return the live report.

        Atomic under Ctrl-C: it either returns with every fault in, or raises with the model clean.
        Refused (:class:`InjectionConflictError`) while another thread's injection holds the model.
        """
        if self._active:
            raise RuntimeError("this injector is already applied; call restore() first")
        sites = self.sites(model)
        seed = self.seed if self.seed is not None else secrets.randbits(62)
        self._last_seed = seed
        guard = _Guard.start(self)
        try:
            self._claim = _claim(self, model, sites)
            if self.site == "activations":
                report = self._apply_activations(model, sites, seed)
            elif self.site == "indices":
                report = self._apply_indices(model, sites, seed)
            else:
                report = self._apply_weights(sites, seed)
            self._active = True
            self._guard = guard
            guard.release()  # a Ctrl-C held while applying reaches its handler now: the trial is aborted
        except BaseException:
            guard.held = True
            self._guard = None
            self._take_out()
            guard.stop()
            raise
        return report

    def _apply_weights(self, sites: list[Site], seed: int) -> InjectionReport:
        exposures = _exposures(sites)
        storages = [_Storage(s.tensor, e.address) for s, e in zip(sites, exposures, strict=True)]
        layouts = {s.name: s.layout for s in sites}
        replay = isinstance(self.error, FaultMap)  # a map names real indices: no renumbering
        words = []
        for s, st, e in zip(sites, storages, exposures, strict=True):
            if e.owned is None or replay:
                words.append(Words(s.name, s.tensor.numel(), layouts[s.name], st.read_words))
            else:
                words.append(Words(s.name, len(e.owned), layouts[s.name], _owned_reader(st, e.owned)))
        protection: dict = {}
        with torch.no_grad():
            protect = self.protect
            drawn = self.error.draw(words, seed) if protect is None else protect.draw(self.error, words, seed)
            if self.protect is not None:
                drawn = self.protect.filter(drawn, words, self.error, seed)
                protection = dict(self.protect.stats)
            if not replay:  # back from each tensor's own words to its flat indices
                drawn = [
                    f if e.owned is None or not len(f) else Faults(e.owned[f.index], f.mask)
                    for f, e in zip(drawn, exposures, strict=True)
                ]
            else:
                _check_one_fault_per_word(sites, exposures, drawn)
            self._write_faults(storages, drawn, list(layouts.values()))
        kept = {s.name: f for s, f in zip(sites, drawn, strict=True) if len(f)}
        fault_map = FaultMap(
            kept,
            {s.name: s.tensor.dtype for s in sites},
            {s.name: s.tensor.numel() for s in sites},
            {"seed": seed, "error": self.error.spec},
        )
        exposed = {s.name: len(e.owned) for s, e in zip(sites, exposures, strict=True) if e.owned is not None}
        return InjectionReport(
            seed=seed,
            site=self.site,
            error=self.error.spec,
            fault_map=fault_map,
            components={s.name: s.component for s in sites},
            targeted_values=sum(exposed.get(s.name, s.tensor.numel()) for s in sites),
            layouts=layouts,
            protection=protection,
            exposed=exposed,
            fields={s.name: s.field for s in sites if s.field is not None},
            row_fields={s.name: (int(s.tensor.shape[1]), s.row_fields) for s in sites if s.row_fields},
        )

    def _write_faults(self, storages: list[_Storage], drawn: list[Faults], layouts: list[BitLayout]) -> None:
        """XOR every drawn mask into its word, keeping the old words for restore."""
        for st, f, lay in zip(storages, drawn, layouts, strict=True):
            if len(f):
                index = f.index.to(st.device)
                old = st.read(index)
                self._applied.append((st, index, old))  # first, so a failed write is undone too
                st.write(index, old ^ f.mask.to(device=st.device, dtype=lay.view_dtype))

    def _apply_activations(self, model: nn.Module, sites: list[Site], seed: int) -> InjectionReport:
        owners: dict[str, str] = {}
        for s in sites:
            owners.setdefault(s.name.rpartition(".")[0], s.component)
        modules = dict(model.named_modules())
        report = InjectionReport(
            seed=seed,
            site=self.site,
            error=self.error.spec,
            fault_map=FaultMap({}, {}, {}, {"seed": seed, "error": self.error.spec}),
            components=dict(owners),
            targeted_values=0,
            layouts={},
        )
        report.per_activation.update({name: 0 for name in owners})
        for name in owners:
            hook = _activation_hook(self.error, name, generator_for(seed, name, "activations"), report)
            self._hooks.append(modules[name].register_forward_hook(hook, prepend=True))
        return report

    def _apply_indices(self, model: nn.Module, sites: list[Site], seed: int) -> InjectionReport:
        """Hook the modules that look up the selected tables: fresh faults in a copy of their ids per pass."""
        readers = lookups(model, [s.name for s in sites])
        stats = IndexStats()
        report = InjectionReport(
            seed=seed,
            site=self.site,
            error=self.error.spec,
            fault_map=FaultMap({}, {}, {}, {"seed": seed, "error": self.error.spec}),
            components=dict.fromkeys(readers, "embedding"),
            targeted_values=0,
            layouts={},
            indices=stats,
        )
        report.per_activation.update(dict.fromkeys(readers, 0))
        stats.per_module = report.per_activation  # one count: bits per lookup module
        for path, tables in readers.items():
            module = model.get_submodule(path)
            reader = reader_for(module)
            assert reader is not None
            generator = generator_for(seed, path, "indices")
            hook = index_hook(path, reader, tables, self.error, generator, self.bounds, stats)
            self._hooks.append(module.register_forward_pre_hook(hook, prepend=True, with_kwargs=True))
        return report

    def _take_out(self) -> None:
        """Write every old word back and remove the hooks (idempotent); then drop the registration."""
        with torch.no_grad():
            while self._applied:
                st, index, old = self._applied[-1]
                st.write(index, old)
                self._applied.pop()
        while self._hooks:
            self._hooks[-1].remove()
            self._hooks.pop()
        self._active = False
        if self._claim is not None:
            _unclaim(self._claim)
            self._claim = None

    def restore(self) -> None:
        """Write back every changed word (or remove the activation hooks): the model is as before.

        Idempotent. Atomic under Ctrl-C, also at its first instruction: the handler installed by
        ``apply`` holds a Ctrl-C until the model is clean. Refused (:class:`InjectionOrderError`,
        nothing changed) while a later injector over the same tensors is still applied.
        """
        guard = self._guard
        if guard is not None:
            guard.held = True
        try:
            if self._claim is not None:
                _check_order(self._claim)  # the claim itself goes once every word is back (_take_out)
        except BaseException:
            if guard is not None:
                guard.release()
            raise
        try:
            self._take_out()
        finally:
            if guard is not None and not self._applied and not self._hooks:
                self._guard = None
                guard.stop()


def _owned_reader(st: _Storage, owned: torch.Tensor):
    """``read(i)`` over a tensor's own stored words: word ``i`` is flat index ``owned[i]``."""
    return lambda index: st.read_words(owned[index])


def _check_one_fault_per_word(sites: list[Site], exposures: list[_Exposure], drawn: list[Faults]) -> None:
    """Refuse a replayed map that reaches one stored word twice through aliased tensors."""
    seen: dict[tuple[str, int], dict[int, str]] = {}
    for s, e, f in zip(sites, exposures, drawn, strict=True):
        if e.address is None or not len(f):
            continue
        words = seen.setdefault(_storage_key(s.tensor), {})
        for flat, addr in zip(f.index.tolist(), e.address[f.index].tolist(), strict=True):
            if addr in words:
                raise ArgumentError(
                    f"the fault map changes one stored word twice, through {words[addr]} and "
                    f"{s.name}[{flat}] (they share storage); a replayable map names each stored word once"
                )
            words[addr] = f"{s.name}[{flat}]"


def _activation_hook(error: ErrorModel, name: str, generator: torch.Generator, report: InjectionReport):
    """Forward hook that XORs fresh faults into a copy of a module's output on every pass (the output
    itself may share storage with a parameter, e.g. ``return self.pe[:, :n]``, and is never written)."""

    def hook(module: nn.Module, inputs, output):
        first = output[0] if isinstance(output, tuple) else output
        if not isinstance(first, torch.Tensor):
            return output
        with torch.no_grad():
            source = first.detach()  # only read: the output may be a view of a parameter or an input
            lay = layout(source.dtype)
            words = Words(f"{name}:output", source.numel(), lay, _Storage(source).read_words)
            f = error.draw_one(words, generator)
            report.passes += 1
            if not len(f):
                return output
            target = source.clone()  # faults go into a copy, never into storage the output shares
            st = _Storage(target)
            index = f.index.to(st.device)
            st.write(index, st.read(index) ^ f.mask.to(device=st.device, dtype=lay.view_dtype))
            _add_fields(report._activation_fields, f.mask, lay)
            report.per_activation[name] += popcount(f.mask, lay.width)
        return (target, *output[1:]) if isinstance(output, tuple) else target

    return hook


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 over the names and raw bytes of every parameter: equal digests mean bit-identical
    weights, which is how campaigns and the demo check that ``restore`` left a model as it was."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def inject(
    model: nn.Module,
    error: ErrorModel,
    *,
    target: str | Sequence[str] = "all",
    params: str = "all",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    buffers: bool = False,
    fields: str | Sequence[str] | None = None,
    seed: int | None = None,
    site: str = "weights",
    protect: Protection | None = None,
    bounds: str = "zero",
) -> _Injection:
    """Run the block with ``error`` injected into ``model``; restore on exit, whatever happens.

    The keywords are :class:`Injector`'s: ``target`` (components, see ``pytei.targets.COMPONENTS``,
    or ``"all"``), ``params`` (``"weight"``, ``"bias"``, ``"all"``), ``include``/``exclude`` (glob
    patterns over tensor names), ``buffers`` (also corrupt persistent buffers), ``fields`` (fields of
    embedding tables' rows: ``codes``, ``scale``, ``bias``, ``padding``), ``seed`` (``None``:
    a fresh one, recorded in the report), ``site`` (``"weights"``, ``"activations"`` or ``"indices"``),
    ``protect`` (a :class:`Protection` for the weights site) and ``bounds`` (what an out-of-range id
    does at the indices site: ``"zero"``, ``"skip"``, ``"raise"``, see :mod:`pytei.indices`). Yields the live
    :class:`InjectionReport`.

    >>> with pytei.inject(model, BitFlip(ber=1e-6), target="mlp", params="weight", seed=0) as report:
    ...     out = model(x)
    """
    injector = Injector(
        error,
        target=target,
        params=params,
        include=include,
        exclude=exclude,
        buffers=buffers,
        fields=fields,
        seed=seed,
        site=site,
        protect=protect,
        bounds=bounds,
    )
    return _Injection(injector, model)


class _Injection:
    """The context manager :func:`inject` returns: ``apply`` on entry, ``restore`` on exit.

    A class rather than a generator so that no Python code of pytei runs between the faults going in
    and the block starting, nor between the block ending and the restore holding Ctrl-C.
    """

    def __init__(self, injector: Injector, model: nn.Module) -> None:
        self.injector = injector
        self.model = model

    def __enter__(self) -> InjectionReport:
        return self.injector.apply(self.model)

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.injector.restore()


_ENTRY_CODES.update(
    {
        Injector.apply.__code__,
        Injector.restore.__code__,
        _Injection.__enter__.__code__,
        _Injection.__exit__.__code__,
    }
)
