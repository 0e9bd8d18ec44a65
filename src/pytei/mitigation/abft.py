"""Algorithm-based fault tolerance (ABFT): checksum tests of GEMMs and embedding lookups, with re-execution.

Huang & Abraham (1984) check a matrix product against checksums of its operands; Li et al. (2022,
"Efficient soft-error detection for low-precision deep learning recommendation models") apply this
to the MLPs and embedding bags of DLRMs. The paper (Sec. 4.2) re-executes an operation whose check
fails, and finds (Sec. 7) that re-execution cannot finish at high error rates; here that is counted.

The test is per output *row* (one sample of a Linear, one bag of an EmbeddingBag, one looked-up
vector of an Embedding), and a row is the unit of every count in ``ABFT.stats``:

* ``nn.Linear`` ``y = x W^T + b``: ``sum_j y_j`` must equal ``x . c + sum(b)``, ``c = W.sum(0)``.
* ``nn.EmbeddingBag`` (sum or mean, optionally weighted) and ``nn.Embedding``: a bag's output must
  sum to the pooled row sums ``C_T[i] = T[i].sum()`` of the rows it read.
* More module types (eval BatchNorm, DCN's cross network, the FM family's wide term, quantized
  TorchRec collections) have checks of their own in the registry of ``pytei.mitigation.checksums``.

The residual ``r`` of a row is never exactly 0 under rounding, so a row fails when ``|r| > tau * m``
or ``r`` is NaN/Inf, where ``m`` bounds the sum of the absolute values of all the terms the row's
check adds up, i.e. the scale of its rounding errors. For a lookup ``m`` is the pooled
``sum |T[i]|``; for a Linear it is ``||x||_2 * ||a||_2 + sum |b|`` with ``a = sum_j |W[j, :]|``, an
upper bound of ``|x| . a + sum |b|`` (Cauchy-Schwarz) that costs one pass over ``x`` instead of an
``abs()`` and a second GEMV, and is 1.1-4x looser on the models of the zoo. Rounding errors of the
layer and of the check stay below a few ``u * sqrt(n) * m`` (``u`` the unit roundoff, ``n`` the
terms summed), so ``tau`` is calibrated on clean data (``ABFT.calibrate``) or, by default, the
probabilistic bound ``u * (8 * sqrt(n) + 4)`` of Higham & Mary (2019); see ``_analytic_tau``.

Checksums are encoded from a module's weights the first time it is attached (or calibrated; the
weights must be clean then), as deployed ABFT encodes them once when a model is loaded. They live
outside the module, since a checksum recomputed from corrupted weights would agree with them, and
later attaches reuse them (a campaign attaches once per trial); ``refresh()`` forgets them after
the weights change legitimately (training, loading), and a change of device, dtype or shape
re-encodes them.

What is detected: a change ``d`` of one output value is caught once ``|d| > tau * m + |r_clean|``
(up to the rounding of the row sum). With ``|r_clean| <= tau * m / margin``, as on data like the
calibration's, a flip of float32 bit ``b`` of a value ``v`` is caught whenever
``|v| > 2 ** max(24 - b, 1) * (1 + 1 / margin) * tau * m``: a flip of mantissa bit ``b <= 22``
changes ``v`` by more than ``2 ** (b - 24) * |v|``, one of an exponent or the sign bit by at least
``|v| / 2``. A value of a row with finite input that turns NaN/Inf is always caught. Flips of values
far below ``tau * m`` change the row by less than its rounding noise and can pass.

The check runs in float32 for float32/float16/bfloat16 layers (float64 for float64 ones): a float64
check costs as much as the GEMM it checks on CPUs, while float32 only widens the noise it must
tolerate by about sqrt(3). A failing row whose ``m`` is not finite (its input is NaN/Inf or
astronomically large: corrupted upstream) cannot be blamed on the layer: it is counted as
``skipped`` and left alone. Re-execution calls the module again, so its pre-hooks and forward hooks
run again (pytei's activation-fault hook then draws fresh faults, as a transient error would).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..exceptions import PyteiError
from .base import Batches, Mitigation, input_batches
from .checksums import Check, make_check, uncheckable

if TYPE_CHECKING:
    import pandas as pd

    from .roofline import Balance

__all__ = ["ABFT", "ABFTError", "BOUNDS", "FALLBACKS", "SCHEMES"]

#: What happens to rows that still fail after ``max_retries`` re-executions.
FALLBACKS = ("keep", "zero", "raise")
#: How checksums are computed (``ABFT(scheme=...)``): in a separate pass after the layer (``global``),
#: by the layer's own kernel call on parameters augmented with checksum columns (``fused``), or chosen
#: per layer by its arithmetic intensity on the device's roofline (``auto``).
SCHEMES = ("global", "fused", "auto")
#: What a residual is compared to (``ABFT(bound=...)``): ``norm``, a bound of the absolute values the
#: check sums (sound for any rounding); ``variance``, the standard deviation of the rounding errors as
#: independent roundings (in the spirit of V-ABFT: tighter, so smaller errors are caught, and sound
#: in practice only with the margin of a calibration or the 8-sigma analytic tolerance).
BOUNDS = ("norm", "variance")

#: Analytic tolerance ``u * (LAMBDA * sqrt(n) + KAPPA)``: LAMBDA = 8 makes the probabilistic rounding
#: bound fail with probability below ~1e-13 per value (Higham & Mary 2019, Thm. 2.4), KAPPA covers
#: the few single roundings (bias add, stored output, checksum vector, pooling weights or mean).
LAMBDA, KAPPA = 8.0, 4.0
#: A calibrated tolerance is never below this many unit roundoffs (2**-20 for float32 layers), so a
#: calibration on exact lookups (one row per bag) does not leave ``tau = 0``.
FLOOR_ULPS = 16.0


class ABFTError(PyteiError, RuntimeError):
    """An operation kept failing its ABFT check after every re-execution (``fallback="raise"``)."""


@dataclass
class LayerStats:
    """Counters of one layer. Rows are the unit: a GEMM output row, a bag, or a looked-up vector."""

    calls: int = 0  # forward calls checked
    checked: int = 0  # rows checked
    detected: int = 0  # rows that failed on their first computation
    reexecutions: int = 0  # re-executions of the whole module (at most max_retries per call)
    recovered: int = 0  # detected rows that passed on a re-execution
    unrecoverable: int = 0  # detected rows still failing after max_retries (fallback applied)
    skipped: int = 0  # failing rows whose input is NaN/Inf (m not finite): not this layer's fault
    clean_checked: int = 0  # rows checked by the last clean-run measurement
    false_alarms: int = 0  # rows of that clean-run measurement that failed the check


#: Counters that describe the last clean-run measurement; ``reset_stats`` keeps them.
_CLEAN_FIELDS = ("clean_checked", "false_alarms")


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


@dataclass
class _Layer:
    name: str
    check: Check
    scheme: str = "global"  # the scheme in force: "global" or "fused"
    busy: bool = False  # set while the module is being re-executed from its own hook
    worst: float = 0.0  # largest clean |r| / m seen by calibrate
    seen: bool = False  # whether calibrate saw any verifiable row
    u: float = 0.0  # unit roundoff of the outputs seen by calibrate

    def residual(self, args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The check's residual under this layer's scheme."""
        if self.scheme == "fused":
            return self.check.fused_residual(args, kwargs, output)
        return self.check.residual(args, kwargs, output)


