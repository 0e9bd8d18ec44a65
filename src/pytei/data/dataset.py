"""Containers shared by every loader (``Split``, ``CTRDataset``), the seeded 8:1:1 split and fingerprints.

Split rule (all data sets): a seeded permutation (numpy ``default_rng(seed)``) decides membership
-- 80% of the rows are train, 10% valid, the rest test -- and each split keeps its rows in source
order. Source order lets a large cache store the three splits as contiguous blocks (zero-copy
views, see ``criteo``); ``Split.batches(shuffle=True)`` shuffles for training.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..exceptions import PyteiError
from .kjt import DenseKJT, default_keys

__all__ = [
    "LAYOUTS",
    "CTRDataset",
    "DataFileError",
    "Collate",
    "Split",
    "check_layout",
    "file_sha256",
    "fingerprint",
    "make_splits",
    "split_assignment",
    "split_sizes",
]

#: ``"categorical"``: ``inputs = (x: int64 [N, F],)``;
#: ``"dense+sparse"``: ``inputs = (dense: float32 [N, D], sparse: int64 [N, S])``;
#: ``"dense+kjt"``: the arrays of ``"dense+sparse"``, whose batches are ``(dense, KeyedJaggedTensor)``
#: (TorchRec models; keys ``CTRDataset.sparse_names``; needs the extra ``pytei[torchrec]``); multi-hot
#: bags as ``inputs = (dense, ids: int64 [N, S, H], lengths: int64 [N, S])`` (see ``pytei.data.kjt``).
LAYOUTS = ("categorical", "dense+sparse", "dense+kjt")

#: Turns a batch of a split's row-aligned tensors into the model's inputs (see ``Split.collate``).
Collate = Callable[[tuple[torch.Tensor, ...]], tuple[Any, ...]]

TRAIN, VALID, TEST = 0, 1, 2


class DataFileError(PyteiError, ValueError):
    """A malformed data file; the message names the file and the 1-based line of the first bad line."""

    def __init__(self, path: os.PathLike[str] | str, line: int, reason: str) -> None:
        super().__init__(f"{path}: line {line}: {reason}")
        self.path = os.fspath(path)
        self.line = line


@dataclass(frozen=True)
class Split:
    """Row-aligned input tensors and 0/1 float32 labels: ``model(*split.model_inputs(...))`` works.

    ``collate`` (None: the tensors themselves) turns a batch of ``inputs`` into what the model takes;
    layout ``"dense+kjt"`` sets it to build the batch's ``KeyedJaggedTensor``. ``batches`` applies it.
    """

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor
    collate: Collate | None = None

    def __post_init__(self) -> None:
        if self.labels.dtype != torch.float32 or self.labels.dim() != 1:
            raise ValueError(
                f"labels must be float32 [N], got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if not self.inputs or any(t.shape[0] != self.labels.shape[0] for t in self.inputs):
            shapes = [tuple(t.shape) for t in self.inputs]
            raise ValueError(f"inputs must be row-aligned with {self.labels.shape[0]} labels, got {shapes}")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def model_inputs(self, inputs: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
        """A batch of this split's row-aligned tensors (any rows) as the model's inputs."""
        return inputs if self.collate is None else self.collate(inputs)

    def take(self, rows: torch.Tensor | slice) -> Split:
        """The split of ``rows`` (indices or a slice), with the same ``collate``."""
        return replace(self, inputs=tuple(t[rows] for t in self.inputs), labels=self.labels[rows])

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[tuple[Any, ...], torch.Tensor]]:
        """Yield ``(model inputs, labels)`` batches; unshuffled batches are views, shuffled ones gathered
        copies (then collated, see ``collate``)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = torch.randperm(len(self), generator=generator) if shuffle else None
        for start in range(0, len(self), batch_size):
            rows = slice(start, start + batch_size) if order is None else order[start : start + batch_size]
            yield self.model_inputs(tuple(t[rows] for t in self.inputs)), self.labels[rows]


