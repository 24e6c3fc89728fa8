"""CheckpointManager: step directories under a root, retention, restore from the
newest checkpoint that is really valid, and preemption handling.

>>> mgr = shardckpt.CheckpointManager("ckpts/run1", keep_last=3, keep_every=1000,
...                                   keep_best=("val_loss", "min", 2), async_save=True)
>>> mgr.install_signal_handlers()          # SIGTERM: save at the next boundary, then exit
>>> start = mgr.restore(state)             # newest valid step, or None: fresh start
>>> for step in range(0 if start is None else start + 1, total):
...     train_one_step()                   # save(step) holds the state after step `step`
...     if mgr.should_save(step):
...         mgr.save(step, state, metrics={"val_loss": v})
>>> mgr.close()                            # waits for the in-flight save

Layout: ``<root>/step_<step:010d>/`` is one shardckpt checkpoint of ``{"state":
state}``, with ``{"step": ..., "metrics": {...}}`` in its manifest metadata.

Owner marker: rank 0 holds ``<root>/.shardckpt-owner`` (host, pid, token) from
construction to ``close``; a second manager on a root with a live owner gets
``CheckpointExistsError``; a dead owner on this host, or an earlier attempt of
the same torchrun job, is taken over with a warning (limits across hosts and on
object stores: ``shardckpt.store.owner``).

Multi-rank call order: every rank constructs the manager and calls
``restore``, ``should_save``, ``save``, ``wait`` and ``close`` at the same
points (they are collective). Decisions that must agree (which step to
restore, whether a preemption is pending) are taken on rank 0 or reduced over
all ranks, on a gloo group (the given/default group if it is gloo, else one
created once in the constructor), so no rank diverges. Only rank 0 deletes
(retention) and holds the owner marker.

Restore (``verify_on_restore``): ``True`` (default) verifies exactly what each
rank loads, while loading (CRC32C and decoding of every chunk before its bytes
reach a tensor). A load failing as corrupt may leave part of that checkpoint in
the tensors, so the previous one is loaded into the same state (strict: every
tensor is written again; Stateful ``load_state_dict`` runs only after a load
succeeded); if none succeeds the call raises and the state is garbage.
``"before"``: the ranks verify a candidate together (1/N each) and load only
one that verified (the state is never touched by a corrupt one; read twice).
``False`` cannot turn the checks off (every load verifies what it reads): it is
accepted for 0.1 code, warns that it has no effect, and behaves as ``True``.

Preemption: see ``install_signal_handlers`` (torchrun ``--max-restarts``).
Tiers (``local_root=``, ``shardckpt.manager.tiers``): saves go to node-local storage with
peer replicas, every ``persist_interval_steps`` (and on preemption) also to ``root``.
"""

from __future__ import annotations

import builtins
import logging
import os
import signal
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

import torch.distributed as dist

from .. import knobs as knobs_mod
from ..api import save
from ..backends import open_storage
from ..engine.async_save import AsyncCheckpointer, AsyncSaveHandle
from ..engine.replicas import CheckReplicas, check_mode
from ..engine.save import SaveRequest, save_with
from ..errors import (
    CheckpointWriteError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    ShardckptError,
)
from ..store import (
    OWNER_MARKER,
    UNUSABLE,
    CheckpointDir,
    CheckpointRoot,
    status_of,
    step_dirname,
)
from ..store.retention import CheckpointInfo, RetentionPolicy, build_policies, metric_values
from .loading import RootReads, check_step, control_group
from .preemption import Preemption
from .tiers import LocalTier, Tiers, check_tier_args, merge_tiers

