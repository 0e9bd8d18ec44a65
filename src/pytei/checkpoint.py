"""Checkpoints: a directory with weights in safetensors and JSON metadata (never pickle).

The metadata records how to rebuild the model (registry name and config) and the exact test split
it was scored on (data set name, options, split seed, fingerprint), so ``load_checkpoint`` gives
back the model *and* the same held-out rows, refusing data that changed since training.

Integrity: the metadata records the sha256 of ``model.safetensors``; ``load_checkpoint`` verifies
it, so a flipped byte in the weights is refused, not loaded. Both files are written aside and
renamed into place (weights first, metadata last), so a failed save (a full disk) leaves no
half-written file under the final names.

Quantized inference checkpoints (``pytei quantize``) record ``model.quantization.dtype``; loading
rebuilds the float model from its config, quantizes it the same way (``pytei.torchrec.quantize``)
and writes the stored table bytes (codes, scale, bias, padding) back into it, bit for bit.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

from . import models
from .data import CTRDataset
from .data import load as load_data
from .data.dataset import file_sha256
from .exceptions import ArgumentError, CheckpointError

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "weights_sha256", "WEIGHTS", "META"]

WEIGHTS = "model.safetensors"
META = "meta.json"
_FORMAT = "pytei.checkpoint/1"
#: Key of the quantization dtype in a quantized checkpoint's safetensors header.
_QUANT_KEY = "pytei.quantization"

#: Keys every checkpoint's metadata has, by section (checked at load, so a missing one names itself).
_REQUIRED: dict[str, tuple[str, ...]] = {
    "model": ("name", "config"),
    "data": ("name", "data_dir", "layout", "options", "split_seed", "fingerprint"),
    "weights": ("file", "sha256"),
}


def weights_sha256(path: str | Path) -> str:
    """sha256 hex of a weights file (what the metadata records and loading verifies)."""
    return file_sha256(path)


@dataclass
class Checkpoint:
    """A rebuilt model, its metadata and (when requested) its data set with the same split."""

    model: nn.Module
    meta: dict
    data: CTRDataset | None

    @property
    def test(self):
        if self.data is None:
            raise ValueError("this checkpoint was loaded without its data (with_data=False)")
        return self.data.test


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    data: CTRDataset,
    *,
    data_dir: str | Path | None = None,
    data_options: dict | None = None,
    scores: dict | None = None,
    origin: dict | None = None,
) -> Path:
    """Write ``model`` and the metadata that rebuilds it and its test split to ``directory``.

    A model quantized by ``pytei.torchrec.quantize`` is stored as its dense tensors and table bytes,
    with its dtype and the torchrec / FBGEMM versions; ``origin`` (e.g. the float checkpoint it was
    made from) is recorded as it is.
    """
    from safetensors.torch import save_file, save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    quantized = _quantization(model)
    model_meta: dict = {"name": model.name, "config": model.config}
    versions = {"pytei": version("pytei"), "torch": torch.__version__, "python": platform.python_version()}
    if quantized is not None:
        model_meta["quantization"] = {"dtype": quantized}
        versions.update({dist: version(dist) for dist in ("torchrec", "fbgemm-gpu-cpu")})
    meta = {
        "format": _FORMAT,
        "model": model_meta,
        "data": {
            "name": data.name,
            "data_dir": str(Path(data_dir).resolve()) if data_dir is not None else None,
            "layout": data.layout,
            "options": data_options or {},
            "split_seed": data.split_seed,
            "fingerprint": data.fingerprint,
            "field_dims": list(data.field_dims),
            "dense_dim": data.dense_dim,
            "sizes": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test)},
        },
        "scores": scores or {},
        "versions": versions,
    }
    if origin is not None:
        meta["origin"] = origin
    tmp_weights, tmp_meta = directory / (WEIGHTS + ".tmp"), directory / (META + ".tmp")
    try:
        if quantized is not None:
            from .torchrec.quantize import quantized_state

            # The dtype also goes into the weights' own header, which their sha256 covers.
            save_file(quantized_state(model), str(tmp_weights), metadata={_QUANT_KEY: quantized})
        else:
            save_model(model.cpu(), str(tmp_weights))
        meta["weights"] = {"file": WEIGHTS, "sha256": weights_sha256(tmp_weights)}
        with open(tmp_meta, "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        (directory / META).unlink(missing_ok=True)  # never a new meta over old weights or the reverse
        tmp_weights.replace(directory / WEIGHTS)
        tmp_meta.replace(directory / META)
    except BaseException:
        tmp_weights.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
        raise
    return directory


def _quantization(model: nn.Module) -> str | None:
    """The quantization dtype of a model made by ``pytei.torchrec.quantize`` (None otherwise)."""
    from .torchrec.quantize import quantization_of  # imports no torchrec

    return quantization_of(model)


def _quantize(model: nn.Module, meta: dict, path: Path) -> nn.Module:
    """The float ``model`` quantized as the metadata at ``path`` records."""
    from .torchrec.quantize import quantize

    spec = meta["model"]["quantization"]
    dtype = spec.get("dtype") if isinstance(spec, dict) else None
    if not isinstance(dtype, str):
        raise CheckpointError(f"{path}: 'model.quantization' must be an object with a 'dtype', got {spec!r}")
    try:
        return quantize(model, dtype, inplace=True)
    except ArgumentError as err:
        raise CheckpointError(f"{path}: cannot quantize the model as recorded: {err}") from err


def _check_quantized(weights: Path, dtype: str) -> None:
    """Refuse weights whose own header names another quantization dtype than the metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = (f.metadata() or {}).get(_QUANT_KEY)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"corrupt checkpoint weights {weights}: {err}") from err
    if stored != dtype:
        raise CheckpointError(
            f"{weights.parent / META} records quantization {dtype!r}, but the tables in {weights} are "
            f"{stored!r} (was the metadata edited?)"
        )


