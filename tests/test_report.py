"""pytei.report on a small synthetic campaign: figures, Markdown and HTML contents, definitions."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import special

from pytei.report import failure_ber, point_stats, ranked_median, summarize, write_report
from pytei.report.document import MAX_FIGURE_PX
from pytei.report.figures import labels_overlap, per_layer_figure, quality_figure, styles

DCN, FM = "ckpt:/tmp/ckpt/dcn", "ckpt:/tmp/ckpt/fm"
BASE_AUC = {DCN: 0.80, FM: 0.78}
#: Mean AUC of DCN, target "all", no mitigation: fails (< 0.99 x 0.80 = 0.792) first at 1e-5.
DCN_ALL = {1e-6: 0.80, 1e-5: 0.79, 1e-4: 0.60}
SPREAD = (-0.01, 0.0, 0.01)
MITIGATION_DROP = {"none": 0.3, "clip": 0.1, "protect-bits": 0.2}
TARGET_DROP = {"all": 1.0, "mlp": 0.8, "embedding": 0.01}


def _row(**values) -> dict:
    row = {
        "trial_id": None,
        "target": "all",
        "kind": "component",
        "architecture": "",
        "model_config": None,
        **{c: math.nan for c in CONFIG_COLUMNS},
        "params": "all",
        "site": "weights",
        "error_model": "BitFlip",
        "bits": None,
        "seed": 0,
        "mitigation": "none",
        "status": "ok",
        "error_message": None,
        "n_faults": 1,
        "n_invalid": 0,
        "n_outputs": 100,
        "auc": math.nan,
        "auc_valid": math.nan,
        "invalid_frac": 0.0,
        "logloss": math.nan,
        "rmse": math.nan,
        "rmse_valid": math.nan,
        "baseline_auc": math.nan,
        "baseline_rmse": 0.0,
        "extra": "{}",
        "started": 0.0,
        "finished": 1.0,
        "duration_s": 1.0,
        "worker": "test:1",
    }
    row.update(values)
    return row


CONFIG_COLUMNS = (
    "cfg_mlp_depth",
    "cfg_mlp_hidden",
    "cfg_embed_dim",
    "cfg_dense_dim",
    "cfg_sparse_dim",
    "cfg_sparsity",
    "cfg_samples",
)


def _dummy_rmse(target: str, rate: float, hidden: int, embed: int, run: int) -> float:
    if (target, rate, hidden, embed) == ("all", 1e-6, 128, 256):
        return (math.inf, math.inf, 1.0)[run]  # -> "inf"
    if (target, rate, hidden, embed) == ("mlp", 1e-6, 128, 256):
        return (math.nan, math.nan, math.inf)[run]  # -> "nan"
    if (target, rate, hidden, embed) == ("all", 1e-6, 64, 64):
        return (1.0, 2.0, math.inf)[run]  # -> 2 with "*"
    if rate == 1e-7 and hidden == 64:
        return 0.001  # -> "0.0"
    return rate * 1e5 * hidden / 64 * (1 + run) * (2 if target == "all" else 1)


def dummy_rows() -> list[dict]:
    rows = []
    for hidden in (64, 128):
        for embed in (64, 256):
            for rate in (1e-7, 1e-6):
                for target in ("all", "mlp"):
                    for run in range(3):
                        rmse = _dummy_rmse(target, rate, hidden, embed, run)
                        rows.append(_dummy(hidden, embed, target, rate, run, rmse))
    for bit, rmse in ((30, math.inf), (10, 0.02), (0, 0.0)):
        rows += [_dummy(64, 64, "all", 1e-5, run, rmse, bits=f"[{bit}]", kind="bits") for run in range(3)]
    return rows


def dummy_config(hidden: int, embed: int) -> dict:
    """The cfg_* columns results.load gives a dummy model (and its model_config)."""
    config = {"mlp_depth": 1, "mlp_hidden": hidden, "embed_dim": embed, "dense_dim": 13, "sparse_dim": 26}
    config |= {"sparsity": 0.01, "samples": 256}
    columns = {f"cfg_{k}": float(v) for k, v in config.items()}
    return {"model_config": config, "architecture": "dummy", **columns}


def _dummy(hidden: int, embed: int, target: str, rate: float, run: int, rmse: float, **extra) -> dict:
    key = f"dummy:depth=1,hidden={hidden},embed={embed},sparsity=0.01,samples=256"
    data = "synthetic (sparsity 0.01)"
    return _row(
        model=key,
        model_label="dummy",
        dataset=data,
        target=target,
        rate=rate,
        run=run,
        rmse=rmse,
        **{**dummy_config(hidden, embed), **extra},
    )


def _auc(model: str, target: str, mitigation: str, rate: float) -> float:
    if (model, target, mitigation) == (DCN, "all", "none"):
        return DCN_ALL[rate]
    if (model, target, mitigation) == (FM, "mlp", "none"):
        return 0.70  # below 0.99 x 0.78 everywhere -> "<= 1e-06"
    drop = MITIGATION_DROP[mitigation] * TARGET_DROP[target]  # embedding never fails (drop <= 0.003)
    return BASE_AUC[model] - drop * math.log10(rate / 1e-7) / 3


def labelled_rows() -> list[dict]:
    rows = []
    for model, label in ((DCN, "dcn"), (FM, "fm")):
        for rate in (1e-6, 1e-5, 1e-4):
            for target in ("all", "mlp", "embedding"):
                for mitigation in ("none", "clip", "protect-bits"):
                    auc = _auc(model, target, mitigation, rate)
                    rows += [
                        _labelled(model, label, target, rate, run, auc + SPREAD[run], mitigation=mitigation)
                        for run in range(3)
                    ]
    for bit, drop in ((30, 0.3), (23, 0.05), (0, 0.0)):
        bits = {"bits": f"[{bit}]", "kind": "bits"}
        rows += [_labelled(DCN, "dcn", "all", 1e-5, run, 0.8 - drop, **bits) for run in range(3)]
    for param, drop in (("mlp.0.weight", 0.2), ("mlp.0.bias", 0.01), ("embedding.weight", 0.05)):
        for rate in (1e-5, 1e-4):
            auc = 0.8 - drop * math.log10(rate / 1e-6)
            rows += [_labelled(DCN, "dcn", param, rate, run, auc, kind="parameter") for run in range(3)]
    return rows


def _labelled(model: str, label: str, target: str, rate: float, run: int, auc: float, **extra) -> dict:
    return _row(
        model=model,
        model_label=label,
        architecture=label,
        dataset="movielens-1m",
        target=target,
        rate=rate,
        run=run,
        auc=auc,
        baseline_auc=BASE_AUC[model],
        invalid_frac=rate * 100,  # 1e-4 -> 1 % of outputs invalid
        logloss=0.6 + BASE_AUC[model] - auc,
        **extra,
    )


def failed_row() -> dict:
    return _row(model=DCN, model_label="dcn", dataset="movielens-1m", rate=1e-5, run=9, status="failed",
                error_message="RuntimeError: boom")  # fmt: skip


def frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    df["trial_id"] = [f"t{k}" for k in range(len(df))]
    return df


@pytest.fixture(scope="module")
def campaign() -> pd.DataFrame:
    return frame(dummy_rows() + labelled_rows() + [failed_row()])


@pytest.fixture(scope="module")
def report(campaign: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(campaign, tmp_path_factory.mktemp("report"), title="unit campaign")


HEATMAP_PNG = "fig1-rmse-dense-dim=13-mlp-depth=1-samples=256-sparse-dim=26-sparsity=0.01.png"
EXPECTED_PNGS = {
    HEATMAP_PNG,
    "fig2-auc-vs-ber-all.png",
    "fig2-auc-vs-ber-mlp.png",
    "fig2-auc-vs-ber-embedding.png",
    "fig3-mitigation-all.png",
    "fig3-mitigation-mlp.png",
    "fig3-mitigation-embedding.png",
    "fig4-per-bit.png",
    "fig5-per-layer-dcn-movielens-1m.png",
    "fig6-invalid-labelled.png",
}
HEADINGS = (
    "# pytei report: unit campaign",
    "## 1. RMSE heatmaps of dummy models (Figs 4-6)",
    "## 2. Quality vs BER (Figs 7-9)",
    "## 3. Mitigation comparison (Fig 10)",
    "## 4. Per-bit sensitivity",
    "## 5. Per-layer vulnerability",
    "## 6. Failure BER",
    "## 7. Invalid outputs and log loss",
    "## 8. Definitions",
)


def _table_row(md: str, *cells: str) -> str:
    """The one Markdown table row starting with ``cells``."""
    prefix = "| " + " | ".join(cells) + " |"
    hits = [line for line in md.splitlines() if line.startswith(prefix)]
    assert len(hits) == 1, f"{len(hits)} rows start with {prefix!r}"
    return hits[0]


def test_pngs_are_valid_images(report: Path) -> None:
    pngs = {p.name for p in report.parent.glob("*.png")}
    assert pngs == EXPECTED_PNGS
    for name in pngs:
        path = report.parent / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as img:
            assert img.format == "PNG"
            assert img.width >= 500 and img.height >= 300


def test_markdown_sections_header_and_images(report: Path, campaign: pd.DataFrame) -> None:
    md = report.read_text()
    n_ok = int((campaign.status == "ok").sum())
    for heading in HEADINGS:
        assert f"\n{heading}\n" in f"\n{md}"
    assert f"Trials: {n_ok} ok, 1 failed ({n_ok + 1} in all)." in md
    assert "| RuntimeError: boom | 1 |" in md
    for name in EXPECTED_PNGS:
        assert f"]({name})" in md


def anderson(x: np.ndarray, a: float, b: float) -> tuple[float, float]:
    """Anderson's 95 % bounds for the mean of x in [a, b], written out: mass eps moved to each bound."""
    x, n = np.sort(x), len(x)
    eps = special.smirnovi(n, 0.025)
    up = np.minimum(1, np.arange(n) / n + eps)  # the CDF's upper band on [x_(i), x_(i+1)), x_(0) = a
    low = a + sum((hi - lo) * (1 - f) for lo, hi, f in zip([a, *x[:-1]], x, up, strict=True))
    down = np.maximum(0, np.arange(1, n + 1) / n - eps)  # lower band on [x_(i), x_(i+1)), x_(n+1) = b
    high = b - sum((hi - lo) * f for lo, hi, f in zip(x, [*x[1:], b], down, strict=True))
    return float(low), float(high)


