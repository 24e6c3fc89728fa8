"""A fault-injecting byte backend for the fault suite: ``fault://<any url>``.

It wraps the real backend for ``<any url>`` (``fault:///tmp/x`` wraps the local
path ``/tmp/x``, ``fault://s3://bucket/p`` an S3 prefix) and numbers every I/O
call made through it in this process: storage methods (``put``, ``rename``,
``listdir``, ...) and the calls on the files it opens (``writer.write``,
``writer.close`` — fsync / upload completion —, ``reader.read_into``, ...).
The numbering is process-wide (every ``child()``, every re-opened storage
counts into one sequence), so a save's N-th call is the same call on every run
of the same save: a failure replays from ``(scenario, call index)``.

At the armed call it acts *before* performing the call:

- ``kill``: ``SIGKILL`` to its own process (the instant of a crash);
- ``eio`` / ``eacces``: raise ``OSError(EIO)`` / ``PermissionError(EACCES)``;
- ``short``: perform the call with fewer bytes and report nothing (a lying
  device): a write stores a prefix, a read fills or returns a prefix only;
- ``eof``: ``reader.read_into`` raises ``EOFError`` (the reader contract).

Arm it with :func:`arm` (a forked child calls it after the fork) or through
the environment variable ``SHARDCKPT_FAULT`` = ``action@index`` or
``action@site#n`` (n-th call of that site), read by a process at its first
call, so spawned rank processes pick it up. Unarmed, it only counts and keeps
a trace of ``(index, site, path)`` for the dry run that chooses the points.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shardckpt.backends import Storage, open_storage, register_backend

__all__ = ["SCHEME", "ENV", "arm", "disarm", "trace", "url", "install", "Call", "WRITE_SITES", "READ_SITES"]

SCHEME = "fault"
ENV = "SHARDCKPT_FAULT"

#: Sites that change storage (a fault there must leave nothing committed).
WRITE_SITES = ("put", "create_exclusive", "rename", "makedirs", "remove", "remove_tree", "sync_dir",
               "abort_uploads", "open_writer", "writer.write", "writer.close")
#: Sites that read (a fault there must hand back no partial tensor).
READ_SITES = ("exists", "isdir", "listdir", "size", "read_bytes", "open_reader", "reader.size",
              "reader.read_into")
#: Sites where ``short`` means something (bytes move through them).
SHORT_SITES = ("put", "writer.write", "read_bytes", "reader.read_into")


@dataclass(frozen=True)
class Call:
    index: int  # 1-based, process-wide
    site: str
    path: str  # the inner backend's URL of the object, for messages


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset(None, 0, None)
        self.env_read = False

    def reset(self, action: str | None, at: int, site: str | None) -> None:
        self.action, self.at, self.site = action, at, site
        self.count = 0
        self.per_site: dict[str, int] = {}
        self.calls: list[Call] = []
        self.fired: Call | None = None


_state = _State()


def arm(action: str | None, at: int = 0, site: str | None = None) -> None:
    """Reset the count; act (``kill``, ``eio``, ``eacces``, ``short``, ``eof``) at call
    ``at`` (process-wide), or at the ``at``-th call of ``site`` if given. ``None``:
    count only."""
    if action not in (None, "kill", "eio", "eacces", "short", "eof"):
        raise ValueError(f"unknown fault action {action!r}")
    with _state.lock:
        _state.reset(action, at, site)
        _state.env_read = True


def disarm() -> None:
    arm(None)


def trace() -> list[Call]:
    """Every call counted since the last ``arm`` (in call order)."""
    with _state.lock:
        return list(_state.calls)


def fired() -> Call | None:
    """The call the fault acted at, if it did."""
    return _state.fired


def _read_env() -> None:
    spec = os.environ.get(ENV)
    _state.env_read = True
    if not spec:
        return
    action, _, where = spec.partition("@")
    site, _, n = where.rpartition("#")
    _state.reset(action, int(n), site or None)


def _hit(site: str, path: str) -> str | None:
    """Count one call; the action to take at it (None: none)."""
    with _state.lock:
        if not _state.env_read:
            _read_env()
        _state.count += 1
        n_site = _state.per_site[site] = _state.per_site.get(site, 0) + 1
        call = Call(_state.count, site, path)
        _state.calls.append(call)
        if _state.action is None or _state.fired is not None:
            return None
        if _state.site is not None and _state.site != site:
            return None
        if (n_site if _state.site is not None else call.index) != _state.at:
            return None
        action = _state.action
        if action == "short" and site not in SHORT_SITES or action == "eof" and site != "reader.read_into":
            return None  # nothing to shorten here: the point is a no-op, not a miss
        _state.fired = call
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "eio":
        raise OSError(errno.EIO, f"injected I/O error at call {call.index} ({site})", path)
    if action == "eacces":
        raise PermissionError(errno.EACCES, f"injected permission error at call {call.index} ({site})", path)
    if action == "eof":
        raise EOFError(f"{path}: injected end of file at call {call.index}")
    return action


def _short(data: Any) -> memoryview:
    view = memoryview(data).cast("B")
    return view[: view.nbytes // 2]


class _Writer:
    def __init__(self, inner: Any, path: str) -> None:
        self._inner, self._path = inner, path

    def write(self, data: memoryview | bytes) -> None:
        if _hit("writer.write", self._path) == "short":
            data = _short(data)
        self._inner.write(data)

    def close(self) -> None:
        _hit("writer.close", self._path)
        self._inner.close()

    def abort(self) -> None:
        # Never raises (the contract): a kill may still land here, nothing else.
        if _state.action == "kill":
            _hit("writer.abort", self._path)
        self._inner.abort()


class _Reader:
    def __init__(self, inner: Any, path: str) -> None:
        self._inner, self._path = inner, path

    def size(self) -> int:
        _hit("reader.size", self._path)
        return int(self._inner.size())

    def read_into(self, offset: int, out: memoryview) -> None:
        if _hit("reader.read_into", self._path) == "short":
            out = _short(out)
        self._inner.read_into(offset, out)

    def close(self) -> None:
        self._inner.close()


class FaultStorage(Storage):
    """``inner`` with every I/O call counted (and possibly faulted)."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.url = f"{SCHEME}://{inner.url}"
        self.capabilities = inner.capabilities

    def _at(self, rel: str) -> str:
        return f"{self.inner.url}/{rel}" if rel else self.inner.url

    def exists(self, rel: str = "") -> bool:
        _hit("exists", self._at(rel))
        return self.inner.exists(rel)

    def isdir(self, rel: str = "") -> bool:
        _hit("isdir", self._at(rel))
        return self.inner.isdir(rel)

    def listdir(self, rel: str = "") -> list[str]:
        _hit("listdir", self._at(rel))
        return self.inner.listdir(rel)

    def size(self, rel: str) -> int:
        _hit("size", self._at(rel))
        return self.inner.size(rel)

    def read_bytes(self, rel: str) -> bytes:
        short = _hit("read_bytes", self._at(rel)) == "short"
        data = self.inner.read_bytes(rel)
        return data[: len(data) // 2] if short else data

    def open_reader(self, rel: str) -> Any:
        _hit("open_reader", self._at(rel))
        return _Reader(self.inner.open_reader(rel), self._at(rel))

    def open_writer(self, rel: str) -> Any:
        _hit("open_writer", self._at(rel))
        return _Writer(self.inner.open_writer(rel), self._at(rel))

    def put(self, rel: str, data: bytes) -> None:
        if _hit("put", self._at(rel)) == "short":
            data = bytes(_short(data))
        self.inner.put(rel, data)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        _hit("create_exclusive", self._at(rel))
        return self.inner.create_exclusive(rel, data)

    def rename(self, src: str, dst: str) -> None:
        _hit("rename", self._at(dst))
        self.inner.rename(src, dst)

    def makedirs(self, rel: str) -> None:
        _hit("makedirs", self._at(rel))
        self.inner.makedirs(rel)

    def remove(self, rel: str) -> None:
        _hit("remove", self._at(rel))
        self.inner.remove(rel)

    def remove_tree(self, rel: str = "") -> None:
        _hit("remove_tree", self._at(rel))
        self.inner.remove_tree(rel)

    def sync_dir(self, rel: str = "") -> None:
        _hit("sync_dir", self._at(rel))
        self.inner.sync_dir(rel)

    def abort_uploads(self, rel: str = "") -> int:
        _hit("abort_uploads", self._at(rel))
        return self.inner.abort_uploads(rel)

    def child(self, rel: str) -> FaultStorage:
        return FaultStorage(self.inner.child(rel))

    def close(self) -> None:
        self.inner.close()


def _open(url_: str, options: Mapping[str, Any]) -> Storage:
    inner = url_[len(SCHEME) + 3:]
    return FaultStorage(open_storage(inner, options or None))


def install() -> None:
    """Register ``fault://`` (idempotent)."""
    register_backend(SCHEME, _open, replace=True)


def url(inner: str | os.PathLike[str]) -> str:
    """The ``fault://`` URL wrapping ``inner``."""
    return f"{SCHEME}://{os.fspath(inner)}"


install()
