"""Save orchestration over DCP's planner, in two parts so that async save can run
the first (plan; then stage) in the caller and the second (write + commit) in
the background.

Call order, per part (``[all]`` every rank, ``[coord]`` the coordinator):

``plan_save``
  1. [all]   planner.set_up_planner; writer.set_up_storage_writer;
             local plan = writer.prepare_local_plan(planner.create_local_plan())
  2. [coord] gathered plans → planner.create_global_plan (dedups replicas, balanced
             by size) → writer.prepare_global_plan (checks/clears the target,
             assigns shard files) → one plan back to each rank
  3. [all]   planner.finish_plan
``write_and_commit``
  4. [all]   writer.write_items: this rank's shard file, chunked, CRC32C, fsynced
  5. [coord] only if every rank succeeded: writer.finish commits the manifest

Every step gathers errors: a failure anywhere is raised on every rank.
This is what ``torch.distributed.checkpoint.save`` does, minus its single
monolithic call; it uses only DCP's public planner and storage interfaces.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, WriteItem
from torch.distributed.checkpoint.stateful import Stateful

from ._dist import Group
from .dcp.writer import ShardckptWriter
from .errors import CheckpointWriteError

__all__ = ["PlannedSave", "plan_save", "write_and_commit"]

Resolver = Callable[[WriteItem], "torch.Tensor | io.BytesIO"]


@dataclass
class PlannedSave:
    writer: ShardckptWriter
    planner: DefaultSavePlanner
    plan: SavePlan  # this rank's final plan
    metadata: Metadata | None  # the global metadata; coordinator only


def flatten_stateful(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Objects with ``state_dict()`` (``Stateful``) are saved as their state_dict, as DCP does."""
    return {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state_dict.items()}


def plan_save(state_dict: dict[str, Any], writer: ShardckptWriter, group: Group) -> PlannedSave:
    planner = DefaultSavePlanner()
    state_dict = flatten_stateful(state_dict)
    global_md: list[Metadata] = []

    def local() -> SavePlan:
        planner.set_up_planner(state_dict, storage_meta=writer.storage_meta(), is_coordinator=group.is_coordinator)
        writer.set_up_storage_writer(group.is_coordinator)
        return writer.prepare_local_plan(planner.create_local_plan())

    def coordinate(plans: list[SavePlan]) -> list[SavePlan]:
        plans, md = planner.create_global_plan(plans)
        global_md.append(md)
        return writer.prepare_global_plan(plans)

    central = group.reduce_scatter("planning the save", local, coordinate, CheckpointWriteError)
    final = group.run("planning the save", lambda: planner.finish_plan(central), CheckpointWriteError)
    return PlannedSave(writer, planner, final, global_md[0] if global_md else None)


def write_and_commit(planned: PlannedSave, resolve: Resolver, group: Group) -> None:
    def commit(results: list[Any]) -> None:
        if planned.metadata is None:
            raise CheckpointWriteError("commit reached without the global plan's metadata")
        planned.writer.finish(planned.metadata, results)

    group.all_reduce(
        f"saving {planned.writer.path}",
        lambda: planned.writer.write_items(planned.plan, resolve),
        commit,
        CheckpointWriteError,
    )
