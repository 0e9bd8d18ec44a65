"""The embedded default job: a BER sweep on the paper's dummy DRS with synthetic inputs.

For each target (whole model, MLPs, embedding) and BER it injects independent bit flips into the
weights, measures the RMSE of the outputs against the error-free (golden) outputs, restores the
model and checks that it is bit-identical to before. Takes about 10 seconds on one CPU thread
(about 3 of them importing torch and pytei); the model's forward passes dominate the rest.
"""

from __future__ import annotations

import math
import statistics

import torch
from rich.console import Console
from rich.table import Table

from . import models
from .errors import BitFlip
from .exceptions import ArgumentError
from .injector import Injector, parameter_digest
from .metrics import rmse
from .models.dummy import dummy_inputs
from .progress import progress_bar

__all__ = ["run_demo"]

BERS = (1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
TARGETS = ("all", "mlp", "embedding")


def _fmt(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return f"inf/nan x{len(values) - len(finite)}" + (
            f" ({statistics.median(finite):.3g})" if finite else ""
        )
    med = statistics.median(values)
    return "0.0" if med < 0.005 else f"{med:.3g}"


def run_demo(console: Console, *, runs: int = 5, samples: int = 2048, seed: int = 0) -> dict:
    """Run the sweep, print a table of median RMSE per target and BER, and return the numbers."""
    for name, value in (("runs", runs), ("samples", samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArgumentError(f"{name} must be an integer >= 1, got {value!r}")
    model = models.create("dummy", mlp_depth=2, mlp_hidden=256, embed_dim=128, seed=seed).eval()
    dense, sparse = dummy_inputs(samples, sparsity=0.01, seed=seed)
    with torch.no_grad():
        golden = model(dense, sparse)
    digest = parameter_digest(model)
    results: dict[tuple[str, float], list[float]] = {}
    flips: dict[tuple[str, float], list[int]] = {}
    with progress_bar() as bar:
        task = bar.add_task("dummy DRS sweep", total=len(TARGETS) * len(BERS) * runs)
        for target in TARGETS:
            for ber in BERS:
                for run in range(runs):
                    injector = Injector(BitFlip(ber), target=target, params="weight", seed=run)
                    report = injector.apply(model)
                    try:
                        with torch.no_grad():
                            out = model(dense, sparse)
                    finally:
                        injector.restore()
                    results.setdefault((target, ber), []).append(rmse(out, golden)["rmse"])
                    flips.setdefault((target, ber), []).append(report.n_faults)
                    bar.advance(task)
    restored = parameter_digest(model) == digest
    table = Table(
        title=f"Dummy DRS (MLP 2x256, embedding 128, sparsity 0.01): median output RMSE over {runs} runs"
    )
    table.add_column("BER", justify="right")
    for target in TARGETS:
        table.add_column(f"{target}: RMSE", justify="right")
        table.add_column("flips", justify="right")
    for ber in BERS:
        row = [f"{ber:.0e}"]
        for target in TARGETS:
            row += [_fmt(results[target, ber]), f"{statistics.median(flips[target, ber]):,.0f}"]
        table.add_row(*row)
    console.print(table)
    console.print(
        f"model restored bit-exactly after {len(TARGETS) * len(BERS) * runs} trials: "
        + ("[green]yes[/green]" if restored else "[red]NO[/red]")
    )
    if not restored:
        raise RuntimeError("the model's parameters changed after restore: this is a pytei bug")
    return {"rmse": results, "flips": flips, "restored": restored}
