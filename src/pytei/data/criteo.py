"""Criteo display-advertising challenge (Kaggle DAC) ``train.txt`` as CTR data, through a binary cache.

Format: one impression per line, 40 tab-separated columns: the label (0/1), integer features
I1..I13 (decimal, may be negative or empty) and categorical features C1..C26 (hashes of exactly
8 hex digits, or empty). Any other line is an error naming the file, line and column.

Preprocessing follows pytorch-fm's ``CriteoDataset`` (the paper's models come from it):

* ``"categorical"`` layout (FM family): all 39 columns are categorical fields. An integer ``v`` is
  discretised to ``int(ln(v)^2)`` if ``v > 2``, else kept as a value of its own (pytorch-fm's
  ``str(v - 2)``, which keeps ``v <= 2`` apart from the buckets: a plain ``str(v)`` would merge
  ``v = 1`` with ``v in {3, 4}``); a missing value is a value of its own.
* Per field, values seen fewer than ``min_threshold`` times share one out-of-vocabulary index.
  Kept values get indices ``0..K-1`` in ascending order of their key -- missing first, then for
  integer fields ``v <= 2`` ascending and the buckets ascending, for categorical fields the hashes
  as numbers -- the OOV index is ``K`` and ``field_dims[f] = K + 1``.
* ``"dense+sparse"`` layout (DLRM): ``dense = log(1 + max(v, 0))`` (float32) of the 13 integers,
  missing -> 0, and ``sparse`` = the 26 categorical fields encoded as above.

Cache: the first load streams the file twice in ~32 MiB blocks (count values, then encode) and
writes ``labels.npy`` (float32 [N]), ``dense.npy`` (float32 [N, 13]) and ``fields.npy``
(int64 [N, 39]) plus ``meta.json`` to ``DIR/.pytei-cache/criteo-<key>/`` (``cache_dir`` moves it),
where ``<key>`` hashes the preprocessing parameters and the split seed. Rows are stored grouped
by split (train, valid, test; each in file order), so every ``Split`` tensor is a zero-copy
``torch.from_numpy`` view of a copy-on-write memory map: nothing is read into RAM until used.
A cache is valid while the source's size, modification time (ns) and the sha256 of its first and
last MiB match what ``meta.json`` recorded; a change of any rebuilds it. This reads 2 MiB instead of
hashing ~11 GB on every load, and errs towards rebuilding (a touched or copied file rebuilds).
``fingerprint`` hashes the full bytes used (computed during the build, kept in ``meta.json``).

Integrity of the cache itself: ``meta.json`` records each array's size in bytes, modification time
and sha256. Every load checks the sizes and that every label is 0 or 1, and hashes in full any array
written since the build (its modification time changed): an untouched cache loads without reading
its ~14 GB again, an altered one is caught. A missing, truncated or altered array rebuilds the cache
with a ``UserWarning`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import re
import shutil
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import pandas as pd
import torch

from .dataset import (
    TEST,
    TRAIN,
    VALID,
    CTRDataset,
    DataFileError,
    Split,
    check_layout,
    file_sha256,
    fingerprint,
    split_assignment,
    split_sizes,
)

__all__ = ["FILE", "N_CAT", "N_INT", "load_criteo"]

log = logging.getLogger(__name__)

FILE = "train.txt"
URL = "https://ailab.criteo.com/ressources/ (Kaggle display advertising challenge, dac.tar.gz)"
N_INT, N_CAT = 13, 26
N_FIELDS = N_INT + N_CAT
N_COLS = 1 + N_FIELDS
COLUMNS = ["label", *(f"I{i}" for i in range(1, N_INT + 1)), *(f"C{i}" for i in range(1, N_CAT + 1))]

CACHE_VERSION = 2  # 2: meta.json records the arrays' sizes and sha256
ARRAYS = ("labels.npy", "dense.npy", "fields.npy")
BLOCK_BYTES = 32 << 20
MIB = 1 << 20
MISSING_INT = np.iinfo(np.int64).min  # key of an empty integer field
MISSING_CAT = -1  # key of an empty categorical field
MAX_DIGITS = 18  # longest decimal that surely fits int64
MAX_HEX = 8
_INT = re.compile(rb"-?[0-9]+")
_MERGE_MIN = 1 << 20
WORKERS = min(4, os.cpu_count() or 1)  # parsing threads; each holds one block's temporaries (~0.4 GB)

T = TypeVar("T")

_TAB, _NL, _MINUS = 9, 10, 45


# --- reading and parsing ---------------------------------------------------------------------------
#
# A block of whole lines is parsed without Python loops: the 40 field bounds of every line come from
# the tab/newline positions, and each field's first 8 bytes are fetched as one little-endian uint64
# (an unaligned view at every byte offset), then decoded with byte-parallel (SWAR) arithmetic.
# Integers longer than 8 characters (not found in the real file) take a per-field Python path.


def _line_chunks(f: BinaryIO) -> Iterator[bytes]:
    """Chunks of about BLOCK_BYTES holding whole lines (the very last line may lack its newline)."""
    tail = b""
    while chunk := f.read(BLOCK_BYTES):
        data = tail + chunk
        cut = data.rfind(b"\n") + 1
        if cut:
            yield data[:cut]
        tail = data[cut:]
    if tail:
        yield tail


def _blocks(path: Path, max_rows: int | None, digest: Any = None) -> Iterator[tuple[bytes, int]]:
    """``(whole lines ending in a newline, 1-based number of the first line)``, at most ``max_rows``
    lines in all; feeds the bytes used to ``digest`` (a hashlib object) if given."""
    first_line = 1
    with open(path, "rb") as f:
        for chunk in _line_chunks(f):
            n_lines = chunk.count(b"\n") + (not chunk.endswith(b"\n"))
            if max_rows is not None and first_line + n_lines > max_rows + 1:
                n_lines = max_rows + 1 - first_line
                newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == _NL)
                chunk = chunk[: newlines[n_lines - 1] + 1]
            if digest is not None:
                digest.update(chunk)
            yield (chunk if chunk.endswith(b"\n") else chunk + b"\n"), first_line
            first_line += n_lines
            if max_rows is not None and first_line > max_rows:
                return


@dataclass(frozen=True)
class _Rows:
    """One parsed block: labels, integer features (0 where missing) and categorical hash keys."""

    labels: np.ndarray  # uint8 [n]
    ints: np.ndarray  # int64 [n, 13]
    int_missing: np.ndarray  # bool [n, 13]
    cats: np.ndarray  # int64 [n, 26], MISSING_CAT where empty

    def keys(self) -> np.ndarray:
        """int64 [n, 39] value keys of the 39 categorical fields (integers discretised)."""
        bucket = np.floor(np.log(np.maximum(self.ints, 3).astype(np.float64)) ** 2).astype(np.int64)
        ints = np.where(self.ints > 2, bucket, self.ints - 2)
        ints[self.int_missing] = MISSING_INT
        return np.concatenate([ints, self.cats], axis=1)

    def dense(self) -> np.ndarray:
        """float32 [n, 13]: log(1 + max(v, 0)), missing -> 0."""
        return np.log1p(np.maximum(self.ints, 0)).astype(np.float32)


def _u64(value: int) -> np.uint64:
    """A uint64 scalar (keeps the word arithmetic in uint64)."""
    return np.uint64(value)


_LOW_NIBBLES = _u64(0x0F0F0F0F0F0F0F0F)


def _field_bounds(text: np.ndarray, first_line: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Start and end byte offsets [n, 40] of every field; each line must have exactly 40 columns."""
    delims = np.flatnonzero((text == _TAB) | (text == _NL))
    newlines = np.flatnonzero(text[delims] == _NL)
    n_cols = np.diff(newlines, prepend=-1)
    wrong = np.flatnonzero(n_cols != N_COLS)
    if wrong.size:
        row = int(wrong[0])
        raise DataFileError(
            path, first_line + row, f"expected {N_COLS} tab-separated columns, found {n_cols[row]}"
        )
    ends = delims.reshape(-1, N_COLS)
    starts = np.empty_like(ends)
    starts[0, 0] = 0
    starts[1:, 0] = ends[:-1, -1] + 1
    starts[:, 1:] = ends[:, :-1] + 1
    return starts, ends


