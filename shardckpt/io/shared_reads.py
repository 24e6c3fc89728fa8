"""Read once, share over the process group: the replicated pieces of a multi-rank load.

DDP replicas (a plain tensor every rank loads whole) and ``Replicate()`` DTensor
placements make every rank ask storage for the same bytes. Where storage is
slower than the interconnect (object stores: always; local filesystems: when
``knobs.shared_reads`` says so), each such piece is read by one rank (owners
spread over the ranks, balanced by bytes) and sent to the others over the
load's process group. Only exact duplicates are shared: the same stored slice
(key, stored shard) and the same box inside it; a resharded load that needs
overlapping but different boxes reads them as before.

Call order (``ShardckptReader`` drives it; ``[all]`` = every rank, ``[coord]`` =
coordinator only):

1. [all]   ``with_rank_info``: this rank's place in the reader's group rides up
   with its local plan (``LoadPlan.storage_data``).
2. [coord] ``plan_shared_reads``: if every rank is in the same group as DCP's
   (same size, same members, same order), finds read items several ranks ask
   for, picks an owner for each (greedy, least loaded by bytes, counting what
   each rank reads anyway), cuts each into pieces of at most
   ``knobs.max_read_bytes`` (the coordinator's value, so every rank cuts alike)
   and fixes one global order, round-robin over owners so that every owner's
   reads are in flight from the start. Each rank's plan gets a ``SharedPlan``
   with the transfers it takes part in, in that order.
3. [all]   ``read_shared``, inside ``read_data``:
   a. resolve destinations; read, on the thread pool, the pieces this rank owns
      (in transfer order) and everything not shared (as an unshared load would).
      A failure here is kept, not raised: the rank still takes part in every
      transfer, or its peers would wait on it.
   b. transfers, in the global order, while the pool keeps reading: per piece
      the owner sends a status word (1: read and CRC32C-checked; 0: failed),
      then, if 1, the piece's stored-dtype bytes. A piece every rank loads goes
      by ``broadcast`` (every rank of the group takes part); one that only some
      ranks load goes by ``send``/``recv`` to those ranks only. Every transfer
      involves the same ranks in the same order everywhere, so the lowest
      unfinished one always has all of its ranks: no deadlock.
   c. one status exchange (``Group.run``): any rank's failure (a CRC mismatch
      the owner found, naming the file) is raised, typed, on every rank.

Collectives run under ``Group.guard``: a lost or stuck peer becomes a
``CheckpointReadError`` within ``knobs.collective_timeout_s``, never a hang.
Memory: receivers write straight into their destination when it is a
contiguous CPU tensor of the stored dtype, else through one buffer of at most a
piece; an owner whose destination has another dtype reads into a stored-dtype
copy first (so receivers get the stored values, not the owner's conversion).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from ..collectives import Group
from ..errors import CheckpointReadError
from ..format.layout import dtype_from_name, numel, split_box

__all__ = [
    "RankInfo",
    "Transfer",
    "SharedPlan",
    "wanted",
    "with_rank_info",
    "without_sharing",
    "plan_shared_reads",
    "shared_plan_of",
    "read_shared",
    "unit_key",
]

#: What makes two read items the same read: key, stored slice, box inside it.
UnitKey = tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]
#: ``(offsets, lengths, dim, shift)`` as ``format.layout.split_box`` returns.
Piece = tuple[list[int], list[int], int, int]
#: The reader's read job ``(ReadItem, entry, shard, destination)``; only the item
#: and the destination are looked at here.
Job = tuple[Any, ...]


def unit_key(item: ReadItem) -> UnitKey:
    off = item.storage_index.offset
    return (item.storage_index.fqn, tuple(off) if off is not None else (),
            tuple(item.storage_offsets), tuple(item.lengths))


def wanted(setting: str, remote: bool) -> bool:
    """Whether ``knobs.shared_reads`` asks for sharing on a backend that is (not) ``remote``."""
    return setting == "on" or (setting == "auto" and remote)


@dataclass(frozen=True)
class RankInfo:
    """A rank's place in the reader's process group, sent up with its local plan."""

    rank: int
    world_size: int
    members: int  # CRC32 of the group's global ranks, in group order (not the list: O(world))
    dcp_rank: int | None  # the rank DCP gave ``set_up_storage_reader``, if it did


@dataclass(frozen=True)
class Transfer:
    """One shared read item: who reads it from storage, who receives it, in what pieces."""

    key: UnitKey
    dtype: str
    owner: int  # group rank that reads it from storage
    ranks: tuple[int, ...]  # group ranks that load it (owner included), ascending
    pieces: tuple[Piece, ...]
    sizes: tuple[int, ...]  # bytes of each piece


@dataclass(frozen=True)
class SharedPlan:
    """A rank's part of the shared reads: its transfers, in the one global order."""

    world_size: int
    transfers: tuple[Transfer, ...]


