"""The tiers of one ``CheckpointManager``: a local save at every save step, a
durable copy every ``persist_interval_steps``, restore from the fastest valid one.

Saving (``Tiers.save``, caller's thread, every rank):

1. [all] finish the previous local save (raising its failure); if a durable
   save failed, every rank learns it here (an all-reduce of the flag), so no
   rank goes on alone; a durable save due now waits for the previous one.
2. [all] the state's local view (``tiers.view``) copied into reused staging
   buffers: the only blocking part, the same copy a plain async save makes.
3. [all] background: the local save (``LocalTier.save``) on one thread; when
   persisting, the durable save of the *same* staged bytes, rebuilt into the
   global state_dict (DTensors from the staged local shards), on another
   thread with its own gloo group, so a slow object store never holds up the
   next local save. A staging buffer set is reused only once both are done
   (a second set exists only while a durable save overlaps the next save).

Restoring (``Tiers.restore``, every rank): every node reports its local steps
(only the node's first rank reads its files), every rank plans the same way
from the same reports (``candidates``), and the newest usable local step not
older than the durable tier's newest valid step is loaded, fetching shards a
replaced node lacks from the peers holding copies. Otherwise the manager
restores from the durable tier, resharding as usual.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch.distributed as dist

from ... import knobs as knobs_mod
from ...collectives import Group, new_gloo_group
from ...engine.staging import StagingPool
from ...errors import CheckpointReadError, CheckpointWriteError, IncompleteCheckpointError
from ...store import UNUSABLE, status_of
from ...store.retention import CheckpointInfo
from .candidates import LocalCandidate, local_candidates
from .local_tier import LocalTier
from .view import LocalView, layout_digest, local_view, write_back

__all__ = ["Tiers", "check_tier_args"]

log = logging.getLogger("shardckpt.manager")

#: ``persist(step, state_dict, metadata, process_group)``: the durable save (collective).
#: ``persist(step, tree, metadata, process_group, knobs)``: the durable save
Persist = Callable[[int, dict[str, Any], dict[str, Any], "dist.ProcessGroup | None", knobs_mod.Knobs], None]


class _Pool:
    def __init__(self) -> None:
        self.staging = StagingPool()
        self.holders = 0


def _stateful(state: Any) -> bool:
    return callable(getattr(state, "state_dict", None)) and callable(getattr(state, "load_state_dict", None))


class Tiers:
    """Local tier plus background persistence. Collective constructor."""

    def __init__(self, local: LocalTier, ctl: Group, persist: Persist) -> None:
        self.local = local
        self._ctl = ctl
        self._persist_fn = persist
        self._persist_pg: dist.ProcessGroup | None = None
        if ctl.enabled:
            self._persist_pg = new_gloo_group(ctl.group)
        self._local_exec = ThreadPoolExecutor(1, thread_name_prefix="shardckpt-local")
        self._persist_exec = ThreadPoolExecutor(1, thread_name_prefix="shardckpt-persist")
        self._local: Future[None] | None = None
        self._persist: Future[None] | None = None
        self._pools: list[_Pool] = []
        self._later: list[LocalCandidate] = []  # local steps restore passed over for a newer durable one
        self._lock = threading.Lock()
        #: How long the last ``save`` blocked the caller.
        self.last_stall_s = 0.0

    # ------------------------------------------------------------------ saving

    def save(self, step: int, state: Any, metadata: dict[str, Any], persist: bool, sync: bool) -> None:
        t0 = time.perf_counter()
        self.wait_local()
        self._check_persist(wait=persist)
        inner = state.state_dict() if _stateful(state) else state
        pool = self._free_pool()
        staged = local_view(inner).staged(pool.staging)
        self.last_stall_s = time.perf_counter() - t0
        pool.holders = 2 if persist else 1
        # Snapshot the knobs now: the background parts run under the caller's settings.
        snap = knobs_mod.get()

        def run_local() -> None:
            self.local.save(step, staged, metadata, snap)

        self._local = self._submit(self._local_exec, run_local, pool)
        if persist:
            tree = staged.rebuilt()

            def run_persist() -> None:
                self._persist_fn(step, tree, metadata, self._persist_pg, snap)

            self._persist = self._submit(self._persist_exec, run_persist, pool)
        if sync:
            self.wait()

    def _submit(self, executor: ThreadPoolExecutor, fn: Callable[[], None], pool: _Pool) -> Future[None]:
        fut = executor.submit(fn)

        def release(_: Future[None]) -> None:
            with self._lock:
                pool.holders -= 1

        fut.add_done_callback(release)
        return fut

    def _free_pool(self) -> _Pool:
        with self._lock:
            for p in self._pools:
                if p.holders == 0:
                    return p
            self._pools.append(_Pool())
            return self._pools[-1]

    def _check_persist(self, wait: bool) -> None:
        """Raise a durable save's failure on every rank at the same call; with
        ``wait``, wait for the durable save in flight first."""
        fut = self._persist
        if fut is None:
            return
        if not wait:
            failed = int(fut.done() and fut.exception() is not None)
            if not self._ctl.max_over_ranks("checking the durable save in flight", failed, CheckpointWriteError):
                return
        self._persist = None
        exc = fut.exception()  # waits
        if exc is not None:
            raise exc

    def wait_local(self) -> None:
        fut, self._local = self._local, None
        if fut is not None:
            exc = fut.exception()
            if exc is not None:
                raise exc

    def wait(self) -> None:
        """Wait for both background saves; raise the first failure (local first)."""
        try:
            self.wait_local()
        finally:
            self._check_persist(wait=True)

    def done(self) -> bool:
        return all(f is None or f.done() for f in (self._local, self._persist))

    # ----------------------------------------------------------------- restore

    def restore(self, state: Any, remote: Sequence[CheckpointInfo], root: str) -> int | None:
        """[all] Restore from the local tier if it holds the newest usable step (return
        it), else None: the manager restores from the durable tier (``remote``, its
        listing). Raises rather than let the manager start fresh while the local tier
        holds steps it cannot use."""
        newest = max((c.step for c in remote if c.valid), default=None)
        got, why = self._restore_local(state, newest)
        if got is not None:
            return got
        detail = "; ".join(f"step {s}: {r}" for s, r in sorted(why.items(), reverse=True))
        if not remote and why:
            raise IncompleteCheckpointError(f"the local tier holds step(s) {sorted(why)} but none is usable "
                                            f"and {root} holds none (refusing to start fresh): {detail}",
                                            path=root, reasons=why)
        if remote:
            self._info("restoring from the durable tier %s%s", root,
                       f" (local tier: {detail})" if detail else " (the local tier holds nothing newer)")
        return None

    def _restore_local(self, state: Any, newest_remote: int | None) -> tuple[int | None, dict[int, str]]:
        """[all] Load the newest usable local step that is not older than
        ``newest_remote`` into ``state``; return its step (None: use the durable tier)
        and why each newer local step was not used."""
        inner = state.state_dict() if _stateful(state) else state
        view = local_view(inner)
        digest = layout_digest(view.layout)
        reports = self._ctl.all_gather(f"scanning the local tier {self.local.url}",
                                       lambda: self.local.report(digest), CheckpointReadError)
        candidates, reasons = local_candidates(reports)
        now = [c for c in candidates if newest_remote is None or c.step >= newest_remote]
        self._later = [c for c in candidates if c not in now]
        for c in self._later:
            reasons[c.step] = f"older than the durable tier's newest valid step {newest_remote}"
        return self._load_first(state, inner, view, now, reasons), reasons

    def restore_newer(self, state: Any, step: int) -> int | None:
        """[all] After the durable tier's newer steps failed to load: a local step newer
        than ``step`` (the next durable candidate) that ``restore`` passed over, if any."""
        todo = [c for c in self._later if c.step > step]
        if not todo:
            return None
        self._later = [c for c in self._later if c.step <= step]
        inner = state.state_dict() if _stateful(state) else state
        return self._load_first(state, inner, local_view(inner), todo, {})

    def _load_first(self, state: Any, inner: Any, view: LocalView, candidates: list[LocalCandidate],
                    reasons: dict[int, str]) -> int | None:
        for c in candidates:
            try:
                self.local.load(c, view)
            except UNUSABLE as e:
                reasons[c.step] = f"{status_of(e)}: {e}"
                self._warn("local step %d is %s (%s); trying the next one", c.step, status_of(e), e)
                continue
            self._finish(state, inner, view)
            self._info("restored step %d from the local tier %s: the newest valid step in any tier; %s",
                       c.step, self.local.url, c.describe())
            return c.step
        return None

    @staticmethod
    def _finish(state: Any, inner: Any, view: LocalView) -> None:
        write_back(inner, view.tree)
        if _stateful(state):
            state.load_state_dict(inner)

    def _info(self, msg: str, *args: Any) -> None:
        if self._ctl.is_coordinator:
            log.info(msg, *args)

    def _warn(self, msg: str, *args: Any) -> None:
        if self._ctl.is_coordinator:
            log.warning(msg, *args)

    # --------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Wait for both background saves (raising a failure) and stop the threads."""
        try:
            self.wait()
        finally:
            self._local_exec.shutdown(wait=True)
            self._persist_exec.shutdown(wait=True)
            self._pools.clear()


def check_tier_args(root: Any, local_root: Any, keep_last: Any, replicas: Any, persist: Any,
                    read_only: bool) -> None:
    """``CheckpointManager``'s tier arguments: ``ValueError`` naming the bad one."""
    if local_root is None:
        if (keep_last, replicas, persist) != (2, 1, None):
            raise ValueError("local_keep_last, local_replicas and persist_interval_steps need local_root")
        return
    if read_only:
        raise ValueError("a read_only CheckpointManager takes no local_root (it would write there)")
    for name, v, low in (("local_keep_last", keep_last, 1), ("local_replicas", replicas, 0),
                         ("persist_interval_steps", persist if persist is not None else 1, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    if os.path.abspath(os.fspath(local_root)) == os.path.abspath(os.fspath(root)):
        raise ValueError(f"local_root must differ from the durable root, both are {os.fspath(root)}")
