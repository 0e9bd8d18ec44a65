"""The results store: one SQLite file per campaign, one committed row per trial.

Why SQLite: one portable file, atomic transactions, and safe concurrent writers. The database runs
in WAL mode with ``synchronous=NORMAL`` (a committed trial survives a crash or ``kill -9`` of the
writer; only a power loss can undo the last commits) and a busy timeout, so several processes can
record into the same file. Every trial is its own transaction: a killed writer leaves whole rows only.

Non-finite metrics: a SQLite REAL cannot hold NaN (it becomes NULL), so the metric columns
(:data:`METRICS`) hold finite values only, and the ``nonfinite`` TEXT column of a row holds a JSON
object naming its non-finite metrics, e.g. ``{"rmse": "inf", "auc": "nan"}`` (NULL when there are
none). A NULL metric without an entry there is a metric that was not computed (Python ``None``).
:meth:`Store.rows` restores the floats; SQL aggregates such as ``AVG(rmse)`` see finite values only.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = [
    "COLUMNS",
    "INT_COLUMNS",
    "METRICS",
    "REAL_COLUMNS",
    "SCHEMA_VERSION",
    "DuplicateTrial",
    "SpecMismatch",
    "Store",
    "TrialRow",
]

SCHEMA_VERSION = 1
_APPLICATION = "pytei"

#: Seconds a writer waits for another one's lock before failing with "database is locked".
BUSY_TIMEOUT_S = 60.0

#: A pause longer than this between trials splits the history into sessions (a stopped and resumed
#: campaign); :meth:`Store.timing` measures throughput over the sessions only, not the downtime.
SESSION_GAP_S = 300.0

#: Nullable REAL columns whose NaN and infinities are kept in the ``nonfinite`` column.
METRICS = (
    "auc",
    "auc_valid",
    "invalid_frac",
    "logloss",
    "rmse",
    "rmse_valid",
    "baseline_auc",
    "baseline_rmse",
)
#: INTEGER columns (n_faults, n_invalid and n_outputs are NULL for failed trials).
INT_COLUMNS = ("run", "seed", "n_faults", "n_invalid", "n_outputs")
#: NOT NULL REAL columns.
REAL_COLUMNS = ("rate", "started", "finished", "duration_s")
_JSONS = ("bits", "extra")


@dataclass(kw_only=True)
class TrialRow:
    """One finished trial: what was injected, how it went, and when and where it ran.

    ``bits`` (a list of bit positions, or None for all bits) and ``extra`` (mitigation statistics
    and other details) are stored as JSON text.
    """

    trial_id: str
    model: str
    model_label: str
    dataset: str
    target: str
    params: str
    site: str
    error_model: str
    rate: float
    bits: Sequence[int] | None
    run: int
    seed: int
    mitigation: str
    status: str
    """``"ok"`` or ``"failed"`` (the trial raised; see ``error_message``)."""
    error_message: str | None = None
    n_faults: int | None = None
    n_invalid: int | None = None
    n_outputs: int | None = None
    auc: float | None = None
    auc_valid: float | None = None
    invalid_frac: float | None = None
    logloss: float | None = None
    rmse: float | None = None
    rmse_valid: float | None = None
    baseline_auc: float | None = None
    """Metric of the clean model with the same mitigation (the reference of this trial)."""
    baseline_rmse: float | None = None
    extra: dict[str, Any] | None = None
    started: float
    """Unix time."""
    finished: float
    duration_s: float
    worker: str | None = None
    """``host:pid`` of the process that ran the trial."""


#: Stored columns, in table order: the TrialRow fields, then the non-finite metrics.
COLUMNS = tuple(f.name for f in fields(TrialRow))
_STORED = (*COLUMNS, "nonfinite")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS campaign (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL,
    hash TEXT NOT NULL,
    text TEXT NOT NULL,
    created REAL NOT NULL,
    n_planned INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS trials (
    trial_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    model_label TEXT NOT NULL,
    dataset TEXT NOT NULL,
    target TEXT NOT NULL,
    params TEXT NOT NULL,
    site TEXT NOT NULL,
    error_model TEXT NOT NULL,
    rate REAL NOT NULL,
    bits TEXT,
    run INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    mitigation TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error_message TEXT,
    n_faults INTEGER,
    n_invalid INTEGER,
    n_outputs INTEGER,
    auc REAL,
    auc_valid REAL,
    invalid_frac REAL,
    logloss REAL,
    rmse REAL,
    rmse_valid REAL,
    baseline_auc REAL,
    baseline_rmse REAL,
    extra TEXT,
    started REAL NOT NULL,
    finished REAL NOT NULL,
    duration_s REAL NOT NULL,
    worker TEXT,
    nonfinite TEXT
);
CREATE INDEX IF NOT EXISTS trials_point ON trials (model, target, site, mitigation, rate);
"""

