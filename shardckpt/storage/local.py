"""Local filesystem backend: plain syscalls, because durability needs fsync and
atomic publication needs rename, neither of which fsspec exposes."""

from __future__ import annotations

import os
import shutil

from .base import Storage

__all__ = ["LocalStorage"]


class _LocalShardFile:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            n = os.write(self._fd, view)
            view = view[n:]

    def close(self) -> None:
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def abort(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


class _LocalReader:
    def __init__(self, path: str) -> None:
        self._path = path
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def read_into(self, offset: int, out: memoryview) -> None:
        view = out.cast("B")
        while view.nbytes:
            n = os.preadv(self._fd, [view], offset)
            if n == 0:
                raise EOFError(f"{self._path}: unexpected end of file at byte {offset}")
            view = view[n:]
            offset += n

    def close(self) -> None:
        os.close(self._fd)


class LocalStorage(Storage):
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = self.root

    def _p(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/")) if rel else self.root

    def exists(self, rel: str = "") -> bool:
        return os.path.lexists(self._p(rel))

    def isdir(self, rel: str = "") -> bool:
        return os.path.isdir(self._p(rel))

    def listdir(self, rel: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self._p(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def read_bytes(self, rel: str) -> bytes:
        with open(self._p(rel), "rb") as f:
            return f.read()

    def size(self, rel: str) -> int:
        return os.stat(self._p(rel)).st_size

    def open_reader(self, rel: str) -> _LocalReader:
        return _LocalReader(self._p(rel))

    def open_writer(self, rel: str) -> _LocalShardFile:
        return _LocalShardFile(self._p(rel))

    def makedirs(self, rel: str) -> None:
        os.makedirs(self._p(rel), exist_ok=True)

    def remove(self, rel: str) -> None:
        try:
            os.unlink(self._p(rel))
        except FileNotFoundError:
            pass

    def remove_tree(self, rel: str = "") -> None:
        shutil.rmtree(self._p(rel), ignore_errors=False) if os.path.isdir(self._p(rel)) else None

    def sync_dir(self, rel: str = "") -> None:
        fd = os.open(self._p(rel), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_atomic(self, rel: str, data: bytes) -> None:
        # tmp + fsync + rename + directory fsync: after a crash the name holds
        # either the previous content or all of the new content.
        final = self._p(rel)
        tmp = final + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            view = memoryview(data)
            while view.nbytes:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        self.sync_dir(os.path.dirname(rel))
