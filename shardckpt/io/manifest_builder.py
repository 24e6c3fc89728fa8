"""Building a checkpoint's manifest from what the ranks wrote: the one place where
file sizes are added up, object entries made and a ``Manifest`` put together, for
every writer (shardckpt's own planning, DCP's planning, converters).

Also what names a save's files: its save id, each rank's shard file and index.

``[coord]`` only: the coordinator builds the manifest once every rank reported
(``RankWritten`` under shardckpt's planning, DCP ``WriteResult`` lists under DCP's).
"""

from __future__ import annotations

import platform
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointWriteError
from ..format import jsoncodec
from ..format.entries import LaidOutShards
from ..format.grid import Layout
from ..format.index import index_name
from ..format.manifest import (
    DATA_DIR,
    BlobRef,
    ChunkInfo,
    Entry,
    Manifest,
    ObjectEntry,
    TensorEntry,
    TensorShard,
)

__all__ = [
    "KeySpec", "Skeleton", "Stored", "RankWritten", "ShardTarget", "new_save_id", "shard_name",
    "assigned_target", "build_manifest", "new_manifest", "object_entry", "add_file_sizes", "library_versions",
]

#: A key's structure: (kind "t"/"o", dtype name or "", global shape, key path).
KeySpec = tuple[str, str, tuple[int, ...], tuple[Any, ...]]


@dataclass(frozen=True)
class Skeleton:
    """The manifest's structure, known once planning is done: per sorted key its spec
    and layout (None: its slices are listed in the manifest from the write results)."""

    world_size: int
    keys: tuple[str, ...]
    specs: tuple[KeySpec, ...]
    layouts: tuple[Layout | None, ...]


@dataclass(frozen=True)
class Stored:
    """Where one written item's bytes went (travels to the coordinator)."""

    file: str | None
    offset: int
    chunks: tuple[ChunkInfo, ...]
    encoding: str | None = None  # objects only
    inline: Any = None  # inline JSON object value

    @property
    def end(self) -> int:
        return self.offset + sum(c.stored_len for c in self.chunks)

    @property
    def blob(self) -> BlobRef | None:
        return None if self.file is None else BlobRef(self.file, self.offset, self.chunks)


@dataclass(frozen=True)
class RankWritten:
    """What a rank reports after writing under shardckpt's planning: the places of its
    items listed in the manifest, its index, and its files' sizes. Small: an item
    described in the index does not travel."""

    listed: list[tuple[str, tuple[int, ...], tuple[int, ...] | None, Stored]]  # key, offsets, sizes, where
    index: tuple[str, int, int] | None  # file, size, crc32c
    files: dict[str, int]
    max_chunk: int


@dataclass(frozen=True)
class ShardTarget:
    """Set by the coordinator during planning: where this rank writes. With ``index``
    (shardckpt's own planning) item ``i`` of the plan is box ``boxes[i]`` of key
    ``key_nos[i]`` in this rank's index file, or listed in the manifest (box -1)."""

    file: str
    probe: str | None = None  # the coordinator's probe token (several ranks)
    index: str | None = None
    key_nos: Any = None  # int array, one per plan item
    boxes: Any = None
    save_id: str = ""
    rank: int = 0


def new_save_id() -> str:
    """A fresh id: every file of one save carries it, so a save never mixes with another's."""
    return uuid.uuid4().hex[:16]


def shard_name(save_id: str, rank: int) -> str:
    return f"{DATA_DIR}/{save_id}-r{rank:05d}.bin"


def assigned_target(save_id: str, rank: int, probe: str | None, key_nos: Any, boxes: Any) -> ShardTarget:
    """Where rank ``rank`` writes under shardckpt's planning (an index only if it has boxes)."""
    has_boxes = boxes is not None and len(boxes) and (boxes >= 0).any()
    return ShardTarget(shard_name(save_id, rank), probe, index_name(save_id, rank) if has_boxes else "",
                       key_nos, boxes, save_id, rank)


