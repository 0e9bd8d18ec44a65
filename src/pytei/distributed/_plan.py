"""Sharding strategies: a named table-to-host mapping turned into TorchRec's sharding plan.

Lui et al. ("Understanding Capacity-Driven Scale-Out Neural Recommendation Inference") compare
table-to-server mappings; TorchRec's planner builds them from per-table constraints. pytei names:

* ``table_wise``: each table whole on one host (tables spread over hosts);
* ``column_wise``: each table's columns split over hosts;
* ``table_column_wise``: column shards placed host by host (within a node: as ``column_wise`` on one);
* ``data_parallel``: every table replicated on every host;
* ``row_wise``: each table's rows split over hosts; TorchRec's planner offers it only for GPUs.
"""

from __future__ import annotations

from typing import Any

from ..exceptions import ArgumentError

__all__ = ["GPU_ONLY", "STRATEGIES", "check_strategy", "sharding_plan"]

#: Strategies pytei shards by, in the order reports list them.
STRATEGIES = ("table_wise", "column_wise", "table_column_wise", "data_parallel", "row_wise")
#: Strategies TorchRec's planner refuses on CPUs (its row-wise kernels need a GPU).
GPU_ONLY = ("row_wise",)
#: Share of each host's memory the planner keeps for dense tensors and inputs (TorchRec's default).
RESERVED = 0.15
#: Column shards are at least this wide (TorchRec's ``min_partition``): a 16-wide table splits in two.
MIN_PARTITION = 8


def check_strategy(strategy: Any, device: str = "cpu") -> str:
    """``strategy`` if pytei can shard by it on ``device``; else an ``ArgumentError`` that says why."""
    if strategy not in STRATEGIES:
        raise ArgumentError(f"unknown sharding strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    if strategy in GPU_ONLY and device != "cuda":
        raise ArgumentError(
            f"sharding strategy {strategy!r} needs GPUs: TorchRec's planner has no CPU kernel for it "
            f"(on CPU, use one of {', '.join(s for s in STRATEGIES if s not in GPU_ONLY)})"
        )
    return str(strategy)


def sharding_plan(model: Any, strategy: str, world_size: int, device: str, group: Any) -> Any:
    """TorchRec's plan sharding every table of ``model``'s collections by ``strategy`` over
    ``world_size`` ranks (collective: every rank calls it)."""
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.planner.types import (
        KernelConfig,
        ParameterConstraints,
        TopologyFactory,
        TrainerConfig,
    )
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    check_strategy(strategy, device)
    kernel = EmbeddingComputeKernel.DENSE if strategy == "data_parallel" else EmbeddingComputeKernel.FUSED
    constraints = {
        cfg.name: ParameterConstraints(
            sharding_types=[strategy], compute_kernels=[kernel.value], min_partition=MIN_PARTITION
        )
        for m in model.modules()
        if isinstance(m, EmbeddingBagCollection)
        for cfg in m.embedding_bag_configs()
    }
    if not constraints:
        raise ArgumentError(f"{type(model).__name__} has no TorchRec EmbeddingBagCollection to shard")
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size), kernel_config=KernelConfig(compute_device=device)
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(RESERVED),  # the heuristic one warns
    )
    return planner.collective_plan(model, [EmbeddingBagCollectionSharder()], group)
