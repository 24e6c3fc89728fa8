"""Byte backends: what the engine needs from a place that holds bytes, and nothing more.

A backend moves bytes; what a checkpoint directory *means* (commit, status,
retention) lives in ``shardckpt.store``. Callers never test a backend's type:
they read its declared :class:`Capabilities` and branch on those, so a new
backend (registered by URL scheme, see ``storage.registry``) works everywhere
the built-in ones do.

Paths given to a ``Storage`` are relative to its root, ``/``-separated; ``""``
is the root itself.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Protocol

from .. import knobs as knobs_mod

__all__ = ["Capabilities", "Storage", "ShardFile", "RandomReader"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend guarantees; the store picks strategies from these.

    - ``atomic_rename``: ``rename`` replaces the target atomically (POSIX), so a
      manifest is published by tmp + fsync + rename + directory fsync.
    - ``atomic_put``: ``put`` of one small object is all-or-nothing for readers
      (object stores), so a manifest is published by a single PUT, last.
    - ``exclusive_create``: ``create_exclusive`` is atomic: of two concurrent
      callers exactly one succeeds (``O_EXCL``; S3 ``If-None-Match: *``).
    - ``durable_fsync``: a closed file / ``put`` is on stable storage (fsync).
    - ``remote``: bytes cross a network (compression pays; reads are slow
      enough that reading once and broadcasting pays).
    """

    atomic_rename: bool = False
    atomic_put: bool = False
    exclusive_create: bool = False
    durable_fsync: bool = False
    remote: bool = False


class ShardFile(Protocol):
    """A file being written front to back (a multipart upload on object stores)."""

    def write(self, data: memoryview | bytes) -> None: ...

    def close(self) -> None:
        """Finish the file and make it durable (fsync / complete the upload)."""

    def abort(self) -> None:
        """Give up after a failure: nothing may remain that looks finished (an
        upload in progress is aborted). Never raises."""


class RandomReader(Protocol):
    def size(self) -> int: ...

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` from ``offset``; raise ``EOFError`` on a short read."""

    def close(self) -> None: ...


class Storage(abc.ABC):
    """One location (a checkpoint directory or a root of them). Get one with
    ``shardckpt.backends.open_storage(url, storage_options=...)``."""

    url: str
    capabilities: Capabilities = Capabilities()
    _knobs: knobs_mod.Knobs | None = None

    @property
    def knobs(self) -> knobs_mod.Knobs:
        """The knob snapshot of the call this storage serves (``open_storage(knobs=...)``,
        kept by ``child``): every thread working for that call reads it here. A
        storage made some other way reads the knobs in force."""
        return self._knobs if self._knobs is not None else knobs_mod.get()

    @knobs.setter
    def knobs(self, value: knobs_mod.Knobs) -> None:
        self._knobs = value

    # -- reading

    @abc.abstractmethod
    def exists(self, rel: str = "") -> bool:
        """Whether ``rel`` (a file or directory/prefix; ``""`` is the root) exists."""

    @abc.abstractmethod
    def isdir(self, rel: str = "") -> bool: ...

    @abc.abstractmethod
    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) of the entries directly under ``rel``; ``[]`` if absent.
        Never served from a cache: commits, status and deletion are decided on it."""

    @abc.abstractmethod
    def size(self, rel: str) -> int:
        """Size in bytes (uncached); ``FileNotFoundError`` if absent."""

    @abc.abstractmethod
    def read_bytes(self, rel: str) -> bytes: ...

    @abc.abstractmethod
    def open_reader(self, rel: str) -> RandomReader: ...

    # -- writing

    @abc.abstractmethod
    def open_writer(self, rel: str) -> ShardFile: ...

    @abc.abstractmethod
    def put(self, rel: str, data: bytes) -> None:
        """Write one small object whole (atomic where ``atomic_put``; durable where
        ``durable_fsync``)."""

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` with ``data`` only if it does not exist; False if it did.
        Only where ``capabilities.exclusive_create``."""
        raise NotImplementedError(f"{self.url}: this backend has no exclusive create")

    def rename(self, src: str, dst: str) -> None:
        """Atomically replace ``dst`` by ``src``. Only where ``capabilities.atomic_rename``."""
        raise NotImplementedError(f"{self.url}: this backend has no atomic rename")

    @abc.abstractmethod
    def makedirs(self, rel: str) -> None: ...

    @abc.abstractmethod
    def remove(self, rel: str) -> None:
        """Remove one file; no error if it is already gone."""

    @abc.abstractmethod
    def remove_tree(self, rel: str = "") -> None:
        """Remove everything under ``rel`` (a directory or key prefix), including
        unfinished uploads there; no error if absent."""

    def sync_dir(self, rel: str = "") -> None:  # noqa: B027 - optional hook
        """Make directory entries durable (a no-op where the backend has no such notion)."""

    def abort_uploads(self, rel: str = "") -> int:
        """Abort unfinished uploads under ``rel`` (left by a killed writer); how many.
        A no-op where files are written in place."""
        return 0

    # -- navigation

    @abc.abstractmethod
    def child(self, rel: str) -> Storage:
        """The same backend rooted at ``rel`` below this root."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or threads the backend holds."""
