"""Shared fixtures: small models and helpers to compare tensors bit for bit."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from torch import nn

from pytei.bits import int_view

#: The roofline's measured machine balance is cached per user; the suite keeps its own (children inherit it).
os.environ.setdefault("PYTEI_CACHE_DIR", tempfile.mkdtemp(prefix="pytei-test-cache-"))

#: The smallest campaign spec: one dummy model, one BER, one run (CLI tests).
TINY_SPEC = """name = "tiny"
runs = 1
metrics = ["rmse"]

[[models]]
dummy = { mlp_depth = 1, mlp_hidden = 64, embed_dim = 64, sparsity = 0.01 }
samples = 32

[errors]
model = "BitFlip"
rates = [1e-5]
"""


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Integer-view copies of every parameter and buffer (NaN-safe, bit-exact comparison)."""
    out = {n: int_view(p.detach()).clone() for n, p in model.named_parameters()}
    out.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


def assert_bit_identical(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    now = snapshot(model)
    assert now.keys() == snap.keys()
    for name, before in snap.items():
        assert torch.equal(now[name], before), f"{name} differs from its snapshot"


class TinyRec(nn.Module):
    """A small recommendation-shaped model: embedding bag, bottom MLP with BatchNorm, head."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = nn.EmbeddingBag(500, 8, mode="sum")
        self.bottom = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.top = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, dense: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        e = self.emb(idx)
        return self.top(torch.cat([self.bottom(dense), e], 1)).squeeze(1)


@pytest.fixture
def tiny() -> TinyRec:
    return TinyRec().eval()


class ScaledLinear(nn.Module):
    """A module with a parameter of its own that no ABFT check describes (``scale``) around a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x * self.scale)
