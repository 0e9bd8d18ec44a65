"""Child-process helpers shared by the campaign pool and the distributed workers: die with the parent,
and a free loopback port."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
import time
from contextlib import suppress

__all__ = ["die_with_parent", "free_port"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """End this process when ``parent`` ends, ``kill -9`` included: ``PR_SET_PDEATHSIG`` on Linux, and
    everywhere a daemon thread that polls the parent pid (a process is re-parented when its parent dies)."""
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):  # without it, the thread below still works
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="pytei-parent-watch", daemon=True).start()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it; never a fixed one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
