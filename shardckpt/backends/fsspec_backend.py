"""Any fsspec filesystem (``memory://``, ``gs://``, ``az://``, ...), generically.

There is no rename or fsync here: the manifest is published last in one
``pipe_file`` call (a single PUT on object stores), after every shard exists
with the size the manifest records. Listings and sizes bypass fsspec's
directory cache (``refresh``/``invalidate_cache``): a stale listing must never
decide a commit, a status or a deletion. Remote filesystems get the retry
policy of ``storage.retry``. S3 has its own backend (``storage.s3``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .base import Capabilities, Storage
from .retry import call_with_retry

__all__ = ["FsspecStorage"]

T = TypeVar("T")
_LOCAL_PROTOCOLS = {"memory", "file", "local"}


class _FsspecShardFile:
    def __init__(self, storage: FsspecStorage, path: str) -> None:
        self._storage, self._path = storage, path
        self._f = storage._call(f"open {path}", lambda: storage.fs.open(path, "wb"))

    def write(self, data: memoryview | bytes) -> None:
        self._f.write(data)

    def close(self) -> None:
        self._f.close()

    def abort(self) -> None:
        # fsspec's buffered writers drop an unfinished upload on discard(); some
        # (memory://) create the file on open, so whatever exists is removed after.
        first = getattr(self._f, "discard", None) or self._f.close
        for undo in (first, lambda: self._storage.fs.rm_file(self._path)):
            try:
                undo()
            except Exception:  # noqa: BLE001 - abort after a failure must not mask it
                pass


class _FsspecReader:
    def __init__(self, storage: FsspecStorage, path: str) -> None:
        self._storage, self._path = storage, path

    def size(self) -> int:
        return self._storage._size(self._path)

    def read_into(self, offset: int, out: memoryview) -> None:
        view = out.cast("B")
        fs, path = self._storage.fs, self._path
        data = self._storage._call(f"read {path}", lambda: fs.cat_file(path, start=offset, end=offset + view.nbytes))
        if len(data) != view.nbytes:
            raise EOFError(f"{path}: short read at byte {offset} ({len(data)} of {view.nbytes})")
        view[:] = data

    def close(self) -> None:
        pass


def _protocols(fs: Any) -> set[str]:
    protocol = getattr(fs, "protocol", ())
    return {protocol} if isinstance(protocol, str) else set(protocol)


class FsspecStorage(Storage):
    """A location on an fsspec filesystem ``fs`` at ``root`` (``url`` is what the user gave)."""

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs, self.root, self.url = fs, root.rstrip("/"), url.rstrip("/")
        remote = not (_protocols(fs) & _LOCAL_PROTOCOLS)
        self.capabilities = Capabilities(atomic_put=True, remote=remote)

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return call_with_retry(what, fn, self.knobs) if self.capabilities.remote else fn()

    def _fresh(self, path: str) -> None:
        invalidate = getattr(self.fs, "invalidate_cache", None)
        if invalidate is not None:
            invalidate(path)

    def _size(self, path: str) -> int:
        self._fresh(path)
        return int(self._call(f"stat {path}", lambda: self.fs.size(path)))

    def exists(self, rel: str = "") -> bool:
        path = self._p(rel)
        self._fresh(path)
        return bool(self._call(f"stat {path}", lambda: self.fs.exists(path)))

    def isdir(self, rel: str = "") -> bool:
        path = self._p(rel)
        self._fresh(path)
        return bool(self._call(f"stat {path}", lambda: self.fs.isdir(path)))

    def listdir(self, rel: str = "") -> list[str]:
        path = self._p(rel)
        self._fresh(path)
        try:
            entries = self._call(f"list {path}", lambda: self.fs.ls(path, detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return []
        base = path.rstrip("/")
        names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != base}
        return sorted(names)

    def read_bytes(self, rel: str) -> bytes:
        path = self._p(rel)
        return bytes(self._call(f"read {path}", lambda: self.fs.cat_file(path)))

    def size(self, rel: str) -> int:
        return self._size(self._p(rel))

    def open_reader(self, rel: str) -> _FsspecReader:
        return _FsspecReader(self, self._p(rel))

    def open_writer(self, rel: str) -> _FsspecShardFile:
        return _FsspecShardFile(self, self._p(rel))

    def put(self, rel: str, data: bytes) -> None:
        path = self._p(rel)
        self._call(f"put {path}", lambda: self.fs.pipe_file(path, data))
        self._fresh(path)

    def makedirs(self, rel: str) -> None:
        self.fs.makedirs(self._p(rel), exist_ok=True)

    def remove(self, rel: str) -> None:
        path = self._p(rel)
        try:
            self._call(f"delete {path}", lambda: self.fs.rm_file(path))
        except FileNotFoundError:
            pass
        self._fresh(path)

    def remove_tree(self, rel: str = "") -> None:
        path = self._p(rel)
        if self.exists(rel):
            self._call(f"delete {path}", lambda: self.fs.rm(path, recursive=True))
        self._fresh(path)

    def child(self, rel: str) -> FsspecStorage:
        out = FsspecStorage(self.fs, self._p(rel), f"{self.url}/{rel}" if rel else self.url)
        out._knobs = self._knobs
        return out
