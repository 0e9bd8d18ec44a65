"""Synthetic CTR data with learnable structure (``synthetic-ctr``), and writers of small files in the
real MovieLens and Criteo formats (for tests and demos; nothing here needs a download).

``synthetic-ctr``: each categorical field draws Zipf-like skewed values (exponent 1.1, the popular
values at random indices); the label comes from a hidden factorization machine -- bias +
first-order weights + pairwise dot products of latent vectors (k = 8) (+ a linear term of the dense
features in the ``"dense+sparse"`` layout) -- plus logistic noise. The parts are standardised and
weighted, the logit scaled to ``LOGIT_STD`` and the bias set so the click rate is ~25%; with these
constants the hidden model's own probability (the Bayes-optimal score) reaches an AUC of ~0.8.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .criteo import N_CAT, N_INT
from .dataset import CTRDataset, check_layout, fingerprint, make_splits
from .movielens import CSV_HEADER, VARIANTS

__all__ = [
    "DEFAULT_FIELD_DIMS",
    "SyntheticCTR",
    "load_synthetic",
    "make_synthetic_ctr",
    "write_criteo",
    "write_movielens",
    "zipf_ranks",
]

GENERATOR_VERSION = 1
DEFAULT_FIELD_DIMS = (1000, 500, 200, 100, 50, 20, 10, 5)
DEFAULT_DENSE_DIM = 13
ZIPF_EXPONENT = 1.1
LATENT_DIM = 8
CLICK_RATE = 0.25
LOGIT_STD = 1.4
#: Variance shares of the standardised first-order and pairwise parts of the logit; with dense
#: features the dense term takes DENSE_SHARE and these shrink by (1 - DENSE_SHARE).
SHARES = {"linear": 0.6, "pairwise": 0.4}
DENSE_SHARE = 0.25
CALIBRATION_ROWS = 50_000


def zipf_ranks(rng: np.random.Generator, n: int, vocab: int, exponent: float = ZIPF_EXPONENT) -> np.ndarray:
    """int64 [n] ranks in ``[0, vocab)`` with P(rank r) ~ (r + 1)^-exponent, exponent != 1 (inverse
    CDF of the continuous power law on ``[1, vocab + 1)``, floored): O(n), no table of size ``vocab``."""
    a = 1.0 - exponent
    x = (1.0 + rng.random(n) * ((vocab + 1.0) ** a - 1.0)) ** (1.0 / a)
    return np.minimum(x.astype(np.int64) - 1, vocab - 1)


@dataclass(frozen=True)
class SyntheticCTR:
    """Generated rows and the hidden model's click probability (the Bayes-optimal score)."""

    x: np.ndarray  # int64 [n, F]
    dense: np.ndarray  # float32 [n, D]
    labels: np.ndarray  # float32 [n]
    click_prob: np.ndarray  # float64 [n]


@dataclass(frozen=True)
class _Hidden:
    """The hidden model: value popularity order, FM weights, dense features and their weights."""

    rank_to_index: list[np.ndarray]
    weights: list[np.ndarray]  # first-order, one [dim] per field
    latent: list[np.ndarray]  # [dim, LATENT_DIM] per field
    dense_mu: np.ndarray
    dense_sigma: np.ndarray
    dense_weights: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, field_dims: Sequence[int], dense_dim: int) -> _Hidden:
        return cls(
            rank_to_index=[rng.permutation(d) for d in field_dims],
            weights=[rng.normal(0.0, 1.0, d) for d in field_dims],
            latent=[rng.normal(0.0, 1.0, (d, LATENT_DIM)) for d in field_dims],
            dense_mu=rng.uniform(0.0, 3.0, dense_dim),
            dense_sigma=rng.uniform(0.5, 1.5, dense_dim),
            dense_weights=rng.normal(0.0, 1.0, dense_dim),
        )

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows: categorical indices int64 [n, F] and dense features float32 [n, D] (log1p of counts)."""
        x = np.stack([idx[zipf_ranks(rng, n, idx.size)] for idx in self.rank_to_index], axis=1)
        counts = np.floor(rng.lognormal(self.dense_mu, self.dense_sigma, (n, self.dense_mu.size)))
        return x, np.log1p(counts).astype(np.float32)

    def parts(self, x: np.ndarray, dense: np.ndarray) -> dict[str, np.ndarray]:
        """Unscaled logit parts: first-order sum, FM pairwise interactions, dense term."""
        vectors = np.stack([v[x[:, f]] for f, v in enumerate(self.latent)], axis=1)  # [n, F, k]
        pairwise = 0.5 * ((vectors.sum(axis=1) ** 2).sum(axis=1) - (vectors**2).sum(axis=(1, 2)))
        parts = {"linear": sum(w[x[:, f]] for f, w in enumerate(self.weights)), "pairwise": pairwise}
        if dense.shape[1]:
            parts["dense"] = dense.astype(np.float64) @ self.dense_weights
        return parts


def _standardised_logit(parts: dict[str, np.ndarray], stats: dict[str, tuple[float, float]]) -> np.ndarray:
    """``LOGIT_STD * sum_p sqrt(share_p) * (part_p - mean_p) / std_p`` (no bias)."""
    scale = 1.0 - DENSE_SHARE if "dense" in parts else 1.0
    shares = {k: v * scale for k, v in SHARES.items()} | ({"dense": DENSE_SHARE} if "dense" in parts else {})
    z = sum(np.sqrt(shares[k]) * (parts[k] - stats[k][0]) / stats[k][1] for k in parts)
    return LOGIT_STD * z


def _bias_for_rate(logit: np.ndarray, rate: float) -> float:
    """The bias b with mean(sigmoid(b + logit)) = rate (bisection; the mean is increasing in b)."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.mean(1.0 / (1.0 + np.exp(-(mid + logit)))) < rate else (lo, mid)
    return 0.5 * (lo + hi)


