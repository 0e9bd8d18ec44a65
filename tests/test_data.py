"""pytei.data: loaders on small files in the real formats, splits, the Criteo cache, synthetic-ctr."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import pytei.data as data
from pytei.data import criteo
from pytei.data.dataset import split_assignment, split_sizes
from pytei.data.synthetic import make_synthetic_ctr, write_criteo, write_movielens

MOVIELENS_FILES = {"100k": "u.data", "1m": "ratings.dat", "20m": "ratings.csv", "latest": "ratings.csv"}


def all_rows(ds: data.CTRDataset) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Inputs and labels of train + valid + test, concatenated."""
    splits = [ds.train, ds.valid, ds.test]
    inputs = [torch.cat([s.inputs[k] for s in splits]) for k in range(len(ds.train.inputs))]
    return inputs, torch.cat([s.labels for s in splits])


def file_order(n_rows: int, seed: int) -> np.ndarray:
    """Position, in train + valid + test, of each source row (splits keep source order)."""
    assign = split_assignment(n_rows, seed)
    return np.argsort(np.concatenate([np.flatnonzero(assign == k) for k in range(3)]), kind="stable")


# --- registry and arguments ------------------------------------------------------------------------


def test_names() -> None:
    assert data.names() == [
        "movielens-100k",
        "movielens-1m",
        "movielens-20m",
        "movielens-latest",
        "criteo",
        "synthetic-ctr",
    ]


@pytest.mark.parametrize(
    ("kwargs", "error", "fragments"),
    [
        ({"name": "movielens-2m"}, ValueError, ["'movielens-2m'", "movielens-1m", "criteo"]),
        (
            {"name": "synthetic-ctr", "layout": "sparse"},
            ValueError,
            ["'sparse'", "categorical", "dense+sparse"],
        ),
        ({"name": "synthetic-ctr", "n_row": 5}, ValueError, ["n_row", "n_rows", "data_seed"]),
        ({"name": "synthetic-ctr", "seed": -1}, ValueError, ["seed", "-1"]),
        ({"name": "movielens-1m"}, ValueError, ["data_dir", "DIR/ratings.dat"]),
        ({"name": "criteo"}, ValueError, ["data_dir", "DIR/train.txt"]),
        (
            {"name": "movielens-1m", "data_dir": "/tmp", "layout": "dense+sparse"},
            ValueError,
            ["'dense+sparse'"],
        ),
        ({"name": "synthetic-ctr", "dense_dim": 4}, ValueError, ["dense_dim=4"]),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], fragments: list[str]) -> None:
    with pytest.raises(error) as info:
        data.load(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(("name", "file"), [("movielens-1m", "ratings.dat"), ("criteo", "train.txt")])
def test_missing_file(tmp_path: Path, name: str, file: str) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / file}.*expects DIR/{file}"):
        data.load(name, tmp_path)


# --- MovieLens -------------------------------------------------------------------------------------

ML_ROWS = [(1, 10, 5.0), (1, 3, 3.0), (2, 10, 4.0), (7, 1, 1.0), (3, 4, 2.0), (2, 8, 3.0), (5, 2, 4.0)]
ML_ROWS += [(4, 6, 5.0), (6, 5, 3.0), (3, 9, 4.0)]
ML_CSV_ROWS = [(u, i, r + 0.5 if r == 3.0 else r) for u, i, r in ML_ROWS]  # 3.5 is a click, 3.0 is not


def write_ml_by_hand(directory: Path, variant: str) -> list[tuple[int, int, float]]:
    """The ten hand-written ratings in the variant's real format; returns them."""
    if variant == "1m":
        text = "".join(f"{u}::{i}::{int(r)}::97830076{k}\n" for k, (u, i, r) in enumerate(ML_ROWS))
        rows = ML_ROWS
    elif variant == "100k":
        text = "".join(f"{u}\t{i}\t{int(r)}\t88125094{k}\n" for k, (u, i, r) in enumerate(ML_ROWS))
        rows = ML_ROWS
    else:
        body = "".join(f"{u},{i},{r:.1f},111248602{k}\n" for k, (u, i, r) in enumerate(ML_CSV_ROWS))
        text, rows = "userId,movieId,rating,timestamp\n" + body, ML_CSV_ROWS
    (directory / MOVIELENS_FILES[variant]).write_text(text)
    return rows


