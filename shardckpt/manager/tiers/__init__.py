"""Multi-tier checkpoints: a node-local tier (each rank's shard on its own node,
copies on other nodes) under a durable root, used by ``CheckpointManager``'s
``local_root=`` (see ``tiers.tiered`` for the flow, ``tiers.local`` for the
layout and call order)."""

from __future__ import annotations

from .listing import is_local_root, list_local, merge_tiers, tier_rows
from .local_commit import MARKER_NAME, LocalCommit
from .local_tier import LocalTier
from .nodes import node_id, replica_targets
from .tiered import Tiers, check_tier_args

__all__ = ["LocalTier", "Tiers", "LocalCommit", "MARKER_NAME", "node_id", "replica_targets",
           "list_local", "merge_tiers", "is_local_root", "check_tier_args",
           "tier_rows"]
