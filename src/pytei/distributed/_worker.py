"""The worker process of one rank: join the process group on loopback, shard, then serve commands.

Commands come over a pipe from the parent (``pytei.distributed.ShardedGroup``) as ``(name, kwargs)``,
each a method of ``RankState``; the answer is ``("ok", result)`` or ``("error", traceback)``. A rank
ignores Ctrl-C (the parent's to handle) and dies with its parent, ``kill -9`` included: it is forked by
the parent's rank server (``multiprocessing``'s forkserver), which ends when the parent does.
"""

from __future__ import annotations

import os
import signal
import traceback
from datetime import timedelta
from typing import Any

__all__ = ["main"]


def main(rank: int, world: int, port: int, conn: Any, cfg: dict[str, Any], parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from .._process import die_with_parent

    die_with_parent(os.getppid())  # the rank server, which ends with ``parent``
    try:
        os.kill(parent, 0)
    except ProcessLookupError:  # the parent died before the rank started
        os._exit(1)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(cfg.get("threads", 1)))
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=float(cfg["timeout"]))
        )
        from ._rank import RankState

        state = RankState(rank, world, cfg)
        conn.send(("ok", state.placement()))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    try:
        while True:
            name, kwargs = conn.recv()
            if name == "stop":
                break
            try:
                conn.send(("ok", getattr(state, name)(**kwargs)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    except EOFError:  # the parent closed its end: nothing more to do
        pass
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
