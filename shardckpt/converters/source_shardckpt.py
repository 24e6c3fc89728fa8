"""Reading a shardckpt checkpoint for conversion, without ever holding all of it.

Per tensor, per stored slice, bytes come through ranged reads of whole chunks
(``format.chunks.read_chunks``: every chunk CRC32C-checked, then decoded) in
pieces of at most half of ``knobs.max_read_bytes`` (two are in flight). A
tensor whose stored slices are each a contiguous run of it in C order (one
slice, or row blocks as ``Shard(0)`` writes them) streams as a concatenation of
those runs; any other layout (``Shard(1)``, 2-D meshes) is assembled in memory
one tensor at a time, from the same bounded reads.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..backends import Storage
from ..errors import CorruptCheckpointError
from ..format.chunks import read_chunks
from ..format.layout import box_flat_range, contiguous_strides, dtype_from_name, split_box
from ..format.manifest import BlobRef, ObjectEntry, TensorEntry
from ..format.objects import decode_object, weights_only_reason
from ..io.shard_reader import OpenFiles
from ..store import CheckpointDir
from .items import (
    Buffers,
    Dropped,
    Item,
    ObjectItem,
    Step,
    TensorItem,
    box_slices,
    c_order,
    cast,
    check_tiling,
    flat_pieces,
    piece_bytes,
    run_jobs,
)

__all__ = ["ShardckptSource"]


def chunk_runs(blob: BlobRef, limit: int) -> list[tuple[int, int]]:
    """Raw byte ranges ``[lo, hi)`` of ``blob`` made of whole chunks, each at most
    ``limit`` bytes unless a single chunk is larger."""
    runs, lo, pos = [], 0, 0
    for c in blob.chunks:
        if pos > lo and pos + c.raw_len - lo > limit:
            runs.append((lo, pos))
            lo = pos
        pos += c.raw_len
    if pos > lo:
        runs.append((lo, pos))
    return runs


class ShardckptSource:
    """A committed shardckpt checkpoint (manifest validated, every shard's size checked)."""

    format = "shardckpt"

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.url = storage.url
        self.manifest = CheckpointDir(storage).read_checked()
        self.dropped: list[Dropped] = []
        self.metadata: dict[str, Any] = {}
        self._files = OpenFiles(self.storage, self.url, "shard file")

    def items(self) -> list[Item]:
        out: list[Item] = []
        for key, e in self.manifest.entries.items():
            if isinstance(e, TensorEntry):
                out.append(TensorItem(key, e.key_path, dtype_from_name(e.dtype), e.shape))
            else:
                out.append(ObjectItem(key, e.key_path))
        return out

    def stream(self, items: Sequence[TensorItem], out_dtypes: Sequence[torch.dtype],
               max_bytes: int) -> Iterator[tuple[TensorItem, torch.Tensor]]:
        return run_jobs(self._steps(items, out_dtypes, max_bytes), max_bytes)

    def _steps(self, items: Sequence[TensorItem], out_dtypes: Sequence[torch.dtype],
               max_bytes: int) -> Iterator[Step]:
        for item, od in zip(items, out_dtypes):
            e = self.manifest.entries[item.key]
            if not isinstance(e, TensorEntry):
                raise CorruptCheckpointError(f"{self.url}: key {item.key!r} is not a tensor", key=item.key)
            order = c_order(e.shape, [(s.offsets, s.sizes) for s in e.shards])
            if order is None:
                check_tiling(item.key, e.shape, [(s.offsets, s.sizes) for s in e.shards], self.url)
                yield Step(item, functools.partial(self._assemble, item, e, max_bytes), od, item.nbytes)
                continue
            limit = piece_bytes(max_bytes, item.dtype.itemsize)
            for i in order:
                blob = e.shards[i].blob
                for lo, hi in chunk_runs(blob, limit):
                    yield Step(item, functools.partial(self._read_run, item, blob, lo, hi, od), od)

    def _read_run(self, item: TensorItem, blob: BlobRef, lo: int, hi: int, od: torch.dtype,
                  bufs: Buffers) -> list[torch.Tensor]:
        buf, start = read_chunks(self._files.get(blob.file), blob, lo, hi, bufs.alloc, item.key)
        if start != lo or buf.numel() != hi - lo:  # runs are whole chunks by construction
            raise CorruptCheckpointError(f"{self.url}: key {item.key!r}: chunk index inconsistent", key=item.key)
        return [cast(buf.view(item.dtype), od)]

    def _assemble(self, item: TensorItem, e: TensorEntry, max_bytes: int, bufs: Buffers) -> list[torch.Tensor]:
        """The whole tensor, from bounded reads of each slice's boxes."""
        dtype, isz = item.dtype, item.dtype.itemsize
        out = torch.empty(item.shape, dtype=dtype)
        for s in e.shards:
            if not all(s.sizes):
                continue
            zero = [0] * len(s.sizes)
            for offs, lens, _, _ in split_box(s.sizes, zero, s.sizes, isz, piece_bytes(max_bytes, isz)):
                lo, hi = box_flat_range(s.sizes, offs, lens)
                bufs.reset()
                buf, start = read_chunks(self._files.get(s.blob.file), s.blob, lo * isz, hi * isz, bufs.alloc, item.key)
                src = buf.view(dtype).as_strided(lens, contiguous_strides(s.sizes), lo - start // isz)
                out[box_slices([a + b for a, b in zip(s.offsets, offs)], lens)].copy_(src)
        return flat_pieces(out, max_bytes)

    def read_object(self, item: ObjectItem) -> Any:
        e = self.manifest.entries[item.key]
        if not isinstance(e, ObjectEntry):
            raise CorruptCheckpointError(f"{self.url}: key {item.key!r} is not an object", key=item.key)
        if e.blob is None:
            return e.value
        buf, _ = read_chunks(self._files.get(e.blob.file), e.blob, 0, e.blob.raw_len,
                             lambda n: torch.empty(n, dtype=torch.uint8), item.key)
        try:
            return decode_object(e.encoding, bytes(buf.numpy()))
        except Exception as exc:  # noqa: BLE001 - a CRC-clean blob that won't decode is still corrupt
            raise CorruptCheckpointError(
                f"{self.url}: key {item.key!r}: stored {e.encoding} value does not decode safely "
                f"({type(exc).__name__}: {weights_only_reason(exc)})", key=item.key) from None

    def close(self) -> None:
        self._files.close()
