"""Sharded inference (``pytei.distributed``): every strategy receives exactly the unsharded model's
faults, host faults do what they say, XOR parity rebuilds a lost host bit for bit, and no rank
outlives its group or its parent. Two ranks on loopback (gloo), a small trained dlrm-torchrec."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchrec")

import pytei  # noqa: E402
from pytei import BitFlip, data, models  # noqa: E402
from pytei.campaign.store import Store  # noqa: E402
from pytei.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pytei.distributed import (  # noqa: E402
    DistributedError,
    HostLoss,
    HostSDC,
    HostSlow,
    HostStale,
    ShardedGroup,
)
from pytei.distributed.parity import sum_parity, sum_rebuild, xor_parity, xor_rebuild  # noqa: E402
from pytei.exceptions import ArgumentError  # noqa: E402
from pytei.train import TrainConfig, fit  # noqa: E402

OPTIONS = {"n_rows": 2000, "field_dims": [100, 50, 20, 10]}
BATCH = 32
RATE = 1e-3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A 1-epoch dlrm-torchrec on synthetic-ctr (KJT batches), and an older version of it (untrained)."""
    root = tmp_path_factory.mktemp("dist")
    dataset = data.load("synthetic-ctr", layout="dense+kjt", **OPTIONS)
    torch.manual_seed(0)
    model = models.create("dlrm-torchrec", field_dims=dataset.field_dims, dense_dim=dataset.dense_dim)
    old = save_checkpoint(root / "old", model, dataset, data_options=OPTIONS)
    config = TrainConfig(lr=3e-3, max_epochs=1, patience=1, batch_size=256)
    trained = fit(model, dataset, config, progress=False)
    return save_checkpoint(root / "new", trained.model, dataset, data_options=OPTIONS), old


@pytest.fixture(scope="module")
def reference(checkpoints):
    """The unsharded model and its test inputs."""
    ckpt = load_checkpoint(checkpoints[0])
    return ckpt.model.eval(), ckpt.data.model_inputs(ckpt.data.test.inputs)


def unsharded(reference, overwrite=None, **inject):
    """The unsharded model's logits, with ``inject`` faults and ``overwrite(state_dict)`` applied."""
    model, inputs = reference
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            if overwrite is not None:
                overwrite(model.state_dict())
            if inject:
                with pytei.inject(model, **inject):
                    return model(*inputs)
            return model(*inputs)
    finally:
        model.load_state_dict(saved)


def pieces(group, rank):
    """(table, row, col, rows, cols) of each piece ``rank`` holds."""
    return [(t, *p) for t, ps in group.placement[rank]["pieces"].items() for p in ps]


@pytest.fixture(scope="module", params=["table_wise", "column_wise", "table_column_wise", "data_parallel"])
def group(request, checkpoints):
    with ShardedGroup(checkpoints[0], request.param, 2, batch_size=BATCH) as g:
        yield g


def test_every_strategy_scores_and_faults_exactly_as_the_unsharded_model(group, reference):
    clean = unsharded(reference)
    assert torch.equal(group.evaluate().logits, clean)
    faulty = group.evaluate(BitFlip(RATE), seed=3)
    expected = unsharded(reference, error=BitFlip(RATE), seed=3, target="embedding")
    assert faulty.faults > 0 and torch.equal(faulty.logits.nan_to_num(), expected.nan_to_num())
    assert faulty.metrics()["auc"] == pytest.approx(pytei.metrics.auc(expected, faulty.labels)["auc"], abs=0)
    replicas = 2 if group.strategy == "data_parallel" else 1
    assert faulty.applied == replicas * faulty.faults  # each fault written once per copy of its table
    assert torch.equal(group.evaluate().logits, clean)  # restored on every rank


