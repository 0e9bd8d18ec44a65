"""Put errors into a model's tensors and take them out again, bit-exactly, in O(faults).

Faults are XOR-ed into the existing storage through same-width integer views, so Parameter
objects (and optimizers or hooks that hold them) are untouched. The original words at every
changed index are kept; restore writes them back. A trial is atomic with respect to Ctrl-C:
SIGINT is held while faults go in or come out, and any exception while applying undoes what was
applied, so a model is never left half-corrupted.
"""

from __future__ import annotations

import hashlib
import secrets
import signal
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TypedDict

import torch
from torch import nn

from .bits import BitLayout, bit_histogram, field_masks, int_view, layout, popcount
from .errors import ErrorModel, Faults, Words
from .faultmap import FaultMap
from .sampling import generator_for
from .targets import Site, select

__all__ = ["Injector", "InjectionReport", "Protection", "SITES", "inject", "parameter_digest"]

#: Where errors go: stored tensors (memory errors) or layer outputs (transient compute errors).
SITES = ("weights", "activations")


class Protection(ABC):
    """A memory-side protection: decides which drawn faults actually reach the stored values.

    It sees the faults drawn for every selected tensor *before* they land and returns the ones
    that get through (e.g. masked bits, ECC-corrected words), so the same draws (same seed) can be
    compared with and without protection. ``stats`` describes what it did on the last call.
    """

    @abstractmethod
    def filter(self, faults: list[Faults], words: list[Words], error: ErrorModel, seed: int) -> list[Faults]:
        """The faults that reach storage, one entry per tensor of ``words``."""

    def overhead(self, lay: BitLayout) -> float:
        """Extra storage as a fraction of the protected data (0.125 for a (72,64) code)."""
        return 0.0

    @property
    def stats(self) -> dict:
        """Counters of the last ``filter`` call (e.g. corrected, detected, silent)."""
        return {}


@contextmanager
def _hold_sigint() -> Iterator[None]:
    """Delay Ctrl-C until the block is done (main thread only), then raise it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


class _Storage:
    """Flat word-level reads and writes of one tensor, contiguous or not."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.view = int_view(tensor.detach())
        self.device = tensor.device
        self.flat = self.view.view(-1) if self.view.is_contiguous() else None

    def _where(self, index: torch.Tensor):
        index = index.to(self.device)
        return index if self.flat is not None else torch.unravel_index(index, self.view.shape)

    def read(self, index: torch.Tensor) -> torch.Tensor:
        where = self._where(index)
        return self.flat[where] if self.flat is not None else self.view[where]

    def read_words(self, index: torch.Tensor) -> torch.Tensor:
        """The words at ``index`` as int64 on the CPU (how error models read values)."""
        return self.read(index).to(torch.int64).cpu()

    def write(self, index: torch.Tensor, values: torch.Tensor) -> None:
        where = self._where(index)
        if self.flat is not None:
            self.flat[where] = values
        else:
            self.view[where] = values


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
    _activation_fields: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def targeted_bits(self) -> int:
        """Number of stored bits exposed to errors (weights site)."""
        return sum(self.fault_map.numels[n] * lay.width for n, lay in self.layouts.items())

    @cached_property
    def per_parameter(self) -> dict[str, int]:
        """Bits changed in each targeted tensor (0 included); empty for the activations site."""
        return {
            n: popcount(self.fault_map.faults[n].mask, lay.width) if n in self.fault_map.faults else 0
            for n, lay in self.layouts.items()
        }

    @property
    def n_faults(self) -> int:
        """Total bits changed (in stored tensors, or in layer outputs over all passes so far)."""
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
        given = {k: v for k, v in self.error.items() if k != "model" and v is not None}
        error = f"{self.error.get('model')}({', '.join(f'{k}={_short(v)}' for k, v in given.items())})"
        passes = f", passes={self.passes}" if self.site == "activations" else ""
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
        seed: int | None = None,
        site: str = "weights",
        protect: Protection | None = None,
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
        self.error = error
        self.selection = _Selection(
            target=target, params=params, include=include, exclude=exclude, buffers=buffers
        )
        self.seed = seed
        self.site = site
        self.protect = protect
        self._applied: list[tuple[_Storage, torch.Tensor, torch.Tensor]] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._active = False

    @property
    def active(self) -> bool:
        """Whether faults are currently in a model."""
        return self._active

    def sites(self, model: nn.Module) -> list[Site]:
        """The tensors this injector would corrupt in ``model`` (their modules, for activations)."""
        return select(model, **self.selection)

    def apply(self, model: nn.Module) -> InjectionReport:
        """Corrupt ``model`` in place (or hook its layer outputs) and return the live report."""
        if self._active:
            raise RuntimeError("this injector is already applied; call restore() first")
        sites = self.sites(model)
        seed = self.seed if self.seed is not None else secrets.randbits(62)
        if self.site == "activations":
            return self._apply_activations(model, sites, seed)
        storages = [_Storage(s.tensor) for s in sites]
        layouts = {s.name: layout(s.tensor.dtype) for s in sites}
        words = [
            Words(s.name, s.tensor.numel(), layouts[s.name], st.read_words)
            for s, st in zip(sites, storages, strict=True)
        ]
        protection: dict = {}
        try:  # a Ctrl-C held until the faults are in aborts the trial: undo, then raise it
            with torch.no_grad(), _hold_sigint():
                drawn = self.error.draw(words, seed)
                if self.protect is not None:
                    drawn = self.protect.filter(drawn, words, self.error, seed)
                    protection = dict(self.protect.stats)
                for st, f, lay in zip(storages, drawn, layouts.values(), strict=True):
                    if len(f):
                        index = f.index.to(st.device)
                        old = st.read(index)
                        st.write(index, old ^ f.mask.to(device=st.device, dtype=lay.view_dtype))
                        self._applied.append((st, index, old))
        except BaseException:
            self._undo()
            raise
        self._active = True
        kept = {s.name: f for s, f in zip(sites, drawn, strict=True) if len(f)}
        fault_map = FaultMap(
            kept,
            {s.name: s.tensor.dtype for s in sites},
            {s.name: s.tensor.numel() for s in sites},
            {"seed": seed, "error": self.error.spec},
        )
        return InjectionReport(
            seed=seed,
            site=self.site,
            error=self.error.spec,
            fault_map=fault_map,
            components={s.name: s.component for s in sites},
            targeted_values=sum(s.tensor.numel() for s in sites),
            layouts=layouts,
            protection=protection,
        )

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
        self._active = True
        return report

    def _undo(self) -> None:
        with torch.no_grad():
            while self._applied:
                st, index, old = self._applied.pop()
                st.write(index, old)

    def restore(self) -> None:
        """Write back every changed word (or remove the activation hooks): the model is as before."""
        with _hold_sigint():
            self._undo()
            while self._hooks:
                self._hooks.pop().remove()
            self._active = False


