"""``StorageReader`` for shardckpt's format.

Call order (DCP drives it; ``[all]`` = every rank, ``[coord]`` = coordinator only):

1. [all]   ``reset(checkpoint_id)``.
2. [all]   ``read_metadata()``: reads and validates ``manifest.json`` (or uses the
   one given to the constructor) and presents it as DCP ``Metadata``.
3. [all]   ``set_up_storage_reader(metadata, is_coordinator)``.
4. [all]   ``prepare_local_plan`` / [coord] ``prepare_global_plan``: the coordinator
   gives each replicated read item one owner rank (``_shared_reads``, where
   ``knobs.shared_reads`` and the backend's capabilities ask for it).
5. [all]   ``read_data(plan, planner)``: resolves each item's destination through
   the planner and hands the reads to ``io.ShardReader`` (only the chunks covering
   a slice are read, each CRC-checked). Objects are decoded without code
   execution; a stored ``io.BytesIO`` is written into the state_dict's BytesIO at
   that key. With shared reads, each rank reads what it owns and then every rank
   takes part in the transfers of the owned pieces (``io.shared_reads``).

The reading itself is ``io.shard_reader``'s; this module adapts it to DCP.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from .. import knobs as knobs_mod
from ..backends import Storage, open_storage
from ..collectives import Group
from ..errors import CheckpointReadError, CorruptCheckpointError
from ..format.layout import dtype_from_name
from ..format.manifest import Manifest, ObjectEntry, TensorEntry
from ..io import shared_reads
from ..io.shard_reader import Job, ShardReader, find_shard
from ..store import CheckpointDir

__all__ = ["ShardckptReader", "manifest_to_metadata", "shares_reads"]


def manifest_to_metadata(m: Manifest) -> Metadata:
    """DCP's view of a manifest: per key, global shape and stored slices."""
    sd_md: dict[str, Any] = {}
    storage_data: dict[MetadataIndex, Any] = {}
    planner_data: dict[str, tuple[str | int, ...]] = {}
    for key, e in m.entries.items():
        planner_data[key] = e.key_path
        if isinstance(e, TensorEntry):
            sd_md[key] = TensorStorageMetadata(
                TensorProperties(dtype=dtype_from_name(e.dtype)),
                torch.Size(e.shape),
                [ChunkStorageMetadata(torch.Size(s.offsets), torch.Size(s.sizes)) for s in e.shards],
            )
            for s in e.shards:
                storage_data[MetadataIndex(key, s.offsets)] = s
        else:
            sd_md[key] = BytesStorageMetadata()
            storage_data[MetadataIndex(key)] = e
    return Metadata(state_dict_metadata=sd_md, planner_data=planner_data, storage_data=storage_data)


