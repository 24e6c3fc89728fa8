"""``StorageReader`` for shardckpt's format.

Call order (DCP drives it; ``[all]`` = every rank, ``[coord]`` = coordinator only):

1. [all]   ``reset(checkpoint_id)``.
2. [all]   ``read_metadata()``: reads and validates ``manifest.json`` (or uses the
   one given to the constructor) and presents it as DCP ``Metadata``.
3. [all]   ``set_up_storage_reader(metadata, is_coordinator)``.
4. [all]   ``prepare_local_plan`` / [coord] ``prepare_global_plan``: the coordinator
   gives each replicated read item one owner rank (``_shared_reads``, where
   ``knobs.shared_reads`` and the backend's capabilities ask for it).
5. [all]   ``read_data(plan, planner)``: for each requested slice, reads only the
   chunks covering it, checks each chunk's CRC32C, then copies into the tensor
   the planner resolves. Objects are decoded without code execution; a stored
   ``io.BytesIO`` is written into the state_dict's BytesIO at that key. With
   shared reads, each rank reads what it owns and then every rank takes part in
   the transfers of the owned pieces, in one order (``_shared_reads.read_shared``).
"""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
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

from .. import knobs
from ..backends import RandomReader, Storage, open_storage
from ..collectives import Group
from ..errors import CheckpointReadError, CorruptCheckpointError
from ..format.chunks import read_chunks
from ..format.layout import box_flat_range, contiguous_strides, dtype_from_name, split_box
from ..format.manifest import BlobRef, Manifest, ObjectEntry, TensorEntry, TensorShard
from ..format.objects import decode_object, weights_only_reason
from ..io import shared_reads as _shared_reads
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


class _Files:
    """Open readers per shard file, shared by the read threads; sizes checked once."""

    def __init__(self, storage: Storage, manifest: Manifest) -> None:
        self._storage, self._manifest = storage, manifest
        self._open: dict[str, RandomReader] = {}
        self._lock = threading.Lock()

    def get(self, rel: str) -> RandomReader:
        with self._lock:
            r = self._open.get(rel)
            if r is None:
                try:
                    r = self._storage.open_reader(rel)
                except (FileNotFoundError, NotADirectoryError):
                    raise CorruptCheckpointError(
                        f"{self._storage.url}: shard file {rel} is missing", file=rel
                    ) from None
                size, expected = r.size(), self._manifest.files[rel]
                if size != expected:
                    r.close()
                    raise CorruptCheckpointError(
                        f"{self._storage.url}: shard file {rel} is {size} bytes, the manifest "
                        f"records {expected} (truncated or modified)",
                        file=rel,
                    )
                self._open[rel] = r
            return r

    def close(self) -> None:
        with self._lock:
            for r in self._open.values():
                r.close()
            self._open.clear()


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
    ) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self._process_group = process_group
        self._dcp_rank: int | None = None
        self.storage_options = storage_options
        self._storage: Storage | None = None
        self._manifest = manifest
        # A manifest handed in (load read it already) serves the first load only.
        self._fresh = manifest is not None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        # (read_metadata re-reads the manifest; DCP calls reset() only with an id.)
        if checkpoint_id is not None and os.fspath(checkpoint_id) != self.path:
            self.path = os.fspath(checkpoint_id)
            self._storage = None
            self._manifest, self._fresh = None, False

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = open_storage(self.path, self.storage_options)
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
        return _shared_reads.with_rank_info(plan, Group(self._process_group), self._dcp_rank)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        k = knobs.get()
        if not _shared_reads.wanted(k.shared_reads, self.storage.capabilities.remote):
            return _shared_reads.without_sharing(plans)
        entries = self.manifest.entries

        def dtype_of(key: str) -> str | None:
            e = entries.get(key)
            return e.dtype if isinstance(e, TensorEntry) else None

        def shard_sizes(item: ReadItem) -> tuple[int, ...]:
            e = entries[item.storage_index.fqn]
            return _find_shard(e, item.storage_index).sizes  # type: ignore[arg-type]

        return _shared_reads.plan_shared_reads(plans, dtype_of, shard_sizes, k.max_read_bytes)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        manifest = self.manifest
        files = _Files(self.storage, manifest)
        k = knobs.get()
        try:
            def build_jobs() -> list[Any]:
                jobs = []
                for item in plan.items:
                    entry = manifest.entries.get(item.storage_index.fqn)
                    if item.type == LoadItemType.BYTE_IO:
                        if not isinstance(entry, ObjectEntry):
                            raise CorruptCheckpointError(f"key {item.storage_index.fqn!r} is not an object", key=item.storage_index.fqn)
                        _load_object(files, item, entry, planner)
                        continue
                    if not isinstance(entry, TensorEntry):
                        raise CorruptCheckpointError(f"key {item.storage_index.fqn!r} is not a tensor", key=item.storage_index.fqn)
                    shard = _find_shard(entry, item.storage_index)
                    dest = planner.resolve_tensor(item)
                    if tuple(dest.shape) != tuple(item.lengths):
                        raise CheckpointReadError(
                            f"key {item.dest_index.fqn!r}: destination region {list(dest.shape)} "
                            f"!= requested {list(item.lengths)}", key=item.dest_index.fqn)
                    jobs.append((item, entry, shard, dest))
                return jobs

            # Remote reads wait on the network, not on CPU: keep more of them in flight.
            workers = k.read_concurrency if self.storage.capabilities.remote else k.io_threads
            shared = _shared_reads.shared_plan_of(plan)
            if shared is not None:  # replicated pieces: read once, shared over the group
                jobs = _shared_reads.read_shared(
                    shared, Group(self._process_group), build_jobs,
                    lambda j, pc: _read_piece(files, j, pc), lambda j: _pieces(j, k.max_read_bytes), workers)
            else:
                jobs = build_jobs()
            if jobs and shared is None:
                with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shardckpt-read") as pool:
                    futures = [
                        pool.submit(knobs.bind(lambda j=key_entry_shard, pc=piece: _read_piece(files, j, pc)))
                        for key_entry_shard in jobs
                        for piece in _pieces(key_entry_shard, k.max_read_bytes)
                    ]
                    for f in futures:
                        f.result()
            for item, _, _, dest in jobs:
                planner.commit_tensor(item, dest)
        finally:
            files.close()
            # The next load through this reader re-reads the manifest: the checkpoint at
            # this path may be overwritten in between (DCP calls reset() only with an id).
            self._manifest, self._fresh = None, False
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def _find_shard(entry: TensorEntry, index: MetadataIndex) -> TensorShard:
    # the ordinal DCP's planners give as a hint is checked, not trusted
    j = index.index
    if j is None or not 0 <= j < entry.num_shards or entry.box(j)[0] != tuple(index.offset or ()):
        j = entry.find(tuple(index.offset or ()))
    if j is not None:
        return entry.shards[j]
    raise CorruptCheckpointError(f"key {index.fqn!r}: no stored slice at {list(index.offset or ())}", key=index.fqn)


