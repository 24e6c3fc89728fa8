"""Byte backends, picked from the URL scheme (``storage.registry``), each declaring
its ``Capabilities``: plain paths and ``file://`` (local: fsync + rename),
``s3://`` (multipart uploads, ranged GETs, retries, conditional create), any
other fsspec URL (generic). What a checkpoint directory means is ``shardckpt.store``."""

from __future__ import annotations

from .base import Capabilities, RandomReader, ShardFile, Storage
from .registry import (
    ENTRY_POINT_GROUP,
    BackendFactory,
    check_storage_options,
    open_storage,
    register_backend,
)

__all__ = [
    "Storage",
    "Capabilities",
    "ShardFile",
    "RandomReader",
    "open_storage",
    "check_storage_options",
    "register_backend",
    "BackendFactory",
    "ENTRY_POINT_GROUP",
]