@pytest.mark.parametrize("variant", ["100k", "1m", "20m", "latest"])
def test_movielens_hand_written(tmp_path: Path, variant: str) -> None:
    rows = write_ml_by_hand(tmp_path, variant)
    ds = data.load(f"movielens-{variant}", tmp_path, seed=3)
    assert (ds.name, ds.layout, ds.dense_dim, ds.split_seed) == (f"movielens-{variant}", "categorical", 0, 3)
    assert ds.field_dims == [8, 11]  # raw ids as indices: max id + 1
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (8, 1, 1)
    (x,), labels = all_rows(ds)
    assert x.dtype == torch.int64 and labels.dtype == torch.float32
    order = file_order(len(rows), 3)
    assert x[order].tolist() == [[u, i] for u, i, _ in rows]
    assert labels[order].tolist() == [1.0 if r > 3 else 0.0 for _, _, r in rows]


@pytest.mark.parametrize("variant", ["100k", "1m", "20m", "latest"])
def test_movielens_round_trip(tmp_path: Path, variant: str) -> None:
    path = write_movielens(tmp_path, variant, n_users=40, n_items=60, n_ratings=700, seed=1)
    assert path.name == MOVIELENS_FILES[variant]
    sep = {"100k": "\t", "1m": "::"}.get(variant, ",")
    header = 0 if variant in ("20m", "latest") else None
    raw = pd.read_csv(path, sep=sep, header=header, engine="python").to_numpy()
    ds = data.load(f"movielens-{variant}", tmp_path)
    (x,), labels = all_rows(ds)
    assert ds.field_dims == [int(raw[:, 0].max()) + 1, int(raw[:, 1].max()) + 1]
    assert x.shape == (700, 2) and int(x.min()) >= 1
    assert labels.sum().item() == (raw[:, 2] > 3).sum()
    if variant in ("20m", "latest"):
        assert set(raw[:, 2]) <= {k / 2 for k in range(1, 11)} and any(r % 1 for r in raw[:, 2])


def test_movielens_fingerprint_follows_the_file(tmp_path: Path) -> None:
    write_movielens(tmp_path, "1m", seed=0)
    a, b = data.load("movielens-1m", tmp_path), data.load("movielens-1m", tmp_path, seed=1)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    write_movielens(tmp_path, "1m", seed=1)
    assert data.load("movielens-1m", tmp_path).fingerprint != a.fingerprint


@pytest.mark.parametrize(
    ("variant", "text", "line", "fragment"),
    [
        ("1m", "", 1, "empty"),
        ("1m", "1::2::5::9\n2::3::4::9\n3::4::5\n", 3, "expected 4 columns"),
        ("1m", "1::2::5::9\nx::3::4::9\n", 2, "user id"),
        ("1m", "1::2::5::9\n2::-3::4::9\n", 2, "item id"),
        ("1m", "1::2::5::9\n2::3.5::4::9\n", 2, "item id"),
        ("100k", "1\t2\t5\t9\n\n2\t3\t4\t9\n", 2, "expected 4 columns"),
        ("100k", "1\t2\t5\t9\n2\t3\t4\t9\t7\n", 2, "expected 4 columns"),
        ("20m", "user,movie,rating,timestamp\n1,2,3.5,9\n", 1, "header"),
        ("20m", "userId,movieId,rating,timestamp\n", 2, "no ratings"),
        ("20m", "userId,movieId,rating,timestamp\n1,2,3.5,9\n1,3,,9\n", 3, "rating"),
        ("latest", "userId,movieId,rating,timestamp\n1,2,3.5,9\n1,3,good,9\n", 3, "rating"),
        ("latest", "userId,movieId,rating,timestamp\n1,2,3.5,9\n1,3,4.0,soon\n", 3, "timestamp"),
    ],
)
def test_movielens_malformed(tmp_path: Path, variant: str, text: str, line: int, fragment: str) -> None:
    path = tmp_path / MOVIELENS_FILES[variant]
    path.write_text(text)
    with pytest.raises(data.DataFileError) as info:
        data.load(f"movielens-{variant}", tmp_path)
    message = str(info.value)
    assert str(path) in message and f"line {line}:" in message and fragment in message
    assert isinstance(info.value, ValueError) and info.value.line == line


