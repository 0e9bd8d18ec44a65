"""Campaign execution: resume after kill -9, executors agree, fast paths are exact, failures recorded."""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from pytei.campaign import load_spec, plan
from pytei.campaign.execute import resume_campaign, run_campaign
from pytei.campaign.runner import ModelRunner, load_evaluation
from pytei.campaign.store import SpecMismatch, Store
from pytei.incremental import PATHS
from pytei.results import load

SPEC = """
name = "tiny"
seed = 3
runs = 2
targets = [
    { component = "all", params = "weight" },
    { component = "mlp", params = "weight" },
    { component = "embedding", params = "weight" },
    { component = "mlp", include = ["predictor.*"], label = "predictor" },
]
sites = ["weights"]
mitigations = ["none", "clip"]
metrics = ["rmse"]

[[models]]
dummy = { mlp_depth = 2, mlp_hidden = 32, embed_dim = 16, sparsity = 0.02, sparse_dim = 512, dense_dim = 16 }
samples = 300

[errors]
model = "BitFlip"
rates = [1e-4, 1e-3]
"""

METRICS = ["n_faults", "n_invalid", "rmse", "rmse_valid", "baseline_rmse"]


@pytest.fixture
def spec_path(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(SPEC)
    return path


def table(db) -> dict[str, tuple]:
    df = load(db)
    assert df.trial_id.is_unique
    return {r.trial_id: tuple(getattr(r, m) for m in METRICS) + (r.status,) for r in df.itertuples()}


def same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for x, y in zip(a[key], b[key], strict=True):
            assert x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)), (key, a[key], b[key])


def test_campaign_runs_every_planned_trial(spec_path, tmp_path):
    spec = load_spec(spec_path)
    result = run_campaign(spec, tmp_path / "r.db", base_dir=spec_path.parent, progress=False)
    planned = {t.trial_id for t in plan(spec)}
    assert result.ran == len(planned) == 2 * 4 * 2 * 2 and result.failed == 0
    rows = table(tmp_path / "r.db")
    assert set(rows) == planned
    again = run_campaign(spec, tmp_path / "r.db", base_dir=spec_path.parent, progress=False)
    assert again.ran == 0 and again.skipped == len(planned)  # nothing runs twice


