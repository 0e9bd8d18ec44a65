"""``pytei reproduce``: the paper's study in one resumable command, ending with the report.

Presets:

* ``quick`` (the README's main job, 2-4 minutes on 2 CPU cores): the dummy-model study of Table 1
  (every hyper-parameter of the grid, BER 1e-8..1e-5, 5 runs) and the five CTR models trained on
  the synthetic CTR data set, swept over BER 1e-7..1e-2 and three targets with every mitigation,
  plus per-bit sensitivity and per-layer vulnerability studies, and (with ``pytei[torchrec]``) the
  quantization study (``pytei.quantization_study``: dlrm-torchrec in fp32, fp16, int8 and int4, BER
  1e-7..1e-2, errors in codes vs scale/bias, and the measured blast radius of single flips).
* ``paper``: the full grid (Table 1 at BER 1e-9..1e-2 with 10 runs; fm, dfm, afm, dcn, wd on every
  data set found in ``--data-dir`` at BER 1e-9..1e-2 with 10 runs, three targets, all mitigations),
  training any missing checkpoint first with the paper's settings.

Each study is a campaign in its own SQLite database under ``out``; running the command again
resumes where it stopped (finished checkpoints and trials are kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w
from rich.console import Console

from . import models
from .campaign import parse_spec
from .campaign.execute import run_campaign
from .checkpoint import load_checkpoint, save_checkpoint
from .compat import parse_flags
from .data import load as load_data
from .distributed_study import DistributedSizes
from .exceptions import ArgumentError, MissingExtraError
from .quantization_study import QuantizationSizes
from .report import write_report
from .results import load as load_results
from .train import TrainConfig, build, fit

__all__ = ["PRESETS", "Preset", "reproduce", "find_datasets"]

CTR_MODELS = ("fm", "dfm", "afm", "dcn", "wd")
_TARGETS: list[dict[str, Any]] = [
    {"component": "all", "params": "weight", "label": "whole model"},
    {"component": "embedding", "params": "weight", "label": "embedding"},
    {"component": "all", "params": "weight", "exclude": ["embedding.*"], "label": "neural networks"},
]

#: A campaign spec as data (the TOML document's tables), written with ``tomli_w``.
SpecData = dict[str, Any]


@dataclass(frozen=True)
class Preset:
    """Sizes of one preset."""

    dummy_hidden: tuple[int, ...]
    dummy_embed: tuple[int, ...]
    dummy_bers: tuple[float, float]
    dummy_samples: int
    ctr_bers: tuple[float, float]
    runs: int
    test_rows: int
    mitigations: tuple[str, ...]
    train: TrainConfig
    synthetic_rows: int
    sensitivity_ber: float
    quantization: QuantizationSizes


PRESETS = {
    "quick": Preset(
        dummy_hidden=(64, 128, 256, 512),
        dummy_embed=(64, 128, 256, 512),
        dummy_bers=(1e-8, 1e-5),
        dummy_samples=1024,
        ctr_bers=(1e-7, 1e-2),
        runs=5,
        test_rows=10_000,
        mitigations=("none", "clip", "clip-profiled", "protect-bits", "abft", "ecc"),
        train=TrainConfig(lr=3e-3, max_epochs=8, patience=2),
        synthetic_rows=100_000,
        sensitivity_ber=1e-3,
        quantization=QuantizationSizes(
            bers=(1e-7, 1e-2), per_decade=1, runs=5, test_rows=10_000, blast_rows=16
        ),
    ),
    "paper": Preset(
        dummy_hidden=(64, 128, 256, 512),
        dummy_embed=(64, 128, 256, 512),
        dummy_bers=(1e-9, 1e-2),
        dummy_samples=2048,
        ctr_bers=(1e-9, 1e-2),
        runs=10,
        test_rows=0,
        mitigations=("none", "clip", "clip-profiled", "protect-bits", "abft", "ecc"),
        train=TrainConfig(),
        synthetic_rows=200_000,
        sensitivity_ber=1e-3,
        quantization=QuantizationSizes(bers=(1e-7, 1e-2), per_decade=2, runs=10, test_rows=0, blast_rows=64),
    ),
}

# data set name -> file that must exist in --data-dir (or a sub-folder of that name)
_DATA_FILES = {"movielens-1m": "ratings.dat", "movielens-20m": "ratings.csv", "criteo": "train.txt"}


def find_datasets(data_dir: str | Path | None) -> dict[str, Path]:
    """The paper's data sets present under ``data_dir`` (directly or in ml-1m/, ml-20m/, criteo/);
    a ``data_dir`` that is not a directory is an error, not an empty result."""
    if data_dir is None:
        return {}
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {str(data_dir)!r} does not exist or is not a directory")
    subdirs = {
        "movielens-1m": ("ml-1m", "movielens-1m"),
        "movielens-20m": ("ml-20m", "movielens-20m"),
        "criteo": ("criteo", "dac"),
    }
    found = {}
    for name, filename in _DATA_FILES.items():
        for folder in (*(root / s for s in subdirs[name]), root):
            if (folder / filename).is_file():
                found[name] = folder
                break
    return found


def _bers(lo: float, hi: float) -> dict[str, float | int]:
    return {"start": lo, "stop": hi, "per_decade": 1}


def _checkpoint(
    out: Path,
    model: str,
    dataset: str,
    data_dir: Path | None,
    preset: Preset,
    console: Console,
    name: str | None = None,
) -> Path:
    """Train ``model`` on ``dataset`` unless its checkpoint (``name``, default ``model-dataset``) already
    exists (resumable)."""
    path = out / "checkpoints" / (name or f"{model}-{dataset}")
    if (path / "meta.json").is_file():
        try:
            load_checkpoint(path, with_data=False)
            return path
        except (ValueError, FileNotFoundError):
            console.print(
                f"retraining {path}: the checkpoint is incomplete",
                style="yellow",
                markup=False,
                soft_wrap=True,
            )
    cls = models.get(model)
    options = {"n_rows": preset.synthetic_rows} if dataset == "synthetic-ctr" else {}
    layout: str = getattr(cls, "input_layout", "categorical")  # every registered model has one
    data = load_data(dataset, data_dir, layout=layout, **options)
    console.print(f"training {model} on {dataset} ({len(data.train):,} rows)", markup=False, soft_wrap=True)
    result = fit(build(model, preset.train, field_dims=data.field_dims), data, preset.train)
    save_checkpoint(
        path, result.model, data, data_dir=data_dir, data_options=options, scores=result.summary()
    )
    console.print(
        f"  {model}/{dataset}: best epoch {result.best_epoch}, test AUC {result.test_auc:.4f}", markup=False
    )
    return path


def _dummy_spec(preset: Preset) -> SpecData:
    grid = {
        "mlp_depth": [1, 2],
        "mlp_hidden": list(preset.dummy_hidden),
        "embed_dim": list(preset.dummy_embed),
        "sparsity": [0.001, 0.01],
    }
    return {
        "name": "dummy-table1",
        "runs": preset.runs,
        "targets": [
            {"component": "all", "params": "weight", "label": "whole model"},
            {"component": "mlp", "params": "weight", "label": "mlp"},
            {"component": "embedding", "params": "weight", "label": "embedding"},
        ],
        "metrics": ["rmse"],
        "models": [{"dummy": grid, "samples": preset.dummy_samples}],
        "errors": {"model": "BitFlip", "rates": _bers(*preset.dummy_bers)},
    }


def _checkpoint_models(ckpts: list[Path], test_rows: int) -> SpecData:
    """The spec tables naming the trained checkpoints (any path: TOML strings are escaped by tomli_w)."""
    return {
        "models": [{"checkpoint": str(p), "label": p.name} for p in ckpts],
        "data": {"split": "test", "max_rows": test_rows},
    }


def _ctr_spec(preset: Preset, ckpts: list[Path]) -> SpecData:
    return {
        "name": "ctr-models",
        "runs": preset.runs,
        "targets": _TARGETS,
        "mitigations": list(preset.mitigations),
        "metrics": ["auc", "logloss", "rmse"],
        **_checkpoint_models(ckpts, preset.test_rows),
        "errors": {"model": "BitFlip", "rates": _bers(*preset.ctr_bers)},
    }


def _sensitivity_spec(preset: Preset, ckpts: list[Path]) -> SpecData:
    return {
        "name": "per-bit-sensitivity",
        "runs": preset.runs,
        "targets": [{"component": "all", "params": "weight", "label": "whole model"}],
        "metrics": ["auc", "rmse"],
        **_checkpoint_models(ckpts, preset.test_rows),
        "errors": {
            "model": "BitFlip",
            "rates": [preset.sensitivity_ber],
            "bit_sets": [[b] for b in range(31, -1, -1)],
        },
    }


def _layer_spec(preset: Preset, ckpts: list[Path]) -> SpecData:
    return {
        "name": "per-layer-vulnerability",
        "runs": preset.runs,
        "targets": "per-parameter",
        "metrics": ["auc", "rmse"],
        **_checkpoint_models(ckpts, preset.test_rows),
        "errors": {"model": "BitFlip", "rates": [1e-4, 1e-3]},
    }


def _compat_spec(preset: Preset, ckpts: list[Path], flags: tuple[str, ...]) -> SpecData:
    """The CTR study on the whole model, without mitigations, with the original code's ``flags``
    (``pytei.compat``): the same seeds, so every setting sees the same draws where they coincide."""
    data = _checkpoint_models(ckpts, preset.test_rows)
    if "original-split" in flags:
        data["data"]["split"] = "original"
    errors: dict[str, Any] = {"model": "BitFlip", "rates": _bers(*preset.ctr_bers)}
    extra: SpecData = {}
    if {"original-mask", "accumulate"} & set(flags):
        errors.update(
            model="OriginalBitFlip", mask="original-mask" in flags, accumulate="accumulate" in flags
        )
        extra["plugins"] = ["pytei.compat"]
    return {
        "name": "compat-" + ("+".join(flags) or "pytei"),
        **extra,
        "runs": preset.runs,
        "targets": [_TARGETS[0]],
        "metrics": ["auc"],
        **data,
        "errors": errors,
    }


def compat_table(frames: dict[str, pd.DataFrame], threshold: float = 0.01) -> pd.DataFrame:
    """Per model and setting: baseline AUC, failure BER (the lowest whose mean AUC is ``threshold``
    below the baseline; inf if none) and both against pytei's own (``"pytei"`` in ``frames``)."""
    rows = []
    for setting, df in frames.items():
        ok = df[df.status == "ok"]
        for model, g in ok.groupby("model_label" if "model_label" in ok else "model"):  # its display name
            baseline = float(g.baseline_auc.mean())
            by_rate = g.groupby("rate").auc.mean()
            failed = by_rate[by_rate <= baseline - threshold]
            rows.append(
                {
                    "model": model,
                    "setting": setting,
                    "baseline_auc": baseline,
                    "failure_ber": float(failed.index.min()) if len(failed) else float("inf"),
                }
            )
    table = pd.DataFrame(rows)
    ref = table[table.setting == "pytei"].set_index("model")
    table["baseline_shift"] = table.baseline_auc - table.model.map(ref.baseline_auc)
    ratio = table.failure_ber / table.model.map(ref.failure_ber)
    finite = np.isfinite(ratio) & (ratio > 0)
    table["failure_decades"] = np.log10(ratio.where(finite, 1.0)).where(finite, np.nan)
    return table


