"""The optional TorchRec extra: one check that names what is missing and how to install it."""

from __future__ import annotations

import importlib

from ..exceptions import MissingExtraError
from ._notices import quiet_notices

__all__ = ["INSTALL", "require"]

#: How to install the extra (torchrec 1.8.0 declares the CUDA ``fbgemm-gpu``, so it goes in without its deps).
INSTALL = (
    "pip install -c constraints.txt 'pytei[torchrec]' && pip install -c constraints.txt --no-deps torchrec "
    "(constraints.txt pins torchrec 1.8.0 and fbgemm-gpu-cpu 1.8.0 for torch 2.13)"
)

#: Import name -> distribution of each package the extra brings.
_PACKAGES = {"torchrec": "torchrec", "fbgemm_gpu": "fbgemm-gpu-cpu", "tensordict": "tensordict"}


def require(feature: str = "TorchRec support") -> None:
    """Import the extra's packages, or raise :class:`MissingExtraError` naming the missing one(s)."""
    missing, broken = [], []
    for module, dist in _PACKAGES.items():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:
            missing.append(dist)
        except Exception as err:  # a wheel that fails to load (an undefined symbol), or one that fails while
            # importing (tensordict under ``torch.device("meta")``): say which and why
            first = str(err).splitlines()[0] if str(err) else "?"
            broken.append(f"{dist} ({type(err).__name__}: {first})")
    if missing or broken:
        parts = ([f"missing: {', '.join(missing)}"] if missing else []) + (
            [f"fails to import: {', '.join(broken)}"] if broken else []
        )
        raise MissingExtraError(
            f"{feature} needs the optional extra pytei[torchrec]; {'; '.join(parts)}; install: {INSTALL}"
        )
    quiet_notices()
