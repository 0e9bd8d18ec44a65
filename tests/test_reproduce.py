"""``pytei reproduce``: the quick preset end to end at a tiny size, and its resumption."""

import importlib.util
import io
import re
import struct
from contextlib import redirect_stdout
from dataclasses import replace

import pytest

from pytei import reproduce as rp
from pytei.campaign import parse_spec
from pytei.cli import main
from pytei.compat import COMPAT_FLAGS
from pytei.data.synthetic import write_criteo, write_movielens
from pytei.results import load
from pytei.train import TrainConfig

TINY = replace(
    rp.PRESETS["quick"],
    dummy_hidden=(64,),
    dummy_embed=(64, 128),
    dummy_bers=(1e-5, 1e-5),
    dummy_samples=64,
    ctr_bers=(1e-4, 1e-3),
    runs=1,
    test_rows=300,
    train=TrainConfig(lr=3e-3, max_epochs=1, patience=1, batch_size=512),
    synthetic_rows=2000,
    quantization=replace(rp.PRESETS["quick"].quantization, bers=(1e-4, 1e-3), runs=1, blast_rows=4),
)
STUDIES = ("dummy", "ctr", "bits", "layers")
#: The quantization study's campaigns, run only with pytei[torchrec] (tests/test_quantization_study.py).
QUANT_STUDIES = ("quantization-codes", "quantization-scale-bias")
QUANT_STUDIES = QUANT_STUDIES if importlib.util.find_spec("torchrec") else ()


def run_preset(name: str, preset: rp.Preset, out, *args: str) -> str:
    """``pytei reproduce --preset NAME`` with that preset's sizes replaced; returns what it printed."""
    buffer = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(buffer):
        mp.setitem(rp.PRESETS, name, preset)
        code = main(["reproduce", "--preset", name, "--out", str(out), *args])
    assert code == 0, buffer.getvalue()
    return buffer.getvalue()


def run_quick(out) -> str:
    """``pytei reproduce --preset quick`` at the tiny size; returns what it printed."""
    return run_preset("quick", TINY, out)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


#: An output folder whose name TOML strings cannot hold unescaped (legal in Linux file names).
AWKWARD = 'out "quoted" back\\slash'


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The tiny quick preset, run into a folder named with a quote and a backslash."""
    out = tmp_path_factory.mktemp(AWKWARD, numbered=False)
    return out / "quick", run_quick(out)


def test_quick_preset_runs_every_study_and_mitigation(quick_run):
    root, _ = quick_run
    for model in rp.CTR_MODELS:
        assert (root / "checkpoints" / f"{model}-synthetic-ctr" / "model.safetensors").is_file()
    frames = {name: load(root / f"{name}.db") for name in STUDIES}
    assert all((df.status == "ok").all() for df in frames.values()), {
        n: df.loc[df.status != "ok", "error_message"].unique().tolist() for n, df in frames.items()
    }
    dummy = frames["dummy"]
    # Table 1 grid at this size: depth 2 x hidden 1 x embed 2 x sparsity 2, 3 targets, 1 BER, 1 run
    assert len(dummy) == 2 * 1 * 2 * 2 * 3
    ctr = frames["ctr"]
    assert set(ctr.mitigation) == {"none", "clip", "clip-profiled", "protect-bits", "abft", "ecc"}
    assert set(ctr.architecture) == set(rp.CTR_MODELS)
    assert set(ctr.model_label) == {f"{m}-synthetic-ctr" for m in rp.CTR_MODELS}  # the spec's labels
    assert set(ctr.rate) == {1e-4, 1e-3}
    assert len(ctr) == 5 * 3 * 2 * 6  # models x targets x BERs x mitigations (1 run)
    assert ctr.auc.between(0, 1).all() and ctr.baseline_auc.between(0, 1).all()
    # paired comparisons: every mitigation of a point saw the same seed
    assert ctr.groupby(["model", "target", "rate"]).seed.nunique().eq(1).all()
    assert frames["bits"].bits.nunique() == 32
    assert frames["layers"].target.nunique() > 5


def test_an_output_folder_with_quote_and_backslash_reaches_the_specs(quick_run):
    """Regression: specs were TOML text with the checkpoint paths pasted in, so a path holding
    ``"`` or ``\\`` failed to parse once every model was trained."""
    root, _ = quick_run
    assert '"' in str(root) and "\\" in str(root)
    ctr = load(root / "ctr.db")
    assert (ctr.status == "ok").all()
    for model in rp.CTR_MODELS:
        assert ctr.model.astype(str).str.contains(f"{model}-synthetic-ctr", regex=False).any()
    spec = parse_spec((root / "specs" / "ctr.toml").read_text(), root / "specs")
    assert [s["checkpoint"] for s in spec.model_specs().values()] == [
        str(root / "checkpoints" / f"{m}-synthetic-ctr") for m in rp.CTR_MODELS
    ]


