"""ABFT's checksum checks, one class per kind of module, in a registry (``register_check``).

A check encodes clean checksums of one module's parameters once, then gives, per output *unit* (a
GEMM output row, a bag, a looked-up vector, a row of a cross network), the residual ``r`` of the
module's output against them and a bound ``m`` of the scale of its rounding errors (see
``pytei.mitigation.abft``). Built in:

* ``nn.Linear`` ``y = x W^T + b``: ``sum_j y_j = x . colsum(W) + sum(b)``.
* ``nn.Embedding`` / ``nn.EmbeddingBag``: a bag sums to the pooled row sums of the rows it read.
* ``nn.BatchNorm1d`` in eval mode, an affine map ``y = x * s + t`` (``s = gamma / sqrt(var + eps)``,
  ``t = beta - mean * s``): ``sum_c y_c = x . s + sum(t)``; its weight, bias and running statistics
  are all covered.
* the FM family's wide term ``FeaturesLinear`` (a lookup summed over fields, plus a bias): the sum of
  the looked-up rows' clean values plus the clean bias.
* pytei's DCN ``CrossNetwork`` ``x_{l+1} = x_0 * (w_l . x_l) + b_l + x_l``: the row sums telescope to
  ``S_L = S_0 * (1 + sum_l s_l) + sum_l sum(b_l)`` with ``s_l`` the output of the layer's ``w_l``
  (itself a checked Linear), read through a *tap* on it; so the biases ``b_l`` and the element-wise
  update are covered.

Checks of TorchRec / FBGEMM modules register themselves when torchrec is imported.
A module type with no registered check is *unchecked*; ``uncheckable(module)`` says why.
"""

from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from .roofline import Cost, linear_cost, lookup_cost

__all__ = ["Check", "check_class", "make_check", "register_check", "registered", "uncheckable"]

#: Rows of a table turned into checksums at a time (bounds the float64 temporary).
_BLOCK = 1 << 16


def arg(args: tuple, kwargs: dict, i: int, name: str) -> Any:
    """Positional argument ``i`` or keyword ``name`` of a hooked call."""
    return args[i] if len(args) > i else kwargs.get(name)


