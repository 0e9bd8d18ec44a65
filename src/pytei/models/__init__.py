"""Model zoo: the paper's dummy model (Sec. 5.1), its five pytorch-fm CTR models (Sec. 6.1), DLRM, and
on TorchRec (the extra ``pytei[torchrec]``) DLRM and MLPerf DLRMv2's DCN-v2 (``torchrec_zoo``).

Models are registered by name, timm-style::

    model = pytei.models.create("dfm", field_dims=[6041, 3953])
    clone = pytei.models.create(model.name, **model.config)   # how checkpoints are rebuilt

Every model has a class attribute ``input_layout`` (see ``INPUT_LAYOUTS``), returns raw logits of
shape ``[batch]``, and tags its parts with ``pytei_component`` for the injector.
"""

from __future__ import annotations

from . import dlrm, dummy, fm_family, torchrec_zoo  # noqa: F401 - each registers its models
from ._registry import create, get, names, register
from .dummy import dummy_inputs
from .layers import INPUT_LAYOUTS, RecModel

__all__ = ["INPUT_LAYOUTS", "RecModel", "create", "dummy_inputs", "get", "names", "register"]
