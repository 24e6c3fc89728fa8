"""The node-local tier: each rank's local view under ``<local_root>/step_N/rank_R/``,
copies of other nodes' ranks beside it, one commit marker per node.

Layout on each node::

    <local_root>/step_0000000030/
        rank_00000/      # a single-process shardckpt checkpoint of rank 0's local view
        rank_00003/      # a replica: rank 3 runs on another node
        COMMIT.json      # written last, once every rank agreed (local_commit)

Call order of a local save (background thread; ``[all]`` every rank of the
tier's own gloo group, ``[leader]`` the lowest rank of each node):

1. [leader] un-commit this step's marker if an earlier save left one; [all]
   agree (no rank overwrites its directory while an old marker still vouches
   for the step).
2. [all] save the staged local view to ``rank_<me>/`` (single process: a
   group of one, raw chunks, CRC32C each, manifest committed last); gather
   every rank's status, layout digest and manifest CRC.
3. [all] send ``rank_<me>/`` to the replica holders, receive the shards this
   rank holds copies of (``tiers.exchange``: written, manifest last,
   CRC-verified); gather status.
4. [leader] publish ``COMMIT.json`` (tmp + fsync + rename); gather status;
   then local retention on this node.

A kill anywhere before 4 leaves the step without a marker on any node (so
the previous step stays the newest usable one); after 4 on one node, the step
is complete on that node's evidence plus the copies it holds.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

from ... import knobs as knobs_mod
from ...api import load
from ...backends import open_storage
from ...collectives import Group, new_gloo_group, own_group
from ...engine.save import SaveRequest, save_with
from ...errors import (
    CheckpointReadError,
    CheckpointWriteError,
    CorruptCheckpointError,
    ShardckptError,
)
from ...format.manifest import MANIFEST_NAME
from ...native.crc32c import crc32c
from ...store import UNUSABLE, CheckpointDir, CheckpointRoot, commit_strategy, step_dirname
from ...store.retention import CheckpointInfo, KeepLast, steps_to_delete
from .candidates import LocalCandidate, NodeReport, StepFiles
from .exchange import Receive, Send, transfer
from .local_commit import COMMIT_NAME, LocalCommit, decode_commit, encode_commit
from .nodes import node_id, node_members, replica_sources, replica_targets
from .view import LocalView, layout_digest

__all__ = ["LocalTier", "rank_dirname", "scan_root", "root_infos"]

log = logging.getLogger("shardckpt.manager")


def rank_dirname(rank: int) -> str:
    return f"rank_{rank:05d}"


def _parse_rank(name: str) -> int | None:
    return int(name[5:]) if name.startswith("rank_") and name[5:].isdigit() else None


class LocalTier:
    """One manager's node-local tier. Collective constructor (every rank of ``ctl``)."""

    def __init__(self, local_root: str | os.PathLike[str], keep_last: int, replicas: int, ctl: Group) -> None:
        storage = open_storage(local_root)
        if storage.capabilities.remote or not storage.capabilities.atomic_rename:
            raise ValueError(f"local_root must be a path on node-local storage (a local disk or RAM disk), "
                             f"got {storage.url}")
        self.root = CheckpointRoot(storage)
        self.url = storage.url
        self.keep_last = keep_last
        self._ctl = ctl
        self.rank, self.world_size = ctl.rank, ctl.world_size
        mine = node_id()
        self.nodes: tuple[str, ...] = tuple(ctl.all_gather("finding each rank's node", lambda: mine,
                                                           ShardckptError))
        groups = node_members(self.nodes)
        self.node_ranks = next(g for g in groups if self.rank in g)
        self.is_leader = self.rank == self.node_ranks[0]
        if replicas > len(groups) - 1 and self.rank == 0:
            if len(groups) == 1:
                log.warning("local tier: all %d rank(s) run on one node (%s): no peer replicas (they need "
                            ">= 2 nodes); losing this node loses the local tier", self.world_size, mine)
            else:
                log.warning("local tier: local_replicas=%d but only %d other node(s): %d replica(s) per rank",
                            replicas, len(groups) - 1, len(groups) - 1)
        self.targets = replica_targets(self.nodes, replicas)
        self.sources = replica_sources(self.targets, self.rank)
        self._bg = ctl
        self._single: dist.ProcessGroup | None = None
        if ctl.enabled:
            # The background save's collectives get a gloo group of their own (never the
            # training group, never the manager's); single-process saves and loads of this
            # rank's own view a group of one (only this rank takes part in creating it).
            self._bg = Group(new_gloo_group(ctl.group))
            self._single = own_group()
        storage.makedirs("")

    # ----------------------------------------------------------------- layout

    def step_storage(self, step: int) -> Any:
        return self.root.storage.child(step_dirname(step))

    def rank_dir(self, step: int, rank: int) -> CheckpointDir:
        return CheckpointDir(self.step_storage(step).child(rank_dirname(rank)))

    # ----------------------------------------------------------------- saving

    def save(self, step: int, view: LocalView, metadata: Mapping[str, Any], knobs: knobs_mod.Knobs) -> None:
        """[all] The background part of a local save (module docstring, steps 1-4),
        under the caller's ``knobs`` snapshot."""
        g, me, where = self._bg, self.rank, f"step {step} to the local tier {self.url}"
        step_s = self.step_storage(step)
        g.run(f"preparing {where}", lambda: self._uncommit(step) if self.is_leader else None, CheckpointWriteError)
        own = self.rank_dir(step, me)

        def write_own() -> tuple[str, int]:
            meta = {**metadata, "tier": "local", "rank": me, "world_size": self.world_size, "layout": view.layout}
            save_with({"state": view.tree}, SaveRequest.make(own.url, overwrite=True, metadata=meta,
                                                             compression=None, knobs=knobs), self._single)
            return layout_digest(view.layout), crc32c(own.storage.read_bytes(MANIFEST_NAME))

        agreed = g.all_gather(f"saving {where}", write_own, CheckpointWriteError)
        if any(self.targets):
            sends = [Send(t, own) for t in self.targets[me]]
            receives = [Receive(s, self.rank_dir(step, s)) for s in self.sources]
            errors = transfer(g.group, sends, receives) if g.group is not None and g.distributed else []
            g.run(f"copying replicas of {where}", lambda: _raise_first(errors), CheckpointWriteError)
        commit = LocalCommit(step, self.world_size, self.nodes, tuple(tuple(t) for t in self.targets),
                             tuple(d for d, _ in agreed), tuple(c for _, c in agreed),
                             dict(metadata.get("metrics") or {}), time.time())
        g.run(f"committing {where}", lambda: self._publish(step_s, commit) if self.is_leader else None,
              CheckpointWriteError)
        if self.is_leader:
            self.retain(in_flight=())

    def _publish(self, step_s: Any, commit: LocalCommit) -> None:
        commit_strategy(step_s).publish(step_s, COMMIT_NAME, encode_commit(commit))

    def _uncommit(self, step: int) -> None:
        s = self.step_storage(step)
        if s.exists(COMMIT_NAME):
            s.remove(COMMIT_NAME)
            s.sync_dir("")

    # --------------------------------------------------------------- retention

    def infos(self) -> list[CheckpointInfo]:
        """This node's local steps with their status, oldest first (``root_infos``)."""
        return root_infos(self.root)

    def retain(self, in_flight: tuple[int, ...]) -> None:
        """[leader] Keep this node's ``keep_last`` newest committed steps; remove older
        ones and leftovers of saves that never committed. Failures only warn."""
        try:
            doomed = steps_to_delete(self.infos(), [KeepLast(self.keep_last)], in_flight)
        except (OSError, ShardckptError) as e:
            log.warning("local retention skipped: could not list %s: %s", self.url, e)
            return
        for c in doomed:
            try:
                self._uncommit(c.step)  # the marker first: a removal cut short is incomplete, not torn
                self.step_storage(c.step).remove_tree()
                log.info("local retention: removed step %d (%s) from %s", c.step, c.status, self.url)
            except OSError as e:
                log.warning("local retention: could not remove %s: %s", c.path, e)

    # ------------------------------------------------------------------ restore

    def scan(self) -> dict[int, StepFiles]:
        return scan_root(self.root)

    def report(self, digest: str) -> NodeReport:
        return NodeReport(self.nodes[self.rank], digest, self.scan() if self.is_leader else None)

    def load(self, c: LocalCandidate, view: LocalView) -> None:
        """[all] Fetch missing shards from peers, then load ``rank_<me>`` into ``view``
        in place (every chunk CRC32C-checked as it is read). Raises on every rank if
        any rank failed."""
        me, step = self.rank, c.step
        where = f"local step {step} at {self.url}"
        if c.fetch:
            sends = [Send(dst, self.rank_dir(step, dst)) for dst, src in sorted(c.fetch.items()) if src == me]
            receives = [Receive(c.fetch[me], self.rank_dir(step, me))] if me in c.fetch else []
            bg = self._bg.group
            errors = transfer(bg, sends, receives) if bg is not None and self._bg.distributed else []
            self._ctl.run(f"fetching shards of {where} from peers", lambda: _raise_first(errors),
                          CheckpointReadError)

            def mark() -> None:  # the fetched copies count on this node from now on
                if self.is_leader and self.nodes[me] in c.nodes_without_marker:
                    self._publish(self.step_storage(step), c.commit)

            self._ctl.run(f"recording {where} on the new node(s)", mark, CheckpointReadError)
        self._ctl.run(f"loading {where}", lambda: load({"state": view.tree}, self.rank_dir(step, me).url,
                                                       process_group=self._single), CheckpointReadError)