__all__ = ["CheckpointManager", "OWNER_MARKER", "step_dirname"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _InFlight:
    step: int
    handle: AsyncSaveHandle
    retained: bool = False  # retention already ran for it (rank 0)


class CheckpointManager:
    """Saves a run's state into step directories under ``root`` (a path or fsspec URL).

    Retention (applied by rank 0 after each save commits): ``keep_last=K``,
    ``keep_every=N`` (steps divisible by N), ``keep_best=(metric, "min"|"max", K)``
    and any extra ``policies`` (``shardckpt.store.retention``); a checkpoint is kept if
    any of them keeps it. Without any, every checkpoint is kept. The newest valid
    checkpoint and the one being written are never deleted; incomplete leftovers
    of crashed saves are removed.

    ``save_interval_steps``: ``should_save(step)`` is True when ``step`` is a
    multiple of it. ``async_save``: ``save`` returns once the state is staged;
    the write and commit run in the background (one in flight). Raises
    ``CheckpointExistsError`` if another live manager owns ``root``; pass
    ``take_over_lock=True`` when you know its owner is dead (e.g. on another host).
    ``check_replicas`` as in ``shardckpt.save`` (default ``"error"``).
    ``read_only=True`` (an evaluation job, a read-only mount): no owner marker is
    taken, ``restore`` and ``list`` work, ``save`` raises ``CheckpointWriteError``.

    ``local_root`` (a path on node-local storage, the same on every node): a
    local tier. Each save writes every rank's local shard there and
    ``local_replicas`` copies to ranks on other nodes (skipped, with a warning,
    on one node), keeping ``local_keep_last`` steps per node; every
    ``persist_interval_steps`` (None: only on preemption) the same staged state
    is also saved to ``root``, in the background. ``restore`` loads the newest
    valid step of either tier, local when the job's world size and layouts
    allow (a replaced node fetches its shards from peers), else from ``root``
    (resharded); ``list()`` fills ``CheckpointInfo.tiers``. ``step=``/``path=``
    restores read ``root``; the policies apply to ``root``.

    Retention judges validity cheaply (manifest and shard sizes, no data read),
    so a checkpoint with a flipped bit still counts as the newest valid one:
    keep at least two (``keep_last=2``) so ``restore`` has something to fall
    back to.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        keep_best: tuple[str, str] | tuple[str, str, int] | None = None,
        policies: Iterable[RetentionPolicy] | None = None,
        save_interval_steps: int = 1,
        async_save: bool = False,
        process_group: dist.ProcessGroup | None = None,
        verify_on_restore: bool | Literal["before"] = True,
        take_over_lock: bool = False,
        storage_options: dict[str, Any] | None = None,
        check_replicas: CheckReplicas = "error",
        read_only: bool = False,
        local_root: str | os.PathLike[str] | None = None,
        local_keep_last: int = 2,
        local_replicas: int = 1,
        persist_interval_steps: int | None = None,
    ) -> None:
        if read_only and async_save:
            raise ValueError("a read_only CheckpointManager does not save: drop async_save=True")
        if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be an integer >= 1, got {save_interval_steps!r}")
        check_tier_args(root, local_root, local_keep_last, local_replicas, persist_interval_steps, read_only)
        self.policies = build_policies(keep_last, keep_every, keep_best, policies)
        self.persist_interval_steps = persist_interval_steps
        self.save_interval_steps = save_interval_steps
        if verify_on_restore not in (True, False, "before"):
            raise ValueError(f"verify_on_restore must be True, False or 'before', not {verify_on_restore!r}")
        if verify_on_restore is False:
            warnings.warn("CheckpointManager(verify_on_restore=False) has no effect: every load verifies each "
                          "chunk it reads (True); pass True or 'before'", DeprecationWarning, stacklevel=2)
            verify_on_restore = True
        self.verify_on_restore = verify_on_restore
        self.check_replicas = check_mode(check_replicas)
        self.storage_options = dict(storage_options) if storage_options is not None else None
        self._root = CheckpointRoot(open_storage(root, self.storage_options))
        #: The root as a path (local) or URL.
        self.root: str = self._root.url
        self._pg = process_group
        self._ctl = control_group(process_group)
        self._reads = RootReads(self._ctl, process_group, self.storage_options)
        self._preemption = Preemption(self._ctl)
        self._owner = self._root.owner(take_over=take_over_lock)
        self.read_only = bool(read_only)
        self._tiers: Tiers | None = None
        if local_root is not None:  # before taking the root: a bad local_root leaves no marker behind
            self._tiers = Tiers(LocalTier(local_root, local_keep_last, local_replicas, self._ctl), self._ctl,
                                self._persist)
        self._closed = True  # until the root is ours: close() must not release someone else's marker
        if not self.read_only:  # a reader (evaluation, a read-only mount) takes no ownership
            self._reads.on_rank0(f"taking ownership of {self.root}", self._owner.acquire)
        self._closed = False
        self._tiers_async = async_save
        self._async = AsyncCheckpointer(process_group) if async_save and self._tiers is None else None
        self._in_flight: _InFlight | None = None
        self._decided: tuple[int, int] | None = None  # (step, agreed signal) from should_save
        # Steps restore found damaged beyond what a cheap scan sees (a flipped bit):
        # retention must not keep them as "newest valid" over good ones.
        self._known_bad: dict[int, str] = {}

    # --------------------------------------------------------------- preemption

    def install_signal_handlers(
        self,
        signals: Sequence[int] = (signal.SIGTERM,),
        exit_code: int | None = None,
    ) -> None:
        """On ``signals``, save at the next ``should_save``/``save`` boundary and exit.

        The handler only records the signal. At the next ``should_save`` (reduced
        over ranks: one rank getting the signal is enough) it returns True, and
        ``save`` then saves synchronously on every rank (after finishing an
        in-flight async save), closes the manager and calls ``sys.exit`` with
        ``exit_code``: by default 128 + the signal number (143 for SIGTERM), what
        a shell reports for a process the signal killed. Call it on every rank
        (it makes ``should_save`` a collective), from the main thread.

        torchrun's elastic agent marks a worker whose exit code is not 0 as FAILED
        (``torch/distributed/elastic/multiprocessing/api.py``) and, while
        ``--max-restarts`` allows, restarts the whole worker group
        (``agent/server/api.py``), which resumes with ``restore``. Exit code 0
        would read as success and end the job, so it is refused::

            torchrun --nproc-per-node=8 --max-restarts=3 train.py

        If the agent itself gets SIGTERM (the node is preempted) it forwards it to
        the workers, waits ``--shutdown-timeout`` (30 s) before SIGKILL and does not
        restart: the save must fit in that grace period, and the scheduler's
        requeue resumes from the checkpoint.
        """
        self._check_open()
        self._preemption.install(signals, exit_code)

    @property
    def preemption_pending(self) -> bool:
        """Whether this rank received one of the installed signals (not reduced over ranks)."""
        return self._preemption.pending

    def _exit_preempted(self, signum: int, step: int) -> None:
        code = self._preemption.exit_code(signum)
        self.close()
        # Nobody exits before rank 0 finished retention and released the marker:
        # the first exit makes the launcher SIGTERM (then SIGKILL) the others.
        self._ctl.barrier("waiting for every rank before the preemption exit")
        self._info("preemption (%s): saved step %d, exiting with code %d for a restart",
                   signal.Signals(signum).name, step, code)
        sys.exit(code)

    # ------------------------------------------------------------------ saving

    def should_save(self, step: int) -> bool:
        """Whether to save at ``step``: it is a multiple of ``save_interval_steps`` (or,
        with a local tier, of ``persist_interval_steps``), or a preemption signal is pending on any rank. Collective once signal handlers
        are installed: call it on every rank at every step."""
        self._check_open()
        check_step(step)
        self._poll_async()
        signum = self._preemption.agree()
        self._decided = (step, signum)
        return bool(signum) or step % self.save_interval_steps == 0 or self._persist_due(step)

    def _persist_due(self, step: int) -> bool:
        n = self.persist_interval_steps
        return self._tiers is not None and n is not None and step % n == 0

    def save(
        self,
        step: int,
        state: Any,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save ``state`` (an object with ``state_dict()`` / ``load_state_dict()``, or a
        state_dict) as step ``step``; return whether a save happened.

        Saves when ``force`` or ``should_save(step)`` (the decision of a preceding
        ``should_save(step)`` call is reused). ``metrics`` (numbers; NaN and
        infinities kept, ``keep_best`` never ranks them) go into the manifest for ``list()`` and
        ``keep_best``. ``state.step`` is set to ``step`` if that attribute exists.
        A step that already has a checkpoint (e.g. re-run after a restore) is
        replaced atomically. With a preemption pending, saves synchronously,
        closes the manager and exits the process (``install_signal_handlers``).
        """
        self._check_open()
        check_step(step)
        if self.read_only:
            raise CheckpointWriteError(f"this CheckpointManager of {self.root} is read_only: it restores "
                                       "and lists, never saves", path=self.root)
        if self._decided is not None and self._decided[0] == step:
            signum = self._decided[1]
        else:
            signum = self._preemption.agree()
        self._decided = None
        if not (force or signum or step % self.save_interval_steps == 0 or self._persist_due(step)):
            self._poll_async()
            return False
        metadata: dict[str, Any] = {"step": step, "metrics": metric_values(metrics)}
        if hasattr(state, "step"):
            state.step = step
        self._reads.on_rank0("checking the owner marker", self._owner.check)
        self._known_bad.pop(step, None)
        path = self._step_path(step)
        if self._tiers is not None:  # it waits for the previous local save, not a durable one
            self._tiers.save(step, state, metadata, persist=bool(signum) or self._persist_due(step),
                             sync=not self._tiers_async or bool(signum))
            if signum:
                self._exit_preempted(signum, step)
            return True
        # One save in flight: finishing the previous one first also runs its retention.
        self.wait()
        if self._async is None or signum:
            save({"state": state}, path, overwrite=True, metadata=metadata, process_group=self._pg,
                 storage_options=self.storage_options, check_replicas=self.check_replicas)
            self._retain()
        else:
            handle = self._async.async_save({"state": state}, path, overwrite=True, metadata=metadata,
                                            storage_options=self.storage_options,
                                            check_replicas=self.check_replicas)
            if handle is not None:
                self._in_flight = _InFlight(step, handle)
        if signum:
            self._exit_preempted(signum, step)
        return True

    def wait(self) -> None:
        """Wait for the in-flight async save; raise its failure (on every rank)."""
        if self._tiers is not None:
            self._tiers.wait()
        f, self._in_flight = self._in_flight, None
        if f is None:
            return
        f.handle.result()
        if not f.retained:
            self._retain()

    def _poll_async(self) -> None:
        # Retention for a background save that has committed. Never raises and
        # never communicates: ranks may see the save finish at different times;
        # a failure is raised by the next wait()/save()/close() on every rank.
        f = self._in_flight
        if f is None or f.retained or not f.handle.done():
            return
        f.retained = True
        try:
            f.handle.result(timeout=0)
        except Exception:  # noqa: BLE001 - reported by wait()
            return
        self._retain()

    def _persist(self, step: int, tree: dict[str, Any], metadata: dict[str, Any],
                 pg: dist.ProcessGroup | None, knobs: knobs_mod.Knobs) -> None:
        """Tiers' durable save (its own thread and gloo group, the caller's ``knobs``),
        then retention of ``root``."""
        request = SaveRequest.make(self._step_path(step), overwrite=True, metadata=metadata,
                                   storage_options=self.storage_options, check_replicas=self.check_replicas,
                                   knobs=knobs)
        save_with({"state": tree}, request, pg)
        self._retain()

    # ----------------------------------------------------------------- retention

    def _retain(self) -> None:
        """Rank 0: delete what the policies drop. Failures only warn: a checkpoint
        that could not be deleted costs space, not correctness."""
        if not self._ctl.is_coordinator:
            return
        # The in-flight step is read before scanning: a save that commits during the
        # scan is then still protected, never seen as an incomplete leftover.
        in_flight = {self._in_flight.step} if self._in_flight is not None else set()
        try:
            infos = self._root.list()
        except Exception as e:  # noqa: BLE001
            log.warning("retention skipped: could not list %s: %s", self.root, e)
            return
        self._root.apply_retention(self.policies, in_flight, known_bad=self._known_bad, checkpoints=infos)

    # ------------------------------------------------------------------- restore

    def restore(self, state: Any, step: int | None = None, path: str | os.PathLike[str] | None = None) -> int | None:
        """Load the newest committed and valid checkpoint into ``state``; return its step.

        Newest first: a candidate that is incomplete or corrupt (or fails to load
        as corrupt) is skipped with a warning naming the reason, and the previous
        one is tried. Returns None (and logs "fresh start") when the root holds no
        checkpoints; raises ``CorruptCheckpointError`` (``IncompleteCheckpointError``
        if none was corrupt) when checkpoints exist but none is usable, with
        ``.reasons`` mapping step -> reason: never a silent fresh start.
        ``step=N`` or ``path=...`` restore exactly that checkpoint and raise if it
        is not valid; ``path`` may be any checkpoint a manager saved, e.g. under
        another root (its step comes from its metadata). Collective.
        """
        self._check_open()
        if step is not None and path is not None:
            raise ValueError("pass step or path, not both")
        self.wait()  # never read a step our own background save is writing
        if step is not None or path is not None:
            target = os.fspath(path) if path is not None else self._step_path(check_step(step))
            saved_step = self._reads.on_rank0(f"checking {target}", lambda: self._reads.saved_step(target))
            if self.verify_on_restore == "before":
                problem = self._reads.verify(CheckpointDir.at(target, self.storage_options))
                if problem is not None:
                    cls = CorruptCheckpointError if problem[0] == "corrupt" else IncompleteCheckpointError
                    raise cls(f"{target} is {problem[0]}: {problem[1]}", path=target)
            return self._reads.load(state, target, step if step is not None else saved_step)
        infos = self._reads.on_rank0(f"listing {self.root}", lambda: self._scan(deep=False))
        if self._tiers is not None:
            got = self._tiers.restore(state, infos, self.root)
            if got is not None:
                return got
        if not infos:
            self._info("no checkpoint under %s: fresh start", self.root)
            return None
        reasons: dict[int, str] = {}
        corrupt = False
        for info in reversed(infos):
            if self._tiers is not None and (got := self._tiers.restore_newer(state, info.step)) is not None:
                return got  # newer durable steps failed: a local one they had overshadowed
            problem: tuple[str, str] | None = None
            if info.status != "valid":
                problem = (info.status, info.reason or "")
            elif self.verify_on_restore == "before":
                problem = self._reads.verify(self._root.checkpoint(info.step))
            if problem is None:
                try:
                    return self._reads.load(state, info.path, info.step)
                except UNUSABLE as e:
                    problem = (status_of(e), str(e))
            corrupt = corrupt or problem[0] == "corrupt"
            reasons[info.step] = f"{problem[0]}: {problem[1]}"
            if info.status == "valid":  # every rank sees the same problem (decided or gathered)
                self._known_bad[info.step] = reasons[info.step]
            if self._ctl.is_coordinator:
                log.warning("checkpoint step %d at %s is %s (%s); falling back to the previous one",
                            info.step, info.path, problem[0], problem[1])
        if self._tiers is not None and (got := self._tiers.restore_newer(state, -1)) is not None:
            return got
        detail = "; ".join(f"step {s}: {r}" for s, r in reasons.items())
        cls = CorruptCheckpointError if corrupt else IncompleteCheckpointError
        raise cls(f"{self.root} holds {len(infos)} checkpoint(s) but none is usable "
                  f"(refusing to start fresh): {detail}", path=self.root, reasons=reasons)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Wait for the in-flight save (raising its failure), uninstall signal handlers
        and release the root. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            if self._tiers is not None:
                self._tiers.close()
            if self._async is not None:
                self._async.close()
            self._preemption.uninstall()
            if self._ctl.is_coordinator and not self.read_only:
                self._owner.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ShardckptError(f"this CheckpointManager for {self.root} is closed")

    # -------------------------------------------------------------------- helpers

    def _step_path(self, step: int) -> str:
        return self._root.step_url(step)

    def _info(self, msg: str, *args: Any) -> None:
        if self._ctl.is_coordinator:
            log.info(msg, *args)

    def _scan(self, deep: bool) -> builtins.list[CheckpointInfo]:
        out = self._root.list(deep)
        return [replace(c, status="corrupt", reason=f"restore found: {self._known_bad[c.step]}")
                if c.valid and c.step in self._known_bad else c for c in out]

    def list(self, deep: bool = False) -> builtins.list[CheckpointInfo]:
        """Every step directory under the root, oldest first, with its status.

        ``"valid"`` means the manifest decodes and every shard file has its recorded
        size (cheap: no data read); ``deep=True`` also reads every chunk and checks
        its CRC32C. Not collective: any rank may call it. With a local tier, steps
        only this node's ``local_root`` holds are listed too, and ``tiers`` says
        where each step is.
        """
        out = self._scan(deep)
        return out if self._tiers is None else merge_tiers(out, self._tiers.local.infos())
