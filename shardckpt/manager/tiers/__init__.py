"""Multi-tier checkpoints: a node-local tier (each rank's shard on its own node,
copies on other nodes) under a durable root, used by ``CheckpointManager``'s
``local_root=``: the flow (``tiered``), the local tier's layout and call order
(``local_tier``), its commit record (``local_commit``), which local step can be
restored (``candidates``), shard transfers between ranks (``exchange``), node
ids and replica placement (``nodes``), listing (``listing``) and a staged view of
the state (``view``).

May import: the public API and ``engine.save`` (a tier saves and loads like any
checkpoint), ``store``, ``backends``, ``format``, ``native``, ``collectives``,
``errors``, ``knobs``.
"""

from __future__ import annotations

from .listing import is_local_root, list_local, merge_tiers, tier_rows
from .local_commit import COMMIT_NAME, LocalCommit
from .local_tier import LocalTier
from .nodes import node_id, replica_targets
from .tiered import Tiers, check_tier_args

__all__ = ["LocalTier", "Tiers", "LocalCommit", "COMMIT_NAME", "node_id", "replica_targets",
           "list_local", "merge_tiers", "is_local_root", "check_tier_args",
           "tier_rows"]
