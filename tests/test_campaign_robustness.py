"""Campaigns under interruption, concurrency and odd inputs (issue 15, section "Campaigns").

One regression test per defect: a checkpoint changed between run and resume, a huge grid, a database
in a read-only folder, two runners on one database, a lost ``-wal`` file, ``kill -9`` of a pool's
parent, a campaign whose every trial fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytei.campaign import load_spec, plan
from pytei.campaign.execute import resume_campaign, run_campaign
from pytei.campaign.store import SpecMismatch, Store
from pytei.results import load

SPEC = """
name = "robust"
seed = 5
runs = {runs}
targets = [{{ component = "all", params = "weight" }}]
metrics = ["rmse"]

[[models]]
dummy = {{ mlp_depth = 1, mlp_hidden = 8, embed_dim = 4, sparsity = 0.05, sparse_dim = 64, dense_dim = 8 }}
samples = 64

[errors]
model = "BitFlip"
rates = [1e-4, 1e-3]
"""


def write_spec(tmp_path: Path, runs: int = 3, text: str | None = None) -> Path:
    path = tmp_path / "robust.toml"
    path.write_text(text if text is not None else SPEC.format(runs=runs))
    return path


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pytei.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


# --- 1. resume must not mix models ---------------------------------------------------------------


CKPT_SPEC = """
name = "ckpt"
runs = 2
metrics = ["auc"]

[[models]]
checkpoint = "ck"

[errors]
model = "BitFlip"
rates = [1e-4]
"""


def test_a_checkpoint_changed_between_run_and_resume_is_refused(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "meta.json").write_text('{"format": "x"}')
    (ck / "model.safetensors").write_bytes(b"weights of the first model")
    spec = load_spec(write_spec(tmp_path, text=CKPT_SPEC))
    db = tmp_path / "c.db"
    run_campaign(spec, db, base_dir=tmp_path, progress=False)  # trials fail to load: fine here
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM metrics")
        con.execute("DELETE FROM trials WHERE run = 1")  # an interrupted campaign
    (ck / "model.safetensors").write_bytes(b"weights of a retrained model")
    with pytest.raises(SpecMismatch, match=r"checkpoint .*ck.* changed"):
        resume_campaign(db, progress=False)
    with pytest.raises(SpecMismatch, match=str(ck)):
        run_campaign(spec, db, base_dir=tmp_path, progress=False)
    (ck / "model.safetensors").write_bytes(b"weights of the first model")  # the same content again
    assert resume_campaign(db, progress=False).ran == 1


def test_a_database_without_fingerprints_still_resumes(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path))
    db = tmp_path / "r.db"
    run_campaign(spec, db, base_dir=tmp_path, progress=False)
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM meta WHERE key = 'model_fingerprints'")
        con.execute("DELETE FROM metrics")
        con.execute("DELETE FROM trials WHERE run = 2")
    assert resume_campaign(db, progress=False).ran == 2


# --- 2. planning is counted first, streamed, and a huge grid needs confirmation ------------------


def test_a_huge_grid_is_counted_without_planning_and_refused_without_yes(tmp_path: Path) -> None:
    grid = "rates = { start = 1e-9, stop = 1e-1, per_decade = 12 }"  # 97 rates
    text = SPEC.format(runs=100_000).replace("rates = [1e-4, 1e-3]", grid)
    path = write_spec(tmp_path, text=text)
    started = time.monotonic()
    out = cli("campaign", "run", str(path), "--db", str(tmp_path / "h.db"))
    assert time.monotonic() - started < 30
    assert out.returncode == 2, out.stderr
    assert "9,700,000 trials" in out.stderr and "--yes" in out.stderr
    assert out.stderr.count("\n") == 2 and "Traceback" not in out.stderr  # the estimate, the error
    assert "9,700,000" in out.stderr.splitlines()[0]


def test_the_trial_count_equals_the_plan(tmp_path: Path) -> None:
    from pytei.campaign.plan import count_trials

    more = 'metrics = ["rmse"]\nsites = ["weights", "activations"]\nmitigations = ["none", "ecc"]'
    text = SPEC.format(runs=3).replace('metrics = ["rmse"]', more)
    spec = load_spec(write_spec(tmp_path, text=text))
    assert count_trials(spec) == len(plan(spec)) == 2 * 3 * 2 + 2 * 3 * 1  # ecc skips activations


def test_a_grid_over_the_limit_runs_when_confirmed(tmp_path: Path) -> None:
    from pytei.campaign.execute import TooManyTrials

    spec = load_spec(write_spec(tmp_path, runs=2))
    with pytest.raises(TooManyTrials, match="4 trials"):
        run_campaign(spec, tmp_path / "a.db", progress=False, max_trials=3)
    assert run_campaign(spec, tmp_path / "a.db", progress=False, max_trials=3, confirm=True).ran == 4


# --- 3. reading a database in a read-only folder -------------------------------------------------


def _read_only(folder: Path) -> None:
    if os.geteuid() == 0:  # root ignores permission bits: make the folder immutable instead
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
            pytest.skip("running as root without chattr: cannot make a folder read-only")
    else:
        folder.chmod(0o555)


def _writable(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=False)
    folder.chmod(0o755)


def test_a_database_in_a_read_only_folder_can_be_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pytei.cli import main

    spec = load_spec(write_spec(tmp_path, runs=2))
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "r.db"
    run_campaign(spec, db, base_dir=tmp_path, progress=False)
    assert not Path(f"{db}-wal").exists()
    _read_only(folder)
    try:
        assert len(load(db)) == 4
        capsys.readouterr()
        assert main(["campaign", "status", str(db)]) == 0
        assert "4" in capsys.readouterr().out
        assert main(["campaign", "export", str(db), "--out", str(tmp_path / "out.csv")]) == 0
        assert len((tmp_path / "out.csv").read_text().splitlines()) == 5
        assert main(["campaign", "resume", str(db)]) == 2  # writing is refused in one line, naming the file
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith(f"error: cannot write to {db} (") and "Traceback" not in err
        assert "its file or folder is read-only" in err
    finally:
        _writable(folder)


# --- 4. two runners on one database cooperate ----------------------------------------------------


#: A sitecustomize that holds each process at start until both have started, and makes each trial take
#: 10 ms longer: the two runners reach the database together and the first cannot finish all 300
#: trials (a few ms each) while the second waits for its turn to write, whatever the machine's load.
BARRIER = """
import os, pathlib, time