def make_synthetic_ctr(
    n_rows: int = 200_000,
    field_dims: Sequence[int] = DEFAULT_FIELD_DIMS,
    dense_dim: int = 0,
    data_seed: int = 0,
) -> SyntheticCTR:
    """Generate ``n_rows`` rows. The hidden model and its calibration depend only on
    (``field_dims``, ``dense_dim``, ``data_seed``), not on ``n_rows``."""
    if n_rows < 1 or dense_dim < 0 or not field_dims or min(field_dims) < 1:
        raise ValueError(
            f"need n_rows >= 1, dense_dim >= 0, field_dims >= 1; got {n_rows}, {dense_dim}, {field_dims}"
        )
    model_rng, calibration_rng, row_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(data_seed).spawn(3)
    )
    hidden = _Hidden.draw(model_rng, field_dims, dense_dim)
    calibration = hidden.parts(*hidden.sample(calibration_rng, CALIBRATION_ROWS))
    stats = {k: (float(v.mean()), float(v.std()) or 1.0) for k, v in calibration.items()}
    bias = _bias_for_rate(_standardised_logit(calibration, stats), CLICK_RATE)
    x, dense = hidden.sample(row_rng, n_rows)
    logit = bias + _standardised_logit(hidden.parts(x, dense), stats)
    labels = (logit + row_rng.logistic(0.0, 1.0, n_rows) > 0).astype(np.float32)
    return SyntheticCTR(x=x, dense=dense, labels=labels, click_prob=1.0 / (1.0 + np.exp(-logit)))


def load_synthetic(
    data_dir: str | Path | None = None,
    *,
    seed: int,
    layout: str,
    n_rows: int = 200_000,
    field_dims: Sequence[int] = DEFAULT_FIELD_DIMS,
    dense_dim: int | None = None,
    data_seed: int = 0,
) -> CTRDataset:
    """``synthetic-ctr``: generated in memory (``data_dir`` is ignored). ``dense_dim`` defaults to 13
    in the ``"dense+sparse"`` and ``"dense+kjt"`` layouts and must be 0 (or None) in the
    ``"categorical"`` one; ``data_seed`` seeds the data, ``seed`` the split."""
    check_layout("synthetic-ctr", layout)
    if dense_dim is None:
        dense_dim = DEFAULT_DENSE_DIM if layout != "categorical" else 0
    if layout == "categorical" and dense_dim:
        raise ValueError(
            f"synthetic-ctr: the categorical layout has no dense features, got dense_dim={dense_dim}"
        )
    field_dims = [int(d) for d in field_dims]
    data = make_synthetic_ctr(n_rows, field_dims, dense_dim, data_seed)
    generator = {"version": GENERATOR_VERSION, "n_rows": n_rows, "field_dims": field_dims}
    generator |= {"dense_dim": dense_dim, "data_seed": data_seed}
    source = hashlib.sha256(json.dumps(generator, sort_keys=True).encode()).hexdigest()
    inputs = [data.x] if layout == "categorical" else [data.dense, data.x]
    train, valid, test = make_splits(inputs, data.labels, seed)
    return CTRDataset(
        name="synthetic-ctr",
        layout=layout,
        train=train,
        valid=valid,
        test=test,
        field_dims=field_dims,
        dense_dim=dense_dim,
        fingerprint=fingerprint("synthetic-ctr", source, {"layout": layout}),
        split_seed=seed,
    )


# --- writers of the real file formats ----------------------------------------------------------------