def row_checksums(table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[rows, 2]``: each row's sum and sum of absolute values, accumulated in float64 block by block."""
    out = torch.empty(table.shape[0], 2, dtype=dtype, device=table.device)
    with torch.no_grad():
        for start in range(0, table.shape[0], _BLOCK):
            block = table[start : start + _BLOCK].to(torch.float64)
            out[start : start + _BLOCK, 0] = block.sum(1)
            out[start : start + _BLOCK, 1] = block.abs().sum(1)
    return out


class Check(ABC):
    """Clean checksums of one module and the per-unit residual of its output against them.

    Subclasses set ``width`` (values per output row) and implement ``residual`` and ``terms``; a
    check whose units are not the output's rows (bags of several tables per sample) overrides
    ``values``, ``row_mask`` and ``rebuild``. ``taps`` names child modules whose outputs the check
    reads (ABFT records them in ``tapped`` during the forward pass, after their own checks).
    """

    #: Child modules (names relative to the checked module) whose outputs ``residual`` reads.
    taps: tuple[str, ...] = ()
    #: Whether the check covers the parameters of the module's descendants too (a collection whose
    #: tables live in submodules), not only its own.
    covers_descendants: ClassVar[bool] = False
    #: Child modules (relative names) whose own parameters the check covers (a ParameterList).
    covers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, weight: torch.Tensor, width: int) -> None:
        if not weight.is_floating_point():
            raise ValueError(f"ABFT checks floating-point layers, got weights of {weight.dtype}")
        self._setup(torch.promote_types(weight.dtype, torch.float32), width, self.key_of(weight))

    def _setup(self, dtype: torch.dtype, width: int, encoded: Any) -> None:
        """The state every check has: its dtype, output width and what its checksums follow."""
        self.encoded = encoded
        self.dtype = dtype
        self.width = width
        self.tapped: dict[str, torch.Tensor] = {}
        self.pending: torch.Tensor | None = None  # the augmented output of the last fused call
        self._swapped: list[tuple[str, torch.Tensor]] = []
        self._forward: Any = None
        #: The rounding scale ``m`` a residual is compared to: ``"norm"``, a bound of the absolute
        #: terms; ``"variance"``, the standard deviation of the rounding errors under the model of
        #: independent roundings (checks without a variance form keep ``"norm"``).
        self.bound = "norm"

    @staticmethod
    def key_of(weight: torch.Tensor) -> tuple:
        """What a re-encode is needed on: device, dtype and shape of the encoded weight."""
        return (weight.device, weight.dtype, weight.shape)

    def stale(self, module: nn.Module) -> bool:
        """Whether ``module`` moved device, dtype or shape since its checksums were encoded."""
        return self.encoded != self.key_of(self.weight_of(module))

    @staticmethod
    def weight_of(module: nn.Module) -> torch.Tensor:
        """The tensor whose device, dtype and shape the checksums follow."""
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        return weight

    @classmethod
    def why_not(cls, module: nn.Module) -> str | None:
        """Why this module cannot be checked (a configuration the checksum cannot describe), or None."""
        return None

    #: Bounds this check implements (see ``bound``).
    bounds: ClassVar[tuple[str, ...]] = ("norm",)

    def use_bound(self, bound: str) -> None:
        """Compare residuals to ``bound`` where this check has it, else to the norm bound."""
        self.bound = bound if bound in self.bounds else "norm"

    # --- the fused scheme: the checksum computed by the layer's own kernel call -------------------

    def why_not_fused(self, module: nn.Module) -> str | None:
        """Why this layer has no fused form (the global check then runs), or None."""
        return f"{type(self).__name__} has no fused form"

    def fuse(self, module: nn.Module) -> None:
        """Make ``module`` compute its checksum in its own kernel call: its parameters move into
        augmented storage that holds the clean checksum columns (``module.weight`` becomes a view of
        it, so injected faults land where the kernel reads), and its forward returns the layer's part
        of the augmented output, keeping the checksum part in ``pending``. ``unfuse`` undoes it."""
        raise NotImplementedError(self.why_not_fused(module))

    def unfuse(self, module: nn.Module) -> None:
        """Give ``module`` back its own parameter storage and forward."""
        for name, old in self._swapped:
            getattr(module, name).data = old
        self._swapped = []
        if self._forward is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = self._forward
        self._forward = None
        self.pending = None

    def _install(self, module: nn.Module, swaps: list[tuple[str, torch.Tensor]], forward: Any) -> None:
        """Swap each named parameter's data for its view into augmented storage (copying the current
        values in) and install ``forward``; remembered for ``unfuse``."""
        self._swapped = []
        with torch.no_grad():
            for name, view in swaps:
                param = getattr(module, name)
                view.copy_(param.data)
                self._swapped.append((name, param.data))
                param.data = view
        self._forward = module.__dict__.get("forward")
        module.forward = forward

    def fused_residual(self, args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual`` of a fused call, from the augmented output its kernel call left in ``pending``."""
        raise NotImplementedError(type(self).__name__)

    def _fused_sums(self, output: torch.Tensor) -> torch.Tensor:
        """Per row, the output's sum minus its expected sum (column ``width`` of ``pending``): one GEMV
        of the augmented output with ``_v`` when ``output`` is still its part of it (an earlier hook
        may have replaced it: activation faults)."""
        ye = self.pending
        assert ye is not None  # set by the fused forward that produced ``output``
        part = ye[..., : self.width]
        same = output.shape == part.shape and output.stride() == part.stride()
        if same and output.data_ptr() == part.data_ptr():
            return torch.mv(ye.detach().reshape(-1, ye.shape[-1]), self._v)
        expected = self.cast(ye.detach()[..., self.width].reshape(-1))
        return self.minus(self.values(output.detach()), expected)

    def _set_ones(self, extra: int, like: torch.Tensor) -> None:
        """``_v = [1] * width + [-1] + [0] * (extra - 1)`` (``like``'s dtype and device): the GEMV
        vector of ``_fused_sums`` over an output augmented by ``extra`` columns."""
        v = torch.zeros(self.width + extra, dtype=like.dtype, device=like.device)
        v[: self.width] = 1
        v[self.width] = -1
        self._v = v

    def recorder(self, tap: str) -> Callable[..., None]:
        """A forward hook for child ``tap`` that hands its output to this check (``tapped``)."""

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.tapped[tap] = output

        return hook

    def values(self, output: Any) -> torch.Tensor:
        """The output as ``[rows, width]`` (the rows a re-execution replaces)."""
        out: torch.Tensor = output
        return out.reshape(-1, self.width)

    def row_mask(self, bad: torch.Tensor) -> torch.Tensor:
        """The output rows holding the failing units ``bad`` (one per unit by default)."""
        return bad

    def rebuild(self, output: Any, values: torch.Tensor) -> Any:
        """An output like ``output`` holding ``values`` (rows from ``values``)."""
        out: torch.Tensor = output
        return values.reshape(out.shape)

    def minus(self, rows: torch.Tensor, expected: torch.Tensor, beta: float = -1.0) -> torch.Tensor:
        """Row sums of ``rows`` plus ``beta * expected``, in the check's dtype (``sum(1)`` runs 2-3x
        faster than a GEMV with ones on wide rows, as fast on narrow ones)."""
        return rows.sum(1, dtype=self.dtype).add_(expected, alpha=beta)

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == self.dtype else x.to(self.dtype)

    @abstractmethod
    def residual(self, args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Per unit: the residual ``r`` and the magnitude bound ``m``."""

    @abstractmethod
    def terms(self, args: tuple, kwargs: dict) -> torch.Tensor | float:
        """Values summed per output value, in the layer and in the check (for the analytic tolerance)."""

    @abstractmethod
    def cost(self, args: tuple, kwargs: dict, output: Any) -> Cost:
        """FLOPs and bytes of the checked layer's own call (its place on the roofline)."""


C = TypeVar("C", bound=type[Check])

_CHECKS: dict[type[nn.Module], type[Check]] = {}


def register_check(*module_types: type[nn.Module]) -> Callable[[C], C]:
    """Decorator: ``cls`` checks modules of ``module_types`` (and their subclasses, unless a subclass
    has a check of its own)."""

    def add(cls: C) -> C:
        for t in module_types:
            _CHECKS[t] = cls
        return cls

    return add


def _optional_checks() -> None:
    """Register the checks of optional packages already imported (TorchRec's modules)."""
    if "torchrec" in sys.modules:
        from . import _torchrec_checks  # noqa: F401 - registers its checks


def registered() -> dict[type[nn.Module], type[Check]]:
    """Module types with a check, and their check classes."""
    _optional_checks()
    return dict(_CHECKS)


def check_class(module: nn.Module) -> type[Check] | None:
    """The check of ``module``'s nearest registered type, or None."""
    _optional_checks()
    for t in type(module).__mro__:
        if t in _CHECKS:
            return _CHECKS[t]
    return None


def uncheckable(module: nn.Module) -> str | None:
    """Why ``module`` cannot be checked, or None if it can."""
    cls = check_class(module)
    if cls is None:
        return f"it is a {type(module).__name__}, which has no registered ABFT check"
    return cls.why_not(module)


def make_check(module: nn.Module) -> Check:
    """Encode the checksums of ``module``'s current (clean) parameters."""
    cls = check_class(module)
    if cls is None:
        raise TypeError(f"no ABFT check is registered for {type(module).__name__}")
    reason = cls.why_not(module)
    if reason is not None:
        raise ValueError(f"ABFT cannot check this {type(module).__name__}: {reason}")
    check: Check = cast(Any, cls)(module)  # every check class is built from its module
    return check


def _rows(x: torch.Tensor, width: int) -> int:
    return x.numel() // width if width else 0


# --------------------------------------------------------------------------- built-in checks


@register_check(nn.Linear)
class LinearCheck(Check):
    def __init__(self, module: nn.Linear) -> None:
        super().__init__(module.weight, module.out_features)
        sums = row_checksums(module.weight.detach().t(), self.dtype)  # per input feature
        self.c = sums[:, 0].contiguous()
        self.norm_a = float(torch.linalg.vector_norm(sums[:, 1].to(torch.float64)))
        bias = torch.zeros(1, dtype=torch.float64) if module.bias is None else module.bias.detach().double()
        self.sb, self.sa = (
            torch.tensor(float(v), dtype=self.dtype, device=self.c.device)
            for v in (bias.sum(), bias.abs().sum())
        )
        self.bias = module.bias is not None
        # The variance form: rounding errors of y_j (in_features products), of x . c and of the sum of
        # the out_features y_j, as independent roundings: std <= u (sqrt(in) ||x|| s + sqrt(out) ||y||)
        # with s = max_i sqrt(sum_j W_ji^2 + c_i^2) and ||y|| <= ||W||_2 ||x|| + ||b||.
        with torch.no_grad():
            w = module.weight.detach().double()
            s_max = float(torch.sqrt(w.square().sum(0) + w.sum(0).square()).max()) if w.numel() else 0.0
            spectral = float(torch.linalg.matrix_norm(w, ord=2)) if w.numel() else 0.0
        root_in, root_out = math.sqrt(module.in_features), math.sqrt(module.out_features)
        self._scales = {
            "norm": (self.sa, self.norm_a),
            "variance": (
                torch.tensor(root_out * float(torch.linalg.vector_norm(bias)) + float(bias.abs().sum()),
                             dtype=self.dtype, device=self.c.device),
                root_in * s_max + root_out * spectral,
            ),
        }  # fmt: skip
        self._wext: torch.Tensor | None = None  # fused scheme: [W; c] and [b; sum(b)], made on first fuse
        self._bext: torch.Tensor | None = None
        # y_j accumulates in_features products; x . c as many; sum_j y_j out_features values.
        self.n = float(2 * module.in_features + module.out_features)

    def _input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return self.cast(arg(args, kwargs, 0, "input").detach().reshape(-1, self.c.shape[0]))

    def residual(self, args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual, and ``m = ||x|| * ||a|| + sum |b|``: it bounds ``|x| . a + sum |b|``
        (Cauchy-Schwarz) with one pass over ``x``, where ``|x| . a`` would take an abs() and a GEMV,
        and ``sum_j |y_j|`` an abs() of the (often wider) output, 3-20x the time at batch 4096."""
        x = self._input(args, kwargs)
        r = self.minus(self.values(output.detach()), torch.addmv(self.sb, x, self.c))
        return r, self._scale(x)

    bounds = ("norm", "variance")

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """``m`` of each row of ``x``: ``m0 + ||x|| * m1`` with the constants of the bound in use."""
        m0, m1 = self._scales[self.bound]
        return torch.add(m0, torch.linalg.vector_norm(x, dim=1), alpha=m1)

    def terms(self, args: tuple, kwargs: dict) -> float:
        """``n`` of the analytic tolerance; the variance form has its square roots in ``m`` already."""
        return self.n if self.bound == "norm" else 1.0

    def cost(self, args: tuple, kwargs: dict, output: Any) -> Cost:
        x = arg(args, kwargs, 0, "input")
        k = self.c.shape[0]
        return linear_cost(_rows(x, k), k, self.width, x.dtype, self.bias)

    def why_not_fused(self, module: nn.Module) -> str | None:
        if module.weight.dtype not in (torch.float32, torch.float64):
            return f"a {module.weight.dtype} weight cannot hold its checksum row exactly enough"
        return None

    def fuse(self, module: nn.Module) -> None:
        """One GEMM with ``W`` augmented by the checksum row ``c`` (and ``b`` by ``sum(b)``): the
        last output column is the row's expected sum."""
        linear: nn.Linear = module  # type: ignore[assignment]
        w = linear.weight
        out = self.width
        if self._wext is None or self._wext.device != w.device:
            self._wext = torch.empty(out + 1, w.shape[1], dtype=w.dtype, device=w.device)
            self._wext[out] = self.c.to(w.dtype)
            self._bext = torch.zeros(out + 1, dtype=w.dtype, device=w.device)
            self._bext[out] = self.sb.to(w.dtype)
        wext, bext = self._wext, self._bext
        assert bext is not None
        swaps = [("weight", wext[:out])]
        if linear.bias is not None:
            swaps.append(("bias", bext[:out]))

        self._set_ones(1, w)

        def forward(x: torch.Tensor) -> torch.Tensor:
            ye = F.linear(x, wext, bext)
            self.pending = ye
            return ye[..., :out]

        self._install(module, swaps, forward)

    def fused_residual(self, args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fused_sums(output), self._scale(self._input(args, kwargs))


def _lookup_cost(idx: torch.Tensor, bags: int, width: int, dtype: torch.dtype) -> Cost:
    return lookup_cost(bags, idx.numel(), width, dtype)


@register_check(nn.Embedding)
class EmbeddingCheck(Check):
    def __init__(self, module: nn.Embedding) -> None:
        super().__init__(module.weight, module.embedding_dim)
        self.table = row_checksums(module.weight.detach(), self.dtype)
        self.n = float(module.embedding_dim)  # a lookup is exact; only the check sums
        self.weight_dtype = module.weight.dtype
        self._ext: torch.Tensor | None = None  # fused scheme: [T | sums | abs sums], made on first fuse

    @classmethod
    def why_not(cls, module: nn.Module) -> str | None:
        if getattr(module, "max_norm", None) is not None:
            return "max_norm renormalises its table in place, so clean checksums go stale"
        return None

    def residual(self, args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        expected, m = F.embedding(arg(args, kwargs, 0, "input"), self.table).reshape(-1, 2).unbind(1)
        return self.minus(self.values(output.detach()), expected), m

    def why_not_fused(self, module: nn.Module) -> str | None:
        if module.weight.dtype not in (torch.float32, torch.float64):
            return f"a {module.weight.dtype} table cannot hold its checksum columns exactly enough"
        return None

    def _extended(self, module: nn.Module) -> torch.Tensor:
        """``[rows, width + 2]``: the table with its rows' sums and absolute sums as two more columns."""
        w: torch.Tensor = module.weight  # type: ignore[assignment]
        ext = self._ext
        if ext is None or ext.device != w.device:
            ext = torch.empty(w.shape[0], self.width + 2, dtype=w.dtype, device=w.device)
            ext[:, self.width :] = self.table.to(w.dtype)
            self._ext = ext
        return ext

    def fuse(self, module: nn.Module) -> None:
        """One lookup of the table extended by its checksum columns: the bag's sums come with it."""
        ext = self._extended(module)
        width = self.width
        emb: nn.Embedding = module  # type: ignore[assignment]

        self._set_ones(2, ext)

        def forward(input: torch.Tensor) -> torch.Tensor:
            ye = F.embedding(input, ext, emb.padding_idx, None, 2.0, emb.scale_grad_by_freq, emb.sparse)
            self.pending = ye
            return ye[..., :width]

        self._install(module, [("weight", ext[:, :width])], forward)

    def fused_residual(self, args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual by one GEMV of the augmented output, ``m`` its pooled absolute-sum column."""
        assert self.pending is not None
        m = self.cast(self.pending.detach()[..., self.width + 1].reshape(-1))
        return self._fused_sums(output), m

    def terms(self, args: tuple, kwargs: dict) -> torch.Tensor | float:
        return self.n

    def cost(self, args: tuple, kwargs: dict, output: Any) -> Cost:
        idx = arg(args, kwargs, 0, "input")
        return _lookup_cost(idx, idx.numel(), self.width, self.weight_dtype)


@register_check(nn.EmbeddingBag)
class BagCheck(EmbeddingCheck):
    def __init__(self, module: nn.EmbeddingBag) -> None:
        Check.__init__(self, module.weight, module.embedding_dim)
        self.table = row_checksums(module.weight.detach(), self.dtype)
        self.weight_dtype = module.weight.dtype
        self._ext = None
        self.mode, self.padding_idx = module.mode, module.padding_idx
        self.include_last_offset = module.include_last_offset

    @classmethod
    def why_not(cls, module: nn.Module) -> str | None:
        if getattr(module, "mode", None) == "max":
            return "mode='max' is not linear, so no checksum describes it"
        return super().why_not(module)

    def _pool(self, idx, offsets, weights) -> torch.Tensor:
        return F.embedding_bag(
            idx,
            self.table,
            offsets,
            mode=self.mode,
            per_sample_weights=weights,
            include_last_offset=self.include_last_offset,
            padding_idx=self.padding_idx,
        )

    def residual(self, args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        idx, offsets = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "offsets")
        weights = arg(args, kwargs, 2, "per_sample_weights")
        if weights is None:
            pooled = self._pool(idx, offsets, None)
            expected, m = pooled.unbind(1)
        else:
            weights = self.cast(weights.detach())
            expected = self._pool(idx, offsets, weights)[:, 0]
            m = self._pool(idx, offsets, weights.abs())[:, 1]
        return self.minus(self.values(output.detach()), expected), m

    def why_not_fused(self, module: nn.Module) -> str | None:
        if getattr(module, "mode", None) not in ("sum", "mean"):
            return f"mode {getattr(module, 'mode', None)!r}"
        return super().why_not_fused(module)

    def fuse(self, module: nn.Module) -> None:
        ext = self._extended(module)
        width = self.width
        bag: nn.EmbeddingBag = module  # type: ignore[assignment]

        def forward(
            input: torch.Tensor,
            offsets: torch.Tensor | None = None,
            per_sample_weights: torch.Tensor | None = None,
        ) -> torch.Tensor:
            if per_sample_weights is not None:  # |w| pools the bound: a second lookup, as the global check
                self.pending = None
                return F.embedding_bag(
                    input, ext[:, :width], offsets, None, 2.0, bag.scale_grad_by_freq, bag.mode, bag.sparse,
                    per_sample_weights, bag.include_last_offset, bag.padding_idx,
                )  # fmt: skip
            ye = F.embedding_bag(
                input, ext, offsets, None, 2.0, bag.scale_grad_by_freq, bag.mode, bag.sparse,
                None, bag.include_last_offset, bag.padding_idx,
            )  # fmt: skip
            self.pending = ye
            return ye[:, :width]

        self._set_ones(2, ext)
        self._install(module, [("weight", ext[:, :width])], forward)

    def fused_residual(self, args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pending is None:  # a weighted call: checked as the global scheme does
            return self.residual(args, kwargs, output)
        return super().fused_residual(args, kwargs, output)

    def terms(self, args: tuple, kwargs: dict) -> torch.Tensor | float:
        """Twice the bag size (the output and the pooled checksum each sum the bag) plus the width."""
        idx, offsets = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "offsets")
        if idx.dim() == 2:
            return float(2 * idx.shape[1] + self.width)
        ends = None if self.include_last_offset else offsets.new_tensor([idx.numel()])
        return 2 * torch.diff(offsets, append=ends).to(self.dtype) + self.width

    def cost(self, args: tuple, kwargs: dict, output: Any) -> Cost:
        idx = arg(args, kwargs, 0, "input")
        return _lookup_cost(idx, _rows(output, self.width), self.width, self.weight_dtype)


@register_check(nn.BatchNorm1d)
class BatchNormCheck(Check):
    """Eval-mode BatchNorm1d as the affine map it is: ``sum_c y_c = x . s + sum(t)`` per row. In
    training mode it normalises by the batch's statistics, which no clean checksum describes: its
    calls are then not checked (ABFT protects inference)."""

    def __init__(self, module: nn.BatchNorm1d) -> None:
        weight = module.running_var
        assert weight is not None  # why_not refuses modules without running statistics
        super().__init__(weight, module.num_features)
        with torch.no_grad():
            var = weight.detach().double()
            mean = module.running_mean.detach().double()  # type: ignore[union-attr]
            gamma = module.weight.detach().double() if module.weight is not None else torch.ones_like(var)
            beta = module.bias.detach().double() if module.bias is not None else torch.zeros_like(var)
            s = gamma / torch.sqrt(var + module.eps)
            t = beta - mean * s
        self.s = s.to(self.dtype)
        self.norm_s = float(torch.linalg.vector_norm(s))
        # Variance form: y_c = x_c s_c + t_c rounded twice, the check's dot and the row sum over C:
        # std <= u ((2 + 2 sqrt(C)) max|s| ||x|| + (1 + sqrt(C)) ||t||).
        root = math.sqrt(module.num_features)
        self._scales = {
            "norm": (float(t.abs().sum()), self.norm_s),
            "variance": (
                (1 + root) * float(torch.linalg.vector_norm(t)),
                (2 + 2 * root) * float(s.abs().max()),
            ),
        }
        self.st = torch.tensor(float(t.sum()), dtype=self.dtype, device=weight.device)
        self.module = module
        self.n = float(3 * module.num_features)  # y_c: x*s + t; the check's dot and the row sum

    @staticmethod
    def weight_of(module: nn.Module) -> torch.Tensor:
        var: torch.Tensor = module.running_var  # type: ignore[assignment]
        return var

    @classmethod
    def why_not(cls, module: nn.Module) -> str | None:
        if not getattr(module, "track_running_stats", False) or getattr(module, "running_var", None) is None:
            return "it normalises by each batch's statistics (no running statistics): no checksum fixes them"
        return None

    def _channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` or ``[N, C, L]`` as ``[rows, C]``."""
        return x if x.dim() == 2 else x.movedim(1, -1).reshape(-1, self.width)

    def values(self, output: Any) -> torch.Tensor:
        out: torch.Tensor = output
        return self._channels_last(out)

    def rebuild(self, output: Any, values: torch.Tensor) -> Any:
        out: torch.Tensor = output
        if out.dim() == 2:
            return values
        n, c, length = out.shape
        return values.reshape(n, length, c).movedim(-1, 1)

    def residual(self, args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.module.training:
            empty = output.new_empty(0, dtype=self.dtype)
            return empty, empty
        x = self.cast(self._channels_last(arg(args, kwargs, 0, "input").detach()))
        r = self.minus(self.values(output.detach()), torch.addmv(self.st, x, self.s))
        m0, m1 = self._scales[self.bound]
        return r, torch.linalg.vector_norm(x, dim=1).mul_(m1).add_(m0)

    bounds = ("norm", "variance")

    def terms(self, args: tuple, kwargs: dict) -> float:
        return self.n if self.bound == "norm" else 1.0

    def cost(self, args: tuple, kwargs: dict, output: Any) -> Cost:
        x = arg(args, kwargs, 0, "input")
        return Cost(2.0 * x.numel(), float(2 * x.numel() * x.element_size() + 4 * self.width * 4))


def _cross_network_type() -> type[nn.Module]:
    from ..models.layers import CrossNetwork

    return CrossNetwork


class CrossNetworkCheck(Check):
    """pytei's DCN cross network: per row, ``sum(x_L) = S_0 (1 + sum_l s_l) + sum_l sum(b_l)``, the
    ``s_l = w_l . x_l`` read from taps on the layers' ``w_l`` (checked as Linears themselves). Covers
    the biases ``b_l`` and the element-wise update; ``m = sum|x_0| (1 + sum_l |s_l|) + sum_l sum|b_l|``
    bounds the absolute terms."""

    covers = ("b",)

    def __init__(self, module: nn.Module) -> None:
        biases = list(module.b)  # type: ignore[arg-type]
        super().__init__(biases[0], biases[0].numel())
        with torch.no_grad():
            b = torch.stack([p.detach().double() for p in biases])
        self.sb = torch.tensor(float(b.sum()), dtype=self.dtype, device=biases[0].device)
        self.ab = torch.tensor(float(b.abs().sum()), dtype=self.dtype, device=biases[0].device)
        self.taps = tuple(f"w.{i}" for i in range(len(biases)))
        self.n = float(self.width + 3 * len(biases))

    @staticmethod
    def weight_of(module: nn.Module) -> torch.Tensor:
        first: torch.Tensor = module.b[0]  # type: ignore[index]
        return first

    def residual(self, args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = arg(args, kwargs, 0, "x").detach().reshape(-1, self.width)
        s = torch.cat([self.cast(self.tapped[t].detach().reshape(-1, 1)) for t in self.taps], dim=1)
        s0 = x0.sum(1, dtype=self.dtype)
        expected = torch.addcmul(self.sb, s0, s.sum(1).add_(1.0))
        m = torch.addcmul(self.ab, x0.abs().sum(1, dtype=self.dtype), s.abs().sum(1).add_(1.0))
        return self.minus(self.values(output.detach()), expected), m

    def terms(self, args: tuple, kwargs: dict) -> float:
        return self.n

    def cost(self, args: tuple, kwargs: dict, output: Any) -> Cost:
        x = arg(args, kwargs, 0, "x")
        layers = len(self.taps)
        return Cost(3.0 * x.numel() * layers, float(3 * x.numel() * x.element_size() * layers))


register_check(_cross_network_type())(CrossNetworkCheck)


def _features_linear_type() -> type[nn.Module]:
    from ..models.layers import FeaturesLinear

    return FeaturesLinear


class FeaturesLinearCheck(Check):
    """The FM family's wide term ``y = sum_f fc[x_f + offset_f] + b``: ``y`` must equal the sum of the
    looked-up rows' clean values plus the clean bias. Covers the bias and the sum over fields (the
    table ``fc`` is an Embedding, checked on its own too)."""

    covers = ("fc",)

    def __init__(self, module: nn.Module) -> None:
        fc: nn.Embedding = module.fc  # type: ignore[assignment]
        bias: torch.Tensor = module.bias  # type: ignore[assignment]
        super().__init__(fc.weight, 1)
        self.table = row_checksums(fc.weight.detach(), self.dtype)
        b = bias.detach().double()
        self.sb = torch.tensor(float(b.sum()), dtype=self.dtype, device=bias.device)
        self.ab = torch.tensor(float(b.abs().sum()), dtype=self.dtype, device=bias.device)
        self.offsets: torch.Tensor = module.offsets  # type: ignore[assignment]
        self.weight_dtype = fc.weight.dtype

    @staticmethod
    def weight_of(module: nn.Module) -> torch.Tensor:
        weight: torch.Tensor = module.fc.weight  # type: ignore[union-attr, assignment]
        return weight

    def residual(self, args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = arg(args, kwargs, 0, "x")
        pooled = F.embedding(x + self.offsets, self.table).sum(1)  # [B, 2]: values and |values| summed
        expected = pooled[:, 0].add_(self.sb)
        return self.minus(self.values(output.detach()), expected), pooled[:, 1].add_(self.ab)

    def terms(self, args: tuple, kwargs: dict) -> float:
        x = arg(args, kwargs, 0, "x")
        return float(2 * x.shape[-1] + 2)

    def cost(self, args: tuple, kwargs: dict, output: Any) -> Cost:
        x = arg(args, kwargs, 0, "x")
        return _lookup_cost(x, _rows(output, 1), 1, self.weight_dtype)


register_check(_features_linear_type())(FeaturesLinearCheck)
