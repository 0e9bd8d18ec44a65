"""Which tensors of a model get errors: selection by component, kind and name.

A parameter's component comes from the nearest module on its path (its own module first) that
carries a ``pytei_component`` attribute; models declare their parts that way, and a user can tag
any module of any model the same way (``model.head.pytei_component = "mlp"``). Untagged
parameters are classified by module type (embeddings, attention, linear/conv layers) and,
failing that, by the one component their enclosing block holds (a BatchNorm inside an MLP is
part of the MLP).
"""

from __future__ import annotations

import fnmatch
import importlib
import io
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .bits import BitLayout, layout
from .exceptions import ArgumentError

__all__ = [
    "COMPONENTS",
    "FIELDS",
    "PARAM_KINDS",
    "Site",
    "Description",
    "components",
    "describe",
    "register_storage",
    "select",
]

#: Components a parameter can belong to.
COMPONENTS = ("embedding", "mlp", "attention", "interaction", "linear", "other")
#: Values of ``params``.
PARAM_KINDS = ("weight", "bias", "all")
#: Fields of an embedding table's rows (``fields=``): ``codes`` (the stored values: quantized codes, or the
#: floats of a float table), ``scale`` and ``bias`` (FBGEMM's per-row fp16 quantization parameters) and
#: ``padding`` (bytes up to the row alignment, never read; only when asked for).
FIELDS = ("codes", "scale", "bias", "padding")

_TYPE_COMPONENTS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Embedding, "embedding"),
    (nn.EmbeddingBag, "embedding"),
    (nn.MultiheadAttention, "attention"),
    (nn.Linear, "mlp"),
    (nn.Bilinear, "mlp"),
    (nn.modules.conv._ConvNd, "mlp"),
)


@dataclass(frozen=True)
class Site:
    """One selected tensor: its dotted name, the tensor itself, its component and kind; for a field of an
    embedding table's rows, the field (see ``FIELDS``) and the bit layout of its format when that is not
    the tensor dtype's own (packed int4 codes, FBGEMM fp8)."""

    name: str
    tensor: torch.Tensor
    component: str
    kind: str
    field: str | None = None
    format: BitLayout | None = None
    #: For a table's whole stored rows (field ``"rows"``): ``(field, lo, hi)`` byte range of each row field.
    row_fields: tuple[tuple[str, int, int], ...] = ()

    @property
    def layout(self) -> BitLayout:
        """How the site's words are read: its format, else its dtype's layout."""
        return self.format if self.format is not None else layout(self.tensor.dtype)


#: A storage provider: the sites of the tables a model holds outside ``named_parameters``/``named_buffers``
#: (FBGEMM's TBE rows, quantized torchrec collections) and the dotted paths of the modules whose own
#: registered tensors those sites replace (their aliases, skipped).
#: With ``raw`` a provider gives one site per table over its whole stored rows (field ``"rows"``): what a
#: memory-side protection such as ECC sees, its words spanning codes, scale, bias and padding.
StorageProvider = Callable[[nn.Module, bool], tuple[list[Site], list[str]]]
#: Providers, by the top-level package whose modules they read: one is consulted only once that package is
#: imported (a model cannot hold its modules otherwise), and its module is imported then.
#: (torchrec imports fbgemm_gpu, so one entry covers both.)
_PROVIDERS: dict[str, str | StorageProvider] = {"fbgemm_gpu": "pytei.torchrec._storage"}


def register_storage(package: str, provider: StorageProvider) -> None:
    """Register ``provider`` for models holding modules of ``package`` (consulted once it is imported)."""
    _PROVIDERS[package] = provider


def _provided(model: nn.Module, raw: bool = False) -> tuple[list[Site], list[str]]:
    """Sites of the registered providers whose packages are imported, and the module paths they cover."""
    sites: list[Site] = []
    covered: list[str] = []
    for package in list(_PROVIDERS):
        if package not in sys.modules:
            continue
        provider = _PROVIDERS[package]
        if isinstance(provider, str):
            if not provider:
                continue
            importlib.import_module(provider)  # registers itself, replacing the module name
            provider = _PROVIDERS[package]
            if isinstance(provider, str):
                raise RuntimeError(
                    f"{_PROVIDERS[package]!r} did not register a storage provider for {package}"
                )
        found, paths = provider(model, raw)
        sites += found
        covered += paths
    return sites, covered


def _covered(name: str, paths: Sequence[str]) -> bool:
    return any(p == "" or name.startswith(p + ".") for p in paths)


#: Registered names that mean a bias: ``bias``, DCN's ``b`` (pytorch-fm's cross layers), ``biases``.
_BIAS_NAMES = frozenset({"bias", "biases", "b"})


