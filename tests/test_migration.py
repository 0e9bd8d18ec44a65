"""Schema migrations: a results database written by pytei 0.1.0 (schema 1, kept as a fixture: 10 of
16 trials of ``schema_v1.toml`` stored, as if the campaign had been interrupted) opens, keeps every
value, and resumes under the current schema; a newer schema is refused naming its version."""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
from pathlib import Path

import pytest

from pytei import metrics, results
from pytei.campaign import load_spec, plan
from pytei.campaign.execute import resume_campaign
from pytei.campaign.store import SCHEMA_VERSION, V1_METRICS, Store, StoreError, TrialRow

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def v1_db(tmp_path: Path) -> Path:
    db = tmp_path / "v1.db"
    shutil.copy(FIXTURES / "schema_v1_interrupted.db", db)
    return db


def _v1_rows(db: Path) -> dict[str, dict]:
    con = sqlite3.connect(db)
    cur = con.execute("SELECT * FROM trials")
    names = [d[0] for d in cur.description]
    out = {r[0]: dict(zip(names, r, strict=True)) for r in cur}
    con.close()
    return out


def test_a_schema_1_database_is_migrated_with_every_value(v1_db: Path) -> None:
    before = _v1_rows(v1_db)
    assert len(before) == 10
    with Store(v1_db, create=False) as store:
        rows = {r["trial_id"]: r for r in store.rows()}
    con = sqlite3.connect(v1_db)
    assert dict(con.execute("SELECT key, value FROM meta"))["schema_version"] == str(SCHEMA_VERSION)
    con.close()
    backup = v1_db.with_name("v1.db.v1.bak")  # the untouched original, next to it
    assert _v1_rows(backup) == before
    assert set(rows) == set(before)
    for trial_id, old in before.items():
        new = rows[trial_id]
        nonfinite = json.loads(old["nonfinite"]) if old["nonfinite"] else {}
        want = {m: old[m] for m in V1_METRICS if old[m] is not None} | {
            m: float(v) for m, v in nonfinite.items()
        }
        assert new["metrics"].keys() == want.keys()
        for m, v in want.items():
            assert new["metrics"][m] == v or (math.isnan(v) and math.isnan(new["metrics"][m]))
        for column in (
            "model",
            "target",
            "site",
            "rate",
            "run",
            "seed",
            "mitigation",
            "status",
            "extra",
            "bits",
        ):
            assert new[column] == old[column], column
        assert new["architecture"] == "dummy" and new["kind"] == "component"
        assert json.loads(new["model_config"]) == {
            "mlp_depth": 1,
            "mlp_hidden": 16,
            "embed_dim": 8,
            "dense_dim": 8,
            "sparse_dim": 64,
            "sparsity": 0.01,
            "samples": 64,
        }
    df = results.load(v1_db)  # the migrated file reads as any other
    assert len(df) == 10 and set(df["cfg_mlp_hidden"]) == {16.0} and df["rmse"].notna().all()


def test_an_interrupted_schema_1_campaign_resumes_exactly_the_missing_trials(v1_db: Path) -> None:
    stored = set(_v1_rows(v1_db))
    planned = {t.trial_id for t in plan(load_spec(FIXTURES / "schema_v1.toml"))}
    assert len(planned) == 16 and stored < planned  # trial ids did not change with the schema
    result = resume_campaign(v1_db, progress=False)
    assert (result.ran, result.skipped, result.failed, result.planned) == (6, 10, 0, 16)
    df = results.load(v1_db)
    assert len(df) == 16 and set(df["trial_id"]) == planned and (df["status"] == "ok").all()
    assert set(df["kind"]) == {"component"} and set(df["architecture"]) == {"dummy"}
    # the resumed trials match the stored ones: the same model and faults give the same clean baseline
    assert set(df["baseline_rmse"]) == {0.0}


def test_a_newer_schema_is_refused_naming_its_version(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    Store(db).close()
    con = sqlite3.connect(db)
    con.execute("UPDATE meta SET value = '9' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match=r"schema version 9, newer than this pytei reads \(versions 1 to 2"):
        Store(db, create=False)
    with pytest.raises(StoreError, match="upgrade pytei"):
        results.load(db)


def test_a_new_metric_needs_no_schema_change(tmp_path: Path) -> None:
    """A metric registered after the database was created is stored and loaded as its own column."""
    db = tmp_path / "m.db"
    Store(db).close()
    name = "test_migration_max_abs"
    metrics.register(name, lambda s, y, g: float(s.abs().max()), bounds=(0.0, math.inf))
    try:
        with Store(db) as store:
            store.record(_row(metrics={name: 3.5, "rmse": math.inf}))
        df = results.load(db)
        assert df[name].tolist() == [3.5] and df["rmse"].tolist() == [math.inf]
    finally:
        metrics.register.remove(name)


def _row(**values: object) -> TrialRow:
    base: dict = dict(
        trial_id="t1",
        model="m",
        model_label="m",
        dataset="d",
        target="all",
        params="all",
        site="weights",
        error_model="BitFlip",
        rate=1e-6,
        bits=None,
        run=0,
        seed=1,
        mitigation="none",
        status="ok",
        started=1.0,
        finished=2.0,
        duration_s=1.0,
    )
    return TrialRow(**{**base, **values})
