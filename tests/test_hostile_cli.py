"""Issue 15, "CLI and data": each hostile input is one line ``error: ...``, exit code 2, no traceback."""

from __future__ import annotations

import errno
import io
import json
import pathlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from conftest import TINY_SPEC
from pytei import cli
from pytei.cli import main
from pytei.data.synthetic import write_movielens


def user_error(argv: list[str], capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    """Run ``argv``; assert one ``error:`` line on stderr, exit code 2, and every fragment in it."""
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def train_argv(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", "fm", "--dataset", "movielens-1m", "--data-dir", str(data_dir),
        "--out", str(out), "--epochs", "1", "--threads", "1", *extra,
    ]  # fmt: skip


@pytest.fixture
def ml(tmp_path: Path) -> Path:
    write_movielens(tmp_path / "ml", "1m", n_users=60, n_items=40, n_ratings=800, seed=0)
    return tmp_path / "ml"


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_SPEC)
    return path


@pytest.fixture
def ckpt(ml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / "ckpt"
    assert main(train_argv(ml, out)) == 0
    capsys.readouterr()
    return out


def _refuse_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started before the outputs were checked")

    monkeypatch.setattr("pytei.train.fit", no_training)


# --- raw tracebacks -----------------------------------------------------------------------------


def test_unreadable_data_file(ml: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    real = pathlib.Path.read_bytes

    def denied(self: Path) -> bytes:
        if self.name == "ratings.dat":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    user_error(train_argv(ml, tmp_path / "out"), capsys, "Permission denied", "ratings.dat")


def test_db_is_a_directory(spec: Path, tmp_path: Path, capsys) -> None:
    user_error(["campaign", "run", str(spec), "--db", str(tmp_path)], capsys, "--db", str(tmp_path))


def test_db_in_a_read_only_folder(spec: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    monkeypatch.setattr(cli.os, "access", lambda path, mode, **kw: Path(path) != folder)  # root ignores chmod
    user_error(["campaign", "run", str(spec), "--db", str(folder / "r.db")], capsys, "--db", "not writable")


def test_disk_full_during_a_campaign(spec: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pytei.campaign.execute.run_campaign", full)
    user_error(["campaign", "run", str(spec), "--db", str(tmp_path / "r.db")], capsys, "No space left")


def test_disk_full_while_saving_a_checkpoint(ml: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_model", full)
    out = tmp_path / "out"
    user_error(train_argv(ml, out), capsys, "No space left")
    assert not (out / "meta.json").exists() and not list(out.glob("*.tmp"))  # nothing half-written


def test_train_out_is_an_existing_file_checked_before_training(ml, tmp_path, monkeypatch, capsys) -> None:
    _refuse_fit(monkeypatch)
    out = tmp_path / "taken"
    out.write_text("mine")
    user_error(train_argv(ml, out), capsys, "--out", str(out), "is a file")
    assert out.read_text() == "mine"


def test_train_out_in_a_read_only_folder_checked_before_training(ml, tmp_path, monkeypatch, capsys) -> None:
    _refuse_fit(monkeypatch)
    monkeypatch.setattr(cli.os, "access", lambda path, mode, **kw: Path(path) != tmp_path)
    user_error(train_argv(ml, tmp_path / "new"), capsys, "--out", "not writable")


def test_export_out_on_a_directory_or_an_existing_file(spec: Path, tmp_path: Path, capsys) -> None:
    db = tmp_path / "r.db"
    assert main(["campaign", "run", str(spec), "--db", str(db), "--threads", "1"]) == 0
    capsys.readouterr()
    user_error(["campaign", "export", str(db), "--out", str(tmp_path)], capsys, "--out", "is a directory")
    taken = tmp_path / "taken.csv"
    taken.write_text("mine")
    user_error(["campaign", "export", str(db), "--out", str(taken)], capsys, "already exists", "--force")
    assert taken.read_text() == "mine"
    assert main(["campaign", "export", str(db), "--out", str(taken), "--force"]) == 0
    assert taken.read_text().startswith("trial_id") or "," in taken.read_text()


def test_report_out_on_an_existing_file(spec: Path, tmp_path: Path, capsys) -> None:
    db = tmp_path / "r.db"
    assert main(["campaign", "run", str(spec), "--db", str(db), "--threads", "1"]) == 0
    capsys.readouterr()
    taken = tmp_path / "taken"
    taken.write_text("mine")
    user_error(["report", str(db), "--out", str(taken)], capsys, "--out", "is a file")


def test_spec_path_is_a_directory(tmp_path: Path, capsys) -> None:
    user_error(["campaign", "run", str(tmp_path), "--db", str(tmp_path / "r.db")], capsys, str(tmp_path))


@pytest.mark.parametrize("drop", [("data",), ("model",), ("model", "config"), ("data", "split_seed")])
def test_checkpoint_meta_missing_keys(ckpt: Path, drop: tuple[str, ...], capsys) -> None:
    meta_path = ckpt / "meta.json"
    meta = json.loads(meta_path.read_text())
    node = meta
    for key in drop[:-1]:
        node = node[key]
    del node[drop[-1]]
    meta_path.write_text(json.dumps(meta))
    user_error(["inject", str(ckpt), "--ber", "1e-3"], capsys, "meta.json", repr(drop[-1]))


def test_train_on_cuda_without_cuda(ml: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refuse_fit(monkeypatch)
    user_error(train_argv(ml, tmp_path / "o", "--device", "cuda"), capsys, "'cuda'", "CUDA is not available")
    user_error(train_argv(ml, tmp_path / "o", "--device", "gpu9"), capsys, "'gpu9'")


def test_demo_runs_zero(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--runs", "0"])
    assert exit_info.value.code == 2 and "--runs" in capsys.readouterr().err
    from pytei.demo import run_demo

    with pytest.raises(ValueError, match="runs must be an integer >= 1, got 0"):
        run_demo(Console(file=io.StringIO()), runs=0)


def test_data_set_too_small_for_a_validation_split(tmp_path: Path, monkeypatch, capsys) -> None:
    write_movielens(tmp_path / "ml", "1m", n_users=5, n_items=5, n_ratings=7, seed=0)
    _refuse_fit(monkeypatch)
    user_error(train_argv(tmp_path / "ml", tmp_path / "o"), capsys, "7 rows", "at least 10")


def test_validation_split_of_one_class_is_refused(tmp_path: Path) -> None:
    from pytei.data import load
    from pytei.train import TrainConfig, build, fit

    path = tmp_path / "ml" / "ratings.dat"
    path.parent.mkdir()
    path.write_text("".join(f"{u}::{u}::5::978300760\n" for u in range(1, 31)))  # every label 1
    data = load("movielens-1m", tmp_path / "ml")
    model = build("fm", TrainConfig(), field_dims=data.field_dims)
    with pytest.raises(ValueError, match="validation split .*only one class"):
        fit(model, data, TrainConfig(max_epochs=1), progress=False)


# --- messages printed verbatim ------------------------------------------------------------------


def test_progress_bar_prints_descriptions_verbatim() -> None:
    from pytei.progress import progress_bar

    with progress_bar(plain=False) as bar:
        task = bar.add_task("study [confidence] at [/tmp/x]", total=1)
        bar.advance(task)
        out = io.StringIO()
        Console(file=out, width=200).print(bar.make_tasks_table(bar.tasks))
    assert "study [confidence] at [/tmp/x]" in out.getvalue()


def test_error_and_output_text_keep_brackets(tmp_path: Path, capsys) -> None:
    ml = tmp_path / "data [/x] [errors]"
    write_movielens(ml, "1m", n_users=60, n_items=40, n_ratings=800, seed=0)
    out = tmp_path / "ckpt [confidence]"
    assert main(train_argv(ml, out)) == 0, capsys.readouterr().err
    assert f"-> checkpoint {out}" in capsys.readouterr().out
    user_error(["inject", str(tmp_path / "[/none]"), "--ber", "1e-3"], capsys, "[/none]")


# --- data and options ----------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["9223372036854775808", "18446744073709551616", "4294967296"])
def test_movielens_ids_beyond_the_range_are_refused(tmp_path: Path, user: str) -> None:
    from pytei.data import DataFileError, load

    path = tmp_path / "ratings.dat"
    path.write_text("1::1::5::978300760\n" + f"{user}::2::3::978300761\n")
    with pytest.raises(DataFileError, match=rf"ratings.dat: line 2: user id {user} is out of range"):
        load("movielens-1m", tmp_path)


@pytest.mark.parametrize(
    ("variant", "file", "line"),
    [
        ("1m", "ratings.dat", "2::3::6::978300761\n"),
        ("1m", "ratings.dat", "2::3::3.5::978300761\n"),
        ("1m", "ratings.dat", "2::3::0::978300761\n"),
        ("20m", "ratings.csv", "2,3,5.5,978300761\n"),
        ("20m", "ratings.csv", "2,3,0.0,978300761\n"),
        ("20m", "ratings.csv", "2,3,-1,978300761\n"),
    ],
)
def test_movielens_ratings_off_the_scale(tmp_path: Path, variant: str, file: str, line: str) -> None:
    from pytei.data import DataFileError, load

    header, sep = ("userId,movieId,rating,timestamp\n", ",") if variant == "20m" else ("", "::")
    (tmp_path / file).write_text(header + sep.join(["1", "1", "5", "978300760"]) + "\n" + line)
    number = 3 if header else 2
    with pytest.raises(DataFileError, match=rf"{file}: line {number}: rating .* not on the scale"):
        load(f"movielens-{variant}", tmp_path)


@pytest.mark.parametrize("lr", ["inf", "nan", "0", "-1e-3", "-inf"])
def test_bad_learning_rate(lr: str, ml: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:  # refused by the parser, before the data is read
        main(train_argv(ml, tmp_path / "o", f"--lr={lr}"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"--lr: expected a finite number > 0, got '{lr}'" in err
    from pytei.train import TrainConfig

    with pytest.raises(ValueError, match="lr must be"):
        TrainConfig(lr=float(lr))


def test_negative_workers(spec: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["campaign", "run", str(spec), "--db", str(tmp_path / "r.db"), "--workers", "-1"])
    assert exit_info.value.code == 2 and "--workers" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"max_rows": "abc"}, "max_rows must be an integer >= 1 or null, got 'abc'"),
        ({"max_rows": 0}, "max_rows must be an integer >= 1 or null, got 0"),
        ({"max_rows": 2.5}, "max_rows must be an integer >= 1 or null, got 2.5"),
        ({"min_threshold": 1.5}, "min_threshold must be an integer >= 1, got 1.5"),
        ({"min_threshold": True}, "min_threshold must be an integer >= 1, got True"),
    ],
)
def test_criteo_options_validated(options: dict, fragment: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "train.txt").write_text("0" + "\t" * 39 + "\n")
    argv = [
        "train", "--model", "fm", "--dataset", "criteo", "--data-dir", str(tmp_path),
        "--data-options", json.dumps(options), "--out", str(tmp_path / "o"),
    ]  # fmt: skip
    user_error(argv, capsys, fragment)


# --- integrity of stored artefacts ---------------------------------------------------------------


def test_checkpoint_weights_checksum(ckpt: Path, capsys) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    assert len(meta["weights"]["sha256"]) == 64
    weights = ckpt / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0x10  # a bit of the last weight: the file still parses
    weights.write_bytes(bytes(raw))
    user_error(["inject", str(ckpt), "--ber", "1e-3"], capsys, str(weights), "sha256")


def _criteo(tmp_path: Path, rows: int = 60) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(rows):
        ints = [str(int(v)) for v in rng.integers(0, 20, 13)]
        cats = [f"{int(v):08x}" for v in rng.integers(0, 5, 26)]
        lines.append("\t".join([str(int(rng.integers(0, 2))), *ints, *cats]) + "\n")
    (tmp_path / "train.txt").write_text("".join(lines))
    return tmp_path


def _cache(data_dir: Path) -> Path:
    (cache,) = (data_dir / ".pytei-cache").iterdir()
    return cache


def test_criteo_cache_records_checksums_and_rebuilds_bad_labels(tmp_path: Path) -> None:
    from pytei.data import load

    data_dir = _criteo(tmp_path)
    first = load("criteo", data_dir, min_threshold=1).train.labels.clone()  # the cache is memory-mapped
    meta = json.loads((_cache(data_dir) / "meta.json").read_text())
    assert set(meta["arrays"]) == {"labels.npy", "dense.npy", "fields.npy"}
    labels = np.load(_cache(data_dir) / "labels.npy", mmap_mode="r+")
    labels[0] = 7.0
    labels.flush()
    del labels
    with pytest.warns(UserWarning, match="labels.npy"):
        again = load("criteo", data_dir, min_threshold=1)
    assert torch.equal(again.train.labels, first)
    assert set(again.train.labels.unique().tolist()) <= {0.0, 1.0}


def test_criteo_truncated_cache_is_rebuilt(tmp_path: Path) -> None:
    from pytei.data import load

    data_dir = _criteo(tmp_path)
    first = load("criteo", data_dir, min_threshold=1).train.inputs[0].clone()
    fields = _cache(data_dir) / "fields.npy"
    fields.write_bytes(fields.read_bytes()[:-100])
    with pytest.warns(UserWarning, match="fields.npy"):
        again = load("criteo", data_dir, min_threshold=1)
    assert torch.equal(again.train.inputs[0], first)


def test_criteo_altered_array_is_caught_and_an_untouched_one_is_not_rehashed(
    tmp_path: Path, monkeypatch
) -> None:
    from pytei.data import criteo, load

    data_dir = _criteo(tmp_path)
    first = load("criteo", data_dir, min_threshold=1).train.inputs[0].clone()
    hashed: list[str] = []
    real = criteo.file_sha256
    monkeypatch.setattr(criteo, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    load("criteo", data_dir, min_threshold=1)
    assert hashed == []  # nothing written since the build: sizes, times and labels are checked, no 14 GB read
    fields = _cache(data_dir) / "fields.npy"
    data = bytearray(fields.read_bytes())
    data[-1] ^= 0x01  # one flipped bit, same size
    fields.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="fields.npy differs from the sha256"):
        again = load("criteo", data_dir, min_threshold=1)
    assert torch.equal(again.train.inputs[0], first)


def test_paper_preset_on_an_empty_data_dir_needs_synthetic(tmp_path: Path, monkeypatch, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()

    def no_grid(*args: object, **kwargs: object) -> None:
        raise AssertionError("the grid started")

    monkeypatch.setattr("pytei.reproduce._checkpoint", no_grid)
    argv = ["reproduce", "--preset", "paper", "--out", str(tmp_path / "o"), "--data-dir", str(empty)]
    user_error(argv, capsys, str(empty), "--synthetic")


# --- training output and meta --------------------------------------------------------------------


def test_train_prints_a_line_per_epoch_and_its_threads_when_piped(ml: Path, tmp_path: Path) -> None:
    argv = train_argv(ml, tmp_path / "o")
    argv[argv.index("--epochs") + 1] = "3"
    argv += ["--patience", "5"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytei.cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "torch threads: 1" in proc.stdout
    import re

    line = r"^epoch (\d+): loss \d\.\d{4}, valid AUC \d\.\d{4}, \d+\.\d+ s\b"
    epochs = re.findall(line, proc.stdout, re.M)
    assert epochs == ["0", "1", "2"], proc.stdout


def test_checkpoint_meta_has_train_auc_next_to_test_auc(ckpt: Path) -> None:
    scores = json.loads((ckpt / "meta.json").read_text())["scores"]
    assert 0.0 <= scores["train_auc"] <= 1.0 and 0.0 <= scores["test_auc"] <= 1.0
    assert scores["train_auc_rows"] == "all 640 training rows"


def test_train_auc_of_a_large_training_set_uses_a_fixed_sample(monkeypatch) -> None:
    from pytei import train
    from pytei.data import load

    monkeypatch.setattr(train, "TRAIN_AUC_ROWS", 500)
    data = load("synthetic-ctr", n_rows=2000, field_dims=[20, 30], dense_dim=0)
    config = train.TrainConfig(max_epochs=1, batch_size=256)
    results = [
        train.fit(train.build("fm", config, field_dims=data.field_dims), data, config, progress=False)
        for _ in range(2)
    ]
    assert results[0].train_auc == results[1].train_auc
    summary = results[0].summary()
    assert summary["train_auc_rows"] == "a fixed sample of 500 of 1600 training rows (seed 0)"