@dataclass(frozen=True)
class CTRDataset:
    """A click-through-rate data set, split 8:1:1; ``field_dims`` are the vocabulary sizes of the
    categorical fields (the sparse ones in the ``"dense+sparse"`` and ``"dense+kjt"`` layouts).

    In layout ``"dense+kjt"`` the splits hold the ``"dense+sparse"`` tensors (or multi-hot bags:
    padded ids ``[N, S, H]`` and their ``lengths [N, S]``) and each gets the collate that builds a
    batch's ``KeyedJaggedTensor`` (keys ``sparse_names``), unless it has one.
    """

    name: str
    layout: str
    train: Split
    valid: Split
    test: Split
    field_dims: list[int]
    dense_dim: int
    fingerprint: str
    split_seed: int

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; allowed: {', '.join(LAYOUTS)}")
        n = len(self.field_dims)
        widths = [n] if self.layout == "categorical" else [self.dense_dim, n]
        allowed = [widths, [self.dense_dim, n, n]] if self.layout == "dense+kjt" else [widths]  # multi-hot
        for split in (self.train, self.valid, self.test):
            if [t.shape[1] for t in split.inputs] not in allowed:
                raise ValueError(
                    f"{self.name}: split inputs do not match layout {self.layout!r}: widths "
                    f"{' or '.join(map(str, allowed))}, got {[t.shape[1] for t in split.inputs]}"
                )
        if self.layout == "dense+kjt":
            collate = DenseKJT(tuple(self.sparse_names))
            for name in ("train", "valid", "test"):  # frozen: set once here, as a derived field
                split = getattr(self, name)
                if split.collate is None:
                    object.__setattr__(self, name, replace(split, collate=collate))

    @property
    def sparse_names(self) -> list[str]:
        """Names of the categorical fields, the KJT keys of layout ``"dense+kjt"``: ``cat_0 ..``."""
        return default_keys(len(self.field_dims))

    def model_inputs(self, inputs: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
        """A batch of this data set's row-aligned tensors (any split's) as the model's inputs."""
        return self.test.model_inputs(inputs)

    @property
    def splits(self) -> dict[str, Split]:
        """``{"train": ..., "valid": ..., "test": ...}``."""
        return {"train": self.train, "valid": self.valid, "test": self.test}


def check_layout(name: str, layout: str, allowed: Sequence[str] = LAYOUTS) -> None:
    """Raise a ``ValueError`` naming ``layout`` and the layouts data set ``name`` offers."""
    if layout not in allowed:
        raise ValueError(f"{name}: unknown layout {layout!r}; allowed: {', '.join(allowed)}")


def split_sizes(n_rows: int) -> tuple[int, int, int]:
    """Train, valid and test sizes for 8:1:1 (as pytorch-fm: int(0.8 n), int(0.1 n), the rest)."""
    n_train, n_valid = n_rows * 8 // 10, n_rows // 10
    return n_train, n_valid, n_rows - n_train - n_valid


def split_assignment(n_rows: int, seed: int) -> np.ndarray:
    """int8 [n_rows]: ``0`` train, ``1`` valid, ``2`` test, in split sizes ``split_sizes(n_rows)``.

    The row labels are shuffled by numpy ``default_rng(seed)``, which is a seeded permutation of the
    rows (1 byte per row, so 45M rows cost 45 MB).
    """
    assign = np.repeat(np.array([TRAIN, VALID, TEST], dtype=np.int8), split_sizes(n_rows))
    np.random.default_rng(seed).shuffle(assign)
    return assign


def make_splits(inputs: Sequence[np.ndarray], labels: np.ndarray, seed: int) -> tuple[Split, Split, Split]:
    """Train, valid and test ``Split`` s of in-memory arrays (each split a gathered copy)."""
    assign = split_assignment(labels.shape[0], seed)
    splits = []
    for part in (TRAIN, VALID, TEST):
        rows = np.flatnonzero(assign == part)
        tensors = tuple(torch.from_numpy(a[rows]) for a in inputs)
        splits.append(Split(tensors, torch.from_numpy(labels[rows].astype(np.float32, copy=False))))
    return splits[0], splits[1], splits[2]


def file_sha256(path: str | os.PathLike[str], block: int = 1 << 20) -> str:
    """sha256 hex of a file's bytes, read in ``block``-byte pieces (``hashlib.file_digest`` is 3.11+)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(block):
            digest.update(piece)
    return digest.hexdigest()


def fingerprint(name: str, source_sha256: str, params: dict[str, Any]) -> str:
    """sha256 hex over the source digest (file bytes or generator parameters) and the preprocessing."""
    payload = json.dumps({"name": name, "source": source_sha256, "params": params}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
