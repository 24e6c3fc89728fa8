"""Per-rank index files: where the boxes of laid-out tensors are stored.

Each rank that wrote boxes of laid-out entries (``format/grid.py``) writes one
index, ``data/<save_id>-r<rank>.idx``, next to its shard files, before the
manifest is committed. The manifest records each index's size and CRC32C, so
the manifest's own CRC covers the indexes too; an index is read, checked and
decoded only when a slice it describes is first needed.

An index is canonical JSON::

    {"format": "shardckpt-index", "version": 2, "save_id": ..., "rank": r,
     "files": [shard files...],
     "items": [[key_no, box, file_no, offset, chunks], ...]}

``key_no`` is the key's position among the manifest's sorted keys, ``box``
the ordinal in its grid; a raw chunk is ``[raw_len, crc32c]``, any other
``[codec, raw_len, stored_len, crc32c]``: about 40 bytes a slice.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import CheckpointReadError, CorruptCheckpointError
from ..native.crc32c import crc32c
from ._validate import DATA_DIR, Bad, blob_at, nonneg_int, validate_relpath
from .entries import BlobRef, ChunkInfo, TensorEntry, TensorShard
from .jsoncodec import decode as json_decode
from .jsoncodec import encode as json_encode
from .layout import DTYPES

__all__ = ["INDEX_FORMAT", "index_name", "encode_index", "Indexes"]

INDEX_FORMAT = "shardckpt-index"
_VERSION = 2


def index_name(save_id: str, rank: int) -> str:
    return f"{DATA_DIR}/{save_id}-r{rank:05d}.idx"


def _chunk_json(c: ChunkInfo) -> list[Any]:
    return [c.raw_len, c.crc32c] if c.codec == "raw" else [c.codec, c.raw_len, c.stored_len, c.crc32c]


def encode_index(save_id: str, rank: int, items: list[tuple[int, int, BlobRef]]) -> bytes:
    """``items``: ``(key_no, box, blob)`` for every box this rank wrote."""
    files = sorted({b.file for _, _, b in items})
    no = {f: i for i, f in enumerate(files)}
    doc = {"format": INDEX_FORMAT, "version": _VERSION, "save_id": save_id, "rank": rank, "files": files,
           "items": [[k, j, no[b.file], b.offset, [_chunk_json(c) for c in b.chunks]]
                     for k, j, b in sorted(items, key=lambda t: (t[0], t[1]))]}
    return json_encode(doc, checked=True)


class Indexes:
    """The indexes of one manifest, read and checked lazily (thread-safe)."""

    def __init__(self, read: Callable[[str], bytes], url: str, save_id: str,
                 by_rank: Mapping[int, tuple[str, int]], files: Mapping[str, int],
                 entries: Mapping[str, Any], chunk_bytes: int) -> None:
        self._read, self._url, self._save_id = read, url, save_id
        self.by_rank = dict(by_rank)  # rank -> (index file, crc32c)
        self._files, self._entries, self._chunk_bytes = files, entries, chunk_bytes
        self._keys = sorted(entries)
        self._key_no = {k: i for i, k in enumerate(self._keys)}
        self._cache: dict[int, dict[tuple[int, int], TensorShard]] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._lock = threading.Lock()

    def shard(self, key: str, j: int) -> TensorShard:
        entry = self._entries[key]
        rank = entry.layout.writers.of(j)
        found = self._index(rank).get((self._key_no[key], j))
        if found is None:  # unreachable for an index that decoded: it is checked complete
            raise CorruptCheckpointError(f"{self._url}: no index describes key {key!r} slice {j}", key=key)
        return found

    def rebind(self, read: Callable[[str], bytes]) -> None:
        """Read indexes not read yet through ``read`` (a manifest reused with another storage)."""
        self._read = read

    def damaged(self) -> dict[int, CorruptCheckpointError]:
        """Every index that does not decode, by writer rank (verify reports them all;
        read failures still raise ``CheckpointReadError``)."""
        out = {}
        writers = {e.layout.writers.of(j) for e in self._entries.values()
                   if isinstance(e, TensorEntry) and e.layout is not None
                   for j in ([0] if e.layout.writers.ranks is None and e.layout.writers.step == 0
                             else range(e.layout.grid.num_boxes))}
        for rank in sorted(set(self.by_rank) | writers):
            try:
                self._index(rank)
            except CorruptCheckpointError as e:
                out[rank] = e
        return out

    def _index(self, rank: int) -> dict[tuple[int, int], TensorShard]:
        with self._lock:
            done = self._cache.get(rank)
            if done is not None:
                return done
            lock = self._locks.setdefault(rank, threading.Lock())
        with lock:  # one read per index, whichever thread asks first
            with self._lock:
                done = self._cache.get(rank)
            if done is None:
                done = self._decode(rank)
                with self._lock:
                    self._cache[rank] = done
            return done

    def _decode(self, rank: int) -> dict[tuple[int, int], TensorShard]:
        if rank not in self.by_rank:
            raise CorruptCheckpointError(f"{self._url}: the manifest lists no index for rank {rank}, "
                                         f"which wrote slices", file="manifest.json")
        rel, crc = self.by_rank[rank]
        try:
            data = self._read(rel)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise CorruptCheckpointError(f"{self._url}/{rel}: index file is missing", file=rel) from None
        except OSError as e:
            raise CheckpointReadError(f"cannot read {self._url}/{rel}: {type(e).__name__}: {e}",
                                      path=self._url) from e
        try:
            if len(data) != self._files.get(rel, -1):
                raise Bad(f"index is {len(data)} bytes, the manifest records {self._files.get(rel)}")
            if crc32c(data) != crc:
                raise Bad("index CRC32C mismatch (the index was modified or damaged)")
            return self._items(rank, data)
        except Bad as e:
            raise CorruptCheckpointError(f"{self._url}/{rel}: {e}", file=rel) from None
        except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as e:
            raise CorruptCheckpointError(f"{self._url}/{rel}: not a valid index ({e})", file=rel) from None

    def _items(self, rank: int, data: bytes) -> dict[tuple[int, int], TensorShard]:
        doc = json_decode(data)
        if not isinstance(doc, dict) or json_encode(doc, checked=True) != data:
            raise Bad("index is not canonical JSON")
        head = (doc.get("format"), doc.get("version"), doc.get("save_id"), doc.get("rank"))
        if head != (INDEX_FORMAT, _VERSION, self._save_id, rank):
            raise Bad(f"index header {list(head)} is not rank {rank}'s of save {self._save_id}")
        files = doc.get("files")
        if not isinstance(files, list) or len(set(map(str, files))) != len(files):
            raise Bad("files: expected a list of distinct paths")
        files = [validate_relpath(f) for f in files]
        items = doc.get("items")
        if not isinstance(items, list):
            raise Bad("items: expected a list")
        out: dict[tuple[int, int], TensorShard] = {}
        for n, it in enumerate(items):
            where = f"items[{n}]"
            if not isinstance(it, list) or len(it) != 5:
                raise Bad(f"{where}: expected [key_no, box, file_no, offset, chunks]")
            k, j, f, off = (nonneg_int(x, where) for x in it[:4])
            if k >= len(self._keys) or f >= len(files):
                raise Bad(f"{where}: key {k} or file {f} out of range")
            key = self._keys[k]
            entry = self._entries[key]
            if not isinstance(entry, TensorEntry) or entry.layout is None or j >= entry.layout.grid.num_boxes:
                raise Bad(f"{where}: key {key!r} has no laid-out slice {j}")
            if entry.layout.writers.of(j) != rank:
                raise Bad(f"{where}: key {key!r} slice {j} was written by rank {entry.layout.writers.of(j)}")
            if (k, j) in out:
                raise Bad(f"{where}: key {key!r} slice {j} listed twice")
            offsets, sizes = entry.box(j)
            blob = blob_at(files[f], off, it[4], self._files, f"{where} (key {key!r})", self._chunk_bytes,
                           compact=True)
            itemsize = DTYPES[entry.dtype].itemsize
            if blob.raw_len != math.prod(sizes) * itemsize:
                raise Bad(f"{where}: key {key!r} slice {j}: chunks hold {blob.raw_len} bytes, "
                          f"the slice needs {math.prod(sizes) * itemsize}")
            if any(c.raw_len % itemsize for c in blob.chunks):
                raise Bad(f"{where}: key {key!r}: a chunk splits a {entry.dtype} element")
            out[(k, j)] = TensorShard(offsets, sizes, blob)
        expected = sum(e.layout.writers.boxes_of(rank, e.layout.grid.num_boxes) for e in self._entries.values()
                       if isinstance(e, TensorEntry) and e.layout is not None)
        if len(out) != expected:
            raise Bad(f"index lists {len(out)} slices, the manifest assigns rank {rank} {expected}")
        return out
