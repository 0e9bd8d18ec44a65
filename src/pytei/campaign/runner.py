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
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import metrics, models
from ..checkpoint import load_checkpoint
from ..demo import parameter_digest
from ..injector import Injector, Protection
from ..mitigation import ABFT, ECC, ClipActivations, Mitigation, ProtectBits, mitigate
from .plan import Trial, build_error
from .store import TrialRow

__all__ = ["Evaluation", "ModelRunner", "load_evaluation", "build_model", "parameter_names", "VERIFY_EVERY"]

#: Check the parameters' digest against the clean one every this many trials (restore drift guard).
VERIFY_EVERY = 50
_EVAL_BATCH = 2048


@dataclass
class Evaluation:
    """A model and the rows it is scored on, cut into a fixed batch partition."""

    key: str
    label: str
    dataset: str
    model: nn.Module
    batches: list[tuple[torch.Tensor, ...]]
    labels: torch.Tensor | None
    calibration: list[tuple[torch.Tensor, ...]] = field(default_factory=list)


def _cut(inputs: tuple[torch.Tensor, ...], batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    n = inputs[0].shape[0]
    return [tuple(t[i : i + batch_size] for t in inputs) for i in range(0, n, batch_size)]


def build_model(model_spec: dict) -> nn.Module:
    """The model a trial's ``model_spec`` names, without its data (checkpoint weights or dummy init)."""
    if "checkpoint" in model_spec:
        return load_checkpoint(model_spec["checkpoint"], with_data=False).model
    return models.create("dummy", seed=model_spec.get("model_seed", 0), **model_spec["dummy"]).eval()


def parameter_names(model_specs: dict[str, dict]):
    """``parameter_names(model key)`` for ``plan``: the floating-point parameters of each model."""

    def names(key: str) -> list[str]:
        model = build_model(model_specs[key])
        return [n for n, p in model.named_parameters() if p.is_floating_point()]

    return names


def load_evaluation(trial: Trial, batch_size: int = _EVAL_BATCH) -> Evaluation:
    """Build the model and evaluation rows a trial names (a checkpoint or a dummy model)."""
    spec = trial.model_spec
    if "checkpoint" in spec:
        ckpt = load_checkpoint(spec["checkpoint"])
        split = ckpt.data.valid if spec.get("split") == "valid" else ckpt.data.test
        inputs, labels = split.inputs, split.labels
        if spec.get("max_rows"):
            inputs = tuple(t[: spec["max_rows"]] for t in inputs)
            labels = labels[: spec["max_rows"]]
        calib_split = ckpt.data.train if spec.get("split") == "valid" else ckpt.data.valid
        calib = tuple(t[: 4 * batch_size] for t in calib_split.inputs)
        return Evaluation(
            key=trial.model,
            label=ckpt.meta["model"]["name"],
            dataset=ckpt.meta["data"]["name"],
            model=ckpt.model.eval(),
            batches=_cut(tuple(t.contiguous() for t in inputs), batch_size),
            labels=labels.clone(),
            calibration=_cut(calib, batch_size),
        )
    dummy = dict(spec["dummy"])
    model = build_model(spec)
    shape = {k: dummy[k] for k in ("dense_dim", "sparse_dim") if k in dummy}
    inputs = models.dummy_inputs(spec["samples"], sparsity=spec["sparsity"], seed=0, **shape)
    calib = models.dummy_inputs(
        min(spec["samples"], 4 * batch_size), sparsity=spec["sparsity"], seed=1, **shape
    )
    return Evaluation(
        key=trial.model,
        label="dummy",
        dataset=f"synthetic (sparsity {spec['sparsity']:g})",
        model=model,
        batches=_cut(inputs, batch_size),
        labels=None,
        calibration=_cut(calib, batch_size),
    )


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

    def affected(self, faults: dict, n_batches: int) -> list[int] | None:
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

    def mitigation(self, name: str) -> tuple[Mitigation | None, Protection | None]:
        """The (compute-side, memory-side) pair for a mitigation name, built once per model."""
        if name not in self._mitigations:
            self._mitigations[name] = self._build_mitigation(name)
        return self._mitigations[name]

    def _build_mitigation(self, name: str) -> tuple[Mitigation | None, Protection | None]:
        if name == "none":
            return None, None
        if name == "clip":
            return ClipActivations(), None
        if name == "clip-zero":
            return ClipActivations(mode="zero"), None
        if name == "clip-profiled":
            return ClipActivations.profile(self.model, self.ev.calibration), None
        if name == "protect-bits":
            return None, ProtectBits()
        if name == "ecc":
            return None, ECC()
        if name == "abft":
            abft = ABFT()
            abft.calibrate(self.model, self.ev.calibration)
            return abft, None
        raise ValueError(f"unknown mitigation {name!r}")

    def clean(self, name: str) -> torch.Tensor:
        """Outputs with mitigation ``name`` attached and no faults (its own baseline)."""
        if name not in self._clean:
            mit, _ = self.mitigation(name)
            with mitigate(self.model, *([mit] if mit else [])):
                self._clean[name] = self._forward_all()
        return self._clean[name]

    def baseline(self, name: str, with_labels: bool, with_golden: bool) -> dict:
        """Metrics of the clean outputs under mitigation ``name`` (scored once, then cached)."""
        key = (name, with_labels, with_golden)
        if key not in self._baselines:
            labels = self.ev.labels if with_labels else None
            golden = self.golden if with_golden else None
            self._baselines[key] = metrics.score(self.clean(name), labels, golden)
        return self._baselines[key]

    @torch.no_grad()
    def _prefix_batches(self, name: str) -> list[torch.Tensor]:
        """Prefix activations per batch under mitigation ``name``. Called only while that
        mitigation is attached and the faults sit in the suffix, so the prefix is clean."""
        if name not in self._prefix:
            self._prefix[name] = [self.model.forward_prefix(*b) for b in self.ev.batches]
        return self._prefix[name]

    @torch.no_grad()
    def _outputs(self, trial: Trial, faults: dict, mitigation: str) -> tuple[torch.Tensor, str]:
        """Outputs under the current faults, and which path computed them."""
        if trial.site != "weights" or not self.fast:
            return self._forward_all(), "full"
        if not faults:
            return self.clean(mitigation), "clean"
        out = self.clean(mitigation).clone()
        bounds = [0]
        for b in self.ev.batches:
            bounds.append(bounds[-1] + b[0].shape[0])
        todo = self.rows.affected(faults, len(self.ev.batches))
        path = "rows"
        if todo is None:
            todo, path = list(range(len(self.ev.batches))), "full"
        suffix_only = bool(self._suffix_params) and set(faults) <= self._suffix_params
        prefix = self._prefix_batches(mitigation) if suffix_only else None
        for b in todo:
            if prefix is not None:
                y = self.model.forward_suffix(prefix[b])
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
        except KeyboardInterrupt:
            raise
        except Exception as err:  # recorded, not fatal: one bad trial must not end a campaign
            row = self._row(trial, started, status="failed", error_message=_describe(err))
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
        mit, protect = self.mitigation(trial.mitigation)
        self.clean(trial.mitigation)  # before attaching below: clean() attaches the mitigation itself
        injector = Injector(
            build_error(trial.error), site=trial.site, seed=trial.seed, protect=protect, **trial.target_spec
        )
        if hasattr(mit, "reset_stats"):
            mit.reset_stats()
        with mitigate(self.model, *([mit] if mit else [])):
            report = injector.apply(self.model)
            try:
                outputs, path = self._outputs(trial, report.fault_map.faults, trial.mitigation)
            finally:
                injector.restore()
        labels = self.ev.labels if any(m in trial.metrics for m in ("auc", "logloss")) else None
        golden = self.golden if "rmse" in trial.metrics else None
        base = self.baseline(trial.mitigation, labels is not None, golden is not None)
        got = base if path == "clean" else metrics.score(outputs, labels, golden)
        extra = {"path": path, **report.protection}
        if mit is not None:
            extra.update({k: v for k, v in mit.stats.items() if not isinstance(v, dict)})
        return self._row(
            trial,
            started,
            status="ok",
            n_faults=report.n_faults,
            n_invalid=got["n_invalid"],
            n_outputs=got["n"],
            auc=got.get("auc"),
            auc_valid=got.get("auc_valid"),
            invalid_frac=got.get("invalid_frac", got["n_invalid"] / max(got["n"], 1)),
            logloss=got.get("logloss"),
            rmse=got.get("rmse"),
            rmse_valid=got.get("rmse_valid"),
            baseline_auc=base.get("auc"),
            baseline_rmse=base.get("rmse"),
            extra=extra,
        )

    def _row(self, trial: Trial, started: float, **values) -> TrialRow:
        finished = time.time()
        error = trial.error
        return TrialRow(
            trial_id=trial.trial_id,
            model=trial.model,
            model_label=self.ev.label,
            dataset=self.ev.dataset,
            target=trial.target,
            params=trial.target_spec.get("params", "all"),
            site=trial.site,
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
