"""The one shard reader: a checkpoint's stored slices into destination tensors,
every chunk CRC-checked before it is decoded, and its objects decoded without
running code. The engine's load (through the DCP adapter) and the converters'
sources read through the same chunk logic (``format.chunks.read_chunks``).

A read *job* is ``(item, entry, shard, dest)``: DCP's ``ReadItem`` (which region
of which stored slice), the key's ``TensorEntry``, the stored ``TensorShard`` and
the destination region. A job is cut into *pieces* of at most ``max_read_bytes``
(``pieces``), each read by one thread from one byte range.

Call order, per load: ``ShardReader(storage, manifest, knobs)``; ``read_object``
for objects; ``read_tensors(jobs, shared, group)`` for tensors (shared reads: the
replicated pieces are read by one rank and sent to the others, ``shared_reads``);
``close()``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import ReadItem

from .. import knobs as knobs_mod
from ..backends import RandomReader, Storage
from ..collectives import Group
from ..errors import CorruptCheckpointError
from ..format.chunks import read_chunks
from ..format.layout import box_flat_range, contiguous_strides, dtype_from_name, split_box
from ..format.manifest import BlobRef, Manifest, ObjectEntry, TensorEntry, TensorShard
from ..format.objects import decode_object, weights_only_reason
from . import shared_reads
from .shared_reads import SharedPlan

__all__ = ["ShardReader", "OpenFiles", "Job", "find_shard"]

Job = tuple[ReadItem, TensorEntry, TensorShard, torch.Tensor]


class OpenFiles:
    """Readers of a checkpoint's data files, opened once and shared by the read
    threads. A file the checkpoint names but storage lacks, or (with ``sizes``, the
    manifest's) one of another size, is a damaged checkpoint. ``kind`` names the
    files in errors (``shard file``, a DCP ``data file``)."""

    def __init__(self, storage: Storage, url: str, kind: str = "shard file",
                 sizes: Mapping[str, int] | None = None) -> None:
        self._storage, self._url, self._kind, self._sizes = storage, url, kind, sizes
        self._open: dict[str, RandomReader] = {}
        self._lock = threading.Lock()

    def get(self, rel: str) -> RandomReader:
        with self._lock:
            r = self._open.get(rel)
            if r is None:
                r = self._open[rel] = self._checked(rel)
            return r

    def _checked(self, rel: str) -> RandomReader:
        try:
            r = self._storage.open_reader(rel)
        except (FileNotFoundError, NotADirectoryError):
            raise CorruptCheckpointError(f"{self._url}: {self._kind} {rel} is missing", file=rel) from None
        if self._sizes is not None:
            size, expected = r.size(), self._sizes[rel]
            if size != expected:
                r.close()
                raise CorruptCheckpointError(
                    f"{self._url}: {self._kind} {rel} is {size} bytes, the manifest "
                    f"records {expected} (truncated or modified)", file=rel)
        return r

    def close(self) -> None:
        with self._lock:
            for r in self._open.values():
                r.close()
            self._open.clear()


class _BufferPool:
    """Read buffers kept across loads: a fresh buffer costs page faults (~5x slower
    than copying into a reused one). Holds at most ``io_threads`` buffers of at
    most ``max_read_bytes`` each (the knobs of the load that releases them)."""

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

    def release(self, buf: torch.Tensor, k: knobs_mod.Knobs) -> None:
        if buf.numel() <= k.max_read_bytes:
            with self._lock:
                if len(self._free) < k.io_threads:
                    self._free.append(buf)


# One per process, on purpose: buffers outlive a load so the next one reuses them.
_buffers = _BufferPool()


def find_shard(entry: TensorEntry, index: MetadataIndex) -> TensorShard:
    """The stored slice ``index`` names (DCP's ordinal hint is checked, not trusted)."""
    j = index.index
    if j is None or not 0 <= j < entry.num_shards or entry.box(j)[0] != tuple(index.offset or ()):
        j = entry.find(tuple(index.offset or ()))
    if j is not None:
        return entry.shards[j]
    raise CorruptCheckpointError(f"key {index.fqn!r}: no stored slice at {list(index.offset or ())}", key=index.fqn)


class ShardReader:
    """Reads one checkpoint's blobs under one knob snapshot (``knobs``)."""

    def __init__(self, storage: Storage, manifest: Manifest, knobs: knobs_mod.Knobs) -> None:
        self.storage, self.manifest, self.knobs = storage, manifest, knobs
        self._files = OpenFiles(storage, storage.url, sizes=manifest.files)

    @property
    def workers(self) -> int:
        # Remote reads wait on the network, not on CPU: keep more of them in flight.
        return self.knobs.read_concurrency if self.storage.capabilities.remote else self.knobs.io_threads

    def read_object(self, key: str, entry: ObjectEntry) -> Any:
        """An object's value: inline, or its blob read, CRC-checked and decoded safely."""
        if entry.blob is None:
            return entry.value
        blob: BlobRef = entry.blob
        buf, _ = read_chunks(self._files.get(blob.file), blob, 0, blob.raw_len,
                             lambda n: torch.empty(n, dtype=torch.uint8), key)
        try:
            return decode_object(entry.encoding, bytes(buf.numpy()))
        except Exception as e:  # noqa: BLE001 - a CRC-clean blob that won't decode is still corrupt
            # torch's message advises weights_only=False: wrong advice for a file we don't trust.
            why = weights_only_reason(e)
            raise CorruptCheckpointError(
                f"key {key!r}: stored {entry.encoding} value does not decode safely ({type(e).__name__}: {why}); "
                "refusing to load it", key=key) from None

    def pieces(self, job: Job) -> list[Any]:
        item, entry, shard, _ = job
        itemsize = dtype_from_name(entry.dtype).itemsize
        return split_box(shard.sizes, item.storage_offsets, item.lengths, itemsize, self.knobs.max_read_bytes)

    def read_tensors(self, jobs: list[Job], shared: SharedPlan | None = None, group: Group | None = None,
                     build: Callable[[], list[Job]] | None = None) -> list[Job]:
        """Fill every job's destination. With a shared-read plan, ``build()`` makes the
        jobs (every rank takes part in the transfers even if it fails to) and the
        replicated pieces move over ``group``."""
        if shared is not None and group is not None and build is not None:
            return shared_reads.read_shared(shared, group, build, self.read_piece, self.pieces, self.workers)
        if jobs:
            with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="shardckpt-read") as pool:
                futures = [pool.submit(self.read_piece, job, piece) for job in jobs for piece in self.pieces(job)]
                for f in futures:
                    f.result()
        return jobs

    def read_piece(self, job: Job, piece: Any) -> None:
        item, entry, shard, dest = job
        offsets, lengths, _, _ = piece
        dtype = dtype_from_name(entry.dtype)
        itemsize = dtype.itemsize
        lo, hi = box_flat_range(shard.sizes, offsets, lengths)
        if hi == lo:
            return
        held: list[torch.Tensor] = []

        def alloc(n: int) -> torch.Tensor:
            held.append(_buffers.acquire(n))
            return held[-1][:n]

        try:
            buf, raw_start = read_chunks(self._files.get(shard.blob.file), shard.blob, lo * itemsize,
                                         hi * itemsize, alloc, item.storage_index.fqn)
            _copy_box(buf, raw_start, dtype, shard, item, piece, lo, dest)
        finally:
            for b in held:
                _buffers.release(b, self.knobs)

    def close(self) -> None:
        self._files.close()


def _copy_box(buf: torch.Tensor, raw_start: int, dtype: torch.dtype, shard: TensorShard, item: ReadItem,
              piece: Any, lo: int, dest: torch.Tensor) -> None:
    offsets, lengths, dim, shift = piece
    itemsize = dtype.itemsize
    # The buffer starts at flat element raw_start/itemsize of the stored slice;
    # view the wanted box inside it with the stored slice's C-order strides.
    src = buf.view(dtype).as_strided(lengths, contiguous_strides(shard.sizes), lo - raw_start // itemsize)
    whole = shift == 0 and list(lengths) == list(item.lengths)
    (dest if whole else dest.narrow(dim, shift, lengths[dim])).copy_(src)
