"""What a manifest says about each key: the data classes of the decoded manifest.

A tensor entry either lists its stored slices (``shards``: one slice per
stored box, with its bytes' place) or, for a sharded tensor saved by many
ranks, carries a compact ``layout`` (``format/grid.py``) and finds each box's
bytes in the index file of the rank that wrote it, read on first use
(``ShardSource``): a loading rank touches only the indexes it needs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .grid import Layout

__all__ = ["ChunkInfo", "BlobRef", "TensorShard", "TensorEntry", "LaidOutShards", "ObjectEntry", "Entry", "ShardSource"]

ObjectEncoding = Literal["json", "bytes", "bytesio", "torch"]


@dataclass(frozen=True)
class ChunkInfo:
    codec: str
    raw_len: int
    stored_len: int
    crc32c: int


@dataclass(frozen=True)
class BlobRef:
    """A run of consecutive chunks in one shard file, starting at byte ``offset``."""

    file: str
    offset: int
    chunks: tuple[ChunkInfo, ...]

    @property
    def raw_len(self) -> int:
        return sum(c.raw_len for c in self.chunks)

    @property
    def stored_len(self) -> int:
        return sum(c.stored_len for c in self.chunks)


@dataclass(frozen=True)
class TensorShard:
    """One stored slice of a tensor: ``sizes`` elements at ``offsets`` of the global shape."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    blob: BlobRef


class ShardSource(Protocol):
    """Where the boxes of laid-out entries are described (the per-rank indexes)."""

    def shard(self, key: str, j: int) -> TensorShard: ...


class LaidOutShards(Sequence[TensorShard]):
    """The slices of a laid-out entry as a sequence: item ``j`` is looked up in its
    writer's index on first access, so ``entry.shards[j]`` reads one index, not all."""

    def __init__(self, key: str, layout: Layout) -> None:
        self.key, self.layout = key, layout
        self.source: ShardSource | None = None  # set once the manifest's indexes are known

    def __len__(self) -> int:
        return self.layout.grid.num_boxes

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return tuple(self[i] for i in range(*j.indices(len(self))))
        if not -len(self) <= j < len(self):
            raise IndexError(j)
        if self.source is None:
            raise LookupError(f"key {self.key!r}: its slices are in per-rank indexes and no storage was given")
        return self.source.shard(self.key, j % len(self))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LaidOutShards) and (self.key, self.layout) == (other.key, other.layout)

    def __hash__(self) -> int:
        return hash((self.key, self.layout))

    def __repr__(self) -> str:
        return f"LaidOutShards({self.key!r}, {len(self)} slices)"


@dataclass(frozen=True)
class TensorEntry:
    """A tensor: dtype, global shape, and its stored slices (listed, or laid out:
    then ``shards`` is a ``LaidOutShards`` and ``layout`` the grid)."""

    dtype: str
    shape: tuple[int, ...]
    shards: Sequence[TensorShard]
    key_path: tuple[str | int, ...]
    layout: Layout | None = None

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def box(self, j: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(offsets, sizes)`` of slice ``j``, without reading any index."""
        if self.layout is not None:
            return self.layout.grid.box(j)
        s = self.shards[j]
        return s.offsets, s.sizes

    def overlapping(self, offsets: Sequence[int], sizes: Sequence[int]) -> Iterator[int]:
        """Ordinals of the slices that intersect a region (arithmetic on a grid)."""
        if self.layout is not None:
            yield from self.layout.grid.overlapping(offsets, sizes)
            return
        for j, s in enumerate(self.shards):
            if all(o < lo + n and lo < o + m for o, m, lo, n in zip(s.offsets, s.sizes, offsets, sizes)):
                yield j

    def find(self, offsets: Sequence[int]) -> int | None:
        """The ordinal of the slice that starts at ``offsets``."""
        offsets = tuple(offsets)
        if self.layout is not None:
            for j in self.layout.grid.overlapping(offsets, [1] * len(offsets)):
                return j if self.layout.grid.box(j)[0] == offsets else None
            return None
        return next((j for j, s in enumerate(self.shards) if s.offsets == offsets), None)


@dataclass(frozen=True)
class ObjectEntry:
    """A non-tensor value: inline JSON (``value``), or a blob of bytes / JSON / weights-only torch."""

    encoding: ObjectEncoding
    key_path: tuple[str | int, ...]
    value: Any = None
    blob: BlobRef | None = None


Entry = TensorEntry | ObjectEntry