def test_markdown_has_independently_computed_auc_points(report: Path, campaign: pd.DataFrame) -> None:
    md = report.read_text()
    plain = campaign[(campaign.status == "ok") & campaign.bits.isna() & (campaign.mitigation == "none")]
    for model, label, target, rate in ((DCN, "dcn", "all", 1e-5), (FM, "fm", "embedding", 1e-4)):
        auc = plain[(plain.model == model) & (plain.target == target) & (plain.rate == rate)].auc
        mean, std, n = auc.mean(), auc.std(), len(auc)
        low, high = anderson(auc.to_numpy(), 0.0, 1.0)
        expected = [f"{v:.4g}" for v in (mean, std, auc.min(), auc.max(), low, high)]
        row = _table_row(md, "movielens-1m", label, f"{rate:.0e}", str(n), "0", "0", *expected)
        assert row.endswith(f"| {BASE_AUC[model]:.4g} |")


def test_heatmap_cells_follow_ranked_median(report: Path) -> None:
    md = report.read_text()
    # target, BER, hidden, embed | median, its CI (3 runs: the metric's range), n, #inf, #nan, mean
    assert _table_row(md, "all", "1e-06", "128", "256", "inf", "0", "inf", "3", "2", "0", "inf")
    assert _table_row(md, "mlp", "1e-06", "128", "256", "nan", "0", "inf", "1", "1", "2", "inf")
    assert _table_row(md, "all", "1e-06", "64", "64", "2", "0", "inf", "3", "1", "0", "inf")  # inf run counts
    assert _table_row(md, "mlp", "1e-07", "64", "256", "0.001")


