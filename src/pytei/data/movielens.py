"""MovieLens ratings as CTR data (pytorch-fm's recipe): fields (user id, item id), label = rating > 3.

Files, in the layout GroupLens ships them (``data_dir`` is the unzipped folder):

==================  ===============  ======================================================
data set            file             format
==================  ===============  ======================================================
movielens-100k      ``u.data``       ``user<TAB>item<TAB>rating<TAB>timestamp``, no header
movielens-1m        ``ratings.dat``  ``UserID::MovieID::Rating::Timestamp``, no header
movielens-20m       ``ratings.csv``  header ``userId,movieId,rating,timestamp``; 3.5-style ratings
movielens-latest    ``ratings.csv``  as 20m (ml-latest and ml-latest-small)
==================  ===============  ======================================================

Indices are the raw ids and ``field_dims = max id + 1`` per field (ids are 1-based, so row 0 of each
embedding is unused); raw ids are not remapped to contiguous indices, which keeps the paper's
parameter counts (e.g. 4.59M for FM on ML-20M, whose movieIds reach 131262 for 27K movies). As a raw
id is an embedding row, ids above ``MAX_ID`` (2^31 - 1, far above any GroupLens release) are refused
naming the line: they would wrap in int64 or ask for an embedding table of that many rows.

Ratings must lie on the release's scale (``Variant.scale``): whole stars 1..5 for 100k and 1m,
half stars 0.5..5 for 20m and latest; any other value is refused naming the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .dataset import CTRDataset, DataFileError, check_layout, fingerprint, make_splits

__all__ = ["VARIANTS", "load_movielens", "read_ratings"]

CSV_HEADER = "userId,movieId,rating,timestamp"


@dataclass(frozen=True)
class Variant:
    """Where a MovieLens release keeps its ratings and how they are written."""

    file: str
    sep: str
    header: str | None
    url: str
    scale: tuple[float, ...]  # every rating the release uses

    def scale_text(self) -> str:
        step = self.scale[1] - self.scale[0]
        return f"{self.scale[0]:g} to {self.scale[-1]:g} in steps of {step:g}"


WHOLE_STARS = (1.0, 2.0, 3.0, 4.0, 5.0)
HALF_STARS = tuple(k / 2 for k in range(1, 11))
MAX_ID = 2**31 - 1

VARIANTS = {
    "100k": Variant(
        "u.data", "\t", None, "https://files.grouplens.org/datasets/movielens/ml-100k.zip", WHOLE_STARS
    ),
    "1m": Variant(
        "ratings.dat", "::", None, "https://files.grouplens.org/datasets/movielens/ml-1m.zip", WHOLE_STARS
    ),
    "20m": Variant(
        "ratings.csv",
        ",",
        CSV_HEADER,
        "https://files.grouplens.org/datasets/movielens/ml-20m.zip",
        HALF_STARS,
    ),
    "latest": Variant(
        "ratings.csv",
        ",",
        CSV_HEADER,
        "https://files.grouplens.org/datasets/movielens/ml-latest.zip",
        HALF_STARS,
    ),
}

_NON_NEGATIVE_INT = re.compile(r"[0-9]+")
_INT = re.compile(r"-?[0-9]+")
_NON_SPACE = re.compile(rb"\S")


def _diagnose(path: Path, data: bytes, variant: Variant) -> None:
    """Slow exact check, run only when the fast parse failed: raise at the first bad line."""
    lines = io.BytesIO(data)
    first = 1
    if variant.header is not None:
        next(lines)
        first = 2
    for number, raw in enumerate(lines, start=first):
        fields = raw.decode("utf-8", errors="replace").rstrip("\r\n").split(variant.sep)
        if len(fields) != 4:
            raise DataFileError(
                path, number, f"expected 4 columns separated by {variant.sep!r}, found {len(fields)}"
            )
        for name, text in zip(("user id", "item id"), fields[:2], strict=True):
            if not _NON_NEGATIVE_INT.fullmatch(text):
                raise DataFileError(path, number, f"{name} must be a non-negative integer, got {text!r}")
            if int(text) > MAX_ID:
                raise DataFileError(
                    path, number, f"{name} {text} is out of range: ids index embedding rows, at most {MAX_ID}"
                )
        try:
            rating = float(fields[2])
        except ValueError:
            rating = math.nan
        if not math.isfinite(rating):
            raise DataFileError(path, number, f"rating must be a number, got {fields[2]!r}")
        if rating not in variant.scale:
            raise DataFileError(
                path,
                number,
                f"rating {fields[2]} is not on the scale of {path.name} ({variant.scale_text()})",
            )
        if not _INT.fullmatch(fields[3]):
            raise DataFileError(path, number, f"timestamp must be an integer, got {fields[3]!r}")


def _check_header(path: Path, data: bytes, variant: Variant) -> int:
    """Number of header lines (0 or 1); raises on a missing or wrong header and on no data rows."""
    if not data:
        raise DataFileError(path, 1, "file is empty")
    if variant.header is None:
        return 0
    end = data.find(b"\n")
    first = data[: end if end >= 0 else len(data)].decode("utf-8", errors="replace").rstrip("\r")
    if first != variant.header:
        raise DataFileError(path, 1, f"expected the header {variant.header!r}, got {first[:80]!r}")
    if end < 0 or not _NON_SPACE.search(data, end + 1):
        raise DataFileError(path, 2, "no ratings after the header")
    return 1


def read_ratings(path: Path, variant: Variant) -> tuple[np.ndarray, np.ndarray, str]:
    """``(ids int64 [N, 2], ratings float64 [N], sha256 of the file)``; malformed lines -> ``DataFileError``.

    Fast path: one pandas C-engine parse (``::`` is rewritten to a tab first, as the C engine takes
    one-character separators), then vectorised checks; any failure reruns an exact line-by-line check
    to name the first bad line.
    """
    data = path.read_bytes()
    skip = _check_header(path, data, variant)
    text = data.replace(b"::", b"\t") if variant.sep == "::" else data
    try:
        frame = pd.read_csv(
            io.BytesIO(text),
            sep="\t" if variant.sep == "::" else variant.sep,
            header=None,
            names=["user", "item", "rating", "timestamp"],
            skiprows=skip,
            skip_blank_lines=False,
            quoting=csv.QUOTE_NONE,  # ids and ratings are never quoted
            engine="c",
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError):
        frame = None
    if frame is None or not _valid(frame, variant):
        _diagnose(path, data, variant)
        raise DataFileError(path, skip + 1, "could not be parsed as MovieLens ratings")
    ids = np.stack([frame["user"].to_numpy(np.int64), frame["item"].to_numpy(np.int64)], axis=1)
    return ids, frame["rating"].to_numpy(dtype=np.float64), hashlib.sha256(data).hexdigest()


def _valid(frame: pd.DataFrame, variant: Variant) -> bool:
    """Integer ids in [0, MAX_ID], ratings on the variant's scale, integer timestamps, at least one row."""
    ids_ok = all(
        frame[c].dtype.kind in "iu" and bool(((frame[c] >= 0) & (frame[c] <= MAX_ID)).all())
        for c in ("user", "item")
    )
    rating_ok = frame["rating"].dtype.kind in "iuf" and bool(
        np.isin(frame["rating"].to_numpy(np.float64), np.array(variant.scale)).all()
    )
    return len(frame) > 0 and ids_ok and rating_ok and frame["timestamp"].dtype.kind in "iu"


def load_movielens(variant: str, data_dir: str | Path | None, *, seed: int, layout: str) -> CTRDataset:
    """MovieLens ``variant`` (``"100k"``, ``"1m"``, ``"20m"``, ``"latest"``) from ``data_dir``."""
    spec = VARIANTS[variant]
    name = f"movielens-{variant}"
    check_layout(name, layout, ("categorical",))  # MovieLens ratings have no dense features
    expected = f"{name} expects DIR/{spec.file} (unzip {spec.url})"
    if data_dir is None:
        raise ValueError(f"{name} needs data_dir: {expected}")
    path = Path(data_dir) / spec.file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {expected}")
    ids, ratings, source_sha256 = read_ratings(path, spec)
    labels = (ratings > 3).astype(np.float32)
    train, valid, test = make_splits([ids], labels, seed)
    params = {"layout": layout, "label": "rating > 3", "index": "raw id, field_dims = max id + 1"}
    return CTRDataset(
        name=name,
        layout=layout,
        train=train,
        valid=valid,
        test=test,
        field_dims=[int(d) for d in ids.max(axis=0) + 1],
        dense_dim=0,
        fingerprint=fingerprint(name, source_sha256, params),
        split_seed=seed,
    )
