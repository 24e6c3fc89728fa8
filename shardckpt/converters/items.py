"""What every source hands the converter, and the streaming machinery they share.

A source lists its contents first (``TensorItem`` / ``ObjectItem``: names, dtypes,
shapes; no data), so a target can lay out its files before a byte moves. Then
``Source.stream(items, out_dtypes)`` yields each tensor's elements in global C
order, as 1-D pieces of bounded size.

Pieces are produced one step ahead on a background thread (``run_jobs``): while
the target writes piece k, piece k+1 is being read, checksummed and, if asked,
cast. Each step reads into one of two alternating buffer sets, so at most two
pieces' buffers exist at a time; a piece is valid until the next one is
requested. Steps that must hold a whole tensor (an assembled one, a DCP chunk)
run ahead only within a memory budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import CorruptCheckpointError
from ..format.layout import box_flat_range

__all__ = [
    "ByteProgress",
    "TensorItem",
    "ObjectItem",
    "Item",
    "Dropped",
    "Source",
    "Buffers",
    "Job",
    "Step",
    "run_jobs",
    "flat_pieces",
    "cast",
    "c_order",
    "check_tiling",
    "box_slices",
    "piece_bytes",
]


@dataclass(frozen=True)
class TensorItem:
    """A tensor of the source: ``key`` is its flattened name, ``key_path`` the nesting."""

    key: str
    key_path: tuple[str | int, ...]
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class ObjectItem:
    """A non-tensor value of the source (read with ``Source.read_object``)."""

    key: str
    key_path: tuple[str | int, ...]


Item = TensorItem | ObjectItem


@dataclass(frozen=True)
class Dropped:
    """A key that is not in the output, and why."""

    key: str
    reason: str


class ByteProgress(Protocol):
    """Where a conversion reports the bytes it has written (``cli.progress.Progress``)."""

    def advance(self, nbytes: int) -> None: ...


class Source(Protocol):
    """A readable checkpoint or file. Call order: ``items()``, then any number of
    ``stream`` / ``read_object`` calls, then ``close()``."""

    format: str
    url: str
    #: Keys the source could not offer at all (unsupported dtype or layout), with why.
    dropped: list[Dropped]
    #: JSON-able facts worth keeping in a shardckpt manifest (e.g. safetensors metadata).
    metadata: dict[str, Any]

    def items(self) -> list[Item]: ...

    def stream(self, items: Sequence[TensorItem], out_dtypes: Sequence[torch.dtype],
               max_bytes: int) -> Iterator[tuple[TensorItem, torch.Tensor]]:
        """Each item's elements in C order as 1-D tensors of its out dtype, at most
        ``max_bytes`` of source bytes each; items without elements yield nothing."""
        ...

    def read_object(self, item: ObjectItem) -> Any: ...

    def close(self) -> None: ...


class Buffers:
    """Reusable byte buffers of one job slot: the i-th ``alloc`` of a job gets the
    i-th buffer, grown when too small. Reusing them avoids page-faulting fresh
    memory for every piece (several times slower than copying into warm pages)."""

    def __init__(self) -> None:
        self._bufs: list[torch.Tensor] = []
        self._next = 0

    def reset(self) -> None:
        self._next = 0

    def alloc(self, nbytes: int) -> torch.Tensor:
        i, self._next = self._next, self._next + 1
        if i == len(self._bufs):
            self._bufs.append(torch.empty(0, dtype=torch.uint8))
        if self._bufs[i].numel() < nbytes:
            self._bufs[i] = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self._bufs[i] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return self._bufs[i][:nbytes]


#: A unit of reading: given a buffer slot, return pieces (1-D tensors) that may
#: live in that slot's buffers.
Job = Callable[[Buffers], list[torch.Tensor]]


@dataclass(frozen=True)
class Step:
    """One job of a stream. ``held`` is the memory ``run`` allocates beyond its
    slot's buffers (an assembled tensor, a loaded DCP chunk): it decides whether
    the step may run ahead. Pieces are cast to ``out_dtype`` as they are handed
    out, unless ``run`` already did (light steps cast on the background thread)."""

    item: TensorItem
    run: Job
    out_dtype: torch.dtype
    held: int = 0


def run_jobs(steps: Iterable[Step], budget: int) -> Iterator[tuple[TensorItem, torch.Tensor]]:
    """Run ``steps`` in order on a background thread, yielding their pieces.

    Step k+1 runs ahead while the consumer works through step k's pieces, using
    buffer slot (k+1) % 2, last used by step k-1, which is consumed by then. A
    step that holds memory only runs ahead if it and step k together hold at most
    ``budget``; otherwise it starts once step k is consumed. The last piece of a
    step that holds memory goes out as a copy, so that its tensor is freed as soon
    as the consumer asks for more. Memory is thus the two slots' buffers plus at
    most max(``budget``, the largest ``held``).
    """
    slots = (Buffers(), Buffers())
    it = iter(steps)

    def run(step: Step, slot: Buffers) -> list[torch.Tensor]:
        slot.reset()
        return step.run(slot)

    with ThreadPoolExecutor(1, thread_name_prefix="shardckpt-convert") as pool:
        k = 0
        cur = next(it, None)
        fut: Future[list[torch.Tensor]] | None = pool.submit(run, cur, slots[0]) if cur else None
        try:
            while cur is not None:
                if fut is None:
                    fut = pool.submit(run, cur, slots[k % 2])
                pieces = fut.result()
                nxt = next(it, None)
                ahead = nxt is not None and (nxt.held == 0 or nxt.held + cur.held <= budget)
                fut = pool.submit(run, nxt, slots[(k + 1) % 2]) if nxt is not None and ahead else None
                if cur.held and pieces:  # the consumer keeps the last piece while we go on
                    pieces[-1] = pieces[-1].clone()
                for i in range(len(pieces)):
                    yield cur.item, cast(pieces[i], cur.out_dtype)
                del pieces
                cur, k = nxt, k + 1
        finally:
            if fut is not None:
                fut.cancel()
                try:
                    fut.result()
                except Exception:  # noqa: BLE001 - the error being raised already matters more
                    pass


def piece_bytes(max_bytes: int, itemsize: int) -> int:
    """Bytes per piece: half of ``max_bytes`` (two pieces are in flight), whole elements."""
    half = max(itemsize, max_bytes // 2)
    return half - half % itemsize


def flat_pieces(t: torch.Tensor, max_bytes: int) -> list[torch.Tensor]:
    """``t`` (contiguous) as 1-D views of at most ``piece_bytes`` each (no copy)."""
    flat = t.reshape(-1)
    step = piece_bytes(max_bytes, t.dtype.itemsize) // max(t.dtype.itemsize, 1)
    return [flat[i : i + step] for i in range(0, flat.numel(), step)]


def cast(piece: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return piece if piece.dtype == out_dtype else piece.to(out_dtype)


def c_order(shape: Sequence[int], boxes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[int] | None:
    """If the non-empty boxes (offsets, sizes) are each one contiguous run of the
    tensor in C order and together tile it, their indices in that order (then the
    tensor streams as a concatenation); else None."""
    runs = []
    for i, (off, size) in enumerate(boxes):
        if math.prod(size) == 0:
            continue
        lo, hi = box_flat_range(shape, off, size)
        if hi - lo != math.prod(size):
            return None
        runs.append((lo, hi, i))
    runs.sort()
    pos = 0
    for lo, hi, _ in runs:
        if lo != pos:
            return None
        pos = hi
    return [i for _, _, i in runs] if pos == math.prod(shape) else None


def check_tiling(key: str, shape: Sequence[int], boxes: Sequence[tuple[Sequence[int], Sequence[int]]],
                 where: str) -> None:
    """Raise ``CorruptCheckpointError`` unless the boxes cover the tensor exactly once
    (a hole would leave garbage in the output, an overlap means a damaged index)."""
    live = [(list(o), list(s)) for o, s in boxes if math.prod(s)]
    for o, s in live:
        if len(o) != len(shape) or any(a + n > g for a, n, g in zip(o, s, shape)):
            raise CorruptCheckpointError(f"{where}: key {key!r}: slice {o}+{s} exceeds shape {list(shape)}",
                                         key=key)
    covered = sum(math.prod(s) for _, s in live)
    overlap = any(
        all(a1 < a2 + n2 and a2 < a1 + n1 for a1, n1, a2, n2 in zip(o1, s1, o2, s2))
        for i, (o1, s1) in enumerate(live) for o2, s2 in live[i + 1:]
    )
    if covered != math.prod(shape) or overlap:
        raise CorruptCheckpointError(
            f"{where}: key {key!r}: its stored slices do not cover shape {list(shape)} exactly once "
            f"({covered} of {math.prod(shape)} elements{', overlapping' if overlap else ''})", key=key)


def box_slices(offsets: Sequence[int], sizes: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(offsets, sizes))
