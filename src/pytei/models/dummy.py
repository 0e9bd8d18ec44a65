"""The paper's untrained dummy DRS model and its synthetic inputs (Sec. 5.1, Table 1).

Dense features go through a bottom MLP, the active entries of a binary sparse vector are pooled from
an embedding table, and a predictor MLP maps both to one logit. Weights keep their Kaiming-uniform
initialisation (the paper cites He et al. [21]); the model is never trained.
"""

from __future__ import annotations

import math

import torch
import torch.fx
from torch import nn

from ._registry import register
from .layers import RecModel, ReluMLP, check_batch, check_input, check_int, tag

__all__ = ["DummyModel", "dummy_inputs"]

#: ``a`` of ``kaiming_uniform_``: torch's own default for ``nn.Linear``, i.e. U(-1/sqrt(fan_in), ..).
KAIMING_A = math.sqrt(5)

# Graph leaves under torch.fx.symbolic_trace (see pytei.models.layers).
torch.fx.wrap("check_input")
torch.fx.wrap("check_batch")


@register("dummy")
class DummyModel(RecModel):
    """Bottom MLP over dense features + summed embeddings of active sparse entries -> predictor MLP.

    ``mlp_depth`` hidden ``Linear -> ReLU`` layers of width ``mlp_hidden`` form the bottom MLP; the
    predictor has one such layer, then ``Linear(-> 1)``. ``seed`` makes initialisation deterministic
    without touching the global RNG.
    """

    input_layout = "dummy"

    def __init__(
        self,
        *,
        dense_dim: int = 128,
        sparse_dim: int = 8192,
        mlp_depth: int = 1,
        mlp_hidden: int = 64,
        embed_dim: int = 64,
        seed: int | None = None,
    ) -> None:
        dense_dim, sparse_dim = check_int("dense_dim", dense_dim), check_int("sparse_dim", sparse_dim)
        mlp_hidden, embed_dim = check_int("mlp_hidden", mlp_hidden), check_int("embed_dim", embed_dim)
        mlp_depth = check_int("mlp_depth", mlp_depth)  # the paper's Table 1 has 1 and 2 (campaign specs)
        if seed is not None:
            seed = check_int("seed", seed, minimum=0)
        super().__init__(
            dense_dim=dense_dim,
            sparse_dim=sparse_dim,
            mlp_depth=mlp_depth,
            mlp_hidden=mlp_hidden,
            embed_dim=embed_dim,
            seed=seed,
        )
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        # Module construction draws default inits from the global RNG; fork it so a seeded model
        # leaves the caller's random stream untouched.
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            self.bottom_mlp = ReluMLP(dense_dim, [mlp_hidden] * mlp_depth)
            self.embedding = tag(nn.EmbeddingBag(sparse_dim, embed_dim, mode="sum"), "embedding")
            self.predictor = ReluMLP(mlp_hidden + embed_dim, [mlp_hidden], output_layer=True)
        self._init_kaiming(generator)
        self._set_output_layers(self.predictor[-1])

    @torch.no_grad()
    def _init_kaiming(self, generator: torch.Generator | None) -> None:
        """Kaiming-uniform weights (embedding table included), biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        nn.init.kaiming_uniform_(self.embedding.weight, a=KAIMING_A, generator=generator)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, a=KAIMING_A, generator=generator)
                bound = 1.0 / math.sqrt(module.in_features)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)

    def _pool_active(self, sparse: torch.Tensor) -> torch.Tensor:
        """Sum of the embedding rows of ``sparse``'s nonzero entries, per sample; zeros if none.

        Only active rows are read, so a corrupted row of an inactive entry cannot reach the output.
        """
        rows, cols = sparse.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=sparse.shape[0])
        offsets = torch.cumsum(counts, 0) - counts
        return self.embedding(cols, offsets)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """``dense [B, dense_dim]``, binary ``sparse [B, sparse_dim]`` -> logits ``[B]``."""
        check_input("dense", dense, self._config["dense_dim"])
        check_input("sparse", sparse, self._config["sparse_dim"])
        check_batch(dense, sparse)
        hidden = torch.cat([self.bottom_mlp(dense), self._pool_active(sparse)], dim=1)
        return self.predictor(hidden).squeeze(1)


def dummy_inputs(
    n: int, dense_dim: int = 128, sparse_dim: int = 8192, sparsity: float = 0.001, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic samples as in Sec. 5.1: dense ~ N(0, 1), sparse ~ Bernoulli(sparsity) as 0/1.

    Both are float32 on the CPU, drawn from a local generator seeded with ``seed``.
    """
    n, seed = check_int("n", n), check_int("seed", seed, minimum=0)
    dense_dim, sparse_dim = check_int("dense_dim", dense_dim), check_int("sparse_dim", sparse_dim)
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be a probability in [0, 1], got {sparsity!r}")
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(n, dense_dim, generator=generator, dtype=torch.float32)
    probs = torch.full((n, sparse_dim), float(sparsity), dtype=torch.float32)
    sparse = torch.bernoulli(probs, generator=generator)
    return dense, sparse
