"""Storage backends, picked from the URL: plain paths and ``file://`` use the local
backend (fsync + rename commit); every other fsspec URL uses the fsspec backend
(manifest-last commit)."""

from __future__ import annotations

import os

from .base import RandomReader, ShardFile, Storage
from .fsspec_backend import FsspecStorage
from .local import LocalStorage

__all__ = ["Storage", "ShardFile", "RandomReader", "LocalStorage", "FsspecStorage", "open_storage"]


def open_storage(url: str | os.PathLike[str]) -> Storage:
    """The backend for a checkpoint URL or path."""
    url = os.fspath(url)
    if not url:
        raise ValueError("checkpoint path is empty")
    if "://" not in url:
        return LocalStorage(url)
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, root = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        return LocalStorage(root)
    return FsspecStorage(fs, root, url)
