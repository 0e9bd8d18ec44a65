"""A sparse record of which bits of which tensors changed: saved, loaded and replayed exactly.

Stored as safetensors (no pickle): per tensor an ``index`` and a ``mask`` int64 array, plus JSON
metadata with each tensor's dtype and size, the error model and the seed. Replaying a map on the
same clean model reproduces the trial bit for bit, whatever error model first drew it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .bits import supported_dtypes
from .errors import ErrorModel, Faults, Words

__all__ = ["FaultMap"]

_FORMAT = "pytei.faultmap/1"


@dataclass(frozen=True, eq=False)
class FaultMap(ErrorModel):
    """Faults by tensor name, with each tensor's dtype and size; usable as an error model (replay)."""

    faults: Mapping[str, Faults]
    dtypes: Mapping[str, torch.dtype]
    numels: Mapping[str, int]
    meta: Mapping[str, object] = field(default_factory=dict)

    def draw(self, words: Sequence[Words], seed: int) -> list[Faults]:
        names = {w.name for w in words}
        missing = sorted(set(self.faults) - names)
        if missing:
            raise ValueError(f"fault map names tensors outside the selection: {missing[:5]}")
        out = []
        for w in words:
            f = self.faults.get(w.name)
            if f is None:
                out.append(Faults.none())
                continue
            if self.dtypes[w.name] != w.layout.dtype or self.numels[w.name] != w.numel:
                raise ValueError(
                    f"fault map entry {w.name} was recorded for {self.dtypes[w.name]} x "
                    f"{self.numels[w.name]}, the model has {w.layout.dtype} x {w.numel}"
                )
            out.append(f)
        return out

    def draw_one(self, w: Words, generator: torch.Generator) -> Faults:
        return self.draw([w], 0)[0]

    @property
    def spec(self) -> dict:
        return {"model": "FaultMap", "tensors": len(self.faults), **dict(self.meta)}

    def save(self, path: str | Path) -> None:
        """Write the map to ``path`` (safetensors)."""
        from safetensors.torch import save_file

        tensors = {}
        for name, f in self.faults.items():
            tensors[f"{name}/index"] = f.index.contiguous()
            tensors[f"{name}/mask"] = f.mask.contiguous()
        header = {
            "format": _FORMAT,
            "dtypes": {n: str(d).removeprefix("torch.") for n, d in self.dtypes.items()},
            "numels": dict(self.numels),
            "meta": dict(self.meta),
        }
        save_file(tensors, str(path), metadata={"pytei": json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path) -> FaultMap:
        """Read a map written by :meth:`save`; a clear error for anything else."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no fault map at {path}")
        try:
            with safe_open(str(path), framework="pt") as fh:
                header = json.loads((fh.metadata() or {})["pytei"])
            tensors = load_file(str(path))
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as err:
            raise ValueError(f"{path} is not a pytei fault map: {err}") from None
        if header.get("format") != _FORMAT:
            raise ValueError(f"{path}: unknown fault-map format {header.get('format')!r}, expected {_FORMAT}")
        known = {str(d).removeprefix("torch."): d for d in supported_dtypes()}
        bad = {n: d for n, d in header["dtypes"].items() if d not in known}
        if bad:
            raise ValueError(f"{path}: unsupported dtypes {bad}; allowed: {sorted(known)}")
        dtypes = {n: known[d] for n, d in header["dtypes"].items()}
        faults = {
            n: Faults(tensors[f"{n}/index"], tensors[f"{n}/mask"])
            for n in header["numels"]
            if f"{n}/index" in tensors
        }
        return cls(faults, dtypes, {n: int(v) for n, v in header["numels"].items()}, header.get("meta", {}))