where = os.environ.get("PYTEI_TEST_BARRIER")
if where:
    pathlib.Path(where, str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(os.listdir(where)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    from pytei.campaign import runner

    run = runner.ModelRunner.run

    def slower(self, trial):
        time.sleep(0.01)
        return run(self, trial)

    runner.ModelRunner.run = slower
"""


def test_two_campaign_runs_on_one_database_share_the_trials(tmp_path: Path) -> None:
    path = write_spec(tmp_path, runs=150)
    db = tmp_path / "shared.db"
    args = [sys.executable, "-m", "pytei.cli", "campaign", "run", str(path), "--db", str(db)]
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BARRIER)
    (tmp_path / "barrier").mkdir()
    site = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": site,
        "PYTEI_TEST_BARRIER": str(tmp_path / "barrier"),
    }
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)]
    procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    df = load(db)
    assert df.trial_id.is_unique and len(df) == 300
    assert set(df.trial_id) == {t.trial_id for t in plan(load_spec(path))}
    assert df.worker.nunique() == 2  # both ran some: neither exited on "already stored"
    with Store(db, create=False, readonly=True) as store:
        assert store.claimed() == 0  # nothing is left claimed


def test_the_claims_of_a_dead_runner_are_taken_over(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, runs=2))
    db = tmp_path / "c.db"
    trials = plan(spec)
    with Store(db) as store:
        store.attach_spec(spec.text, spec.hash, spec.name, len(trials))
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
        owner = store.join(pid=int(dead.stdout))  # a runner that was killed after claiming
        assert store.claim([t.trial_id for t in trials], owner)[0] == [t.trial_id for t in trials]
    result = run_campaign(spec, db, base_dir=tmp_path, progress=False)
    assert result.ran == 4


# --- 5. the WAL is checkpointed ------------------------------------------------------------------


def test_a_lost_wal_file_loses_no_trial(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, runs=3))
    db = tmp_path / "w.db"
    with Store(db):  # another reader holds the database open, so closing does not fold the WAL in
        run_campaign(spec, db, base_dir=tmp_path, progress=False)
        copy = tmp_path / "copy.db"
        shutil.copy(db, copy)  # the main file alone, as a lost -wal file leaves it
    assert len(load(copy)) == 6


# --- 6. kill -9 of the parent of --workers N -------------------------------------------------------


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parents.items() if pp == p}
        out |= kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for_trials(db: Path, at_least: int, timeout: float = 40.0) -> bool:
    """Wait until ``db`` has its trials table holding ``at_least`` trials; whether that happened in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.exists():
            with sqlite3.connect(db) as con:
                n = con.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'trials'").fetchone()[0]
                if n and con.execute("SELECT COUNT(*) FROM trials").fetchone()[0] >= at_least:
                    return True
        time.sleep(0.1)
    return False


def _survivors(workers: set[int], timeout: float = 5.0) -> list[int]:
    """The ``workers`` still alive after waiting up to ``timeout`` seconds for them to end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    return [w for w in workers if _alive(w)]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_kill_9_of_the_parent_leaves_no_worker(tmp_path: Path) -> None:
    path = write_spec(tmp_path, runs=5000)
    db = tmp_path / "k.db"
    args = [sys.executable, "-m", "pytei.cli", "campaign", "run", str(path), "--db", str(db)]
    args += ["--workers", "2"]
    parent = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        if not _wait_for_trials(db, 20):
            pytest.fail("the campaign stored no trials")
        workers = _children(parent.pid)
        assert len(workers) >= 2
        parent.kill()
        parent.wait()
        assert not _survivors(workers)
    finally:
        parent.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def test_ctrl_c_of_a_pool_campaign_prints_no_worker_traceback(tmp_path: Path) -> None:
    path = write_spec(tmp_path, runs=5000)
    db = tmp_path / "i.db"
    args = [sys.executable, "-m", "pytei.cli", "campaign", "run", str(path), "--db", str(db)]
    args += ["--workers", "2"]
    pipe = subprocess.PIPE
    proc = subprocess.Popen(args, stdout=pipe, stderr=pipe, text=True, start_new_session=True)
    try:
        _wait_for_trials(db, 0)  # the table exists, the pool is starting: its workers import pytei and torch
        time.sleep(0.5)
        workers = _children(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert not _survivors(workers)


# --- 7. a campaign whose trials all fail ---------------------------------------------------------


def test_a_campaign_whose_trials_all_fail_exits_2(tmp_path: Path) -> None:
    target = '{ component = "all", params = "weight" }'
    text = SPEC.format(runs=2).replace(target, '{ component = "attention" }')
    path = write_spec(tmp_path, text=text)
    out = cli("campaign", "run", str(path), "--db", str(tmp_path / "f.db"))
    assert out.returncode == 2, (out.stdout, out.stderr)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "all 4 trials failed" in errors[0]
    assert "target 'attention' matches no parameter" in errors[0] and "Traceback" not in out.stderr
    help_text = cli("campaign", "run", "--help").stdout
    assert "exit status" in help_text.lower()
