"""Incremental evaluation: per trial, recompute only the graph nodes (and samples) its faults reach.

:class:`IncrementalEvaluator` captures a model's forward with ``torch.fx``, keeps clean node values
within a memory budget, and gives outputs bit-identical to a full evaluation. Models that cannot be
captured are evaluated in full (a warning says so once).
"""

from ._budget import BUDGET_VARIABLE, DEFAULT_FRACTION, available_memory, default_budget, parse_budget
from ._capture import capture, hooked_modules
from ._evaluator import PATHS, CacheReport, IncrementalEvaluator, Outcome

__all__ = [
    "BUDGET_VARIABLE",
    "DEFAULT_FRACTION",
    "PATHS",
    "CacheReport",
    "IncrementalEvaluator",
    "Outcome",
    "available_memory",
    "capture",
    "default_budget",
    "hooked_modules",
    "parse_budget",
]
