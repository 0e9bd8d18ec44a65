"""The command line end to end, as a user runs it."""

import json
import subprocess
import sys

import pytest

from pytei.cli import main
from pytei.data.synthetic import write_movielens


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytei.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_demo_main_job(capsys):
    assert main(["demo", "--runs", "1", "--samples", "128"]) == 0
    out = capsys.readouterr().out
    assert "model restored bit-exactly after 24 trials: yes" in out and "1e-02" in out


def test_train_describe_inject_on_movielens_files(tmp_path):
    write_movielens(tmp_path / "ml", "1m", n_users=200, n_items=150, n_ratings=6000, seed=0)
    ckpt = tmp_path / "ckpt"
    proc = run(
        "train",
        "--model",
        "dfm",
        "--dataset",
        "movielens-1m",
        "--data-dir",
        str(tmp_path / "ml"),
        "--out",
        str(ckpt),
        "--epochs",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    assert "test AUC" in proc.stdout and (ckpt / "model.safetensors").is_file()
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["data"]["name"] == "movielens-1m" and meta["model"]["config"]["field_dims"][0] >= 200
    proc = run("describe", str(ckpt))
    assert proc.returncode == 0 and "embedding" in proc.stdout and "mlp" in proc.stdout
    proc = run("inject", str(ckpt), "--ber", "1e-3", "--target", "mlp", "--runs", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("1e-03") == 2 and "AUC" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["describe", "nosuchmodel"], "unknown model 'nosuchmodel'; allowed:"),
        (["train", "--model", "fm", "--dataset", "movielens-1m", "--out", "x"], "movielens-1m"),
        (["inject", "/nonexistent", "--ber", "1e-3"], "no checkpoint directory at /nonexistent"),
        (["campaign", "status", "/nonexistent.db"], "no campaign database at /nonexistent.db"),
        (["report", "/nonexistent.db", "--out", "x"], "no campaign database at /nonexistent.db"),
    ],
)
def test_bad_input_is_a_clear_error(args, message, capsys):
    assert main(args) == 2
    assert message in " ".join(capsys.readouterr().err.split())  # errors go to stderr


def test_bad_ber_from_cli(tmp_path, capsys):
    write_movielens(tmp_path / "ml", "1m", n_users=50, n_items=40, n_ratings=800, seed=0)
    assert (
        main(
            [
                "train",
                "--model",
                "fm",
                "--dataset",
                "movielens-1m",
                "--data-dir",
                str(tmp_path / "ml"),
                "--out",
                str(tmp_path / "c"),
                "--epochs",
                "1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["inject", str(tmp_path / "c"), "--ber", "1.5"]) == 2
    assert "BitFlip ber must be in [0, 1], got 1.5" in capsys.readouterr().err
