"""What the trainer integrations (``shardckpt.lightning``, ``shardckpt.transformers``,
``shardckpt.accelerate``) share: a trainer's whole checkpoint dict saved and loaded
exactly as one shardckpt checkpoint (``tree``, ``tree_io``), finding the newest
valid checkpoint in a trainer's output directory (``discovery``) and every
process's RNG streams (``rng``).

An entry point: may import ``api``, ``manager`` and everything below them; the
trainer packages import this one, never each other.
"""

from __future__ import annotations

from .discovery import (
    SkippedCheckpointWarning,
    by_commit_time,
    children,
    is_checkpoint_dir,
    newest_valid,
    numbered,
)
from .tree import holds_tensor, join, leaves, split
from .tree_io import (
    TREE_KEY,
    check_state_dict,
    load_tree,
    read_manifest,
    save_tree,
    skeleton_of,
    stored_shapes,
    subtree,
)

__all__ = [
    "SkippedCheckpointWarning",
    "children",
    "newest_valid",
    "numbered",
    "by_commit_time",
    "is_checkpoint_dir",
    "split",
    "join",
    "leaves",
    "holds_tensor",
    "TREE_KEY",
    "save_tree",
    "load_tree",
    "read_manifest",
    "skeleton_of",
    "subtree",
    "stored_shapes",
    "check_state_dict",
]
