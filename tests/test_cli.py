"""The command line end to end, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_SPEC
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
        (["describe", "nosuchmodel"], "unknown model 'nosuchmodel'; registered: afm, dcn"),
        (["train", "--model", "fm", "--dataset", "movielens-1m", "--out", "x"], "movielens-1m"),
        (["inject", "/nonexistent", "--ber", "1e-3"], "no checkpoint directory at /nonexistent"),
        (["campaign", "status", "/nonexistent.db"], "no campaign database at /nonexistent.db"),
        (["report", "/nonexistent.db", "--out", "x"], "no campaign database at /nonexistent.db"),
    ],
)
def test_bad_input_is_a_clear_error(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err  # errors go to stderr, as one line
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


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


# --- error policy ---------------------------------------------------------------------------------


def _failing(exc: BaseException):
    def command(args, console):
        raise exc

    return command


BRACKETS = "mitigations[1]: unknown option 'mlp[-predictor.*]' for [confidence]; allowed: low, high"
WHERE, WHAT = BRACKETS.split(": ", 1)


def test_a_user_error_is_one_verbatim_line_and_exit_code_2(monkeypatch, capsys):
    from pytei.campaign.checks import SpecError

    monkeypatch.delenv("PYTEI_DEBUG", raising=False)
    monkeypatch.setattr("pytei.cli._cmd_demo", _failing(SpecError(WHERE, WHAT)))
    assert main(["demo"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {BRACKETS}\n"  # rich markup is not interpreted, no wrapping
    assert captured.out == ""


def test_a_bug_shows_its_traceback_and_exit_code_1(monkeypatch, capsys):
    monkeypatch.delenv("PYTEI_DEBUG", raising=False)
    monkeypatch.setattr("pytei.cli._cmd_demo", _failing(KeyError("surprise")))
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'surprise'" in err
    assert "bug" in err


def test_a_builtin_value_error_outside_validation_is_a_bug(monkeypatch, capsys):
    """Only PyteiError and path errors are the user's; a bare ValueError from the work is a bug."""
    monkeypatch.delenv("PYTEI_DEBUG", raising=False)
    monkeypatch.setattr("pytei.cli._cmd_demo", _failing(ValueError("internal shape mismatch")))
    assert main(["demo"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["flag", "flag-after-command", "env"])
def test_debug_shows_the_traceback_of_a_user_error(how, monkeypatch, capsys):
    from pytei.exceptions import PyteiError

    monkeypatch.delenv("PYTEI_DEBUG", raising=False)
    monkeypatch.setattr("pytei.cli._cmd_demo", _failing(PyteiError(BRACKETS)))
    argv = {"flag": ["--debug", "demo"], "flag-after-command": ["demo", "--debug"], "env": ["demo"]}[how]
    if how == "env":
        monkeypatch.setenv("PYTEI_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.endswith(f"error: {BRACKETS}\n")


def test_error_classes_are_pytei_errors():
    from pytei.data import DataFileError
    from pytei.exceptions import PyteiError
    from pytei.mitigation.abft import ABFTError

    assert issubclass(DataFileError, PyteiError) and issubclass(DataFileError, ValueError)
    assert issubclass(ABFTError, PyteiError) and issubclass(ABFTError, RuntimeError)


def test_describe_a_model_without_its_config_names_the_key_and_the_flag(capsys):
    assert main(["describe", "dcn"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "'field_dims'" in err and '--config \'{"field_dims": [' in err
    # and the hint works as written
    hint = err.split("--config ", 1)[1].strip().strip("'")
    assert main(["describe", "dcn", "--config", hint]) == 0
    assert "cn.b" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["describe", "dcn", "--config", "{bad"], "--config is not valid JSON"),
        (["describe", "dcn", "--config", "[1, 2]"], "--config must be a JSON object"),
        (["describe", "dcn", "--config", '{"field_dims": [5], "nope": 1}'], "unknown config keys ['nope']"),
        (
            ["train", "--model", "fm", "--dataset", "no-such-set", "--out", "x"],
            "unknown data set 'no-such-set'",
        ),
    ],
)
def test_bad_config_is_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_bad_counts_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["campaign", "run", "x.toml", "--db", "x.db", "--workers", "-1"])
    assert exit_info.value.code == 2
    assert "--workers: expected an integer >= 0, got -1" in capsys.readouterr().err


# --- help text --------------------------------------------------------------------------------------