def _load_quantized(model: nn.Module, weights: Path) -> None:
    from safetensors.torch import load_file

    from .torchrec.quantize import load_quantized_state

    load_quantized_state(model, load_file(str(weights)))


def _read_meta(directory: Path) -> dict:
    path = directory / META
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a pytei checkpoint: {META} is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"corrupt checkpoint metadata {path}: {err}") from err
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != _FORMAT:
        raise CheckpointError(f"{path}: not a {_FORMAT} file (format={found!r})")
    for section, keys in _REQUIRED.items():
        if not isinstance(meta.get(section), dict):
            hint = (
                " (saved before pytei recorded its weights' sha256: retrain it)"
                if section == "weights"
                else ""
            )
            raise CheckpointError(f"{path}: the key {section!r} is missing or not an object{hint}")
        missing = [key for key in keys if key not in meta[section]]
        if missing:
            raise CheckpointError(
                f"{path}: {section!r} lacks the key{'s' if len(missing) > 1 else ''} "
                f"{', '.join(repr(k) for k in missing)}"
            )
    return meta


def load_checkpoint(
    directory: str | Path, *, data_dir: str | Path | None = None, with_data: bool = True, device: str = "cpu"
) -> Checkpoint:
    """Rebuild the model from ``directory`` and, unless ``with_data=False``, its data and split.

    ``data_dir`` overrides the recorded data location (e.g. on another machine); the data's
    fingerprint must match the one recorded at training time.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    meta = _read_meta(directory)
    try:
        model = models.create(meta["model"]["name"], **meta["model"]["config"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{directory / META}: cannot rebuild the model: {err}") from err
    quantized = None
    if meta["model"].get("quantization") is not None:
        # TorchRec builds the TBEs where the float tables are (FBGEMM's tables are no buffers that
        # ``.to`` would move), so the float model goes to ``device`` first.
        model = _quantize(model.to(device), meta, directory / META)
        quantized = _quantization(model)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} is not a pytei checkpoint: {WEIGHTS} is missing")
    found = weights_sha256(weights)
    if found != meta["weights"]["sha256"]:
        raise CheckpointError(
            f"corrupt checkpoint weights {weights}: sha256 {found[:16]}... differs from the "
            f"{str(meta['weights']['sha256'])[:16]}... recorded in {META} (the file changed after saving)"
        )
    if quantized is not None:
        _check_quantized(weights, quantized)
    try:
        if quantized is not None:
            _load_quantized(model, weights)
        else:
            load_model(model, str(weights), strict=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as err:
        raise CheckpointError(f"corrupt checkpoint weights {weights}: {err}") from err
    model.to(device).eval()
    data = None
    if with_data:
        d = meta["data"]
        where = data_dir if data_dir is not None else d["data_dir"]
        data = load_data(d["name"], where, seed=d["split_seed"], layout=d["layout"], **d["options"])
        if data.fingerprint != d["fingerprint"]:
            raise CheckpointError(
                f"the data set {d['name']} at {where} differs from the one this checkpoint was trained on "
                f"(fingerprint {data.fingerprint[:12]} != {d['fingerprint'][:12]})"
            )
    return Checkpoint(model, meta, data)
