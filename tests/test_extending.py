"""The README's "Extending pytei" example end to end: a plugin registering a model, an error model,
a mitigation with a parameter and a metric, used from a TOML spec through ``--plugin``, in-process
and on two worker processes (each imports the plugin), with the same rows from both."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytei import errors, metrics, mitigation, models, results
from pytei.campaign import parse_spec
from pytei.campaign.execute import run_campaign
from pytei.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "extending"
SPEC = EXAMPLE / "extending.toml"
PLUGIN = "my_extensions"
REGISTERED = ((models.register, "tiny_mlp"), (errors.register, "ExponentFlip"),
              (mitigation.register, "output-clamp"), (metrics.register, "max_abs_error"))  # fmt: skip


@pytest.fixture
def plugin_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The example's folder on sys.path (spawned workers inherit it); its registrations undone after."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    yield
    for registry, name in REGISTERED:
        if name in registry:
            registry.remove(name)
    sys.modules.pop(PLUGIN, None)


def _table(db: Path):
    df = results.load(db).sort_values("trial_id").reset_index(drop=True)
    return df[["trial_id", "mitigation", "rate", "run", "n_faults", "rmse", "max_abs_error", "status"]]


def test_readme_shows_the_example_as_it_is(tmp_path: Path) -> None:
    """Every code block of README's "Extending pytei" section is a verbatim part of the example files."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Extending pytei", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)
    sources = {"python": (EXAMPLE / "my_extensions.py").read_text(), "toml": SPEC.read_text()}
    shown = {lang for lang, _ in blocks}
    assert {"python", "toml"} <= shown
    for lang, code in blocks:
        if lang in sources:
            assert code in sources[lang], f"README block not in the example:\n{code}"
    for kind in ("models.register", "errors.register", "mitigation.register", "metrics.register"):
        assert kind in section  # one worked example per extension kind


def test_cli_runs_the_spec_with_the_plugin_in_process_and_on_workers(
    plugin_path: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    assert main(["campaign", "run", str(SPEC), "--db", str(a), "--plugin", PLUGIN]) == 0
    assert main(["campaign", "run", str(SPEC), "--db", str(b), "--plugin", PLUGIN, "--workers", "2"]) == 0
    left, right = _table(a), _table(b)
    assert left.equals(right)  # each worker imported the plugin and computed the same rows
    df = results.load(a)
    assert len(df) == 18 and (df["status"] == "ok").all()
    assert set(df["model_label"]) == {"tiny MLP"} and set(df["architecture"]) == {"tiny_mlp"}
    assert set(df["mitigation"]) == {"none", "output-clamp(limit=5)", "clip(low=-4, high=4)"}
    hot = df[df["rate"] == 1e-2].set_index(["mitigation", "run"])
    none, clamp = hot.loc["none"], hot.loc["output-clamp(limit=5)"]
    faulty = none["n_faults"] > 0
    assert faulty.any()
    # an exponent flip blows the output up; the clamp bounds it by its parameter (5 + the clean logit)
    assert (none.loc[faulty, "max_abs_error"] > 1e6).all()
    assert (clamp["max_abs_error"] <= 10.0).all()  # clean logits of this untrained MLP are far below 5
    assert (clamp.loc[faulty, "max_abs_error"] < none.loc[faulty, "max_abs_error"]).all()
    assert math.isfinite(clamp["rmse"].max())
    extra = df.loc[df["mitigation"] == "output-clamp(limit=5)", "extra"]
    assert extra.str.contains('"clamped"').all()  # the mitigation's stats are stored


def test_spec_plugins_key_and_option_errors(plugin_path: None, tmp_path: Path, capsys) -> None:
    text = SPEC.read_text()
    with_key = text.replace('name = "extending"', f'name = "extending"\nplugins = ["{PLUGIN}"]')
    spec = parse_spec(with_key, tmp_path)  # the spec imports its own plugins
    assert spec.plugins == (PLUGIN,) and spec.mitigations[1].options == (("limit", 5.0),)
    bad = text.replace("limit = 5.0", "limt = 5.0")
    path = tmp_path / "bad.toml"
    path.write_text(bad)
    assert main(["campaign", "run", str(path), "--db", str(tmp_path / "x.db"), "--plugin", PLUGIN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1  # one line, naming the key, the object and the allowed options
    assert "mitigations[1].limt" in err[0] and "'output-clamp'" in err[0] and "allowed: limit" in err[0]
    wrong_type = text.replace("limit = 5.0", 'limit = "five"')
    with pytest.raises(Exception, match=r"mitigations\[1\]\.limit: .*must be float"):
        parse_spec(wrong_type, tmp_path)


def test_a_model_that_fails_to_load_gives_failed_trials(plugin_path: None, tmp_path: Path) -> None:
    import my_extensions  # noqa: F401 - registers tiny_mlp

    text = SPEC.read_text().replace("config = { hidden = 32 }", "config = { hidden = -1 }")
    spec = parse_spec(text, tmp_path)
    result = run_campaign(spec, tmp_path / "f.db", progress=False)
    assert (result.ran, result.failed) == (18, 18)  # recorded, not fatal
    df = results.load(tmp_path / "f.db")
    assert df["traceback"].str.contains("Traceback").all()
    assert df["error_message"].str.contains("RuntimeError|ValueError").all()
