"""Staging: the only part of an async save that blocks training is copying the
tensors this rank will write into host buffers that are reused across saves.

Two modes:

* **Unbounded** (default): one buffer per write item, allocated once (pinned on
  CUDA, pre-faulted on CPU: a copy into fresh memory runs ~5x slower because of
  page faults) and reused while the item keeps its size.
* **Budgeted** (``budget_bytes``): two slabs of ``budget/2`` bytes. Items are
  copied slab by slab and streamed to the background writer, which hands a slab
  back once its bytes are on disk; the caller blocks until the last slab is
  staged, and host memory stays within the budget.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex

__all__ = ["StagingPool", "StagedTensor", "SlabStream"]


def _alloc(nbytes: int, pinned: bool) -> torch.Tensor:
    buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned)
    buf.zero_()  # fault every page in now, not during the first copy
    return buf


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's elements as a flat uint8 view (a non-contiguous one is copied first)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


Release = Callable[[], None]


@dataclass
class StagedTensor:
    """A staged copy of one write item's tensor: its bytes as pieces, in order.

    Each piece comes with a ``release`` callable (or None) that the writer calls
    once the piece's bytes are written, handing its slab back to the stager.
    """

    dtype: torch.dtype
    nbytes: int
    pieces: Iterator[tuple[memoryview, Release | None]]


class StagingPool:
    """Reusable staging buffers for one engine (one save in flight at a time)."""

    def __init__(self) -> None:
        self._buffers: dict[MetadataIndex, torch.Tensor] = {}
        self._slabs: list[torch.Tensor] = []
        self._stream: torch.cuda.Stream | None = None

    @property
    def held_bytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values()) + sum(s.numel() for s in self._slabs)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if src.device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=src.device)
            self._stream.wait_stream(torch.cuda.current_stream(src.device))
            with torch.cuda.stream(self._stream):
                dst.copy_(src, non_blocking=True)
        else:
            dst.copy_(src)

    def _sync(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    def stage(self, items: list[tuple[MetadataIndex, torch.Tensor]]) -> dict[MetadataIndex, StagedTensor]:
        """Unbounded mode: copy every tensor into its reused buffer; returns when all are copied."""
        self._slabs.clear()
        keep: dict[MetadataIndex, torch.Tensor] = {}
        staged: dict[MetadataIndex, StagedTensor] = {}
        for index, t in items:
            nbytes = t.numel() * t.element_size()
            pinned = t.device.type == "cuda"
            buf = self._buffers.get(index)
            if buf is None or buf.numel() != max(nbytes, 1) or buf.is_pinned() != pinned:
                buf = _alloc(nbytes, pinned)
            keep[index] = buf
            if nbytes:
                self._copy(buf[:nbytes].view(t.dtype).view(t.shape), t.detach())
            view = memoryview(buf[:nbytes].numpy()) if nbytes else memoryview(b"")
            staged[index] = StagedTensor(t.dtype, nbytes, iter([(view, None)]))
        self._buffers = keep  # items no longer saved release their buffers
        self._sync()
        return staged

    def stream(self, items: list[tuple[MetadataIndex, torch.Tensor]], budget_bytes: int) -> SlabStream:
        """Budgeted mode: a stream that stages slab by slab as the writer frees them."""
        self._buffers.clear()
        slab_bytes = max(budget_bytes // 2, 1 << 12)
        if len(self._slabs) != 2 or self._slabs[0].numel() != slab_bytes:
            self._slabs = [_alloc(slab_bytes, any(t.device.type == "cuda" for _, t in items)) for _ in range(2)]
        return SlabStream(self, items, self._slabs)


class SlabStream:
    """Producer (caller's thread) / consumer (writer thread) over two slabs."""

    def __init__(self, pool: StagingPool, items: list[tuple[MetadataIndex, torch.Tensor]], slabs: list[torch.Tensor]) -> None:
        self._pool, self._items, self._slabs = pool, items, slabs
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(len(slabs)):
            self._free.put(i)
        self._queues: dict[MetadataIndex, queue.Queue[tuple[memoryview, Release] | None]] = {
            index: queue.Queue() for index, _ in items
        }
        self.staged = {
            index: StagedTensor(t.dtype, t.numel() * t.element_size(), self._consume(index)) for index, t in items
        }
        self._abort = threading.Event()

    def _consume(self, index: MetadataIndex) -> Iterator[tuple[memoryview, Release | None]]:
        q = self._queues[index]
        while True:
            got = q.get()
            if got is None:
                return
            yield got

    def abort(self) -> None:
        """The writer failed: stop producing (slabs may never come back)."""
        self._abort.set()
        for _ in self._slabs:
            self._free.put(-1)

    def produce(self) -> None:
        """Copy every item slab by slab; blocks while both slabs are being written."""
        slab_bytes = self._slabs[0].numel()
        for index, t in self._items:
            src = _flat_bytes(t)
            itemsize = t.element_size()
            step = max(itemsize, slab_bytes - slab_bytes % itemsize)
            for start in range(0, src.numel(), step):
                i = self._free.get()
                if i < 0 or self._abort.is_set():
                    return
                n = min(step, src.numel() - start)
                self._pool._copy(self._slabs[i][:n], src[start : start + n])
                self._pool._sync()
                self._queues[index].put((memoryview(self._slabs[i][:n].numpy()), partial(self._free.put, i)))
            self._queues[index].put(None)