def test_failure_ber_table(report: Path) -> None:
    md = report.read_text()
    interpolated = 10 ** (-6 + (0.80 - 0.792) / (0.80 - 0.79))  # log10-linear between 1e-6 and 1e-5
    row = _table_row(md, "dcn", "movielens-1m", "all", "none", "0.8", "0.792", "1e-05")
    assert f"{interpolated:.3g}" == "6.31e-06" and row.endswith("| 6.31e-06 |")
    assert _table_row(md, "fm", "movielens-1m", "mlp", "none", "0.78", "0.7722", "<= 1e-06", "<= 1e-06")
    for mitigation in ("none", "clip", "protect-bits"):
        assert _table_row(
            md, "fm", "movielens-1m", "embedding", mitigation, "0.78", "0.7722", "> 1e-04", "> 1e-04"
        )


def test_per_bit_and_per_layer_tables(report: Path) -> None:
    md = report.read_text()
    assert _table_row(md, "dcn", "movielens-1m", "all", "none", "1e-05", "30", "AUC drop", "0.3", "3")
    dummy = "dummy [depth=1,hidden=64,embed=64,sparsity=0.01,samples=256]"
    assert _table_row(md, dummy, "synthetic (sparsity 0.01)", "all", "none", "1e-05", "30", "RMSE", "inf")
    section = md.split("## 5. Per-layer vulnerability")[1].split("## 6.")[0]
    order = [line.split(" | ")[1] for line in section.splitlines() if line.startswith("| 1e-04 ")]
    assert order == ["mlp.0.weight", "embedding.weight", "mlp.0.bias"]


