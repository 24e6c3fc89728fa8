"""``shardckpt.load``'s orchestration: every rank plans alone from the manifest.

``dcp.load`` builds DCP ``Metadata`` (one Python object per stored slice) on
every rank, gathers every rank's load plan to the coordinator and scatters it
back: O(world x tensors) objects per rank and on the wire. A shardckpt load
needs none of it: each rank checks its state_dict against the manifest, finds
the slices overlapping its own local chunks by arithmetic on each tensor's
grid (``TensorEntry.overlapping``), reads them (looking each up in its writer's
index on first use) and only a success/failure status is exchanged. When
replicated pieces are to be read once and shared (``knobs.shared_reads``), the
local plans do go to the coordinator, which assigns each shared piece a reader
(``io/shared_reads.py``).

Call order: [all] read manifest → status; [all] plan locally → status;
([coord] shared-read plan, scattered); [all] read_data → status.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
from torch.distributed.checkpoint.stateful import Stateful

from ..collectives import Group
from ..compat import local_chunks
from ..dcp.planner import SafeLoadPlanner, compare_state_dict, mismatch_error
from ..dcp.reader import ShardckptReader, shares_reads
from ..errors import CheckpointReadError
from ..format.manifest import Manifest, TensorEntry
from ..knobs import Knobs
from ..store import CheckpointDir

__all__ = ["load_state_dict", "plan_local_load", "tensor_reads"]


def load_state_dict(state_dict: dict[str, Any], path: str | os.PathLike[str], strict: bool,
                    group: Group, process_group: Any, storage_options: dict[str, Any] | None,
                    knobs: Knobs) -> None:
    where = os.fspath(path)
    manifest = group.run("reading the manifest",
                         lambda: CheckpointDir.at(path, storage_options, knobs).read_manifest(), CheckpointReadError)
    reader = ShardckptReader(path, manifest=manifest, storage_options=storage_options,
                             process_group=process_group, knobs=knobs)
    planner = SafeLoadPlanner(strict=strict)
    # Stateful values load as DCP loads them: into their state_dict, handed back only
    # after every rank's read succeeded
    flat = {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state_dict.items()}

    def local() -> LoadPlan:
        # A Metadata without slices: the planner's own bookkeeping (flattening, mappings)
        # needs one; what is stored is in the manifest.
        planner.set_up_planner(flat, Metadata({}), group.is_coordinator)
        reader.set_up_storage_reader(Metadata({}), group.is_coordinator, rank=group.rank)
        return plan_local_load(planner, manifest, strict)

    if shares_reads(reader):
        plan = group.gather_scatter(f"planning the load from {where}",
                                    lambda: reader.prepare_local_plan(local()),
                                    reader.prepare_global_plan, CheckpointReadError)
    else:
        plan = group.run(f"planning the load from {where}", local, CheckpointReadError)
    # read_data may run collectives (shared reads): bounded and typed like every other one
    with group.guard(f"load from {where}", CheckpointReadError, lost_contact=False):
        group.run(f"load from {where}", lambda: reader.read_data(plan, planner).wait(), CheckpointReadError)
    for k, v in state_dict.items():
        if isinstance(v, Stateful):
            v.load_state_dict(flat[k])
        else:
            state_dict[k] = flat[k]  # values the load replaced (non-tensors)


def plan_local_load(planner: SafeLoadPlanner, manifest: Manifest, strict: bool) -> LoadPlan:
    """This rank's reads: the stored slices that overlap each of its local chunks."""
    sd = planner.state_dict
    entries = manifest.entries
    missing, unexpected, mismatched = compare_state_dict(
        sd, {k: (e.shape, e.dtype) if isinstance(e, TensorEntry) else None for k, e in entries.items()})
    if mismatched or (strict and (missing or unexpected)):
        raise mismatch_error(missing, unexpected if strict else [], mismatched)
    items: list[ReadItem] = []
    for key, value in sd.items():
        e = entries.get(key)
        if e is None:
            continue
        if not isinstance(e, TensorEntry):
            items.append(ReadItem(LoadItemType.BYTE_IO, MetadataIndex(key), torch.Size([0]),
                                  MetadataIndex(key), torch.Size([0]), torch.Size([0])))
            continue
        items += tensor_reads(key, e, local_chunks(value))
    return LoadPlan(items)


def tensor_reads(key: str, e: TensorEntry, chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[ReadItem]:
    """The reads that fill this rank's local ``chunks`` (offsets, sizes) of a tensor:
    one per stored slice each overlaps, found by arithmetic on a grid."""
    items = []
    for n, (lo, size) in enumerate(chunks):
        if e.shape and math.prod(size) == 0:
            continue
        for j in e.overlapping(lo, size) if e.shape else range(e.num_shards):
            s_off, s_size = e.box(j)
            start = tuple(max(a, b) for a, b in zip(lo, s_off))
            end = tuple(min(a + n_, b + m) for a, n_, b, m in zip(lo, size, s_off, s_size))
            items.append(ReadItem(
                LoadItemType.TENSOR,
                MetadataIndex(key, torch.Size(lo), n),
                torch.Size(tuple(a - b for a, b in zip(start, lo))),
                MetadataIndex(key, torch.Size(s_off), j),
                torch.Size(tuple(a - b for a, b in zip(start, s_off))),
                torch.Size(tuple(b - a for a, b in zip(start, end))),
            ))
    return items
