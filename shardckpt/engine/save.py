"""Save orchestration over DCP's planner, in two parts so that async save can run
the first (plan; then stage) in the caller and the second (write + commit) in
the background.

Call order, per part (``[all]`` every rank, ``[coord]`` the coordinator):

``plan_save``
  1. [all]   DCP's planner.set_up_planner; local plan = planner.create_local_plan()
             (skipped when the state_dict's structure is unchanged: ``plan_cache``),
             summarized compactly (``planning.summarize``)
  2. [coord] gathered summaries → ``planning.plan_globally`` (dedups replicas,
             balanced by bytes, detects grids) → ``SaveTarget.begin`` (checks/clears
             the target, writes the shared-storage probe) → one assignment back to
             each rank (or, with a cached plan, only the save id and probe)
  3. [all]   planner.finish_plan; ``SaveTarget.check_shared`` (the coordinator's
             probe is visible: ranks on a node-local path fail here, before any
             byte of data is written); with ``check_replicas`` on, each rank's
             CRC32C of the items several ranks hold goes to the coordinator, which
             raises (or warns) if copies differ (``replicas``); else only the status
``write_and_commit``
  4. [all]   ``SaveTarget.write_assigned``: this rank's shard file, chunked,
             CRC32C, made durable, then its index
  5. [coord] only if every rank succeeded: ``SaveTarget.commit_assigned`` commits
             the manifest

Every step gathers errors: a failure anywhere is raised on every rank, and the
coordinator then removes what the failed save left (its probe, its files, an
otherwise empty directory; ``CheckpointDir.abandon``).
This is what ``torch.distributed.checkpoint.save`` does, with shardckpt's own
global planning; of DCP it uses only the public local planner.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, WriteItem
from torch.distributed.checkpoint.stateful import Stateful

from .. import knobs as knobs_mod
from ..backends import check_storage_options
from ..collectives import Failed, Group, attempt
from ..errors import CheckpointWriteError, ShardckptError
from ..format import jsoncodec
from ..format.codec import Compression
from ..format.codec import resolve as resolve_compression
from ..io.manifest_builder import RankWritten, Skeleton, assigned_target
from ..io.save_target import SaveTarget
from . import plan_cache
from .planning import Assignment, Summary, plan_globally, summarize
from .replicas import (
    CheckReplicas,
    ReplicaDivergenceWarning,
    check_mode,
    divergence_of,
    fingerprints,
    replica_key,
)

__all__ = ["SaveRequest", "PlannedSave", "plan_save", "write_and_commit", "save_with", "typed_save_errors"]


@dataclass(frozen=True)
class SaveRequest:
    """Everything a save was asked for, fixed at call time and shared by ``save``,
    ``async_save`` and the writer. ``knobs`` is the snapshot the whole save runs
    under, so ``knobs.override()`` around ``async_save`` also governs the part
    that runs later on the background thread."""

    path: str
    overwrite: bool = False
    metadata: Mapping[str, Any] = field(default_factory=dict)
    compression: None | str | Compression = "auto"
    storage_options: Mapping[str, Any] | None = None
    check_replicas: CheckReplicas = "error"
    knobs: knobs_mod.Knobs = field(default_factory=knobs_mod.get)

    @classmethod
    def make(
        cls,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        metadata: Mapping[str, Any] | None = None,
        compression: None | str | Compression = "auto",
        storage_options: Mapping[str, Any] | None = None,
        check_replicas: CheckReplicas = "error",
        knobs: knobs_mod.Knobs | None = None,
    ) -> SaveRequest:
        if metadata is not None:
            try:  # stored as JSON: kept as it will read back (tuples as lists)
                metadata = jsoncodec.as_stored(dict(metadata), "metadata")
            except jsoncodec.JsonValueError as e:
                raise TypeError(f"save(metadata=...) must be JSON-serializable: {e}") from None
        if compression != "auto":
            resolve_compression(compression)  # a bad argument is a usage error, raised here
        check_storage_options(storage_options)
        return cls(os.fspath(path), bool(overwrite), dict(metadata or {}), compression,
                   dict(storage_options) if storage_options is not None else None,
                   check_mode(check_replicas), knobs if knobs is not None else knobs_mod.get())

    def target(self) -> SaveTarget:
        return SaveTarget(self.path, overwrite=self.overwrite, metadata=self.metadata,
                          compression=self.compression, storage_options=self.storage_options, knobs=self.knobs)


@contextmanager
def typed_save_errors(what: str) -> Iterator[None]:
    """Single-process failures (I/O errors, ...) get the save's type too, as the
    gathered multi-rank ones do."""
    try:
        yield
    except ShardckptError:
        raise
    except Exception as e:
        raise CheckpointWriteError(f"{what} failed: {type(e).__name__}: {e}") from e

Resolver = Callable[[WriteItem], "torch.Tensor | io.BytesIO"]


@dataclass
class PlannedSave:
    target: SaveTarget
    planner: DefaultSavePlanner
    plan: SavePlan  # this rank's final plan
    skeleton: Skeleton | None  # the manifest's structure; coordinator only


def flatten_stateful(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Objects with ``state_dict()`` (``Stateful``) are saved as their state_dict, as DCP does."""
    return {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state_dict.items()}


