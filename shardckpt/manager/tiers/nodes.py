"""Which node each rank runs on, and where each rank's replicas go (pure).

A node is what shares local storage: ranks on one node see the same
``local_root``, ranks on different nodes never do. Identity comes from the
launcher's environment, not from the storage, because before anything is
written there is nothing to probe: ``SHARDCKPT_NODE_ID`` if set (other
launchers: e.g. ``$SLURM_NODEID``), else the hostname plus torchrun's
``GROUP_RANK`` (the agent's index: agents on one host with private mounts,
as in the tests, are distinct nodes), else the hostname alone.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

__all__ = ["node_id", "node_members", "replica_targets", "replica_sources"]


def node_id() -> str:
    """This process's node, from the environment (see the module docstring)."""
    override = os.environ.get("SHARDCKPT_NODE_ID")
    if override:
        return override
    host = socket.gethostname()
    group = os.environ.get("GROUP_RANK")
    return f"{host}/{group}" if group is not None else host


def node_members(nodes: Sequence[str]) -> list[list[int]]:
    """The ranks of each node (``nodes[r]`` is rank r's node), nodes ordered by their
    lowest rank, ranks ascending."""
    members: dict[str, list[int]] = {}
    for rank, node in enumerate(nodes):
        members.setdefault(node, []).append(rank)
    return list(members.values())


def replica_targets(nodes: Sequence[str], replicas: int) -> list[list[int]]:
    """Rank r -> the ranks that hold a copy of its shard: one rank on each of the
    ``replicas`` nodes that follow r's node (round robin), at r's local index on
    that node (modulo its size), so copies spread evenly and never share a node
    with the original. Capped at (number of nodes - 1) copies."""
    groups = node_members(nodes)
    index = {r: (n, i) for n, ranks in enumerate(groups) for i, r in enumerate(ranks)}
    k = max(0, min(replicas, len(groups) - 1))
    out: list[list[int]] = []
    for rank in range(len(nodes)):
        n, i = index[rank]
        out.append([groups[(n + j) % len(groups)][i % len(groups[(n + j) % len(groups)])]
                    for j in range(1, k + 1)])
    return out


def replica_sources(targets: Sequence[Sequence[int]], rank: int) -> list[int]:
    """The ranks whose shards ``rank`` holds a copy of."""
    return [src for src, ts in enumerate(targets) if rank in ts]