class ABFT(Mitigation):
    """Checksum-test every protected layer's output rows and re-execute layers whose rows fail.

    ``layers`` names the modules to protect (default: every module with a registered check that can
    describe it, ``pytei.mitigation.checksums``: Linear layers, output layers included, embeddings,
    eval BatchNorm, cross networks, quantized TorchRec collections). ``tau`` is the relative
    tolerance: a float for all layers, a mapping for some, else the analytic default; ``calibrate``
    replaces it per layer by ``margin`` times the largest clean residual. ``scheme`` (``SCHEMES``)
    picks how checksums are computed and ``bound`` (``BOUNDS``) what residuals are compared to;
    ``plan`` lists, per parameterised layer, what checks it and what that costs.

    A failing row triggers up to ``max_retries`` re-executions of its module with the same inputs
    (its forward hooks run again, so injected activation faults are drawn afresh); each failing row
    takes the value of the first re-execution on which it passes. Rows that never pass are
    ``unrecoverable`` and get the ``fallback``: ``"keep"`` their last value, ``"zero"`` them, or
    ``"raise"`` an ``ABFTError``.
    """

    per_sample = True

    def __init__(
        self,
        *,
        layers: Sequence[str] | None = None,
        tau: float | Mapping[str, float] | None = None,
        max_retries: int = 3,
        fallback: str = "keep",
        margin: float = 8.0,
        scheme: str = "global",
        bound: str = "norm",
    ) -> None:
        if bound not in BOUNDS:
            raise ValueError(f"unknown ABFT bound {bound!r}; allowed: {', '.join(BOUNDS)}")
        if scheme not in SCHEMES:
            raise ValueError(f"unknown ABFT scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
        if fallback not in FALLBACKS:
            raise ValueError(f"unknown ABFT fallback {fallback!r}; allowed: {', '.join(FALLBACKS)}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if not margin >= 1.0:
            raise ValueError(f"margin must be >= 1 (tau must exceed every clean residual), got {margin}")
        per_layer = dict(tau) if isinstance(tau, Mapping) else {}
        for name, value in [("tau", tau), *per_layer.items()]:
            if isinstance(value, int | float) and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"tau must be a finite float >= 0, got {name} = {value!r}")
        self.layers = list(layers) if layers is not None else None
        self.default_tau = float(tau) if isinstance(tau, int | float) else None
        self.tau = {k: float(v) for k, v in per_layer.items()}
        self.max_retries, self.fallback, self.margin = max_retries, fallback, float(margin)
        self.scheme, self.bound = scheme, bound
        #: With ``scheme="auto"``: the scheme chosen per layer by ``plan`` or ``calibrate`` (a layer not
        #: chosen yet runs the global check).
        self.schemes: dict[str, str] = {}
        self._model: nn.Module | None = None
        self._checks: weakref.WeakKeyDictionary[nn.Module, Check] = weakref.WeakKeyDictionary()
        self._layers: list[_Layer] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._fused: list[tuple[Check, nn.Module]] = []  # layers whose parameters are fused, to undo
        self._stats: dict[str, LayerStats] = {}
        self._mode = "protect"

    def __repr__(self) -> str:
        tau = f"{len(self.tau)} calibrated layers" if self.tau else self.default_tau
        tau = "analytic" if tau is None else tau
        scheme = "" if self.scheme == "global" else f", scheme={self.scheme!r}"
        scheme += "" if self.bound == "norm" else f", bound={self.bound!r}"
        return f"ABFT(tau={tau}, max_retries={self.max_retries}, fallback={self.fallback!r}{scheme})"

    # --- attachment ----------------------------------------------------------------------------

    def protected(self, model: nn.Module) -> dict[str, nn.Module]:
        """The modules this ABFT protects in ``model``, by name."""
        modules = dict(model.named_modules())
        if self.layers is None:
            return {n: m for n, m in modules.items() if uncheckable(m) is None}
        missing = [n for n in self.layers if n not in modules]
        if missing:
            raise ValueError(f"no module named {missing} in {type(model).__name__}")
        for name in self.layers:
            reason = uncheckable(modules[name])
            if reason is not None:
                raise ValueError(f"ABFT cannot protect {name!r}: {reason}")
        return {n: modules[n] for n in self.layers}

    def attach(self, model: nn.Module) -> None:
        """Hook the outputs of the protected layers, encoding the checksums of those seen for the first
        time (their weights must be clean now)."""
        if self._hooks:
            raise RuntimeError("this ABFT is already attached; detach() first")
        protected = self.protected(model)
        self._model = model
        try:
            for name, module in protected.items():
                check = self._check(module)
                layer = _Layer(name, check, self._scheme_of(name, module, check))
                self._layers.append(layer)
                if layer.scheme == "fused":
                    check.fuse(module)
                    self._fused.append((check, module))
                self._hooks.append(module.register_forward_hook(self._hook(layer), with_kwargs=True))
                self._stats.setdefault(name, LayerStats())
            for layer in self._layers:  # after every check's hook, so a tap reads the checked output
                for tap in layer.check.taps:
                    child = protected[layer.name].get_submodule(tap)
                    self._hooks.append(child.register_forward_hook(layer.check.recorder(tap)))
        except BaseException:
            self.detach()
            raise

    def _scheme_of(self, name: str, module: nn.Module, check: Check) -> str:
        """The scheme layer ``name`` runs: ``fused`` where asked for (or chosen by ``auto``) and the
        check has a fused form for this module, else ``global``."""
        wanted = self.schemes.get(name, "global") if self.scheme == "auto" else self.scheme
        return "fused" if wanted == "fused" and check.why_not_fused(module) is None else "global"

    def _check(self, module: nn.Module) -> Check:
        check = self._checks.get(module)
        if check is None or check.stale(module):
            check = self._checks[module] = make_check(module)
            check.use_bound(self.bound)
        return check

    def refresh(self) -> None:
        """Forget the encoded checksums: the next ``attach`` takes them from the weights as they are then
        (after training or loading new weights; never while faults are injected)."""
        if self._hooks:
            raise RuntimeError("refresh() re-encodes checksums on the next attach; detach() first")
        self._checks.clear()

    def detach(self) -> None:
        while self._hooks:
            self._hooks.pop().remove()
        while self._fused:
            check, module = self._fused.pop()
            check.unfuse(module)
        self._layers.clear()
        self._model = None

    # --- the check ------------------------------------------------------------------------------

    def _tolerance(self, layer: _Layer, args: tuple, kwargs: dict, dtype: torch.dtype):
        tau = self.tau.get(layer.name, self.default_tau)
        return tau if tau is not None else _analytic_tau(layer.check.terms(args, kwargs), dtype)

    def _excess(self, layer: _Layer, args: tuple, kwargs: dict, output: torch.Tensor):
        """Per row ``|r| - tau * m`` (a row fails where it is > 0 or NaN), and ``m``."""
        r, m = layer.residual(args, kwargs, output)
        tau = self._tolerance(layer, args, kwargs, _dtype(output))
        return _minus_scaled(r.abs_(), m, tau), m

    def _hook(self, layer: _Layer):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
            if layer.busy:
                return None
            if self._mode == "calibrate":
                return self._record(layer, args, kwargs, output)
            excess, m = self._excess(layer, args, kwargs, output)
            st = self._stats[layer.name]
            if self._mode == "clean":
                st.clean_checked += excess.numel()
                st.false_alarms += 0 if _all_pass(excess) else int(_split(excess, m)[0].sum())
                return None
            st.calls += 1
            st.checked += excess.numel()
            if _all_pass(excess):
                return None
            bad, unverifiable = _split(excess, m)
            st.skipped += int(unverifiable.sum())
            detected = int(bad.sum())
            if not detected:
                return None
            st.detected += detected
            return self._recover(layer, module, args, kwargs, output, bad)

        return hook

    def _recover(self, layer: _Layer, module: nn.Module, args: tuple, kwargs: dict, output, bad):
        """Re-execute up to ``max_retries`` times, keep each row's first passing value, then fall back."""
        st = self._stats[layer.name]
        check = layer.check
        rows = check.values(output)
        detected = int(bad.sum())
        for _ in range(self.max_retries):
            layer.busy = True
            try:
                retry = module(*args, **kwargs)
            finally:
                layer.busy = False
            st.reexecutions += 1
            rows = torch.where(check.row_mask(bad)[:, None], check.values(retry), rows)
            bad = bad & _split(*self._excess(layer, args, kwargs, retry))[0]
            if not bool(bad.any()):
                break
        left = int(bad.sum())
        st.recovered += detected - left
        st.unrecoverable += left
        if left and self.fallback == "raise":
            raise ABFTError(
                f"ABFT: {left} of {bad.numel()} output rows of layer {layer.name!r} still fail their "
                f"checksum after {self.max_retries} re-executions (persistent error, e.g. corrupted weights)"
            )
        if left and self.fallback == "zero":
            rows = rows.masked_fill(check.row_mask(bad)[:, None], 0)
        return check.rebuild(output, rows)

    # --- calibration and clean runs --------------------------------------------------------------

    def _record(self, layer: _Layer, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        r, m = layer.residual(args, kwargs, output)
        verifiable = m < math.inf
        rel = torch.where(verifiable, r.abs() / m.clamp_min(torch.finfo(m.dtype).tiny), 0.0)
        if rel.numel():
            layer.worst = max(layer.worst, float(rel.max()))  # NaN propagates and is refused later
            layer.seen = layer.seen or bool(verifiable.any())
        layer.u = _unit_roundoff(_dtype(output))

    def _run_clean(self, model: nn.Module, batches: list[tuple], mode: str) -> list[_Layer]:
        """Run ``batches`` through ``model`` (eval mode, no grad) with the hooks in ``mode``; returns
        the layers it checked (attaching for the run if needed)."""
        attached_here = not self._hooks
        if attached_here:
            self.attach(model)
        elif self._model is not model:
            raise RuntimeError("this ABFT is attached to another model; detach() first")
        layers = list(self._layers)
        for layer in layers:
            layer.worst, layer.seen = 0.0, False
        was_training = model.training
        model.eval()
        self._mode = mode
        try:
            with torch.no_grad():
                for inputs in batches:
                    model(*inputs)
        finally:
            self._mode = "protect"
            model.train(was_training)
            if attached_here:
                self.detach()
        return layers

    def calibrate(self, model: nn.Module, batches: Batches) -> dict[str, float]:
        """Set each layer's ``tau`` to ``margin`` x its largest relative residual ``|r| / m`` on clean
        ``batches`` (tensors of a one-input model or tuples for ``model(*inputs)``), at least
        ``FLOOR_ULPS`` unit roundoffs; then re-run the batches with the final ``tau`` to measure
        ``false_alarms`` (0 unless clean outputs hold NaN/Inf). Layers the batches never reach keep
        their previous ``tau``. With ``scheme="auto"`` (and not attached), first choose each layer's
        scheme on the first batch (``plan``), so that ``tau`` is calibrated under it. Returns ``tau``."""
        inputs = input_batches(batches, "ABFT.calibrate")
        if self.scheme == "auto" and not self._hooks and inputs:
            self.plan(model, inputs[0], repeats=3)
        calibrated = {}
        for layer in self._run_clean(model, inputs, "calibrate"):
            if not layer.seen:
                continue
            if not math.isfinite(layer.worst):
                raise ValueError(f"calibration saw a NaN/Inf residual in clean layer {layer.name!r}")
            calibrated[layer.name] = max(self.margin * layer.worst, FLOOR_ULPS * layer.u)
        self.tau.update(calibrated)
        self.measure_false_alarms(model, inputs)
        return dict(self.tau)

    def measure_false_alarms(self, model: nn.Module, batches: Batches) -> int:
        """Count rows of clean ``batches`` that fail the check (no re-execution); the counts replace
        ``clean_checked``/``false_alarms`` in ``stats``. Returns the number of false alarms."""
        for st in self._stats.values():
            st.clean_checked = st.false_alarms = 0
        self._run_clean(model, input_batches(batches, "ABFT.measure_false_alarms"), "clean")
        return sum(st.false_alarms for st in self._stats.values())

    # --- the plan ---------------------------------------------------------------------------------

    def plan(
        self,
        model: nn.Module,
        batch: torch.Tensor | Sequence[torch.Tensor],
        *,
        balance: Balance | None = None,
        repeats: int = 5,
    ) -> pd.DataFrame:
        """One row per parameterised layer of ``model``: checked (and by which protected layer) or
        unchecked with the reason; for checked layers the call shape on ``batch`` (a tensor or a tuple
        of model inputs), FLOPs, bytes, arithmetic intensity, memory- or compute-bound on this device's
        measured roofline, the scheme, and the measured time of the layer and of its check (median of
        ``repeats``). ``balance``: the device profile to classify layers by (default: this device's,
        measured once and cached; ``pytei.mitigation.roofline``). Columns: ``_abft_plan.COLUMNS``."""
        from ._abft_plan import plan_table

        inputs = input_batches([batch] if isinstance(batch, torch.Tensor) else [tuple(batch)], "ABFT.plan")[0]
        if self._hooks:
            raise RuntimeError("ABFT.plan times each scheme on the model itself; detach() first")
        table = plan_table(
            model, self.protected(model), self._check, inputs, self.scheme, balance=balance, repeats=repeats
        )
        if self.scheme == "auto":
            chosen = table[table["checked_by"] == table["layer"]]
            self.schemes = {str(k): str(v) for k, v in zip(chosen["layer"], chosen["scheme"], strict=True)}
        return table

    # --- statistics -------------------------------------------------------------------------------

    @property
    def stats(self) -> dict:
        """Totals over layers (rows as the unit; ``reexecutions`` counts module calls), ``layers``
        protected and ``per_layer`` counters. See ``LayerStats`` for each counter's meaning."""
        per_layer = {name: asdict(st) for name, st in self._stats.items()}
        totals = {f.name: sum(st[f.name] for st in per_layer.values()) for f in fields(LayerStats)}
        return {"layers": len(per_layer), **totals, "per_layer": per_layer}

    def reset_stats(self) -> None:
        """Zero the counters of protected runs; the last clean-run measurement is kept."""
        for name, st in self._stats.items():
            self._stats[name] = LayerStats(**{k: getattr(st, k) for k in _CLEAN_FIELDS})


def _dtype(output: Any) -> torch.dtype:
    """The dtype of a layer's output values: a tensor's, or a TorchRec KeyedTensor's ``values()``."""
    dtype: torch.dtype = output.dtype if isinstance(output, torch.Tensor) else output.values().dtype
    return dtype


def _minus_scaled(size: torch.Tensor, m: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """``size - tau * m`` in one operation."""
    if isinstance(tau, torch.Tensor):
        return torch.addcmul(size, m, tau, value=-1)
    return torch.add(size, m, alpha=-tau)


def _all_pass(excess: torch.Tensor) -> bool:
    """Whether every row passes; one reduction and one sync in the common case (NaN fails)."""
    return excess.numel() == 0 or float(excess.max()) <= 0.0


def _split(excess: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Failing rows whose bound ``m`` is finite (detections), and those where it is not: their input
    is NaN/Inf or too large (corrupted upstream), so the failure cannot be blamed on this layer."""
    fails, finite = ~(excess <= 0), m < math.inf
    return fails & finite, fails & ~finite


def _analytic_tau(n, dtype: torch.dtype):
    """``u * (LAMBDA * sqrt(n) + KAPPA)``: with ``n`` terms summed per value (in the layer and in the
    check), each sum is off by at most ``LAMBDA * sqrt(n) * u`` times the sum of its absolute terms
    with high probability (Higham & Mary 2019), and ``m`` bounds those absolute sums over the row."""
    u = _unit_roundoff(dtype)
    return u * (LAMBDA * (n.sqrt() if isinstance(n, torch.Tensor) else math.sqrt(n)) + KAPPA)