def test_silent_corruption_stays_in_the_host_that_holds_it(group, reference):
    sdc = group.evaluate(fault=HostSDC(1, BitFlip(RATE)), seed=3)
    everywhere = group.evaluate(BitFlip(RATE), seed=3)
    assert 0 < sdc.faults < everywhere.faults or group.strategy == "data_parallel"
    if group.strategy != "data_parallel":  # the host's share of the global faults, nothing else
        held = {t for t, *_ in pieces(group, 1)}
        expected = unsharded(reference, error=BitFlip(RATE), seed=3, target="embedding", include=sorted(held))
        if group.strategy == "table_wise":
            assert torch.equal(sdc.logits.nan_to_num(), expected.nan_to_num())
    else:  # a replica's corruption reaches only the samples that host serves
        changed = ~torch.eq(sdc.logits, group.evaluate().logits)
        served = group.placement[1]["rows"]
        assert changed.any() and not changed[~torch.isin(torch.arange(changed.numel()), served)].any()


@pytest.mark.parametrize("fill", ["zeros", "mean", "default_row"])
def test_a_lost_host_serves_its_fill(group, reference, fill):
    lost = group.evaluate(fault=HostLoss(1, fill))
    if group.strategy == "data_parallel":
        return  # checked below: one replica lost changes only its own samples

    def fill_pieces(sd):
        for table, r0, c0, rs, cs in pieces(group, 1):
            block = sd[table][r0 : r0 + rs, c0 : c0 + cs]
            if fill == "zeros":
                block.zero_()
            elif fill == "mean":
                block.copy_(sd[table][:, c0 : c0 + cs].double().mean(0).float().expand(rs, cs))
            else:
                block.copy_(sd[table][0, c0 : c0 + cs].clone().expand(rs, cs))

    assert torch.equal(lost.logits, unsharded(reference, overwrite=fill_pieces))


def test_lost_replica_changes_only_its_own_samples_and_every_recovery_restores(group, reference):
    clean = group.evaluate().logits
    lost = group.evaluate(fault=HostLoss(1, "zeros"))
    changed = ~torch.eq(lost.logits, clean)
    assert changed.any()
    if group.strategy == "data_parallel":
        served = torch.isin(torch.arange(clean.numel()), group.placement[1]["rows"])
        assert not changed[~served].any()
    xor = group.evaluate(fault=HostLoss(1, "zeros", recover="xor"))
    assert xor.recovery["exact"] and torch.equal(xor.logits, clean)
    assert 0 < xor.recovery["storage_overhead"] <= 1.0 and xor.recovery["rebuild_s"] >= 0
    replica = group.evaluate(fault=HostLoss(1, "zeros", recover="replica"))
    assert torch.equal(replica.logits, clean)
    summed = group.evaluate(fault=HostLoss(1, "zeros", recover="sum"))
    assert summed.recovery["max_abs_error"] < 1e-6  # two hosts: one rounding of |values| < 1
    assert (summed.logits - clean).abs().max() < 1e-4


def test_a_stale_host_serves_the_older_tables(group, reference, checkpoints):
    old = load_checkpoint(checkpoints[1], with_data=False).model.state_dict()
    stale = group.evaluate(fault=HostStale(1, checkpoints[1]))
    if group.strategy == "data_parallel":
        return

    def older(sd):
        for table, r0, c0, rs, cs in pieces(group, 1):
            sd[table][r0 : r0 + rs, c0 : c0 + cs] = old[table][r0 : r0 + rs, c0 : c0 + cs]

    assert torch.equal(stale.logits, unsharded(reference, overwrite=older))


def test_a_slow_host_adds_latency_and_changes_no_output(group):
    """A request is done when its slowest rank is: a 20 ms host makes every request take >= 20 ms."""
    assert torch.equal(group.evaluate(fault=HostSlow(1, 5.0), seed=1).logits, group.evaluate().logits)
    fast = group.latency(batch=BATCH, requests=8)
    slow = group.latency(batch=BATCH, requests=8, fault=HostSlow(1, 20.0))
    assert slow["p50_ms"] >= 20.0 > fast["p50_ms"] and slow["p99_ms"] >= slow["p50_ms"]
    pooled8 = group.latency(batch=BATCH, requests=2, pooling=8, fault=HostSlow(0, 20.0))  # sparser requests
    assert pooled8["p50_ms"] >= 20.0
    with pytest.raises(ArgumentError, match="pooling must be an int >= 1"):
        group.latency(pooling=0)


