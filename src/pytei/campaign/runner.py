"""Run trials against one model: load it once, score clean outputs once, then inject -> evaluate ->
restore per trial, recomputing only what a trial's faults can change.

Evaluation goes through :class:`pytei.incremental.IncrementalEvaluator`: the model's forward is
captured as a graph, clean node values are kept per mitigation, and a trial re-executes only the
nodes downstream of what it changed (faulted weights, modules hooked for activation faults), only
for the batches (or, for embedding rows, the samples) that read a faulted value. Outputs are
bit-identical to a full evaluation; the path taken (clean / rows / samples / subgraph / full) is
recorded per trial. Scores are updated incrementally where only some outputs changed (AUC).

Models of other sources may run their trials elsewhere: ``runners`` maps a model source's key to the
factory of its ``TrialRunner`` (``sharded``: the ranks of ``pytei.distributed``); the others get a
``ModelRunner``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from .. import metrics
from .._registry import Registry
from ..errors import ErrorModel, Faults
from ..incremental import IncrementalEvaluator
from ..injector import InjectionReport, Injector, Protection, parameter_digest
from ..mitigation import Mitigation, mitigate
from ..mitigation import register as mitigations
from .plan import HOST_SITE, Trial, build_error, fault_label
from .sources import Evaluation, source_for
from .store import TrialRow

__all__ = [
    "VERIFY_EVERY",
    "Evaluation",
    "ModelRunner",
    "TrialRunner",
    "build_model",
    "failed_row",
    "load_evaluation",
    "make_runner",
    "parameter_names",
    "runners",
    "trial_row",
]

#: Check the parameters' digest against the clean one every this many trials (restore drift guard).
VERIFY_EVERY = 50
_EVAL_BATCH = 2048
#: Score keys that are counts (stored as columns, not metrics).
_COUNTS = ("n", "n_invalid")


class TrialRunner(Protocol):
    """Runs the trials of one model (``key``), loaded once: a row per trial, failures included."""

    key: str

    def run(self, trial: Trial) -> TrialRow: ...

    def verify(self) -> None:
        """Raise if the model is not in its clean state (restore drift)."""

    def close(self) -> None:
        """Release what it holds (processes, memory)."""


#: ``TrialRunner`` factories (``factory(first trial)``) by model source key; ``ModelRunner`` otherwise.
runners: Registry[Callable[[Trial], TrialRunner]] = Registry("trial runner")


def make_runner(trial: Trial) -> TrialRunner:
    """The runner of ``trial``'s model: its source's registered factory, else a ``ModelRunner``."""
    for key in runners.names():
        if key in trial.model_spec:
            return runners.get(key)(trial)
    return ModelRunner(load_evaluation(trial))


class _Described(Protocol):
    """What a row says of a loaded model: its architecture label and data set."""

    label: str
    dataset: str


def build_model(model_spec: dict) -> nn.Module:
    """The model a trial's ``model_spec`` names, without its data (its source builds it)."""
    return source_for(model_spec).build(model_spec)


def parameter_names(model_specs: dict[str, dict]) -> Callable[[str], list[str]]:
    """``parameter_names(model key)`` for ``plan``: the floating-point parameters of each model."""

    def names(key: str) -> list[str]:
        model = build_model(model_specs[key])
        return [n for n, p in model.named_parameters() if p.is_floating_point()]

    return names


def load_evaluation(trial: Trial, batch_size: int = _EVAL_BATCH) -> Evaluation:
    """Build the model and evaluation rows a trial names (through the source of its model spec)."""
    return source_for(trial.model_spec).load(trial.model, trial.model_spec, batch_size)


