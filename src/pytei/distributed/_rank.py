"""One rank of a sharded model (runs in a worker process): its shards, its rows of the test set, faults.

Every rank loads the checkpoint, shards the model with TorchRec's ``DistributedModelParallel`` by the
strategy's plan, and copies each table's slice into its local shards (TorchRec's ``state_dict``
shards are views of the weights its kernels read, so writes there are what lookups see). Tensors
that are not sharded (dense layers, data-parallel tables) are replicated, whole on every rank.

A rank scores rows ``(s * world + rank) * batch + j`` (mod the row count) at step ``s``: every rank
runs the same number of steps, as the collectives of the sharded lookup need.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..bits import int_view, layout

__all__ = ["Drawn", "Piece", "RankState", "pooled"]

#: Faults by logical tensor name: global flat indices, XOR masks (int64) and the tensor's shape.
Drawn = dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]

_WRAPPERS = ("_dmp_wrapped_module.", "module.")


@dataclass
class Piece:
    """A rank's part of one logical tensor: rows from ``row``, columns from ``col``, and the live view."""

    row: int
    col: int
    view: torch.Tensor


def _logical(name: str) -> str:
    for prefix in _WRAPPERS:
        name = name.removeprefix(prefix)
    return name


def pooled(
    ids: torch.Tensor, field_dims: list[int], pooling: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-hot bags of ``pooling`` ids from one-hot ``ids [N, S]``: each row's own id and ``pooling - 1``
    ids drawn uniformly from its field's vocabulary (``ids [N, S, pooling]``, ``lengths [N, S]``), so
    timed requests read as many rows as a model with that pooling factor does."""
    n, s = ids.shape
    dims = torch.tensor(field_dims, dtype=torch.float64)
    u = torch.rand(n, s, pooling - 1, generator=generator, dtype=torch.float64)
    extra = (u * dims.view(1, s, 1)).to(ids.dtype)
    return torch.cat([ids.unsqueeze(2), extra], 2), torch.full((n, s), pooling, dtype=ids.dtype)


class RankState:
    """The sharded model on this rank and what a trial does to it."""

    def __init__(self, rank: int, world: int, cfg: dict[str, Any]) -> None:
        import torch.distributed as dist
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.types import ShardingEnv

        from ..checkpoint import load_checkpoint
        from ..torchrec._notices import quiet_notices
        from ._plan import sharding_plan

        quiet_notices()
        self.rank, self.world = rank, world
        try:  # every rank says whether it could load before any collective (a missing copy on one
            ckpt, problem = load_checkpoint(cfg["checkpoint"]), None  # machine would leave the rest waiting)
        except Exception as err:
            problem = f"{type(err).__name__}: {err}"
        problems: list[Any] = [None] * world
        dist.all_gather_object(problems, problem)
        failed = [(r, p) for r, p in enumerate(problems) if p]
        if failed:
            r, p = failed[0]
            raise RuntimeError(f"rank {r} cannot load the checkpoint {cfg['checkpoint']}: {p}")
        assert ckpt.data is not None  # loaded with its data
        # The clean tensors, kept while their slices are copied: sharding replaces the collections.
        full = {k: v.detach().clone() for k, v in ckpt.model.state_dict().items()}
        model = ckpt.model.eval()
        # The launch's (or the spawned group's) process group: a subgroup per model would read a torchrun
        # restart's stale rendezvous entries and never connect.
        group = dist.GroupMember.WORLD
        plan = sharding_plan(model, cfg["strategy"], world, "cpu", group)
        self.plan_text = str(plan)
        sharder = EmbeddingBagCollectionSharder()
        with warnings.catch_warnings():  # TorchRec 1.8 passes DDP an argument torch 2.13 deprecates
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
            self.model = DistributedModelParallel(
                model,
                env=ShardingEnv.from_process_group(group),
                device=torch.device("cpu"),
                plan=plan,
                sharders=[sharder],
                init_data_parallel=False,
            ).eval()
        self.pieces: dict[str, list[Piece]] = {}
        self.tables: set[str] = set()
        #: Rows of each table: a fill by the table's mean or default row needs them all on this host.
        self.table_rows = {name: int(t.shape[0]) for name, t in full.items() if t.dim() == 2}
        with torch.no_grad():
            for key, value in self.model.state_dict().items():
                name = _logical(key)
                src = full[name]
                if hasattr(value, "local_shards"):  # a sharded table: the shards this rank holds, if any
                    for shard in value.local_shards():
                        self.tables.add(name)
                        r0, c0 = shard.metadata.shard_offsets
                        rs, cs = shard.metadata.shard_sizes
                        shard.tensor.copy_(src[r0 : r0 + rs, c0 : c0 + cs])
                        self.pieces.setdefault(name, []).append(Piece(r0, c0, shard.tensor))
                else:
                    value.copy_(src)
                    self.pieces.setdefault(name, []).append(Piece(0, 0, value))
                    if "embedding_bags." in name:  # a data-parallel table: a whole replica here
                        self.tables.add(name)
        data = ckpt.data
        test = data.test
        n = len(test) if cfg["test_rows"] is None else min(int(cfg["test_rows"]), len(test))
        self.n_rows, self.batch = n, int(cfg["batch_size"])
        self.steps = max(1, math.ceil(n / (world * self.batch)))
        self.rows = [
            (torch.arange(self.batch) + (s * world + rank) * self.batch) % n for s in range(self.steps)
        ]
        self._data = data
        self.inputs = [self._inputs_for(rows) for rows in self.rows]
        self._undo: list[Any] = []
        self._slow: Any = None

    # --- what this rank holds ----------------------------------------------------------------------

    def placement(self) -> dict[str, Any]:
        """Tables (logical names) with a piece here, each piece's offsets and shape, and the row plan."""
        pieces = {
            name: [(p.row, p.col, *p.view.shape) for p in self.pieces[name]] for name in sorted(self.tables)
        }
        return {"rank": self.rank, "pieces": pieces, "rows": torch.cat(self.rows), "plan": self.plan_text}

    def _table_pieces(self) -> list[tuple[str, Piece]]:
        return [(name, p) for name in sorted(self.tables) for p in self.pieces[name]]

    def shard_bytes(self) -> torch.Tensor:
        """The raw bytes of this rank's table pieces, concatenated in a fixed order (for parity)."""
        parts = [p.view.contiguous().view(-1).view(torch.uint8) for _, p in self._table_pieces()]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)

    def digest(self) -> str:
        """SHA-256 over every tensor this rank holds (its pieces and replicated tensors): a restore that
        left anything changed shows as a new digest."""
        h = hashlib.sha256()
        for name in sorted(self.pieces):
            for p in self.pieces[name]:
                h.update(f"{name}\x1f{p.row}\x1f{p.col}\x1f".encode())
                h.update(p.view.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def shard_values(self) -> torch.Tensor:
        """The values of this rank's table pieces as float32, in ``shard_bytes`` order (sum parity)."""
        parts = [p.view.reshape(-1).to(torch.float32) for _, p in self._table_pieces()]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float32)

    # --- a trial ----------------------------------------------------------------------------------

    def evaluate(
        self,
        faults: Drawn | None = None,
        on_ranks: list[int] | None = None,
        overwrite: dict[str, Any] | None = None,
        slow: tuple[float, float, int] | None = None,
    ) -> dict[str, Any]:
        """Logits of this rank's rows with ``faults`` (name -> global flat index, XOR mask, shape; applied
        here when this rank is in ``on_ranks``, all ranks if None), this rank's table pieces overwritten
        as ``overwrite`` says, and ``slow`` (delay ms, jitter ms, seed) before each lookup; everything
        is undone before it returns, also on an error."""
        try:
            applied = distinct = 0
            if faults and (on_ranks is None or self.rank in on_ranks):
                applied = self._flip(faults, tables_only=on_ranks is not None)
                distinct = applied if on_ranks is not None else sum(len(f[0]) for f in faults.values())
            if overwrite is not None:
                self._overwrite(overwrite)
            self._set_slow(slow)
            t0 = time.perf_counter()
            with torch.no_grad():
                logits = [self.model(*inputs).detach().reshape(-1).clone() for inputs in self.inputs]
            seconds = time.perf_counter() - t0
        finally:
            self._restore()
        return {"logits": torch.cat(logits), "applied": applied, "distinct": distinct, "seconds": seconds}

    def latency(
        self, requests: int, batch: int, slow: tuple[float, float, int] | None = None, pooling: int = 1
    ) -> list[float]:
        """Seconds of each of ``requests`` forward passes of ``batch`` rows (this rank's first rows), with
        ``pooling`` ids per bag (``pooled``)."""
        rows = (torch.arange(batch) + self.rank * batch) % self.n_rows
        if pooling != 1:
            dense, ids, *rest = (t[rows] for t in self._data.test.inputs)
            if rest or ids.dim() != 2:
                raise ValueError(
                    "pooling applies to one-hot data (ids [N, S]); this data set has multi-hot bags"
                )
            gen = torch.Generator().manual_seed(self.rank)
            multi, lengths = pooled(ids, list(self._data.field_dims), pooling, gen)
            inputs = self._data.model_inputs((dense, multi, lengths))
        else:
            inputs = self.inputs[0] if batch == self.batch else self._inputs_for(rows)
        try:
            self._set_slow(slow)
            out = []
            with torch.no_grad():
                self.model(*inputs)  # warm-up
                for _ in range(requests):
                    t0 = time.perf_counter()
                    self.model(*inputs)
                    out.append(time.perf_counter() - t0)
        finally:
            self._restore()
        return out

    def _inputs_for(self, rows: torch.Tensor) -> tuple[Any, ...]:
        """The model inputs of test ``rows``."""
        return self._data.model_inputs(tuple(t[rows] for t in self._data.test.inputs))

    def write_bytes(self, data: torch.Tensor) -> None:
        """Write ``data`` (``shard_bytes`` layout) into this rank's table pieces (a rebuilt host)."""
        offset = 0
        with torch.no_grad():
            for _, p in self._table_pieces():
                n = p.view.numel() * p.view.element_size()
                chunk = data[offset : offset + n].view(p.view.dtype).view(p.view.shape)
                p.view.copy_(chunk)
                offset += n

    def write_values(self, data: torch.Tensor) -> None:
        """Write ``data`` (``shard_values`` layout) into this rank's table pieces, cast to their dtype."""
        offset = 0
        with torch.no_grad():
            for _, p in self._table_pieces():
                n = p.view.numel()
                p.view.copy_(data[offset : offset + n].view(p.view.shape))
                offset += n

    # --- faults, applied and undone --------------------------------------------------------------

    def _flip(self, faults: Drawn, tables_only: bool) -> int:
        """XOR the faults that fall in this rank's pieces; returns how many were applied here."""
        applied = 0
        with torch.no_grad():
            for name, (index, mask, shape) in faults.items():
                if name not in self.pieces or (tables_only and name not in self.tables):
                    continue
                if len(shape) == 2:  # a table: (row, column) of each fault
                    row, col = index // shape[1], index % shape[1]
                else:  # any other tensor is whole on every rank: one row of its flat values
                    row, col = torch.zeros_like(index), index
                for p in self.pieces[name]:
                    view = p.view if p.view.dim() == 2 else p.view.reshape(1, -1)
                    rs, cs = view.shape
                    sel = (row >= p.row) & (row < p.row + rs) & (col >= p.col) & (col < p.col + cs)
                    if not bool(sel.any()):
                        continue
                    r, c = row[sel] - p.row, col[sel] - p.col
                    words = int_view(view)
                    old = words[r, c].clone()
                    self._undo.append(("words", words, r, c, old))
                    words[r, c] = old ^ mask[sel].to(layout(view.dtype).view_dtype)
                    applied += int(sel.sum())
        return applied

    def _overwrite(self, how: dict[str, Any]) -> None:
        """Replace this rank's table pieces: ``fill`` (zeros, mean, default_row), ``stale`` (a state dict),
        or raw ``bytes`` / float ``values`` in ``shard_bytes`` order (a rebuilt host)."""
        with torch.no_grad():
            for _, p in self._table_pieces():
                self._undo.append(("copy", p.view, p.view.clone()))
            if "bytes" in how:
                self.write_bytes(how["bytes"])
                return
            if "values" in how:
                self.write_values(how["values"])
                return
            for name, p in self._table_pieces():
                rs, cs = p.view.shape
                if "stale" in how:
                    p.view.copy_(how["stale"][name][p.row : p.row + rs, p.col : p.col + cs])
                    continue
                if how["fill"] == "zeros":
                    p.view.zero_()
                    continue
                if p.row != 0 or rs != self.table_rows[name]:  # row-wise shards hold some rows only
                    raise ValueError(f"fill {how['fill']!r} needs every row of {name} on the host")
                if how["fill"] == "mean":  # the clean pieces hold whole columns: their column means
                    p.view.copy_(p.view.double().mean(0).to(p.view.dtype).expand(rs, cs))
                else:  # default_row: every id reads row 0
                    p.view.copy_(p.view[0].clone().expand(rs, cs))

    def _set_slow(self, slow: tuple[float, float, int] | None) -> None:
        if slow is None:
            return
        delay, jitter, seed = slow
        gen = torch.Generator().manual_seed(seed)

        def hook(module: Any, args: Any) -> None:
            extra = float(torch.empty(1).exponential_(1.0 / jitter, generator=gen)) if jitter > 0 else 0.0
            time.sleep((delay + extra) / 1e3)

        self._undo.append(("hook", self.model.register_forward_pre_hook(hook)))

    def _restore(self) -> None:
        with torch.no_grad():
            while self._undo:
                kind, *rest = self._undo.pop()
                if kind == "words":
                    words, r, c, old = rest
                    words[r, c] = old
                elif kind == "copy":
                    view, saved = rest
                    view.copy_(saved)
                else:
                    rest[0].remove()
