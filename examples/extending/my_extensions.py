"""A pytei plugin: one model, one error model, one mitigation and one metric, each registered by name.

Import it with ``--plugin my_extensions`` (its folder on PYTHONPATH) or ``plugins = ["my_extensions"]``
in a spec; ``extending.toml`` uses all four. README.md ("Extending pytei") walks through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import pytei
from pytei.errors import ErrorModel, Faults, Words
from pytei.sampling import bernoulli_positions


# --- a model ----------------------------------------------------------------------------------------
@pytei.models.register("tiny_mlp")
class TinyMLP(nn.Module):
    """Dense features -> hidden ReLU layer -> one logit."""

    input_layout = "custom"  # its inputs come from example_inputs (see pytei.models.INPUT_LAYOUTS)

    def __init__(self, n_features: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.mlp.pytei_component = "mlp"  # its component, for targets = ["mlp"] and clipping
        self.n_features = n_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(-1)

    def example_inputs(self, n: int, seed: int) -> tuple[torch.Tensor, ...]:
        """``n`` synthetic rows: what a campaign scores the model on (it has no labels)."""
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(n, self.n_features, generator=g, dtype=torch.float32),)


# --- an error model ---------------------------------------------------------------------------------
@pytei.errors.register("ExponentFlip", swept="rate")
@dataclass(frozen=True)
class ExponentFlip(ErrorModel):
    """Each targeted float has the top bit of its exponent flipped with probability ``rate``: the
    value is multiplied by about 2**128 (float32), the fault that breaks recommendation models."""

    rate: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"ExponentFlip rate must lie in [0, 1], got {self.rate!r}")

    def draw_one(self, w: Words, generator: torch.Generator) -> Faults:
        if not w.layout.exponent:
            raise ValueError(f"ExponentFlip needs floating-point tensors; {w.name} is {w.layout.dtype}")
        index = bernoulli_positions(w.numel, self.rate, generator)  # sorted, distinct word indices
        mask = 1 << max(w.layout.exponent)
        return Faults(index, torch.full_like(index, mask))


# --- a mitigation with a parameter ------------------------------------------------------------------
@pytei.mitigation.register("output-clamp")
class OutputClamp(pytei.mitigation.Mitigation):
    """Clamp the model's output to [-limit, limit] (NaN becomes 0): a last line of defence."""

    def __init__(self, limit: float = 10.0) -> None:
        if not limit > 0:
            raise ValueError(f"limit must be > 0, got {limit!r}")
        self.limit = limit
        self.clamped = 0
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def attach(self, model: nn.Module) -> None:
        self._handle = model.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        out = torch.nan_to_num(output, nan=0.0).clamp(-self.limit, self.limit)
        self.clamped += int((out != output).sum())
        return out

    @property
    def stats(self) -> dict:
        return {"clamped": self.clamped}

    def reset_stats(self) -> None:
        self.clamped = 0


# --- a metric ---------------------------------------------------------------------------------------
@pytei.metrics.register("max_abs_error", needs_golden=True, bounds=(0.0, math.inf))
def max_abs_error(outputs: torch.Tensor, labels: torch.Tensor | None, golden: torch.Tensor | None) -> float:
    """Largest |output - clean output| over the rows (inf if any output is NaN or infinite)."""
    assert golden is not None  # needs_golden: pytei passes the clean outputs
    diff = (outputs.double() - golden.double()).abs()
    return math.inf if not bool(torch.isfinite(diff).all()) else float(diff.max())