def with_rank_info(plan: LoadPlan, group: Group, dcp_rank: int | None) -> LoadPlan:
    """[all] ``plan`` carrying this rank's :class:`RankInfo` (unchanged on one process)."""
    if not group.distributed:
        return plan
    pg = group.group if group.group is not None else dist.group.WORLD
    members = zlib.crc32(repr(list(dist.get_process_group_ranks(pg))).encode())
    return replace(plan, storage_data=RankInfo(group.rank, group.world_size, members, dcp_rank))


def without_sharing(plans: list[LoadPlan]) -> list[LoadPlan]:
    """[coord] The plans with no shared reads (every rank reads all it loads)."""
    return [replace(p, storage_data=None) if p.storage_data is not None else p for p in plans]


def shared_plan_of(plan: LoadPlan) -> SharedPlan | None:
    """[all] This rank's shared reads, if the coordinator planned any."""
    return plan.storage_data if isinstance(plan.storage_data, SharedPlan) else None


def _same_group(plans: list[LoadPlan]) -> bool:
    # Shared reads use the reader's group; DCP's plans are indexed by DCP's group.
    # Share only where the two are the same group, in the same order, on every rank.
    infos = [p.storage_data for p in plans]
    if len(infos) < 2 or not all(isinstance(i, RankInfo) for i in infos):
        return False
    members = infos[0].members
    return all(i.rank == r and i.world_size == len(infos) and i.members == members
               and i.dcp_rank in (None, r) for r, i in enumerate(infos))


