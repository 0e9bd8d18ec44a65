"""Training with early stopping, and batched prediction, for the CTR models.

As in the paper (Sec. 6.1, pytorch-fm defaults): Adam (lr 1e-3, weight decay 1e-6), batch 2048
reshuffled every epoch from a seeded generator, BCE on logits; stop once validation AUC has not
improved for ``patience`` epochs, reload the best epoch and report *its* test AUC. With ``build``
for the initial weights, the whole run is a function of ``TrainConfig.seed`` (dropout included).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import metrics, models
from .data import CTRDataset, Split
from .data.dataset import split_sizes
from .exceptions import ArgumentError
from .progress import progress_bar

__all__ = ["TRAIN_AUC_ROWS", "TrainConfig", "TrainResult", "build", "check_device", "fit", "predict"]

#: Training rows scored for the training-set AUC; a larger training set is scored on a fixed
#: (seeded) sample of this many rows, so the cost stays that of one pass over a validation-sized set.
TRAIN_AUC_ROWS = 1_000_000
#: Fewest rows whose 8:1:1 split leaves a validation and a test row.
MIN_ROWS = 10


def check_device(device: str) -> str:
    """``device`` if torch can train on it here, else an ``ArgumentError`` naming it and why."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ArgumentError(
            f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps): {err}"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(f"device {device!r}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ArgumentError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ArgumentError(f"device {device!r}: MPS is not available on this machine; use --device cpu")
    return device


def check_trainable(data: CTRDataset) -> None:
    """Refuse a data set whose validation or test split is empty or of one class: early stopping
    and the scores need an AUC, which needs both a positive and a negative row."""
    n_rows = len(data.train) + len(data.valid) + len(data.test)
    if len(data.valid) == 0 or len(data.test) == 0:
        raise ArgumentError(
            f"{data.name} has {n_rows} rows: the 8:1:1 split needs at least {MIN_ROWS} rows for a "
            f"non-empty validation and test split (sizes now {split_sizes(n_rows)})"
        )
    for name, split in (("validation", data.valid), ("test", data.test)):
        positives = int(split.labels.sum())
        if positives in (0, len(split)):
            raise ArgumentError(
                f"{data.name}: the {name} split ({len(split)} rows) has only one class "
                f"({positives} positive): its AUC is undefined; use more rows or another --split-seed"
            )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and stopping settings."""

    lr: float = 1e-3
    weight_decay: float = 1e-6
    batch_size: int = 2048
    max_epochs: int = 100
    patience: int = 3
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_epochs", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class TrainResult:
    """Outcome of :func:`fit`: the best epoch's model and scores, and per-epoch history."""

    model: nn.Module
    best_epoch: int
    valid_auc: float
    test_auc: float
    test_logloss: float
    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    train_auc: float = math.nan
    train_auc_rows: str = ""

    def summary(self) -> dict:
        return {
            "best_epoch": self.best_epoch,
            "valid_auc": self.valid_auc,
            "test_auc": self.test_auc,
            "train_auc": self.train_auc,
            "train_auc_rows": self.train_auc_rows,
            "test_logloss": self.test_logloss,
            "epochs_run": len(self.history),
            "train": asdict(self.config),
        }


@torch.no_grad()
def predict(
    model: nn.Module, split: Split, batch_size: int = 8192, device: str | None = None
) -> torch.Tensor:
    """Raw logits of ``model`` on every row of ``split`` (eval mode, CPU float32 result)."""
    was_training = model.training
    model.eval()
    target: str | torch.device = device or next(model.parameters()).device
    out = [model(*(t.to(target) for t in inputs)).float().cpu() for inputs, _ in split.batches(batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def _rng_devices(device: str) -> list[int]:
    """CUDA devices whose RNG a seeded run must fork (none for CPU training)."""
    dev = torch.device(device)
    return [dev.index or 0] if dev.type == "cuda" else []


def build(name: str, config: TrainConfig, **model_config) -> nn.Module:
    """A new ``name`` model with weights initialised from ``config.seed`` (the global RNG is left
    as it was): the same seed gives the same initial model in every process."""
    with torch.random.fork_rng(devices=_rng_devices(config.device)):
        torch.manual_seed(config.seed)
        return models.create(name, **model_config)


def _train_sample(train: Split, seed: int) -> tuple[Split, str]:
    """The training rows scored for the training-set AUC, and a description of them for the meta."""
    n = len(train)
    if n <= TRAIN_AUC_ROWS:
        return train, f"all {n} training rows"
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:TRAIN_AUC_ROWS].sort().values
    sample = train.take(rows)
    return sample, f"a fixed sample of {TRAIN_AUC_ROWS} of {n} training rows (seed {seed})"


def fit(
    model: nn.Module, data: CTRDataset, config: TrainConfig | None = None, *, progress: bool = True
) -> TrainResult:
    """Train ``model`` on ``data.train`` with early stopping on ``data.valid`` AUC.

    Each epoch ends with one line ``epoch N: loss L, valid AUC A, T s`` (the progress task's final
    description, printed also when stdout is not a terminal). The result also holds the best
    model's AUC on the training rows (or a fixed sample of them, see ``TRAIN_AUC_ROWS``).
    """
    config = config or TrainConfig()
    check_device(config.device)
    check_trainable(data)
    model.to(config.device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(config.seed)
    best_auc, best_epoch, best_state, stale = -math.inf, -1, None, 0
    history: list[dict] = []
    n_batches = math.ceil(len(data.train) / config.batch_size)
    # Dropout draws from the global RNG: seed a fork of it so training is repeatable.
    with torch.random.fork_rng(devices=_rng_devices(config.device)), progress_bar(enabled=progress) as bar:
        torch.manual_seed(config.seed)
        for epoch in range(config.max_epochs):
            task = bar.add_task(f"epoch {epoch}", total=n_batches)
            began = time.perf_counter()
            model.train()
            total, count = 0.0, 0
            for inputs, labels in data.train.batches(config.batch_size, shuffle=True, generator=gen):
                inputs = tuple(t.to(config.device) for t in inputs)
                labels = labels.to(config.device)
                loss = loss_fn(model(*inputs), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * labels.numel()
                count += labels.numel()
                bar.advance(task)
            valid_auc = metrics.auc(predict(model, data.valid), data.valid.labels)["auc"]
            history.append({"epoch": epoch, "train_loss": total / max(count, 1), "valid_auc": valid_auc})
            seconds = time.perf_counter() - began
            history[-1]["seconds"] = seconds
            bar.update(
                task,
                description=f"epoch {epoch}: loss {total / max(count, 1):.4f}, valid AUC {valid_auc:.4f}, "
                f"{seconds:.1f} s",
            )
            if valid_auc > best_auc:
                best_auc, best_epoch, stale = valid_auc, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if stale >= config.patience:
                    break
    assert best_state is not None  # at least one epoch ran (config.epochs >= 1)
    model.load_state_dict(best_state)
    model.eval()
    logits = predict(model, data.test)
    test = metrics.score(logits, data.test.labels)
    sample, described = _train_sample(data.train, config.seed)
    train_auc = metrics.auc(predict(model, sample), sample.labels)["auc"]
    return TrainResult(
        model, best_epoch, best_auc, test["auc"], test["logloss"], config, history, train_auc, described
    )
