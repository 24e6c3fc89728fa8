"""Plan caching: a save with the same structure as the last one reuses its plan.

Training saves the same state_dict structure every time. When every rank's local
summary (keys, specs and boxes: ``Summary.digest``) equals the one its cached
plan was made from, and every rank's cache comes from the same global planning
(``generation``, a random id the coordinator drew for it), the ranks agree on
this in one all-reduce of three integers and skip the gather, the global
planning and the scatter. Anything else (a changed shape, key, placement, world,
a rank without a cache, a cache from another planning) falls back to full
planning, so a stale plan is never used: a rank only reuses a plan made from its
own current summary, and only together with ranks whose caches came from the
same planning.
"""

from __future__ import annotations

import secrets
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from ..collectives import Group
from ..errors import CheckpointWriteError
from .planning import Assignment, Skeleton, Summary

__all__ = ["CachedPlan", "lookup", "remember", "forget_all", "local_fingerprint", "local_plan", "remember_local"]


@dataclass(frozen=True)
class CachedPlan:
    digest: bytes
    generation: int
    assignment: Assignment
    any_replicated: bool  # over all ranks: whether the replica check has anything to compare
    skeleton: Skeleton | None  # coordinator only
    summaries: tuple[Summary, ...] | None  # coordinator only (the replica check's keys)
    replicated_of: tuple[tuple[int, ...], ...] | None  # coordinator only: per rank, its replicated positions


# Per process group, weakly (collectives.group_key): a plan never outlives its group.
_cache: weakref.WeakKeyDictionary[object, CachedPlan] = weakref.WeakKeyDictionary()


def new_generation() -> int:
    return secrets.randbits(62) + 1


def lookup(group: Group, digest: bytes | None) -> CachedPlan | None:
    """[all, collective] The cached plan if every rank can reuse its own, else None.
    ``digest`` None: this rank's local planning failed (full planning reports it)."""
    cached = _cache.get(group.key)
    usable = cached is not None and digest is not None and cached.digest == digest
    gen = cached.generation if usable and cached is not None else 0
    lo, neg_hi, ok = group.min_over_ranks("agreeing on a cached plan", [gen, -gen, int(usable)],
                                          CheckpointWriteError)
    return cached if ok == 1 and lo == -neg_hi and lo > 0 else None


def remember(group: Group, plan: CachedPlan) -> None:
    _cache[group.key] = plan


def forget_all() -> None:
    """Drop every cached plan (tests; a process that rebuilt its groups)."""
    _cache.clear()
    _local.clear()


# -- this rank's local plan: DCP's create_local_plan, skipped when the flattened
# state_dict has the same structure (what each WriteItem is made of) as last time

_local: weakref.WeakKeyDictionary[object, tuple[tuple[Any, ...], Any]] = weakref.WeakKeyDictionary()


def local_fingerprint(flat: dict[str, Any], mappings: Any) -> tuple[Any, ...] | None:
    """What DCP's local plan of ``flat`` depends on, per key: the key path, and the
    kind, dtype and global shape, and for a DTensor its mesh, placements and local
    shape. None (never cached) for anything else that is a tensor (ShardedTensor,
    subclasses): their plans come from hooks this cannot see."""
    out = []
    meshes: dict[int, tuple[Any, ...]] = {}  # (this call's meshes are alive: their ids are unique here)
    for key, v in flat.items():
        path = tuple(mappings.get(key, (key,))) if isinstance(mappings, dict) else (key,)
        if isinstance(v, DTensor):
            mesh = v.device_mesh
            # the mesh by its ranks, names and our coordinate, not its id(): a new mesh
            # may reuse a freed one's; described once per mesh (a tensor op each time is not free)
            desc = meshes.get(id(mesh))
            if desc is None:
                desc = meshes[id(mesh)] = (tuple(mesh.mesh.flatten().tolist()), tuple(mesh.mesh.shape),
                                           mesh.mesh_dim_names, tuple(mesh.get_coordinate() or ()))
            out.append((key, path, "d", v.dtype, tuple(v.shape), desc, tuple(v.placements),
                        tuple(v.to_local().shape)))
        elif type(v) is torch.Tensor or type(v) is torch.nn.Parameter:
            out.append((key, path, "t", v.dtype, tuple(v.shape)))
        elif isinstance(v, torch.Tensor):
            return None
        else:
            out.append((key, path, "o"))
    return tuple(out)


def local_plan(group: Group, fp: tuple[Any, ...] | None) -> Any:
    hit = _local.get(group.key)
    return hit[1] if fp is not None and hit is not None and hit[0] == fp else None


def remember_local(group: Group, fp: tuple[Any, ...] | None, plan: Any) -> None:
    if fp is not None:
        _local[group.key] = (fp, plan)
