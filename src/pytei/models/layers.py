"""Shared building blocks of the model zoo: the base class, config and input checks, and layers.

The categorical layers follow rixwew/pytorch-fm (``torchfm/layer.py``), the implementation the paper's
realistic models come from (Sec. 6.1). Every block that owns parameters carries a ``pytei_component``
tag, which is how the injector (``pytei.targets``) tells embeddings, MLPs, attention, interactions and
first-order terms apart.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import torch
import torch.fx
from torch import nn
from torch.fx.node import has_side_effect

__all__ = [
    "INPUT_LAYOUTS",
    "AttentionalFactorizationMachine",
    "CrossNetwork",
    "FactorizationMachine",
    "FeaturesEmbedding",
    "FeaturesLinear",
    "MultiLayerPerceptron",
    "RecModel",
    "ReluMLP",
    "check_batch",
    "check_input",
    "check_int",
    "check_ints",
    "check_prob",
    "flat_pair_indices",
    "pair_indices",
    "tag",
]

#: What a model's ``forward`` takes; see ``RecModel.input_layout``. ``"custom"``: anything, produced by
#: the model's own ``example_inputs(n, seed)`` (a plugin model a campaign scores on synthetic inputs;
#: ``pytei train`` data sets do not fit it).
INPUT_LAYOUTS = ("categorical", "dense+sparse", "dense+kjt", "dummy", "custom")

M = TypeVar("M", bound=nn.Module)


def tag(module: M, component: str) -> M:
    """Mark ``module`` (and every parameter below it) as part of ``component``; returns the module."""
    setattr(module, "pytei_component", component)  # noqa: B010 - nn.Module's __setattr__ types Tensor | Module
    return module


class RecModel(nn.Module):
    """Base class of the zoo: a registry ``name``, an ``input_layout`` and a rebuildable ``config``.

    ``forward`` returns raw logits of shape ``[batch]`` (float32); AUC is computed on logits and
    training uses ``BCEWithLogitsLoss``, so no model applies a sigmoid.
    """

    #: Registry name, set by ``pytei.models.register``.
    name: ClassVar[str] = ""
    #: One of ``INPUT_LAYOUTS``: ``"categorical"`` -> ``forward(x: Long[B, F])``; ``"dense+sparse"`` ->
    #: ``forward(dense: Float[B, D], sparse: Long[B, S])``; ``"dense+kjt"`` -> ``forward(dense: Float[B, D],
    #: sparse: KeyedJaggedTensor)`` (TorchRec models); ``"dummy"`` -> ``forward(dense, sparse_0_1)``;
    #: ``"custom"`` -> ``forward(*self.example_inputs(n, seed))``.
    input_layout: ClassVar[str] = ""
    #: Names of the modules whose output is the model's logit: mitigations such as clipping never
    #: touch them. Each model sets it from its built modules (``_set_output_layers``), so the names
    #: follow the MLP depth of its config; () means the model has none (pytorch-fm's FM).
    output_layers: tuple[str, ...] = ()

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self._config = config

    def _set_output_layers(self, *modules: nn.Module) -> None:
        """Declare ``modules`` (already part of this model) its output layers, by their names in it."""
        names = {id(m): n for n, m in self.named_modules()}
        missing = [type(m).__name__ for m in modules if id(m) not in names]
        if missing:
            raise ValueError(f"{type(self).__name__}: output layers {missing} are not modules of the model")
        self.output_layers = tuple(names[id(m)] for m in modules)

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable kwargs that ``pytei.models.create(self.name, **config)`` rebuilds from."""
        return copy.deepcopy(self._config)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