def _commands(parser, prefix=()):
    import argparse

    sub = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not sub:
        yield prefix, parser
    for action in sub:
        for name, child in action.choices.items():
            yield from _commands(child, (*prefix, name))


def test_every_option_has_help_showing_its_default():
    import argparse

    from pytei.cli import build_parser

    commands = dict(_commands(build_parser()))
    assert {("demo",), ("train",), ("inject",), ("report",), ("campaign", "run")} <= set(commands)
    for name, parser in commands.items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, f"pytei {' '.join(name)} {action.option_strings or action.dest} has no help"
            default = action.default
            if (
                action.option_strings
                and default not in (None, False, [], argparse.SUPPRESS)
                and not action.required
            ):
                assert f"(default: {action.default})" in text, (name, action.dest)


def test_train_help_lists_the_registered_data_sets():
    from pytei.cli import build_parser
    from pytei.data import names

    train = dict(_commands(build_parser()))[("train",)]
    text = " ".join(train.format_help().split())
    assert all(name in text for name in names())


# --- plugins ----------------------------------------------------------------------------------------

PLUGIN = """
from torch import nn

import pytei.models


@pytei.models.register("{name}")
class PluginNet(nn.Module):
    input_layout = "categorical"

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.pytei_component = "mlp"
        self.layer = nn.Linear(width, 1)

    def forward(self, x):
        return self.layer(x).squeeze(1)
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A plugin module on sys.path registering the model 'cli-plugin-net' (removed afterwards)."""
    import pytei.models

    module = "cli_test_plugin"
    (tmp_path / f"{module}.py").write_text(PLUGIN.format(name="cli-plugin-net"))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield module
    sys.modules.pop(module, None)
    if "cli-plugin-net" in pytei.models.register:
        pytei.models.register.remove("cli-plugin-net")


def test_describe_loads_a_plugin_model(plugin, capsys):
    assert main(["describe", "cli-plugin-net"]) == 2  # not registered without the plugin
    assert "unknown model 'cli-plugin-net'" in capsys.readouterr().err
    assert main(["describe", "cli-plugin-net", "--plugin", plugin, "--config", '{"width": 7}']) == 0
    out = capsys.readouterr().out
    assert "layer.weight" in out and "mlp 8" in out  # 7 weights + 1 bias


def test_a_plugin_that_fails_to_import_is_one_line(capsys):
    assert main(["describe", "dcn", "--plugin", "no_such_plugin_module"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: plugin module 'no_such_plugin_module' failed to import")
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", ["run", "resume"])
def test_campaign_commands_load_plugins_first_and_pass_them_on(
    command, plugin, monkeypatch, capsys, tmp_path
):
    from pytei.campaign import execute
    from pytei.campaign.execute import CampaignResult

    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs, loaded=plugin in sys.modules)
        return CampaignResult(ran=0, skipped=0, failed=0, planned=0)

    monkeypatch.setattr(execute, f"{command}_campaign", fake)
    spec = tmp_path / "spec.toml"
    spec.write_text((Path(__file__).resolve().parents[1] / "examples" / "quick.toml").read_text())
    argv = ["run", str(spec), "--db", str(tmp_path / "x.db")] if command == "run" else ["resume", "x.db"]
    assert main(["campaign", *argv, "--plugin", plugin, "--plugin", "json", "--workers", "2"]) == 0, (
        capsys.readouterr().err
    )
    assert seen["loaded"] and seen["plugins"] == (plugin, "json") and seen["workers"] == 2


def test_campaign_output_lines_are_not_wrapped_and_export_makes_its_folder(tmp_path, capsys):
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_SPEC)
    db = tmp_path / ("a-long-folder-name-" * 4) / "results.db"
    db.parent.mkdir()
    assert main(["campaign", "run", str(spec), "--db", str(db), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"1 planned -> {db}\n" in out  # one line in a log, however long
    csv = tmp_path / "pytei-out" / "nested" / "tiny.csv"
    assert main(["campaign", "export", str(db), "--out", str(csv)]) == 0
    assert csv.is_file() and f"wrote {csv}" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["describe", "inject"])
def test_a_corrupt_checkpoint_is_one_line(command, tmp_path, capsys):
    (tmp_path / "meta.json").write_text("{not json")
    argv = [command, str(tmp_path)] + (["--ber", "1e-3"] if command == "inject" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: corrupt checkpoint metadata") and err.count("\n") == 1