def _compat_markdown(table: pd.DataFrame, flags: tuple[str, ...]) -> str:
    lines = [
        "## Compatibility: the original code's defects, measured",
        "",
        f"`--compat {','.join(flags)}` (see `pytei.compat`): the same models, data and seeds; the whole "
        "model, no mitigation. Failure BER: the lowest BER whose mean AUC is 0.01 below the baseline; "
        "shifts are against pytei's own method.",
        "",
        "| model | setting | baseline AUC | shift | failure BER | shift (decades) |",
        "|---|---|---|---|---|---|",
    ]
    for r in table.itertuples():
        decades = "n/a" if not np.isfinite(r.failure_decades) else f"{r.failure_decades:+.1f}"
        lines.append(
            f"| {r.model} | {r.setting} | {r.baseline_auc:.4f} | {r.baseline_shift:+.4f} | "
            f"{r.failure_ber:.0e} | {decades} |"
        )
    return "\n".join(lines) + "\n"


def spec_text(data: SpecData) -> str:
    """``data`` as a TOML document (written by ``tomli_w``, so any path or label round-trips)."""
    return tomli_w.dumps(data)


def _run_study(out: Path, name: str, data: SpecData, workers: int, console: Console) -> pd.DataFrame:
    """Write study ``name``'s spec under ``out/specs``, run (or resume) it into ``out/NAME.db``, and
    return its trials."""
    text = spec_text(data)
    (out / "specs" / f"{name}.toml").write_text(text, encoding="utf-8")
    spec = parse_spec(text, out / "specs")
    console.print(spec.name, style="bold", markup=False, soft_wrap=True)
    result = run_campaign(spec, out / f"{name}.db", base_dir=out / "specs", workers=workers)
    console.print(
        f"  {result.ran} trials run, {result.skipped} resumed, {result.failed} failed", soft_wrap=True
    )
    return load_results(out / f"{name}.db")


