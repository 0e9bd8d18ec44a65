"""The parent side: a group of rank processes holding one sharded model, and the trials run on it."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._process import free_port
from ..errors import ErrorModel
from ..exceptions import ArgumentError, PyteiError
from ._plan import check_strategy
from ._rank import Drawn
from .faults import HostFault, HostLoss, HostSDC, HostSlow, HostStale
from .parity import sum_parity, sum_rebuild, xor_parity, xor_rebuild

__all__ = ["DistributedError", "Evaluation", "ShardedGroup"]

#: Modules the rank server imports before it forks ranks (what every rank imports anyway).
PRELOAD = (
    "torch",
    "torchrec.distributed.model_parallel",
    "torchrec.distributed.embeddingbag",
    "torchrec.distributed.planner",
    "pytei.checkpoint",
    "pytei.distributed._rank",
)


class DistributedError(PyteiError, RuntimeError):
    """A rank died or failed during a command; the group is closed (a new one starts afresh)."""


def _remote(what: str, detail: str) -> DistributedError:
    """The error of a rank whose command raised: ``what`` and the rank's exception (the last line of its
    traceback), the whole traceback attached as a note (shown with the local one)."""
    lines = [line for line in str(detail).strip().splitlines() if line.strip()]
    err = DistributedError(f"{what}: {lines[-1].strip() if lines else 'no detail'}")
    if hasattr(err, "add_note"):  # Python >= 3.11
        err.add_note(f"the rank's traceback:\n{detail}")
    return err


@dataclass
class Evaluation:
    """Logits of the scored test rows (in row order) under one trial, and what it cost."""

    logits: torch.Tensor
    labels: torch.Tensor
    faults: int = 0
    """Distinct faults in effect: drawn for the trial and held by a rank that applies them."""
    applied: int = 0
    """Faults written, summed over ranks (a replicated tensor's fault counts once per replica)."""
    seconds: float = 0.0
    recovery: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """AUC on the raw logits (float64), and the share of NaN/Inf outputs."""
        from ..metrics import auc, invalid_mask

        out = dict(auc(self.logits, self.labels))
        out["invalid_share"] = float(invalid_mask(self.logits).double().mean())
        return out


class ShardedGroup:
    """``world_size`` processes on this machine (gloo over loopback, a free port) serving the TorchRec
    model of ``checkpoint`` sharded by ``strategy``; each scores its share of the first ``test_rows``
    test rows in batches of ``batch_size`` per rank. Use as a context manager: closing it stops every
    rank (ranks also die with this process, ``kill -9`` included).

    In a process started by ``torchrun`` as rank 0 of a launch (``pytei.distributed.launch``), the
    ranks are the launch's processes instead, here or on other machines: ``world_size`` must be the
    launch's."""

    def __init__(
        self,
        checkpoint: str | Path,
        strategy: str = "table_wise",
        world_size: int = 2,
        *,
        batch_size: int = 256,
        test_rows: int | None = None,
        timeout: float = 120.0,
        threads: int = 1,
    ) -> None:
        check_strategy(strategy)
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ArgumentError(f"world_size must be an int >= 1, got {world_size!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ArgumentError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.checkpoint, self.strategy, self.world_size = Path(checkpoint), strategy, world_size
        self.batch_size = batch_size
        self.cfg: dict[str, Any] = {
            "checkpoint": str(self.checkpoint),
            "strategy": strategy,
            "batch_size": batch_size,
            "test_rows": test_rows,
            "timeout": timeout,
            "threads": threads,
        }
        self.timeout = timeout
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._model: torch.nn.Module | None = None
        self._labels: torch.Tensor | None = None
        self.placement: list[dict[str, Any]] = []
        self._blocks: dict[str, list[torch.Tensor]] = {}
        self._session: Any = None  # the launch this process is rank 0 of (pytei.distributed.launch)
        self._running = False

    # --- life cycle -------------------------------------------------------------------------------

    def __enter__(self) -> ShardedGroup:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the ranks and wait until each holds its shards."""
        from ..checkpoint import load_checkpoint
        from ..torchrec import require
        from ._worker import main
        from .launch import active

        self._session = active()
        if self._session is not None and self._session.world != self.world_size:
            raise ArgumentError(
                f"this launch has {self._session.world} processes (torchrun --nnodes x --nproc-per-node), "
                f"so it serves sharded models of world size {self._session.world}, not {self.world_size}"
            )
        require("sharded inference (pytei.distributed)")
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        ckpt = load_checkpoint(self.checkpoint)
        assert ckpt.data is not None  # loaded with its data
        if not any(isinstance(m, EmbeddingBagCollection) for m in ckpt.model.modules()):
            raise ArgumentError(
                f"checkpoint {str(self.checkpoint)!r} holds {ckpt.meta['model']['name']!r}, which has no "
                "float TorchRec EmbeddingBagCollection to shard (train dlrm-torchrec or dcnv2; quantized "
                "tables are not sharded)"
            )
        self._model = ckpt.model.eval()
        rows = len(ckpt.data.test) if self.cfg["test_rows"] is None else int(self.cfg["test_rows"])
        self._labels = ckpt.data.test.labels[: min(rows, len(ckpt.data.test))]
        if self._session is not None:
            self._running = True
            self.placement = self._gather("start", [{"cfg": self.cfg}] * self.world_size)
            return
        # Ranks are forked from a server process that imported torch and TorchRec once (seconds per
        # rank otherwise); it ends with this process, and the ranks with it.
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(PRELOAD))
        port = free_port()
        for rank in range(self.world_size):
            parent_end, child_end = ctx.Pipe()
            args = (rank, self.world_size, port, child_end, self.cfg, os.getpid())
            proc = ctx.Process(target=main, args=args, name=f"pytei-rank-{rank}", daemon=True)
            proc.start()
            child_end.close()
            self._procs.append(proc)
            self._conns.append(parent_end)
        self.placement = self._gather("start")

    def close(self) -> None:
        """Stop every rank (those that do not stop within a few seconds are killed); under a launcher,
        every rank drops the model and waits for the next."""
        if self._session is not None:
            if self._running:
                self._running = False
                with contextlib.suppress(PyteiError):  # a broken launch: its command fails instead
                    self._session.command("stop", [{}] * self.world_size)
            return
        for conn in self._conns:
            with contextlib.suppress(OSError, EOFError):
                conn.send(("stop", {}))
        deadline = time.monotonic() + 10.0
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    @property
    def pids(self) -> list[int]:
        """Process ids of the ranks (for tests and for killing one)."""
        return [int(p.pid) for p in self._procs]

    # --- commands ---------------------------------------------------------------------------------

    def _gather(self, name: str, per_rank: list[dict[str, Any]] | None = None) -> list[Any]:
        """Send command ``name`` (with each rank's kwargs) and collect every rank's answer; a rank that
        dies or fails closes the group and raises ``DistributedError`` naming it."""
        if self._session is not None:
            return self._command(name, per_rank or [{}] * self.world_size)
        if not self._procs:
            raise DistributedError("the sharded group is not running (start it, or use it in a with block)")
        if name != "start":
            for rank, kwargs in enumerate(per_rank or [{}] * self.world_size):
                try:
                    self._conns[rank].send((name, kwargs))
                except OSError:  # a broken pipe: that rank is gone
                    self._fail(rank, name, None)
        answers: list[Any] = [None] * self.world_size
        pending = set(range(self.world_size))
        deadline = time.monotonic() + self.timeout + 60.0
        while pending:
            for rank in sorted(pending):
                conn, proc = self._conns[rank], self._procs[rank]
                if conn.poll(0.05):
                    try:
                        status, value = conn.recv()
                    except (EOFError, OSError):
                        status, value = "died", None
                    if status != "ok":
                        self._fail(rank, name, value)
                    answers[rank] = value
                    pending.discard(rank)
                elif not proc.is_alive():
                    self._fail(rank, name, None)
            if pending and time.monotonic() > deadline:
                self._fail(min(pending), name, f"no answer within {self.timeout + 60:.0f} s")
        return answers

    def _command(self, name: str, per_rank: list[dict[str, Any]]) -> list[Any]:
        """``_gather`` through the launch: a rank whose command raised fails it (the group goes on)."""
        if not self._running:
            raise DistributedError("the sharded group is not running (start it, or use it in a with block)")
        answers = self._session.command(name, per_rank)
        for rank, (status, value) in enumerate(answers):
            if status != "ok":
                if name == "start":
                    self._running = False
                where = f"of {self.world_size} ({self.strategy}, launched)"
                raise _remote(f"rank {rank} {where} failed during {name!r}", value)
        return [value for _, value in answers]

    def _fail(self, rank: int, name: str, detail: str | None) -> None:
        """Close the group and raise, blaming a rank that died if any did: the survivors' collectives
        then fail too ("connection reset by peer"), which is not their fault."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not any(p.exitcode for p in self._procs):
            time.sleep(0.05)
        dead = [(r, p.exitcode) for r, p in enumerate(self._procs) if p.exitcode]
        self.close()
        where = f"of {self.world_size} ({self.strategy})"
        if dead:
            ranks = ", ".join(f"rank {r} {where} died (exit code {code})" for r, code in dead)
            raise DistributedError(f"{ranks} during {name!r}; the trial failed")
        if detail is None:
            raise DistributedError(f"rank {rank} {where} stopped answering during {name!r}")
        raise _remote(f"rank {rank} {where} failed during {name!r}", detail)

    # --- trials -----------------------------------------------------------------------------------

    def draw(self, error: ErrorModel, seed: int, **select: Any) -> Drawn:
        """The faults of ``error`` at ``seed`` on the *unsharded* model (``pytei.inject``'s selection
        keywords; default every embedding table), by logical tensor name: global flat index, XOR mask
        and shape. Every strategy receives exactly these."""
        from ..injector import inject

        assert self._model is not None
        select = {"target": "embedding", **select}
        with inject(self._model, error, seed=seed, **select) as report:
            fmap = report.fault_map
        shapes = dict(self._model.state_dict())
        return {n: (f.index, f.mask, tuple(shapes[n].shape)) for n, f in fmap.faults.items() if len(f)}

    def evaluate(
        self,
        error: ErrorModel | None = None,
        *,
        seed: int = 0,
        fault: HostFault | None = None,
        **select: Any,
    ) -> Evaluation:
        """Score the test rows with ``error`` (drawn on the unsharded model at ``seed``; applied on every
        rank's pieces) or a host ``fault``; the model is as before when it returns."""
        if error is not None and fault is not None:
            raise ArgumentError("give an error model (global faults) or a host fault, not both")
        per_rank: list[dict[str, Any]] = [{} for _ in range(self.world_size)]
        recovery: dict[str, Any] = {}
        if error is not None:
            faults = self.draw(error, seed, **select)
            per_rank = [{"faults": faults} for _ in range(self.world_size)]
        elif fault is not None:
            fault.check_world(self.world_size)
            here = per_rank[fault.rank]
            if isinstance(fault, HostSDC):
                faults = self.draw(fault.error, seed, **select)
                per_rank = [{"faults": faults, "on_ranks": [fault.rank]} for _ in range(self.world_size)]
            elif isinstance(fault, HostLoss):
                served, recovery = self._lost(fault)
                for r, how in served.items():
                    per_rank[r]["overwrite"] = how
            elif isinstance(fault, HostStale):
                here["overwrite"] = {"stale": self._stale_tables(fault.checkpoint)}
            elif isinstance(fault, HostSlow):
                here["slow"] = (float(fault.delay_ms), float(fault.jitter_ms), seed)
            else:
                raise ArgumentError(f"unknown host fault {fault!r}")
        answers = self._gather("evaluate", per_rank)
        return self._assemble(answers, recovery)

    def _assemble(self, answers: list[dict[str, Any]], recovery: dict[str, Any]) -> Evaluation:
        """Each test row's logit from the first rank step that scored it (padding repeats rows)."""
        assert self._labels is not None
        n = self._labels.numel()
        logits = torch.full((n,), float("nan"), dtype=torch.float32)
        done = torch.zeros(n, dtype=torch.bool)
        batch = self.batch_size
        steps = len(self.placement[0]["rows"]) // batch
        for s in range(steps):
            for rank, answer in enumerate(answers):
                rows = self.placement[rank]["rows"][s * batch : (s + 1) * batch]
                values = answer["logits"][s * batch : (s + 1) * batch]
                fresh = ~done[rows]
                logits[rows[fresh]] = values[fresh]
                done[rows[fresh]] = True
        applied = sum(int(a["applied"]) for a in answers)
        distinct = max((int(a["distinct"]) for a in answers), default=0)
        seconds = max(float(a["seconds"]) for a in answers)
        return Evaluation(logits, self._labels, distinct, applied, seconds, recovery)

    def latency(
        self, *, batch: int = 128, requests: int = 50, fault: HostSlow | None = None, pooling: int = 1
    ) -> dict[str, float]:
        """P50 / P99 / mean (ms) of ``requests`` batched inference requests of ``batch`` rows per rank
        (a request is done when its slowest rank is) with ``pooling`` ids per bag (each row's own and
        random ones of its table: the requests' sparsity), with an optional slow host."""
        if isinstance(pooling, bool) or not isinstance(pooling, int) or pooling < 1:
            raise ArgumentError(f"pooling must be an int >= 1 (ids per bag), got {pooling!r}")
        per_rank: list[dict[str, Any]] = [
            {"requests": requests, "batch": batch, "pooling": pooling} for _ in range(self.world_size)
        ]
        if fault is not None:
            fault.check_world(self.world_size)
            per_rank[fault.rank]["slow"] = (float(fault.delay_ms), float(fault.jitter_ms), 0)
        times = torch.tensor(self._gather("latency", per_rank), dtype=torch.float64).amax(0) * 1e3
        return {
            "p50_ms": float(times.quantile(0.5)),
            "p99_ms": float(times.quantile(0.99)),
            "mean_ms": float(times.mean()),
        }

    def digests(self) -> list[str]:
        """Each rank's digest of what it holds (``RankState.digest``): equal before and after a trial."""
        return [str(d) for d in self._gather("digest")]

    def tables_on(self, rank: int) -> list[str]:
        """Logical names of the tables with a piece on ``rank``."""
        return sorted(self.placement[rank]["pieces"])

    def all_tables(self) -> list[str]:
        return sorted({t for p in self.placement for t in p["pieces"]})

    # --- host faults -------------------------------------------------------------------------------

    def _stale_tables(self, checkpoint: str | Path) -> dict[str, torch.Tensor]:
        from ..checkpoint import load_checkpoint

        old = load_checkpoint(checkpoint, with_data=False).model.state_dict()
        tables = self.all_tables()
        missing = [t for t in tables if t not in old]
        assert self._model is not None
        now = self._model.state_dict()
        bad = [t for t in tables if t in old and old[t].shape != now[t].shape]
        if missing or bad:
            raise ArgumentError(
                f"HostStale checkpoint {str(checkpoint)!r} does not hold this model's tables "
                f"({', '.join((missing + bad)[:3])} missing or of another shape)"
            )
        return {t: old[t].detach() for t in tables}

    def blocks(self, kind: str) -> list[torch.Tensor]:
        """Every rank's shard block (``"bytes"`` raw uint8, or ``"values"`` float32), fetched once."""
        if kind not in self._blocks:
            command = "shard_bytes" if kind == "bytes" else "shard_values"
            self._blocks[kind] = self._gather(command)
        return self._blocks[kind]

    def _lost(self, fault: HostLoss) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
        """What each lost rank serves: its shards rebuilt by ``recover`` where the survivors hold what that
        needs, else ``fill``; and what the recovery cost."""
        lost = fault.lost(self.world_size)
        if fault.recover is None:
            return {r: {"fill": fault.fill} for r in lost}, {}
        kind = "values" if fault.recover == "sum" else "bytes"
        data = self.blocks(kind)
        total = sum(b.numel() for b in data)
        served: dict[int, dict[str, Any]] = {}
        exact: list[bool] = []
        seconds = 0.0  # rebuilding only: parity is encoded while every host is healthy
        if fault.recover == "replica":  # copies of host r on hosts r+1 .. r+k-1
            stored = float(fault.replicas - 1)
            for r in lost:
                copies = [(r + j) % self.world_size for j in range(1, fault.replicas)]
                alive = [c for c in copies if c not in lost]
                served[r] = {"bytes": data[r]} if alive else {"fill": fault.fill}
                exact += [True] if alive else []
        else:
            g = fault.group or self.world_size
            groups = [list(range(k, min(k + g, self.world_size))) for k in range(0, self.world_size, g)]
            stored = sum(max(data[i].numel() for i in m) for m in groups) / total if total else 0.0
            encode, rebuild = (xor_parity, xor_rebuild) if kind == "bytes" else (sum_parity, sum_rebuild)
            for r in lost:
                members = next(m for m in groups if r in m)
                if any(i in lost for i in members if i != r):  # one parity block rebuilds one host
                    served[r] = {"fill": fault.fill}
                    continue
                parity = encode([data[i] for i in members])  # kept outside the group, built while healthy
                t0 = time.perf_counter()
                rebuilt = rebuild(parity, [data[i] for i in members if i != r], data[r].numel())
                seconds += time.perf_counter() - t0
                served[r] = {kind: rebuilt}
                check = rebuilt.view(torch.uint8) if kind == "bytes" else rebuilt
                exact.append(bool(torch.equal(check, data[r])))
        info: dict[str, Any] = {
            "method": fault.recovery,
            "storage_overhead": stored,
            "rebuild_s": seconds,
            "exact": all(exact) if exact else None,  # None: no host could be rebuilt
            "recovered": len(exact) / len(lost),
        }
        if kind == "values":
            errors = [
                float((served[r]["values"] - data[r]).abs().max())
                for r in lost
                if "values" in served[r] and data[r].numel()
            ]
            info["max_abs_error"] = max(errors, default=0.0)
        return served, info