def test_kill_9_mid_campaign_then_resume(spec_path, tmp_path):
    child = textwrap.dedent(f"""
        import os, signal
        from pytei.campaign import load_spec
        from pytei.campaign.execute import run_campaign
        from pytei.campaign.store import Store
        original, calls = Store.record, []
        def record(self, row):
            calls.append(row)
            if len(calls) == 8:  # trial 8 finished but not yet stored: the process dies here
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, row)
        Store.record = record
        run_campaign(load_spec({str(spec_path)!r}), {str(tmp_path / "k.db")!r}, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    with Store(tmp_path / "k.db", create=False) as store:
        assert store.counts()["ok"] == 7
    resumed = resume_campaign(tmp_path / "k.db", progress=False)
    assert resumed.skipped == 7 and resumed.ran == 32 - 7
    run_campaign(load_spec(spec_path), tmp_path / "u.db", progress=False)
    same(table(tmp_path / "k.db"), table(tmp_path / "u.db"))  # same trials, same results, no duplicates


def test_process_pool_equals_in_process(spec_path, tmp_path):
    spec = load_spec(spec_path)
    run_campaign(spec, tmp_path / "a.db", progress=False)
    run_campaign(spec, tmp_path / "b.db", workers=2, progress=False)
    same(table(tmp_path / "a.db"), table(tmp_path / "b.db"))


def test_fast_paths_equal_full_evaluation(spec_path):
    trials = plan(load_spec(spec_path))
    fast = ModelRunner(load_evaluation(trials[0], batch_size=64))
    slow = ModelRunner(load_evaluation(trials[0], batch_size=64), fast=False)
    paths = set()
    for t in trials:
        a, b = fast.run(t), slow.run(t)
        paths.add(a.extra["path"])
        assert a.metrics.keys() == b.metrics.keys() and {"rmse", "baseline_rmse"} <= a.metrics.keys()
        for m in a.metrics:
            x, y = a.metrics[m], b.metrics[m]
            assert x == y or (math.isnan(x) and math.isnan(y)), (t.target, t.rate, m, x, y)
    assert "subgraph" in paths and paths & {"rows", "samples"}, paths  # node and row reuse both exercised


def test_failing_trial_is_recorded_and_campaign_goes_on(tmp_path):
    spec_text = SPEC.replace(
        '{ component = "embedding", params = "weight" },', '{ component = "attention" },'
    )
    path = tmp_path / "bad.toml"
    path.write_text(spec_text)
    result = run_campaign(load_spec(path), tmp_path / "f.db", progress=False)
    df = load(tmp_path / "f.db")
    failed = df[df.status == "failed"]
    assert result.failed == len(failed) == 8 and (df.status == "ok").sum() == 24
    assert failed.error_message.str.contains("target 'attention' matches no parameter").all()


def test_a_different_spec_is_refused(spec_path, tmp_path):
    run_campaign(load_spec(spec_path), tmp_path / "r.db", progress=False)
    other = tmp_path / "other.toml"
    other.write_text(SPEC.replace("seed = 3", "seed = 4"))
    with pytest.raises(SpecMismatch, match="belongs to campaign 'tiny'"):
        run_campaign(load_spec(other), tmp_path / "r.db", progress=False)


def test_restore_drift_is_detected(spec_path):
    trials = plan(load_spec(spec_path))
    runner = ModelRunner(load_evaluation(trials[0]))
    runner.verify()
    with torch.no_grad():
        next(runner.model.parameters()).view(-1)[0] += 1.0
    with pytest.raises(RuntimeError, match="drifted from their clean state"):
        runner.verify()


def test_extra_is_json(spec_path, tmp_path):
    run_campaign(load_spec(spec_path), tmp_path / "r.db", progress=False)
    extra = [json.loads(e) for e in load(tmp_path / "r.db").extra]
    assert {e["path"] for e in extra} <= set(PATHS)


ADAPTIVE = """
name = "adaptive"
seed = 1
targets = [{ component = "mlp", params = "weight" }]
mitigations = ["none", "clip"]
metrics = ["rmse", "agree"]

[confidence]
metric = "agree"
halfwidth = 0.3
min_runs = 3
max_runs = 9

[[models]]
dummy = { mlp_depth = 1, mlp_hidden = 16, embed_dim = 8, sparsity = 0.02, sparse_dim = 64, dense_dim = 8 }
samples = 200

[errors]
model = "BitFlip"
rates = [1e-5, 3e-3, 3e-2]
"""


@pytest.fixture
def agree_metric():
    """A bounded metric of the clean outputs (share of outputs within 1e-6 of them), so the
    distribution-free interval can close before max_runs (an RMSE's upper end is unbounded)."""
    from pytei import metrics

    def agree(s, y, g):
        return float(((s - g).abs() <= 1e-6).double().mean())

    metrics.register("agree", agree, needs_golden=True, bounds=(0.0, 1.0))
    yield
    metrics.register.remove("agree")


def test_adaptive_confidence_campaign_stops_each_point_by_the_rule(tmp_path, agree_metric):
    from pytei import stats

    path = tmp_path / "adaptive.toml"
    path.write_text(ADAPTIVE)
    spec = load_spec(path)
    conf = spec.confidence
    first = run_campaign(spec, tmp_path / "a.db", progress=False)
    df = load(tmp_path / "a.db")
    assert first.failed == 0 and first.ran == len(df) and first.planned == 3 * 2 * conf.max_runs
    stopped = set()
    for _, point in df.groupby(["rate", "mitigation"]):
        runs = sorted(point["run"])
        assert runs == list(range(len(runs)))  # runs are taken in order, none skipped
        values = point.sort_values("run")["agree"].tolist()

        def halfwidth(n, values=values):
            low, high = stats.interval(values[:n], level=conf.level, bounds=(0.0, 1.0))
            return (high - low) / 2

        # the stopping rule, replayed: the first n >= min_runs whose interval is narrow enough
        expected = next(
            (n for n in range(conf.min_runs, conf.max_runs) if halfwidth(n) <= conf.halfwidth), conf.max_runs
        )
        assert len(runs) == expected, (point["rate"].iloc[0], point["mitigation"].iloc[0], values)
        stopped.add(len(runs))
    assert min(stopped) < conf.max_runs  # some points (no fault landed: all agree) stopped early
    assert min(stopped) >= conf.min_runs
    again = run_campaign(spec, tmp_path / "a.db", progress=False)  # a finished adaptive campaign is done
    assert again.ran == 0 and again.skipped == len(df)


def test_cache_budget_flag(spec_path, tmp_path, monkeypatch, capsys):
    from pytei.cli import main
    from pytei.incremental import BUDGET_VARIABLE

    monkeypatch.setenv(BUDGET_VARIABLE, "")  # restored after the test: main() sets it for its workers
    assert main(["campaign", "run", str(spec_path), "--db", str(tmp_path / "a.db")]) == 0
    assert (
        main(["campaign", "run", str(spec_path), "--db", str(tmp_path / "b.db"), "--cache-budget", "0"]) == 0
    )
    same(table(tmp_path / "a.db"), table(tmp_path / "b.db"))  # nothing kept: slower, the same results
    with pytest.raises(SystemExit) as exit_:
        main(["campaign", "run", str(spec_path), "--db", str(tmp_path / "c.db"), "--cache-budget", "lots"])
    assert exit_.value.code == 2 and "cache budget 'lots' is not a size" in capsys.readouterr().err


def test_the_trial_count_is_printed_before_planning(spec_path, tmp_path, capsys, monkeypatch):
    import pytei.campaign.execute as execute

    spec = load_spec(spec_path)
    made = []
    real = execute.iter_plan

    def watched(*args, **kwargs):
        made.append(capsys.readouterr().err)  # what was printed before the first trial was made
        return real(*args, **kwargs)

    monkeypatch.setattr(execute, "iter_plan", watched)
    run_campaign(spec, tmp_path / "p.db", base_dir=spec_path.parent, progress=True)
    assert made and f"campaign tiny: {len(plan(spec))} trials planned" in made[0]