@pytest.mark.parametrize("study", ["_ctr_spec", "_sensitivity_spec", "_layer_spec"])
def test_every_study_spec_round_trips_any_path(study, tmp_path):
    ckpts = [tmp_path / 'a "b" \\c \\"d\\" [e] #f \n' / "fm-x", tmp_path / "plain" / "dcn-y"]
    text = rp.spec_text(getattr(rp, study)(TINY, ckpts))
    spec = parse_spec(text, tmp_path)
    assert [s["checkpoint"] for s in spec.model_specs().values()] == [str(p) for p in ckpts]
    assert list(spec.model_labels().values()) == ["fm-x", "dcn-y"]


def test_quick_preset_writes_the_report(quick_run):
    root, output = quick_run
    report = root / "report" / "report.md"
    assert report.is_file() and (root / "report" / "report.html").is_file()
    assert f"report: {report} and {report.with_suffix('.html')}\n" in output  # one line, not wrapped
    text = report.read_text()
    for section in ("RMSE", "AUC", "Mitigation", "bit", "layer", "failure BER"):
        assert section.lower() in text.lower(), section
    assert ". ABFT coverage and cost per layer\n" in text  # the ABFT plan of every CTR model
    assert "Every parameterised layer of these models is checked." in text
    assert text.count("| cn.w.0 | Linear |") == 1  # dcn's cross layers, on the roofline
    pngs = sorted((root / "report").glob("*.png"))
    assert len(pngs) >= 5
    for png in pngs:
        width, height = png_size(png)
        assert width > 100 and height > 100


def test_rerun_resumes_without_repeating(quick_run):
    root, _ = quick_run
    before = {name: load(root / f"{name}.db") for name in STUDIES}
    output = run_quick(root.parent)
    assert "training" not in output  # checkpoints are reused
    assert re.findall(r"(\d+) trials run", output) == ["0"] * (len(STUDIES) + len(QUANT_STUDIES))
    for name, df in before.items():
        after = load(root / f"{name}.db")
        assert sorted(after.trial_id) == sorted(df.trial_id)


def test_find_datasets_looks_in_the_folder_and_its_usual_subfolders(tmp_path):
    assert rp.find_datasets(None) == {} and rp.find_datasets(tmp_path) == {}
    write_movielens(tmp_path / "ml-1m", "1m")
    write_movielens(tmp_path, "20m")
    write_criteo(tmp_path / "dac" / "train.txt", 10)
    assert rp.find_datasets(tmp_path) == {
        "movielens-1m": tmp_path / "ml-1m",
        "movielens-20m": tmp_path,
        "criteo": tmp_path / "dac",
    }
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        rp.find_datasets(tmp_path / "no-such-dir")


def test_paper_preset_refuses_a_missing_data_dir(tmp_path, capsys):
    assert (
        main(["reproduce", "--preset", "paper", "--out", str(tmp_path / "out"), "--data-dir", "/no/such/dir"])
        != 0
    )
    assert "/no/such/dir" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_paper_preset_trains_and_sweeps_the_data_sets_it_finds(tmp_path):
    """``--preset paper --data-dir`` on MovieLens-1M and Criteo files in their real formats."""
    data_dir = tmp_path / "data"
    write_movielens(data_dir / "ml-1m", "1m", n_ratings=3000)
    write_criteo(data_dir / "criteo" / "train.txt", 3000)
    tiny = replace(
        TINY,
        dummy_embed=(64,),
        ctr_bers=(1e-3, 1e-3),
        mitigations=("none", "abft"),
        test_rows=rp.PRESETS["paper"].test_rows,  # the paper preset scores every test row
    )
    run_preset("paper", tiny, tmp_path / "out", "--data-dir", str(data_dir))
    root = tmp_path / "out" / "paper"
    for dataset in ("movielens-1m", "criteo"):
        for model in rp.CTR_MODELS:
            assert (root / "checkpoints" / f"{model}-{dataset}" / "model.safetensors").is_file()
    ctr = load(root / "ctr.db")
    assert (ctr.status == "ok").all()
    assert set(ctr.dataset) == {"movielens-1m", "criteo"}
    assert len(ctr) == 2 * 5 * 3 * 2  # data sets x models x targets x mitigations (1 BER, 1 run)
    assert (root / "report" / "report.md").is_file()


def test_reproduce_compat_measures_each_defect(quick_run):
    """Last in this file: it adds the compat section to the shared run's report."""
    out, _ = quick_run
    printed = run_preset("quick", TINY, out.parent, "--compat", ",".join(COMPAT_FLAGS))
    settings = ["pytei", *COMPAT_FLAGS, "+".join(COMPAT_FLAGS)]
    assert "Compatibility: the original code's defects, measured" in printed
    section = (out / "report" / "compat.md").read_text()
    assert section in (out / "report" / "report.md").read_text()
    for setting in settings:
        assert f"| {setting} |" in section

    # the re-drawn split scores other rows (training rows among them): the baseline AUC moves
    def db(setting: str):
        return load(out / f"compat-{setting}.db")

    pytei_df, split_df = db("pytei"), db("original-split")
    assert (pytei_df.status == "ok").all() and (split_df.status == "ok").all()
    baselines = pytei_df.groupby("model").baseline_auc.first(), split_df.groupby("model").baseline_auc.first()
    assert (baselines[0] != baselines[1]).all()
    assert (db("accumulate").status == "ok").all() and (db("original-mask").status == "ok").all()