# --- splits ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_rows", [1, 9, 10, 1001])
def test_split_assignment(n_rows: int) -> None:
    assign = split_assignment(n_rows, seed=5)
    sizes = split_sizes(n_rows)
    assert sum(sizes) == n_rows and sizes[0] == n_rows * 8 // 10 and sizes[1] == n_rows // 10
    assert [int((assign == k).sum()) for k in range(3)] == list(sizes)
    assert np.array_equal(assign, split_assignment(n_rows, seed=5))
    if n_rows > 100:
        assert not np.array_equal(assign, split_assignment(n_rows, seed=6))


def test_splits_are_reproducible_disjoint_and_complete(tmp_path: Path) -> None:
    rows = [f"{u}::{u * 3 + 1}::{1 + u % 5}::9" for u in range(1, 101)]  # 100 distinct (user, item) rows
    (tmp_path / "ratings.dat").write_text("\n".join(rows) + "\n")

    def row_sets(ds: data.CTRDataset) -> list[set[tuple[int, ...]]]:
        return [{tuple(r) for r in s.inputs[0].tolist()} for s in (ds.train, ds.valid, ds.test)]

    a, b, c = (data.load("movielens-1m", tmp_path, seed=s) for s in (0, 0, 1))
    assert [len(s) for s in row_sets(a)] == [80, 10, 10]
    assert row_sets(a) == row_sets(b) and torch.equal(a.train.inputs[0], b.train.inputs[0])
    assert row_sets(a) != row_sets(c)
    train, valid, test = row_sets(a)
    assert not (train & valid or train & test or valid & test)
    assert len(train | valid | test) == 100
    assert all(torch.equal(s.inputs[0][:, 1], s.inputs[0][:, 0] * 3 + 1) for s in (a.train, a.valid, a.test))


def test_batches() -> None:
    ds = data.load("synthetic-ctr", n_rows=1000, field_dims=[7, 5])
    assert list(ds.splits) == ["train", "valid", "test"] and ds.splits["valid"] is ds.valid
    split = ds.train
    batches = list(split.batches(300))
    assert [len(labels) for _, labels in batches] == [300, 300, 200]
    assert torch.equal(torch.cat([x for (x,), _ in batches]), split.inputs[0])
    one = [lab for _, lab in split.batches(64, shuffle=True, generator=torch.Generator().manual_seed(1))]
    two = [lab for _, lab in split.batches(64, shuffle=True, generator=torch.Generator().manual_seed(1))]
    assert all(torch.equal(p, q) for p, q in zip(one, two, strict=True))
    shuffled = list(split.batches(64, shuffle=True, generator=torch.Generator().manual_seed(1)))
    rows = torch.cat([torch.cat([x, lab[:, None].long()], 1) for (x,), lab in shuffled])
    rows_sorted = sorted(map(tuple, rows.tolist()))
    original = sorted(map(tuple, torch.cat([split.inputs[0], split.labels[:, None].long()], 1).tolist()))
    assert rows_sorted == original and not torch.equal(rows[:, :2], split.inputs[0])
    with pytest.raises(ValueError, match="batch_size"):
        next(split.batches(0))


def test_split_checks_alignment() -> None:
    with pytest.raises(ValueError, match="row-aligned"):
        data.Split((torch.zeros(3, 2, dtype=torch.int64),), torch.zeros(4))
    with pytest.raises(ValueError, match="float32"):
        data.Split((torch.zeros(3, 2, dtype=torch.int64),), torch.zeros(3, dtype=torch.int64))


# --- Criteo ----------------------------------------------------------------------------------------


def criteo_line(label: str = "0", i1: str = "1", c1: str = "0000000a", i2: str = "5") -> str:
    """A train.txt line; I1, I2 and C1 given, the other columns constant."""
    return "\t".join([label, i1, i2, *["7"] * 11, c1, *["1f2e3d4c"] * 25])


#: (label, I1, C1) of the hand-written file, with I1's discretisation key (pytorch-fm) for reference.
CRITEO_ROWS = [
    ("1", "", "", "missing"),
    ("0", "1", "0000000a", "v-2=-1"),
    ("0", "3", "000000FF", "ln(3)^2=1.2 -> 1"),
    ("1", "4", "0000000a", "ln(4)^2=1.9 -> 1"),
    ("0", "20", "abcdef01", "ln(20)^2=8.97 -> 8"),
    ("0", "-1", "000000ff", "v-2=-3"),
    ("1", "2", "", "v-2=0"),
    ("0", "0", "0000000a", "v-2=-2"),
    ("0", "", "abcdef01", "missing"),
    ("1", "1000", "0000000a", "ln(1000)^2=47.7 -> 47"),
]


