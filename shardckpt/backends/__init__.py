"""Byte backends: they move bytes and nothing else. Picked from the URL scheme
(``registry``; third parties register a scheme or the ``shardckpt.backends``
entry-point group), each declaring its ``Capabilities``: plain paths and
``file://`` (``local``: fsync + rename), ``s3://`` (``s3``: multipart uploads,
ranged GETs, conditional create), any other fsspec URL (``fsspec_backend``);
retries for remote ones live once (``retry``). A storage carries the knob
snapshot of the call it serves (``Storage.knobs``).

May import: ``knobs``, ``errors``. What a checkpoint directory means is ``store``.
"""

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