def _all_bytes(mask: np.ndarray) -> np.ndarray:
    """[..., 8] bool -> [...]: all 8 true (read as one uint64)."""
    return np.ascontiguousarray(mask).view(np.uint64)[..., 0] == _u64(0x0101010101010101)


def _parse_hex(words: np.ndarray, start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-hex-digit hashes (or empty) -> (int64 keys, MISSING_CAT where empty; bool mask of bad fields)."""
    chars = words[start].view(np.uint8).reshape(*start.shape, 8)
    is_hex = ((chars - np.uint8(0x30)) < 10) | (((chars | np.uint8(0x20)) - np.uint8(0x61)) < 6)
    bad = (length != 0) & ((length != MAX_HEX) | ~_all_bytes(is_hex))
    nibbles = (chars & np.uint8(15)) + np.uint8(9) * (chars >> np.uint8(6))
    keys = ((nibbles[..., 0::2] << np.uint8(4)) | nibbles[..., 1::2]).view(">u4")[..., 0].astype(np.int64)
    keys[length == 0] = MISSING_CAT
    return keys, bad


def _parse_int(words: np.ndarray, start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decimal integers (optional leading '-') of up to 8 characters -> (int64 values, 0 where empty or
    longer; bool mask of bad fields). The field is shifted so its last digit is the top byte, the
    sign becomes a leading '0', and the digits are combined pairwise (SWAR)."""
    word = words[start]
    negative = ((word & _u64(0xFF)) == _u64(_MINUS)) & (length > 1)
    word = np.where(negative, (word & ~_u64(0xFF)) | _u64(ord("0")), word)
    shift = (8 * (8 - np.clip(length, 1, 8))).astype(np.uint64)
    aligned = word << shift
    real = (np.where(length == 0, _u64(0), ~_u64(0) << shift)).view(np.uint8).reshape(*start.shape, 8)
    chars = aligned.view(np.uint8).reshape(*start.shape, 8)
    bad = (length <= 8) & ~_all_bytes(((chars - np.uint8(0x30)) < 10) | (real == 0))
    v = aligned & _LOW_NIBBLES
    v = (v * _u64(10) + (v >> _u64(8))) & _u64(0x00FF00FF00FF00FF)
    v = (v * _u64(100) + (v >> _u64(16))) & _u64(0x0000FFFF0000FFFF)
    v = ((v * _u64(10000) + (v >> _u64(32))) & _u64(0xFFFFFFFF)).astype(np.int64)
    v[(length == 0) | (length > 8)] = 0
    return np.where(negative, -v, v), bad


def _parse_long_ints(
    text: np.ndarray, starts: np.ndarray, ends: np.ndarray, values: np.ndarray
) -> np.ndarray:
    """Fill in integers longer than 8 characters (rare) one by one; returns the mask of bad ones."""
    bad = np.zeros(values.shape, dtype=bool)
    for row, col in np.argwhere(ends - starts > 8):
        token = bytes(text[starts[row, col] : ends[row, col]])
        if len(token) <= MAX_DIGITS and _INT.fullmatch(token):
            values[row, col] = int(token)
        else:
            bad[row, col] = True
    return bad


def _parse(chunk: bytes, first_line: int, path: Path) -> _Rows:
    """Parse and validate a block of whole lines; errors name the file, line and column."""
    buf = np.frombuffer(chunk + bytes(8), dtype=np.uint8)  # 8 bytes of padding for the last word
    text = buf[:-8]
    words = np.ndarray((text.size,), dtype="<u8", buffer=buf, strides=(1,))  # 8 bytes from each offset
    starts, ends = _field_bounds(text, first_line, path)
    lengths = ends - starts
    labels = text[starts[:, 0]] - np.uint8(ord("0"))
    ints, bad_int = _parse_int(words, starts[:, 1 : 1 + N_INT], lengths[:, 1 : 1 + N_INT])
    bad_int |= _parse_long_ints(text, starts[:, 1 : 1 + N_INT], ends[:, 1 : 1 + N_INT], ints)
    cats, bad_cat = _parse_hex(words, starts[:, 1 + N_INT :], lengths[:, 1 + N_INT :])
    bad = np.concatenate([((lengths[:, 0] != 1) | (labels > 1))[:, None], bad_int, bad_cat], axis=1)
    if bad.any():
        row, col = divmod(int(np.argmax(bad)), N_COLS)
        reason = (
            "label must be 0 or 1" if col == 0 else "not an integer" if col <= N_INT else "not 8 hex digits"
        )
        token = bytes(text[starts[row, col] : ends[row, col]]).decode("utf-8", errors="replace")
        raise DataFileError(path, first_line + row, f"column {col + 1} ({COLUMNS[col]}): {reason}: {token!r}")
    return _Rows(labels, ints, lengths[:, 1 : 1 + N_INT] == 0, cats)


# --- vocabulary ------------------------------------------------------------------------------------


class _ValueCounts:
    """Streaming counts of int64 keys: sorted distinct keys and their counts.

    Per-block counts wait in a list and are merged once they outgrow the merged table, so the merge
    work stays O(N log N) and memory O(distinct keys).
    """

    def __init__(self) -> None:
        self.keys = np.empty(0, dtype=np.int64)
        self.counts = np.empty(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Add distinct ``keys`` (sorted) seen ``counts`` times."""
        self._pending.append((keys, counts))
        self._pending_size += keys.size
        if self._pending_size > max(self.keys.size, _MERGE_MIN):
            self._merge()

    def _merge(self) -> None:
        keys = np.concatenate([self.keys, *(k for k, _ in self._pending)])
        counts = np.concatenate([self.counts, *(c for _, c in self._pending)])
        self.keys, inverse = np.unique(keys, return_inverse=True)
        self.counts = np.bincount(inverse, weights=counts, minlength=self.keys.size).astype(np.int64)
        self._pending, self._pending_size = [], 0

    def frequent(self, min_count: int) -> np.ndarray:
        """Sorted keys seen at least ``min_count`` times."""
        self._merge()
        return self.keys[self.counts >= min_count]


def _encode(keys: np.ndarray, vocab: pd.Index) -> np.ndarray:
    """Index of each key in ``vocab`` (a hash lookup); keys not in it get ``len(vocab)`` (OOV)."""
    index = vocab.get_indexer(keys)
    return np.where(index < 0, len(vocab), index)


# --- cache -----------------------------------------------------------------------------------------


def _signature(path: Path) -> dict[str, Any]:
    """Cheap identity of the source: size, mtime (ns) and sha256 of its first and last MiB."""
    stat = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(MIB))
        if stat.st_size > MIB:
            f.seek(max(MIB, stat.st_size - MIB))
            h.update(f.read(MIB))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_tail_sha256": h.hexdigest()}


class _NpyWriter:
    """A ``.npy`` file of known shape filled by positioned writes of row blocks (no memory map, so the
    written pages stay in the page cache and out of the process's resident memory)."""

    def __init__(self, path: Path, dtype: type[np.generic], shape: tuple[int, ...]) -> None:
        created = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        self.offset, self.row_bytes = created.offset, created.strides[0]
        del created
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, row: int, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows).reshape(-1).view(np.uint8)
        os.pwrite(self.fd, data.data, self.offset + row * self.row_bytes)

    def close(self) -> None:
        os.close(self.fd)


def _in_parallel(fn: Callable[[bytes, int], T], blocks: Iterable[tuple[bytes, int]]) -> Iterator[T]:
    """``fn(*block)`` for each block on a thread pool (numpy releases the GIL), results in order;
    at most WORKERS + 1 blocks are in flight, which bounds memory."""
    with ThreadPoolExecutor(WORKERS) as pool:
        pending: deque[Future[T]] = deque()
        for block in blocks:
            pending.append(pool.submit(fn, *block))
            if len(pending) > WORKERS:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _count_block(path: Path, chunk: bytes, first_line: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Distinct keys and their counts, per field, of one block."""
    keys = _parse(chunk, first_line, path).keys()
    return [np.unique(keys[:, field], return_counts=True) for field in range(N_FIELDS)]


def _count(path: Path, max_rows: int | None) -> tuple[list[_ValueCounts], int, str]:
    """Pass 1: value counts per field, number of rows, sha256 of the bytes used."""
    digest = hashlib.sha256()
    counters = [_ValueCounts() for _ in range(N_FIELDS)]
    n_rows = 0
    for block_counts in _in_parallel(partial(_count_block, path), _blocks(path, max_rows, digest)):
        for counter, (keys, counts) in zip(counters, block_counts, strict=True):
            counter.add(keys, counts)
        n_rows += int(block_counts[0][1].sum())
    if n_rows == 0:
        raise DataFileError(path, 1, "file is empty")
    return counters, n_rows, digest.hexdigest()


def _encode_block(path: Path, vocabs: list[pd.Index], chunk: bytes, first_line: int) -> dict[str, np.ndarray]:
    """The cached arrays' rows of one block: labels, dense features, encoded fields."""
    rows = _parse(chunk, first_line, path)
    keys = rows.keys()
    return {
        "labels": rows.labels.astype(np.float32),
        "dense": rows.dense(),
        "fields": np.stack([_encode(keys[:, f], vocab) for f, vocab in enumerate(vocabs)], axis=1),
    }


def _write_encoded(
    path: Path, out: Path, vocabs: list[np.ndarray], n_rows: int, max_rows: int | None, seed: int
) -> None:
    """Pass 2: encode every block and append its rows to their split's region of the output arrays."""
    lookups = [pd.Index(vocab, copy=False) for vocab in vocabs]
    for lookup in lookups:  # build the hash tables here, not concurrently in the worker threads
        lookup.get_indexer(lookup[:1])
    assign = split_assignment(n_rows, seed)
    n_train, n_valid, _ = split_sizes(n_rows)
    cursor = {TRAIN: 0, VALID: n_train, TEST: n_train + n_valid}
    writers = {
        "labels": _NpyWriter(out / "labels.npy", np.float32, (n_rows,)),
        "dense": _NpyWriter(out / "dense.npy", np.float32, (n_rows, N_INT)),
        "fields": _NpyWriter(out / "fields.npy", np.int64, (n_rows, N_FIELDS)),
    }
    try:
        row0 = 0
        for arrays in _in_parallel(partial(_encode_block, path, lookups), _blocks(path, max_rows)):
            n = arrays["labels"].size
            if row0 + n > n_rows:
                break
            part = assign[row0 : row0 + n]
            for split in (TRAIN, VALID, TEST):
                picked = np.flatnonzero(part == split)
                for name, writer in writers.items():
                    writer.write(cursor[split], arrays[name][picked])
                cursor[split] += picked.size
            row0 += n
    finally:
        for writer in writers.values():
            writer.close()
    if row0 != n_rows:
        raise RuntimeError(f"{path} changed while being preprocessed ({n_rows} rows, then more or fewer)")


def _build(path: Path, final: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Preprocess ``path`` into the cache folder ``final`` (built aside, then renamed into place);
    returns its metadata."""
    log.info("criteo: preprocessing %s into %s", path, final)
    signature = _signature(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    try:
        counters, n_rows, source_sha256 = _count(path, params["max_rows"])
        vocabs = [c.frequent(params["min_threshold"]) for c in counters]
        del counters
        _write_encoded(path, tmp, vocabs, n_rows, params["max_rows"], params["seed"])
        if _signature(path) != signature:
            raise RuntimeError(f"{path} changed while being preprocessed")
        meta = {
            "source": signature,
            "source_sha256": source_sha256,
            "params": params,
            "n_rows": n_rows,
            "field_dims": [int(v.size) + 1 for v in vocabs],
            "arrays": {name: _array_record(tmp / name) for name in ARRAYS},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _array_record(path: Path) -> dict[str, Any]:
    """Size in bytes, modification time (ns) and sha256 of a cached array file (recorded at build)."""
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}


def _cache_damage(cache: Path, meta: dict[str, Any]) -> str | None:
    """Why the cached arrays cannot be trusted (naming the file), or None when they are intact."""
    records = meta.get("arrays")
    if not isinstance(records, dict) or set(records) != set(ARRAYS):
        return f"{cache / 'meta.json'} records no checksums of the arrays"
    for name in ARRAYS:
        file = cache / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != records[name].get("bytes"):
            return (
                f"{file} has {size} bytes, {records[name].get('bytes')} were written (truncated or altered)"
            )
        if file.stat().st_mtime_ns == records[name].get("mtime_ns"):
            continue  # not written since the build: trusted without reading it all
        if file_sha256(file) != records[name].get("sha256"):
            return f"{file} differs from the sha256 recorded when it was built"
    try:
        labels = np.load(cache / "labels.npy", mmap_mode="r")
    except ValueError as err:
        return f"{cache / 'labels.npy'} cannot be read: {err}"
    if labels.shape != (meta.get("n_rows"),) or not bool(((labels == 0) | (labels == 1)).all()):
        return f"{cache / 'labels.npy'} holds labels other than 0 and 1 or the wrong number of rows"
    return None


def _read_meta(cache: Path, path: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The cache's metadata if it was built from the current ``path`` with ``params`` and its arrays
    are intact, else None (a damaged cache also warns, naming the file)."""
    try:
        meta = json.loads((cache / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("params") != params or meta.get("source") != _signature(path):
        return None
    damage = _cache_damage(cache, meta)
    if damage is not None:
        warnings.warn(f"criteo cache: {damage}; rebuilding it from {path}", UserWarning, stacklevel=3)
        return None
    return meta


def _check_options(min_threshold: object, max_rows: object) -> None:
    """Refuse a ``min_threshold`` or ``max_rows`` that is not a whole number in range (bools too)."""

    def whole(value: object) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if not whole(min_threshold) or min_threshold < 1:  # type: ignore[operator]
        raise ValueError(f"min_threshold must be an integer >= 1, got {min_threshold!r}")
    if max_rows is not None and (not whole(max_rows) or max_rows < 1):  # type: ignore[operator]
        raise ValueError(f"max_rows must be an integer >= 1 or null, got {max_rows!r}")


def _tensor(path: Path) -> torch.Tensor:
    """A copy-on-write memory map of a ``.npy`` file as a tensor (writes stay private to the process)."""
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def load_criteo(
    data_dir: str | Path | None,
    *,
    seed: int,
    layout: str,
    min_threshold: int = 10,
    max_rows: int | None = None,
    cache_dir: str | Path | None = None,
) -> CTRDataset:
    """Criteo ``DIR/train.txt``; builds the cache on first use (see the module docstring).

    ``max_rows`` keeps the first N lines; ``cache_dir`` replaces ``DIR/.pytei-cache``.
    """
    check_layout("criteo", layout)
    expected = f"criteo expects DIR/{FILE} (from {URL})"
    if data_dir is None:
        raise ValueError(f"criteo needs data_dir: {expected}")
    path = Path(data_dir) / FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {expected}")
    _check_options(min_threshold, max_rows)
    params: dict[str, Any] = {
        "version": CACHE_VERSION,
        "file": FILE,
        "min_threshold": int(min_threshold),
        "max_rows": None if max_rows is None else int(max_rows),
        "seed": seed,
    }
    if cache_dir is not None:  # a shared folder may serve several files; DIR/.pytei-cache moves with DIR
        params["source"] = str(path.resolve())
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else Path(data_dir) / ".pytei-cache"
    cache = root / f"criteo-{key}"
    meta = _read_meta(cache, path, params)
    if meta is None:
        meta = _build(path, cache, params)
    else:
        log.info("criteo: cache hit %s", cache)
    return _dataset(cache, meta, layout, seed)


def _dataset(cache: Path, meta: dict[str, Any], layout: str, seed: int) -> CTRDataset:
    """Splits as zero-copy views of the cached arrays."""
    labels, fields = _tensor(cache / "labels.npy"), _tensor(cache / "fields.npy")
    inputs: tuple[torch.Tensor, ...]
    if layout == "categorical":
        inputs, field_dims, dense_dim = (fields,), meta["field_dims"], 0
    else:
        inputs, field_dims, dense_dim = (
            (_tensor(cache / "dense.npy"), fields[:, N_INT:]),
            meta["field_dims"][N_INT:],
            N_INT,
        )
    n_train, n_valid, _ = split_sizes(meta["n_rows"])
    bounds = [(0, n_train), (n_train, n_train + n_valid), (n_train + n_valid, meta["n_rows"])]
    train, valid, test = (Split(tuple(t[a:b] for t in inputs), labels[a:b]) for a, b in bounds)
    preprocessing = {k: meta["params"][k] for k in ("min_threshold", "max_rows")} | {"layout": layout}
    return CTRDataset(
        name="criteo",
        layout=layout,
        train=train,
        valid=valid,
        test=test,
        field_dims=list(field_dims),
        dense_dim=dense_dim,
        fingerprint=fingerprint("criteo", meta["source_sha256"], preprocessing),
        split_seed=seed,
    )
