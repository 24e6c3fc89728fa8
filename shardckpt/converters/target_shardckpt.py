"""Writing a shardckpt checkpoint from a stream, in one process, with ``save``'s
guarantees: it fails closed on a committed checkpoint or foreign files, every
chunk gets a CRC32C, and the manifest is committed last through the store, so a
conversion that fails or is killed leaves an incomplete directory, never a
loadable one.

Call order (one process is the coordinator and the only rank):

1. ``CheckpointDir.prepare(overwrite=False)``, then ``write_probe`` (on object
   stores it is what makes a conversion in flight, or a killed one, visible as
   an incomplete checkpoint that the next save there cleans up).
2. One shard file ``data/<save_id>-r00000.bin``: each tensor's pieces, in C order,
   cut into chunks of ``knobs.chunk_bytes`` (never across a piece), encoded on
   ``Compression.threads`` threads when compressed, checksummed, appended; then
   small JSON values inline, other values as raw blobs. Closed durably.
3. ``CheckpointDir.commit(manifest)`` (sizes checked, manifest published), then
   ``remove_unreferenced`` (the probe).

Every tensor is stored whole (one slice), so ``shardckpt.load`` at any world
size reads just the byte ranges each rank needs, as for any checkpoint.
"""

from __future__ import annotations

import platform
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .. import knobs
from ..backends import ShardFile, Storage
from ..cli.progress import Progress
from ..dcp.writer import default_compression
from ..format.codec import Compression, encode
from ..format.codec import resolve as resolve_compression
from ..format.layout import dtype_name, split_chunks
from ..format.manifest import (
    DATA_DIR,
    MANIFEST_NAME,
    BlobRef,
    ChunkInfo,
    Entry,
    Manifest,
    ObjectEntry,
    TensorEntry,
    TensorShard,
)
from ..format.objects import INLINE_LIMIT
from ..native.crc32c import crc32c
from ..store import CheckpointDir
from .items import Source
from .output import Written, checked_pieces, encoded_objects
from .plan import Plan

__all__ = ["write_shardckpt"]


class _Appender:
    """Appends chunked, checksummed (and maybe encoded) blobs to one shard file."""

    def __init__(self, file: ShardFile, chunk_bytes: int, cfg: Compression | None) -> None:
        self.file, self.pos, self.chunk_bytes, self.cfg = file, 0, chunk_bytes, cfg
        self._pool = ThreadPoolExecutor(cfg.threads, "shardckpt-convert-encode") if cfg else None

    def _encode(self, view: memoryview, itemsize: int, floating: bool) -> tuple[ChunkInfo, Any]:
        codec, stored = encode(view, itemsize, self.cfg, floating=floating)
        sv = memoryview(stored)
        return ChunkInfo(codec, view.nbytes, sv.nbytes, crc32c(sv)), stored

    def append(self, data: memoryview, itemsize: int, floating: bool, compress: bool = True) -> list[ChunkInfo]:
        views = [data[s:e] for s, e in split_chunks(data.nbytes, self.chunk_bytes, itemsize)]
        if self._pool is not None and compress:
            done = list(self._pool.map(lambda v: self._encode(v, itemsize, floating), views))
        else:
            done = [(ChunkInfo("raw", v.nbytes, v.nbytes, crc32c(v)), v) for v in views]
        for info, stored in done:
            self.file.write(stored)
            self.pos += info.stored_len
        return [info for info, _ in done]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _library() -> dict[str, str]:
    from .. import __version__

    return {"shardckpt": __version__, "torch": torch.__version__, "python": platform.python_version()}


def write_shardckpt(storage: Storage, plan: Plan, source: Source, compression: None | str | Compression,
                    max_bytes: int, progress: Progress) -> Written:
    """A new shardckpt checkpoint at ``storage`` holding the plan's keys."""
    cfg = default_compression(storage) if compression == "auto" else resolve_compression(compression)
    ckpt = CheckpointDir(storage)
    ckpt.prepare(overwrite=False)
    save_id = uuid.uuid4().hex[:16]
    ckpt.write_probe(save_id)
    rel = f"{DATA_DIR}/{save_id}-r00000.bin"
    k = knobs.get()
    done = Written()
    entries: dict[str, Entry] = {}
    file = storage.open_writer(rel)
    out = _Appender(file, k.chunk_bytes, cfg)
    try:
        chunks: dict[str, list[ChunkInfo]] = {p.key: [] for p in plan.tensors}
        starts: dict[str, int] = {}
        for p, data in checked_pieces(source, plan.tensors, max_bytes, progress):
            starts.setdefault(p.key, out.pos)
            floating = p.dtype.is_floating_point or p.dtype.is_complex
            chunks[p.key] += out.append(data, p.dtype.itemsize, floating)
        for p in plan.tensors:
            blob = BlobRef(rel, starts.get(p.key, out.pos), tuple(chunks[p.key]))
            shard = TensorShard((0,) * len(p.item.shape), tuple(p.item.shape), blob)
            entries[p.key] = TensorEntry(dtype_name(p.dtype), tuple(p.item.shape), (shard,), p.key_path)
        for o, (enc, payload, value) in encoded_objects(source, plan.objects, done):
            if enc == "json" and len(payload) <= INLINE_LIMIT:
                entries[o.key] = ObjectEntry("json", o.key_path, value=value)
            else:  # objects stay raw, as save stores them: their size is bounded by the file's
                start = out.pos
                info = out.append(memoryview(payload), 1, False, compress=False)
                entries[o.key] = ObjectEntry(enc, o.key_path, blob=BlobRef(rel, start, tuple(info)))  # type: ignore[arg-type]
        out.close()
        file.close()
    except BaseException:
        out.close()
        file.abort()
        raise
    manifest = Manifest(
        save_id=save_id, world_size=1, created_unix=time.time(),
        chunk_bytes=max([k.chunk_bytes] + [c.raw_len for cs in chunks.values() for c in cs]),
        files={rel: out.pos}, entries=entries, library=_library(),
        metadata={"converted_from": {"format": source.format, "path": source.url}, **source.metadata},
    )
    ckpt.commit(manifest)
    ckpt.remove_unreferenced(manifest.files)
    done.files.append(f"{storage.url.rstrip('/')}/{rel}")
    done.files.append(f"{storage.url.rstrip('/')}/{MANIFEST_NAME}")
    done.bytes_written = out.pos + storage.size(MANIFEST_NAME)
    done.keys = list(entries)
    return done