def test_html_is_self_contained(report: Path) -> None:
    page = (report.parent / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(list(report.parent.glob("*.png")))
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", page)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for heading in HEADINGS:
        assert heading.lstrip("# ") in page


def test_only_dummy_rows(tmp_path: Path) -> None:
    md = write_report(frame(dummy_rows()), tmp_path).read_text()
    assert {p.name for p in tmp_path.glob("*.png")} == {
        HEATMAP_PNG,
        "fig4-per-bit.png",
    }
    assert "No trials of models with labels (AUC) without mitigation." in md
    assert "No model was run with more than one mitigation." in md
    assert "No per-parameter trials" in md


def test_a_report_rewritten_on_the_same_results_draws_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each PNG stores a digest of what it was drawn from: an unchanged figure is not drawn again (a
    resumed campaign's report); changed results or a damaged file draw it again."""
    from matplotlib.figure import Figure

    drawn: list[str] = []
    savefig = Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig", lambda fig, path, **kw: (drawn.append(Path(path).name), savefig(fig, path, **kw))
    )
    rows = dummy_rows()
    write_report(frame(rows), tmp_path)
    assert sorted(drawn) == sorted([HEATMAP_PNG, "fig4-per-bit.png"])
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    drawn.clear()
    write_report(frame(rows), tmp_path)
    assert drawn == [] and {p.name: p.read_bytes() for p in tmp_path.glob("*.png")} == before
    frame(rows).to_pickle(tmp_path / "rows.pkl")  # and in another process (a resumed run): the digest
    again = (  # holds no object address
        "import sys, pandas as pd; from matplotlib.figure import Figure;"
        "from pytei.report import write_report;"
        "Figure.savefig = lambda *a, **k: sys.exit('drew ' + str(a[1]));"
        "write_report(pd.read_pickle(sys.argv[1]), sys.argv[2])"
    )
    done = subprocess.run(
        [sys.executable, "-c", again, str(tmp_path / "rows.pkl"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    (tmp_path / "fig4-per-bit.png").write_bytes(b"not a png")
    write_report(frame(rows), tmp_path)
    assert (
        drawn == ["fig4-per-bit.png"]
        and (tmp_path / "fig4-per-bit.png").read_bytes() == before["fig4-per-bit.png"]
    )
    drawn.clear()
    changed = [{**r, "rmse": r["rmse"] * 2} if r["target"] == "all" else r for r in rows]
    write_report(frame(changed), tmp_path)
    assert HEATMAP_PNG in drawn and (tmp_path / HEATMAP_PNG).read_bytes() != before[HEATMAP_PNG]


def test_only_labelled_rows(tmp_path: Path) -> None:
    rows = [r for r in labelled_rows() if r["target"] != "mlp" and r["mitigation"] == "none"]
    md = write_report(frame(rows), tmp_path).read_text()
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "fig2-auc-vs-ber-all.png",
        "fig2-auc-vs-ber-embedding.png",
        "fig4-per-bit.png",
        "fig5-per-layer-dcn-movielens-1m.png",
        "fig6-invalid-labelled.png",
    }
    assert "No dummy-model trials" in md
    assert "No model was run with more than one mitigation." in md


def test_only_failed_rows_and_db_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = types.ModuleType("pytei.results")
    results.load = lambda db: frame([failed_row()]) if str(db).endswith("c.db") else None
    monkeypatch.setitem(sys.modules, "pytei.results", results)
    md = write_report(tmp_path / "c.db", tmp_path / "out").read_text()
    assert "Trials: 0 ok, 1 failed (1 in all)." in md
    assert not list((tmp_path / "out").glob("*.png"))
    assert "<figure>" not in (tmp_path / "out" / "report.html").read_text()


def test_ranked_median_and_summary() -> None:
    inf, nan = math.inf, math.nan
    assert ranked_median([1.0, 3.0, 2.0]) == 2.0
    assert ranked_median([1.0, inf, 2.0]) == 2.0
    assert ranked_median([1.0, inf, nan]) == inf
    assert math.isnan(ranked_median([nan, nan, inf]))
    assert ranked_median([1.0, 2.0, 3.0, inf]) == 2.5
    assert ranked_median([1.0, 2.0, inf, nan]) == inf  # upper middle of an even count
    s = summarize([1.0, 2.0, 3.0, inf, nan])  # pytei.stats.summarize: nan has no value, inf is one
    assert (s.n, s.n_inf, s.n_nan, s.mean, s.min, s.max, s.median) == (4, 1, 1, inf, 1.0, inf, 2.5)


def test_failure_ber_function() -> None:
    grid, interp = failure_ber([1e-4, 1e-6, 1e-5], [0.6, 0.8, 0.79], 0.8)
    assert grid == 1e-5 and interp == pytest.approx(10**-5.2)
    assert failure_ber([1e-6, 1e-5], [0.8, 0.795], 0.8) == (None, None)
    assert failure_ber([1e-6, 1e-5], [0.7, 0.6], 0.8) == (1e-6, None)
    assert np.isclose(failure_ber([1e-6, 1e-5], [0.8, 0.784], 0.8)[1], 10**-5.5)


def test_varying_error_settings_name_the_lines(tmp_path: Path) -> None:
    rows = [r for r in labelled_rows() if r["bits"] is None and r["target"] == "all"]
    rows += [{**r, "site": "activations"} for r in rows if r["model"] == DCN]
    md = write_report(frame(rows), tmp_path).read_text()
    assert "\n| movielens-1m | dcn (site=activations) | 1e-06 | 3 |" in md
    assert "\n| movielens-1m | fm (site=weights) | 1e-06 | 3 |" in md
    assert "| dcn (site=weights) | movielens-1m | all | none | 0.8 | 0.792 | 1e-05 | 6.31e-06 |" in md


def test_mitigation_activity_means_the_stored_counters() -> None:
    from pytei.report import mitigation_activity

    rows = pd.DataFrame(
        {
            "mitigation": ["abft", "abft", "ecc", "none", "clip"],
            "rate": [1e-4, 1e-4, 1e-4, 1e-4, 1e-4],
            "extra": [
                '{"detected": 10, "reexecutions": 3, "recovered": 0, "unrecoverable": 10, "false_alarms": 0}',
                '{"detected": 20, "reexecutions": 3, "recovered": 4, "unrecoverable": 16, "false_alarms": 0}',
                '{"words_with_errors": 5, "corrected": 4, "detected": 1, "miscorrected": 0, "undetected": 0}',
                "{}",
                '{"layers": 2}',
            ],
        }
    )
    table = mitigation_activity(rows)
    assert table["mitigation"].tolist() == ["abft", "ecc"]  # none and clip keep no counters
    abft = table.iloc[0]
    assert abft["trials"] == "2"
    want = "detected 15, reexecutions 3, recovered 2, unrecoverable 13, false alarms 0"
    assert abft["mean per trial"] == want
    assert table.iloc[1]["mean per trial"].startswith("words with errors 5, corrected 4, detected 1")


# --------------------------------------------------------------------------- regressions (issue 17)


def _labelled_frame(targets: dict[str, str], rates=(1e-5, 1e-4)) -> pd.DataFrame:
    """DCN rows per target name -> kind, 3 runs each."""
    rows = []
    for target, kind in targets.items():
        for rate in rates:
            rows += [
                _labelled(DCN, "dcn", target, rate, run, 0.78 - run / 100, kind=kind) for run in range(3)
            ]
    return frame(rows)


def test_trial_kinds_come_from_the_kind_column_not_the_name(tmp_path: Path) -> None:
    df = _labelled_frame({"v1.2": "component", "embedding": "parameter"})
    md = write_report(df, tmp_path).read_text()
    pngs = {p.name for p in tmp_path.glob("*.png")}
    assert "fig2-auc-vs-ber-v1.2.png" in pngs  # a dotted component name stays a component
    per_layer = md.split("## 5. Per-layer vulnerability")[1].split("## 6.")[0]
    assert [line.split(" | ")[1] for line in per_layer.splitlines() if line.startswith("| 1e-04 ")] == [
        "embedding"
    ]  # an undotted parameter trial is a per-parameter trial
    with pytest.raises(ValueError, match=r"unknown trial kind\(s\) \['layer'\].*allowed: \['component'"):
        write_report(_labelled_frame({"mlp": "layer"}), tmp_path / "bad")


def test_dummy_configuration_comes_from_columns(tmp_path: Path) -> None:
    rows = [
        {**r, "model": f"grid-point-{r['cfg_mlp_hidden']:g}-{r['cfg_embed_dim']:g}"} for r in dummy_rows()
    ]
    md = write_report(frame(rows), tmp_path).read_text()
    assert HEATMAP_PNG in {p.name for p in tmp_path.glob("*.png")}  # the model key says nothing
    assert _table_row(md, "all", "1e-06", "128", "256", "inf")


def _cells(values: dict[float, float]) -> pd.DataFrame:
    """Heatmap cells: target all, 1 hidden x 2 embed, one value per BER."""
    recs = []
    for rate, value in values.items():
        for embed in (64.0, 128.0):
            recs.append({"target": "all", "rate": rate, "hidden": 64.0, "embed": embed, "ranked": value})
    return pd.DataFrame(recs).assign(n_inf=0, n_nan=0)


def test_heatmaps_keep_every_ber_and_small_values_in_scientific_notation() -> None:
    from pytei.report.figures import heatmap_figure
    from pytei.report.format import cell_text

    assert [cell_text(v) for v in (0.0, 3e-4, 0.0049, 0.05, 2.5, 2e33, math.inf, math.nan)] == [
        "0", "3e-4", "5e-3", "0.05", "2.5", "2e33", "inf", "nan",
    ]  # fmt: skip
    fig = heatmap_figure(_cells({1e-8: 1e-4, 1e-7: 2e-3, 1e-6: math.inf}), "t")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["entire model | BER 1e-08", "entire model | BER 1e-07", "entire model | BER 1e-06"]
    texts = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert {"1e-4", "2e-3", "inf"} <= texts


def test_mitigation_section_compares_dummy_models_too(tmp_path: Path) -> None:
    """examples/quick.toml runs dummy models with none and clip: section 3 must compare them."""
    rows = dummy_rows()
    rows += [{**r, "mitigation": "clip", "rmse": r["rmse"] / 2} for r in rows if r["kind"] == "component"]
    md = write_report(frame(rows), tmp_path).read_text()
    section = md.split("## 3. Mitigation comparison (Fig 10)")[1].split("## 4.")[0]
    assert "No model was run with more than one mitigation" not in section
    assert "fig3-mitigation-rmse-all.png" in {p.name for p in tmp_path.glob("*.png")}
    assert "| clip | 1e-06 | 1 |" in section  # median of runs 1, 2 (x hidden 64 / 64) halved


def test_unmitigated_line_is_drawn_on_top_and_visible() -> None:
    from pytei.report.figures import mitigation_figure

    recs = []
    for mitigation in ("none", "abft", "clip"):
        for rate in (1e-5, 1e-4):
            mean = 0.7 if mitigation != "clip" else 0.75  # abft changes nothing: exactly the "none" curve
            recs.append({"dataset": "d", "series": "m", "mitigation": mitigation, "rate": rate, "mean": mean})
    fig = mitigation_figure(pd.DataFrame(recs).assign(ranked=math.nan), "t")
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    none, abft = lines["none"], lines["abft"]
    assert none.get_zorder() > max(ln.get_zorder() for k, ln in lines.items() if k != "none")
    assert none.get_linestyle() == "--" and none.get_color() == "black"
    assert not np.allclose(none.get_xdata(), abft.get_xdata())  # dodged: both stay visible


def test_axes_and_intervals_stay_inside_the_metric_range(tmp_path: Path) -> None:
    rows = [_labelled(DCN, "dcn", "all", 1e-4, run, auc) for run, auc in enumerate((0.8, 0.5, 0.79))]
    bits = {"bits": "[3]", "kind": "bits"}
    rows += [_dummy(64, 64, "all", 1e-5, run, v, **bits) for run, v in enumerate((1e-3, 0.5, 2e-3))]
    df = frame(rows)
    md = write_report(df, tmp_path).read_text()
    points = point_stats(df, ["dataset", "rate"], "auc", (0.0, 1.0)).assign(series="dcn")
    fig = quality_figure(points, df.assign(series="dcn"), "auc", "t", styles(["dcn"]))
    for ax in fig.axes:
        if ax.get_visible():
            lo, hi = ax.get_ylim()
            assert 0 <= lo < hi <= 1
    row = _table_row(md, "dummy", "synthetic (sparsity 0.01)", "all", "none", "1e-05", "3", "RMSE")
    ci_lo = float(row.split(" | ")[-3])  # | ... | CI95 lo | CI95 hi | median |
    assert ci_lo >= 0  # a Student-t interval here is (-0.55, 0.89)


FIVE = ("fm", "dfm", "afm", "dcn", "wd")


def _five_models() -> pd.DataFrame:
    rows = []
    for k, label in enumerate(FIVE):
        for rate in (1e-6, 1e-5, 1e-4, 1e-3):
            aucs = (0.75, 0.75 - k / 1000, 0.5 if rate >= 1e-4 else 0.75)  # overlapping, one collapsed run
            rows += [
                _row(model=f"ckpt:/c/{label}", model_label=label, dataset="d", rate=rate, run=run, auc=auc,
                     baseline_auc=0.75)
                for run, auc in enumerate(aucs)
            ]  # fmt: skip
    return frame(rows)


def test_five_overlapping_models_each_get_a_panel_and_a_style() -> None:
    df = _five_models().assign(series=lambda d: d["model_label"])
    points = point_stats(df, ["dataset", "series", "rate"], "auc", (0.0, 1.0))
    palette = styles(FIVE)
    assert len({(s.color, s.marker) for s in palette.values()}) == 5
    fig = quality_figure(points, df, "auc", "t", palette)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["d: all models", *(f"d: {m}" for m in sorted(FIVE))]
    overview = fig.axes[0]
    assert not overview.collections  # the overview has lines only: no bands or error bars over them


def test_figures_fit_the_page_with_readable_text(tmp_path: Path) -> None:
    df = _five_models()
    df = pd.concat([df.assign(mitigation=m) for m in ("none", "clip", "abft", "ecc", "protect-bits")])
    write_report(frame(df.to_dict("records")), tmp_path)
    pngs = list(tmp_path.glob("*.png"))
    assert {p.name for p in pngs} >= {"fig2-auc-vs-ber-all.png", "fig3-mitigation-all.png"}
    for path in pngs:
        with Image.open(path) as img:
            assert img.width <= MAX_FIGURE_PX  # the HTML page never shrinks a figure
    page = (tmp_path / "report.html").read_text()
    assert f"max-width:{MAX_FIGURE_PX}px" in page and "img{max-width:100%}" not in page
    fig = quality_figure(
        point_stats(df.assign(series=df["model_label"]), ["dataset", "series", "rate"], "auc", (0.0, 1.0)),
        df.assign(series=df["model_label"]), "auc", "t", styles(FIVE),
    )  # fmt: skip
    sizes = [t.get_fontsize() for t in fig.findobj(lambda a: hasattr(a, "get_fontsize")) if t.get_text()]
    assert min(sizes) >= 9


def test_per_layer_tick_labels_do_not_overlap() -> None:
    """Wide&Deep's parameters with drops of +-1e-3: side-by-side panels crowded their x tick labels."""
    names = ["linear.bias", "linear.fc.weight", "embedding.embedding.weight"]
    names += [f"mlp.{i}.{w}" for i in (0, 1, 4, 5, 8) for w in ("weight", "bias")]
    rows = []
    for rate in (1e-4, 1e-3):
        for k, name in enumerate(names):
            drop = float(np.interp(k, [0, len(names) - 1], [-0.00062, 0.00137]))
            rows += [_labelled(DCN, "wd", name, rate, run, 0.8 - drop, kind="parameter") for run in range(3)]
    df = frame(rows).assign(drop=lambda d: d["baseline_auc"] - d["auc"])
    points = point_stats(df, ["rate", "target"], "drop", (-0.2, 0.8)).assign(metric="AUC drop")
    fig = per_layer_figure(points.assign(score=points["mean"]), df, "t")
    assert labels_overlap(fig) == []


def test_invalid_outputs_and_log_loss_are_reported(report: Path) -> None:
    md = report.read_text()
    section = md.split("## 7. Invalid outputs and log loss")[1].split("## 8.")[0]
    # dcn, all, none, 1e-4: invalid share 0.01; log loss 0.6 + (0.8 - mean AUC 0.6) = 0.8
    row = _table_row(section, "dcn", "movielens-1m", "all", "none", "1e-04", "3", "0.01")
    assert "| 0.8 | 0.8 |" in row
    assert "fig6-invalid-labelled.png" in section


def test_abft_plan_section_appears_only_with_its_table(campaign: pd.DataFrame, tmp_path: Path) -> None:
    """The ABFT plan of each model (``pytei reproduce`` passes it as ``extras``): a summary per model,
    the unchecked layers with their reasons, the checked layers on the roofline; numbered before the
    Definitions, which move down one."""
    import torch
    from torch import nn

    from conftest import ScaledLinear
    from pytei.mitigation import ABFT
    from pytei.mitigation.roofline import Balance

    profile = Balance(device="test", threads=1, flops=1e11, bandwidth=1e10, torch=torch.__version__)
    plans = [
        ABFT(scheme="auto").plan(model, torch.randn(64, 4), balance=profile, repeats=1).assign(model=name)
        for name, model in (("odd", ScaledLinear()), ("mlp", nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))))
    ]
    extras = {"abft_plan": pd.concat(plans, ignore_index=True)}
    md = write_report(campaign, tmp_path, extras=extras).read_text()
    assert "\n## 8. ABFT coverage and cost per layer\n" in md and "\n## 9. Definitions\n" in md
    assert _table_row(md, "odd", "1", "1").startswith("| odd | 1 | 1 | 10 of 14 |")  # fc checked, scale not
    assert _table_row(md, "mlp", "2", "0")
    assert "| odd |  | ScaledLinear | 4 | it is a ScaledLinear, which has no registered ABFT check |" in md
    assert "| mlp | 0 | Linear | 64x4 -> 64x8 |" in md
