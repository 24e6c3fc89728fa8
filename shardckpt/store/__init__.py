"""What checkpoints *mean* on any byte backend: a checkpoint directory's lifecycle
(``checkpoint``: prepare, probe, commit, read, verify, delete), the commit
strategies picked from a backend's capabilities (``commit``), a root of step
checkpoints (``root``: listing without a lock), retention policies
(``retention``), the owner marker (``owner``) and verification (``verify``).

May import: ``format``, ``backends``, ``native``, ``errors``, ``knobs``. Used by
``io``, the engine, the manager, tools and converters alike.
"""

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
