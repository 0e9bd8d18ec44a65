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

from .bits import layout, supported_dtypes
from .errors import ErrorModel, Faults, Words
from .exceptions import PyteiError

__all__ = ["FaultMap", "FaultMapError"]


class FaultMapError(PyteiError, ValueError):
    """A fault-map file that is not one, or whose header or tensors are inconsistent; names the file."""


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
        """Read a map written by :meth:`save`, checking everything (a :class:`FaultMapError` naming the
        file and the bad field otherwise): header keys and types, dtype names, sizes, and per tensor an
        int64 ``index`` strictly ascending in ``[0, numel)`` with a ``mask`` of the same length whose
        entries are non-zero and fit the dtype's word width."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no fault map at {path}")
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise FaultMapError(f"{path} is not a pytei fault map: {err}") from None
        if "pytei" not in metadata:
            raise FaultMapError(f"{path} is not a pytei fault map: no 'pytei' header in its metadata")
        try:
            header = json.loads(metadata["pytei"])
        except json.JSONDecodeError as err:
            raise FaultMapError(
                f"{path} is not a pytei fault map: its 'pytei' header is not JSON ({err})"
            ) from None
        dtypes, numels, meta = _parse_header(header, path)
        return cls(_parse_faults(tensors, dtypes, numels, path), dtypes, numels, meta)


def _parse_header(
    header: object, path: Path
) -> tuple[dict[str, torch.dtype], dict[str, int], dict[str, object]]:
    """dtypes, numels and meta of a fault-map header, every field checked."""
    if not isinstance(header, dict):
        raise FaultMapError(
            f"{path}: the fault-map header must be a JSON object, got {type(header).__name__}"
        )
    if header.get("format") != _FORMAT:
        raise FaultMapError(f"{path}: unknown fault-map format {header.get('format')!r}, expected {_FORMAT}")
    for key in ("dtypes", "numels"):
        if key not in header:
            raise FaultMapError(f"{path}: the fault-map header has no {key!r} (it has {sorted(header)})")
        if not isinstance(header[key], dict):
            raise FaultMapError(
                f"{path}: header {key!r} must be an object of tensor names, got {header[key]!r}"
            )
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise FaultMapError(f"{path}: header 'meta' must be a JSON object, got {meta!r}")
    known = {str(d).removeprefix("torch."): d for d in supported_dtypes()}
    dtypes: dict[str, torch.dtype] = {}
    for name, d in header["dtypes"].items():
        if d not in known:
            raise FaultMapError(
                f"{path}: dtypes[{name!r}] = {d!r} is not supported; allowed: {sorted(known)}"
            )
        dtypes[name] = known[d]
    numels: dict[str, int] = {}
    for name, n in header["numels"].items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise FaultMapError(f"{path}: numels[{name!r}] = {n!r}; a tensor size is an integer >= 0")
        numels[name] = n
    for name in sorted(set(dtypes) ^ set(numels)):
        where, other = ("dtypes", "numels") if name not in dtypes else ("numels", "dtypes")
        raise FaultMapError(f"{path}: header {where} has no entry for {name!r}, which {other} lists")
    return dtypes, numels, dict(meta)


def _parse_faults(
    tensors: Mapping[str, torch.Tensor],
    dtypes: Mapping[str, torch.dtype],
    numels: Mapping[str, int],
    path: Path,
) -> dict[str, Faults]:
    """Per tensor the (index, mask) pair of a fault-map file, every entry checked against the header."""
    names: set[str] = set()
    for key in tensors:
        name, _, part = key.rpartition("/")
        if part not in ("index", "mask") or name not in numels:
            raise FaultMapError(
                f"{path}: stored tensor {key!r} names {name or key!r}, which the header does not list "
                f"(expected '<name>/index' and '<name>/mask' for names in {sorted(numels)[:8]})"
            )
        names.add(name)
    faults: dict[str, Faults] = {}
    for name in sorted(names):
        parts = {}
        for part in ("index", "mask"):
            key = f"{name}/{part}"
            if key not in tensors:
                raise FaultMapError(
                    f"{path}: {key} is missing ({name} has only the other half of its faults)"
                )
            t = tensors[key]
            if t.dtype != torch.int64 or t.dim() != 1:
                raise FaultMapError(
                    f"{path}: {key} has dtype {str(t.dtype).removeprefix('torch.')} and {t.dim()} dims, "
                    "expected a 1-D int64 array"
                )
            parts[part] = t
        index, mask = parts["index"], parts["mask"]
        if len(mask) != len(index):
            raise FaultMapError(
                f"{path}: {name}/mask has {len(mask)} entries but {name}/index has {len(index)}; "
                "one mask per index"
            )
        _check_index(index, numels[name], f"{path}: {name}/index")
        _check_mask(mask, dtypes[name], f"{path}: {name}/mask")
        if len(index):
            faults[name] = Faults(index, mask)
    return faults


def _check_index(index: torch.Tensor, numel: int, where: str) -> None:
    """Flat indices must lie in ``[0, numel)``, strictly ascending (sorted and unique)."""
    bad = (index < 0) | (index >= numel)
    if bool(bad.any()):
        value = int(index[bad][0])
        raise FaultMapError(f"{where} holds {value}, outside [0, {numel}) (the tensor's numel)")
    step = index[1:] - index[:-1]
    if bool((step == 0).any()):
        raise FaultMapError(
            f"{where} holds the duplicate index {int(index[1:][step == 0][0])}; each index once"
        )
    if bool((step < 0).any()):
        at = int(torch.nonzero(step < 0)[0])
        raise FaultMapError(
            f"{where} is not in ascending order "
            f"(position {at + 1}: {int(index[at])} then {int(index[at + 1])})"
        )


def _check_mask(mask: torch.Tensor, dtype: torch.dtype, where: str) -> None:
    """Masks must be non-zero and hold only bits of the dtype's word (sign-extended to int64)."""
    zero = mask == 0
    if bool(zero.any()):
        at = int(torch.nonzero(zero)[0])
        raise FaultMapError(f"{where} holds 0 at position {at}; a fault changes at least one bit")
    width = layout(dtype).width
    if width < 64:
        lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
        wide = (mask < lo) | (mask > hi)
        if bool(wide.any()):
            raise FaultMapError(
                f"{where} holds {int(mask[wide][0])}, wider than {str(dtype).removeprefix('torch.')}'s "
                f"{width}-bit words (allowed: sign-extended values in [{lo}, {hi}])"
            )
