"""The paper's five realistic CTR models (Sec. 6.1, Table 2), in the architecture of rixwew/pytorch-fm.

Each takes ``x: Long[B, F]`` (one index per field, counted from 0 within its field) and returns raw
logits ``[B]``. Defaults are pytorch-fm's (``examples/main.py``), the ones the paper trains with; for
MovieLens-1M (``field_dims=[6041, 3953]``) they give the parameter counts of Table 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx

from ._registry import register
from .layers import (
    AttentionalFactorizationMachine,
    CrossNetwork,
    FactorizationMachine,
    FeaturesEmbedding,
    FeaturesLinear,
    MultiLayerPerceptron,
    RecModel,
    check_input,
    check_int,
    check_ints,
    check_prob,
    tag,
)

__all__ = [
    "AttentionalFactorizationMachineModel",
    "DeepCrossNetworkModel",
    "DeepFactorizationMachineModel",
    "FactorizationMachineModel",
    "WideAndDeepModel",
]

# A graph leaf under torch.fx.symbolic_trace (see pytei.models.layers).
torch.fx.wrap("check_input")


class _CategoricalModel(RecModel):
    """Shared input check and embedding sizes of the pytorch-fm models."""

    input_layout = "categorical"

    @property
    def num_fields(self) -> int:
        return len(self._config["field_dims"])

    @property
    def embed_output_dim(self) -> int:
        """Width of the flattened field embeddings fed to MLPs and cross layers."""
        return self.num_fields * self._config["embed_dim"]

    def _check(self, x: torch.Tensor) -> None:
        check_input("x", x, self.num_fields, integer=True)


@register("fm")
class FactorizationMachineModel(_CategoricalModel):
    """FM (Rendle 2010), ``torchfm.model.fm``: first-order term + pairwise embedding interactions."""

    def __init__(self, *, field_dims: Sequence[int], embed_dim: int = 16) -> None:
        field_dims, embed_dim = check_ints("field_dims", field_dims), check_int("embed_dim", embed_dim)
        super().__init__(field_dims=field_dims, embed_dim=embed_dim)
        self.linear = FeaturesLinear(field_dims)
        self.embedding = FeaturesEmbedding(field_dims, embed_dim)
        self.fm = FactorizationMachine()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return (self.linear(x) + self.fm(self.embedding(x))).squeeze(1)


@register("dfm")
class DeepFactorizationMachineModel(_CategoricalModel):
    """DeepFM (Guo et al. 2017), ``torchfm.model.dfm``: linear + FM + MLP over flattened embeddings."""

    def __init__(
        self,
        *,
        field_dims: Sequence[int],
        embed_dim: int = 16,
        mlp_dims: Sequence[int] = (16, 16),
        dropout: float = 0.2,
    ) -> None:
        field_dims, embed_dim = check_ints("field_dims", field_dims), check_int("embed_dim", embed_dim)
        mlp_dims, dropout = check_ints("mlp_dims", mlp_dims), check_prob("dropout", dropout)
        super().__init__(field_dims=field_dims, embed_dim=embed_dim, mlp_dims=mlp_dims, dropout=dropout)
        self.linear = FeaturesLinear(field_dims)
        self.fm = FactorizationMachine()
        self.embedding = FeaturesEmbedding(field_dims, embed_dim)
        self.mlp = MultiLayerPerceptron(self.embed_output_dim, mlp_dims, dropout)
        self._set_output_layers(self.mlp[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        embed_x = self.embedding(x)
        deep = self.mlp(embed_x.flatten(1))
        return (self.linear(x) + self.fm(embed_x) + deep).squeeze(1)


@register("afm")
class AttentionalFactorizationMachineModel(_CategoricalModel):
    """AFM (Xiao et al. 2017), ``torchfm.model.afm``: linear + attention-pooled pairwise interactions."""

    def __init__(
        self,
        *,
        field_dims: Sequence[int],
        embed_dim: int = 16,
        attn_size: int = 16,
        dropouts: Sequence[float] = (0.2, 0.2),
    ) -> None:
        field_dims, embed_dim = check_ints("field_dims", field_dims), check_int("embed_dim", embed_dim)
        attn_size = check_int("attn_size", attn_size)
        if isinstance(dropouts, str) or not isinstance(dropouts, Sequence) or len(dropouts) != 2:
            raise ValueError(f"dropouts must be two probabilities (attention, output), got {dropouts!r}")
        dropouts = [check_prob(f"dropouts[{i}]", p) for i, p in enumerate(dropouts)]
        super().__init__(field_dims=field_dims, embed_dim=embed_dim, attn_size=attn_size, dropouts=dropouts)
        self.embedding = FeaturesEmbedding(field_dims, embed_dim)
        self.linear = FeaturesLinear(field_dims)
        self.afm = AttentionalFactorizationMachine(embed_dim, attn_size, dropouts)
        self._set_output_layers(self.afm.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return (self.linear(x) + self.afm(self.embedding(x))).squeeze(1)


@register("dcn")
class DeepCrossNetworkModel(_CategoricalModel):
    """DCN (Wang et al. 2017), ``torchfm.model.dcn``: cross network beside an MLP, then ``Linear(-> 1)``.

    pytorch-fm calls the final layer ``linear``; here it is ``output`` (tagged ``"mlp"``) so that
    ``linear`` means the first-order term in every model.
    """

    def __init__(
        self,
        *,
        field_dims: Sequence[int],
        embed_dim: int = 16,
        num_layers: int = 3,
        mlp_dims: Sequence[int] = (16, 16),
        dropout: float = 0.2,
    ) -> None:
        field_dims, embed_dim = check_ints("field_dims", field_dims), check_int("embed_dim", embed_dim)
        num_layers, mlp_dims = check_int("num_layers", num_layers), check_ints("mlp_dims", mlp_dims)
        dropout = check_prob("dropout", dropout)
        super().__init__(
            field_dims=field_dims,
            embed_dim=embed_dim,
            num_layers=num_layers,
            mlp_dims=mlp_dims,
            dropout=dropout,
        )
        self.embedding = FeaturesEmbedding(field_dims, embed_dim)
        self.cn = CrossNetwork(self.embed_output_dim, num_layers)
        self.mlp = MultiLayerPerceptron(self.embed_output_dim, mlp_dims, dropout, output_layer=False)
        self.output = tag(torch.nn.Linear(self.embed_output_dim + mlp_dims[-1], 1), "mlp")
        self._set_output_layers(self.output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        embed_x = self.embedding(x).flatten(1)
        return self.output(torch.cat([self.cn(embed_x), self.mlp(embed_x)], dim=1)).squeeze(1)


@register("wd")
class WideAndDeepModel(_CategoricalModel):
    """Wide & Deep (Cheng et al. 2016), ``torchfm.model.wd``: linear + MLP over flattened embeddings."""

    def __init__(
        self,
        *,
        field_dims: Sequence[int],
        embed_dim: int = 16,
        mlp_dims: Sequence[int] = (16, 16),
        dropout: float = 0.2,
    ) -> None:
        field_dims, embed_dim = check_ints("field_dims", field_dims), check_int("embed_dim", embed_dim)
        mlp_dims, dropout = check_ints("mlp_dims", mlp_dims), check_prob("dropout", dropout)
        super().__init__(field_dims=field_dims, embed_dim=embed_dim, mlp_dims=mlp_dims, dropout=dropout)
        self.linear = FeaturesLinear(field_dims)
        self.embedding = FeaturesEmbedding(field_dims, embed_dim)
        self.mlp = MultiLayerPerceptron(self.embed_output_dim, mlp_dims, dropout)
        self._set_output_layers(self.mlp[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return (self.linear(x) + self.mlp(self.embedding(x).flatten(1))).squeeze(1)