def _activation_hook(error: ErrorModel, name: str, generator: torch.Generator, report: InjectionReport):
    """Forward hook that XORs fresh faults into a module's output on every pass."""

    def hook(module: nn.Module, inputs, output):
        first = output[0] if isinstance(output, tuple) else output
        if not isinstance(first, torch.Tensor):
            return output
        with torch.no_grad():
            target = first.detach().clone() if first.requires_grad else first
            st = _Storage(target)
            lay = layout(target.dtype)
            words = Words(f"{name}:output", target.numel(), lay, st.read_words)
            f = error.draw_one(words, generator)
            if len(f):
                index = f.index.to(st.device)
                st.write(index, st.read(index) ^ f.mask.to(device=st.device, dtype=lay.view_dtype))
                _add_fields(report._activation_fields, f.mask, lay)
                report.per_activation[name] += popcount(f.mask, lay.width)
        report.passes += 1
        if target is first:
            return output
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


@contextmanager
def inject(
    model: nn.Module,
    error: ErrorModel,
    *,
    target: str | Sequence[str] = "all",
    params: str = "all",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    buffers: bool = False,
    seed: int | None = None,
    site: str = "weights",
    protect: Protection | None = None,
) -> Iterator[InjectionReport]:
    """Run the block with ``error`` injected into ``model``; restore on exit, whatever happens.

    The keywords are :class:`Injector`'s: ``target`` (components, see ``pytei.targets.COMPONENTS``,
    or ``"all"``), ``params`` (``"weight"``, ``"bias"``, ``"all"``), ``include``/``exclude`` (glob
    patterns over tensor names), ``buffers`` (also corrupt persistent buffers), ``seed`` (``None``:
    a fresh one, recorded in the report), ``site`` (``"weights"`` or ``"activations"``) and
    ``protect`` (a :class:`Protection` for the weights site). Yields the live
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
        seed=seed,
        site=site,
        protect=protect,
    )
    report = injector.apply(model)
    try:
        yield report
    finally:
        injector.restore()
