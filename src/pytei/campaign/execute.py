"""Executing a campaign: plan, skip what the store already has, run the rest, commit each trial.

Three executors give identical rows for the same spec (each trial is a pure function of its
content and seed): in-process (default), a local process pool (``workers=N``), and Ray actors
(``ray_address=...``). Each worker keeps one model loaded and runs that model's trials together.
A campaign interrupted by Ctrl-C, ``kill -9`` or a crash resumes from its database: trials are
committed one by one as they finish, so none is lost and none is recorded twice.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from scipy import stats as scistats

from ..progress import progress_bar
from .plan import Trial, plan
from .runner import ModelRunner, load_evaluation, parameter_names
from .spec import Spec, parse_spec
from .store import Store, TrialRow

__all__ = [
    "run_campaign",
    "resume_campaign",
    "InProcess",
    "ProcessPool",
    "RayExecutor",
    "chunk_by_model",
    "CampaignResult",
]

_CHUNK = 16


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
    """Runs chunks, keeping the last model's runner loaded."""

    def __init__(self) -> None:
        self.runner: ModelRunner | None = None

    def run_chunk(self, chunk: list[Trial]) -> list[TrialRow]:
        if self.runner is None or self.runner.ev.key != chunk[0].model:
            if self.runner is not None:
                self.runner.verify()
            self.runner = ModelRunner(load_evaluation(chunk[0]))
        return [self.runner.run(t) for t in chunk]


class InProcess:
    """Runs trials one after another in this process (the default)."""

    def __init__(self) -> None:
        self.worker = _Worker()

    def run(self, trials: list[Trial]) -> Iterator[TrialRow]:
        for chunk in chunk_by_model(trials, size=1):
            yield from self.worker.run_chunk(chunk)
        if self.worker.runner is not None:
            self.worker.runner.verify()

    def close(self) -> None:
        self.worker.runner = None


_PROCESS_WORKER: _Worker | None = None


def _init_process() -> None:
    import torch

    global _PROCESS_WORKER
    torch.set_num_threads(1)  # one thread per process: N processes use N cores
    _PROCESS_WORKER = _Worker()


def _run_in_process(chunk: list[Trial]) -> list[TrialRow]:
    assert _PROCESS_WORKER is not None
    return _PROCESS_WORKER.run_chunk(chunk)


class ProcessPool:
    """A local pool of ``workers`` processes (spawned: safe with torch threads)."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_process
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

    def __init__(self, address: str = "local", workers: int | None = None) -> None:
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
        self.actors = [actor.remote() for _ in range(n)]
        self.pool = ActorPool(self.actors)

    def run(self, trials: list[Trial]) -> Iterator[TrialRow]:
        for rows in self.pool.map_unordered(lambda a, c: a.run_chunk.remote(c), chunk_by_model(trials)):
            yield from rows

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


class _RayWorker(_Worker):
    def __init__(self) -> None:
        import torch

        torch.set_num_threads(1)
        super().__init__()


@dataclass
class CampaignResult:
    """Counts after a run: trials run now, already stored, and failed."""

    ran: int
    skipped: int
    failed: int
    planned: int


def _halfwidth(values: list[float], level: float) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if len(vals) < 2:
        return math.inf
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return float(scistats.t.ppf(0.5 + level / 2, len(vals) - 1)) * sd / math.sqrt(len(vals))


def _next_round(trials: list[Trial], store: Store, spec: Spec) -> list[Trial]:
    """Adaptive sample size: the next run of every point whose confidence interval is still too wide."""
    conf = spec.confidence
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
        values = [r.get(conf.metric) for r in done if r["status"] == "ok"]
        if (
            len(done) < min(conf.max_runs, len(point_trials))
            and _halfwidth(values, conf.level) > conf.halfwidth
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
    progress: bool = True,
) -> CampaignResult:
    """Run (or resume) ``spec``, storing every trial in the SQLite database ``db``.

    ``base_dir`` is where the spec's relative paths were resolved (its file's folder); it is
    recorded so that :func:`resume_campaign` can rebuild the plan from the database alone.
    """
    trials = plan(spec, parameter_names=parameter_names(spec.model_specs()))
    with Store(db) as store:
        store.attach_spec(
            spec.text, spec.hash, spec.name, len(trials), base_dir=str(Path(base_dir).resolve())
        )
        done = store.done_ids()
        executor = (
            RayExecutor(ray_address, workers or None)
            if ray_address
            else ProcessPool(workers)
            if workers > 0
            else InProcess()
        )
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
                    for row in executor.run(todo):
                        store.record(row)
                        ran += 1
                        failed += row.status != "ok"
                        bar.advance(task)
                    if spec.confidence is None:
                        break
        finally:
            executor.close()
        return CampaignResult(ran=ran, skipped=len(done), failed=failed, planned=len(trials))


def resume_campaign(db: str | Path, **options) -> CampaignResult:
    """Continue the campaign stored in ``db`` (after Ctrl-C, kill -9 or a crash) from its own spec."""
    db = Path(db)
    if not db.is_file():
        raise FileNotFoundError(f"no campaign database at {db}")
    with Store(db, create=False) as store:
        stored = store.spec()
    if stored is None:
        raise ValueError(f"{db} holds no campaign spec: start it with 'pytei campaign run SPEC --db {db}'")
    base_dir = stored["base_dir"] or "."
    spec = parse_spec(stored["text"], base_dir)
    return run_campaign(spec, db, base_dir=base_dir, **options)
