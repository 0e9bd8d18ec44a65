"""Zoo models built on TorchRec: ``dlrm-torchrec`` (DLRM) and ``dcnv2`` (MLPerf DLRMv2's DCN-v2).

Both take ``forward(dense: Float[B, dense_dim], sparse: KeyedJaggedTensor) -> Float[B]`` logits (input
layout ``"dense+kjt"``) and are assembled from ``torchrec.models.dlrm``'s arches, under the same
attribute names as TorchRec's own ``DLRM`` / ``DLRM_DCN`` (so their state dicts line up):

* ``sparse_arch`` (component ``embedding``): an ``EmbeddingBagCollection`` with one table
  ``t_<feature>`` per sparse field (sum pooling, so multi-hot bags work), keyed by ``feature_names``;
  table ``k``'s weight is ``sparse_arch.embedding_bag_collection.embedding_bags.t_<feature>.weight``.
  Tables start U(-1/sqrt(rows), 1/sqrt(rows)) (TorchRec's default, as the DLRM reference).
* ``dense_arch`` (``mlp``): the bottom MLP on the dense features, ending in ``embed_dim``.
* ``inter_arch`` (``interaction``): dot products of all pairs of [dense, *embeddings] (DLRM), or a
  low-rank cross net (DCN-v2, Wang et al. 2021) on their concatenation.
* ``over_arch`` (``mlp``): the top MLP, ``top_mlp`` widths then one logit (its last ``Linear`` is the
  model's output layer).

TorchRec is imported when a model is built, not when this module is: ``import pytei`` and
``pytei.models.names()`` work without the optional extra ``pytei[torchrec]``; building one without it
raises :class:`pytei.exceptions.MissingExtraError` naming what is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import nn
from torch.fx.node import has_side_effect

from ._registry import register
from .layers import RecModel, check_input, check_int, check_ints, tag

if TYPE_CHECKING:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["DCNV2_VARIANTS", "MLPERF_DLRMV2", "MLPERF_MULTI_HOT_SIZES", "DCNv2", "DLRMTorchRec"]

# fmt: off
_MLPERF_ROWS = [  # MLPerf DLRMv2's --num_embeddings_per_feature
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
]
# fmt: on
#: MLPerf Training's DLRMv2 (``recommendation_v2/torchrec_dlrm``, Criteo 1TB multi-hot): 26 tables of
#: 128-wide rows (five of 40M rows: 204.2M rows, 104.5 GB of fp32 in all), bottom MLP 512-256-128,
#: 3 low-rank (512) cross layers on the 27 x 128 concatenation, top MLP 1024-1024-512-256-1.
MLPERF_DLRMV2: dict[str, Any] = {
    "field_dims": _MLPERF_ROWS,
    "dense_dim": 13,
    "embed_dim": 128,
    "bottom_mlp": [512, 256, 128],
    "top_mlp": [1024, 1024, 512, 256],
    "dcn_num_layers": 3,
    "dcn_low_rank_dim": 512,
}
#: Ids per sample of each MLPerf DLRMv2 field (its synthetic multi-hot Criteo; a KJT's lengths).
MLPERF_MULTI_HOT_SIZES = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)

#: Default sizes of ``dcnv2`` by ``variant``: ``"small"`` trains on synthetic-ctr or a Criteo sample in
#: seconds on a CPU; ``"mlperf"`` is MLPerf's model (its tables need 104.5 GB).
DCNV2_VARIANTS: dict[str, dict[str, Any]] = {
    "small": {
        "dense_dim": 13,
        "embed_dim": 16,
        "bottom_mlp": [64, 16],
        "top_mlp": [64, 32],
        "dcn_num_layers": 3,
        "dcn_low_rank_dim": 16,
    },
    "mlperf": MLPERF_DLRMV2,
}

# Graph leaves under torch.fx.symbolic_trace (see pytei.models.layers).
torch.fx.wrap("check_input")
torch.fx.wrap("check_kjt")


def _require(name: str) -> None:
    from ..torchrec import require

    require(f"model {name!r}")


@has_side_effect
def check_kjt(sparse: Any, features: Sequence[str], batch: int) -> None:
    """Refuse anything but a ``KeyedJaggedTensor`` with the keys ``features`` and ``batch`` samples."""
    keys = getattr(sparse, "keys", None)
    if not callable(keys) or not callable(getattr(sparse, "stride", None)):
        raise TypeError(
            f"sparse must be a torchrec KeyedJaggedTensor (layout 'dense+kjt'), got {type(sparse)!r}"
        )
    missing = [f for f in features if f not in keys()]
    if missing:
        raise ValueError(f"sparse lacks the keys {missing}; the model reads {list(features)}, got {keys()}")
    if sparse.stride() != batch:
        raise ValueError(f"dense and sparse batch sizes differ: {batch} vs {sparse.stride()}")


def _feature_names(value: Any, n: int) -> list[str]:
    if value is None:  # = pytei.data.kjt.default_keys, the data sets' KJT keys
        return [f"cat_{i}" for i in range(n)]
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) != n:
        raise ValueError(f"feature_names must list one name per field ({n}), got {value!r}")
    bad = [v for v in value if not isinstance(v, str) or not v]
    if bad or len(set(value)) != n:
        raise ValueError(f"feature_names must be {n} distinct non-empty strings, got {list(value)!r}")
    return list(value)


class _TorchRecDLRM(RecModel):
    """Shared parts: config checks, the EBC (``sparse_arch``), the bottom MLP and the forward."""

    input_layout = "dense+kjt"
    sparse_arch: nn.Module
    dense_arch: nn.Module
    inter_arch: nn.Module
    over_arch: nn.Module

    def _build_common(self, config: dict[str, Any]) -> int:
        """Build ``sparse_arch`` and ``dense_arch`` from the checked ``config``; returns the field count."""
        from torchrec.models.dlrm import DenseArch, SparseArch
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        tables = [
            EmbeddingBagConfig(
                name=f"t_{feature}",
                embedding_dim=config["embed_dim"],
                num_embeddings=rows,
                feature_names=[feature],
                pooling=PoolingType.SUM,
            )
            for feature, rows in zip(config["feature_names"], config["field_dims"], strict=True)
        ]
        self.sparse_arch = tag(SparseArch(EmbeddingBagCollection(tables=tables)), "embedding")
        self.dense_arch = tag(DenseArch(config["dense_dim"], list(config["bottom_mlp"])), "mlp")
        return len(tables)

    def _build_over(self, in_features: int, top_mlp: Sequence[int]) -> None:
        from torchrec.models.dlrm import OverArch

        over = OverArch(in_features, [*top_mlp, 1])
        self.over_arch = tag(over, "mlp")
        self._set_output_layers(over.model[-1])  # its closing Linear(-> 1)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """``dense [B, dense_dim]``, ``sparse`` a KJT keyed by ``feature_names`` -> logits ``[B]``."""
        check_input("dense", dense, self._config["dense_dim"])
        check_kjt(sparse, self._config["feature_names"], dense.shape[0])
        embedded_dense = self.dense_arch(dense)
        embedded_sparse = self.sparse_arch(sparse)
        return self.over_arch(self.inter_arch(embedded_dense, embedded_sparse)).squeeze(1)


def _common_config(
    field_dims: Any, dense_dim: Any, embed_dim: Any, bottom_mlp: Any, top_mlp: Any, feature_names: Any
) -> dict[str, Any]:
    """The checked sizes both models share (``dense_dim >= 1``: TorchRec's arches need a dense arch)."""
    field_dims = check_ints("field_dims", field_dims)
    embed_dim, bottom = check_int("embed_dim", embed_dim), check_ints("bottom_mlp", bottom_mlp)
    if bottom[-1] != embed_dim:
        raise ValueError(f"bottom_mlp must end in embed_dim={embed_dim} to interact, got {bottom}")
    return {
        "field_dims": field_dims,
        "dense_dim": check_int("dense_dim", dense_dim),
        "embed_dim": embed_dim,
        "bottom_mlp": bottom,
        "top_mlp": check_ints("top_mlp", top_mlp),
        "feature_names": _feature_names(feature_names, len(field_dims)),
    }


@register("dlrm-torchrec")
class DLRMTorchRec(_TorchRecDLRM):
    """DLRM (Naumov et al. 2019) on TorchRec: ``torchrec.models.dlrm.DLRM``'s arches, dot interaction.

    The over arch reads the bottom output and the ``F + F(F-1)/2`` dots of [dense, *embeddings]
    (TorchRec's ``InteractionArch``; the same values as ``pytei``'s ``dlrm``, another order).
    """

    def __init__(
        self,
        *,
        field_dims: Sequence[int],
        dense_dim: int = 13,
        embed_dim: int = 16,
        bottom_mlp: Sequence[int] = (64, 16),
        top_mlp: Sequence[int] = (64, 32),
        feature_names: Sequence[str] | None = None,
    ) -> None:
        config = _common_config(field_dims, dense_dim, embed_dim, bottom_mlp, top_mlp, feature_names)
        _require(type(self).name)
        super().__init__(**config)
        from torchrec.models.dlrm import InteractionArch

        n = self._build_common(config)
        self.inter_arch = tag(InteractionArch(num_sparse_features=n), "interaction")
        self._build_over(embed_dim + n + n * (n - 1) // 2, config["top_mlp"])


@register("dcnv2")
class DCNv2(_TorchRecDLRM):
    """MLPerf DLRMv2's architecture (``torchrec.models.dlrm.DLRM_DCN``): a low-rank cross net
    (``LowRankCrossNet``, ``dcn_num_layers`` layers of rank ``dcn_low_rank_dim``) on the
    ``(F + 1) * embed_dim`` concatenation of the bottom output and the embeddings, then the over arch.

    ``variant`` picks the defaults of every size left out (``DCNV2_VARIANTS``): ``"small"`` (embed 16,
    bottom 64-16, 3 cross layers of rank 16, top 64-32) or ``"mlperf"`` (MLPerf's sizes, its 26
    Criteo 1TB tables included unless ``field_dims`` is given; see ``MLPERF_DLRMV2``). The config
    records every size, so a checkpoint rebuilds without the variant's table.
    """

    def __init__(
        self,
        *,
        field_dims: Sequence[int] | None = None,
        variant: str = "small",
        dense_dim: int | None = None,
        embed_dim: int | None = None,
        bottom_mlp: Sequence[int] | None = None,
        top_mlp: Sequence[int] | None = None,
        dcn_num_layers: int | None = None,
        dcn_low_rank_dim: int | None = None,
        feature_names: Sequence[str] | None = None,
    ) -> None:
        if variant not in DCNV2_VARIANTS:
            raise ValueError(f"unknown dcnv2 variant {variant!r}; allowed: {', '.join(DCNV2_VARIANTS)}")
        sizes = DCNV2_VARIANTS[variant]
        if field_dims is None:
            if "field_dims" not in sizes:
                raise ValueError(f"dcnv2 variant {variant!r} needs field_dims (the rows of each table)")
            field_dims = sizes["field_dims"]

        def pick(key: str, value: Any) -> Any:
            return sizes[key] if value is None else value

        config = _common_config(
            field_dims,
            pick("dense_dim", dense_dim),
            pick("embed_dim", embed_dim),
            pick("bottom_mlp", bottom_mlp),
            pick("top_mlp", top_mlp),
            feature_names,
        )
        config["variant"] = variant
        config["dcn_num_layers"] = check_int("dcn_num_layers", pick("dcn_num_layers", dcn_num_layers))
        config["dcn_low_rank_dim"] = check_int("dcn_low_rank_dim", pick("dcn_low_rank_dim", dcn_low_rank_dim))
        _require(type(self).name)
        super().__init__(**config)
        from torchrec.models.dlrm import InteractionDCNArch
        from torchrec.modules.crossnet import LowRankCrossNet

        n = self._build_common(config)
        width = (n + 1) * config["embed_dim"]
        crossnet = LowRankCrossNet(
            in_features=width, num_layers=config["dcn_num_layers"], low_rank=config["dcn_low_rank_dim"]
        )
        self.inter_arch = tag(InteractionDCNArch(num_sparse_features=n, crossnet=crossnet), "interaction")
        self._build_over(width, config["top_mlp"])
