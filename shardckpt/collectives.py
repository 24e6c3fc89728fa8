"""Collectives with error handling: every rank runs a step, errors are gathered,
and every rank raises one typed exception naming the failing ranks. Without
torch.distributed (or with one process) the same code runs locally.

Shapes of step, as in DCP's ``_DistWrapper``: ``run`` (every rank runs ``fn``;
only a success/failure status is all-gathered, never ``fn``'s result),
``gather_scatter`` (local values → coordinator → one value back per rank) and
``gather_broadcast`` (local values → coordinator → one value to all).

Collectives that check success carry status, not results: a step whose
result every rank already has (its own manifest, its own plan) must not send
it to every other rank, which costs O(world² × entries) in bytes and
unpickling at scale.

Lost peers: every collective runs under ``guard``. A peer that died makes gloo
raise (connection reset); one that is alive but stuck (SIGSTOP, a hung
filesystem) is noticed after ``knobs.collective_timeout_s``: on a gloo group the
timeout in force is lowered to that bound for the duration of the call (and put
back after), so groups shardckpt did not create (the default group, the user's)
are bounded too. Either way the call raises the step's typed error saying it
lost contact, on every surviving rank, and nothing is committed: the
coordinator commits only after gathering every rank's success.
"""

from __future__ import annotations

import pickle
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from . import compat
from . import knobs as knobs_mod
from .errors import ShardckptError

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["Group", "Failed", "attempt", "raise_gathered", "collective_deadline", "group_key", "SINGLE_PROCESS",
           "new_gloo_group", "own_group"]


class Failed:
    """An exception in transit between ranks."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = _portable(exc)


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a ShardckptError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return ShardckptError(f"{type(exc).__name__}: {exc}")


def attempt(fn: Callable[[], T]) -> T | Failed:
    """``fn()``, or its exception as a ``Failed`` to gather with the other ranks' results."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - gathered and re-raised on every rank
        return Failed(e)


@contextmanager
def collective_deadline(group: dist.ProcessGroup | None, timeout_s: int) -> Iterator[None]:
    """Bound every collective on ``group`` (gloo) by ``timeout_s`` (the call's
    ``collective_timeout_s``) while the block runs; a shorter timeout already in
    force is kept. Only the thread issuing the group's collectives may use it
    (shardckpt's background saves have groups of their own)."""
    backend = compat.gloo_backend(group)
    limit = timedelta(seconds=timeout_s)
    previous = compat.gloo_timeout(backend)  # None: leave the group as it is
    if previous is None or previous <= limit:
        yield
        return
    compat.set_gloo_timeout(backend, limit)
    try:
        yield
    finally:
        compat.set_gloo_timeout(backend, previous)


def new_gloo_group(like: dist.ProcessGroup | None, knobs: knobs_mod.Knobs | None = None) -> dist.ProcessGroup:
    """A gloo group of ``like``'s ranks (None: every rank), its collectives bounded by
    ``collective_timeout_s``: shardckpt's own groups, never used by training.
    Collective over the default group (every rank calls it, in the same order)."""
    ranks = dist.get_process_group_ranks(like) if like is not None else None
    timeout = timedelta(seconds=(knobs if knobs is not None else knobs_mod.get()).collective_timeout_s)
    return dist.new_group(ranks=ranks, backend="gloo", timeout=timeout)


_own_groups: weakref.WeakKeyDictionary[Any, dist.ProcessGroup] = weakref.WeakKeyDictionary()


def own_group(knobs: knobs_mod.Knobs | None = None) -> dist.ProcessGroup | None:
    """A gloo group of this rank alone (None without torch.distributed), for a save or
    load that one rank does by itself while the others train on (a trainer that
    checkpoints from rank 0 only, a rank's node-local view). Only this rank takes
    part in creating it, so no other rank has to call anything; one per default
    group, made on first use."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.group.WORLD
    pg = _own_groups.get(world)
    if pg is None:
        timeout = timedelta(seconds=(knobs if knobs is not None else knobs_mod.get()).collective_timeout_s)
        pg = dist.new_group([dist.get_rank()], backend="gloo", timeout=timeout, use_local_synchronization=True)
        _own_groups[world] = pg
    return pg


class _SingleProcess:
    """The key of per-group state in a process without torch.distributed."""


SINGLE_PROCESS = _SingleProcess()


def group_key(pg: dist.ProcessGroup | None) -> object:
    """The object per-group state (plan caches, default async checkpointers) is kept
    under, in a ``weakref.WeakKeyDictionary``: the process group itself, so the
    state goes when the group does and a new group never inherits it (an ``id()``
    can be reused); the default group's object for None; ``SINGLE_PROCESS``
    without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE_PROCESS
    return pg if pg is not None else dist.group.WORLD