def _is_bias_name(name: str) -> bool:
    """``bias``-like: one of ``_BIAS_NAMES``, ``*_bias(es)`` (``in_proj_bias``) or ``bias_*`` (``bias_k``)."""
    return name in _BIAS_NAMES or name.endswith(("_bias", "_biases")) or name.startswith("bias_")


def _kind(model: nn.Module, name: str) -> str:
    """``"bias"`` for a tensor registered under a bias-like name, or held in a ParameterList or
    ParameterDict registered under one (DCN's ``cn.b.0``); ``"weight"`` for every other tensor."""
    owner_path, _, leaf = name.rpartition(".")
    if _is_bias_name(leaf):
        return "bias"
    owner = model.get_submodule(owner_path) if owner_path else model
    container = owner_path.rpartition(".")[2]
    is_entry = isinstance(owner, nn.ParameterList | nn.ParameterDict)
    return "bias" if is_entry and _is_bias_name(container) else "weight"


def _tagged(model: nn.Module, name: str) -> str | None:
    """The ``pytei_component`` of the nearest module on ``name``'s path, if any."""
    parts = name.split(".")[:-1]
    chain = [model]
    for part in parts:
        chain.append(getattr(chain[-1], part))
    for module in reversed(chain):
        tag = getattr(module, "pytei_component", None)
        if tag is not None:
            if tag not in COMPONENTS:
                raise ArgumentError(
                    f"module {type(module).__name__} declares pytei_component={tag!r}; allowed: {COMPONENTS}"
                )
            return tag
    owner = chain[-1]
    for cls, comp in _TYPE_COMPONENTS:
        if isinstance(owner, cls):
            return comp
    return None


def _named_tensors(
    model: nn.Module, buffers: bool, covered: Sequence[str] = ()
) -> list[tuple[str, torch.Tensor]]:
    named: list[tuple[str, torch.Tensor]] = list(model.named_parameters())
    if buffers:  # persistent buffers are state (e.g. int8 tables); derived ones (index offsets) are not
        state = set(model.state_dict(keep_vars=True))
        named += [(n, b) for n, b in model.named_buffers() if b is not None and n in state]
    return [(n, t) for n, t in named if not _covered(n, covered)]


def _plain_field(component: str) -> str | None:
    """The field of a tensor without a row format: the values (``codes``) of an embedding table."""
    return "codes" if component == "embedding" else None


def components(model: nn.Module, *, buffers: bool = False) -> dict[str, str]:
    """Component of every parameter (and buffer, if asked) of ``model``, and of every table site a storage
    provider finds, by dotted name."""
    provided, covered = _provided(model)
    return _components(model, _named_tensors(model, buffers, covered)) | {
        s.name: s.component for s in provided
    }


def _components(model: nn.Module, named: list[tuple[str, torch.Tensor]]) -> dict[str, str]:
    found = {n: _tagged(model, n) for n, _ in named}
    out: dict[str, str] = {}
    for name, comp in found.items():
        if comp is None:
            comp = "other"
            parts = name.split(".")[:-1]
            for depth in range(len(parts), 0, -1):
                prefix = ".".join(parts[:depth]) + "."
                inside = {c for n, c in found.items() if c is not None and n.startswith(prefix)}
                if len(inside) == 1:
                    comp = inside.pop()
                    break
                if inside:
                    break
        out[name] = comp
    return out


def _as_list(value: str | Iterable[str] | None, what: str) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    for item in items:
        if not isinstance(item, str) or not item:
            raise ArgumentError(f"{what} must be non-empty strings, got {item!r}")
    return items