def _pieces(job: tuple[ReadItem, TensorEntry, TensorShard, torch.Tensor], max_bytes: int) -> list[Any]:
    item, entry, shard, _ = job
    itemsize = dtype_from_name(entry.dtype).itemsize
    return split_box(shard.sizes, item.storage_offsets, item.lengths, itemsize, max_bytes)


class _BufferPool:
    """Read buffers kept across loads: a fresh buffer costs page faults (~5x slower
    than copying into a reused one). Holds at most ``io_threads`` buffers of at
    most ``max_read_bytes`` each."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> torch.Tensor:
        # (indices, not list.remove: that would compare tensors elementwise)
        with self._lock:
            sizes = [b.numel() for b in self._free]
            fits = [i for i, n in enumerate(sizes) if n >= nbytes]
            if fits:
                return self._free.pop(min(fits, key=sizes.__getitem__))
            if self._free:  # drop the largest too-small one; it is replaced by a bigger one
                self._free.pop(max(range(len(sizes)), key=sizes.__getitem__))
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def release(self, buf: torch.Tensor) -> None:
        k = knobs.get()
        if buf.numel() <= k.max_read_bytes:
            with self._lock:
                if len(self._free) < k.io_threads:
                    self._free.append(buf)


_pool = _BufferPool()


def _read_piece(files: _Files, job: Any, piece: Any) -> None:
    item, entry, shard, dest = job
    offsets, lengths, _, _ = piece
    dtype = dtype_from_name(entry.dtype)
    itemsize = dtype.itemsize
    lo, hi = box_flat_range(shard.sizes, offsets, lengths)
    if hi == lo:
        return
    key = item.storage_index.fqn
    held: list[torch.Tensor] = []

    def alloc(n: int) -> torch.Tensor:
        held.append(_pool.acquire(n))
        return held[-1][:n]

    try:
        buf, raw_start = read_chunks(files.get(shard.blob.file), shard.blob, lo * itemsize, hi * itemsize, alloc, key)
        _copy_box(buf, raw_start, dtype, shard, item, piece, lo, dest)
    finally:
        for b in held:
            _pool.release(b)


def _copy_box(buf: torch.Tensor, raw_start: int, dtype: torch.dtype, shard: TensorShard, item: ReadItem,
              piece: Any, lo: int, dest: torch.Tensor) -> None:
    offsets, lengths, dim, shift = piece
    itemsize = dtype.itemsize
    # The buffer starts at flat element raw_start/itemsize of the stored slice;
    # view the wanted box inside it with the stored slice's C-order strides.
    src = buf.view(dtype).as_strided(lengths, contiguous_strides(shard.sizes), lo - raw_start // itemsize)
    whole = shift == 0 and list(lengths) == list(item.lengths)
    (dest if whole else dest.narrow(dim, shift, lengths[dim])).copy_(src)


def _load_object(files: _Files, item: ReadItem, entry: ObjectEntry, planner: LoadPlanner) -> None:
    key = item.storage_index.fqn
    if entry.blob is None:
        value = entry.value
    else:
        blob: BlobRef = entry.blob
        buf, _ = read_chunks(files.get(blob.file), blob, 0, blob.raw_len, lambda n: torch.empty(n, dtype=torch.uint8), key)
        try:
            value = decode_object(entry.encoding, bytes(buf.numpy()))
        except Exception as e:  # noqa: BLE001 - a CRC-clean blob that won't decode is still corrupt
            # torch's message advises weights_only=False: wrong advice for a file we don't trust.
            why = weights_only_reason(e)
            raise CorruptCheckpointError(
                f"key {key!r}: stored {entry.encoding} value does not decode safely ({type(e).__name__}: {why}); "
                "refusing to load it", key=key) from None
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
    return Group(reader._process_group).distributed and _shared_reads.wanted(
        knobs.get().shared_reads, reader.storage.capabilities.remote)