def write_criteo_by_hand(directory: Path) -> Path:
    path = directory / "train.txt"
    path.write_text("".join(criteo_line(lab, i1, c1) + "\n" for lab, i1, c1, _ in CRITEO_ROWS))
    return path


def test_criteo_discretisation_and_vocabulary(tmp_path: Path) -> None:
    write_criteo_by_hand(tmp_path)
    ds = data.load("criteo", tmp_path, seed=2, min_threshold=1)
    (x,), labels = all_rows(ds)
    x, labels = x[file_order(10, 2)], labels[file_order(10, 2)]
    assert labels.tolist() == [float(r[0]) for r in CRITEO_ROWS]
    # I1 keys, ascending: missing, -3 (v=-1), -2 (v=0), -1 (v=1), 0 (v=2), 1 (v=3, 4), 8 (v=20), 47 (v=1000)
    assert x[:, 0].tolist() == [0, 3, 5, 5, 6, 1, 4, 2, 0, 7]
    # C1 keys, ascending: missing, 0xa, 0xff (case-insensitive), 0xabcdef01
    assert x[:, 13].tolist() == [0, 1, 2, 1, 3, 2, 0, 1, 3, 1]
    assert ds.field_dims[0] == 8 + 1 and ds.field_dims[13] == 4 + 1  # kept values + OOV
    assert ds.field_dims[1:13] == [2] * 12 and ds.field_dims[14:] == [2] * 25  # one constant value + OOV
    assert x[:, 1].unique().tolist() == [0] and len(ds.field_dims) == 39 and ds.dense_dim == 0


def test_criteo_min_threshold_shares_one_oov_index(tmp_path: Path) -> None:
    write_criteo_by_hand(tmp_path)
    ds = data.load("criteo", tmp_path, seed=2, min_threshold=2)
    (x,), _ = all_rows(ds)
    x = x[file_order(10, 2)]
    # I1 values seen twice or more: missing (2) and the bucket of v = 3, 4 (2); the rest -> OOV = 2
    assert ds.field_dims[0] == 3 and x[:, 0].tolist() == [0, 2, 1, 1, 2, 2, 2, 2, 0, 2]
    # C1: missing (2), 0xa (4), 0xff (2), 0xabcdef01 (2) all kept
    assert ds.field_dims[13] == 5
    ds = data.load("criteo", tmp_path, seed=2, min_threshold=4)
    (x,), _ = all_rows(ds)
    assert ds.field_dims[0] == 1 and x[:, 0].unique().tolist() == [0]  # nothing kept: all OOV
    assert ds.field_dims[13] == 2 and x[file_order(10, 2), 13].tolist() == [1, 0, 1, 0, 1, 1, 1, 0, 1, 0]


def test_criteo_dense_sparse_layout(tmp_path: Path) -> None:
    write_criteo_by_hand(tmp_path)
    cat = data.load("criteo", tmp_path, seed=2, min_threshold=1)
    ds = data.load("criteo", tmp_path, seed=2, min_threshold=1, layout="dense+sparse")
    assert ds.layout == "dense+sparse" and ds.dense_dim == 13 and ds.field_dims == cat.field_dims[13:]
    (dense, sparse), _ = all_rows(ds)
    assert dense.dtype == torch.float32 and dense.shape == (10, 13) and sparse.shape == (10, 26)
    assert torch.equal(sparse, all_rows(cat)[0][0][:, 13:])
    dense = dense[file_order(10, 2)]
    expected = [math.log1p(max(int(i1), 0)) if i1 else 0.0 for _, i1, _, _ in CRITEO_ROWS]
    assert dense[:, 0].tolist() == pytest.approx(expected, rel=1e-6)
    assert dense[:, 1].tolist() == pytest.approx([math.log(6)] * 10) and ds.fingerprint != cat.fingerprint


def test_criteo_round_trip(tmp_path: Path) -> None:
    path = write_criteo(tmp_path / "train.txt", 3000, seed=4)
    raw = pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False)
    assert raw.shape == (3000, 40) and (raw.iloc[:, 1:14] == "").to_numpy().mean() > 0.1
    assert raw.iloc[:, 14:].apply(lambda c: c.str.fullmatch("[0-9a-f]{8}|")).to_numpy().all()
    ds = data.load("criteo", tmp_path, seed=0)
    (x,), labels = all_rows(ds)
    assert x.shape == (3000, 39) and labels.sum().item() == raw[0].astype(int).sum()
    assert 0.1 < labels.mean().item() < 0.4
    assert bool((x >= 0).all()) and bool((x < torch.tensor(ds.field_dims)).all())
    n_train, n_valid, n_test = split_sizes(3000)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (n_train, n_valid, n_test)
    # the splits are views of one memory-mapped array: no copies
    storage = ds.train.inputs[0].untyped_storage().data_ptr()
    assert ds.test.inputs[0].untyped_storage().data_ptr() == storage