def plan_save(
    state_dict: dict[str, Any], target: SaveTarget, group: Group, check_replicas: CheckReplicas = "error"
) -> PlannedSave:
    planner = DefaultSavePlanner()
    state_dict = flatten_stateful(state_dict)

    def local() -> tuple[SavePlan, Summary]:
        planner.set_up_planner(state_dict, storage_meta=StorageMeta(checkpoint_id=target.path),
                               is_coordinator=group.is_coordinator)
        # DCP's local planning costs ~0.1 ms a DTensor; the same structure gives the same plan
        fp = plan_cache.local_fingerprint(planner.state_dict, planner.mappings)
        hit = plan_cache.local_plan(group, fp)
        if hit is not None:
            return hit
        plan = planner.create_local_plan()
        out = (plan, summarize(plan))
        plan_cache.remember_local(group, fp, out)
        return out

    mine = attempt(local)  # a failure is reported by the full planning's gather
    with _abandon_on_failure(target, group):
        cached = plan_cache.lookup(group, None if isinstance(mine, Failed) else mine[1].digest())
        if cached is None:
            cached, save_id, probe = _plan_fully(mine, target, group)
        else:  # same structure on every rank: only the per-save parts (target, id, probe)
            def begin(_: list[None]) -> tuple[str, str | None]:
                probe = target.begin(group.world_size)
                return target.save_id, probe

            save_id, probe = group.gather_broadcast("planning the save", lambda: None, begin,
                                                    CheckpointWriteError)
        target.adopt(save_id)
        local_plan, assignment = mine[0], cached.assignment  # type: ignore[index]
        plan = planner.finish_plan(SavePlan(
            [local_plan.items[int(p)] for p in assignment.positions],
            storage_data=assigned_target(save_id, group.rank, probe, assignment.key_nos, assignment.boxes),
            planner_data=local_plan.planner_data))

        def finish() -> list[int]:
            target.check_shared(plan.storage_data, group.rank)
            return fingerprints(planner, local_plan, assignment.replicated)

        def compare(crcs: list[list[int]]) -> str | None:
            if cached is None or cached.summaries is None or cached.replicated_of is None:
                raise CheckpointWriteError("the replica check ran without the coordinator's plan")
            held = [[replica_key(s, p) for p in pos] for s, pos in zip(cached.summaries, cached.replicated_of)]
            found = divergence_of(held, crcs)
            if found is not None and check_replicas == "error":
                raise CheckpointWriteError(found.message(), key=next(iter(found.keys)))
            return found.message() if found is not None else None

        if check_replicas == "off" or not cached.any_replicated:
            group.run("planning the save", lambda: target.check_shared(plan.storage_data, group.rank),
                      CheckpointWriteError)
        else:
            warning = group.gather_broadcast("checking replicas", finish, compare, CheckpointWriteError)
            if warning is not None and group.is_coordinator:
                warnings.warn(warning, ReplicaDivergenceWarning, stacklevel=3)
    return PlannedSave(target, planner, plan, cached.skeleton)


def _plan_fully(mine: Any, target: SaveTarget, group: Group) -> tuple[plan_cache.CachedPlan, str, str | None]:
    """Gather every rank's summary, plan globally, scatter the assignments; cache the result."""
    kept: list[Any] = []  # coordinator: the skeleton and the summaries

    def local() -> Summary:
        if isinstance(mine, Failed):
            raise mine.exc
        return mine[1]

    def coordinate(gathered: list[Summary]) -> list[tuple[Assignment, str, str | None, bool, int]]:
        assignments, skel = plan_globally(gathered)
        kept.extend([skel, tuple(gathered), assignments])
        probe = target.begin(len(gathered))
        any_rep = any(a.replicated for a in assignments)
        generation = plan_cache.new_generation()
        return [(a, target.save_id, probe, any_rep, generation) for a in assignments]

    assignment, save_id, probe, any_rep, generation = group.gather_scatter(
        "planning the save", local, coordinate, CheckpointWriteError)
    cached = plan_cache.CachedPlan(
        mine[1].digest(), generation, assignment, any_rep, kept[0] if kept else None,
        kept[1] if kept else None, tuple(a.replicated for a in kept[2]) if kept else None)
    plan_cache.remember(group, cached)
    return cached, save_id, probe


@contextmanager
def _abandon_on_failure(target: SaveTarget, group: Group) -> Iterator[None]:
    """A save that fails on any rank leaves nothing behind: the coordinator removes
    its probe and files once every rank has raised the gathered error."""
    try:
        yield
    except BaseException:
        if group.is_coordinator:
            target.abandon()
        raise


def write_and_commit(planned: PlannedSave, resolve: Resolver, group: Group) -> None:
    def commit(written: list[RankWritten]) -> None:
        if planned.skeleton is None:
            raise CheckpointWriteError("commit reached without the global plan")
        planned.target.commit_assigned(planned.skeleton, written)

    with _abandon_on_failure(planned.target, group):
        group.gather_broadcast(
            f"saving {planned.target.path}",
            lambda: planned.target.write_assigned(planned.plan, resolve),
            commit,
            CheckpointWriteError,
        )


def save_with(state_dict: dict[str, Any], request: SaveRequest, process_group: Any = None) -> None:
    """A synchronous save of ``request`` over ``process_group``, every thread of it
    under the request's knobs (``shardckpt.save``, the tiers' saves)."""
    group = Group(process_group, request.knobs)
    with typed_save_errors(f"save to {request.path}"):
        planned = plan_save(state_dict, request.target(), group, request.check_replicas)
        write_and_commit(planned, planned.planner.resolve_data, group)