_INSERT = f"INSERT INTO trials ({', '.join(_STORED)}) VALUES ({', '.join('?' * len(_STORED))})"


class SpecMismatch(ValueError):
    """The database belongs to another campaign spec."""


class DuplicateTrial(ValueError):
    """A trial id is already stored (rows are never overwritten)."""


class Store:
    """A campaign's results database (see the module docstring for the format).

    ``create=False`` opens an existing pytei database only: a missing file raises
    FileNotFoundError and any other file ValueError, and nothing is written to either.
    """

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"no results database at {self.path}")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"{self.path.resolve().as_uri()}?mode={'rwc' if create else 'rw'}"
        self._con = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            self._open(create)
        except BaseException:
            self._con.close()
            raise

    def _open(self, create: bool) -> None:
        """Check that the file is a pytei database (or empty), then switch to WAL and create the schema."""
        try:
            tables = {r[0] for r in self._con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            meta = (
                dict(self._con.execute("SELECT key, value FROM meta").fetchall())
                if "meta" in tables
                else None
            )
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path} is not a pytei results database ({err})") from err
        if meta is not None:
            self._check_meta(meta)
        elif tables or not create:
            raise ValueError(f"{self.path} is not a pytei results database (no pytei tables)")
        self._con.execute("PRAGMA journal_mode = WAL")
        self._con.execute("PRAGMA synchronous = NORMAL")
        if not tables:
            with self._write():
                self._create_schema()

    def _create_schema(self) -> None:
        """Tables, index and meta rows; idempotent, so two processes creating one file at once is fine."""
        for statement in filter(str.strip, _SCHEMA.split(";")):
            self._con.execute(statement)
        self._con.executemany(
            "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
            [("application", _APPLICATION), ("schema_version", str(SCHEMA_VERSION))],
        )

    def _check_meta(self, meta: dict[str, str]) -> None:
        if meta.get("application") != _APPLICATION:
            raise ValueError(f"{self.path} is not a pytei results database (meta: {meta})")
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise ValueError(
                f"{self.path} has results schema version {meta.get('schema_version')}; "
                f"this pytei reads version {SCHEMA_VERSION}"
            )

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction, taking the write lock up front (waits for other writers)."""
        self._con.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._con.execute("ROLLBACK")
            raise
        self._con.execute("COMMIT")

    # --- the campaign ------------------------------------------------------------------------

    def attach_spec(
        self, spec_text: str, spec_hash: str, name: str, n_planned: int, base_dir: str | None = None
    ) -> None:
        """Bind the database to a spec: the first call stores it, later ones must give the same hash.

        ``base_dir`` is the folder the spec's relative paths resolve against, kept so that a
        campaign can be resumed from its database alone. A matching later call (a resume) updates
        ``n_planned``, the size of the current plan.
        """
        with self._write():
            current = self.spec()
            if current is None:
                self._con.execute(
                    "INSERT INTO campaign (id, name, hash, text, created, n_planned) "
                    "VALUES (1, ?, ?, ?, ?, ?)",
                    (name, spec_hash, spec_text, time.time(), n_planned),
                )
                if base_dir is not None:
                    self._con.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('spec_base_dir', ?)", (base_dir,)
                    )
            elif current["hash"] != spec_hash:
                theirs, ours = current["hash"][:12], spec_hash[:12]
                raise SpecMismatch(
                    f"{self.path.name} belongs to campaign {current['name']!r} (spec {theirs}), "
                    f"not to this spec ({ours}); use another --db or the original spec"
                )
            else:
                self._con.execute("UPDATE campaign SET n_planned = ? WHERE id = 1", (n_planned,))

    def spec(self) -> dict | None:
        """The attached spec: ``name``, ``hash``, ``text``, ``created`` (unix time), ``n_planned``
        and ``base_dir`` (None if not recorded)."""
        cur = self._con.execute("SELECT name, hash, text, created, n_planned FROM campaign WHERE id = 1")
        row = cur.fetchone()
        if row is None:
            return None
        out = dict(zip([d[0] for d in cur.description], row, strict=True))
        found = self._con.execute("SELECT value FROM meta WHERE key = 'spec_base_dir'").fetchone()
        out["base_dir"] = found[0] if found else None
        return out

    # --- trials ------------------------------------------------------------------------------

    def done_ids(self) -> set[str]:
        """Ids of the stored trials, all final: the schema admits status "ok" and "failed" only."""
        return {r[0] for r in self._con.execute("SELECT trial_id FROM trials")}

    def record(self, row: TrialRow) -> None:
        """Store one trial in its own transaction, committed before returning."""
        self.record_many([row])

    def record_many(self, rows: Iterable[TrialRow]) -> None:
        """Store trials in one transaction: all of them or, on any error, none.

        Raises DuplicateTrial if an id is already stored or given twice.
        """
        values = [_encode(r) for r in rows]
        if not values:
            return
        try:
            with self._write():
                self._con.executemany(_INSERT, values)
        except sqlite3.IntegrityError as err:
            if "trials.trial_id" not in str(err):
                raise
            raise DuplicateTrial(f"trial(s) already stored: {', '.join(self._duplicates(values))}") from err

    def _duplicates(self, values: list[tuple]) -> list[str]:
        ids = [v[0] for v in values]
        twice = {i for i, n in Counter(ids).items() if n > 1}
        stored = self.done_ids().intersection(ids)
        return sorted(twice | stored)

    def rows(self) -> list[dict]:
        """Every trial as a dict of :data:`COLUMNS`, in commit order; NaN and infinities restored."""
        cur = self._con.execute(f"SELECT {', '.join(_STORED)} FROM trials ORDER BY rowid")
        return [_decode(dict(zip(_STORED, r, strict=True))) for r in cur]

    # --- progress ----------------------------------------------------------------------------

    def counts(self) -> dict:
        """Trials ``ok`` and ``failed``, ``planned`` (None before attach_spec) and ``remaining``."""
        by_status = dict(self._con.execute("SELECT status, COUNT(*) FROM trials GROUP BY status").fetchall())
        ok, failed = by_status.get("ok", 0), by_status.get("failed", 0)
        spec = self.spec()
        planned = None if spec is None else spec["n_planned"]
        remaining = None if planned is None else planned - ok - failed
        return {"ok": ok, "failed": failed, "planned": planned, "remaining": remaining}

    def timing(self) -> dict:
        """``first_started``, ``last_finished``, ``trials_per_s`` and ``eta_s`` from the stored times.

        Throughput counts the time within sessions only (see :data:`SESSION_GAP_S`), so a campaign
        resumed a day later still reports its real speed. Values are None when undefined.
        """
        spans = self._con.execute("SELECT started, finished FROM trials ORDER BY started").fetchall()
        if not spans:
            return {"first_started": None, "last_finished": None, "trials_per_s": None, "eta_s": None}
        active = _active_seconds(spans)
        rate = len(spans) / active if active > 0 else None
        remaining = self.counts()["remaining"]
        eta = None if rate is None or remaining is None else max(remaining, 0) / rate
        return {
            "first_started": spans[0][0],
            "last_finished": max(f for _, f in spans),
            "trials_per_s": rate,
            "eta_s": eta,
        }

    # --- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _active_seconds(spans: list[tuple[float, float]]) -> float:
    """Total length of the sessions: runs of (started, finished) spans without a long pause between."""
    total = 0.0
    start, end = spans[0]
    for s, f in spans[1:]:
        if s > end + SESSION_GAP_S:
            total += end - start
            start, end = s, f
        else:
            end = max(end, f)
    return total + end - start


def _json_fallback(value: Any) -> Any:
    """numpy and torch scalars and arrays (mitigation statistics often are) as plain Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} as JSON")


def _encode(row: TrialRow) -> tuple:
    """A TrialRow as the values of :data:`_STORED`, coercing numpy scalars to Python ones."""
    out: dict[str, Any] = {name: getattr(row, name) for name in COLUMNS}
    nonfinite = {}
    for name, value in out.items():
        if value is None:
            continue
        if name in _JSONS:
            out[name] = json.dumps(value, default=_json_fallback)
        elif name in INT_COLUMNS:
            out[name] = int(value)
        elif name in REAL_COLUMNS:
            out[name] = float(value)
        elif name in METRICS:
            out[name] = float(value)
            if not math.isfinite(out[name]):
                nonfinite[name] = repr(out[name])
                out[name] = None
    out["nonfinite"] = json.dumps(nonfinite) if nonfinite else None
    return tuple(out.values())


def _decode(stored: dict) -> dict:
    """A stored row as :data:`COLUMNS`, with the non-finite metrics put back."""
    nonfinite = stored.pop("nonfinite")
    if nonfinite is not None:
        stored.update({name: float(text) for name, text in json.loads(nonfinite).items()})
    return stored