def plan_shared_reads(
    plans: list[LoadPlan],
    dtype_of: Callable[[str], str | None],
    shard_sizes: Callable[[ReadItem], Sequence[int]],
    piece_bytes: int,
) -> list[LoadPlan]:
    """[coord] Annotate every rank's plan with its :class:`SharedPlan` (or none).

    ``dtype_of(key)``: the stored dtype's name (None: not a tensor in the
    checkpoint); ``shard_sizes(item)``: the sizes of the stored slice the item
    reads from (it may raise for a damaged checkpoint: that item is then not
    shared, and the rank reading it reports the damage itself).
    """
    if not _same_group(plans):
        return without_sharing(plans)
    world = len(plans)
    ranks_of: dict[UnitKey, list[int]] = {}
    first: dict[UnitKey, ReadItem] = {}
    nbytes: dict[UnitKey, int] = {}
    for r, p in enumerate(plans):
        for it in p.items:
            if it.type != LoadItemType.TENSOR:
                continue
            k = unit_key(it)
            rs = ranks_of.setdefault(k, [])
            if rs and rs[-1] == r:
                continue  # twice on one rank: it reads the second copy itself
            rs.append(r)
            if k not in first:
                first[k] = it
                name = dtype_of(it.storage_index.fqn)
                nbytes[k] = numel(it.lengths) * (dtype_from_name(name).itemsize if name else 1)
    load = [0] * world  # bytes each rank reads from storage in any case
    shared: list[tuple[UnitKey, list[int]]] = []
    for k, rs in ranks_of.items():
        if len(rs) > 1 and nbytes[k] > 0:
            shared.append((k, rs))
        else:
            for r in rs:
                load[r] += nbytes[k]
    queues: list[list[Transfer]] = [[] for _ in range(world)]
    for k, rs in sorted(shared, key=lambda kr: (-nbytes[kr[0]], kr[0])):
        it, name = first[k], dtype_of(k[0])
        try:
            if name is None:
                raise ValueError(k[0])
            itemsize = dtype_from_name(name).itemsize
            pieces = split_box(list(shard_sizes(it)), list(it.storage_offsets), list(it.lengths),
                               itemsize, piece_bytes)
        except Exception:  # noqa: BLE001 - damaged entry: read where it is asked for, raised there
            for r in rs:
                load[r] += nbytes[k]
            continue
        owner = min(rs, key=lambda r: (load[r], r))
        load[owner] += nbytes[k]
        queues[owner].append(Transfer(
            key=k, dtype=name, owner=owner, ranks=tuple(rs),
            pieces=tuple((list(o), list(n), d, s) for o, n, d, s in pieces),
            sizes=tuple(numel(n) * itemsize for _, n, _, _ in pieces)))
    # Round-robin over owners: every owner's first reads are needed first.
    order = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    if not order:
        return without_sharing(plans)
    out = []
    for r, p in enumerate(plans):
        mine = tuple(t for t in order if len(t.ranks) == world or r in t.ranks)
        out.append(replace(p, storage_data=SharedPlan(world, mine) if mine else None))
    return out


# ----------------------------------------------------------------------------- reading


def _region(job: Job, piece: Piece) -> torch.Tensor:
    """The part of the job's destination a piece fills (as the reader narrows it)."""
    item, dest = job[0], job[3]
    _, lengths, dim, shift = piece
    whole = shift == 0 and list(lengths) == list(item.lengths)
    return dest if whole else dest.narrow(dim, shift, lengths[dim])


def _as_bytes(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``t``'s memory as flat uint8 when gloo can move it in place, else None."""
    if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
        return None
    return t.reshape(-1).view(torch.uint8)


class _Scratch:
    """One reusable buffer for pieces that cannot move in place (a piece at most)."""

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)

    def get(self, n: int) -> torch.Tensor:
        if self._buf.numel() < n:
            self._buf = torch.empty(n, dtype=torch.uint8)
        return self._buf[:n]


def _send(t: torch.Tensor, tr: Transfer, everyone: bool, me: int, pg: Any) -> None:
    if everyone:
        dist.broadcast(t, group=pg, group_src=tr.owner)
    else:
        for r in tr.ranks:
            if r != me:
                dist.send(t, group=pg, group_dst=r)


def _recv(t: torch.Tensor, tr: Transfer, everyone: bool, pg: Any) -> None:
    if everyone:
        dist.broadcast(t, group=pg, group_src=tr.owner)
    else:
        dist.recv(t, group=pg, group_src=tr.owner)


def _note(failures: list[BaseException], e: BaseException) -> None:
    failures.append(e)


