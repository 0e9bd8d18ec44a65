"""Executing a campaign: plan, skip what the store already has, run the rest, commit each trial.

Three executors give identical rows for the same spec (each trial is a pure function of its
content and seed): in-process (default), a local process pool (``workers=N``), and Ray actors
(``ray_address=...``). Each worker keeps one model loaded and runs that model's trials together.
A campaign interrupted by Ctrl-C, ``kill -9`` or a crash resumes from its database: trials are
committed one by one as they finish, so none is lost and none is recorded twice.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .. import metrics, stats
from .. import plugins as plugin_loader
from .._registry import Registry
from ..progress import progress_bar
from .plan import Trial, plan
from .runner import ModelRunner, failed_row, load_evaluation, parameter_names
from .spec import Spec, parse_spec
from .store import Store, StoreError, TrialRow

__all__ = [
    "CampaignResult",
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


class Executor(Protocol):
    """Runs trials somewhere and yields their rows as they finish (in any order)."""

    def run(self, trials: list[Trial]) -> Iterator[TrialRow]: ...

    def close(self) -> None: ...


#: Executors by name: ``factory(workers=int, address=str | None, plugins=tuple[str, ...]) -> Executor``.
executors: Registry[Callable[..., Executor]] = Registry("executor")


def chunk_by_model(trials: Iterable[Trial], size: int = _CHUNK) -> list[list[Trial]]:
    """Consecutive trials of one model, at most ``size`` per chunk (the unit of scheduling)."""
    chunks: list[list[Trial]] = []
    for t in trials:
        if chunks and chunks[-1][0].model == t.model and len(chunks[-1]) < size:
            chunks[-1].append(t)
        else:
            chunks.append([t])
    return chunks


class _Worker:
    """Runs chunks, keeping the last model's runner loaded; loads the plugins before the first.

    A model that fails to load (a missing checkpoint, a plugin model that raises) makes every
    trial of it a failed row with the traceback, so the rest of the campaign goes on.
    """

    def __init__(self, plugin_modules: Sequence[str] = ()) -> None:
        plugin_loader.load(plugin_modules)
        self.runner: ModelRunner | None = None
        self._broken: tuple[str, BaseException] | None = None

    def run_chunk(self, chunk: list[Trial]) -> list[TrialRow]:
        key = chunk[0].model
        if self._broken is not None and self._broken[0] == key:
            return [failed_row(t, time.time(), self._broken[1]) for t in chunk]
        if self.runner is None or self.runner.ev.key != key:
            if self.runner is not None:
                self.runner.verify()
                self.runner = None
            started = time.time()
            try:
                self.runner = ModelRunner(load_evaluation(chunk[0]))
            except Exception as err:  # recorded per trial: one bad model must not end a campaign
                self._broken = (key, err)
                return [failed_row(t, started, err) for t in chunk]
            self._broken = None
        return [self.runner.run(t) for t in chunk]


class InProcess:
    """Runs trials one after another in this process (the default)."""

    def __init__(self, plugin_modules: Sequence[str] = ()) -> None:
        self.worker = _Worker(plugin_modules)

    def run(self, trials: list[Trial]) -> Iterator[TrialRow]:
        for chunk in chunk_by_model(trials, size=1):
            yield from self.worker.run_chunk(chunk)
        if self.worker.runner is not None:
            self.worker.runner.verify()

    def close(self) -> None:
        self.worker.runner = None


_PROCESS_WORKER: _Worker | None = None


def _init_process(plugin_modules: tuple[str, ...]) -> None:
    import torch

    global _PROCESS_WORKER
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
            initargs=(tuple(plugin_modules),),
        )
        self.workers = workers

    def run(self, trials: list[Trial]) -> Iterator[TrialRow]:
        pending = {self.pool.submit(_run_in_process, c) for c in chunk_by_model(trials)}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    yield from fut.result()
        finally:
            for fut in pending:
                fut.cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


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

    def run(self, trials: list[Trial]) -> Iterator[TrialRow]:
        for rows in self.pool.map_unordered(lambda a, c: a.run_chunk.remote(c), chunk_by_model(trials)):
            yield from rows

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
    """Counts after a run: trials run now, already stored, and failed."""

    ran: int
    skipped: int
    failed: int
    planned: int


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
) -> CampaignResult:
    """Run (or resume) ``spec``, storing every trial in the SQLite database ``db``.

    ``base_dir`` is where the spec's relative paths were resolved (its file's folder); it is
    recorded so that :func:`resume_campaign` can rebuild the plan from the database alone.
    ``executor`` names a registered executor (default: ``ray`` with ``ray_address``, ``pool`` with
    ``workers > 0``, else ``in-process``). ``plugins`` (module names) are imported here and in every
    worker, after the spec's own ``plugins``.
    """
    modules = (*spec.plugins, *(m for m in plugins if m not in spec.plugins))
    plugin_loader.load(modules)
    trials = plan(spec, parameter_names=parameter_names(spec.model_specs()))
    with Store(db) as store:
        store.attach_spec(
            spec.text, spec.hash, spec.name, len(trials), base_dir=str(Path(base_dir).resolve())
        )
        done = store.done_ids()
        name = executor or ("ray" if ray_address else "pool" if workers > 0 else "in-process")
        runner: Executor = executors.get(name)(workers=workers, address=ray_address, plugins=modules)
        ran = failed = 0
        try:
            with progress_bar(enabled=progress) as bar:
                task = bar.add_task(f"campaign {spec.name}", total=len(trials), completed=len(done))
                while True:
                    todo = (
                        _next_round(trials, store, spec)
                        if spec.confidence is not None
                        else [t for t in trials if t.trial_id not in done]
                    )
                    if not todo:
                        break
                    for row in runner.run(todo):
                        store.record(row)
                        ran += 1
                        failed += row.status != "ok"
                        bar.advance(task)
                    if spec.confidence is None:
                        break
        finally:
            runner.close()
        return CampaignResult(ran=ran, skipped=len(done), failed=failed, planned=len(trials))


def resume_campaign(db: str | Path, *, plugins: Sequence[str] = (), **options: Any) -> CampaignResult:
    """Continue the campaign stored in ``db`` (after Ctrl-C, kill -9 or a crash) from its own spec.

    ``plugins`` are imported before the stored spec is parsed (it may name what they register).
    """
    plugin_loader.load(plugins)
    db = Path(db)
    if not db.is_file():
        raise FileNotFoundError(f"no campaign database at {db}")
    with Store(db, create=False) as store:
        stored = store.spec()
    if stored is None:
        raise StoreError(f"{db} holds no campaign spec: start it with 'pytei campaign run SPEC --db {db}'")
    base_dir = stored["base_dir"] or "."
    spec = parse_spec(stored["text"], base_dir)
    return run_campaign(spec, db, base_dir=base_dir, plugins=plugins, **options)