class Group:
    """The process group a call runs over, or a single process; ``knobs``: the
    call's snapshot (its ``collective_timeout_s`` bounds every collective)."""

    def __init__(self, group: dist.ProcessGroup | None = None, knobs: knobs_mod.Knobs | None = None) -> None:
        self.timeout_s = (knobs if knobs is not None else knobs_mod.get()).collective_timeout_s
        self.enabled = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if self.enabled else 0
        self.world_size = dist.get_world_size(group) if self.enabled else 1
        self.is_coordinator = self.rank == 0

    @property
    def key(self) -> object:
        """``group_key`` of this group."""
        return group_key(self.group)

    @property
    def distributed(self) -> bool:
        return self.enabled and self.world_size > 1

    @contextmanager
    def guard(self, step: str, default_error: type[ShardckptError], lost_contact: bool = True) -> Iterator[None]:
        """Run collectives of ``step`` within ``collective_timeout_s``; a failure of the
        collective itself (a peer died, or did not answer in time: torch raises a
        ``RuntimeError``) becomes ``default_error``. ``lost_contact=False`` for a block
        that runs more than collectives (e.g. DCP's load): its message then only
        quotes torch's error."""
        if not self.distributed:
            yield
            return
        with collective_deadline(self.group, self.timeout_s):
            try:
                yield
            except ShardckptError:
                raise
            except RuntimeError as e:
                limit = self.timeout_s
                why = (f"lost contact with rank(s) of the process group (a peer died, or did not "
                       f"answer within collective_timeout_s={limit}s)" if lost_contact else
                       f"torch.distributed raised (as it does on losing contact with a peer, or "
                       f"after collective_timeout_s={limit}s without an answer)")
                raise default_error(f"{step} failed on rank {self.rank}: {why}: {type(e).__name__}: {e}") from e

    def max_over_ranks(self, step: str, value: int, default_error: type[ShardckptError]) -> int:
        """The largest of every rank's ``value`` (an int64), on every rank."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        with self.guard(step, default_error):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def min_over_ranks(self, step: str, values: list[int], default_error: type[ShardckptError]) -> list[int]:
        """Element-wise minimum of every rank's ``values`` (int64s), on every rank."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64)
        with self.guard(step, default_error):
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return [int(x) for x in t.tolist()]

    def _coord(self) -> int:
        return dist.get_global_rank(self.group, 0) if self.group is not None else 0

    def _raise_if_failed(self, step: str, outcomes: list[Any], mine: Any, default: type[ShardckptError]) -> None:
        failures = {r: o.exc for r, o in enumerate(outcomes) if isinstance(o, Failed)}
        if failures:
            local = mine.exc if isinstance(mine, Failed) else None
            if not self.distributed and local is not None:
                raise local
            raise_gathered(step, failures, default, local=local)

    def run(self, step: str, fn: Callable[[], T], default_error: type[ShardckptError]) -> T:
        """Run ``fn`` on every rank; if any rank fails, every rank raises. Only the
        status travels (``None`` or the failure), not ``fn``'s result."""
        mine = attempt(fn)
        self._exchange(step, mine if isinstance(mine, Failed) else None, default_error)
        return mine  # type: ignore[return-value]

    def all_gather(self, step: str, fn: Callable[[], T], default_error: type[ShardckptError]) -> list[T]:
        """Run ``fn`` on every rank and give every rank all the results (for values
        every rank really needs, e.g. each rank's RNG state); failures raise everywhere."""
        return self._exchange(step, attempt(fn), default_error)

    def _exchange(self, step: str, mine: Any, default_error: type[ShardckptError]) -> list[Any]:
        """All-gather ``mine`` (a value or a ``Failed``); raise if any rank failed."""
        outcomes: list[Any] = [mine]
        if self.distributed:
            outcomes = [None] * self.world_size
            with self.guard(step, default_error):
                dist.all_gather_object(outcomes, mine, group=self.group)
        self._raise_if_failed(step, outcomes, mine, default_error)
        return outcomes

    def gather_scatter(
        self,
        step: str,
        local_fn: Callable[[], T],
        global_fn: Callable[[list[T]], list[R]],
        default_error: type[ShardckptError],
    ) -> R:
        """Each rank computes a value; the coordinator maps all of them to one result per rank."""
        mine = attempt(local_fn)
        if not self.distributed:
            self._raise_if_failed(step, [mine], mine, default_error)
            out = attempt(lambda: global_fn([mine]))  # type: ignore[list-item]
            self._raise_if_failed(step, [out], out, default_error)
            return out[0]  # type: ignore[index]
        gathered: list[Any] | None = [None] * self.world_size if self.is_coordinator else None
        box: list[Any] = [None]
        with self.guard(step, default_error):
            dist.gather_object(mine, gathered, dst=self._coord(), group=self.group)
            scatter: list[Any] | None = None
            if gathered is not None:  # coordinator
                scatter = self._coordinate(gathered, global_fn)
            dist.scatter_object_list(box, scatter, src=self._coord(), group=self.group)
        return self._unpack(step, box[0], mine, default_error)

    def gather_broadcast(
        self,
        step: str,
        local_fn: Callable[[], T],
        global_fn: Callable[[list[T]], R],
        default_error: type[ShardckptError],
    ) -> R:
        """Each rank computes a value; the coordinator turns them into one result for all
        (sent once, by broadcast)."""
        if not self.distributed:
            return self.gather_scatter(step, local_fn, lambda vals: [global_fn(vals)], default_error)
        mine = attempt(local_fn)
        gathered: list[Any] | None = [None] * self.world_size if self.is_coordinator else None
        box: list[Any] = [None]
        with self.guard(step, default_error):
            dist.gather_object(mine, gathered, dst=self._coord(), group=self.group)
            if gathered is not None:
                box[0] = self._coordinate(gathered, lambda vals: [global_fn(vals)])[0]
            dist.broadcast_object_list(box, src=self._coord(), group=self.group)
        return self._unpack(step, box[0], mine, default_error)

    def _coordinate(self, gathered: list[Any], fn: Callable[[list[Any]], list[Any]]) -> list[Any]:
        """Coordinator: the per-rank results, or the failures for every rank to raise."""
        failures = {r: o for r, o in enumerate(gathered) if isinstance(o, Failed)}
        if failures:
            return [("failed", {r: f.exc for r, f in failures.items()})] * self.world_size
        out = attempt(lambda: fn(gathered))
        if isinstance(out, Failed):
            return [("failed", {self.rank: out.exc})] * self.world_size
        return [("ok", v) for v in out]

    def _unpack(self, step: str, packed: tuple[str, Any], mine: Any, default: type[ShardckptError]) -> Any:
        status, value = packed
        if status == "failed":
            raise_gathered(step, value, default, local=mine.exc if isinstance(mine, Failed) else None)
        return value

    def barrier(self, step: str = "barrier", default_error: type[ShardckptError] = ShardckptError) -> None:
        if self.distributed:
            with self.guard(step, default_error):
                dist.barrier(group=self.group)


def raise_gathered(
    step: str,
    failures: Mapping[int, BaseException],
    default_error: type[ShardckptError],
    local: BaseException | None = None,
) -> None:
    """Raise one exception for failures gathered from ranks (rank -> exception).

    If every failing rank raised the same shardckpt error type, that type is kept
    (with the first failure's attributes), so callers can catch e.g.
    ``CorruptCheckpointError`` whatever rank hit it.
    """
    ranks = sorted(failures)
    first = failures[ranks[0]]
    same = isinstance(first, ShardckptError) and all(type(failures[r]) is type(first) for r in ranks)
    cls: type[ShardckptError] = type(first) if same else default_error  # type: ignore[assignment]
    detail = "; ".join(f"rank {r}: {type(failures[r]).__name__}: {failures[r]}" for r in ranks)
    err = cls.__new__(cls)
    Exception.__init__(err, f"{step} failed on rank(s) {ranks}: {detail}")
    if same:
        err.__dict__.update(first.__dict__)
    err.rank_errors = dict(failures)
    raise err from local
