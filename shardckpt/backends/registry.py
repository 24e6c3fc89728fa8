"""Backends by URL scheme.

Built in: plain paths and ``file://`` (local, syscalls), ``s3://`` / ``s3a://``
(``storage.s3``), and any other fsspec protocol (generic ``FsspecStorage``).
Third parties add a scheme with ``register_backend`` or, without any import on
the user's side, an entry point in the group ``shardckpt.backends``::

    [project.entry-points."shardckpt.backends"]
    myfs = "mypkg.backend:open_myfs"     # open_myfs(url, storage_options) -> Storage

A backend registered or declared for a scheme takes precedence over the
built-in choice for it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..knobs import Knobs
from ..knobs import get as get_knobs
from .base import Storage

__all__ = ["BackendFactory", "register_backend", "open_storage", "check_storage_options", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "shardckpt.backends"
#: ``factory(url, storage_options) -> Storage``
BackendFactory = Callable[[str, Mapping[str, Any]], Storage]

_registered: dict[str, BackendFactory] = {}
_entry_points: dict[str, Any] | None = None
_lock = threading.Lock()


def register_backend(scheme: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Serve ``scheme://...`` URLs with ``factory``."""
    scheme = scheme.lower()
    with _lock:
        if scheme in _registered and not replace:
            raise ValueError(f"a backend is already registered for {scheme}://; pass replace=True")
        _registered[scheme] = factory


def _declared(scheme: str) -> BackendFactory | None:
    global _entry_points
    with _lock:
        if _entry_points is None:
            from importlib.metadata import entry_points

            _entry_points = {ep.name.lower(): ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
        ep = _entry_points.get(scheme)
    return ep.load() if ep is not None else None


def _open_local(url: str, options: Mapping[str, Any]) -> Storage:
    from .local import LocalStorage

    return LocalStorage(url[len("file://"):] if url.startswith("file://") else url)


def _open_s3(url: str, options: Mapping[str, Any]) -> Storage:
    from .s3 import S3Storage

    return S3Storage(url, options)


def _open_fsspec(url: str, options: Mapping[str, Any]) -> Storage:
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    from .fsspec_backend import FsspecStorage
    from .local import LocalStorage

    fs, root = fsspec.core.url_to_fs(url, **dict(options))
    if isinstance(fs, LocalFileSystem):
        return LocalStorage(root)
    return FsspecStorage(fs, root, url)


_BUILTIN: dict[str, BackendFactory] = {"": _open_local, "file": _open_local, "s3": _open_s3, "s3a": _open_s3}


def check_storage_options(storage_options: Any) -> None:
    """``TypeError`` unless ``storage_options`` is None or a mapping (a usage error,
    raised before any I/O)."""
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise TypeError(f"storage_options must be a dict, got {type(storage_options).__name__}")


def open_storage(url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, *,
                 knobs: Knobs | None = None) -> Storage:
    """The backend for a checkpoint URL or path. ``storage_options`` go to the
    backend (for fsspec/s3fs: the filesystem's constructor arguments); ``knobs``:
    the calling save's or load's snapshot (default: the knobs in force now)."""
    url = os.fspath(url)
    if not url:
        raise ValueError("checkpoint path is empty")
    check_storage_options(storage_options)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    options = dict(storage_options or {})
    factory = _registered.get(scheme) or (_declared(scheme) if scheme else None) or _BUILTIN.get(scheme)
    if factory is None:
        factory = _open_fsspec
    storage = factory(url, options)
    storage.knobs = knobs if knobs is not None else get_knobs()
    return storage
