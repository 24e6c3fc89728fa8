"""Any fsspec filesystem (``memory://``, object stores, ...).

There is no rename or fsync here: the manifest is written last in one ``pipe``
call (a single PUT on object stores), after every shard exists with the size the
manifest records. That is the manifest-last commit of DESIGN.md.
"""

from __future__ import annotations

from typing import Any

from .base import Storage

__all__ = ["FsspecStorage"]


class _FsspecShardFile:
    def __init__(self, fs: Any, path: str) -> None:
        self._f = fs.open(path, "wb")

    def write(self, data: memoryview | bytes) -> None:
        self._f.write(data)

    def close(self) -> None:
        self._f.close()

    def abort(self) -> None:
        try:
            self._f.close()
        except Exception:  # noqa: BLE001 - abort after a failure must not mask it
            pass


class _FsspecReader:
    def __init__(self, fs: Any, path: str) -> None:
        self._fs, self._path = fs, path

    def size(self) -> int:
        return int(self._fs.size(self._path))

    def read_into(self, offset: int, out: memoryview) -> None:
        view = out.cast("B")
        data = self._fs.cat_file(self._path, start=offset, end=offset + view.nbytes)
        if len(data) != view.nbytes:
            raise EOFError(f"{self._path}: short read at byte {offset} ({len(data)} of {view.nbytes})")
        view[:] = data

    def close(self) -> None:
        pass


class FsspecStorage(Storage):
    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs, self.root, self.url = fs, root.rstrip("/"), url

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def exists(self, rel: str = "") -> bool:
        return bool(self.fs.exists(self._p(rel)))

    def isdir(self, rel: str = "") -> bool:
        return bool(self.fs.isdir(self._p(rel)))

    def listdir(self, rel: str = "") -> list[str]:
        try:
            entries = self.fs.ls(self._p(rel), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        base = self._p(rel).rstrip("/")
        names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != base}
        return sorted(names)

    def read_bytes(self, rel: str) -> bytes:
        return bytes(self.fs.cat_file(self._p(rel)))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self._p(rel)))

    def open_reader(self, rel: str) -> _FsspecReader:
        return _FsspecReader(self.fs, self._p(rel))

    def open_writer(self, rel: str) -> _FsspecShardFile:
        return _FsspecShardFile(self.fs, self._p(rel))

    def makedirs(self, rel: str) -> None:
        self.fs.makedirs(self._p(rel), exist_ok=True)

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm_file(self._p(rel))
        except FileNotFoundError:
            pass

    def remove_tree(self, rel: str = "") -> None:
        if self.fs.exists(self._p(rel)):
            self.fs.rm(self._p(rel), recursive=True)

    def write_atomic(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._p(rel), data)
