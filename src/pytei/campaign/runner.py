"""Run trials against one model: load it once, score clean outputs once, then inject -> evaluate ->
restore per trial, recomputing only what a trial's faults can change.

The evaluation rows are cut into a fixed partition of batches. A trial recomputes a batch only if
its faults can reach it, and every recomputed batch has the same composition as in the clean run,
so fast results are bit-identical to a full evaluation:

* no fault landed (low BER, or all filtered by a protection): the clean outputs are the answer;
* faults only in embedding tables: only batches that read a corrupted row (rows read per batch are
  recorded by pre-hooks during the clean run) are recomputed;
* faults only in the layers after ``model.forward_prefix`` (``model.suffix_modules``, e.g. the
  top MLP of DLRM/DCN or the dummy model's predictor): the prefix activations of each batch are
  computed once per mitigation and only ``forward_suffix`` runs per trial.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .. import metrics
from ..errors import Faults
from ..injector import Injector, Protection, parameter_digest
from ..mitigation import Mitigation, mitigate
from ..mitigation import register as mitigations
from .plan import Trial, build_error
from .sources import Evaluation, source_for
from .store import TrialRow

__all__ = [
    "VERIFY_EVERY",
    "Evaluation",
    "ModelRunner",
    "build_model",
    "failed_row",
    "load_evaluation",
    "parameter_names",
]

#: Check the parameters' digest against the clean one every this many trials (restore drift guard).
VERIFY_EVERY = 50
_EVAL_BATCH = 2048
#: Score keys that are counts (stored as columns, not metrics).
_COUNTS = ("n", "n_invalid")


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


class _RowIndex:
    """Which batches read which rows of each embedding table, recorded during the clean run."""

    def __init__(self, model: nn.Module) -> None:
        self.tables = {
            f"{name}.weight": module
            for name, module in model.named_modules()
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag))
        }
        self.rows: dict[str, list[torch.Tensor]] = {n: [] for n in self.tables}
        self._handles: list = []

    def start(self) -> None:
        for pname, module in self.tables.items():
            self._handles.append(module.register_forward_pre_hook(self._record(pname)))

    def _record(self, pname: str):
        def hook(module, args):
            self.rows[pname].append(torch.unique(args[0].detach().reshape(-1).cpu()))

        return hook

    def stop(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def affected(self, faults: Mapping[str, Faults], n_batches: int) -> list[int] | None:
        """Batches that read a corrupted row, or None if some fault is outside the tables."""
        hit = torch.zeros(n_batches, dtype=torch.bool)
        for pname, f in faults.items():
            if pname not in self.tables or len(self.rows[pname]) != n_batches:
                return None
            dim = self.tables[pname].weight.shape[1]
            bad_rows = torch.unique(f.index // dim)
            for b, read in enumerate(self.rows[pname]):
                if not hit[b] and bool(torch.isin(bad_rows, read).any()):
                    hit[b] = True
        return hit.nonzero().squeeze(1).tolist()


class ModelRunner:
    """Holds one model's clean state and runs trials on it."""

    def __init__(self, evaluation: Evaluation, *, fast: bool = True) -> None:
        self.ev = evaluation
        self.fast = fast
        self.model = evaluation.model
        self.digest = parameter_digest(self.model)
        self.rows = _RowIndex(self.model)
        self.rows.start()
        try:
            self.golden = self._forward_all()
        finally:
            self.rows.stop()
        self._clean: dict[str, torch.Tensor] = {"none": self.golden}
        self._prefix: dict[str, list[torch.Tensor]] = {}
        self._baselines: dict[tuple, dict] = {}
        self._mitigations: dict[str, tuple[Mitigation | None, Protection | None]] = {}
        self._suffix_params = self._suffix_parameter_names()
        self.trials_since_check = 0

    # --- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def _forward_all(self) -> torch.Tensor:
        return torch.cat([self.model(*b).float().reshape(-1) for b in self.ev.batches])

    def _suffix_parameter_names(self) -> set[str]:
        if not hasattr(self.model, "forward_suffix"):
            return set()
        prefixes = tuple(f"{m}." for m in getattr(self.model, "suffix_modules", ()))
        return {n for n, _ in self.model.named_parameters() if n.startswith(prefixes)}

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
        """Outputs with the trial's mitigation attached and no faults (its own baseline)."""
        name = trial.mitigation
        if name not in self._clean:
            mit, _ = self.mitigation(trial)
            with mitigate(self.model, *([mit] if mit else [])):
                self._clean[name] = self._forward_all()
        return self._clean[name]

    def baseline(self, trial: Trial) -> dict[str, float]:
        """The trial's metrics on the clean outputs under its mitigation (scored once, then cached)."""
        key = (trial.mitigation, trial.metrics)
        if key not in self._baselines:
            self._baselines[key] = self._score(self.clean(trial), trial)
        return self._baselines[key]

    def _score(self, outputs: torch.Tensor, trial: Trial) -> dict[str, float]:
        """Counts and the trial's metrics that apply (labels where the model has them)."""
        got = metrics.score(outputs, self.ev.labels, self.golden, metrics=trial.metrics)
        got.setdefault("invalid_frac", got["n_invalid"] / max(got["n"], 1))
        return got

    @torch.no_grad()
    def _prefix_batches(self, name: str) -> list[torch.Tensor]:
        """Prefix activations per batch under mitigation ``name``. Called only while that
        mitigation is attached and the faults sit in the suffix, so the prefix is clean."""
        if name not in self._prefix:
            forward_prefix = getattr(self.model, "forward_prefix")  # noqa: B009 - duck-typed protocol
            self._prefix[name] = [forward_prefix(*b) for b in self.ev.batches]
        return self._prefix[name]

    @torch.no_grad()
    def _outputs(self, trial: Trial, faults: Mapping[str, Faults]) -> tuple[torch.Tensor, str]:
        """Outputs under the current faults, and which path computed them."""
        if trial.site != "weights" or not self.fast:
            return self._forward_all(), "full"
        if not faults:
            return self.clean(trial), "clean"
        out = self.clean(trial).clone()
        bounds = [0]
        for batch in self.ev.batches:
            bounds.append(bounds[-1] + batch[0].shape[0])
        todo = self.rows.affected(faults, len(self.ev.batches))
        path = "rows"
        if todo is None:
            todo, path = list(range(len(self.ev.batches))), "full"
        suffix_only = bool(self._suffix_params) and set(faults) <= self._suffix_params
        prefix = self._prefix_batches(trial.mitigation) if suffix_only else None
        forward_suffix = getattr(self.model, "forward_suffix", None)
        for b in todo:
            if prefix is not None and forward_suffix is not None:
                y = forward_suffix(prefix[b])
            else:
                y = self.model(*self.ev.batches[b])
            out[bounds[b] : bounds[b + 1]] = y.float().reshape(-1)
        return out, ("suffix" if prefix is not None else path)

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

    def verify(self) -> None:
        """Fail loudly if restore ever left the parameters different from the clean model."""
        self.trials_since_check = 0
        if parameter_digest(self.model) != self.digest:
            raise RuntimeError(f"parameters of {self.ev.key} drifted from their clean state: restore failed")

    def _run(self, trial: Trial, started: float) -> TrialRow:
        mit, protect = self.mitigation(trial)
        base = self.baseline(trial)  # before attaching below: clean() attaches the mitigation itself
        injector = Injector(
            build_error(trial.error), site=trial.site, seed=trial.seed, protect=protect, **trial.target_spec
        )
        if mit is not None:
            mit.reset_stats()
        with mitigate(self.model, *([mit] if mit else [])):
            report = injector.apply(self.model)
            try:
                outputs, path = self._outputs(trial, report.fault_map.faults)
            finally:
                injector.restore()
        got = base if path == "clean" else self._score(outputs, trial)
        extra: dict[str, Any] = {"path": path, **report.protection}
        if mit is not None:
            extra.update({k: v for k, v in mit.stats.items() if not isinstance(v, dict)})
        values = {k: v for k, v in got.items() if k not in _COUNTS}
        values.update({f"baseline_{k}": v for k, v in base.items() if k not in (*_COUNTS, "invalid_frac")})
        return _row(
            trial,
            started,
            self.ev,
            status="ok",
            n_faults=report.n_faults,
            n_invalid=int(got["n_invalid"]),
            n_outputs=int(got["n"]),
            metrics=values,
            extra=extra,
        )


def failed_row(trial: Trial, started: float, err: BaseException, ev: Evaluation | None = None) -> TrialRow:
    """The row of a trial that raised ``err`` (also of every trial of a model that failed to load):
    a one-line ``error_message`` and the full ``traceback``."""
    return _row(
        trial,
        started,
        ev,
        status="failed",
        error_message=_describe(err),
        traceback="".join(traceback.format_exception(err)),
    )


def _row(trial: Trial, started: float, ev: Evaluation | None, **values: Any) -> TrialRow:
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
        error_model=error["model"],
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
