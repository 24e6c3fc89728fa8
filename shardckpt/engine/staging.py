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

The copy itself: CPU tensors whose elements are one contiguous run of memory
(any dtype; the common case) are copied as raw bytes by ``native.copy`` (the
C++ extension: streaming stores, one GIL release for the whole batch, an
explicit thread count); in unbounded mode all of them go in one call, so a
state of many small tensors pays the per-call cost once. Everything else
(CUDA tensors, strided views, conjugate/negative views) goes through
``Tensor.copy_``, which knows about strides, lazy views and devices. The thread
count is ``torch.get_num_threads()`` (capped by the CPUs this process may run
on): torchrun sets it to cores / ranks, and more threads than that only fight
the other ranks for the same cores.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex

from ..io.shard_writer import Release, StagedTensor
from ..native import copy as native_copy

__all__ = ["StagingPool", "StagedTensor", "SlabStream", "copy_threads"]


def _alloc(nbytes: int, pinned: bool) -> torch.Tensor:
    buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned)
    buf.zero_()  # fault every page in now, not during the first copy
    return buf


def _host_bytes(t: torch.Tensor) -> np.ndarray | None:
    """A CPU tensor's bytes as a flat uint8 array sharing its memory, or None when
    its bytes are not simply its elements in order (strided, lazy conj/neg view,
    quantized, another device, a tensor subclass): those need ``Tensor.copy_``."""
    t = t.detach()
    if (
        type(t) is not torch.Tensor
        or t.device.type != "cpu"
        or t.layout != torch.strided
        or t.is_quantized
        or t.is_conj()
        or t.is_neg()
        or not t.is_contiguous()
    ):
        return None
    # an n-D byte view is as good as a flat one for the buffer protocol; only a
    # 0-dim tensor needs a reshape (saves ~1 us per tensor on states of many)
    return (t if t.dim() else t.reshape(1)).view(torch.uint8).numpy()


def copy_threads() -> int:
    """Threads one staging copy may use: torch's intra-op thread count (torchrun
    sets it to cores / ranks), capped by the CPUs this process may run on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cpus))


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's elements as a flat uint8 view (a non-contiguous one, or a lazy
    conjugate / negative view, is materialized first; others are not copied)."""
    return t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


class StagingPool:
    """Reusable staging buffers for one engine (one save in flight at a time)."""

    def __init__(self) -> None:
        self._buffers: dict[MetadataIndex, torch.Tensor] = {}
        # numpy views of the buffers, made once: slicing a tensor per item per
        # save costs more than the copy of a small tensor
        self._views: dict[MetadataIndex, np.ndarray] = {}
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
        views: dict[MetadataIndex, np.ndarray] = {}
        staged: dict[MetadataIndex, StagedTensor] = {}
        dsts: list[np.ndarray] = []
        srcs: list[np.ndarray] = []
        for index, t in items:
            nbytes = t.numel() * t.element_size()
            pinned = t.device.type == "cuda"
            buf = self._buffers.get(index)
            if buf is None or buf.numel() != max(nbytes, 1) or buf.is_pinned() != pinned:
                buf = _alloc(nbytes, pinned)
                dst = buf.numpy()
            else:
                dst = self._views[index]
            keep[index] = buf
            views[index] = dst  # the whole buffer: nbytes long unless nbytes == 0
            if not nbytes:
                staged[index] = StagedTensor(t.dtype, 0, iter([(memoryview(b""), None)]))
                continue
            src = None if pinned else _host_bytes(t)
            if src is None:
                self._copy(buf[:nbytes].view(t.dtype).view(t.shape), t.detach())
            else:  # batched below: one call, one GIL release for all of them
                dsts.append(dst)
                srcs.append(src)
            staged[index] = StagedTensor(t.dtype, nbytes, iter([(memoryview(dst), None)]))
        native_copy.copy_many(dsts, srcs, threads=copy_threads())
        self._buffers, self._views = keep, views  # items no longer saved release their buffers
        self._sync()
        return staged

    def stream(self, items: list[tuple[MetadataIndex, torch.Tensor]], budget_bytes: int) -> SlabStream:
        """Budgeted mode: a stream that stages slab by slab as the writer frees them."""
        self._buffers.clear()
        self._views.clear()
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
        self._failed: BaseException | None = None

    def _consume(self, index: MetadataIndex) -> Iterator[tuple[memoryview, Release | None]]:
        q = self._queues[index]
        while True:
            got = q.get()
            if got is None:
                if self._failed is not None:  # the producer stopped: never write a torn item
                    raise RuntimeError(f"staging stopped before key {index.fqn!r} was copied: "
                                       f"{type(self._failed).__name__}: {self._failed}")
                return
            yield got

    def abort(self) -> None:
        """The writer failed: stop producing (slabs may never come back)."""
        self._abort.set()
        for _ in self._slabs:
            self._free.put(-1)

    def produce(self) -> None:
        """Copy every item slab by slab; blocks while both slabs are being written. If a
        copy fails, the writer is released (its items end in an error, not a hang)."""
        try:
            self._produce()
        except BaseException as e:
            self._failed = e
            for q in self._queues.values():
                q.put(None)
            raise

    def _produce(self) -> None:
        slab_bytes = self._slabs[0].numel()
        slab_views = [slab.numpy() for slab in self._slabs]
        threads = copy_threads()
        for index, t in self._items:
            fill = self._filler(t, slab_views, threads)
            nbytes = t.numel() * t.element_size()
            itemsize = t.element_size()
            step = max(itemsize, slab_bytes - slab_bytes % itemsize)
            for start in range(0, nbytes, step):
                i = self._free.get()
                if i < 0 or self._abort.is_set():
                    return
                n = min(step, nbytes - start)
                fill(i, start, n)
                self._queues[index].put((memoryview(slab_views[i][:n]), partial(self._free.put, i)))
            self._queues[index].put(None)

    def _filler(self, t: torch.Tensor, slab_views: list[np.ndarray], threads: int) -> Callable[[int, int, int], None]:
        """``fill(slab, start, n)``: copy bytes [start, start + n) of ``t`` into a slab."""
        host = None if t.device.type == "cuda" else _host_bytes(t)
        if host is not None:
            host = host.reshape(-1)  # sliced by byte offset below (a view: contiguous)
            def fill_host(slab: int, start: int, n: int) -> None:
                native_copy.copy(slab_views[slab][:n], host[start : start + n], threads=threads)

            return fill_host
        flat = _flat_bytes(t)  # strided or CUDA: one contiguous copy on its device first
        pool = self._pool

        def fill_torch(slab: int, start: int, n: int) -> None:
            pool._copy(self._slabs[slab][:n], flat[start : start + n])
            pool._sync()

        return fill_torch
