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

from .. import knobs
from ..backends import Storage
from ..format.codec import Compression
from ..format.codec import resolve as resolve_compression
from ..format.layout import dtype_name
from ..format.manifest import (
    MANIFEST_NAME,
    BlobRef,
    ChunkInfo,
    Entry,
    ObjectEntry,
    TensorEntry,
    TensorShard,
)
from ..format.objects import INLINE_LIMIT
from ..io.manifest_builder import new_manifest, new_save_id, shard_name
from ..io.save_target import default_compression
from ..io.shard_writer import ShardWriter
from ..store import CheckpointDir
from .items import ByteProgress, Source
from .output import Written, checked_pieces, encoded_objects
from .selection import Plan

__all__ = ["write_shardckpt"]


def write_shardckpt(storage: Storage, plan: Plan, source: Source, compression: None | str | Compression,
                    max_bytes: int, progress: ByteProgress) -> Written:
    """A new shardckpt checkpoint at ``storage`` holding the plan's keys."""
    cfg = default_compression(storage) if compression == "auto" else resolve_compression(compression)
    ckpt = CheckpointDir(storage)
    ckpt.prepare(overwrite=False)
    save_id = new_save_id()
    ckpt.write_probe(save_id)
    rel = shard_name(save_id, 0)
    k = knobs.get()
    done = Written()
    out = ShardWriter(storage, rel, k.chunk_bytes, cfg)
    try:
        entries = _write_entries(out, plan, source, max_bytes, progress, done)
        out.close()
    except BaseException:
        out.abort()
        raise
    chunk_bytes = max([k.chunk_bytes] + [c.raw_len for e in entries.values() for c in _chunks(e)])
    metadata = {"converted_from": {"format": source.format, "path": source.url}, **source.metadata}
    manifest = new_manifest(save_id, 1, {rel: out.pos}, entries, chunk_bytes, metadata)
    ckpt.commit(manifest)
    ckpt.remove_unreferenced(manifest.files)
    done.files.append(f"{storage.url.rstrip('/')}/{rel}")
    done.files.append(f"{storage.url.rstrip('/')}/{MANIFEST_NAME}")
    done.bytes_written = out.pos + storage.size(MANIFEST_NAME)
    done.keys = list(entries)
    return done


def _write_entries(out: ShardWriter, plan: Plan, source: Source, max_bytes: int, progress: ByteProgress,
                   done: Written) -> dict[str, Entry]:
    """Every tensor's pieces (one blob per tensor), then the objects, into ``out``."""
    rel = out.rel
    entries: dict[str, Entry] = {}
    chunks: dict[str, list[ChunkInfo]] = {p.key: [] for p in plan.tensors}
    starts: dict[str, int] = {}
    for p, data in checked_pieces(source, plan.tensors, max_bytes, progress):
        starts.setdefault(p.key, out.pos)
        floating = p.dtype.is_floating_point or p.dtype.is_complex
        chunks[p.key] += out.append([(data, None)], p.dtype.itemsize, floating=floating)[1]
    for p in plan.tensors:
        blob = BlobRef(rel, starts.get(p.key, out.pos), tuple(chunks[p.key]))
        shard = TensorShard((0,) * len(p.item.shape), tuple(p.item.shape), blob)
        entries[p.key] = TensorEntry(dtype_name(p.dtype), tuple(p.item.shape), (shard,), p.key_path)
    for o, (enc, payload, value) in encoded_objects(source, plan.objects, done):
        if enc == "json" and len(payload) <= INLINE_LIMIT:
            entries[o.key] = ObjectEntry("json", o.key_path, value=value)
        else:  # objects stay raw, as save stores them: their size is bounded by the file's
            start, info = out.append([(memoryview(payload), None)], compress=False)
            entries[o.key] = ObjectEntry(enc, o.key_path, blob=BlobRef(rel, start, info))  # type: ignore[arg-type]
    return entries


def _chunks(e: Entry) -> tuple[ChunkInfo, ...]:
    if isinstance(e, TensorEntry):
        return e.shards[0].blob.chunks
    return e.blob.chunks if e.blob is not None else ()
