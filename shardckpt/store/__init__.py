"""What checkpoints *mean* on any byte backend: a checkpoint directory's lifecycle
(prepare, probe, commit, read, verify, delete) and a root of step checkpoints
(listing without a lock, retention, owner marker). The manager, the save and
load paths, and tools all go through this one layer."""

from __future__ import annotations

from .checkpoint import SHARED_STORAGE_HINT, CheckpointDir
from .commit import CommitStrategy, ManifestLastPut, RenameCommit, commit_strategy
from .owner import OWNER_MARKER, OwnerMarker
from .root import UNUSABLE, CheckpointRoot, parse_step, status_of, step_dirname
from .verify import VerifyReport, verify_dir

__all__ = [
    "CheckpointDir",
    "CheckpointRoot",
    "CommitStrategy",
    "RenameCommit",
    "ManifestLastPut",
    "commit_strategy",
    "OwnerMarker",
    "OWNER_MARKER",
    "VerifyReport",
    "verify_dir",
    "step_dirname",
    "parse_step",
    "status_of",
    "UNUSABLE",
    "SHARED_STORAGE_HINT",
]
