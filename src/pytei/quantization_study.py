"""The study "does quantization change robustness?": one trained TorchRec model in fp32, fp16, int8, int4.

Two campaigns over the versions' embedding tables, BitFlip over a BER sweep: ``codes`` (the stored
values: fp32/fp16 floats, int8 codes, packed int4 codes) on every version, and ``scale/bias`` (the
fp16 scale and bias of each quantized row) on int8 and int4. Both use the spec's default seed, so
at run ``r`` every version gets the faults of the same per-site-name streams: where a field is the
same tensor shape and dtype (the ``[rows, 1]`` fp16 scale and bias sites of int8 and int4, named
alike) the faults are identical; codes never coincide across dtypes (32, 16, 8 or 4 bits per value).

The blast radius (:mod:`pytei.torchrec.blast`) replays single flips in the same test-read rows of
every version and measures what changes. Needs ``pytei[torchrec]``; the campaigns themselves are run
by ``pytei reproduce``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint

__all__ = [
    "DTYPES",
    "FIELDS",
    "QuantizationSizes",
    "blast_table",
    "label",
    "quantized_checkpoints",
    "specs",
    "study_trials",
]

#: The versions compared, float first.
DTYPES = ("fp32", "fp16", "int8", "int4")
#: Campaign target of each field group, and the versions that have it.
FIELDS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "codes": ({"component": "embedding", "fields": ["codes"], "label": "embedding codes"}, DTYPES),
    "scale/bias": (
        {"component": "embedding", "fields": ["scale", "bias"], "label": "embedding scale/bias"},
        ("int8", "int4"),
    ),
}
MODEL = "dlrm-torchrec"


@dataclass(frozen=True)
class QuantizationSizes:
    """Sizes of the study at one preset: BER sweep, runs, test rows scored, rows of the blast radius."""

    bers: tuple[float, float]
    per_decade: int
    runs: int
    test_rows: int
    blast_rows: int


def label(dtype: str) -> str:
    """The model label of a version in the campaigns and the report (``dlrm-torchrec/int8``)."""
    return f"{MODEL}/{dtype}"


def quantized_checkpoints(float_ckpt: Path, folder: Path) -> dict[str, Path]:
    """``{dtype: checkpoint}``: the float checkpoint as fp32 and each quantized version written under
    ``folder`` (kept when already there and made from these float weights, so the study resumes)."""
    from .torchrec.quantize import quantize

    out = {"fp32": float_ckpt}
    ckpt: Checkpoint | None = None
    sha = _meta(float_ckpt)["weights"]["sha256"]
    for dtype in DTYPES[1:]:
        path = folder / f"{float_ckpt.name}-{dtype}"
        out[dtype] = path
        if (path / "meta.json").is_file() and _meta(path).get("origin", {}).get("weights_sha256") == sha:
            continue
        ckpt = ckpt or load_checkpoint(float_ckpt)
        assert ckpt.data is not None  # loaded with its data
        d = ckpt.meta["data"]
        save_checkpoint(
            path,
            quantize(ckpt.model, dtype),
            ckpt.data,
            data_dir=d["data_dir"],
            data_options=d["options"],
            origin={"checkpoint": str(float_ckpt), "weights_sha256": ckpt.meta["weights"]["sha256"]},
        )
    return out


def _meta(ckpt: Path) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
    return meta


def specs(ckpts: dict[str, Path], sizes: QuantizationSizes) -> dict[str, dict[str, Any]]:
    """The two campaign specs (as data) by study name: ``quantization-codes``, ``-scale-bias``."""
    out = {}
    for field, (target, dtypes) in FIELDS.items():
        name = "quantization-" + field.replace("/", "-")
        out[name] = {
            "name": name,
            "runs": sizes.runs,
            "targets": [target],
            "metrics": ["auc", "logloss"],
            "models": [{"checkpoint": str(ckpts[d]), "label": label(d)} for d in dtypes],
            "data": {"split": "test", "max_rows": sizes.test_rows},
            "errors": {
                "model": "BitFlip",
                "rates": {"start": sizes.bers[0], "stop": sizes.bers[1], "per_decade": sizes.per_decade},
            },
        }
    return out


def study_trials(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The campaigns' trials with the columns the report's section reads: ``dtype`` and ``field``."""
    by_label = {label(d): d for d in DTYPES}
    by_target = {target["label"]: field for field, (target, _) in FIELDS.items()}
    df = pd.concat(list(frames.values()), ignore_index=True)
    return df.assign(dtype=df["model_label"].map(by_label), field=df["target"].map(by_target))


def _rows(ckpt: Any, batches: list[tuple[Any, ...]], n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` (table, row) pairs drawn uniformly from the rows the scored samples read."""
    from .torchrec import tables

    read = []
    for t in tables(ckpt.model):
        ids = torch.cat([b[1][f].values() for b in batches for f in t.features])
        read += [(t.name, int(r)) for r in torch.unique(ids)]
    pick = torch.randperm(len(read), generator=torch.Generator().manual_seed(seed))[:n]
    return [read[i] for i in pick.tolist()]


def blast_table(ckpts: dict[str, Path], sizes: QuantizationSizes, seed: int = 0) -> pd.DataFrame:
    """One row per measured single flip (``pytei.torchrec.blast.FlipEffect``) in every version, the same
    rows in each (read by the first ``test_rows`` test samples), with its ``dtype`` column."""
    from .torchrec.blast import blast_radius

    records = []
    rows: list[tuple[str, int]] | None = None
    for dtype in DTYPES:
        ckpt = load_checkpoint(ckpts[dtype])
        assert ckpt.data is not None
        test = ckpt.data.test.inputs
        n = min(sizes.test_rows or len(ckpt.data.test), len(ckpt.data.test))
        batches = [
            ckpt.data.model_inputs(tuple(t[i : min(i + 2048, n)] for t in test)) for i in range(0, n, 2048)
        ]
        rows = rows or _rows(ckpt, batches, sizes.blast_rows, seed)
        records += [{"dtype": dtype, **r} for r in blast_radius(ckpt.model, batches, rows, seed=seed)]
    return pd.DataFrame.from_records(records)
