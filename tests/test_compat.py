"""The original code's defects, emulated (``pytei.compat``, ``pytei reproduce --compat``): each behaves as
docs/REPRODUCTION.md documents, and the report measures what each moves."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from pytei import BitFlip, Injector
from pytei.cli import main
from pytei.compat import OriginalBitFlip, original_keep, original_mask_value, parse_flags
from pytei.exceptions import ArgumentError
from pytei.reproduce import compat_table


def test_original_masks_round_to_no_flip_where_documented():
    for ber in (7e-3, 2e-9, 1e-10):  # docs/REPRODUCTION.md: "no flip at all at BER 7e-3, 2e-9, 1e-10"
        assert original_mask_value(ber) == 0
    for ber in (1e-9, 1e-6, 1e-5, 1e-3, 1e-2):
        assert original_mask_value(ber) == 1
    assert original_keep(1e-10) != 1e-10 and math.isclose(original_keep(1e-10), 1e-10, rel_tol=1e-6)


def _faults(error, seed: int = 0) -> dict[str, torch.Tensor]:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    injector = Injector(error, seed=seed)
    report = injector.apply(model)
    injector.restore()
    return {n: f.index for n, f in report.fault_map.faults.items()}


def test_original_bit_flip_is_bit_flip_without_its_defects():
    assert _faults(OriginalBitFlip(7e-3)) == {}  # the rounded mask: nothing lands
    plain, same = _faults(BitFlip(1e-3), 3), _faults(OriginalBitFlip(1e-3, mask=False), 3)
    assert plain and plain.keys() == same.keys() and all(torch.equal(plain[k], same[k]) for k in plain)
    with pytest.raises(ArgumentError, match="mask must be true or false"):
        OriginalBitFlip(1e-3, mask="yes")  # type: ignore[arg-type]


def test_flags_are_checked():
    assert parse_flags("accumulate, original-split") == ("original-split", "accumulate")
    assert parse_flags("") == ()
    with pytest.raises(ArgumentError, match="unknown --compat flag 'bogus'; allowed: original-split"):
        parse_flags("accumulate,bogus")


def test_cli_refuses_an_unknown_flag(tmp_path, capsys):
    assert main(["reproduce", "--out", str(tmp_path), "--compat", "bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown --compat flag 'bogus'") and "\n" not in err


def test_compat_table_finds_failure_bers():
    rows = []
    for setting, drop_at in (("pytei", 1e-3), ("accumulate", 1e-5)):
        for rate in (1e-6, 1e-5, 1e-4, 1e-3):
            auc = 0.8 - (0.1 if rate >= drop_at else 0.0)
            rows.append({"setting": setting, "model": "m", "rate": rate, "auc": auc, "baseline_auc": 0.8})
    frames = {
        s: pd.DataFrame([r for r in rows if r["setting"] == s]).assign(status="ok")
        for s in ("pytei", "accumulate")
    }
    table = compat_table(frames).set_index("setting")
    assert table.loc["pytei", "failure_ber"] == 1e-3 and table.loc["accumulate", "failure_ber"] == 1e-5
    assert table.loc["accumulate", "failure_decades"] == pytest.approx(-2.0)


ACCUMULATE = """
name = "acc"
plugins = ["pytei.compat"]
runs = 3
targets = ["all"]
metrics = ["rmse"]
[[models]]
dummy = { mlp_depth = 1, mlp_hidden = 16, embed_dim = 8, sparsity = 0.05, sparse_dim = 64, dense_dim = 8 }
samples = 320
[errors]
model = "OriginalBitFlip"
rates = [1e-3]
mask = false
accumulate = {accumulate}
"""


def test_accumulated_faults_pile_up_over_batches_and_all_come_out():
    from pytei.campaign import parse_spec, plan
    from pytei.campaign.runner import ModelRunner, load_evaluation
    from pytei.injector import parameter_digest

    counts = {}
    for accumulate in ("true", "false"):
        trials = plan(parse_spec(ACCUMULATE.replace("{accumulate}", accumulate)))
        runner = ModelRunner(load_evaluation(trials[0], batch_size=64))  # 5 batches
        clean = parameter_digest(runner.model)
        rows = [runner.run(t) for t in trials]
        assert all(r.status == "ok" for r in rows) and parameter_digest(runner.model) == clean
        counts[accumulate] = sum(r.n_faults for r in rows)
        if accumulate == "true":
            assert {r.extra["path"] for r in rows} == {"full"}
    # five draws per trial instead of one: about five times the faults (Binomial; 3 trials of ~130 each)
    assert 3.5 < counts["true"] / counts["false"] < 7
