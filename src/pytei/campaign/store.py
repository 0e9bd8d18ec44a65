"""The results store: one SQLite file per campaign, one committed row per trial.

Why SQLite: one portable file, atomic transactions, and safe concurrent writers. The database runs
in WAL mode with ``synchronous=NORMAL`` (a committed trial survives a crash or ``kill -9`` of the
writer; only a power loss can undo the last commits) and a busy timeout, so several processes can
record into the same file. Every trial is its own transaction: a killed writer leaves whole rows only.

Metrics are stored in long form, table ``metrics(trial_id, name, value, special)``, so a metric a
plugin registers needs no schema change. A SQLite REAL cannot hold NaN (it becomes NULL), so
``value`` holds finite values and ``special`` is ``'nan'``, ``'inf'`` or ``'-inf'`` (``value`` NULL)
otherwise; a metric that was not computed has no row. SQL aggregates over ``value`` (``AVG``) see
finite values only; :meth:`Store.rows` restores the floats.

Runners. Several processes may run one campaign into one database: each joins as a row of
``runners`` (``host:pid:token``, with a heartbeat a thread refreshes) and claims trials (table
``claims``) before it runs them, in the transaction that checks which are stored or claimed, so
no trial runs twice. The claims of a runner that is gone (its pid is dead on this host, or its
heartbeat is older than :data:`STALE_S`) are taken over. These tables hold no results: a reader
ignores them.

Durability. A writer folds the WAL into the main file (``PRAGMA wal_checkpoint``) every
:data:`CHECKPOINT_EVERY` trials or :data:`CHECKPOINT_S` seconds and, truncating it, when it closes,
so the main file alone holds every trial even if the ``-wal`` file is lost. Reading commands open
the file read-only (:class:`Store` ``readonly=True``), so a database in a read-only folder can be
read; a WAL-mode file there without its ``-wal`` file is opened as immutable.

Schema versions: 2 (this one). A version 1 database (pytei up to 0.1.0: one column per metric) is
migrated in place when it is opened, in one transaction, after a copy of it is saved next to it as
``<name>.v1.bak``; a newer version is refused with a message naming it.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import socket
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from ..exceptions import PyteiError
from .checks import target_name

__all__ = [
    "COLUMNS",
    "INT_COLUMNS",
    "REAL_COLUMNS",
    "SCHEMA_VERSION",
    "DUMMY_CONFIG_KEYS",
    "KINDS",
    "DuplicateTrial",
    "ModelChanged",
    "SpecMismatch",
    "Store",
    "StoreError",
    "TrialRow",
    "V1_METRICS",
]

SCHEMA_VERSION = 2
_APPLICATION = "pytei"

#: Seconds a writer waits for another one's lock before failing with "database is locked".
BUSY_TIMEOUT_S = 60.0

#: Fold the WAL into the main file after this many recorded trials or seconds (see the docstring).
CHECKPOINT_EVERY = 100
CHECKPOINT_S = 30.0
#: A runner refreshes its heartbeat this often; one on another host silent for STALE_S is gone.
HEARTBEAT_S = 10.0
STALE_S = 120.0

#: A pause longer than this between trials splits the history into sessions (a stopped and resumed
#: campaign); :meth:`Store.timing` measures throughput over the sessions only, not the downtime.
SESSION_GAP_S = 300.0

#: INTEGER columns (n_faults, n_invalid and n_outputs are NULL for failed trials).
INT_COLUMNS = ("run", "seed", "n_faults", "n_invalid", "n_outputs")
#: NOT NULL REAL columns.
REAL_COLUMNS = ("rate", "started", "finished", "duration_s")
_JSONS = ("bits", "extra", "model_config")
#: Values of the ``kind`` column: a component (or labelled) target, a single parameter, bit positions.
KINDS = ("component", "parameter", "bits")
#: Keys of a dummy model's ``model_config`` (its grid point), in the order of the paper's Table 1.
DUMMY_CONFIG_KEYS = ("mlp_depth", "mlp_hidden", "embed_dim", "dense_dim", "sparse_dim", "sparsity", "samples")


@dataclass(kw_only=True)
class TrialRow:
    """One finished trial: what was injected, how it went, and when and where it ran.

    ``bits`` (a list of bit positions, or None for all bits), ``model_config`` (a dummy model's grid
    point) and ``extra`` (mitigation statistics and other details) are stored as JSON text;
    ``metrics`` in the ``metrics`` table (see the module docstring).
    """

    trial_id: str
    model: str
    model_label: str
    """The label the spec gives the model, else its architecture."""
    architecture: str = ""
    """The model's registered name (``dcn``, ``dummy``, a plugin's model)."""
    dataset: str
    target: str
    params: str
    site: str
    kind: str = "component"
    """``component``, ``parameter`` (a per-parameter target) or ``bits`` (a bit-position study)."""
    model_config: Mapping[str, Any] | None = None
    error_model: str
    rate: float
    bits: Sequence[int] | None
    run: int
    seed: int
    mitigation: str
    status: str
    """``"ok"`` or ``"failed"`` (the trial raised; see ``error_message`` and ``traceback``)."""
    error_message: str | None = None
    traceback: str | None = None
    n_faults: int | None = None
    n_invalid: int | None = None
    n_outputs: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    """Every metric by name (``auc``, ``rmse``, ..., ``baseline_auc``: the clean model's value
    under the same mitigation); a metric not computed is absent."""
    extra: Mapping[str, Any] | None = None
    started: float
    """Unix time."""
    finished: float
    duration_s: float
    worker: str | None = None
    """``host:pid`` of the process that ran the trial."""


#: TrialRow fields, in order; all but ``metrics`` are columns of the ``trials`` table.
COLUMNS = tuple(f.name for f in fields(TrialRow))
_STORED = tuple(c for c in COLUMNS if c != "metrics")

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
    architecture TEXT NOT NULL,
    dataset TEXT NOT NULL,
    target TEXT NOT NULL,
    params TEXT NOT NULL,
    site TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ({kinds})),
    model_config TEXT,
    error_model TEXT NOT NULL,
    rate REAL NOT NULL,
    bits TEXT,
    run INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    mitigation TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error_message TEXT,
    traceback TEXT,
    n_faults INTEGER,
    n_invalid INTEGER,
    n_outputs INTEGER,
    extra TEXT,
    started REAL NOT NULL,
    finished REAL NOT NULL,
    duration_s REAL NOT NULL,
    worker TEXT
);
CREATE TABLE IF NOT EXISTS runners (
    owner TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    heartbeat REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    trial_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS trials_point ON trials (model, target, site, mitigation, rate);
CREATE TABLE IF NOT EXISTS metrics (
    trial_id TEXT NOT NULL REFERENCES trials (trial_id),
    name TEXT NOT NULL,
    value REAL,
    special TEXT CHECK (special IN ('nan', 'inf', '-inf')),
    PRIMARY KEY (trial_id, name)
) WITHOUT ROWID
"""