class ShardckptReader(StorageReader):
    """Read a shardckpt checkpoint with ``torch.distributed.checkpoint.load``.

    Example::

        torch.distributed.checkpoint.load(sd, storage_reader=ShardckptReader("ckpt/step_10"))

    ``process_group``: the group the load runs over (the one given to DCP; None:
    the default group). Replicated pieces are read once and shared over it
    (``knobs.shared_reads``); where DCP's group turns out to be another one,
    every rank reads all it loads.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        manifest: Manifest | None = None,
        storage_options: dict[str, Any] | None = None,
        process_group: Any = None,
        knobs: knobs_mod.Knobs | None = None,
    ) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.process_group = process_group
        # the snapshot every thread of a load through this reader uses (DCP: taken at reset)
        self._pinned = knobs
        self.knobs = knobs if knobs is not None else knobs_mod.get()
        self._dcp_rank: int | None = None
        self.storage_options = storage_options
        self._storage: Storage | None = None
        self._manifest = manifest
        # A manifest handed in (load read it already) serves the first load only.
        self._fresh = manifest is not None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        # (read_metadata re-reads the manifest; DCP calls reset() only with an id.)
        self.knobs = self._pinned if self._pinned is not None else knobs_mod.get()
        if checkpoint_id is not None and os.fspath(checkpoint_id) != self.path:
            self.path = os.fspath(checkpoint_id)
            self._storage = None
            self._manifest, self._fresh = None, False

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = open_storage(self.path, self.storage_options, knobs=self.knobs)
        return self._storage

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = CheckpointDir(self.storage).read_manifest()
        return self._manifest

    def read_metadata(self) -> Metadata:
        # Each load re-reads (and re-validates) the manifest, whether or not DCP
        # called reset() first and whether or not the last load got as far as
        # read_data: the checkpoint at this path may have been overwritten since.
        if not self._fresh:
            self._manifest = None
        self._fresh = False
        return manifest_to_metadata(self.manifest)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self._dcp_rank = kwargs.get("rank")

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return shared_reads.with_rank_info(plan, Group(self.process_group, self.knobs), self._dcp_rank)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        k = self.knobs
        if not shared_reads.wanted(k.shared_reads, self.storage.capabilities.remote):
            return shared_reads.without_sharing(plans)
        entries = self.manifest.entries

        def dtype_of(key: str) -> str | None:
            e = entries.get(key)
            return e.dtype if isinstance(e, TensorEntry) else None

        def shard_sizes(item: ReadItem) -> tuple[int, ...]:
            e = entries[item.storage_index.fqn]
            return find_shard(e, item.storage_index).sizes  # type: ignore[arg-type]

        return shared_reads.plan_shared_reads(plans, dtype_of, shard_sizes, k.max_read_bytes)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        reader = ShardReader(self.storage, self.manifest, self.knobs)
        try:
            def build_jobs() -> list[Job]:
                return [j for j in (_job(reader, item, planner) for item in plan.items) if j is not None]

            shared = shared_reads.shared_plan_of(plan)
            if shared is not None:  # replicated pieces: read once, shared over the group
                jobs = reader.read_tensors([], shared, Group(self.process_group, self.knobs), build_jobs)
            else:
                jobs = reader.read_tensors(build_jobs())
            for item, _, _, dest in jobs:
                planner.commit_tensor(item, dest)
        finally:
            reader.close()
            # The next load through this reader re-reads the manifest: the checkpoint at
            # this path may be overwritten in between (DCP calls reset() only with an id).
            self._manifest, self._fresh = None, False
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def _job(reader: ShardReader, item: ReadItem, planner: LoadPlanner) -> Job | None:
    """The read job of a tensor item; an object item is read and handed over here (None)."""
    key = item.storage_index.fqn
    entry = reader.manifest.entries.get(key)
    if item.type == LoadItemType.BYTE_IO:
        if not isinstance(entry, ObjectEntry):
            raise CorruptCheckpointError(f"key {key!r} is not an object", key=key)
        _hand_over(planner, item, reader.read_object(key, entry))
        return None
    if not isinstance(entry, TensorEntry):
        raise CorruptCheckpointError(f"key {key!r} is not a tensor", key=key)
    shard = find_shard(entry, item.storage_index)
    dest = planner.resolve_tensor(item)
    if tuple(dest.shape) != tuple(item.lengths):
        raise CheckpointReadError(
            f"key {item.dest_index.fqn!r}: destination region {list(dest.shape)} "
            f"!= requested {list(item.lengths)}", key=item.dest_index.fqn)
    return item, entry, shard, dest


def _hand_over(planner: LoadPlanner, item: ReadItem, value: Any) -> None:
    """An object's decoded value to the planner (or into the state_dict's own BytesIO)."""
    in_place = isinstance(value, io.BytesIO) and _into_target_bytesio(planner, item, value)
    if in_place:
        return  # the state_dict's own BytesIO holds the value: nothing for a planner to unpickle
    setter = getattr(planner, "load_object", None)
    if setter is not None:
        setter(item, value)
    else:
        # A foreign planner only takes pickled bytes; hand it a pickle of the value
        # we already decoded safely, never the stored bytes.
        out = io.BytesIO()
        torch.save(value, out)
        out.seek(0)
        planner.load_bytes(item, out)


def _into_target_bytesio(planner: LoadPlanner, item: ReadItem, value: io.BytesIO) -> bool:
    """Write a stored BytesIO into the state_dict's own BytesIO at that key, when it
    holds one (contents and position replaced), so references to it see the load."""
    flat = getattr(planner, "state_dict", None)
    target = flat.get(item.dest_index.fqn) if isinstance(flat, dict) else None
    if not isinstance(target, io.BytesIO):
        return False
    target.seek(0)
    target.truncate()
    target.write(value.getbuffer())
    target.seek(value.tell())
    return True


def shares_reads(reader: ShardckptReader) -> bool:
    """Whether a load through ``reader`` reads replicated pieces once and shares them
    (``knobs.shared_reads``): then its local plans must go through ``prepare_global_plan``."""
    return Group(reader.process_group).distributed and shared_reads.wanted(
        reader.knobs.shared_reads, reader.storage.capabilities.remote)