def _quantization_study(
    out: Path, cfg: Preset, workers: int, console: Console
) -> dict[str, pd.DataFrame] | None:
    """Run (or resume) the quantization study (``pytei.quantization_study``) on dlrm-torchrec trained on
    the synthetic CTR data set; its tables for the report, or None (said in one line) without
    ``pytei[torchrec]``."""
    from . import quantization_study as study
    from .torchrec import require

    try:
        require("the quantization study of pytei reproduce")
    except MissingExtraError:
        console.print(
            "skipping the quantization study: it needs pytei[torchrec] (pip install 'pytei[torchrec]')",
            style="yellow",
            markup=False,
            soft_wrap=True,
        )
        return None
    sizes = cfg.quantization
    fp32 = _checkpoint(out, study.MODEL, "synthetic-ctr", None, cfg, console)
    ckpts = study.quantized_checkpoints(fp32, out / "checkpoints")
    specs = study.specs(ckpts, sizes)
    frames = {name: _run_study(out, name, data, workers, console) for name, data in specs.items()}
    console.print("quantization blast radius (single flips, measured)", style="bold", markup=False)
    blast = study.blast_table(ckpts, sizes)  # seconds, deterministic: measured again on every run
    blast.to_csv(out / "quantization-blast.csv", index=False)
    return {"quantization": study.study_trials(frames), "quantization_blast": blast}


