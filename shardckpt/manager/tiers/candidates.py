"""Which local step a restore can use, and where each rank gets its shard (pure).

Input: one ``NodeReport`` per rank (what that rank's node holds; ranks on one
node report the same files, so only each node's first rank sends them) and
every rank's current layout digest. A local step is usable by this job when a
commit marker for it exists on some node of the job, it was saved at this
world size with the same layouts, and every rank's shard is on some node of
the job as the very copy the marker names (its manifest's CRC32C matches, so a
stale copy of an earlier save of the same step never counts). A rank whose
own node lacks its shard fetches it from a node that has one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .local_commit import LocalCommit

__all__ = ["StepFiles", "NodeReport", "LocalCandidate", "local_candidates"]


@dataclass(frozen=True)
class StepFiles:
    """One step directory on one node: its marker (a ``LocalCommit``, the reason it
    is unreadable, or None when absent) and the CRC32C of each committed rank
    directory's manifest."""

    marker: LocalCommit | str | None
    manifests: Mapping[int, int] = field(default_factory=dict)
    sizes: Mapping[int, int] = field(default_factory=dict)  # rank -> bytes its checkpoint holds


@dataclass(frozen=True)
class NodeReport:
    node: str
    digest: str  # the reporting rank's current layout digest
    steps: Mapping[int, StepFiles] | None  # None: another rank of this node reports its files


@dataclass(frozen=True)
class LocalCandidate:
    step: int
    commit: LocalCommit
    fetch: Mapping[int, int]  # rank -> the rank sending it its shard (absent: its own node has it)
    nodes_without_marker: tuple[str, ...] = ()

    def describe(self) -> str:
        if not self.fetch:
            return "every rank's shard is on its own node"
        return (f"rank(s) {sorted(self.fetch)} fetch their shards from the peers holding copies "
                f"(rank(s) {sorted(set(self.fetch.values()))})")


def local_candidates(reports: Sequence[NodeReport]) -> tuple[list[LocalCandidate], dict[int, str]]:
    """Usable local steps, newest first, and why each newer unusable one was not."""
    world = len(reports)
    nodes = [r.node for r in reports]
    files: dict[str, Mapping[int, StepFiles]] = {r.node: r.steps for r in reports if r.steps is not None}
    members: dict[str, list[int]] = {}
    for rank, n in enumerate(nodes):
        members.setdefault(n, []).append(rank)
    steps = sorted({s for f in files.values() for s in f}, reverse=True)
    out: list[LocalCandidate] = []
    reasons: dict[int, str] = {}
    for step in steps:
        here = {n: f[step] for n, f in files.items() if step in f}
        markers = [m.marker for m in here.values() if isinstance(m.marker, LocalCommit)]
        if not markers:
            bad = [m.marker for m in here.values() if isinstance(m.marker, str)]
            reasons[step] = bad[0] if bad else "no commit marker on any node (a save that never finished)"
            continue
        c = markers[0]
        if c.world_size != world:
            reasons[step] = f"saved at world size {c.world_size}, the job now has {world}"
            continue
        changed = [r for r in range(world) if c.layouts[r] != reports[r].digest]
        if changed:
            reasons[step] = f"rank(s) {changed} hold tensors of other shapes/placements than at save time"
            continue
        fetch: dict[int, int] = {}
        missing = []
        for rank in range(world):
            want = c.manifests[rank] if rank < len(c.manifests) else None
            holders = [n for n, m in here.items() if want is not None and m.manifests.get(rank) == want]
            if nodes[rank] in holders:
                continue
            if not holders:
                missing.append(rank)
                continue
            senders = members[holders[0]]
            fetch[rank] = senders[rank % len(senders)]
        if missing:
            was = sorted({c.nodes[r] for r in missing})
            reasons[step] = (f"the shard(s) of rank(s) {missing} are on no node of this job "
                             f"(saved on {was}; copies on nodes that are gone, or none)")
            continue
        out.append(LocalCandidate(step, c, fetch, tuple(sorted(set(nodes) - {n for n, m in here.items()
                                                                                  if isinstance(m.marker, LocalCommit)}))))
    return out, reasons