def _transfer(shared: SharedPlan, group: Group, jobs: dict[UnitKey, Job],
              owned: dict[tuple[int, int], Future[None]], failures: list[BaseException]) -> None:
    me, pg = group.rank, group.group
    status = torch.zeros(1, dtype=torch.int32)
    scratch = _Scratch()
    with group.guard("sharing replicated reads over the process group", CheckpointReadError):
        for ti, tr in enumerate(shared.transfers):
            job, dtype = jobs.get(tr.key), dtype_from_name(tr.dtype)
            everyone = len(tr.ranks) == shared.world_size
            for pi, (piece, n) in enumerate(zip(tr.pieces, tr.sizes)):
                if n == 0:
                    continue
                if tr.owner == me:
                    buf = None
                    fut = owned.get((ti, pi))
                    try:
                        if fut is not None:
                            fut.result()  # read and CRC32C-checked (or raises)
                            region = _region(job, piece)  # type: ignore[arg-type]
                            buf = _as_bytes(region, dtype)
                            if buf is None:  # GPU or strided destination: stage it
                                buf = scratch.get(n)
                                buf.view(dtype).view(region.shape).copy_(region)
                    except Exception as e:  # noqa: BLE001 - reported after the transfers
                        _note(failures, e)
                        buf = None
                    status.fill_(0 if buf is None else 1)
                    _send(status, tr, everyone, me, pg)
                    if buf is not None:
                        _send(buf, tr, everyone, me, pg)
                    continue
                _recv(status, tr, everyone, pg)
                if int(status.item()) == 0:
                    continue  # the owner failed; it reports why
                region = None
                buf = None
                try:
                    if job is not None:
                        region = _region(job, piece)
                        buf = _as_bytes(region, dtype)
                except Exception as e:  # noqa: BLE001 - reported after the transfers
                    _note(failures, e)
                    region = None
                direct = buf is not None
                if buf is None:
                    buf = scratch.get(n)
                _recv(buf, tr, everyone, pg)
                if region is not None and not direct:
                    try:
                        region.copy_(buf.view(dtype).view(region.shape))
                    except Exception as e:  # noqa: BLE001 - reported after the transfers
                        _note(failures, e)


def _raise_first(failures: list[BaseException]) -> None:
    if failures:
        raise failures[0]


def read_shared(
    shared: SharedPlan,
    group: Group,
    build: Callable[[], list[Job]],
    read_piece: Callable[[Job, Piece], None],
    local_pieces: Callable[[Job], list[Piece]],
    workers: int,
) -> list[Job]:
    """[all] Read this rank's part of the load, take part in every transfer, and
    return the read jobs (for the planner's ``commit_tensor``). Raises one typed
    error on every rank if any rank failed.

    ``build()`` resolves the destinations (the reader's job list); ``read_piece``
    reads one piece from storage into its job's destination; ``local_pieces``
    cuts an unshared job as the reader would.
    """
    failures: list[BaseException] = []
    jobs: list[Job] = []
    try:
        jobs = build()
    except Exception as e:  # noqa: BLE001 - this rank still takes part in every transfer
        _note(failures, e)
    mine = {t.key for t in shared.transfers}
    by_key: dict[UnitKey, Job] = {}
    local: list[Job] = []
    for j in jobs:
        k = unit_key(j[0])
        if k in mine and k not in by_key:
            by_key[k] = j
        else:
            local.append(j)
    # An owner whose destination holds another dtype reads the stored dtype first.
    converted: dict[UnitKey, Job] = {}
    for t in shared.transfers:
        j = by_key.get(t.key)
        if j is not None and t.owner == group.rank and j[3].dtype != dtype_from_name(t.dtype):
            converted[t.key] = j
            by_key[t.key] = (*j[:3], torch.empty(tuple(j[0].lengths), dtype=dtype_from_name(t.dtype)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shardckpt-read") as pool:
        owned: dict[tuple[int, int], Future[None]] = {}
        for ti, t in enumerate(shared.transfers):
            j = by_key.get(t.key)
            if t.owner == group.rank and j is not None:
                for pi, pc in enumerate(t.pieces):
                    owned[(ti, pi)] = pool.submit(read_piece, j, pc)
        rest = [pool.submit(read_piece, j, pc)
                for j in local for pc in local_pieces(j)]
        _transfer(shared, group, by_key, owned, failures)
        for f in rest:
            try:
                f.result()
            except Exception as e:  # noqa: BLE001 - reported with the others
                _note(failures, e)
    if not failures:
        try:
            for k, j in converted.items():
                j[3].copy_(by_key[k][3])
        except Exception as e:  # noqa: BLE001 - reported with the others
            _note(failures, e)
    group.run("reading replicated pieces shared over the process group",
              lambda: _raise_first(failures), CheckpointReadError)
    return jobs
