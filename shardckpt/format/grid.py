"""Compact layouts of sharded tensors: a grid of boxes and who wrote each.

A tensor sharded over N ranks has N stored slices; listing each slice in the
manifest makes it O(world x tensors). Regular shardings (every DTensor
``Shard`` placement, FSDP's ``torch.chunk`` rows) are a grid instead: per
dimension the cut points (``block``: every ``b`` elements, or an explicit
list), the boxes are the grid's cells in row-major order (box ``j``), and the
rank that wrote box ``j`` is a constant, an affine ``first + step * j``, or a
list. The bytes of each box are described in that rank's index file
(``format/index.py``), so a loading rank reads only the indexes of the boxes it
needs.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Grid", "Writers", "Layout", "detect_layout", "LayoutError"]


class LayoutError(ValueError):
    """A layout document that does not describe a valid grid (raised by ``from_json``)."""


@dataclass(frozen=True)
class Grid:
    """Per dimension either a block size (cells of ``block`` elements, the last one
    shorter) or the cut points ``0 = c0 < c1 < ... < ck = size``. Block dims keep no
    cut list: a grid over N ranks costs O(1) to hold and to decode."""

    shape: tuple[int, ...]
    blocks: tuple[int | None, ...]
    cuts: tuple[tuple[int, ...] | None, ...]  # None where the dim is a block

    @classmethod
    def make(cls, cuts: Sequence[Sequence[int]]) -> Grid:
        blocks: list[int | None] = []
        lists: list[tuple[int, ...] | None] = []
        for c in cuts:
            first = c[1] - c[0]
            # regular: every cell but the last is `first` long, the last no longer
            regular = all(b - a == first for a, b in zip(c[:-2], c[1:-1])) and c[-1] - c[-2] <= first
            blocks.append(first if regular else None)
            lists.append(None if regular else tuple(c))
        return cls(tuple(c[-1] for c in cuts), tuple(blocks), tuple(lists))

    def __post_init__(self) -> None:
        # asked for on every slice lookup: computed once
        counts = tuple(-(-n // b) if b else len(c) - 1  # type: ignore[arg-type]
                       for n, b, c in zip(self.shape, self.blocks, self.cuts))
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "num_boxes", math.prod(counts))

    counts: tuple[int, ...] = field(init=False, compare=False, repr=False)
    num_boxes: int = field(init=False, compare=False, repr=False)

    def _cell(self, d: int, i: int) -> tuple[int, int]:
        b, c = self.blocks[d], self.cuts[d]
        if b or c is None:  # a dim has a block or cuts (from_json/make give one of them)
            return i * b, min(b, self.shape[d] - i * b)  # type: ignore[operator]
        return c[i], c[i + 1] - c[i]

    def box(self, j: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(offsets, sizes)`` of box ``j`` (row-major over the cells)."""
        cells = []
        for n in reversed(self.counts):
            j, r = divmod(j, n)
            cells.append(r)
        cells.reverse()
        got = [self._cell(d, i) for d, i in enumerate(cells)]
        return tuple(o for o, _ in got), tuple(n for _, n in got)

    def overlapping(self, offsets: Sequence[int], sizes: Sequence[int]) -> Iterator[int]:
        """Ordinals of the boxes that intersect the region (arithmetic, not a scan)."""
        ranges = []
        counts = self.counts
        for d, (lo, n) in enumerate(zip(offsets, sizes)):
            if n <= 0 or lo >= self.shape[d]:
                return
            hi = lo + n
            b, c = self.blocks[d], self.cuts[d]
            if b or c is None:
                first, last = lo // b, min((hi - 1) // b, counts[d] - 1)  # type: ignore[operator]
            else:
                first, last = bisect.bisect_right(c, lo) - 1, min(bisect.bisect_left(c, hi) - 1, counts[d] - 1)
            ranges.append(range(first, last + 1))
        for cell in itertools.product(*ranges):
            j = 0
            for i, n in zip(cell, counts):
                j = j * n + i
            yield j

    def to_json(self) -> list[Any]:
        return [b if b is not None else list(c or ()) for c, b in zip(self.cuts, self.blocks)]

    @classmethod
    def from_json(cls, doc: Any, shape: Sequence[int]) -> Grid:
        if not isinstance(doc, list) or len(doc) != len(shape) or not shape:
            raise LayoutError(f"grid must list one cut spec per dimension of {list(shape)}")
        blocks: list[int | None] = []
        lists: list[tuple[int, ...] | None] = []
        for d, (spec, n) in enumerate(zip(doc, shape)):
            if isinstance(spec, int) and not isinstance(spec, bool):
                if spec <= 0 or n <= 0:
                    raise LayoutError(f"grid dim {d}: block {spec} of a dimension of size {n}")
                blocks.append(spec)
                lists.append(None)
            elif isinstance(spec, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in spec):
                c = spec
                if len(c) < 2 or c[0] != 0 or c[-1] != n or any(b <= a for a, b in zip(c, c[1:])):
                    raise LayoutError(f"grid dim {d}: cuts must rise strictly from 0 to {n}")
                # one encoding per grid (the manifest stays canonical): regular cuts are a block
                if cls.make([c]).blocks[0] is not None:
                    raise LayoutError(f"grid dim {d}: regular cuts must be written as a block size")
                blocks.append(None)
                lists.append(tuple(c))
            else:
                raise LayoutError(f"grid dim {d}: expected a block size or a list of cuts")
        return cls(tuple(shape), tuple(blocks), tuple(lists))