def _abft_plans(ckpts: list[Path], console: Console, rows: int = 2048) -> pd.DataFrame:
    """``ABFT.plan`` of every CTR checkpoint on its first ``rows`` test samples, one frame with a
    ``model`` column (its checkpoint's name): what ABFT checks, on which roofline side, at what cost."""
    from .mitigation.abft import ABFT

    console.print("ABFT plan (coverage, roofline, measured check cost)", style="bold", markup=False)
    frames = []
    for path in ckpts:
        ckpt = load_checkpoint(path)
        assert ckpt.data is not None  # loaded with its data
        test = ckpt.data.test.inputs
        n = min(rows, len(ckpt.data.test))
        batch = ckpt.data.model_inputs(tuple(t[:n] for t in test))
        plan = ABFT(scheme="auto").plan(ckpt.model.eval(), batch, repeats=3)
        frames.append(plan.assign(model=path.name))
    return pd.concat(frames, ignore_index=True)


#: The distributed preset: dlrm-torchrec trained on synthetic-ctr (and its 1-epoch version, the stale host's
#: shards), sharded over 2 and 4 processes by every CPU strategy.
DISTRIBUTED_MODEL = "dlrm-torchrec"
DISTRIBUTED_TRAINING = TrainConfig(lr=3e-3, max_epochs=4, patience=2)
DISTRIBUTED_ROWS = 50_000
DISTRIBUTED = DistributedSizes(world_sizes=(2, 4), runs=2, test_rows=2000, latency_requests=20)