def test_criteo_max_rows(tmp_path: Path) -> None:
    write_criteo(tmp_path / "train.txt", 500, seed=4)
    full = data.load("criteo", tmp_path, min_threshold=1)
    part = data.load("criteo", tmp_path, min_threshold=1, max_rows=120)
    assert sum(len(s) for s in (part.train, part.valid, part.test)) == 120
    assert part.fingerprint != full.fingerprint
    assert all(p <= f for p, f in zip(part.field_dims, full.field_dims, strict=True))


def test_criteo_cache_hit_and_invalidation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_criteo(tmp_path / "train.txt", 400, seed=1)
    caplog.set_level(logging.INFO, logger="pytei.data.criteo")
    first = data.load("criteo", tmp_path)
    assert "preprocessing" in caplog.text
    caches = list((tmp_path / ".pytei-cache").iterdir())
    assert len(caches) == 1 and (caches[0] / "meta.json").is_file()

    real_parse = criteo._parse

    def no_text(*args: object) -> None:
        raise AssertionError("the text file was parsed again")

    monkeypatch.setattr(criteo, "_parse", no_text)
    second = data.load("criteo", tmp_path)  # a cache hit never parses the text
    assert "cache hit" in caplog.text and second.fingerprint == first.fingerprint
    assert torch.equal(second.train.inputs[0], first.train.inputs[0])

    with open(path, "a") as f:  # the source changes: the cache is rebuilt in place
        f.write(criteo_line() + "\n")
    with pytest.raises(AssertionError, match="parsed again"):
        data.load("criteo", tmp_path)
    monkeypatch.setattr(criteo, "_parse", real_parse)
    third = data.load("criteo", tmp_path)
    assert sum(len(s) for s in (third.train, third.valid, third.test)) == 401
    assert third.fingerprint != first.fingerprint
    assert list((tmp_path / ".pytei-cache").iterdir()) == caches  # rebuilt in place, nothing left over

    data.load("criteo", tmp_path, seed=1)  # other preprocessing or split: a cache of its own
    assert len(list((tmp_path / ".pytei-cache").iterdir())) == 2


def test_criteo_cache_dir_option(tmp_path: Path) -> None:
    write_criteo(tmp_path / "data" / "train.txt", 200, seed=1)
    ds = data.load("criteo", tmp_path / "data", cache_dir=tmp_path / "cache", min_threshold=1)
    assert (
        len(list((tmp_path / "cache").iterdir())) == 1 and not (tmp_path / "data" / ".pytei-cache").exists()
    )
    assert len(ds.train) == 160


@pytest.mark.parametrize(
    ("line", "number", "fragment"),
    [
        ("\t".join(criteo_line().split("\t")[:39]), 3, "expected 40 tab-separated columns, found 39"),
        (criteo_line() + "\t", 3, "found 41"),
        ("", 3, "found 1"),
        (criteo_line(label="2"), 3, "label must be 0 or 1"),
        (criteo_line(label=""), 3, "label must be 0 or 1"),
        (criteo_line(i1="12a"), 3, "column 2 (I1): not an integer: '12a'"),
        (criteo_line(i2="-"), 3, "column 3 (I2): not an integer"),
        (criteo_line(i1="1234567890123456789012"), 3, "column 2 (I1): not an integer"),
        (criteo_line(c1="0000000g"), 3, "column 15 (C1): not 8 hex digits: '0000000g'"),
        (criteo_line(c1="abc"), 3, "column 15 (C1): not 8 hex digits"),
    ],
)
def test_criteo_malformed(tmp_path: Path, line: str, number: int, fragment: str) -> None:
    path = tmp_path / "train.txt"
    path.write_text(f"{criteo_line()}\n{criteo_line(i1='-3')}\n{line}\n{criteo_line()}\n")
    with pytest.raises(data.DataFileError) as info:
        data.load("criteo", tmp_path)
    assert (
        str(path) in str(info.value) and f"line {number}:" in str(info.value) and fragment in str(info.value)
    )
    assert not any((tmp_path / ".pytei-cache").iterdir())  # a failed build leaves nothing behind