def select(
    model: nn.Module,
    target: str | Sequence[str] = "all",
    params: str = "all",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    buffers: bool = False,
    fields: str | Sequence[str] | None = None,
    raw: bool = False,
) -> list[Site]:
    """The tensors of ``model`` that errors go into.

    ``target``: a component (see ``COMPONENTS``), a list of them, or ``"all"``. ``params``:
    ``"weight"``, ``"bias"`` or ``"all"``. ``include``/``exclude``: glob patterns over dotted names
    (``"top_mlp.*"``); each must match some tensor. ``buffers`` adds buffers (e.g. int8 tables).
    ``fields`` keeps only those fields of embedding tables' rows (see ``FIELDS``; a float table has
    ``codes`` only); ``None``: every tensor, table fields except ``padding``. ``raw`` gives each table
    a storage provider finds as one site over its stored rows (padding included), for ECC.
    """
    if raw and fields is not None:
        raise ArgumentError(
            f"fields={fields!r} cannot narrow what ECC protects: its 64-bit words hold a table row's codes, "
            "scale, bias and padding together, so faults go into the whole stored rows; drop fields"
        )
    provided, covered = _provided(model, raw)
    named = _named_tensors(model, buffers, covered)
    comps = _components(model, named) | {p.name: p.component for p in provided}
    targets = _as_list(target, "target")
    if not targets:
        raise ArgumentError("target must name at least one component")
    for t in targets:
        if t != "all" and t not in COMPONENTS:
            allowed = ", ".join(("all", *COMPONENTS))
            raise ArgumentError(f"unknown target component {t!r}; allowed: {allowed}")
        if t != "all" and t not in comps.values():
            present = sorted(set(comps.values()))
            raise ArgumentError(
                f"target {t!r} matches no parameter of {type(model).__name__}; its components are {present}"
            )
    if params not in PARAM_KINDS:
        raise ArgumentError(f"unknown params {params!r}; allowed: {', '.join(PARAM_KINDS)}")
    wanted = _as_list(fields, "fields") if fields is not None else None
    for f in wanted or ():
        if f not in FIELDS:
            raise ArgumentError(f"unknown field {f!r}; allowed: {', '.join(FIELDS)}")
    if wanted is not None and not wanted:
        raise ArgumentError(f"fields must name at least one of {', '.join(FIELDS)}")
    inc, exc = _as_list(include, "include patterns"), _as_list(exclude, "exclude patterns")
    for pattern in inc + exc:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in comps):
            sample = ", ".join(list(comps)[:8]) + (", ..." if len(comps) > 8 else "")
            name = type(model).__name__
            raise ArgumentError(f"pattern {pattern!r} matches no parameter of {name} ({sample})")

    candidates = [Site(n, t, comps[n], _kind(model, n), _plain_field(comps[n])) for n, t in named] + provided
    sites = []
    for site in candidates:
        if "all" not in targets and site.component not in targets:
            continue
        if params != "all" and site.kind != params:
            continue
        if wanted is None and site.field == "padding":
            continue
        if wanted is not None and site.field not in wanted:
            continue
        if inc and not any(fnmatch.fnmatchcase(site.name, p) for p in inc):
            continue
        if any(fnmatch.fnmatchcase(site.name, p) for p in exc):
            continue
        sites.append(site)
    if not sites:
        chosen = ""
        if wanted is not None:
            present = sorted({c.field for c in candidates if c.field is not None})
            chosen = f", fields={wanted} (its tables have fields {present})"
        raise ArgumentError(
            f"the selection target={targets}, params={params!r}, include={inc}, exclude={exc}{chosen} "
            f"matches no parameter of {type(model).__name__}"
        )
    for site in sites:
        if site.tensor.is_meta or site.tensor.layout != torch.strided:
            raise TypeError(f"{site.name}: only dense tensors with storage can take bit errors")
        try:
            site.layout  # noqa: B018 - raises for a dtype without a bit layout
        except TypeError as err:
            raise TypeError(f"{site.name}: {err}") from None
    return sites


@dataclass(frozen=True)
class _Row:
    name: str
    component: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    field: str = ""


class Description(list):
    """Rows of ``describe``; prints as a table."""

    def __rich__(self):
        from rich.table import Table

        table = Table(title=f"{len(self)} tensors, {sum(r.numel for r in self):,} values")
        for col in ("name", "component", "kind", "field", "dtype", "shape", "numel"):
            table.add_column(col, justify="right" if col == "numel" else "left")
        for r in self:
            shape = "x".join(map(str, r.shape))
            table.add_row(r.name, r.component, r.kind, r.field, r.dtype, shape, f"{r.numel:,}")
        return table

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=120, file=io.StringIO())
        with console.capture() as captured:
            console.print(self)
        return captured.get()

    def totals(self) -> dict[str, int]:
        """Number of values per component."""
        out: dict[str, int] = {}
        for r in self:
            out[r.component] = out.get(r.component, 0) + r.numel
        return out


def describe(model: nn.Module, *, buffers: bool = False) -> Description:
    """One row per parameter (name, component, kind, field, dtype, shape, numel), and one per field of
    each table a storage provider finds (dtype: its format, e.g. ``int4``, ``fp8_e4``)."""
    provided, covered = _provided(model)
    named = _named_tensors(model, buffers, covered)
    comps = _components(model, named)
    sites = [Site(n, t, comps[n], _kind(model, n), _plain_field(comps[n])) for n, t in named] + provided
    return Description(
        _Row(
            s.name,
            s.component,
            s.kind,
            s.format.format if s.format is not None else str(s.tensor.dtype).removeprefix("torch."),
            tuple(s.tensor.shape),
            s.tensor.numel(),
            s.field or "",
        )
        for s in sites
    )