def add_file_sizes(files: dict[str, int], stored: Iterable[Stored]) -> dict[str, int]:
    """Each file's size: the end of the last blob any rank put in it."""
    for st in stored:
        if st.file is not None:
            files[st.file] = max(files.get(st.file, 0), st.end)
    return files


def object_entry(key: str, st: Stored, key_path: tuple[Any, ...]) -> ObjectEntry:
    if st.encoding is None:
        raise CheckpointWriteError(f"key {key!r} was written as a tensor, planned as an object", key=key)
    return ObjectEntry(st.encoding, key_path, value=st.inline, blob=st.blob)  # type: ignore[arg-type]


def library_versions() -> dict[str, str]:
    from .. import __version__

    return {"shardckpt": __version__, "torch": torch.__version__, "python": platform.python_version()}


def new_manifest(save_id: str, world_size: int, files: Mapping[str, int], entries: dict[str, Entry],
                 chunk_bytes: int, metadata: Mapping[str, Any], indexes: dict[int, tuple[str, int]] | None = None,
                 ) -> Manifest:
    """A manifest of this library, now. ``chunk_bytes``: the largest chunk any rank
    wrote (ranks may run with other knob values). ``metadata`` is stored as JSON
    (tuples read back as lists; a value JSON cannot hold is refused, naming it)."""
    try:
        metadata = jsoncodec.as_stored(dict(metadata), "metadata")
    except jsoncodec.JsonValueError as e:
        raise CheckpointWriteError(f"save metadata must be JSON: {e}") from None
    return Manifest(
        save_id=save_id, world_size=world_size, created_unix=time.time(), chunk_bytes=chunk_bytes,
        files=dict(sorted(files.items())), entries=entries, library=library_versions(),
        metadata=dict(metadata), version=2 if indexes else 1, indexes=dict(indexes or {}),
    )


def build_manifest(skeleton: Skeleton, written: list[RankWritten], save_id: str,
                   user_metadata: Mapping[str, Any], chunk_bytes: int) -> Manifest:
    """The manifest of a save planned by shardckpt: laid-out keys from the skeleton
    (their slices in the ranks' indexes), the rest from what ranks listed."""
    listed: dict[str, list[tuple[tuple[int, ...], tuple[int, ...] | None, Stored]]] = {}
    files: dict[str, int] = {}
    indexes: dict[int, tuple[str, int]] = {}
    for rank, w in enumerate(written):
        for key, offsets, sizes, st in w.listed:
            listed.setdefault(key, []).append((offsets, sizes, st))
        for rel, size in w.files.items():
            files[rel] = max(files.get(rel, 0), size)
        if w.index is not None:
            indexes[rank] = (w.index[0], w.index[2])
    entries: dict[str, Entry] = {}
    for key, spec, layout in zip(skeleton.keys, skeleton.specs, skeleton.layouts):
        kind, dtype, shape, key_path = spec
        got = listed.get(key, [])
        if layout is not None:
            entries[key] = TensorEntry(dtype, shape, LaidOutShards(key, layout), key_path, layout=layout)
        elif kind == "t":
            if not got or any(st.blob is None for _, _, st in got):
                raise CheckpointWriteError(f"no rank wrote key {key!r}", key=key)
            shards = sorted((TensorShard(o, z if z is not None else shape, st.blob)  # type: ignore[arg-type]
                             for o, z, st in got), key=lambda t: t.offsets)
            entries[key] = TensorEntry(dtype, shape, tuple(shards), key_path)
        else:
            if len(got) != 1:
                raise CheckpointWriteError(f"{len(got)} ranks wrote key {key!r}", key=key)
            entries[key] = object_entry(key, got[0][2], key_path)
    max_chunk = max([chunk_bytes] + [w.max_chunk for w in written])
    return new_manifest(save_id, skeleton.world_size, files, entries, max_chunk, user_metadata, indexes)
