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
from dataclasses import dataclass

from ._dist import Group
from ._plan import Assignment, Skeleton, Summary
from .errors import CheckpointWriteError

__all__ = ["CachedPlan", "lookup", "remember", "forget_all"]


@dataclass(frozen=True)
class CachedPlan:
    digest: bytes
    generation: int
    assignment: Assignment
    any_replicated: bool  # over all ranks: whether the replica check has anything to compare
    skeleton: Skeleton | None  # coordinator only
    summaries: tuple[Summary, ...] | None  # coordinator only (the replica check's keys)
    replicated_of: tuple[tuple[int, ...], ...] | None  # coordinator only: per rank, its replicated positions


_cache: dict[tuple[object, int, int], CachedPlan] = {}


def _key(group: Group) -> tuple[object, int, int]:
    return (id(group.group) if group.group is not None else None, group.rank, group.world_size)


def new_generation() -> int:
    return secrets.randbits(62) + 1


def lookup(group: Group, digest: bytes | None) -> CachedPlan | None:
    """[all, collective] The cached plan if every rank can reuse its own, else None.
    ``digest`` None: this rank's local planning failed (full planning reports it)."""
    cached = _cache.get(_key(group))
    usable = cached is not None and digest is not None and cached.digest == digest
    gen = cached.generation if usable and cached is not None else 0
    lo, neg_hi, ok = group.min_over_ranks("agreeing on a cached plan", [gen, -gen, int(usable)],
                                          CheckpointWriteError)
    return cached if ok == 1 and lo == -neg_hi and lo > 0 else None


def remember(group: Group, plan: CachedPlan) -> None:
    _cache[_key(group)] = plan


def forget_all() -> None:
    """Drop every cached plan (tests; a process that rebuilt its groups)."""
    _cache.clear()
