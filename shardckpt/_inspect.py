"""Judging a checkpoint directory without loading it: valid, incomplete or corrupt.

Shared by the manager (listing, retention, restore fallback) and anything else
that lists checkpoints. ``deep`` reads every chunk (``verify``); otherwise only
the manifest and the shard files' sizes are checked.
"""

from __future__ import annotations

from .api import verify
from .errors import CheckpointNotFoundError, CorruptCheckpointError, IncompleteCheckpointError
from .format.manifest import Manifest
from .retention import CheckpointInfo
from .storage import Storage, open_storage
from .storage.commit import read_manifest, size_mismatches

__all__ = ["inspect_checkpoint", "verify_problem", "read_checked", "status_of", "UNUSABLE"]

#: Errors that make a checkpoint unusable (as opposed to I/O trouble, which is raised).
UNUSABLE = (CorruptCheckpointError, IncompleteCheckpointError, CheckpointNotFoundError)


def read_checked(storage: Storage) -> Manifest:
    """The manifest, plus every shard file present with its recorded size (no data read)."""
    manifest = read_manifest(storage)
    for rel, why in size_mismatches(storage, manifest.files).items():
        raise CorruptCheckpointError(f"{storage.url}/{rel}: {why}", file=rel)
    return manifest


def inspect_checkpoint(step: int, path: str, deep: bool) -> CheckpointInfo | None:
    try:
        manifest = verify(path).manifest if deep else read_checked(open_storage(path))
    except CheckpointNotFoundError:
        return None  # removed while we looked
    except UNUSABLE as e:
        return CheckpointInfo(step, path, status_of(e), reason=str(e))
    metrics = manifest.metadata.get("metrics")
    return CheckpointInfo(
        step, path, "valid", size_bytes=manifest.total_bytes, created_unix=manifest.created_unix,
        metrics=dict(metrics) if isinstance(metrics, dict) else {},
    )


def verify_problem(path: str) -> tuple[str, str] | None:
    try:
        verify(path)
    except UNUSABLE as e:
        return status_of(e), str(e)
    return None


def status_of(e: BaseException) -> str:
    return "corrupt" if isinstance(e, CorruptCheckpointError) else "incomplete"