def test_pooled_requests_keep_each_row_id_and_draw_the_rest_in_its_field():
    from pytei.distributed._rank import pooled

    ids = torch.tensor([[3, 0], [9, 4]])
    multi, lengths = pooled(ids, [10, 5], 6, torch.Generator().manual_seed(0))
    assert multi.shape == (2, 2, 6) and multi.dtype == ids.dtype and (lengths == 6).all()
    assert torch.equal(multi[:, :, 0], ids)  # each row's own id first
    assert (multi[:, 0] < 10).all() and (multi[:, 1] < 5).all() and (multi >= 0).all()
    again, _ = pooled(ids, [10, 5], 6, torch.Generator().manual_seed(0))
    assert torch.equal(multi, again)  # seeded
    assert torch.equal(pooled(ids, [10, 5], 1, torch.Generator())[0][:, :, 0], ids)


def test_parity_rebuilds_xor_exactly_and_sums_within_rounding():
    gen = torch.Generator().manual_seed(0)
    blocks = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for n in (1000, 997, 640)]
    parity = xor_parity(blocks)
    for lost in range(3):
        survivors = [b for i, b in enumerate(blocks) if i != lost]
        assert torch.equal(xor_rebuild(parity, survivors, blocks[lost].numel()), blocks[lost])
    values = [torch.randn(n, generator=gen) for n in (1000, 997, 640)]
    total = sum_parity(values)
    for lost in range(3):
        survivors = [b for i, b in enumerate(values) if i != lost]
        rebuilt = sum_rebuild(total, survivors, values[lost].numel())
        bound = 4 * torch.finfo(torch.float32).eps * torch.stack([v[:640].abs() for v in values]).sum(0).max()
        assert (rebuilt - values[lost]).abs().max() <= bound
    with pytest.raises(ValueError, match="1-D torch.uint8"):
        xor_parity([torch.zeros(3)])


def test_bad_requests_are_clear_errors(checkpoints):
    with pytest.raises(ArgumentError, match="'row_wise' needs GPUs: TorchRec's planner has no CPU kernel"):
        ShardedGroup(checkpoints[0], "row_wise", 2)
    with pytest.raises(ArgumentError, match="unknown sharding strategy 'diagonal'; allowed: table_wise"):
        ShardedGroup(checkpoints[0], "diagonal", 2)
    with pytest.raises(ArgumentError, match="unknown HostLoss fill 'ones'; allowed: zeros, mean, default_"):
        HostLoss(0, "ones")
    with pytest.raises(ArgumentError, match="rank must be an int >= 0, got -1"):
        HostSlow(-1, 1.0)
    with pytest.raises(ArgumentError, match="rank 2 is not a rank of a world of 2"):
        HostLoss(2).check_world(2)


def test_a_model_without_torchrec_tables_is_refused_before_any_rank_starts(tmp_path):
    dataset = data.load("synthetic-ctr", **OPTIONS)
    model = models.create("fm", field_dims=dataset.field_dims)
    fm = save_checkpoint(tmp_path / "fm", model, dataset, data_options=OPTIONS)
    group = ShardedGroup(fm, "table_wise", 2)
    with pytest.raises(ArgumentError, match="holds 'fm', which has no float TorchRec EmbeddingBagCollection"):
        group.start()
    assert group.pids == []


def test_a_killed_rank_fails_the_trial_with_a_clear_error_and_leaves_no_process(checkpoints):
    g = ShardedGroup(checkpoints[0], "table_wise", 2, batch_size=BATCH, timeout=30)
    g.start()
    pids = g.pids
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(DistributedError, match=r"rank 1 of 2 \(table_wise\) died \(exit code -9\)"):
        g.evaluate()
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, waiting to be reaped
        return f.read().split()[2] != "Z"