class ModelRunner:
    """Holds one model's clean state and runs trials on it."""

    def __init__(self, evaluation: Evaluation, *, fast: bool = True, cache_budget: int | None = None) -> None:
        """``fast=False`` evaluates every trial in full (the reference the fast paths must equal);
        ``cache_budget`` bounds the incremental evaluator's cache (bytes; default: its own)."""
        self.ev = evaluation
        self.key = evaluation.key
        self.fast = fast
        self.model = evaluation.model
        self.digest = parameter_digest(self.model)
        self.golden = self._forward_all()
        self.evaluator = (
            IncrementalEvaluator(self.model, evaluation.batches, budget=cache_budget) if fast else None
        )
        if self.evaluator is not None:
            self.evaluator.prepare("none", self.golden)
        self._clean: dict[str, torch.Tensor] = {"none": self.golden}
        self._scorers: dict[tuple, metrics.Scorer] = {}
        self._baselines: dict[tuple, dict] = {}
        self._mitigations: dict[str, tuple[Mitigation | None, Protection | None]] = {}
        self.trials_since_check = 0

    # --- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def _forward_all(self) -> torch.Tensor:
        return torch.cat([self.model(*b).float().reshape(-1) for b in self.ev.batches])

    def mitigation(self, trial: Trial) -> tuple[Mitigation | None, Protection | None]:
        """The (compute-side, memory-side) pair of a trial's mitigation, built once per model and
        calibrated on this model's clean calibration rows (ABFT tolerances, profiled clip ranges)."""
        label = trial.mitigation
        if label not in self._mitigations:
            mtype = mitigations.get(trial.mitigation_name or label)
            built = mtype.build(self.model, self.ev.calibration, **trial.mitigation_options)
            self._mitigations[label] = built
        return self._mitigations[label]

    def clean(self, trial: Trial) -> torch.Tensor:
        """Outputs with the trial's mitigation attached and no faults (its own baseline); the
        incremental evaluator's clean pass for that mitigation runs here too."""
        name = trial.mitigation
        if name not in self._clean:
            mit, _ = self.mitigation(trial)
            with mitigate(self.model, *([mit] if mit else [])):
                self._clean[name] = self._forward_all()
                if self.evaluator is not None:
                    per_sample = mit is None or mit.per_sample
                    self.evaluator.prepare(name, self._clean[name], per_sample=per_sample)
        return self._clean[name]

    def _scorer(self, trial: Trial) -> metrics.Scorer:
        key = (trial.mitigation, trial.metrics)
        if key not in self._scorers:
            self._scorers[key] = metrics.Scorer(
                self.ev.labels, self.golden, metrics=trial.metrics, clean=self.clean(trial)
            )
        return self._scorers[key]

    def baseline(self, trial: Trial) -> dict[str, float]:
        """The trial's metrics on the clean outputs under its mitigation (scored once, then cached)."""
        key = (trial.mitigation, trial.metrics)
        if key not in self._baselines:
            self._baselines[key] = self._score(self.clean(trial), trial, torch.empty(0, dtype=torch.int64))
        return self._baselines[key]

    def _score(self, outputs: torch.Tensor, trial: Trial, changed: torch.Tensor | None) -> dict[str, float]:
        """Counts and the trial's metrics that apply (labels where the model has them); ``changed``:
        the rows that differ from the mitigation's clean outputs (None: unknown)."""
        got = self._scorer(trial)(outputs, changed=changed)
        got.setdefault("invalid_frac", got["n_invalid"] / max(got["n"], 1))
        return got

    @torch.no_grad()
    def _outputs(
        self, trial: Trial, report: InjectionReport
    ) -> tuple[torch.Tensor, str, torch.Tensor | None]:
        """Outputs under the current faults, the path that computed them, and the rows that differ from
        the clean outputs (None when every row was recomputed without tracking)."""
        faults: Mapping[str, Faults] = report.fault_map.faults
        if self.evaluator is None:
            return self._forward_all(), "full", None
        clean = self.clean(trial)
        if trial.site == "weights" and not faults:
            return clean, "clean", torch.empty(0, dtype=torch.int64)
        hooked = list(report.per_activation) if trial.site != "weights" else []  # faults drawn per pass
        outcome = self.evaluator.evaluate(trial.mitigation, faults, hooked, numels=report.fault_map.numels)
        if outcome is None:
            return self._forward_all(), "full", None
        rows = outcome.recomputed
        differ = outcome.outputs[rows].view(torch.int32) != clean[rows].view(torch.int32)
        return outcome.outputs, outcome.path, rows[differ]

    @torch.no_grad()
    def _accumulated(
        self, trial: Trial, error: ErrorModel, protect: Protection | None
    ) -> tuple[torch.Tensor, int, dict]:
        """The original PyTEI evaluation loop (an error model that ``accumulates``, see pytei.compat):
        before every batch a fresh draw (seed derived from the trial's and the batch index) goes in
        on top of the earlier ones; all come out, last first, when the trial ends."""
        applied: list[Injector] = []
        outputs, n_faults = [], 0
        try:
            for b, batch in enumerate(self.ev.batches):
                seed = int.from_bytes(hashlib.sha256(f"{trial.seed}:{b}".encode()).digest()[:7], "big")
                injector = Injector(error, site=trial.site, seed=seed, protect=protect, **trial.target_spec)
                report = injector.apply(self.model)
                applied.append(injector)
                outputs.append(self.model(*batch).float().reshape(-1))
                n_faults += report.n_faults
        finally:
            while applied:
                applied.pop().restore()
        return torch.cat(outputs), n_faults, {}

    # --- trials ------------------------------------------------------------------------------

    def run(self, trial: Trial) -> TrialRow:
        """Run one trial; a trial that raises is returned as a failed row (the campaign goes on)."""
        started = time.time()
        try:
            row = self._run(trial, started)
        except Exception as err:  # recorded, not fatal: one bad trial must not end a campaign
            row = failed_row(trial, started, err, self.ev)
        self.trials_since_check += 1
        if self.trials_since_check >= VERIFY_EVERY:
            self.verify()
        return row

    def close(self) -> None:
        """Nothing to release but memory (the caller drops this runner)."""

    def verify(self) -> None:
        """Fail loudly if restore ever left the parameters different from the clean model."""
        self.trials_since_check = 0
        if parameter_digest(self.model) != self.digest:
            raise RuntimeError(f"parameters of {self.ev.key} drifted from their clean state: restore failed")

    def _run(self, trial: Trial, started: float) -> TrialRow:
        mit, protect = self.mitigation(trial)
        base = self.baseline(trial)  # before attaching below: clean() attaches the mitigation itself
        error = build_error(trial.error)
        if mit is not None:
            mit.reset_stats()
        with mitigate(self.model, *([mit] if mit else [])):
            if getattr(error, "accumulates", False):
                outputs, n_faults, protection = self._accumulated(trial, error, protect)
                path, changed = "full", None
            else:
                injector = Injector(
                    error, site=trial.site, seed=trial.seed, protect=protect, **trial.target_spec
                )
                report = injector.apply(self.model)
                try:
                    outputs, path, changed = self._outputs(trial, report)
                finally:
                    injector.restore()
                n_faults, protection = report.n_faults, dict(report.protection)
                if report.indices is not None:  # what faulted ids did (bounds: zeroed or skipped)
                    protection.update(index_ids=report.indices.ids, out_of_range=report.indices.out_of_range)
        got = base if path == "clean" else self._score(outputs, trial, changed)
        extra: dict[str, Any] = {"path": path, **protection}
        if mit is not None:
            extra.update({k: v for k, v in mit.stats.items() if not isinstance(v, dict)})
        values = {k: v for k, v in got.items() if k not in _COUNTS}
        values.update({f"baseline_{k}": v for k, v in base.items() if k not in (*_COUNTS, "invalid_frac")})
        return trial_row(
            trial,
            started,
            self.ev,
            status="ok",
            n_faults=n_faults,
            n_invalid=int(got["n_invalid"]),
            n_outputs=int(got["n"]),
            metrics=values,
            extra=extra,
        )


