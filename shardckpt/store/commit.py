"""How a manifest is published: one strategy per kind of storage.

Two strategies because POSIX has no "PUT" and object stores have no rename:

- ``RenameCommit`` (backends with ``atomic_rename``): write ``manifest.json.tmp``,
  fsync it, rename it over ``manifest.json``, fsync the directory. After a
  crash the name holds the previous manifest or all of the new one.
- ``ManifestLastPut`` (backends with ``atomic_put``): one PUT of
  ``manifest.json``, issued only after every shard object was confirmed by
  size (``CheckpointDir.commit`` checks that before publishing with either
  strategy). A reader sees the old object or the new one, never a part.

``commit_strategy`` picks one from a backend's declared capabilities; each
strategy's ``validate`` raises ``CheckpointWriteError`` for a backend that lacks
what it relies on, so a misdeclared third-party backend fails before writing.

Both check the stored manifest's size before it counts as committed (a backend
that silently stored a prefix is caught), and a failure after the manifest
became visible (the directory fsync) un-commits it again: a save that reports
failure leaves nothing committed.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Protocol

from ..backends import Storage
from ..errors import CheckpointWriteError

__all__ = ["CommitStrategy", "RenameCommit", "ManifestLastPut", "commit_strategy"]


class CommitStrategy(Protocol):
    name: str

    def validate(self, storage: Storage) -> None:
        """Raise ``CheckpointWriteError`` unless ``storage`` supports this strategy."""

    def publish(self, storage: Storage, rel: str, data: bytes) -> None:
        """Make ``data`` visible at ``rel`` all at once."""


@dataclass(frozen=True)
class RenameCommit:
    name: str = "rename"

    def validate(self, storage: Storage) -> None:
        if not storage.capabilities.atomic_rename:
            raise CheckpointWriteError(f"{storage.url}: rename commit needs a backend with atomic rename")

    def publish(self, storage: Storage, rel: str, data: bytes) -> None:
        self.validate(storage)
        tmp = rel + ".tmp"
        storage.put(tmp, data)  # fsynced where the backend is durable
        check_stored_size(storage, tmp, len(data))  # a truncated manifest must never be renamed in
        storage.rename(tmp, rel)
        try:
            storage.sync_dir(posixpath.dirname(rel))
        except BaseException:
            # The save is about to report failure: the manifest must not stay visible
            # (an overwrite's previous manifest is already replaced: the step becomes
            # incomplete, never torn).
            uncommit(storage, rel)
            raise


@dataclass(frozen=True)
class ManifestLastPut:
    name: str = "manifest-last-put"

    def validate(self, storage: Storage) -> None:
        if not storage.capabilities.atomic_put:
            raise CheckpointWriteError(f"{storage.url}: manifest-last commit needs a backend with atomic put")

    def publish(self, storage: Storage, rel: str, data: bytes) -> None:
        self.validate(storage)
        storage.put(rel, data)
        try:
            check_stored_size(storage, rel, len(data))
        except BaseException:
            uncommit(storage, rel)
            raise


def check_stored_size(storage: Storage, rel: str, expected: int) -> None:
    """Raise ``CheckpointWriteError`` unless ``rel`` holds ``expected`` bytes: a backend
    that silently stored a prefix of the manifest must not get it committed."""
    size = storage.size(rel)
    if size != expected:
        raise CheckpointWriteError(
            f"{storage.url}/{rel}: the backend stored {size} of the manifest's {expected} bytes; not committing",
            path=storage.url)


def uncommit(storage: Storage, rel: str) -> None:
    """Best effort: remove a just-published manifest after a failure (then the
    checkpoint lists as incomplete). Never raises: the original error is reported."""
    try:
        storage.remove(rel)
        storage.sync_dir(posixpath.dirname(rel))
    except Exception:  # noqa: BLE001 - the caller re-raises the first error
        pass


def commit_strategy(storage: Storage) -> CommitStrategy:
    """The strategy for a backend, from its capabilities (rename preferred: it also
    gives durability through fsync)."""
    caps = storage.capabilities
    if caps.atomic_rename:
        return RenameCommit()
    if caps.atomic_put:
        return ManifestLastPut()
    raise CheckpointWriteError(
        f"{storage.url}: the backend declares neither atomic rename nor atomic put, so no commit "
        "can be made atomic; refusing to save there")
