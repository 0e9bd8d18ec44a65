"""Index faults in KeyedJaggedTensor inputs: the ids of torchrec's (float and quantized) collections."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..indices import IndexReader, Segment, register_reader

__all__ = ["KJTLookup"]


def _collections() -> tuple[type[nn.Module], ...]:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
    from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEC

    return EmbeddingBagCollection, EmbeddingCollection, QuantEBC, QuantEC


def _configs(module: Any) -> list[Any]:
    return list(
        module.embedding_bag_configs() if hasattr(module, "embedding_bags") else module.embedding_configs()
    )


class KJTLookup(IndexReader):
    """A torchrec EBC/EC (float or quantized) called with a ``KeyedJaggedTensor``: the ids of a feature are
    its slice of ``values()``; a table's segments are those of the features it serves."""

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, _collections())

    @staticmethod
    def _kjt(args: tuple, kwargs: dict) -> Any:
        return args[0] if args else kwargs["features"]

    def segments(
        self, module: nn.Module, args: tuple, kwargs: dict, tables: set[str]
    ) -> tuple[torch.Tensor, list[Segment]]:
        kjt = self._kjt(args, kwargs)
        group = "embedding_bags" if hasattr(module, "embedding_bags") else "embeddings"
        rows: dict[str, int] = {}
        for cfg in _configs(module):
            name = f"{group}.{cfg.name}.weight"
            if any(t == name or t.startswith(f"{name}_") for t in tables):
                rows.update(dict.fromkeys(cfg.feature_names, int(cfg.num_embeddings)))
        offsets = kjt.offset_per_key()
        segments = [
            Segment(int(offsets[k]), int(offsets[k + 1]), rows[key])
            for k, key in enumerate(kjt.keys())
            if key in rows and offsets[k + 1] > offsets[k]
        ]
        return kjt.values(), segments

    def rebuild(
        self, module: nn.Module, args: tuple, kwargs: dict, ids: torch.Tensor, keep: torch.Tensor | None
    ) -> tuple[tuple, dict]:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        kjt = self._kjt(args, kwargs)
        lengths, weights = kjt.lengths(), kjt.weights_or_none()
        if keep is not None:
            bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
            dropped = torch.bincount(bag[~keep], minlength=lengths.numel()).to(lengths.dtype)
            lengths, ids = lengths - dropped, ids[keep]
            weights = weights[keep] if weights is not None else None
        new = KeyedJaggedTensor(
            keys=kjt.keys(), values=ids, weights=weights, lengths=lengths, stride=kjt.stride()
        )
        rest = dict(kwargs)
        rest.pop("features", None)
        return (new, *args[1:]) if args else (), ({"features": new, **rest} if not args else rest)


register_reader(KJTLookup())