def failed_row(trial: Trial, started: float, err: BaseException, ev: _Described | None = None) -> TrialRow:
    """The row of a trial that raised ``err`` (also of every trial of a model that failed to load):
    a one-line ``error_message`` and the full ``traceback``."""
    return trial_row(
        trial,
        started,
        ev,
        status="failed",
        error_message=_describe(err),
        traceback="".join(traceback.format_exception(err)),
    )


def trial_row(trial: Trial, started: float, ev: _Described | None, **values: Any) -> TrialRow:
    """The stored row of ``trial`` (started at ``started``, finished now) on the model ``ev`` describes
    (None: not loaded), with ``values`` (status, metrics, counts, ...)."""
    finished = time.time()
    error = trial.error
    source = source_for(trial.model_spec)
    architecture = ev.label if ev is not None else source.architecture(trial.model_spec)
    return TrialRow(
        trial_id=trial.trial_id,
        model=trial.model,
        model_label=trial.label or architecture,
        architecture=architecture,
        dataset=ev.dataset if ev is not None else "",
        target=trial.target,
        params=trial.target_spec.get("params", "all"),
        site=trial.site,
        kind=trial.kind,
        model_config=source.config(trial.model_spec),
        error_model=fault_label(trial.error) if trial.site == HOST_SITE else error["model"],
        rate=float(trial.rate),
        bits=error.get("bits"),
        run=trial.run,
        seed=trial.seed,
        mitigation=trial.mitigation,
        started=started,
        finished=finished,
        duration_s=finished - started,
        worker=f"{socket.gethostname()}:{os.getpid()}",
        **values,
    )


def _describe(err: BaseException) -> str:
    tb = traceback.extract_tb(err.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(err).__name__}: {err}{where}"
