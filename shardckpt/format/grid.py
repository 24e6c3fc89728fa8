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
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Grid", "Writers", "Layout", "detect_layout", "LayoutError"]


class LayoutError(ValueError):
    """A layout document that does not describe a valid grid (raised by ``from_json``)."""


@dataclass(frozen=True)
class Grid:
    """Per dimension the cut points ``0 = c0 < c1 < ... < ck = size``."""

    cuts: tuple[tuple[int, ...], ...]
    blocks: tuple[int | None, ...]  # the block size where a dim's cuts are regular (encoding)

    @classmethod
    def make(cls, cuts: Sequence[Sequence[int]]) -> Grid:
        blocks: list[int | None] = []
        for c in cuts:
            first = c[1] - c[0]
            # regular: every cell but the last is `first` long, the last no longer
            regular = all(b - a == first for a, b in zip(c[:-2], c[1:-1])) and c[-1] - c[-2] <= first
            blocks.append(first if regular else None)
        return cls(tuple(tuple(c) for c in cuts), tuple(blocks))

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(len(c) - 1 for c in self.cuts)

    @property
    def num_boxes(self) -> int:
        return math.prod(self.counts)

    def box(self, j: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(offsets, sizes)`` of box ``j`` (row-major over the cells)."""
        cells = []
        for n in reversed(self.counts):
            j, r = divmod(j, n)
            cells.append(r)
        cells.reverse()
        return (tuple(c[i] for c, i in zip(self.cuts, cells)),
                tuple(c[i + 1] - c[i] for c, i in zip(self.cuts, cells)))

    def overlapping(self, offsets: Sequence[int], sizes: Sequence[int]) -> Iterator[int]:
        """Ordinals of the boxes that intersect the region (arithmetic, not a scan)."""
        ranges = []
        for c, b, lo, n in zip(self.cuts, self.blocks, offsets, sizes):
            if n <= 0:
                return
            hi = lo + n
            if b:
                first, last = lo // b, min((hi - 1) // b, len(c) - 2)
            else:
                first, last = bisect.bisect_right(c, lo) - 1, bisect.bisect_left(c, hi) - 1
            ranges.append(range(first, last + 1))
        counts = self.counts
        for cell in itertools.product(*ranges):
            j = 0
            for i, n in zip(cell, counts):
                j = j * n + i
            yield j

    def to_json(self) -> list[Any]:
        return [b if b is not None else list(c) for c, b in zip(self.cuts, self.blocks)]

    @classmethod
    def from_json(cls, doc: Any, shape: Sequence[int]) -> Grid:
        if not isinstance(doc, list) or len(doc) != len(shape) or not shape:
            raise LayoutError(f"grid must list one cut spec per dimension of {list(shape)}")
        cuts = []
        for d, (spec, n) in enumerate(zip(doc, shape)):
            if isinstance(spec, int) and not isinstance(spec, bool):
                if spec <= 0 or n <= 0:
                    raise LayoutError(f"grid dim {d}: block {spec} of a dimension of size {n}")
                c = list(range(0, n, spec)) + [n]
            elif isinstance(spec, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in spec):
                c = spec
                if len(c) < 2 or c[0] != 0 or c[-1] != n or any(b <= a for a, b in zip(c, c[1:])):
                    raise LayoutError(f"grid dim {d}: cuts must rise strictly from 0 to {n}")
            else:
                raise LayoutError(f"grid dim {d}: expected a block size or a list of cuts")
            cuts.append(c)
        grid = cls.make(cuts)
        if grid.to_json() != doc:  # one encoding per grid: the manifest stays canonical
            raise LayoutError("grid is not in its canonical encoding")
        return grid


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
    cuts, cells = [], []
    for d in range(ndim):
        c = np.unique(np.concatenate([offsets[:, d], [shape[d]]]))
        if c[0] != 0 or c[-1] != shape[d]:
            return None
        i = np.searchsorted(c, offsets[:, d])
        if not (c[np.minimum(i + 1, len(c) - 1)] - offsets[:, d] == sizes[:, d]).all() or (i + 1 >= len(c)).any():
            return None
        cuts.append([int(x) for x in c])
        cells.append(i)
    counts = [len(c) - 1 for c in cuts]
    if math.prod(counts) != m:
        return None
    order = np.zeros(m, dtype=np.int64)
    for i, n in zip(cells, counts):
        order = order * n + i
    if len(np.unique(order)) != m:
        return None
    by_ordinal = np.empty(m, dtype=np.int64)
    by_ordinal[order] = writers
    return Layout(Grid.make(cuts), Writers.of_array(by_ordinal)), order