def test_criteo_empty_file_and_long_integers(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("")
    with pytest.raises(data.DataFileError, match=r"train.txt: line 1: file is empty"):
        data.load("criteo", tmp_path)
    # integers of 9+ digits take the slow path; a last line without newline is accepted
    (tmp_path / "train.txt").write_text(criteo_line(i1="123456789012", i2="-98765432") + "\n" + criteo_line())
    ds = data.load("criteo", tmp_path, min_threshold=1, layout="dense+sparse")
    (dense, _), _ = all_rows(ds)
    assert sorted(dense[:, 0].tolist()) == pytest.approx([math.log(2), math.log1p(123456789012)])
    assert sorted(dense[:, 1].tolist()) == pytest.approx([0.0, math.log(6)])


def test_criteo_parse_matches_python_reference(tmp_path: Path) -> None:
    path = write_criteo(tmp_path / "train.txt", 2000, seed=9)
    chunk, first_line = next(criteo._blocks(path, None))
    rows = criteo._parse(chunk, first_line, path)
    keys = rows.keys()
    for r, line in enumerate(chunk.decode().splitlines()):
        fields = line.split("\t")
        assert rows.labels[r] == int(fields[0])
        for j, text in enumerate(fields[1:14]):
            v = int(text) if text else None
            expected = criteo.MISSING_INT if v is None else int(math.log(v) ** 2) if v > 2 else v - 2
            assert keys[r, j] == expected
        assert keys[r, 13:].tolist() == [int(t, 16) if t else -1 for t in fields[14:]]


# --- synthetic-ctr ---------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_calibrated() -> None:
    a = data.load("synthetic-ctr", n_rows=20_000)
    b = data.load("synthetic-ctr", n_rows=20_000)
    c = data.load("synthetic-ctr", n_rows=20_000, data_seed=1)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert torch.equal(a.train.inputs[0], b.train.inputs[0]) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.inputs[0], c.train.inputs[0])
    (x,), labels = all_rows(a)
    assert a.field_dims == [1000, 500, 200, 100, 50, 20, 10, 5] and x.shape == (20_000, 8)
    assert bool((x >= 0).all()) and bool((x < torch.tensor(a.field_dims)).all())
    assert 0.2 < labels.mean().item() < 0.3
    top_share = torch.bincount(x[:, 0]).max().item() / 20_000
    assert top_share > 20 / 1000  # Zipf-skewed: the most popular value is far above uniform


def test_synthetic_bayes_auc_and_learnability() -> None:
    d = make_synthetic_ctr(40_000, data_seed=0)
    assert 0.77 < roc_auc_score(d.labels, d.click_prob) < 0.85
    # logistic regression on one-hot features (one weight per value), full-batch Adam
    ds = data.load("synthetic-ctr", n_rows=40_000)
    offsets = torch.tensor(np.r_[0, np.cumsum(ds.field_dims)[:-1]])
    weights = torch.zeros(sum(ds.field_dims), requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([weights, bias], lr=0.05)
    (x,), y = ds.train.inputs, ds.train.labels
    for _ in range(150):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(weights[x + offsets].sum(1) + bias, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = weights[ds.test.inputs[0] + offsets].sum(1) + bias
    assert roc_auc_score(ds.test.labels.numpy(), scores.numpy()) > 0.68


def test_synthetic_dense_sparse() -> None:
    ds = data.load("synthetic-ctr", n_rows=5000, layout="dense+sparse", field_dims=[30, 20], seed=4)
    dense, sparse = ds.train.inputs
    assert ds.dense_dim == 13 and dense.shape == (4000, 13) and dense.dtype == torch.float32
    assert sparse.dtype == torch.int64 and ds.field_dims == [30, 20] and ds.split_seed == 4
    assert bool((dense >= 0).all()) and dense.std().item() > 0.1
    seven = data.load("synthetic-ctr", n_rows=5000, layout="dense+sparse", field_dims=[30, 20], dense_dim=7)
    assert seven.train.inputs[0].shape == (4000, 7) and seven.fingerprint != ds.fingerprint


def test_writers_reject_unknown_variant(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'10m'.*100k, 1m, 20m, latest"):
        write_movielens(tmp_path, "10m")
    assert os.listdir(tmp_path) == []
