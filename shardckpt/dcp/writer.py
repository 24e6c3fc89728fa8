"""``StorageWriter`` that writes shardckpt's format: a thin adapter that lets DCP's
planner drive an ``io.SaveTarget`` (the one writer of the format) and turns DCP's
``Metadata`` into a manifest (``io.manifest_builder``).

Call order (DCP drives it; ``[all]`` = every rank, ``[coord]`` = coordinator only):

1. [all]   ``reset(checkpoint_id)`` then ``set_up_storage_writer(is_coordinator)``.
2. [all]   ``prepare_local_plan(plan)``: unchanged.
3. [coord] ``prepare_global_plan(plans)``: ``SaveTarget.begin`` (checks the target,
   picks a fresh save id, writes a probe) and tells each rank its shard file. No
   rank has written anything yet, and DCP turns an error here into an error on
   every rank.
4. [all]   ``write_data(plan, planner)``: ``SaveTarget.write_items`` (the rank
   first checks that it sees the coordinator's probe, else nothing is written).
5. [coord] ``finish(metadata, results)``: only reached when every rank's
   ``write_data`` succeeded; builds the manifest and ``SaveTarget.commit``s it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future as TorchFuture

from ..backends import Storage
from ..errors import CheckpointWriteError
from ..format.codec import Compression
from ..format.layout import dtype_name
from ..format.manifest import Entry, Manifest, TensorEntry, TensorShard
from ..io.manifest_builder import (
    ShardTarget,
    Stored,
    add_file_sizes,
    new_manifest,
    object_entry,
    shard_name,
)
from ..io.save_target import SaveTarget

__all__ = ["ShardckptWriter", "manifest_of"]


class ShardckptWriter(StorageWriter):
    """Write a shardckpt checkpoint at ``path`` (any supported URL).

    Example::

        torch.distributed.checkpoint.save(sd, storage_writer=ShardckptWriter("ckpt/step_10"))
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
        compression: None | str | Compression = "auto",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._args = dict(overwrite=overwrite, metadata=metadata, compression=compression,
                          storage_options=storage_options)
        self.target = SaveTarget(path, **self._args)  # type: ignore[arg-type]
        self.is_coordinator = False

    @property
    def path(self) -> str:
        return self.target.path

    @property
    def storage(self) -> Storage:
        return self.target.storage

    # -- step 1
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        path = self.path if checkpoint_id is None else os.fspath(checkpoint_id)
        # a fresh target per save: its own save id, probe check and knob snapshot
        self.target = SaveTarget(path, **self._args)  # type: ignore[arg-type]

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        # DCP reuses a writer without calling reset() when checkpoint_id is None:
        # every save checks its own probe and has its own id.
        self.target.probe_checked, self.target.save_id = False, ""

    # -- step 2
    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    # -- step 3
    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        probe = self.target.begin(len(plans))
        return [dataclasses.replace(p, storage_data=ShardTarget(shard_name(self.target.save_id, r), probe))
                for r, p in enumerate(plans)]

    # -- step 4
    def write_data(self, plan: SavePlan, planner: SavePlanner) -> TorchFuture[list[WriteResult]]:
        written = self.target.write_items(plan.storage_data, plan.items, planner.resolve_data)
        fut: TorchFuture[list[WriteResult]] = TorchFuture()
        fut.set_result([WriteResult(item.index, size, st) for item, size, st in written])
        return fut

    # -- step 5
    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        self.target.commit(manifest_of(metadata, results, self.target))

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def manifest_of(metadata: Metadata, results: list[list[WriteResult]], target: SaveTarget) -> Manifest:
    """The manifest of a save DCP planned: per key of its ``Metadata``, where the
    ranks' write results put each slice."""
    by_index: dict[MetadataIndex, Stored] = {r.index: r.storage_data for rank in results for r in rank}
    mappings = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    entries: dict[str, Entry] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        key_path = tuple(mappings.get(fqn, (fqn,)))
        if isinstance(md, TensorStorageMetadata):
            shards = []
            for ch in md.chunks:
                st = by_index.get(MetadataIndex(fqn, ch.offsets))
                if st is None or st.blob is None:
                    raise CheckpointWriteError(f"no rank wrote key {fqn!r} slice at {list(ch.offsets)}", key=fqn)
                shards.append(TensorShard(tuple(ch.offsets), tuple(ch.sizes), st.blob))
            entries[fqn] = TensorEntry(dtype_name(md.properties.dtype), tuple(md.size), tuple(shards), key_path)
        elif isinstance(md, BytesStorageMetadata):
            st = by_index.get(MetadataIndex(fqn))
            if st is None:
                raise CheckpointWriteError(f"no rank wrote key {fqn!r}", key=fqn)
            entries[fqn] = object_entry(fqn, st, key_path)
    chunk_bytes = max([target.knobs.chunk_bytes] + [c.raw_len for st in by_index.values() for c in st.chunks])
    files = add_file_sizes({}, by_index.values())
    return new_manifest(target.save_id, target.world_size, files, entries, chunk_bytes, target.metadata)