def _raise_first(errors: list[BaseException]) -> None:
    if errors:
        raise errors[0]


def scan_root(root: CheckpointRoot) -> dict[int, StepFiles]:
    """What a node holds under its local root: every step directory's marker and the
    manifest CRC32C of each committed rank directory. Reads no shard data."""
    out: dict[int, StepFiles] = {}
    for step in root.steps():
        s = root.storage.child(step_dirname(step))
        marker: LocalCommit | str | None = None
        manifests: dict[int, int] = {}
        try:
            names = s.listdir()
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed while we looked, or not a step directory
        if COMMIT_NAME in names:
            try:
                marker = decode_commit(s.read_bytes(COMMIT_NAME), f"{s.url}/{COMMIT_NAME}")
            except CorruptCheckpointError as e:
                marker = str(e)
            except FileNotFoundError:
                pass  # removed while we looked (retention, a re-save)
        sizes: dict[int, int] = {}
        for name in names:
            r = _parse_rank(name)
            if r is None:
                continue
            d = CheckpointDir(s.child(name))
            try:
                sizes[r] = d.read_checked().total_bytes
                manifests[r] = crc32c(d.storage.read_bytes(MANIFEST_NAME))
            except (*UNUSABLE, FileNotFoundError):
                sizes.pop(r, None)
        out[step] = StepFiles(marker, manifests, sizes)
    return out


def root_infos(root: CheckpointRoot) -> list[CheckpointInfo]:
    """A local root's steps as this node sees them, oldest first: ``valid`` with a
    marker that decodes, ``corrupt`` with a damaged one, else ``incomplete``;
    ``size_bytes`` counts the rank directories on this node."""
    out = []
    for step, files in sorted(scan_root(root).items()):
        s = root.storage.child(step_dirname(step))
        m = files.marker
        if isinstance(m, LocalCommit):
            out.append(CheckpointInfo(step, s.url, "valid", size_bytes=sum(files.sizes.values()), created_unix=m.created_unix,
                                      metrics=dict(m.metrics), tiers=("local",)))
        else:
            why = m if isinstance(m, str) else "no commit marker (a save that never finished, or in flight)"
            out.append(CheckpointInfo(step, s.url, "corrupt" if isinstance(m, str) else "incomplete",
                                      reason=why, tiers=("local",)))
    return out