def _reproduce_distributed(out: Path, console: Console) -> Path:
    """Train the model (and its stale version), run the distributed-inference study, write its report."""
    from .distributed_study import run_study
    from .torchrec import require

    require("pytei reproduce --preset distributed")
    sizes = replace(PRESETS["quick"], synthetic_rows=DISTRIBUTED_ROWS, train=DISTRIBUTED_TRAINING)
    ckpt = _checkpoint(out, DISTRIBUTED_MODEL, "synthetic-ctr", None, sizes, console)
    early = replace(sizes, train=replace(DISTRIBUTED_TRAINING, max_epochs=1))
    name = f"{DISTRIBUTED_MODEL}-synthetic-ctr-epoch1"
    stale = _checkpoint(out, DISTRIBUTED_MODEL, "synthetic-ctr", None, early, console, name=name)
    trials = run_study(ckpt, out / "distributed.db", DISTRIBUTED, stale=stale, console=console)
    return write_report(
        trials,
        out / "report",
        title="pytei reproduce --preset distributed",
        extras={"distributed": trials},
        sections=("distributed", "definitions"),
    )


def reproduce(
    preset: str = "quick",
    out: str | Path = "pytei-out",
    *,
    data_dir: str | Path | None = None,
    workers: int = 0,
    console: Console | None = None,
    compat: Sequence[str] = (),
    synthetic: bool = False,
) -> Path:
    """Run (or resume) the preset's campaigns under ``out`` and write the report; returns report.md.

    ``synthetic``: let the paper preset fall back to the synthetic CTR data set when ``data_dir``
    holds none of the paper's data sets (refused otherwise: the paper grid takes hours).

    ``compat``: flags of ``pytei.compat.COMPAT_FLAGS``; the CTR study then also runs with each flag
    alone and with all together, and the report gets a table of what each moves."""
    flags = parse_flags(",".join(compat))
    if preset == "distributed":
        if flags:
            raise ArgumentError("--compat applies to the quick and paper presets, not to distributed")
        console = console or Console()
        report = _reproduce_distributed(Path(out).expanduser().resolve() / preset, console)
        console.print(f"report: {report} and {report.with_suffix('.html')}", markup=False, soft_wrap=True)
        return report
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}, distributed")
    console = console or Console()
    cfg = PRESETS[preset]
    out = Path(out).expanduser().resolve() / preset
    datasets: dict[str, Path | None] = {**find_datasets(data_dir)} if preset == "paper" else {}
    if preset == "paper" and not datasets and not synthetic:
        raise ArgumentError(
            f"no data set found in {data_dir} (expected files: "
            f"{', '.join(f'{k}: {v}' for k, v in _DATA_FILES.items())}); pass --synthetic to run the "
            "hours-long paper grid on the synthetic CTR data set instead"
        )
    (out / "specs").mkdir(parents=True, exist_ok=True)
    if preset == "paper" and not datasets:
        console.print(
            f"no data set found in {data_dir}; the CTR models use the synthetic CTR data set "
            f"(expected files: {', '.join(f'{k}: {v}' for k, v in _DATA_FILES.items())})",
            style="yellow",
            markup=False,
            soft_wrap=True,
        )
    if not datasets:
        datasets = {"synthetic-ctr": None}
    ckpts = [
        _checkpoint(out, m, ds, where, cfg, console) for ds, where in datasets.items() for m in CTR_MODELS
    ]
    studies = {
        "dummy": _dummy_spec(cfg),
        "ctr": _ctr_spec(cfg, ckpts),
        "bits": _sensitivity_spec(cfg, ckpts),
        "layers": _layer_spec(cfg, ckpts),
    }
    frames = [_run_study(out, name, data, workers, console) for name, data in studies.items()]
    extras = {"abft_plan": _abft_plans(ckpts, console)}
    extras.update(_quantization_study(out, cfg, workers, console) or {})
    report = write_report(
        pd.concat(frames, ignore_index=True),
        out / "report",
        title=f"pytei reproduce --preset {preset}",
        extras=extras,
    )
    if flags:
        settings = [(), *((f,) for f in flags), *([flags] if len(flags) > 1 else [])]
        compat_frames = {}
        for setting in settings:
            data = _compat_spec(cfg, ckpts, setting)
            compat_frames["+".join(setting) or "pytei"] = _run_study(
                out, data["name"], data, workers, console
            )
        section = _compat_markdown(compat_table(compat_frames), flags)
        (out / "report" / "compat.md").write_text(section, encoding="utf-8")
        with report.open("a", encoding="utf-8") as f:
            f.write("\n" + section)
        console.print(section, markup=False, soft_wrap=True)
    console.print(f"report: {report} and {report.with_suffix('.html')}", markup=False, soft_wrap=True)
    return report
