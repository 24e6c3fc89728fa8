"""A tiny storage interface: what the engine needs from a place that holds bytes.

Paths given to a ``Storage`` are relative to the checkpoint's root, ``/``-separated.
"""

from __future__ import annotations

import abc
from typing import Protocol

__all__ = ["Storage", "ShardFile", "RandomReader"]


class ShardFile(Protocol):
    """A file being written front to back."""

    def write(self, data: memoryview | bytes) -> None: ...

    def close(self) -> None:
        """Flush and make the file durable (fsync where the backend has it)."""

    def abort(self) -> None:
        """Close without durability guarantees after a failure; never raises."""


class RandomReader(Protocol):
    def size(self) -> int: ...

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` from ``offset``; raise ``EOFError`` on a short read."""

    def close(self) -> None: ...


class Storage(abc.ABC):
    """One checkpoint location. Backends are picked by URL scheme in ``open_storage``."""

    url: str

    @abc.abstractmethod
    def exists(self, rel: str = "") -> bool:
        """Whether ``rel`` (a file or directory; ``""`` is the root) exists."""

    @abc.abstractmethod
    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) of the entries directly under ``rel``; ``[]`` if absent."""

    @abc.abstractmethod
    def isdir(self, rel: str = "") -> bool: ...

    @abc.abstractmethod
    def read_bytes(self, rel: str) -> bytes: ...

    @abc.abstractmethod
    def size(self, rel: str) -> int: ...

    @abc.abstractmethod
    def open_reader(self, rel: str) -> RandomReader: ...

    @abc.abstractmethod
    def open_writer(self, rel: str) -> ShardFile: ...

    @abc.abstractmethod
    def makedirs(self, rel: str) -> None: ...

    @abc.abstractmethod
    def remove(self, rel: str) -> None:
        """Remove one file; no error if it is already gone."""

    @abc.abstractmethod
    def remove_tree(self, rel: str = "") -> None:
        """Remove a directory and everything below it; no error if absent."""

    def sync_dir(self, rel: str = "") -> None:  # noqa: B027 - optional hook
        """Make directory entries durable (a no-op where the backend has no such notion)."""

    @abc.abstractmethod
    def write_atomic(self, rel: str, data: bytes) -> None:
        """Publish ``data`` at ``rel`` so a reader sees the old state or all of it."""
