"""Results store and tables: schema, no duplicates, spec binding, non-finite round trip,
concurrent writers, a writer killed mid-campaign, and the pandas summaries checked against scipy."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pytei import results
from pytei import stats as pytei_stats
from pytei.campaign.store import (
    COLUMNS,
    SESSION_GAP_S,
    V1_METRICS,
    DuplicateTrial,
    SpecMismatch,
    Store,
    StoreError,
    TrialRow,
)

# Forked writers start in milliseconds (a spawned one would re-import torch through pytei); they
# open their own connection after the fork and touch no torch state, so the fork is safe.
HAS_FORK = "fork" in multiprocessing.get_all_start_methods()
needs_fork = pytest.mark.skipif(not HAS_FORK, reason="needs the fork start method (POSIX)")
MP = multiprocessing.get_context("fork" if HAS_FORK else None)


#: The metric keys make_row takes as keywords (stored in ``TrialRow.metrics``).
METRIC_KEYS = V1_METRICS


def make_row(i: int, **values) -> TrialRow:
    """A complete, deterministic trial row numbered ``i``; metric keywords go into ``metrics``
    (a metric given as None is left out: not computed)."""
    row = dict(
        trial_id=f"t{i:05d}",
        model="dlrm",
        model_label="DLRM",
        architecture="dlrm",
        dataset="criteo",
        target="mlp",
        params="weight",
        site="weights",
        error_model="BitFlip",
        rate=1e-6,
        bits=[30, 31],
        run=i,
        seed=1000 + i,
        mitigation="none",
        status="ok",
        n_faults=i % 7,
        n_invalid=0,
        n_outputs=4096,
        auc=0.8 - i * 1e-4,
        auc_valid=0.8,
        invalid_frac=0.0,
        logloss=0.45,
        rmse=0.01 * i,
        rmse_valid=0.01 * i,
        baseline_auc=0.8,
        baseline_rmse=0.0,
        extra={"path": "subgraph", "i": i},
        started=1_000.0 + i,
        finished=1_000.5 + i,
        duration_s=0.5,
        worker="host:1",
    )
    merged = {**row, **values}
    metrics = {k: merged.pop(k) for k in METRIC_KEYS if k in merged}
    merged["metrics"] = {k: v for k, v in {**metrics, **merged.get("metrics", {})}.items() if v is not None}
    return TrialRow(**merged)


def expected(i: int, **values) -> dict:
    """What :meth:`Store.rows` gives back for ``make_row(i, **values)``."""
    row = make_row(i, **values)
    out = {c: getattr(row, c) for c in COLUMNS}
    return {**out, "bits": json.dumps(out["bits"]), "extra": json.dumps(out["extra"])}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "results.db"


# --- schema and spec --------------------------------------------------------------------------


def test_schema_is_created_with_wal(db: Path) -> None:
    with Store(db) as store:
        assert store.spec() is None
        assert store.rows() == []
    con = sqlite3.connect(db)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"meta", "campaign", "trials"} <= tables
    assert {"meta", "campaign", "trials", "metrics"} <= tables
    assert dict(con.execute("SELECT key, value FROM meta"))["schema_version"] == "2"
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    indexed = [r[2] for r in con.execute("PRAGMA index_info(trials_point)")]
    assert indexed == ["model", "target", "site", "mitigation", "rate"]
    stored = [r[1] for r in con.execute("PRAGMA table_info(trials)")]
    assert stored == [c for c in COLUMNS if c != "metrics"]  # metrics live in their own table
    metric_columns = [r[1] for r in con.execute("PRAGMA table_info(metrics)")]
    assert metric_columns == ["trial_id", "name", "value", "special"]
    con.close()


def test_reopen_keeps_data(db: Path) -> None:
    with Store(db) as store:
        store.record(make_row(1))
    with Store(db) as store:
        assert store.rows() == [expected(1)]


def test_spec_attach_reattach_and_mismatch(db: Path) -> None:
    with Store(db) as store:
        store.attach_spec("name = 'a'", "a" * 64, "camp-a", 10, base_dir="/specs")
        created = store.spec()["created"]
        store.attach_spec("name = 'a'", "a" * 64, "camp-a", 12)  # a resume: fine, plan size updated
        assert store.spec() == {
            "name": "camp-a",
            "hash": "a" * 64,
            "text": "name = 'a'",
            "created": created,
            "n_planned": 12,
            "base_dir": "/specs",
        }
        with pytest.raises(SpecMismatch) as err:
            store.attach_spec("name = 'b'", "b" * 64, "camp-b", 5)
        assert isinstance(err.value, ValueError)
        message = str(err.value)
        assert "results.db belongs to campaign 'camp-a' (spec aaaaaaaaaaaa)" in message
        assert "not to this spec (bbbbbbbbbbbb); use another --db or the original spec" in message
        assert store.spec()["hash"] == "a" * 64


def test_not_a_pytei_database(tmp_path: Path) -> None:
    foreign = tmp_path / "other.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    other_meta = tmp_path / "other_meta.db"
    con = sqlite3.connect(other_meta)
    con.execute("CREATE TABLE meta (name, size)")
    con.commit()
    con.close()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    for path in (foreign, other_meta, garbage):
        with pytest.raises(ValueError, match="not a pytei results database"):
            Store(path)
        with pytest.raises(ValueError, match="not a pytei results database"):
            results.load(path)
    con = sqlite3.connect(foreign)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # left as it was
    con.close()
    with pytest.raises(FileNotFoundError, match="no results database"):
        results.load(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()


# --- trials -----------------------------------------------------------------------------------


def test_record_and_done_ids(db: Path) -> None:
    with Store(db) as store:
        store.record(make_row(1))
        store.record(make_row(2, status="failed", error_message="RuntimeError: boom", auc=None, extra=None))
        store.record_many([make_row(3), make_row(4)])
        assert store.done_ids() == {"t00001", "t00002", "t00003", "t00004"}
        got = store.rows()
    assert got[0] == expected(1)
    assert got[1]["status"] == "failed" and got[1]["error_message"] == "RuntimeError: boom"
    assert "auc" not in got[1]["metrics"] and got[1]["extra"] is None
    assert [r["trial_id"] for r in got] == ["t00001", "t00002", "t00003", "t00004"]


def test_duplicate_id_is_refused_and_batches_are_all_or_nothing(db: Path) -> None:
    with Store(db) as store:
        store.record(make_row(1))
        with pytest.raises(DuplicateTrial, match="t00001"):
            store.record(make_row(1, auc=0.1))
        with pytest.raises(DuplicateTrial, match="t00001"):
            store.record_many([make_row(2), make_row(1)])
        with pytest.raises(DuplicateTrial, match="t00003"):
            store.record_many([make_row(3), make_row(3)])
        assert store.rows() == [expected(1)]  # neither overwritten nor partially inserted
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            store.record(make_row(5, status="running"))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, None, 0.25, 0.0])
def test_nonfinite_metrics_round_trip(db: Path, value: float | None) -> None:
    metrics = ("auc", "auc_valid", "invalid_frac", "logloss", "rmse", "rmse_valid", "baseline_auc")
    with Store(db) as store:
        store.record(make_row(1, **dict.fromkeys(metrics, value)))
    with Store(db) as store:
        got = store.rows()[0]
    for m in metrics:
        if value is None:
            assert m not in got["metrics"], m  # not computed: no row
        elif math.isnan(value):
            assert math.isnan(got["metrics"][m]), m
        else:
            assert got["metrics"][m] == value and type(got["metrics"][m]) is float, m
    con = sqlite3.connect(db)
    stored = con.execute("SELECT value, special FROM metrics WHERE name = 'rmse'").fetchall()
    con.close()
    if value is None:
        assert stored == []
    else:
        finite = math.isfinite(value)
        assert stored == [(value if finite else None, None if finite else repr(value))]  # REAL: finite only


def test_numpy_values_are_stored_as_python_values(db: Path) -> None:
    row = make_row(
        1,
        rate=np.float32(1e-3),
        n_faults=np.int64(3),
        rmse=np.float32(np.inf),
        extra={"max": np.float32(2.5), "ids": np.arange(3)},
    )
    with Store(db) as store:
        store.record(row)
        got = store.rows()[0]
    assert got["rate"] == pytest.approx(1e-3) and got["n_faults"] == 3 and got["metrics"]["rmse"] == math.inf
    assert json.loads(got["extra"]) == {"max": 2.5, "ids": [0, 1, 2]}


def test_counts_and_timing(db: Path) -> None:
    with Store(db) as store:
        assert store.counts() == {"ok": 0, "failed": 0, "planned": None, "remaining": None}
        assert store.timing() == {
            "first_started": None,
            "last_finished": None,
            "trials_per_s": None,
            "eta_s": None,
        }
        store.attach_spec("s", "h" * 64, "c", 20)
        # session 1: 4 trials in 10 s; then a long pause; session 2: 2 trials in 5 s.
        pause = 2 * SESSION_GAP_S
        spans = [(0, 2), (2, 5), (4, 8), (8, 10), (10 + pause, 12 + pause), (13 + pause, 15 + pause)]
        for i, (s, f) in enumerate(spans):
            status = "failed" if i == 1 else "ok"
            store.record(make_row(i, started=1e9 + s, finished=1e9 + f, duration_s=f - s, status=status))
        assert store.counts() == {"ok": 5, "failed": 1, "planned": 20, "remaining": 14}
        timing = store.timing()
    assert timing["first_started"] == 1e9
    assert timing["last_finished"] == 1e9 + 15 + pause
    assert timing["trials_per_s"] == pytest.approx(6 / 15)
    assert timing["eta_s"] == pytest.approx(14 / (6 / 15))


# --- several processes ------------------------------------------------------------------------


def _write_trials(db: str, first: int, count: int, start) -> None:
    with Store(db) as store:
        store.attach_spec("s", "h" * 64, "c", 100)
        start.wait()  # both writers begin together, so their commits contend
        for i in range(first, first + count):
            store.record(make_row(i, worker=f"host:{os.getpid()}"))


@needs_fork
def test_two_processes_writing_concurrently_lose_nothing(db: Path) -> None:
    with Store(db) as store:
        store.attach_spec("s", "h" * 64, "c", 100)
    start = MP.Barrier(2)
    procs = [MP.Process(target=_write_trials, args=(str(db), first, 50, start)) for first in (0, 50)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with Store(db) as store:
        assert store.done_ids() == {f"t{i:05d}" for i in range(100)}
        assert store.counts() == {"ok": 100, "failed": 0, "planned": 100, "remaining": 0}
        workers = [r["worker"] for r in store.rows()]
    assert len(set(workers)) == 2


def _write_forever(db: str, committed) -> None:
    """Record large trials as fast as possible, counting those whose commit has returned."""
    with Store(db) as store:
        for i in range(10**9):
            store.record(make_row(i, extra={"blob": "x" * 20_000, "i": i}))
            committed.value = i + 1


@needs_fork
def test_writer_killed_with_sigkill_leaves_whole_trials(db: Path) -> None:
    Store(db).close()
    committed = MP.Value("q", 0)
    proc = MP.Process(target=_write_forever, args=(str(db), committed))
    proc.start()
    deadline = time.monotonic() + 30
    while committed.value < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
    reported = committed.value
    assert reported >= 200

    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    with Store(db) as store:
        got = store.rows()
    # every commit that returned survived; at most one more committed before the counter moved
    assert reported <= len(got) <= reported + 1
    for i, row in enumerate(got):  # each a complete row, identical to what was written
        assert row == expected(i, extra={"blob": "x" * 20_000, "i": i})


# --- pandas tables ----------------------------------------------------------------------------


def test_load_dtypes(db: Path) -> None:
    with Store(db) as store:
        store.record(make_row(1, rmse=math.inf, auc=math.nan))
        store.record(
            make_row(2, status="failed", error_message="boom", n_faults=None, auc=None, rmse=None, bits=None)
        )
    df = results.load(db)
    fields = [c for c in COLUMNS if c != "metrics"]
    assert list(df.columns) == [*fields, *METRIC_KEYS, *results.CONFIG_COLUMNS] and len(df) == 2
    for c in ("rate", "auc", "rmse", "logloss", "baseline_auc", "started", "duration_s"):
        assert df[c].dtype == "float64", c
    for c in ("run", "seed"):
        assert df[c].dtype == "int64", c
    assert df["n_faults"].dtype == "Int64" and df["n_faults"].isna().tolist() == [False, True]
    for c in ("trial_id", "model", "status", "bits", "extra", "error_message"):
        assert pd.api.types.is_string_dtype(df[c]), c
    assert df["rmse"].iloc[0] == math.inf and np.isnan(df["auc"]).all()
    assert df["status"].tolist() == ["ok", "failed"]
    assert json.loads(df["bits"].iloc[0]) == [30, 31]
    # missing text is NaN or None, never pd.NA, so plain functions can map over a column
    assert df["bits"].isna().tolist() == [False, True] and df["bits"].iloc[1] is not pd.NA


def test_load_empty_database(db: Path) -> None:
    Store(db).close()
    df = results.load(db)
    fields = [c for c in COLUMNS if c != "metrics"]
    assert df.empty and list(df.columns) == [*fields, *METRIC_KEYS, *results.CONFIG_COLUMNS]
    assert df["auc"].dtype == "float64"


def _point_rows(mitigation: str, rate: float, aucs: list[float], rmses: list[float], first: int) -> list:
    return [
        make_row(first + k, mitigation=mitigation, rate=rate, auc=a, rmse=r)
        for k, (a, r) in enumerate(zip(aucs, rmses, strict=True))
    ]


def _interval(values: list[float], bounds: tuple[float, float]) -> tuple[float, float]:
    return pytei_stats.interval(values, level=0.95, bounds=bounds)


def test_summarize_uses_pytei_stats(db: Path) -> None:
    a_auc, a_rmse = [0.71, 0.74, 0.69, 0.80, 0.75], [0.10, 0.12, 0.08, 0.11, 0.30]
    b_auc, b_rmse = [0.50, 0.55, 0.52], [0.4, math.inf, 0.6]
    c_auc, c_rmse = [0.9], [0.2]
    with Store(db) as store:
        store.record_many(_point_rows("none", 1e-6, a_auc, a_rmse, 0))
        store.record_many(_point_rows("clip", 1e-6, b_auc, b_rmse, 10))
        store.record_many(_point_rows("clip", 1e-5, c_auc, c_rmse, 20))
        store.record(make_row(30, mitigation="none", rate=1e-6, status="failed", auc=0.0, rmse=99.0))
    out = results.summarize(results.load(db)).set_index(["mitigation", "rate"])
    assert list(out.columns[:8]) == [
        "model",
        "target",
        "site",
        "auc_n",
        "auc_n_nan",
        "auc_n_inf",
        "auc_mean",
        "auc_median",
    ]
    assert len(out) == 3

    a = out.loc[("none", 1e-6)]  # the failed trial is left out
    assert a["auc_n"] == 5 and a["auc_n_inf"] == 0
    assert a["auc_mean"] == pytest.approx(np.mean(a_auc)) and a["auc_median"] == np.median(a_auc)
    assert a["auc_std"] == pytest.approx(np.std(a_auc, ddof=1))
    assert (a["auc_min"], a["auc_max"]) == (min(a_auc), max(a_auc))
    assert (a["auc_ci_low"], a["auc_ci_high"]) == pytest.approx(_interval(a_auc, (0.0, 1.0)))
    assert 0.0 <= a["auc_ci_low"] < np.mean(a_auc) < a["auc_ci_high"] <= 1.0  # inside the metric's range
    assert a["rmse_ci_low"] >= 0.0 and a["rmse_ci_high"] == math.inf  # no finite upper bound on [0, inf)

    b = out.loc[("clip", 1e-6)]  # an infinite RMSE is a value: infinite mean, max, std and upper end
    assert b["rmse_n"] == 3 and b["rmse_n_inf"] == 1 and b["rmse_n_nan"] == 0
    assert b["rmse_mean"] == math.inf and b["rmse_max"] == math.inf and b["rmse_min"] == 0.4
    assert b["rmse_std"] == math.inf and b["rmse_ci_high"] == math.inf
    assert (b["auc_ci_low"], b["auc_ci_high"]) == pytest.approx(_interval(b_auc, (0.0, 1.0)))

    c = out.loc[("clip", 1e-5)]  # one run: no spread; the interval is as wide as one run allows
    assert c["auc_n"] == 1 and c["auc_mean"] == 0.9 and np.isnan(c["auc_std"])
    assert c["auc_ci_low"] <= 0.9 <= c["auc_ci_high"]


def test_summarize_level_and_missing_columns() -> None:
    df = pd.DataFrame({"status": ["ok"] * 4, "g": ["x"] * 4, "auc": [0.1, 0.2, 0.4, np.nan]})
    out = results.summarize(df, by=["g"], metrics=["auc"], level=0.9).iloc[0]
    assert out["auc_n"] == 3 and out["auc_n_nan"] == 1  # NaN: a run without a value
    low, high = pytei_stats.interval([0.1, 0.2, 0.4], level=0.9, bounds=(0.0, 1.0))
    assert (out["auc_ci_low"], out["auc_ci_high"]) == pytest.approx((low, high))
    assert results.summarize(df, by="g", metrics="auc").equals(
        results.summarize(df, by=["g"], metrics=["auc"])
    )
    empty = results.summarize(df[df["status"] == "failed"], by="g", metrics="auc")
    assert empty.empty and "auc_ci_high" in empty.columns
    with pytest.raises(KeyError, match="rmse"):
        results.summarize(df, by=["g"], metrics=["rmse"])
    with pytest.raises(ValueError, match="level"):
        results.summarize(df, by=["g"], metrics=["auc"], level=95)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_round_trip(db: Path, tmp_path: Path, fmt: str) -> None:
    with Store(db) as store:
        store.record_many([make_row(i, rmse=math.inf if i == 2 else 0.1 * i) for i in range(4)])
        store.record(make_row(9, status="failed", error_message="boom", n_faults=None, auc=None, rmse=None))
    df = results.load(db)
    df["model_config"] = df["model_config"].map(lambda c: None if c is None else json.dumps(c))  # as text
    out = results.export(db, tmp_path / f"trials.{fmt}", fmt=fmt)
    back = pd.read_csv(out) if fmt == "csv" else pd.read_parquet(out)
    if fmt == "csv":  # CSV has no None: a missing text reads back as NaN
        for c in ("model_config", "traceback"):
            df[c] = df[c].astype(object).where(df[c].notna(), np.nan)
    # CSV keeps values, not dtypes (a nullable integer column with a gap reads back as float)
    pd.testing.assert_frame_equal(back, df, check_dtype=fmt == "parquet")
    assert back["rmse"].iloc[2] == math.inf


def test_export_unknown_format(db: Path, tmp_path: Path) -> None:
    Store(db).close()
    with pytest.raises(ValueError, match="unknown export format"):
        results.export(db, tmp_path / "x.json", fmt="json")


# --- issue 15: read-only opening, WAL checkpoints, claims ----------------------------------------


def test_a_read_only_store_reads_and_refuses_writes(db: Path) -> None:
    with Store(db) as store:
        store.record(make_row(1))
    with Store(db, create=False, readonly=True) as store:
        assert [r["trial_id"] for r in store.rows()] == [make_row(1).trial_id]
        with pytest.raises(StoreError, match="read-only"):
            store.record(make_row(2))
    with pytest.raises(FileNotFoundError):
        Store(db.with_name("missing.db"), readonly=True)


def test_closing_a_writer_folds_the_wal_into_the_main_file(db: Path) -> None:
    reader = sqlite3.connect(db)  # keeps the file open: closing the writer alone does not fold it in
    try:
        with Store(db) as store:
            store.record_many([make_row(i) for i in range(5)])
        wal = Path(f"{db}-wal")
        assert not wal.exists() or wal.stat().st_size == 0
        copy = db.with_name("copy.db")
        copy.write_bytes(db.read_bytes())
        with Store(copy, create=False, readonly=True) as store:
            assert len(store.rows()) == 5
    finally:
        reader.close()


def test_claims_are_exclusive_between_live_runners(db: Path) -> None:
    with Store(db) as a, Store(db) as b:
        first, second = a.join(), b.join()
        ids = [f"t{i}" for i in range(6)]
        assert a.claim(ids[:4], first) == (ids[:4], 0, 0)
        assert b.claim(ids, second) == (ids[4:], 0, 4)  # this process is alive: its claims hold
        a.leave(first)
        assert b.claim(ids, second) == (ids, 0, 0)
        assert a.claimed() == 6
