"""The Ray executor on a private local instance (skipped when ray is not installed)."""

import pytest

ray = pytest.importorskip("ray")

from pytei.campaign import parse_spec, plan  # noqa: E402
from pytei.campaign.execute import RayExecutor, run_campaign  # noqa: E402
from test_campaign import SPEC, same, table  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    yield
    ray.shutdown()


def test_ray_equals_in_process(local_ray, tmp_path):
    spec = parse_spec(SPEC)
    run_campaign(spec, tmp_path / "a.db", progress=False)
    run_campaign(spec, tmp_path / "b.db", ray_address="local", workers=2, progress=False)
    same(table(tmp_path / "a.db"), table(tmp_path / "b.db"))


def test_lost_actor_is_restarted_and_its_trials_retried(local_ray):
    trials = plan(parse_spec(SPEC))
    executor = RayExecutor("local", workers=2)
    rows = []
    try:
        for row in executor.run(trials):
            rows.append(row)
            if len(rows) == 1:
                ray.kill(executor.actors[0], no_restart=False)  # a worker dies mid-campaign
    finally:
        executor.close()
    assert sorted(r.trial_id for r in rows) == sorted(t.trial_id for t in trials)
