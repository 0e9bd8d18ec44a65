"""Executing a campaign: plan, skip what the store already has, run the rest, commit each trial.

Three executors give identical rows for the same spec (each trial is a pure function of its
content and seed): in-process (default), a local process pool (``workers=N``), and Ray actors
(``ray_address=...``). Each worker keeps one model loaded and runs that model's trials together.
A campaign interrupted by Ctrl-C, ``kill -9`` or a crash resumes from its database: trials are
committed one by one as they finish, so none is lost and none is recorded twice.

The plan is counted first (from the grid's sizes), reported, and refused above ``max_trials``
unless confirmed; trials are then made, claimed (see :mod:`pytei.campaign.store`: several runners
on one database share the work) and run as a stream, so a grid of any size takes constant memory.
Pool workers ignore SIGINT (the parent stops them) and die with their parent, ``kill -9`` included.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .. import metrics, stats
from .. import plugins as plugin_loader
from .._process import die_with_parent
from .._registry import Registry
from ..exceptions import ArgumentError, PyteiError
from ..progress import progress_bar
from . import sharded as _sharded  # noqa: F401 - registers the runner of sharded models
from .fingerprint import fingerprints
from .plan import Trial, count_trials, iter_plan
from .runner import TrialRunner, failed_row, make_runner, parameter_names
from .spec import Spec, parse_spec
from .store import DuplicateTrial, Store, StoreError, TrialRow

__all__ = [
    "MAX_TRIALS",
    "AllTrialsFailed",
    "CampaignResult",
    "TooManyTrials",
    "Executor",
    "InProcess",
    "ProcessPool",
    "RayExecutor",
    "chunk_by_model",
    "executors",
    "resume_campaign",
    "run_campaign",
]

_CHUNK = 16
#: A plan larger than this is refused unless confirmed (``confirm=True``, ``--yes``).
MAX_TRIALS = 1_000_000
#: Trials claimed from the store at a time (one transaction each; small, so runners share the work).
_CLAIM = _CHUNK


class TooManyTrials(PyteiError, ValueError):
    """A plan over the trial limit that was not confirmed."""


class AllTrialsFailed(PyteiError, RuntimeError):
    """Every trial a run ran failed (a model that does not load, a target matching nothing, ...)."""


class Executor(Protocol):
    """Runs trials somewhere and yields their rows as they finish (in any order)."""

    def run(self, trials: Iterable[Trial]) -> Iterator[TrialRow]: ...

    def close(self) -> None: ...


#: Executors by name: ``factory(workers=int, address=str | None, plugins=tuple[str, ...]) -> Executor``.
executors: Registry[Callable[..., Executor]] = Registry("executor")


def chunk_by_model(trials: Iterable[Trial], size: int = _CHUNK) -> list[list[Trial]]:
    """Consecutive trials of one model, at most ``size`` per chunk (the unit of scheduling)."""
    return list(iter_chunks(trials, size))


def iter_chunks(trials: Iterable[Trial], size: int = _CHUNK) -> Iterator[list[Trial]]:
    """:func:`chunk_by_model` as a stream: each chunk as soon as it is complete."""
    chunk: list[Trial] = []
    for t in trials:
        if chunk and (chunk[0].model != t.model or len(chunk) >= size):
            yield chunk
            chunk = []
        chunk.append(t)
    if chunk:
        yield chunk


class _Worker:
    """Runs chunks, keeping the last model's runner loaded; loads the plugins before the first.

    A model that fails to load (a missing checkpoint, a plugin model that raises) makes every
    trial of it a failed row with the traceback, so the rest of the campaign goes on.
    """

    def __init__(self, plugin_modules: Sequence[str] = ()) -> None:
        plugin_loader.load(plugin_modules)
        self.runner: TrialRunner | None = None
        self._broken: tuple[str, BaseException] | None = None

    def run_chunk(self, chunk: list[Trial]) -> list[TrialRow]:
        key = chunk[0].model
        if self._broken is not None and self._broken[0] == key:
            return [failed_row(t, time.time(), self._broken[1]) for t in chunk]
        if self.runner is None or self.runner.key != key:
            if self.runner is not None:
                self.close()
            started = time.time()
            try:
                self.runner = make_runner(chunk[0])
            except Exception as err:  # recorded per trial: one bad model must not end a campaign
                self._broken = (key, err)
                return [failed_row(t, started, err) for t in chunk]
            self._broken = None
        return [self.runner.run(t) for t in chunk]

    def close(self, verify: bool = True) -> None:
        """Release the runner (a sharded model's ranks stop), first verifying its model is clean."""
        runner, self.runner = self.runner, None
        if runner is not None:
            try:
                if verify:
                    runner.verify()
            finally:
                runner.close()


class InProcess:
    """Runs trials one after another in this process (the default)."""

    def __init__(self, plugin_modules: Sequence[str] = ()) -> None:
        self.worker = _Worker(plugin_modules)

    def run(self, trials: Iterable[Trial]) -> Iterator[TrialRow]:
        for chunk in iter_chunks(trials, size=1):
            yield from self.worker.run_chunk(chunk)
        if self.worker.runner is not None:
            self.worker.runner.verify()

    def close(self) -> None:
        self.worker.close(verify=False)  # run() verified at its end; an interrupted run has nothing to add


_PROCESS_WORKER: _Worker | None = None


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT in this process meanwhile (the main thread only: elsewhere it cannot be set);
    processes started meanwhile inherit the ignored disposition from their first instruction."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _ready() -> None:
    """A no-op task: submitting it starts a worker."""


def _init_process(plugin_modules: tuple[str, ...], parent: int | None = None) -> None:
    import torch

    global _PROCESS_WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops us
    if parent is not None:
        die_with_parent(parent)
    torch.set_num_threads(1)  # one thread per process: N processes use N cores
    _PROCESS_WORKER = _Worker(plugin_modules)


def _run_in_process(chunk: list[Trial]) -> list[TrialRow]:
    assert _PROCESS_WORKER is not None
    return _PROCESS_WORKER.run_chunk(chunk)


class ProcessPool:
    """A local pool of ``workers`` processes (spawned: safe with torch threads), one torch thread
    each, every one importing ``plugin_modules`` before its first trial."""

    def __init__(self, workers: int, plugin_modules: Sequence[str] = ()) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_process,
            initargs=(tuple(plugin_modules), os.getpid()),
        )
        self.workers = workers
        with _sigint_ignored():  # the workers start with SIGINT ignored: no traceback while importing
            for _ in range(workers):  # each submit starts one worker while none is idle
                self.pool.submit(_ready)

    def run(self, trials: Iterable[Trial]) -> Iterator[TrialRow]:
        """Rows as chunks finish; at most two chunks per worker are submitted ahead (a stream)."""
        chunks = iter_chunks(trials)
        pending = {self.pool.submit(_run_in_process, c) for c in itertools.islice(chunks, 2 * self.workers)}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                pending |= {
                    self.pool.submit(_run_in_process, c) for c in itertools.islice(chunks, len(finished))
                }
                for fut in finished:
                    yield from fut.result()
        finally:
            for fut in pending:
                fut.cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        """Stop now (Ctrl-C): cancel what is queued and end the workers without waiting for them."""
        processes = list(getattr(self.pool, "_processes", {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            p.terminate()
        for p in processes:
            p.join(timeout=5)


class RayExecutor:
    """Ray actors, one per worker (one per GPU when the cluster has GPUs), each holding a model.

    ``address``: ``"local"`` starts a private instance on this machine (no dashboard, small object
    store, works without network), ``"auto"`` joins a running cluster, ``"ray://host:port"`` a
    remote one. A lost actor is restarted and its in-flight chunk retried (``max_restarts``,
    ``max_task_retries``).
    """

    def __init__(
        self, address: str = "local", workers: int | None = None, plugin_modules: Sequence[str] = ()
    ) -> None:
        try:
            import ray
            from ray.util import ActorPool
        except ImportError:
            raise RuntimeError("the Ray executor needs ray: pip install 'pytei[ray]'") from None
        if not ray.is_initialized():
            if address == "local":
                ray.init(
                    address="local",
                    include_dashboard=False,
                    object_store_memory=256 * 2**20,
                    log_to_driver=False,
                )
            else:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        n = workers or gpus or max(1, int(resources.get("CPU", 1)))
        actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_restarts=2, max_task_retries=2)(
            _RayWorker
        )
        self.ray = ray
        self.actors: list[Any] = [actor.remote(tuple(plugin_modules)) for _ in range(n)]
        self.pool = ActorPool(self.actors)

    def run(self, trials: Iterable[Trial]) -> Iterator[TrialRow]:
        """Rows as chunks finish; a chunk is submitted when an actor is free (a stream)."""
        for chunk in iter_chunks(trials):
            while not self.pool.has_free():
                yield from self.pool.get_next_unordered()
            self.pool.submit(lambda a, c: a.run_chunk.remote(c), chunk)
        while self.pool.has_next():
            yield from self.pool.get_next_unordered()

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


class _RayWorker(_Worker):
    def __init__(self, plugin_modules: tuple[str, ...] = ()) -> None:
        import torch

        torch.set_num_threads(1)
        super().__init__(plugin_modules)


def _in_process(workers: int = 0, address: str | None = None, plugins: Sequence[str] = ()) -> Executor:
    return InProcess(plugins)


def _pool(workers: int = 0, address: str | None = None, plugins: Sequence[str] = ()) -> Executor:
    return ProcessPool(workers or max(1, multiprocessing.cpu_count()), plugins)


def _ray(workers: int = 0, address: str | None = None, plugins: Sequence[str] = ()) -> Executor:
    return RayExecutor(address or "local", workers or None, plugins)


executors("in-process", _in_process)
executors("pool", _pool)
executors("ray", _ray)


@dataclass
class CampaignResult:
    """Counts after a run: trials run now, already stored, failed (of those run now), planned, and
    left to another runner on the same database (claimed by it, still running); ``first_error`` is
    the error message of the first trial that failed now; ``deferred``: trials of sharded models of
    another world size than this torchrun launch's, not run (a launch of their size runs them)."""

    ran: int
    skipped: int
    failed: int
    planned: int
    elsewhere: int = 0
    first_error: str | None = None
    deferred: int = 0
    """Trials of sharded models whose world size is not this launch's (left for a launch of theirs)."""

    @property
    def all_failed(self) -> bool:
        """Trials ran and every one of them failed."""
        return self.ran > 0 and self.failed == self.ran

    def check(self) -> None:
        """Raise :class:`AllTrialsFailed` if every trial run failed (the CLI's exit code 2)."""
        if self.all_failed:
            raise AllTrialsFailed(
                f"all {self.ran} trials failed; the first: {self.first_error} "
                "(each failure's traceback is stored: pytei campaign export)"
            )


def _halfwidth(values: list[float], metric: str, level: float) -> float:
    """Half the width of the ``level`` interval of the mean (:func:`pytei.stats.interval`, inside the
    metric's range); inf where it is unbounded (an RMSE's upper end, or too few values)."""
    low, high = stats.interval(values, level=level, bounds=metrics.bounds(metric))
    width = (high - low) / 2
    return width if width == width else float("inf")  # NaN (no values): not yet known


def _next_round(trials: list[Trial], store: Store, spec: Spec) -> list[Trial]:
    """Adaptive sample size: the next run of every point whose confidence interval is still too wide."""
    conf = spec.confidence
    assert conf is not None
    rows = {r["trial_id"]: r for r in store.rows()}
    by_point: dict = {}
    for t in trials:
        by_point.setdefault(t.point, []).append(t)
    todo = []
    for point_trials in by_point.values():
        point_trials.sort(key=lambda t: t.run)
        done = [rows[t.trial_id] for t in point_trials if t.trial_id in rows]
        if len(done) < conf.min_runs:
            todo += [t for t in point_trials[: conf.min_runs] if t.trial_id not in rows]
            continue
        values = [r["metrics"].get(conf.metric, float("nan")) for r in done if r["status"] == "ok"]
        if (
            len(done) < min(conf.max_runs, len(point_trials))
            and _halfwidth(values, conf.metric, conf.level) > conf.halfwidth
        ):
            todo.append(point_trials[len(done)])
    return todo


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def _launch_world() -> int | None:
    """The world size of the torchrun launch this process is rank 0 of (None: not launched)."""
    from ..distributed.launch import active

    session = active()
    return None if session is None else session.world


def _runnable(trials: Iterable[Trial], world: int | None, tally: dict[str, int]) -> Iterator[Trial]:
    """The trials this process can run: under a launch of ``world`` ranks, not those of sharded models of
    another world size (counted in ``tally["deferred"]``: failing them would store them as done)."""
    for t in trials:
        if world is not None and "sharded" in t.model_spec and t.model_spec["world_size"] != world:
            tally["deferred"] += 1
            continue
        yield t


def _claimed(trials: Iterable[Trial], store: Store, owner: str, tally: dict[str, int]) -> Iterator[Trial]:
    """The trials neither stored nor claimed by another live runner, claimed for ``owner`` in
    batches as they are consumed; counts the others in ``tally`` (``stored``, ``elsewhere``)."""
    it = iter(trials)
    while batch := list(itertools.islice(it, _CLAIM)):
        mine, stored, held = store.claim([t.trial_id for t in batch], owner)
        tally["stored"] += stored
        tally["elsewhere"] += held
        keep = set(mine)
        yield from (t for t in batch if t.trial_id in keep)


def run_campaign(
    spec: Spec,
    db: str | Path,
    *,
    base_dir: str | Path = ".",
    workers: int = 0,
    ray_address: str | None = None,
    executor: str | None = None,
    plugins: Sequence[str] = (),
    progress: bool = True,
    max_trials: int | None = MAX_TRIALS,
    confirm: bool = False,
) -> CampaignResult:
    """Run (or resume) ``spec``, storing every trial in the SQLite database ``db``.

    ``base_dir`` is where the spec's relative paths were resolved (its file's folder); it is
    recorded so that :func:`resume_campaign` can rebuild the plan from the database alone.
    ``executor`` names a registered executor (default: ``ray`` with ``ray_address``, ``pool`` with
    ``workers > 0``, else ``in-process``). ``plugins`` (module names) are imported here and in every
    worker, after the spec's own ``plugins``. The number of trials is counted and (with
    ``progress``) printed before any is made; more than ``max_trials`` (None: no limit) raises
    :class:`TooManyTrials` unless ``confirm``. Another process running the same spec into ``db``
    shares the trials (see the module docstring). The checkpoints' content fingerprints are recorded
    and must match those of earlier runs (:class:`~pytei.campaign.store.ModelChanged`).
    """
    modules = (*spec.plugins, *(m for m in plugins if m not in spec.plugins))
    plugin_loader.load(modules)
    model_specs = spec.model_specs()
    names = parameter_names(model_specs)
    cache: dict[str, list[str]] = {}

    def cached_names(key: str) -> list[str]:
        if key not in cache:
            cache[key] = names(key)
        return cache[key]

    n_planned = count_trials(spec, parameter_names=cached_names)
    _say(progress, f"campaign {spec.name}: {n_planned:,} trials planned")
    if max_trials is not None and n_planned > max_trials and not confirm:
        raise TooManyTrials(
            f"campaign {spec.name} plans {n_planned:,} trials, over the limit of {max_trials:,}: "
            "confirm with --yes (run_campaign(..., confirm=True)) or shrink the grid (runs, rates, targets)"
        )
    with Store(db) as store:
        store.attach_spec(
            spec.text,
            spec.hash,
            spec.name,
            n_planned,
            base_dir=str(Path(base_dir).resolve()),
            fingerprints=fingerprints(model_specs, spec.host_checkpoints()),
        )
        name = executor or ("ray" if ray_address else "pool" if workers > 0 else "in-process")
        world = _launch_world()
        if world is not None and name != "in-process":
            raise ArgumentError(
                f"under torchrun the campaign runs in rank 0's process, which the other ranks serve: "
                f"run it without --workers / --ray-address (got executor {name!r})"
            )
        owner = store.join()
        beating = store.heartbeat(owner)
        runner: Executor = executors.get(name)(workers=workers, address=ray_address, plugins=modules)
        ran = failed = 0
        first_error: str | None = None
        tally = {"stored": 0, "elsewhere": 0, "deferred": 0}
        trials = list(iter_plan(spec, parameter_names=cached_names)) if spec.confidence is not None else None
        try:
            with progress_bar(enabled=progress) as bar:
                done = store.counts()["ok"] + store.counts()["failed"]
                task = bar.add_task(f"campaign {spec.name}", total=n_planned, completed=done)
                while True:
                    if trials is not None:
                        tally["stored"] = tally["deferred"] = 0  # recounted each round
                        todo: Iterable[Trial] = _next_round(trials, store, spec)
                    else:
                        todo = iter_plan(spec, parameter_names=cached_names)
                    round_ran = 0
                    for row in runner.run(_claimed(_runnable(todo, world, tally), store, owner, tally)):
                        try:
                            store.record(row)
                        except DuplicateTrial:  # a runner taken for dead finished it after all
                            tally["elsewhere"] += 1
                            continue
                        ran += 1
                        round_ran += 1
                        if row.status != "ok":
                            failed += 1
                            first_error = first_error or row.error_message
                        bar.advance(task)
                    if trials is None or round_ran == 0:
                        break
        except BaseException:
            abort = getattr(runner, "abort", None)
            if callable(abort):
                abort()
            raise
        finally:
            beating.set()
            runner.close()
            store.leave(owner)
        if trials is None:
            skipped = tally["stored"]
        else:
            stored_ids = store.done_ids()
            skipped = sum(1 for t in trials if t.trial_id in stored_ids) - ran
        return CampaignResult(
            ran=ran,
            skipped=skipped,
            failed=failed,
            planned=n_planned,
            elsewhere=tally["elsewhere"],
            first_error=first_error,
            deferred=tally["deferred"],
        )


def resume_campaign(db: str | Path, *, plugins: Sequence[str] = (), **options: Any) -> CampaignResult:
    """Continue the campaign stored in ``db`` (after Ctrl-C, kill -9 or a crash) from its own spec.

    ``plugins`` are imported before the stored spec is parsed (it may name what they register).
    """
    plugin_loader.load(plugins)
    db = Path(db)
    if not db.is_file():
        raise FileNotFoundError(f"no campaign database at {db}")
    with Store(db, create=False, readonly=True) as store:
        stored = store.spec()
    if stored is None:
        raise StoreError(f"{db} holds no campaign spec: start it with 'pytei campaign run SPEC --db {db}'")
    base_dir = stored["base_dir"] or "."
    spec = parse_spec(stored["text"], base_dir)
    return run_campaign(spec, db, base_dir=base_dir, plugins=plugins, **options)
