"""Save orchestration over DCP's planner, in two parts so that async save can run
the first (plan; then stage) in the caller and the second (write + commit) in
the background.

Call order, per part (``[all]`` every rank, ``[coord]`` the coordinator):

``plan_save``
  1. [all]   planner.set_up_planner; writer.set_up_storage_writer;
             local plan = writer.prepare_local_plan(planner.create_local_plan())
  2. [coord] gathered plans → planner.create_global_plan (dedups replicas, balanced
             by size) → writer.prepare_global_plan (checks/clears the target,
             writes the shared-storage probe, assigns shard files) → one plan
             back to each rank
  3. [all]   planner.finish_plan; writer.check_shared (the coordinator's probe is
             visible: ranks on a node-local path fail here, before any byte of
             data is written); with ``check_replicas`` on, each rank's CRC32C of
             the items several ranks hold goes to the coordinator, which raises
             (or warns) if copies differ (``_replicas``); else only the status
``write_and_commit``
  4. [all]   writer.write_items: this rank's shard file, chunked, CRC32C, fsynced
  5. [coord] only if every rank succeeded: writer.finish commits the manifest

Every step gathers errors: a failure anywhere is raised on every rank, and the
coordinator then removes what the failed save left (its probe, its files, an
otherwise empty directory; ``CheckpointDir.abandon``).
This is what ``torch.distributed.checkpoint.save`` does, minus its single
monolithic call; it uses only DCP's public planner and storage interfaces.
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
from torch.distributed.checkpoint.planner import SavePlan, WriteItem
from torch.distributed.checkpoint.stateful import Stateful

from .. import knobs
from ..backends import check_storage_options
from ..collectives import Group, _attempt, _Failed
from ..dcp.writer import RankWritten, ShardckptWriter, assigned_target
from ..errors import CheckpointWriteError, ShardckptError
from ..format import jsoncodec
from ..format.codec import Compression
from ..format.codec import resolve as resolve_compression
from . import plan_cache as _plan_cache
from .planning import Assignment, Skeleton, Summary, plan_globally, summarize
from .replicas import (
    CheckReplicas,
    ReplicaDivergenceWarning,
    check_mode,
    divergence_of,
    fingerprints,
    replica_key,
)

__all__ = ["SaveRequest", "PlannedSave", "plan_save", "write_and_commit", "typed_save_errors"]


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
    knobs: knobs.Knobs = field(default_factory=knobs.get)

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
    ) -> SaveRequest:
        if metadata is not None:
            try:  # stored as JSON: kept as it will read back (tuples as lists)
                metadata = jsoncodec.from_safe(jsoncodec.to_safe(dict(metadata), "metadata", tuples=True))
            except (jsoncodec.JsonValueError, RecursionError) as e:
                raise TypeError(f"save(metadata=...) must be JSON-serializable: {e}") from None
        if compression != "auto":
            resolve_compression(compression)  # a bad argument is a usage error, raised here
        check_storage_options(storage_options)
        return cls(os.fspath(path), bool(overwrite), dict(metadata or {}), compression,
                   dict(storage_options) if storage_options is not None else None,
                   check_mode(check_replicas), knobs.get())

    def writer(self) -> ShardckptWriter:
        return ShardckptWriter(self.path, overwrite=self.overwrite, metadata=dict(self.metadata),
                               compression=self.compression, storage_options=self.storage_options)


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
    writer: ShardckptWriter
    planner: DefaultSavePlanner
    plan: SavePlan  # this rank's final plan
    skeleton: Skeleton | None  # the manifest's structure; coordinator only


def flatten_stateful(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Objects with ``state_dict()`` (``Stateful``) are saved as their state_dict, as DCP does."""
    return {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state_dict.items()}