# --- config and input checks -------------------------------------------------------------------


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; a ``ValueError`` naming it otherwise (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_ints(name: str, values: Any, *, length: int | None = None) -> list[int]:
    """``values`` as a non-empty list of positive ints (of ``length`` items, if given)."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {values!r}")
    if length is not None and len(values) != length:
        raise ValueError(f"{name} must have {length} items, got {values!r}")
    return [check_int(f"{name}[{i}]", v) for i, v in enumerate(values)]


def check_prob(name: str, value: Any) -> float:
    """``value`` as a dropout probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
    return float(value)


# Input checks run inside ``forward``, so a model stays traceable by ``torch.fx.symbolic_trace`` only if
# they are graph leaves: each module whose ``forward`` calls one declares it with ``torch.fx.wrap`` (the
# call becomes a ``call_function`` node that runs on the real tensors). ``has_side_effect`` keeps those
# nodes, whose output nothing uses, through ``Graph.eliminate_dead_code``.


@has_side_effect
def check_input(name: str, tensor: Any, width: int, *, integer: bool = False) -> None:
    """Refuse anything but a 2-D tensor ``[batch, width]`` (integer-typed when ``integer``)."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.shape[1] != width:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a tensor of shape [batch, {width}], got {shape}")
    if integer and tensor.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must hold int64 (or int32) indices, got {tensor.dtype}")


@has_side_effect
def check_batch(dense: torch.Tensor, sparse: torch.Tensor) -> None:
    """Refuse ``dense`` and ``sparse`` inputs whose batch sizes (first dimensions) differ."""
    if dense.shape[0] != sparse.shape[0]:
        raise ValueError(f"dense and sparse batch sizes differ: {dense.shape[0]} vs {sparse.shape[0]}")


# --- pair indices ----------------------------------------------------------------------------------
# Interactions gather the n(n-1)/2 pairs i < j on every forward. The indices depend only on ``n`` and
# the device, so they are built once per (n, device) and shared: callers must not modify them. A forward
# that calls these helpers declares them with ``torch.fx.wrap`` (a cache must not see a tracing Proxy).


@functools.lru_cache(maxsize=64)
def _pairs(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows_cols = torch.triu_indices(n, n, offset=1, device=device)
    return rows_cols, rows_cols[0] * n + rows_cols[1]


def _concrete_pairs(n: Any, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise TypeError(
            f"pair indices need a concrete int n >= 0, got {type(n).__name__} {n!r}; a traced forward "
            "must declare the helper with torch.fx.wrap in its module"
        )
    return _pairs(n, torch.device(device))


def pair_indices(n: int, device: torch.device | str) -> torch.Tensor:
    """Row/column indices ``[2, n(n-1)/2]`` (int64) of all pairs i < j, in pytorch-fm's (row-major) order.

    Cached per ``(n, device)``; read-only.
    """
    return _concrete_pairs(n, device)[0]


def flat_pair_indices(n: int, device: torch.device | str) -> torch.Tensor:
    """``row * n + col`` of ``pair_indices(n, device)``: the pairs' positions in a flattened ``[n, n]``.

    ``z.flatten(1).index_select(1, flat)`` reads the same values as ``z[:, row, col]`` roughly 9x
    faster on CPU (one contiguous gather instead of advanced indexing). Cached per ``(n, device)``;
    read-only.
    """
    return _concrete_pairs(n, device)[1]


torch.fx.wrap("pair_indices")


# --- layers --------------------------------------------------------------------------------------


def _field_offsets(field_dims: Sequence[int]) -> torch.Tensor:
    """Start row of each field in a table shared by all fields: ``(0, cumsum(field_dims)[:-1])``."""
    dims = torch.tensor(field_dims, dtype=torch.int64)
    return torch.cumsum(dims, 0) - dims


class FeaturesEmbedding(nn.Module):
    """One ``nn.Embedding`` over all fields (rows offset per field), Xavier-uniform as in pytorch-fm.

    Indices are not range-checked per field (that would sync with the device on every call): an index
    past its field's size silently reads the next field's rows, as in pytorch-fm.
    """

    pytei_component = "embedding"
    offsets: torch.Tensor

    def __init__(self, field_dims: Sequence[int], embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(sum(field_dims), embed_dim)
        nn.init.xavier_uniform_(self.embedding.weight)
        # Derived from the config, so kept out of the state dict; still follows .to(device).
        self.register_buffer("offsets", _field_offsets(field_dims), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, F]`` per-field indices -> ``[B, F, embed_dim]``."""
        return self.embedding(x + self.offsets)


class FeaturesLinear(nn.Module):
    """First-order (wide) term: a 1-wide embedding per feature value, summed over fields, plus a bias."""

    pytei_component = "linear"
    offsets: torch.Tensor

    def __init__(self, field_dims: Sequence[int]) -> None:
        super().__init__()
        self.fc = nn.Embedding(sum(field_dims), 1)
        self.bias = nn.Parameter(torch.zeros(1, dtype=torch.float32))
        self.register_buffer("offsets", _field_offsets(field_dims), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, F]`` per-field indices -> ``[B, 1]``."""
        return self.fc(x + self.offsets).sum(dim=1) + self.bias


class FactorizationMachine(nn.Module):
    """FM second-order term (Rendle 2010): ``0.5 * sum_d((sum_f e)^2 - sum_f e^2)`` -> ``[B, 1]``."""

    pytei_component = "interaction"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        square_of_sum = x.sum(dim=1) ** 2
        sum_of_square = (x**2).sum(dim=1)
        return 0.5 * (square_of_sum - sum_of_square).sum(dim=1, keepdim=True)


class MultiLayerPerceptron(nn.Sequential):
    """pytorch-fm MLP: ``Linear -> BatchNorm1d -> ReLU -> Dropout`` per width, then ``Linear(-> 1)``."""

    pytei_component = "mlp"

    def __init__(self, input_dim: int, dims: Sequence[int], dropout: float, *, output_layer: bool = True):
        layers: list[nn.Module] = []
        for dim in dims:
            layers += [nn.Linear(input_dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Dropout(p=dropout)]
            input_dim = dim
        if output_layer:
            layers.append(nn.Linear(input_dim, 1))
        super().__init__(*layers)


class ReluMLP(nn.Sequential):
    """Plain ``Linear -> ReLU`` stack (dummy model, DLRM), optionally closed by ``Linear(-> 1)``."""

    pytei_component = "mlp"

    def __init__(self, input_dim: int, dims: Sequence[int], *, output_layer: bool = False):
        layers: list[nn.Module] = []
        for dim in dims:
            layers += [nn.Linear(input_dim, dim), nn.ReLU()]
            input_dim = dim
        if output_layer:
            layers.append(nn.Linear(input_dim, 1))
        super().__init__(*layers)


class CrossNetwork(nn.Module):
    """DCN cross layers (Wang et al. 2017) as pytorch-fm: ``x_{l+1} = x_0 * (w_l . x_l) + b_l + x_l``."""

    pytei_component = "interaction"

    def __init__(self, input_dim: int, num_layers: int) -> None:
        super().__init__()
        self.w = nn.ModuleList(nn.Linear(input_dim, 1, bias=False) for _ in range(num_layers))
        self.b = nn.ParameterList(
            nn.Parameter(torch.zeros(input_dim, dtype=torch.float32)) for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = x
        for w, b in zip(self.w, self.b, strict=True):
            x = x0 * w(x) + b + x
        return x


class AttentionalFactorizationMachine(nn.Module):
    """AFM interaction (Xiao et al. 2017) as pytorch-fm: attention-weighted sum of pairwise products.

    The attention MLP (``attention``, ``projection``) is tagged ``"attention"``; the ``fc`` over the
    pooled interaction inherits ``"interaction"``. Unlike pytorch-fm (whose ``F.dropout`` calls stay on
    at eval time), dropout here follows ``train()``/``eval()``.
    """

    pytei_component = "interaction"

    def __init__(self, embed_dim: int, attn_size: int, dropouts: Sequence[float]) -> None:
        super().__init__()
        self.attention = tag(nn.Linear(embed_dim, attn_size), "attention")
        self.projection = tag(nn.Linear(attn_size, 1), "attention")
        self.fc = nn.Linear(embed_dim, 1)
        self.attn_dropout = nn.Dropout(p=dropouts[0])
        self.output_dropout = nn.Dropout(p=dropouts[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, F, embed_dim]`` -> ``[B, 1]``."""
        row, col = pair_indices(x.shape[1], x.device)
        inner_product = x.index_select(1, row) * x.index_select(1, col)  # = x[:, row] * x[:, col]
        scores = torch.softmax(self.projection(torch.relu(self.attention(inner_product))), dim=1)
        pooled = (self.attn_dropout(scores) * inner_product).sum(dim=1)
        return self.fc(self.output_dropout(pooled))