def write_movielens(
    directory: str | Path,
    variant: str = "1m",
    *,
    n_users: int = 50,
    n_items: int = 80,
    n_ratings: int = 1_000,
    seed: int = 0,
) -> Path:
    """Write ``directory/<the variant's file>`` (``u.data``, ``ratings.dat`` or ``ratings.csv``) in the
    real format: Zipf-active users and popular items, ratings from user + item biases, sorted by user
    and time as GroupLens ships them. Returns the file's path."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown MovieLens variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    spec = VARIANTS[variant]
    rng = np.random.default_rng(seed)
    users = rng.permutation(n_users)[zipf_ranks(rng, n_ratings, n_users)] + 1
    items = rng.permutation(n_items)[zipf_ranks(rng, n_ratings, n_items)] + 1
    score = 3.5 + rng.normal(0, 0.5, n_users + 1)[users] + rng.normal(0, 0.7, n_items + 1)[items]
    score += rng.normal(0, 0.8, n_ratings)
    times = rng.integers(874_724_710, 1_427_784_002, n_ratings)
    order = np.lexsort((times, users))
    if spec.header is None:
        ratings = [str(r) for r in np.clip(np.rint(score), 1, 5).astype(np.int64)[order]]
    else:
        ratings = [f"{r:.1f}" for r in np.clip(np.rint(score * 2) / 2, 0.5, 5.0)[order]]
    lines = (
        spec.sep.join(map(str, row))
        for row in zip(users[order], items[order], ratings, times[order], strict=True)
    )
    path = Path(directory) / spec.file
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "" if spec.header is None else CSV_HEADER + "\n"
    path.write_text(header + "".join(f"{line}\n" for line in lines))
    return path


#: Per-column log medians of I1..I13, shares of empty fields and vocabulary sizes of C1..C26, close
#: to the real train.txt.
# fmt: off
CRITEO_INT_LOG_MEDIAN = np.array([0.7, 1.1, 1.9, 1.6, 7.9, 3.4, 1.4, 2.1, 3.7, 0.7, 0.7, 0.0, 1.6])
CRITEO_INT_MISSING = (0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0005, 0.04, 0.45, 0.04, 0.76, 0.22)
CRITEO_CAT_MISSING = (0, 0, 0.03, 0.03, 0, 0.12, 0, 0, 0, 0, 0, 0.03, 0, 0, 0, 0.03, 0, 0, 0.44, 0.44, 0.03,
                      0.76, 0, 0.03, 0.44, 0.44)
CRITEO_CARDINALITY = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
                      14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)
# fmt: on
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hex8(values: np.ndarray) -> np.ndarray:
    """uint32-range int64 [n] -> str [n] of 8 lowercase hex digits (vectorised)."""
    nibbles = (values[:, None] >> (4 * np.arange(7, -1, -1))) & 15
    return _HEX_DIGITS[nibbles].view("S8").ravel().astype("U8")


def _criteo_chunk(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """``n`` rows of train.txt columns: heavy-tailed integers (a few negative), Zipf-distributed
    hashes, realistic empty shares; the label depends on I1..I13 and C1..C6 (learnable)."""
    counts = np.floor(rng.lognormal(CRITEO_INT_LOG_MEDIAN, 1.2, (n, N_INT))).astype(np.int64)
    counts[:, 1] -= (rng.random(n) < 0.05) * rng.integers(1, 4, n)  # I2 has small negative values
    int_missing = rng.random((n, N_INT)) < np.array(CRITEO_INT_MISSING)
    ranks = np.stack([zipf_ranks(rng, n, card, 1.05) for card in CRITEO_CARDINALITY], axis=1)
    hashes = (ranks * 0x9E3779B1 + np.arange(N_CAT) * 0x7F4A7C15) & 0xFFFFFFFF
    cat_missing = rng.random((n, N_CAT)) < np.array(CRITEO_CAT_MISSING)
    value_weight = (((hashes[:, :6] * 0x85EBCA6B) >> 20) & 0xFFF) / 4095.0 - 0.5
    dense = np.log1p(np.maximum(np.where(int_missing, 0, counts), 0))
    logit = -1.4 + 2.0 * value_weight.sum(axis=1) + 0.4 * (dense - CRITEO_INT_LOG_MEDIAN)[:, :4].sum(axis=1)
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    columns: dict[str, object] = {"label": labels}
    for j in range(N_INT):
        column = counts[:, j].astype(object)
        column[int_missing[:, j]] = None
        columns[f"I{j + 1}"] = pd.array(column, dtype="Int64")
    for j in range(N_CAT):
        text = _hex8(hashes[:, j]).astype(object)
        text[cat_missing[:, j]] = None
        columns[f"C{j + 1}"] = text
    return pd.DataFrame(columns)


def write_criteo(path: str | Path, n_rows: int = 1_000, *, seed: int = 0, chunk_rows: int = 200_000) -> Path:
    """Write a Criteo ``train.txt`` of ``n_rows`` lines in the real format (in chunks). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="\n") as f:
        for start in range(0, n_rows, chunk_rows):
            chunk = _criteo_chunk(rng, min(chunk_rows, n_rows - start))
            chunk.to_csv(f, sep="\t", header=False, index=False, na_rep="")
    return path
