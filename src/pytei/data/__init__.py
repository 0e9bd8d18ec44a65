"""CTR data sets of the paper (Sec. 6.1: MovieLens-1M/20M, Criteo) plus MovieLens-100K/latest and a
synthetic one, each split 8:1:1 with a seeded permutation::

    ds = pytei.data.load("movielens-1m", "~/data/ml-1m", seed=0)
    model = pytei.models.create("fm", field_dims=ds.field_dims)
    for inputs, labels in ds.train.batches(2048, shuffle=True):
        logits = model(*inputs)

Nothing is downloaded: file-based loaders read the real files from ``data_dir`` (the unzipped
release); ``pytei.data.synthetic`` writes small files in the same formats for tests and demos.
Layouts: ``"categorical"`` -> ``inputs = (x: int64 [N, F],)`` (FM family); ``"dense+sparse"`` ->
``inputs = (dense: float32 [N, D], sparse: int64 [N, S])`` (DLRM; Criteo and synthetic-ctr only);
``"dense+kjt"`` -> the same tensors, batched as ``(dense, KeyedJaggedTensor)`` (TorchRec models; see
``pytei.data.kjt``).
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from .criteo import load_criteo
from .dataset import LAYOUTS, CTRDataset, DataFileError, Split
from .movielens import load_movielens
from .synthetic import load_synthetic

__all__ = ["LAYOUTS", "CTRDataset", "DataFileError", "Split", "load", "names"]

_LOADERS: dict[str, Callable[..., CTRDataset]] = {
    "movielens-100k": partial(load_movielens, "100k"),
    "movielens-1m": partial(load_movielens, "1m"),
    "movielens-20m": partial(load_movielens, "20m"),
    "movielens-latest": partial(load_movielens, "latest"),
    "criteo": load_criteo,
    "synthetic-ctr": load_synthetic,
}


def names() -> list[str]:
    """Names accepted by ``load``."""
    return list(_LOADERS)


def _options(loader: Callable[..., CTRDataset]) -> list[str]:
    """The loader's own keyword options (everything but ``data_dir``, ``seed`` and ``layout``)."""
    params = inspect.signature(loader).parameters.values()
    return [
        p.name
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("seed", "layout")
    ]


def load(
    name: str,
    data_dir: str | Path | None = None,
    *,
    seed: int = 0,
    layout: str = "categorical",
    **options: Any,
) -> CTRDataset:
    """Load data set ``name`` from ``data_dir`` (``~`` expanded), split 8:1:1 by ``seed``, in ``layout``.

    Options: ``criteo``: ``min_threshold=10``, ``max_rows=None``, ``cache_dir=None``;
    ``synthetic-ctr``: ``n_rows=200_000``, ``field_dims``, ``dense_dim``, ``data_seed=0``.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown data set {name!r}; allowed: {', '.join(_LOADERS)}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    loader = _LOADERS[name]
    allowed = _options(loader)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{name} got unknown options {unknown}; allowed: {', '.join(allowed) or 'none'}")
    where = Path(data_dir).expanduser() if data_dir is not None else None
    return loader(where, seed=int(seed), layout=layout, **options)
