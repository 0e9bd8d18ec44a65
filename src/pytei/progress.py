"""One progress display for all long work: a rich bar on a terminal, plain lines in a file or pipe.

A rich bar redraws in place, which a log file or a pipe cannot show: rich then prints nothing
until the work ends (up to half an hour of silence for a campaign). So when stdout is not a
terminal, :func:`progress_bar` gives a :class:`LineProgress` instead, which writes one plain line
per task (description, done/total, percentage, rate, elapsed time, ETA) at most every
``interval`` seconds (default 10 s, or ``PYTEI_PROGRESS_INTERVAL``) and once more when the task
ends. Both are rich ``Progress`` objects, so callers use ``add_task``/``advance``/``update`` alike.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from rich import get_console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .exceptions import PyteiError

__all__ = ["DEFAULT_INTERVAL", "INTERVAL_ENV", "LineProgress", "ProgressSettingError", "progress_bar"]

#: Seconds between two progress lines of a task when output is not a terminal.
DEFAULT_INTERVAL = 10.0
#: Environment variable that overrides :data:`DEFAULT_INTERVAL` (seconds, > 0).
INTERVAL_ENV = "PYTEI_PROGRESS_INTERVAL"


class ProgressSettingError(PyteiError, ValueError):
    """A progress setting (``PYTEI_PROGRESS_INTERVAL`` or ``interval=``) that is not a positive number."""


def _interval(interval: float | None) -> float:
    """``interval``, else ``$PYTEI_PROGRESS_INTERVAL``, else the default; checked to be > 0."""
    source = "interval"
    value: object = interval
    if interval is None:
        text = os.environ.get(INTERVAL_ENV)
        if text is None or not text.strip():
            return DEFAULT_INTERVAL
        source = INTERVAL_ENV
        try:
            value = float(text)
        except ValueError:
            raise ProgressSettingError(
                f"{INTERVAL_ENV} must be a number of seconds > 0, got {text!r}"
            ) from None
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ProgressSettingError(f"{source} must be a number of seconds > 0, got {value!r}")
    return float(value)


def _clock(seconds: float | None) -> str:
    """``h:mm:ss`` (``-:--:--`` when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class LineProgress(Progress):
    """A rich ``Progress`` that draws nothing and instead writes plain progress lines to ``file``.

    A task's line is written when ``interval`` seconds have passed since its last one (checked on
    every ``advance``/``update``), and a final line when it ends: at the next ``add_task`` once it
    is complete (so a description set after the last step is included) or when the progress stops.
    """

    def __init__(
        self,
        *,
        interval: float = DEFAULT_INTERVAL,
        file: TextIO | None = None,
        get_time: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(disable=True, get_time=get_time)
        self.interval = _interval(interval)
        self._file = file
        self._last: dict[TaskID, float] = {}  # when the task's last line was written
        self._start: dict[TaskID, tuple[float, float]] = {}  # (time, completed) when it began
        self._ended: set[TaskID] = set()  # tasks whose final line is written

    def add_task(
        self,
        description: str,
        start: bool = True,
        total: float | None = 100.0,
        completed: int = 0,
        visible: bool = True,
        **fields: Any,
    ) -> TaskID:
        self._end_finished()
        task_id = super().add_task(description, start, total, completed, visible, **fields)
        now = self.get_time()
        self._last[task_id] = now
        self._start[task_id] = (now, float(completed))
        return task_id

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._tick(task_id)

    def update(
        self,
        task_id: TaskID,
        *,
        total: float | None = None,
        completed: float | None = None,
        advance: float | None = None,
        description: str | None = None,
        visible: bool | None = None,
        refresh: bool = False,
        **fields: Any,
    ) -> None:
        super().update(
            task_id,
            total=total,
            completed=completed,
            advance=advance,
            description=description,
            visible=visible,
            refresh=refresh,
            **fields,
        )
        self._tick(task_id)

    def stop(self) -> None:
        super().stop()
        for task_id in list(self._start):
            if task_id not in self._ended:
                self._write(task_id)
                self._ended.add(task_id)

    def line(self, task_id: TaskID) -> str:
        """The progress line of ``task_id`` now."""
        task = self._tasks[task_id]
        began, first = self._start[task_id]
        elapsed = self.get_time() - began
        done = task.completed
        rate = (done - first) / elapsed if elapsed > 0 else None
        parts = [f"{task.description}:"]
        if task.total:
            parts.append(f"{done:.0f}/{task.total:.0f} ({100 * done / task.total:.1f}%),")
            remaining = max(task.total - done, 0)
            eta = 0.0 if remaining == 0 else remaining / rate if rate else None
        else:
            parts.append(f"{done:.0f} done,")
            eta = None
        parts.append(f"{rate:.3g}/s," if rate is not None else "-/s,")
        parts.append(f"elapsed {_clock(elapsed)},")
        parts.append(f"ETA {_clock(eta)}")
        return " ".join(parts)

    def _tick(self, task_id: TaskID) -> None:
        if task_id in self._ended or self._tasks[task_id].finished:  # its final line comes later
            return
        now = self.get_time()
        if now - self._last[task_id] >= self.interval:
            self._write(task_id)

    def _end_finished(self) -> None:
        for task_id, task in list(self._tasks.items()):
            if task.finished and task_id not in self._ended:
                self._write(task_id)
                self._ended.add(task_id)

    def _write(self, task_id: TaskID) -> None:
        out = self._file or get_console().file or sys.stdout
        out.write(self.line(task_id) + "\n")
        out.flush()
        self._last[task_id] = self.get_time()


@contextmanager
def progress_bar(
    *,
    enabled: bool = True,
    transient: bool = False,
    plain: bool | None = None,
    interval: float | None = None,
    file: TextIO | None = None,
    get_time: Callable[[], float] | None = None,
) -> Iterator[Progress]:
    """A progress display; silent when ``enabled`` is false.

    On a terminal (or when ``plain=False``): a rich bar with count, percentage, elapsed time and
    rate-derived ETA. Otherwise (``plain=None`` and stdout is a file or pipe, or ``plain=True``):
    a :class:`LineProgress` writing a line at most every ``interval`` seconds (default:
    ``$PYTEI_PROGRESS_INTERVAL`` or 10) to ``file`` (default: stdout). ``get_time`` replaces the
    clock (tests).
    """
    if plain is None:
        if file is not None:
            plain = not file.isatty()
        else:
            console = get_console()  # honours FORCE_COLOR / TTY_COMPATIBLE like the bar itself
            plain = not (console.is_terminal or console.is_jupyter)
    bar: Progress
    if enabled and plain:
        bar = LineProgress(interval=_interval(interval), file=file, get_time=get_time)
    else:
        bar = Progress(
            TextColumn("{task.description}", markup=False),  # verbatim: a "[/x]" in a name stays
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not enabled,
            transient=transient,
            get_time=get_time,
        )
    with bar:
        yield bar
