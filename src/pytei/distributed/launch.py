"""Ranks started by a launcher (``torchrun``): the same command on one machine or across several.

By default a ``ShardedGroup`` spawns its ranks on this machine. Started by ``torchrun`` (which sets
``torch.distributed``'s ``env://`` variables: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...), every
process runs the same pytei command instead::

    torchrun --standalone --nproc-per-node 4 -m pytei campaign run spec.toml --db results.db
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m pytei campaign run spec.toml --db results.db

Rank 0 runs the command (plans, stores, draws faults, scores) and is rank 0 of every sharded model;
every other rank serves its shards: it loads and shards each model when rank 0 starts one, runs
what rank 0 asks (the commands of ``RankState``) and leaves when rank 0 is done. Commands go by
``broadcast_object_list`` and answers come back by ``gather_object`` on the launcher's process
group (gloo), so a sharded model's world size must be the launch's. Checkpoint paths must name the
same files on every machine (a shared folder). A rank that dies breaks the process group: rank 0
stops with ``LaunchBroken`` (or torchrun, seeing the death first, stops it) and every process exits
non-zero, so ``torchrun --max-restarts N`` starts them again and the campaign resumes from its
database (each trial exactly once).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NoReturn

from ..exceptions import PyteiError

__all__ = ["LaunchBroken", "Session", "active", "launched", "run"]

#: Seconds a collective may wait (env override): a rank waits this long for rank 0's next command
#: (rank 0 may be running a model that is not sharded) and for a rank that hangs inside a lookup.
TIMEOUT_VARIABLE = "PYTEI_LAUNCH_TIMEOUT"
_TIMEOUT = 3600.0


class LaunchBroken(PyteiError, RuntimeError):
    """A rank of the launch is gone (its process group is broken): the command cannot go on."""


def launched() -> bool:
    """Whether this process was started by a launcher that set ``torch.distributed``'s env variables."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


class Session:
    """This process's place in the launch: ``rank`` of ``world``, and the sharded model it holds."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.state: Any = None  # RankState of the model being served

    def execute(self, name: str, kwargs: dict[str, Any]) -> tuple[str, Any]:
        """Run command ``name`` here: ``("ok", result)`` or ``("error", traceback)``."""
        try:
            if name in ("start", "stop"):
                self.state = None
            if name == "start":
                from ._rank import RankState

                self.state = RankState(self.rank, self.world, kwargs["cfg"])
                return "ok", self.state.placement()
            if name == "stop":
                return "ok", None
            if self.state is None:
                raise RuntimeError(f"no sharded model is loaded on rank {self.rank} for {name!r}")
            return "ok", getattr(self.state, name)(**kwargs)
        except Exception:
            return "error", traceback.format_exc()

    def command(self, name: str, per_rank: list[dict[str, Any]]) -> list[tuple[str, Any]]:
        """On rank 0: send command ``name`` (with each rank's kwargs) to every rank, run its own share,
        and gather every answer; a broken process group raises ``LaunchBroken``."""
        import torch.distributed as dist

        try:
            dist.broadcast_object_list([(name, per_rank)], src=0)
            mine = self.execute(name, per_rank[0])
            answers: list[Any] = [None] * self.world
            dist.gather_object(mine, answers, dst=0)
        except (RuntimeError, OSError) as err:  # gloo: a peer closed its connection or timed out
            raise LaunchBroken(
                f"a rank of this {self.world}-process launch is gone during {name!r} ({err}); torchrun "
                "--max-restarts N starts every process again and the campaign resumes"
            ) from err
        return [tuple(a) for a in answers]

    def serve(self) -> None:
        """On the other ranks: run rank 0's commands until it says ``exit``."""
        import torch.distributed as dist

        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            name, per_rank = box[0]
            if name == "exit":
                return
            dist.gather_object(self.execute(name, per_rank[self.rank]), None, dst=0)


_SESSION: Session | None = None


def active() -> Session | None:
    """The launch this process is rank 0 of, while its command runs (None: not launched)."""
    return _SESSION


def run(command: Callable[[], int]) -> NoReturn:
    """Run ``command`` (returning an exit code) as this rank of the launch: on rank 0 the command itself,
    on the others the serving loop; every rank joins the process group first, leaves it after, and
    exits with the code (``_leave``)."""
    global _SESSION
    import torch.distributed as dist

    timeout = float(os.environ.get(TIMEOUT_VARIABLE, _TIMEOUT))
    # The launcher's store outlives a restart (torchrun shares its rendezvous store with the workers),
    # so a restarted process would read the addresses of the processes it replaces: its keys go under
    # the restart's own prefix (pytorch/pytorch#135712).
    store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout)))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(  # gloo: ranks shard on CPU
        "gloo",
        store=dist.PrefixStore(f"pytei/attempt_{attempt}/", store),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout),
    )
    session = Session(dist.get_rank(), dist.get_world_size())
    code = 1
    if session.rank != 0:
        try:
            session.serve()
            code = 0
        except (RuntimeError, OSError) as err:  # rank 0 is gone: its own exit code says why
            print(f"error: rank {session.rank}: rank 0 of the launch is gone ({err})", file=sys.stderr)
        _leave(code)
    _SESSION = session
    try:
        code = command()
    finally:
        _SESSION = None
        with contextlib.suppress(RuntimeError, OSError):  # ranks already gone: nothing to tell
            dist.broadcast_object_list([("exit", [])], src=0)
    _leave(code)


def _leave(code: int) -> NoReturn:
    """Exit now with ``code``, output flushed, without finalizing the interpreter: gloo's worker threads
    drop their last broadcast's tensors (a Python decref) whenever they get to it, and one that does so
    while the interpreter finalizes is made to exit from inside a C++ destructor, which aborts the
    process ("terminate called without an active exception"; seen in 2 of 14 launched runs here, 0 of
    20 since). Rank 0 has sent ``exit`` and every rank only leaves: there is nothing left to tear down."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