def plan_save(
    state_dict: dict[str, Any], writer: ShardckptWriter, group: Group, check_replicas: CheckReplicas = "error"
) -> PlannedSave:
    planner = DefaultSavePlanner()
    state_dict = flatten_stateful(state_dict)

    def local() -> tuple[SavePlan, Summary]:
        planner.set_up_planner(state_dict, storage_meta=writer.storage_meta(), is_coordinator=group.is_coordinator)
        writer.set_up_storage_writer(group.is_coordinator)
        # DCP's local planning costs ~0.1 ms a DTensor; the same structure gives the same plan
        fp = _plan_cache.local_fingerprint(planner.state_dict, planner.mappings)
        hit = _plan_cache.local_plan(group, fp)
        if hit is not None:
            return hit
        plan = writer.prepare_local_plan(planner.create_local_plan())
        out = (plan, summarize(plan))
        _plan_cache.remember_local(group, fp, out)
        return out

    mine = _attempt(local)  # a failure is reported by the full planning's gather
    with _abandon_on_failure(writer, group):
        cached = _plan_cache.lookup(group, None if isinstance(mine, _Failed) else mine[1].digest())
        if cached is None:
            cached, save_id, probe = _plan_fully(mine, writer, group)
        else:  # same structure on every rank: only the per-save parts (target, id, probe)
            def begin(_: list[None]) -> tuple[str, str | None]:
                probe = writer.begin(group.world_size)
                return writer.save_id, probe

            save_id, probe = group.gather_broadcast("planning the save", lambda: None, begin,
                                                    CheckpointWriteError)
        writer.adopt(save_id)
        local_plan, assignment = mine[0], cached.assignment  # type: ignore[index]
        plan = planner.finish_plan(SavePlan(
            [local_plan.items[int(p)] for p in assignment.positions],
            storage_data=assigned_target(save_id, group.rank, probe, assignment.key_nos, assignment.boxes),
            planner_data=local_plan.planner_data))

        def finish() -> list[int]:
            writer.check_shared(plan, group.rank)
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
            group.run("planning the save", lambda: writer.check_shared(plan, group.rank), CheckpointWriteError)
        else:
            warning = group.gather_broadcast("checking replicas", finish, compare, CheckpointWriteError)
            if warning is not None and group.is_coordinator:
                warnings.warn(warning, ReplicaDivergenceWarning, stacklevel=3)
    return PlannedSave(writer, planner, plan, cached.skeleton)


def _plan_fully(mine: Any, writer: ShardckptWriter, group: Group) -> tuple[_plan_cache.CachedPlan, str, str | None]:
    """Gather every rank's summary, plan globally, scatter the assignments; cache the result."""
    kept: list[Any] = []  # coordinator: the skeleton and the summaries

    def local() -> Summary:
        if isinstance(mine, _Failed):
            raise mine.exc
        return mine[1]

    def coordinate(gathered: list[Summary]) -> list[tuple[Assignment, str, str | None, bool, int]]:
        assignments, skel = plan_globally(gathered)
        kept.extend([skel, tuple(gathered), assignments])
        probe = writer.begin(len(gathered))
        any_rep = any(a.replicated for a in assignments)
        generation = _plan_cache.new_generation()
        return [(a, writer.save_id, probe, any_rep, generation) for a in assignments]

    assignment, save_id, probe, any_rep, generation = group.gather_scatter(
        "planning the save", local, coordinate, CheckpointWriteError)
    cached = _plan_cache.CachedPlan(
        mine[1].digest(), generation, assignment, any_rep, kept[0] if kept else None,
        kept[1] if kept else None, tuple(a.replicated for a in kept[2]) if kept else None)
    _plan_cache.remember(group, cached)
    return cached, save_id, probe


@contextmanager
def _abandon_on_failure(writer: ShardckptWriter, group: Group) -> Iterator[None]:
    """A save that fails on any rank leaves nothing behind: the coordinator removes
    its probe and files once every rank has raised the gathered error."""
    try:
        yield
    except BaseException:
        if group.is_coordinator:
            writer.abandon()
        raise


def write_and_commit(planned: PlannedSave, resolve: Resolver, group: Group) -> None:
    def commit(written: list[RankWritten]) -> None:
        if planned.skeleton is None:
            raise CheckpointWriteError("commit reached without the global plan")
        planned.writer.commit_assigned(planned.skeleton, written)

    with _abandon_on_failure(planned.writer, group):
        group.gather_broadcast(
            f"saving {planned.writer.path}",
            lambda: planned.writer.write_assigned(planned.plan, resolve),
            commit,
            CheckpointWriteError,
        )
