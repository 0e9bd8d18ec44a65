"""Training with early stopping, and batched prediction, for the CTR models.

As in the paper (Sec. 6.1, pytorch-fm defaults): Adam (lr 1e-3, weight decay 1e-6), batch 2048
reshuffled every epoch from a seeded generator, BCE on logits; stop once validation AUC has not
improved for ``patience`` epochs, reload the best epoch and report *its* test AUC. With ``build``
for the initial weights, the whole run is a function of ``TrainConfig.seed`` (dropout included).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import metrics, models
from .data import CTRDataset, Split
from .progress import progress_bar

__all__ = ["TrainConfig", "TrainResult", "build", "fit", "predict"]


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
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


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

    def summary(self) -> dict:
        return {
            "best_epoch": self.best_epoch,
            "valid_auc": self.valid_auc,
            "test_auc": self.test_auc,
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


def fit(
    model: nn.Module, data: CTRDataset, config: TrainConfig | None = None, *, progress: bool = True
) -> TrainResult:
    """Train ``model`` on ``data.train`` with early stopping on ``data.valid`` AUC."""
    config = config or TrainConfig()
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
            bar.update(
                task, description=f"epoch {epoch}: loss {total / max(count, 1):.4f} valid AUC {valid_auc:.4f}"
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
    return TrainResult(model, best_epoch, best_auc, test["auc"], test["logloss"], config, history)
