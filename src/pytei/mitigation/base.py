"""What every compute-side mitigation shares: reversible attachment and default layer choice.

Compute-side mitigations (clipping, ABFT) act on layer outputs through forward hooks rather than
by swapping modules: parameter names stay the same with and without them, so a trial's faults
(seeded per parameter name) are identical across mitigations and comparisons are paired.
Injected compute faults use prepended hooks, so a mitigation always sees the corrupted output.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar, TypeAlias

import torch
from torch import nn

from ..targets import components

__all__ = ["Batches", "Mitigation", "mitigate", "hidden_linears", "input_batches", "output_layers"]

#: Clean data for profiling and calibration: batches, each a tensor (the input of a one-input model)
#: or a tuple of tensors (the inputs of ``model(*inputs)``); a bare tensor is one batch.
Batches: TypeAlias = torch.Tensor | Iterable[torch.Tensor | Sequence[torch.Tensor]]


def _is_input(value: object) -> bool:
    """A model input: a tensor, or one of torchrec's sparse batches (a ``KeyedJaggedTensor``)."""
    return isinstance(value, torch.Tensor) or type(value).__module__.startswith("torchrec.sparse")


def input_batches(batches: Batches, what: str) -> list[tuple[torch.Tensor, ...]]:
    """``batches`` (see ``Batches``) as input tuples for ``model(*inputs)``; a ``TypeError`` naming
    ``what`` (the caller) and the bad batch otherwise."""
    need = (
        "each batch must be a tensor (one-input model) or a tuple of tensors or KeyedJaggedTensors "
        "(model(*inputs))"
    )
    if isinstance(batches, torch.Tensor):
        return [(batches,)]
    if isinstance(batches, str | bytes | dict) or not isinstance(batches, Iterable):
        raise TypeError(f"{what} takes an iterable of batches; {need}; got {type(batches).__name__}")
    out: list[tuple[torch.Tensor, ...]] = []
    for i, batch in enumerate(batches):
        if isinstance(batch, torch.Tensor):
            out.append((batch,))
        elif isinstance(batch, tuple | list) and batch and all(_is_input(t) for t in batch):
            out.append(tuple(batch))
        else:
            kind = type(batch).__name__
            if isinstance(batch, tuple | list):
                kind += f" of ({', '.join(type(t).__name__ for t in batch)})"
            raise TypeError(f"{what}: batch {i} is a {kind}; {need}")
    return out


def hidden_linears(
    model: nn.Module, component: Sequence[str] = ("mlp", "attention"), layers: Sequence[str] | None = None
) -> dict[str, nn.Module]:
    """Linear layers to protect, by name: explicit ``layers``, or every Linear of the given
    components except the model's output layer(s) (``model.output_layers``, else the last Linear).

    A declared output layer that is not a module of ``model`` is a ``ValueError``: clipping the
    logit instead of a hidden layer would go unnoticed otherwise.
    """
    modules = dict(model.named_modules())
    if layers is not None:
        missing = [n for n in layers if n not in modules]
        if missing:
            raise ValueError(f"no module named {missing} in {type(model).__name__}")
        return {n: modules[n] for n in layers}
    comps = components(model)
    linears: dict[str, nn.Module] = {n: m for n, m in modules.items() if isinstance(m, nn.Linear)}
    output = set(output_layers(model, linears))
    chosen: dict[str, nn.Module] = {
        n: m for n, m in linears.items() if n not in output and comps.get(f"{n}.weight") in tuple(component)
    }
    return chosen  # may be empty: pytorch-fm's FM has no hidden layer at all


def output_layers(model: nn.Module, linears: dict[str, nn.Module] | None = None) -> tuple[str, ...]:
    """Names of ``model``'s output layers: its declared ``output_layers``, else its last Linear.

    ``linears`` (the model's Linear layers by name) saves a walk over the model when known.
    """
    if linears is None:
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    declared = getattr(model, "output_layers", ())
    if not isinstance(declared, tuple | list) or not all(isinstance(n, str) for n in declared):
        raise TypeError(
            f"{type(model).__name__}.output_layers must be a tuple of module names, got {declared!r}"
        )
    if not declared:
        return tuple(linears)[-1:]
    modules = dict(model.named_modules())
    missing = [n for n in declared if n not in modules]
    if missing:
        raise ValueError(
            f"{type(model).__name__}.output_layers names {missing}, not modules of this model; "
            f"its Linear layers: {', '.join(linears) or 'none'}"
        )
    return tuple(declared)


class Mitigation(ABC):
    """A compute-side mitigation that wraps a model while attached.

    Subclasses that count what they do report it in ``stats`` and zero it in ``reset_stats``:
    counters accumulate over attachments until reset, and campaigns reset before every trial.
    """

    #: Whether it treats every sample of a batch on its own (clipping, row checksums), so that the
    #: incremental evaluator may recompute a few samples as a sub-batch; False unless declared.
    per_sample: ClassVar[bool] = False

    @abstractmethod
    def attach(self, model: nn.Module) -> None:
        """Start acting on ``model`` (register hooks). Parameters are never modified."""

    @abstractmethod
    def detach(self) -> None:
        """Stop acting: the model behaves exactly as before ``attach``."""

    @property
    def stats(self) -> dict:
        """What the mitigation did since it was created or ``reset_stats`` was last called (counters)."""
        return {}

    def reset_stats(self) -> None:  # noqa: B027 - optional hook: a no-op for mitigations without counters
        """Zero the counters ``stats`` reports (configuration, such as calibrated bounds, is kept).

        The base class keeps no counters, so this does nothing; a mitigation that counts overrides it.
        """


@contextmanager
def mitigate(model: nn.Module, *mitigations: Mitigation) -> Iterator[tuple[Mitigation, ...]]:
    """Run the block with ``mitigations`` attached to ``model``; detach on exit, whatever happens.

    >>> with pytei.mitigate(model, ClipActivations()), pytei.inject(model, BitFlip(1e-5), seed=0):
    ...     out = model(x)
    """
    attached: list[Mitigation] = []
    try:
        for m in mitigations:
            if not isinstance(m, Mitigation):
                raise TypeError(f"mitigate() takes pytei Mitigation objects, got {m!r}")
            m.attach(model)
            attached.append(m)
        yield mitigations
    finally:
        for m in reversed(attached):
            m.detach()