def test_ranks_die_with_their_parent(checkpoints, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        from pytei.distributed import ShardedGroup
        if __name__ == "__main__":
            g = ShardedGroup({str(checkpoints[0])!r}, "table_wise", 2, batch_size={BATCH})
            g.start()
            print(*g.pids, flush=True)
            time.sleep(600)
        """
    )
    path = tmp_path / "parent.py"
    path.write_text(script)
    parent = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


# --------------------------------------------------------------------------- the study


def test_the_study_stores_each_trial_once_and_survives_a_killed_rank(checkpoints, tmp_path, monkeypatch):
    """The study is a campaign: a rank killed mid-trial fails that trial (one line naming the rank), the
    rest run on a fresh group, a rerun runs nothing again, and the report's section reads the trials."""
    from pytei import distributed_study as study
    from pytei.campaign import sharded
    from pytei.report import write_report

    sizes = study.DistributedSizes(
        strategies=("table_wise",), world_sizes=(2,), runs=1, fills=("zeros",), recoveries=("xor",),
        parity_groups=(), test_rows=200, batch_size=BATCH, latency_requests=3,
    )  # fmt: skip
    # per rank: HostSDC, HostLoss(zeros), HostLoss(xor), HostStale, HostSlow; and the global point
    planned = 1 + 2 * 5
    run = sharded.ShardedRunner._run
    calls = {"n": 0}

    def killing(self, trial, started):
        calls["n"] += 1
        if calls["n"] == 3:  # the third trial: one rank dies while it runs
            os.kill(self.group.pids[1], signal.SIGKILL)
            time.sleep(0.5)
        return run(self, trial, started)

    monkeypatch.setattr(sharded.ShardedRunner, "_run", killing)
    db = tmp_path / "dist.db"
    first = study.run_study(checkpoints[0], db, sizes, stale=checkpoints[1])
    assert len(first) == planned == first["trial_id"].nunique()
    failed = first[first["status"] == "failed"]
    assert len(failed) == 1
    assert "rank 1 of 2 (table_wise) died (exit code -9)" in failed["error_message"].iloc[0]
    ok = first[first["status"] == "ok"]
    assert ok["baseline_auc"].nunique() == 1 and ok["auc"].notna().all()  # one fault-free model
    assert set(ok["model_label"]) == {"dlrm-torchrec table_wise x2"}
    recovered = ok[ok["mitigation"] == "xor"]
    assert (recovered["rebuilt_exactly"] == 1).all() and (recovered["auc"] == recovered["baseline_auc"]).all()
    slow = ok[ok["error_model"].str.startswith("HostSlow")]
    assert (slow["p50_ms"] >= sizes.slow_ms).all() and (slow["blast_samples"] == 0).all()
    again = study.run_study(checkpoints[0], db, sizes, stale=checkpoints[1])
    assert sorted(again["trial_id"]) == sorted(first["trial_id"])  # nothing run twice, nothing lost
    with Store(db, create=False, readonly=True) as store:  # both models' contents bind the database
        assert set(store.fingerprints()) == {str(Path(c).resolve()) for c in checkpoints}
    md = write_report(again, tmp_path / "report", extras={"distributed": again}, sections=("distributed",))
    text = md.read_text()
    assert "## 1. Distributed inference" in text and "| table_wise x2 | HostLoss(fill=zeros) |" in text
    assert "| table_wise x2 | none | - | " in text  # the fault-free row, with its latency
    assert "| table_wise x2 | HostLoss(fill=zeros) | xor | 2 | " in text
    assert (tmp_path / "report" / "fig-distributed-auc-loss.png").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategies", "row_wise"], "error: sharding strategy 'row_wise' needs GPUs"),
        (["--strategies", " , "], "error: --strategies names no strategy; allowed: table_wise"),
        (["--world-sizes", "2,x"], "error: --world-sizes must be comma-separated ints >= 1, got '2,x'"),
        (["--world-sizes", "0"], "error: --world-sizes must be comma-separated ints >= 1, got '0'"),
        (["--stale", "/nonexistent"], "error: --stale /nonexistent is not a checkpoint directory"),
    ],
)
def test_the_cli_refuses_bad_options_in_one_line(checkpoints, tmp_path, capsys, argv, message):
    from pytei.cli import main

    code = main(["distributed", str(checkpoints[0]), "--db", str(tmp_path / "x.db"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "x.db").exists()  # refused before anything was written


KILLER = """
import os

if "RANK" in os.environ:  # every launched process says which attempt it belongs to
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    with open(os.path.join(os.path.dirname(__file__), "started"), "a") as out:
        out.write(f"{os.environ['RANK']} {attempt}\\n")
    if os.environ["RANK"] == "1" and attempt == "0":
        from pytei.distributed import _rank

        evaluate, calls = _rank.RankState.evaluate, []

        def dying(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 3:  # rank 1 of the first attempt dies in its third trial
                with open(os.path.join(os.path.dirname(__file__), "died"), "w") as out:
                    out.write("3")
                os._exit(9)
            return evaluate(self, *args, **kwargs)

        _rank.RankState.evaluate = dying
"""


def test_torchrun_runs_a_campaign_that_survives_a_dead_rank_and_matches_the_unsharded_model(
    checkpoints, reference, tmp_path, capsys
):
    """``torchrun -m pytei campaign run``: rank 0 runs the campaign, rank 1 serves its shards. Rank 1 dies
    mid-trial: every process stops, torchrun starts them again, the campaign resumes: each trial stored
    once (those of a model of 4 ranks are left for a launch of 4). The global trials' AUC equals the
    unsharded model's under the same faults; ``pytei report`` gives the distributed section."""
    from pytei.campaign.plan import run_seed
    from pytei.cli import main
    from pytei.metrics import Scorer
    from pytei.results import load

    rows = 128
    spec = tmp_path / "spec.toml"
    spec.write_text(
        textwrap.dedent(f"""
        name = "launched"
        runs = 2
        targets = ["embedding"]
        metrics = ["auc"]
        host_faults = ["HostSDC", {{ name = "HostLoss", recover = "xor" }}]
        [[models]]
        sharded = {json.dumps(str(checkpoints[0]))}
        strategies = ["column_wise"]
        world_sizes = [2, 4]
        batch_size = {BATCH}
        latency = {{ batch = 16, requests = 2 }}
        [data]
        max_rows = {rows}
        [errors]
        model = "BitFlip"
        rates = [{RATE}]
        """)
    )
    (tmp_path / "sitecustomize.py").write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    db = tmp_path / "s.db"
    argv = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "-m", "pytei"]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *argv, "campaign", "run", str(spec), "--db", str(db)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "died").read_text() == "3"  # rank 1 died in its third trial, and
    started = set((tmp_path / "started").read_text().splitlines())
    assert started == {"0 0", "0 1", "1 0", "1 1"}  # torchrun started both processes again
    # Rank 0 stops with one line, unless torchrun saw rank 1's exit first and stopped it (a race).
    broken = [line for line in done.stderr.splitlines() if "launch is gone" in line]
    assert all(line.startswith("error: a rank of this 2-process launch is gone during") for line in broken)
    assert "14 of sharded models of another world size left for a launch of it" in done.stdout + done.stderr
    trials = load(db)  # the x4 model's trials wait for a launch of 4: only the x2 model's are stored
    assert len(trials) == trials["trial_id"].nunique() == 2 + 2 * 2 + 2  # global, HostSDC, HostLoss(xor)
    assert (trials["status"] == "ok").all()
    labels = load_checkpoint(checkpoints[0]).data.test.labels[:rows]
    for run in (0, 1):
        row = trials[(trials["site"] == "weights") & (trials["run"] == run)]
        logits = unsharded(reference, error=BitFlip(RATE), seed=run_seed(0, run), target="embedding")[:rows]
        assert row["auc"].iloc[0] == Scorer(labels, metrics=["auc"])(logits.float().reshape(-1))["auc"]
    rebuilt = trials[trials["mitigation"] == "xor"]
    assert (rebuilt["rebuilt_exactly"] == 1).all() and (rebuilt["auc"] == rebuilt["baseline_auc"]).all()
    assert main(["report", str(db), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Distributed inference" in text and "| column_wise x2 | HostLoss(fill=zeros) | xor | 2 |" in text
    assert "HostSDC" not in text.split("Distributed inference")[0]  # host trials: that section only


def test_parity_groups_rebuild_a_lost_host_from_its_group_only():
    """ECRM: one parity block per group of ``g`` hosts: a lost host is rebuilt from its group's survivors
    (exactly for XOR), and the parity takes the largest block of each group."""
    group = ShardedGroup.__new__(ShardedGroup)
    group.world_size = 4
    gen = torch.Generator().manual_seed(0)
    sizes = (40, 10, 30, 20)
    blocks = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for n in sizes]
    group._blocks = {"bytes": blocks, "values": [b.float() for b in blocks]}
    total = sum(sizes)
    for rank in range(4):
        whole, info = group._lost(HostLoss(rank, recover="xor"))
        assert torch.equal(whole[rank]["bytes"], blocks[rank]) and info["exact"]
        assert info["storage_overhead"] == 40 / total and info["method"] == "xor"
        pairs, info = group._lost(HostLoss(rank, recover="xor", group=2))
        assert torch.equal(pairs[rank]["bytes"], blocks[rank]) and info["exact"]
        assert info["method"] == "xor/g2"
        assert info["storage_overhead"] == (40 + 30) / total  # groups {0, 1} and {2, 3}
    with pytest.raises(ArgumentError, match="group 8 is larger than the world of 4"):
        HostLoss(0, recover="xor", group=8).check_world(4)
    empty = ShardedGroup.__new__(ShardedGroup)  # a host holding no table (more hosts than tables)
    empty.world_size = 2
    empty._blocks = {"values": [torch.arange(5, dtype=torch.float32), torch.empty(0)]}
    served, info = empty._lost(HostLoss(1, recover="sum"))
    assert served[1]["values"].numel() == 0 and info["exact"] and info["max_abs_error"] == 0.0


def test_hosts_lost_together_come_back_only_where_the_survivors_hold_what_they_need():
    """Two hosts (1 and 2 of 4) lost at once: one parity block rebuilds one host of its group, and a host
    comes back from a replica only while a host holding a copy of it survives."""
    group = ShardedGroup.__new__(ShardedGroup)
    group.world_size = 4
    gen = torch.Generator().manual_seed(1)
    blocks = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for n in (40, 10, 30, 20)]
    group._blocks = {"bytes": blocks}

    def served(**how):
        out, info = group._lost(HostLoss(1, hosts=2, **how))
        return {r: ("rebuilt" if "bytes" in v and torch.equal(v["bytes"], blocks[r]) else v.get("fill"))
                for r, v in out.items()}, info  # fmt: skip

    assert HostLoss(1, hosts=2).lost(4) == [1, 2] and HostLoss(3, hosts=2).lost(4) == [3, 0]
    everyone, info = served(recover="xor")  # one group of 4 hosts: two losses, one parity block
    assert everyone == {1: "zeros", 2: "zeros"} and info["recovered"] == 0 and info["exact"] is None
    pairs, info = served(recover="xor", group=2)  # groups {0, 1} and {2, 3}: one loss each
    assert pairs == {1: "rebuilt", 2: "rebuilt"} and info["recovered"] == 1 and info["exact"]
    two, info = served(recover="replica", fill="mean")  # host 1's copy is on host 2 (lost), 2's on 3
    assert two == {1: "mean", 2: "rebuilt"} and info["recovered"] == 0.5 and info["storage_overhead"] == 1
    three, info = served(recover="replica", replicas=3)  # host 1's copies on 2 and 3
    assert three == {1: "rebuilt", 2: "rebuilt"} and info["storage_overhead"] == 2
    assert HostLoss(1, hosts=2, recover="replica", replicas=3).recovery == "replica x3"
    assert HostLoss(1, hosts=2).label == "HostLoss(rank=1, fill=zeros, hosts=2)"
    assert HostLoss(1).label == "HostLoss(rank=1, fill=zeros)"
    with pytest.raises(ArgumentError, match="hosts 5 is larger than the world of 4"):
        HostLoss(0, hosts=5).check_world(4)
    with pytest.raises(ArgumentError, match="replicas needs recover='replica'"):
        HostLoss(0, replicas=3)
