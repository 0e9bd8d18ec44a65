"""Campaigns: sweeps of error injections described by a TOML spec and expanded into trials."""

from .plan import Point, Trial, build_error, plan
from .spec import Spec, SpecError, load_spec, parse_spec

__all__ = ["Point", "Spec", "SpecError", "Trial", "build_error", "load_spec", "parse_spec", "plan"]