_SCHEMA = _SCHEMA.replace("{kinds}", ", ".join(f"'{k}'" for k in KINDS))
_INSERT = f"INSERT INTO trials ({', '.join(_STORED)}) VALUES ({', '.join('?' * len(_STORED))})"
_INSERT_METRIC = "INSERT INTO metrics (trial_id, name, value, special) VALUES (?, ?, ?, ?)"


class StoreError(PyteiError, ValueError):
    """A file that is not a pytei results database, or one of a newer schema version."""


class SpecMismatch(PyteiError, ValueError):
    """The database belongs to another campaign spec."""


class ModelChanged(SpecMismatch):
    """A checkpoint differs from the one the database's trials were run with."""


class DuplicateTrial(PyteiError, ValueError):
    """A trial id is already stored (rows are never overwritten)."""


class Store:
    """A campaign's results database (see the module docstring for the format).

    ``create=False`` opens an existing pytei database only: a missing file raises
    FileNotFoundError and any other file StoreError, and nothing is written to either (a schema-1
    database is migrated, though: see the module docstring).
    """

    def __init__(self, path: str | Path, *, create: bool = True, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if (readonly or not create) and not self.path.is_file():
            raise FileNotFoundError(f"no results database at {self.path}")
        if create and not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._since_checkpoint = 0
        self._checkpointed = time.monotonic()
        self._con = self._connect("ro" if readonly else "rwc" if create else "rw")
        try:
            migrate = self._open(create and not readonly)
        except BaseException:
            self._con.close()
            raise
        if migrate:  # a schema-1 file opened read-only: migrate it (a writer), then read it
            self._con.close()
            try:
                Store(self.path, create=False).close()
            except StoreError as err:
                raise StoreError(
                    f"{self.path} has results schema version 1, which must be migrated before it is "
                    f"read, and it cannot be written ({err}): copy it to a writable folder"
                ) from err
            self._con = self._connect("ro")

    def _connect(self, mode: str) -> sqlite3.Connection:
        """A connection in ``mode`` (``ro``, ``rw``, ``rwc``). Read-only, a WAL-mode file whose folder
        cannot hold the ``-shm`` file is opened as immutable when no ``-wal`` file is there (no
        writer can be at work: it would need that folder too)."""
        uri = f"{self.path.resolve().as_uri()}?mode={mode}"
        con = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        if mode != "ro":
            return con
        try:
            con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return con
        except sqlite3.OperationalError:
            con.close()
        except sqlite3.DatabaseError as err:
            con.close()
            raise StoreError(f"{self.path} is not a pytei results database ({err})") from err
        if Path(f"{self.path}-wal").exists():
            raise StoreError(
                f"{self.path} cannot be read: its folder is read-only and it has a -wal file of "
                "unfolded commits; open it once where it is writable"
            )
        return sqlite3.connect(f"{uri}&immutable=1", uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)

    def _open(self, create: bool) -> bool:
        """Check that the file is a pytei database (or empty), then switch to WAL, create the schema
        or migrate an older one (a writer only). True: a schema-1 file opened read-only (to migrate)."""
        try:
            tables = {r[0] for r in self._con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            meta = (
                dict(self._con.execute("SELECT key, value FROM meta").fetchall())
                if "meta" in tables
                else None
            )
        except sqlite3.DatabaseError as err:
            if isinstance(err, sqlite3.OperationalError) and not self.readonly:
                cannot = self._cannot_write(err)  # a WAL file in a read-only folder
                if isinstance(cannot, StoreError):
                    raise cannot from err
            raise StoreError(f"{self.path} is not a pytei results database ({err})") from err
        version = self._check_meta(meta) if meta is not None else None
        if meta is None and (tables or not create):
            raise StoreError(f"{self.path} is not a pytei results database (no pytei tables)")
        if self.readonly:
            return version == 1
        try:
            self._con.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as err:
            raise self._cannot_write(err) from err
        self._con.execute("PRAGMA synchronous = NORMAL")
        if not tables:
            with self._write():
                self._create_schema()
        elif version == 1:
            self._migrate_v1()
        elif not {"runners", "claims"} <= tables:  # a version 2 file of an older pytei
            with self._write():
                self._create_schema()
        return False

    def _cannot_write(self, err: sqlite3.OperationalError) -> Exception:
        """A pytei error for a database that cannot be written (a read-only file or folder)."""
        if "readonly" in str(err) or "unable to open" in str(err):
            return StoreError(
                f"cannot write to {self.path} ({err}): its file or folder is read-only; reading it "
                "(campaign status, export, report) works, running needs write access"
            )
        return err

    def _create_schema(self) -> None:
        """Tables, index and meta rows; idempotent, so two processes creating one file at once is fine."""
        for statement in filter(str.strip, _SCHEMA.split(";")):
            self._con.execute(statement)
        self._con.executemany(
            "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
            [("application", _APPLICATION), ("schema_version", str(SCHEMA_VERSION))],
        )

    def _check_meta(self, meta: dict[str, str]) -> int:
        """The schema version of a pytei database; StoreError for another file or a newer version."""
        if meta.get("application") != _APPLICATION:
            raise StoreError(f"{self.path} is not a pytei results database (meta: {meta})")
        version = meta.get("schema_version", "?")
        if version not in ("1", str(SCHEMA_VERSION)):
            raise StoreError(
                f"{self.path} has results schema version {version}, newer than this pytei reads "
                f"(versions 1 to {SCHEMA_VERSION}; 1 is migrated on open): upgrade pytei to open it"
            )
        return int(version)

    def _migrate_v1(self) -> None:
        """Schema 1 -> 2, in one transaction, after saving a copy as ``<name>.v1.bak``.

        Metric columns become rows of ``metrics``; the new columns are filled from what version 1
        stored: ``architecture`` from its ``model_label`` (the architecture, in version 1),
        ``kind`` from ``bits`` and the spec's targets, ``model_config`` from a dummy model's key.
        """
        backup = self.path.with_name(self.path.name + ".v1.bak")
        if not backup.exists():  # a consistent snapshot, taken before the migration's transaction
            copy = sqlite3.connect(backup)
            try:
                self._con.backup(copy)
            finally:
                copy.close()
        with self._write():
            found = self._con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if found is None or found[0] != "1":
                return  # another process migrated it while this one waited for the lock
            spec = self._con.execute("SELECT text FROM campaign WHERE id = 1").fetchone()
            declared = _declared_targets(spec[0]) if spec else None
            self._con.execute("ALTER TABLE trials RENAME TO trials_v1")
            self._con.execute("DROP INDEX IF EXISTS trials_point")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._con.execute(statement)
            old = self._con.execute("SELECT * FROM trials_v1 ORDER BY rowid")
            names = [d[0] for d in old.description]
            for values in old.fetchall():
                row = dict(zip(names, values, strict=True))
                trial, metric_rows = _from_v1(row, declared)
                self._con.execute(_INSERT, tuple(trial[c] for c in _STORED))
                self._con.executemany(_INSERT_METRIC, metric_rows)
            self._con.execute("DROP TABLE trials_v1")
            version = str(SCHEMA_VERSION)
            self._con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction, taking the write lock up front (waits for other writers)."""
        if self.readonly:
            raise StoreError(f"{self.path} was opened read-only")
        try:
            self._con.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            raise self._cannot_write(err) from err
        try:
            yield
        except BaseException:
            self._con.execute("ROLLBACK")
            raise
        try:
            self._con.execute("COMMIT")
        except sqlite3.OperationalError as err:
            raise self._cannot_write(err) from err

    # --- the campaign ------------------------------------------------------------------------

    def attach_spec(
        self,
        spec_text: str,
        spec_hash: str,
        name: str,
        n_planned: int,
        base_dir: str | None = None,
        fingerprints: Mapping[str, str] | None = None,
    ) -> None:
        """Bind the database to a spec: the first call stores it, later ones must give the same hash.

        ``base_dir`` is the folder the spec's relative paths resolve against, kept so that a
        campaign can be resumed from its database alone. A matching later call (a resume) updates
        ``n_planned``, the size of the current plan. ``fingerprints`` (``{checkpoint path: content
        hash}``) are part of the identity: a later call whose checkpoint has another hash raises
        :class:`ModelChanged` naming it; a path first seen (a database of an older pytei, which kept
        none) is recorded.
        """
        with self._write():
            self._check_fingerprints(dict(fingerprints or {}))
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

    def _check_fingerprints(self, fingerprints: dict[str, str]) -> None:
        found = self._con.execute("SELECT value FROM meta WHERE key = 'model_fingerprints'").fetchone()
        stored: dict[str, str] = json.loads(found[0]) if found else {}
        for where, digest in fingerprints.items():
            if stored.get(where, digest) != digest:
                raise ModelChanged(
                    f"checkpoint {where} changed since the trials in {self.path} were run (content "
                    f"{stored[where][:12]}, now {digest[:12]}): resuming would mix two models' trials; "
                    "restore that checkpoint or run the campaign into a new --db"
                )
        if fingerprints.keys() - stored.keys():
            value = json.dumps({**stored, **fingerprints}, sort_keys=True)
            self._con.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('model_fingerprints', ?)", (value,)
            )

    def fingerprints(self) -> dict[str, str]:
        """``{checkpoint path: content hash}`` recorded by :meth:`attach_spec` (empty if none)."""
        found = self._con.execute("SELECT value FROM meta WHERE key = 'model_fingerprints'").fetchone()
        return json.loads(found[0]) if found else {}

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
        rows = list(rows)
        values = [_encode(r) for r in rows]
        if not values:
            return
        metric_rows = [m for r in rows for m in _encode_metrics(r.trial_id, r.metrics)]
        try:
            with self._write():
                self._con.executemany(_INSERT, values)
                self._con.executemany(_INSERT_METRIC, metric_rows)
        except sqlite3.IntegrityError as err:
            if "trials.trial_id" not in str(err):
                raise
            raise DuplicateTrial(f"trial(s) already stored: {', '.join(self._duplicates(values))}") from err
        self._since_checkpoint += len(values)
        if self._since_checkpoint >= CHECKPOINT_EVERY or time.monotonic() - self._checkpointed > CHECKPOINT_S:
            self.checkpoint()

    def checkpoint(self, mode: str = "PASSIVE") -> None:
        """Fold the WAL into the main file (``PASSIVE``: without waiting for readers; ``TRUNCATE``:
        and empty the ``-wal`` file). A no-op read-only."""
        if self.readonly:
            return
        self._since_checkpoint, self._checkpointed = 0, time.monotonic()
        with suppress(sqlite3.OperationalError):  # busy: the next one folds it in
            self._con.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()

    # --- runners and claims (several processes on one campaign) -------------------------------

    def join(self, pid: int | None = None) -> str:
        """Register this process as a runner; returns its owner id (``host:pid:token``)."""
        host, pid = socket.gethostname(), os.getpid() if pid is None else pid
        owner = f"{host}:{pid}:{secrets.token_hex(4)}"
        with self._write():
            self._con.execute(
                "INSERT INTO runners (owner, host, pid, heartbeat) VALUES (?, ?, ?, ?)",
                (owner, host, pid, time.time()),
            )
        return owner

    def leave(self, owner: str) -> None:
        """Drop ``owner``'s claims and runner row (its stored trials stay)."""
        with self._write():
            self._con.execute("DELETE FROM claims WHERE owner = ?", (owner,))
            self._con.execute("DELETE FROM runners WHERE owner = ?", (owner,))

    def claim(self, trial_ids: Sequence[str], owner: str) -> tuple[list[str], int, int]:
        """Claim for ``owner`` those of ``trial_ids`` neither stored nor claimed by a live runner, in
        one transaction; returns ``(claimed ids in the given order, n stored, n held by others)``."""
        ids = list(dict.fromkeys(trial_ids))
        if not ids:
            return [], 0, 0
        marks = ", ".join("?" * len(ids))
        with self._write():
            self._drop_dead_runners(owner)
            stored = {
                r[0]
                for r in self._con.execute(f"SELECT trial_id FROM trials WHERE trial_id IN ({marks})", ids)
            }
            held = {
                r[0]
                for r in self._con.execute(
                    f"SELECT trial_id FROM claims WHERE trial_id IN ({marks}) AND owner != ?", (*ids, owner)
                )
            }
            mine = [i for i in ids if i not in stored and i not in held]
            self._con.executemany(
                "INSERT OR REPLACE INTO claims (trial_id, owner) VALUES (?, ?)", [(i, owner) for i in mine]
            )
            self._con.execute("UPDATE runners SET heartbeat = ? WHERE owner = ?", (time.time(), owner))
        return mine, len(stored), len(held - stored)

    def claimed(self) -> int:
        """Trials claimed and not yet stored."""
        return int(
            self._con.execute(
                "SELECT COUNT(*) FROM claims WHERE trial_id NOT IN (SELECT trial_id FROM trials)"
            ).fetchone()[0]
        )

    def _drop_dead_runners(self, owner: str) -> None:
        host, now = socket.gethostname(), time.time()
        dead = [
            other
            for other, other_host, pid, beat in self._con.execute(
                "SELECT owner, host, pid, heartbeat FROM runners WHERE owner != ?", (owner,)
            )
            if not _alive(other_host, pid, beat, host, now)
        ]
        for other in dead:
            self._con.execute("DELETE FROM claims WHERE owner = ?", (other,))
            self._con.execute("DELETE FROM runners WHERE owner = ?", (other,))
        if (
            not dead
            and self._con.execute(
                "SELECT 1 FROM claims WHERE owner NOT IN (SELECT owner FROM runners) LIMIT 1"
            ).fetchone()
        ):
            self._con.execute("DELETE FROM claims WHERE owner NOT IN (SELECT owner FROM runners)")

    def heartbeat(self, owner: str) -> threading.Event:
        """Refresh ``owner``'s heartbeat every :data:`HEARTBEAT_S` from a daemon thread (its own
        connection) until the returned event is set."""
        stop = threading.Event()

        def beat() -> None:
            con = sqlite3.connect(self.path.resolve().as_uri() + "?mode=rw", uri=True, timeout=5.0)
            try:
                while not stop.wait(HEARTBEAT_S):
                    try:
                        with con:
                            con.execute(
                                "UPDATE runners SET heartbeat = ? WHERE owner = ?", (time.time(), owner)
                            )
                    except sqlite3.Error:
                        pass  # busy or gone: the next beat tries again
            finally:
                con.close()

        threading.Thread(target=beat, name=f"pytei-heartbeat-{owner}", daemon=True).start()
        return stop

    def _duplicates(self, values: list[tuple]) -> list[str]:
        ids = [v[0] for v in values]
        twice = {i for i, n in Counter(ids).items() if n > 1}
        stored = self.done_ids().intersection(ids)
        return sorted(twice | stored)

    def rows(self) -> list[dict]:
        """Every trial as a dict of :data:`COLUMNS`, in commit order; ``metrics`` a dict with NaN and
        infinities restored; the JSON columns as text."""
        by_trial: dict[str, dict[str, float]] = {}
        for trial_id, name, value, special in self._con.execute(
            "SELECT trial_id, name, value, special FROM metrics"
        ):
            by_trial.setdefault(trial_id, {})[name] = float(special) if special else value
        cur = self._con.execute(f"SELECT {', '.join(_STORED)} FROM trials ORDER BY rowid")
        out = []
        for r in cur:
            row = dict(zip(_STORED, r, strict=True))
            row["metrics"] = by_trial.get(row["trial_id"], {})
            out.append({c: row[c] for c in COLUMNS})
        return out

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
        """Close, first folding the WAL into the main file and truncating it (a writer)."""
        try:
            if not self.readonly:
                self.checkpoint("TRUNCATE")
        finally:
            self._con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _alive(host: str, pid: int, heartbeat: float, this_host: str, now: float) -> bool:
    """Whether a runner is still at work: its process exists (this host), else its heartbeat is recent."""
    if host != this_host:
        return now - heartbeat < STALE_S
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a zombie (killed, not yet reaped) is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


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
    out: dict[str, Any] = {name: getattr(row, name) for name in _STORED}
    for name, value in out.items():
        if value is None:
            continue
        if name in _JSONS:
            out[name] = json.dumps(value, default=_json_fallback)
        elif name in INT_COLUMNS:
            out[name] = int(value)
        elif name in REAL_COLUMNS:
            out[name] = float(value)
    return tuple(out.values())


def _encode_metrics(trial_id: str, values: Mapping[str, Any]) -> list[tuple]:
    """``(trial_id, name, value, special)`` rows; None values (not computed) are left out."""
    out = []
    for name, value in values.items():
        if value is None:
            continue
        v = float(value)
        finite = math.isfinite(v)
        out.append((trial_id, str(name), v if finite else None, None if finite else repr(v)))
    return out


# --- schema 1 -----------------------------------------------------------------------------------

#: The metric columns of schema 1 (the built-in metrics' keys; every results table still has them).
V1_METRICS = (
    "auc",
    "auc_valid",
    "invalid_frac",
    "logloss",
    "rmse",
    "rmse_valid",
    "baseline_auc",
    "baseline_rmse",
)
#: A schema-1 dummy model key, as ``DummyGrid.expand`` wrote it.
_V1_DUMMY = re.compile(r"dummy:(?P<args>.*)")
_V1_DUMMY_KEYS = {
    "depth": "mlp_depth",
    "hidden": "mlp_hidden",
    "embed": "embed_dim",
    "dense": "dense_dim",
    "sparse": "sparse_dim",
    "sparsity": "sparsity",
    "samples": "samples",
}


def _declared_targets(spec_text: str) -> set[str] | None:
    """Names of a schema-1 spec's targets other than ``per-parameter``; None if it has no per-parameter
    target (every trial then is of a declared one)."""
    try:
        targets = tomllib.loads(spec_text).get("targets", ["all"])
    except tomllib.TOMLDecodeError:
        return None
    targets = targets if isinstance(targets, list) else [targets]
    if "per-parameter" not in targets:
        return None
    return {t if isinstance(t, str) else target_name(t) for t in targets if t != "per-parameter"}


def _from_v1(row: dict[str, Any], declared: set[str] | None) -> tuple[dict[str, Any], list[tuple]]:
    """A schema-1 trial row as a schema-2 row and its metric rows."""
    nonfinite = json.loads(row["nonfinite"]) if row.get("nonfinite") else {}
    values = {m: row[m] for m in V1_METRICS if row.get(m) is not None}
    values.update({m: float(text) for m, text in nonfinite.items()})
    if row["bits"] is not None and json.loads(row["bits"]) is not None:
        kind = "bits"
    elif declared is not None and row["target"] not in declared:
        kind = "parameter"
    else:
        kind = "component"
    new = {
        **{c: row.get(c) for c in _STORED},
        "architecture": row["model_label"],
        "kind": kind,
        "model_config": _v1_dummy_config(row["model"]),
        "traceback": None,
    }
    return new, _encode_metrics(row["trial_id"], values)


def _v1_dummy_config(key: str) -> str | None:
    """The grid point of a schema-1 dummy model key (JSON), None for other models."""
    match = _V1_DUMMY.fullmatch(key)
    if match is None:
        return None
    config: dict[str, Any] = {"dense_dim": 128, "sparse_dim": 8192}  # the defaults keys leave out
    for part in match["args"].split(","):
        name, _, value = part.partition("=")
        if name in _V1_DUMMY_KEYS:
            config[_V1_DUMMY_KEYS[name]] = float(value) if name == "sparsity" else int(value)
    return json.dumps({k: config.get(k) for k in DUMMY_CONFIG_KEYS})
