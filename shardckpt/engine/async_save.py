"""Async save: the caller pays for planning and a copy into reused staging
buffers; a background thread writes the shards and commits the manifest.

Cross-rank steps of a background save run on a dedicated gloo process group,
created once per checkpointer and never used by training, so they cannot
interleave with training collectives (a collective issued from a second thread
on the training group would). Planning runs on that group too, from the
caller's thread, but only when no save is in flight, so the group is never
used by two threads at once.

Errors from the background are kept and raised by ``result()``; if nobody asked,
by the next ``async_save`` / ``save``. A failed save is never committed, so
earlier checkpoints are untouched. At interpreter exit Python joins the worker
thread, so an in-flight save finishes (the commit is atomic either way).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Literal

import torch.distributed as dist
from torch.distributed.checkpoint.planner import WriteItemType

from .. import knobs as knobs_mod
from ..collectives import Group, group_key, new_gloo_group
from ..errors import CheckpointWriteError, SaveInProgressError, ShardckptError
from ..format.codec import Compression
from ..format.objects import resolve_object
from .replicas import CheckReplicas
from .save import SaveRequest, plan_save, typed_save_errors, write_and_commit
from .staging import SlabStream, StagingPool

__all__ = ["AsyncSaveHandle", "AsyncCheckpointer", "default_checkpointer", "close_all"]

Busy = Literal["wait", "skip", "error"]


class AsyncSaveHandle:
    """A save running in the background. ``result()`` waits and re-raises its error."""

    def __init__(self, owner: AsyncCheckpointer, path: str, future: Future[None], stall_seconds: float) -> None:
        self._owner, self.path, self._future = owner, path, future
        #: How long ``async_save`` blocked the caller (planning + staging).
        self.stall_seconds = stall_seconds

    def done(self) -> bool:
        """Whether the save has finished (committed or failed); never blocks."""
        return self._future.done()

    def result(self, timeout: float | None = None) -> None:
        """Wait until the checkpoint is committed; raise the typed error if it failed."""
        try:
            exc = self._future.exception(timeout=timeout)
        except FutureTimeout:
            raise TimeoutError(f"async save to {self.path} still running after {timeout}s") from None
        if exc is not None:
            self._owner._mark_reported(self._future)
            raise exc


class AsyncCheckpointer:
    """Owns the background writer thread, the dedicated gloo group and the staging pool.

    >>> with shardckpt.AsyncCheckpointer() as ckpt:
    ...     h = ckpt.async_save(sd, "ckpts/step_200")
    ...     train_more()
    ...     h.result()
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self._pg = process_group
        self._bg: dist.ProcessGroup | None = None
        self._ctl: dist.ProcessGroup | None = None
        self._pool = StagingPool()
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future[None] | None = None
        self._unreported: Future[None] | None = None
        self._lock = threading.Lock()
        self._closed = False

    # -- groups and state

    def _groups(self, knobs: knobs_mod.Knobs) -> tuple[Group, Group]:
        if self._bg is None and dist.is_available() and dist.is_initialized():
            # Collective over the default group: every rank reaches its first save here.
            self._bg = new_gloo_group(self._pg, knobs)
            self._ctl = new_gloo_group(self._pg, knobs)
        return Group(self._bg, knobs), Group(self._ctl, knobs)

    def _mark_reported(self, fut: Future[None]) -> None:
        with self._lock:
            if self._unreported is fut:
                self._unreported = None

    def _raise_unreported(self) -> None:
        with self._lock:
            fut, self._unreported = self._unreported, None
        if fut is not None:
            exc = fut.exception()
            raise CheckpointWriteError(f"an earlier async save failed: {exc}") from exc

    def wait(self) -> None:
        """Wait for the in-flight save, if any, and raise any unreported background failure."""
        fut = self._future
        if fut is not None:
            fut.exception()  # waits; the error itself is raised below if unreported
        self._raise_unreported()

    # -- saving

    def async_save(
        self,
        state_dict: dict[str, Any],
        path: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
        compression: None | str | Compression = "auto",
        staging_budget_bytes: int | None = None,
        busy: Busy = "wait",
        storage_options: dict[str, Any] | None = None,
        check_replicas: CheckReplicas = "error",
    ) -> AsyncSaveHandle | None:
        """Start a save; return once this rank's state is staged.

        ``busy`` decides what happens if the previous save is still running on
        any rank: ``"wait"`` for it, ``"skip"`` this save (returns None on every
        rank), or ``"error"`` (``SaveInProgressError`` on every rank).
        ``staging_budget_bytes`` bounds staging memory; a state larger than the
        budget is staged slab by slab while the background writes (the call then
        blocks until the last slab is staged).
        """
        if self._closed:
            raise CheckpointWriteError("this AsyncCheckpointer is closed")
        if busy not in ("wait", "skip", "error"):
            raise ValueError(f"busy must be 'wait', 'skip' or 'error', not {busy!r}")
        if staging_budget_bytes is not None and staging_budget_bytes <= 0:
            raise ValueError("staging_budget_bytes must be positive")
        t0 = time.perf_counter()
        request = SaveRequest.make(path, overwrite=overwrite, metadata=metadata, compression=compression,
                                   storage_options=storage_options, check_replicas=check_replicas)
        bg, ctl = self._groups(request.knobs)
        if busy != "wait" and self._any_rank_busy(ctl):
            if busy == "skip":
                return None
            raise SaveInProgressError(f"an async save is still running; not starting {os.fspath(path)}")
        self.wait()

        what = f"async save to {request.path}"
        with typed_save_errors(what):
            planned = plan_save(state_dict, request.target(), bg, request.check_replicas)
        tensors, objects = [], {}
        for item in planned.plan.items:
            if item.type == WriteItemType.BYTE_IO:
                # torch.save bytes: a snapshot of the value at call time
                objects[item.index] = resolve_object(planned.planner.resolve_data, item)
            else:
                tensors.append((item.index, planned.planner.resolve_data(item)))
        total = sum(t.numel() * t.element_size() for _, t in tensors)
        stream: SlabStream | None = None
        if staging_budget_bytes is not None and total > staging_budget_bytes:
            stream = self._pool.stream(tensors, staging_budget_bytes)
            staged = stream.staged
        else:
            staged = self._pool.stage(tensors)

        def resolve(item: Any) -> Any:
            return objects[item.index] if item.index in objects else staged[item.index]

        def job() -> None:
            # (the request carries the caller's knobs at call time down to every thread)
            try:
                with typed_save_errors(what):
                    write_and_commit(planned, resolve, bg)
            finally:
                if stream is not None:
                    stream.abort()

        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardckpt-async")
        fut = self._executor.submit(job)
        with self._lock:
            self._future = fut
            self._unreported = fut
        fut.add_done_callback(self._forget_success)
        if stream is not None:
            stream.produce()
        return AsyncSaveHandle(self, request.path, fut, time.perf_counter() - t0)

    def _forget_success(self, fut: Future[None]) -> None:
        if fut.exception() is None:
            self._mark_reported(fut)

    def _any_rank_busy(self, ctl: Group) -> bool:
        fut = self._future
        mine = fut is not None and not fut.done()
        return bool(ctl.max_over_ranks("checking for a save in flight", int(mine), CheckpointWriteError))

    # -- lifecycle

    def close(self) -> None:
        """Wait for the in-flight save, stop the worker thread and release staging memory.

        Raises a background failure nobody has seen yet.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._future is not None:
                self._future.exception()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            self._pool = StagingPool()
        self._raise_unreported()

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Per process group, weakly (collectives.group_key): never an id() a new group could reuse.
_defaults: weakref.WeakKeyDictionary[object, AsyncCheckpointer] = weakref.WeakKeyDictionary()
_defaults_lock = threading.Lock()


def default_checkpointer(process_group: dist.ProcessGroup | None) -> AsyncCheckpointer:
    """The checkpointer ``shardckpt.async_save`` uses for this process group."""
    key = group_key(process_group)
    with _defaults_lock:
        ckpt = _defaults.get(key)
        if ckpt is None or ckpt._closed:
            ckpt = _defaults[key] = AsyncCheckpointer(process_group)
        return ckpt


def wait_all() -> None:
    """Before a synchronous save: finish in-flight async saves and report their failures."""
    for ckpt in list(_defaults.values()):
        if not ckpt._closed:
            ckpt.wait()


def close_all() -> None:
    """``shardckpt.close()``: finish and shut down every default checkpointer."""
    with _defaults_lock:
        ckpts = list(_defaults.values())
        _defaults.clear()
    errors = []
    for ckpt in ckpts:
        try:
            ckpt.close()
        except ShardckptError as e:
            errors.append(e)
    if errors:
        raise errors[0]