@dataclass(frozen=True)
class Writers:
    """Which rank wrote box ``j``: ``first + step * j``, or ``ranks[j]``."""

    first: int = 0
    step: int = 0
    ranks: tuple[int, ...] | None = None

    def of(self, j: int) -> int:
        return self.ranks[j] if self.ranks is not None else self.first + self.step * j

    def boxes_of(self, rank: int, num_boxes: int) -> int:
        """How many boxes ``rank`` wrote."""
        if self.ranks is not None:
            return sum(1 for r in self.ranks if r == rank)
        if self.step == 0:
            return num_boxes if rank == self.first else 0
        j, rem = divmod(rank - self.first, self.step)
        return 1 if rem == 0 and 0 <= j < num_boxes else 0

    @classmethod
    def of_array(cls, w: np.ndarray) -> Writers:
        if len(w) and (w == w[0]).all():
            return cls(int(w[0]), 0)
        if len(w) > 1:
            step = int(w[1] - w[0])
            if step > 0 and (w == w[0] + step * np.arange(len(w))).all():
                return cls(int(w[0]), step)
        return cls(ranks=tuple(int(x) for x in w))

    def to_json(self) -> Any:
        if self.ranks is not None:
            return list(self.ranks)
        return self.first if self.step == 0 else {"first": self.first, "step": self.step}

    @classmethod
    def from_json(cls, doc: Any, num_boxes: int, world_size: int) -> Writers:
        def rank(x: Any) -> int:
            if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < world_size:
                raise LayoutError(f"writer rank {x!r} is not a rank of a world of {world_size}")
            return x

        if isinstance(doc, dict) and set(doc) == {"first", "step"}:
            w = cls(rank(doc["first"]), doc["step"])
            if not isinstance(w.step, int) or isinstance(w.step, bool) or w.step <= 0:
                raise LayoutError(f"writers step {doc['step']!r} must be a positive integer")
            rank(w.of(num_boxes - 1))
        elif isinstance(doc, list):
            if len(doc) != num_boxes:
                raise LayoutError(f"writers lists {len(doc)} ranks for {num_boxes} boxes")
            w = cls(ranks=tuple(rank(x) for x in doc))
        else:
            w = cls(rank(doc), 0)
        if w.to_json() != doc or (w.ranks is not None and cls.of_array(np.array(w.ranks)).ranks is None):
            raise LayoutError("writers are not in their canonical encoding")
        return w


@dataclass(frozen=True)
class Layout:
    grid: Grid
    writers: Writers

    def to_json(self) -> dict[str, Any]:
        return {"grid": self.grid.to_json(), "writers": self.writers.to_json()}


def detect_layout(shape: Sequence[int], offsets: np.ndarray, sizes: np.ndarray,
                  writers: np.ndarray) -> tuple[Layout, np.ndarray] | None:
    """The grid the non-empty boxes ``offsets``/``sizes`` (int arrays, one row per
    box) form, with ``order``: box row -> ordinal; None if they are not a full grid."""
    m, ndim = offsets.shape
    if m == 0 or ndim == 0 or ndim != len(shape):
        return None
    blocks: list[int | None] = []
    lists: list[tuple[int, ...] | None] = []
    counts, cells = [], []
    for d in range(ndim):
        c = np.unique(np.concatenate([offsets[:, d], [shape[d]]]))
        if c[0] != 0 or c[-1] != shape[d] or len(c) < 2:
            return None
        i = np.searchsorted(c, offsets[:, d])
        if (i + 1 >= len(c)).any() or not (c[i + 1] - offsets[:, d] == sizes[:, d]).all():
            return None
        steps = np.diff(c)
        # regular (every cell but the last `steps[0]` long): a block size, no cut list
        regular = bool((steps[:-1] == steps[0]).all() and steps[-1] <= steps[0])
        blocks.append(int(steps[0]) if regular else None)
        lists.append(None if regular else tuple(int(x) for x in c))
        counts.append(len(c) - 1)
        cells.append(i)
    if math.prod(counts) != m:
        return None
    order = np.zeros(m, dtype=np.int64)
    for i, n in zip(cells, counts):
        order = order * n + i
    if len(np.unique(order)) != m:
        return None
    by_ordinal = np.empty(m, dtype=np.int64)
    by_ordinal[order] = writers
    grid = Grid(tuple(int(x) for x in shape), tuple(blocks), tuple(lists))
    return Layout(grid, Writers.of_array(by_ordinal)), order
