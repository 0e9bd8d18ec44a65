"""The incremental evaluator on models outside the zoo: every trial's outputs equal a full evaluation bit for
bit, whatever the model does (in-place ops, tied tables, cross-sample ops, hooks on the root), within its
cache budget (measured), and a model that cannot be captured falls back to full evaluation with one warning.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from pytei import BitFlip
from pytei.incremental import IncrementalEvaluator, parse_budget
from pytei.injector import Injector
from pytei.mitigation import ClipActivations, mitigate

N, BATCH, ROWS = 600, 96, 200


class TwoTower(nn.Module):
    """Embedding bags (offsets computed from the batch) + a dense tower, with in-place ops."""

    def __init__(self, tied: bool = False, cross_sample: bool = False) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.EmbeddingBag(ROWS, 8, mode="sum") for _ in range(3))
        self.other = self.tables[0] if tied else nn.EmbeddingBag(ROWS, 8, mode="sum")
        self.dense = nn.Sequential(nn.Linear(5, 16), nn.ReLU(inplace=True), nn.Linear(16, 8))
        self.head = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 1))
        self.cross_sample = cross_sample

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(sparse.shape[0])
        pooled = [t(sparse[:, k], offsets) for k, t in enumerate(self.tables)]
        extra = self.other(sparse[:, 3], offsets)
        h = self.dense(dense)
        h += extra  # writes into a node's value
        if self.cross_sample:
            h = h - h.mean(0)  # every sample depends on the whole batch
        return self.head(torch.cat([h, extra, *pooled], 1)).squeeze(1)


class Branchy(nn.Module):
    """Python control flow on a tensor's value: symbolic tracing cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 1), nn.Linear(5, 1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return (self.a(dense) if dense.sum() > 0 else self.b(dense)).squeeze(1)


def _batches() -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(N, 5, generator=g)
    sparse = torch.randint(0, ROWS, (N, 4), generator=g)
    return [(dense[i : i + BATCH], sparse[i : i + BATCH]) for i in range(0, N, BATCH)]


@torch.no_grad()
def _full(model: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    return torch.cat([model(*b).float().reshape(-1) for b in batches])


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def _trials(model: nn.Module, ev: IncrementalEvaluator, variant: str = "none", **target) -> Counter:
    """Inject over targets x rates x seeds; assert each outcome equals a full evaluation; count paths."""
    batches, paths = ev.batches, Counter()
    for include in (["tables.*"], ["tables.0.*"], ["dense.*"], ["head.0.*"], ["head.2.*"], None):
        for ber in (1e-6, 2e-5, 1e-4, 3e-3):
            for seed in range(3):
                injector = Injector(BitFlip(ber), include=include, seed=seed, **target)
                report = injector.apply(model)
                try:
                    hooked = list(report.per_activation) if injector.site == "activations" else []
                    outcome = ev.evaluate(variant, report.fault_map.faults, hooked)
                    if injector.site == "activations":  # the same faults again for the reference
                        injector.restore()
                        report = injector.apply(model)
                    full = _full(model, batches)
                finally:
                    injector.restore()
                assert outcome is not None
                assert torch.equal(_bits(outcome.outputs), _bits(full)), (include, ber, seed, outcome.path)
                changed = (_bits(full) != _bits(ev.clean(variant))).nonzero().squeeze(1)
                assert bool(torch.isin(changed, outcome.recomputed).all())  # changed rows are reported
                paths[outcome.path] += 1
                if outcome.narrowed:
                    paths["narrowed"] += 1
    return paths


def _evaluator(model: nn.Module, budget: int | None = None, per_sample: bool = True) -> IncrementalEvaluator:
    model.eval()
    ev = IncrementalEvaluator(model, _batches(), budget=budget)
    ev.prepare("none", _full(model, ev.batches), per_sample=per_sample)
    assert ev.incremental, ev.reason
    return ev


def test_paths_are_exact_with_in_place_ops_and_tied_tables():
    torch.manual_seed(0)
    for tied in (False, True):
        model = TwoTower(tied=tied)
        ev = _evaluator(model)
        paths = _trials(model, ev)
        # a tied table is read by two nodes: its faults re-run both (no per-row shortcut for it)
        assert {"clean", "subgraph"} <= set(paths) and (tied or "samples" in paths), paths
        assert paths["narrowed"], paths  # faults in a few rows of head.0 re-ran a few of its features
        assert _trials(model, ev) == paths  # a second pass: no cached value was written into


def test_cross_sample_model_never_recomputes_sub_batches():
    torch.manual_seed(0)
    model = TwoTower(cross_sample=True)
    ev = _evaluator(model)
    paths = _trials(model, ev)
    assert "samples" not in paths and {"rows", "subgraph"} <= set(paths), paths


def test_activation_faults_and_a_mitigation_variant():
    torch.manual_seed(0)
    model = TwoTower()
    ev = _evaluator(model)
    clip = ClipActivations(-0.05, 0.05, layers=["dense.0", "head.0"])
    with mitigate(model, clip):
        ev.prepare("clip", _full(model, ev.batches), per_sample=True)
        assert not torch.equal(ev.clean("clip"), ev.clean("none"))  # clipping changes clean outputs
        paths = _trials(model, ev, "clip")
        assert "samples" in paths, paths
        activations = _trials(model, ev, "clip", site="activations")
    assert set(activations) == {"subgraph"}


def test_hook_on_the_model_itself():
    torch.manual_seed(0)
    model = TwoTower()
    model.register_forward_hook(lambda m, args, out: out.clamp(-0.1, 0.1))
    ev = _evaluator(model)
    assert "samples" in _trials(model, ev)


def test_budget_is_respected_and_results_stay_exact():
    torch.manual_seed(0)
    model = TwoTower()
    needed = _evaluator(model).cache_report().used
    for budget in (0, needed // 3):
        ev = _evaluator(model, budget=budget)
        report = ev.cache_report()
        assert report.used <= budget and report.dropped, report
        assert "budget" in str(report) and "dropped" in str(report)
        _trials(model, ev)
    roomy = _evaluator(model, budget=2 * needed).cache_report()
    assert roomy.used == needed and not roomy.dropped


def test_untraceable_model_falls_back_with_one_warning():
    model = Branchy().eval()
    batches = _batches()
    ev = IncrementalEvaluator(model, batches)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ev.prepare("none", _full(model, batches))
        ev.prepare("other", _full(model, batches))
    assert len(caught) == 1 and "evaluated in full" in str(caught[0].message)
    assert "\n" not in str(caught[0].message)
    assert not ev.incremental and "torch.fx" in (ev.reason or "")
    injector = Injector(BitFlip(1e-2), seed=0)
    report = injector.apply(model)
    try:
        assert ev.evaluate("none", report.fault_map.faults) is None  # the caller evaluates in full
    finally:
        injector.restore()


def test_budget_parsing():
    assert parse_budget("512MiB") == 512 << 20 and parse_budget("2GB") == 2 * 10**9 and parse_budget("0") == 0
    for bad in ("lots", "-1", "12XB", "150%"):
        with pytest.raises(ValueError, match="is not a size; allowed"):
            parse_budget(bad)
    with pytest.raises(ValueError, match="cache budget must be an int"):
        IncrementalEvaluator(Branchy(), _batches(), budget=-5)
