"""The user-facing calls: ``save``, ``async_save``, ``load``, ``verify``.

Every path is a local path or a URL (``s3://bucket/prefix``, ``file://``, any
fsspec URL); ``storage_options`` go to the backend (for S3: s3fs's arguments,
e.g. ``{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}``),
else the standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

from . import knobs
from .backends import open_storage
from .collectives import Group
from .engine import async_save as _async
from .engine.async_save import AsyncSaveHandle, Busy
from .engine.load import load_state_dict
from .engine.replicas import CheckReplicas
from .engine.save import SaveRequest, save_with
from .errors import CheckpointReadError, ShardckptError
from .format.codec import Compression
from .store import CheckpointDir, VerifyReport, verify_dir

__all__ = ["save", "async_save", "close", "load", "verify", "VerifyReport"]

PathLike = str | os.PathLike[str]
StorageOptions = Mapping[str, Any] | None


def save(
    state_dict: dict[str, Any],
    path: PathLike,
    *,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    compression: None | str | Compression = "auto",
    process_group: dist.ProcessGroup | None = None,
    storage_options: StorageOptions = None,
    check_replicas: CheckReplicas = "error",
) -> None:
    """Save ``state_dict`` as a sharded checkpoint at ``path`` (a path or fsspec URL).

    Collective when torch.distributed is initialized: every rank calls it with its
    own state_dict; each rank writes its shards in parallel, replicated tensors are
    written once (spread over ranks), and rank 0 commits the manifest last, only
    after every rank succeeded. A committed checkpoint at ``path`` is never
    replaced unless ``overwrite=True`` (and then atomically). ``metadata`` is a
    JSON-able dict stored in the manifest. ``compression``: ``"auto"`` (raw on
    local paths and ``memory://``, byte-grouped zstd on object stores), ``None``
    (raw), ``"zstd"`` or a ``Compression``; loading needs no argument (each
    chunk records its codec). On several ranks the path must be storage every
    rank sees (a shared filesystem or an object store): a node-local path is
    detected before any data is written (``CheckpointWriteError`` naming the
    ranks that cannot see the coordinator's files). ``check_replicas``: an item
    several ranks save under the same key is written once, so every rank's copy
    is checksummed first and copies that differ raise ``CheckpointWriteError``
    naming the keys and ranks (``"error"``), warn (``"warn"``) or are not
    checked (``"off"``).

    >>> shardckpt.save({"model": model.state_dict(), "step": 100}, "ckpts/step_100")
    >>> shardckpt.save(sd, "s3://bucket/run1/step_100", storage_options={"profile": "train"})
    """
    request = SaveRequest.make(path, overwrite=overwrite, metadata=metadata, compression=compression,
                               storage_options=storage_options, check_replicas=check_replicas)
    _async.wait_all()  # one save at a time; reports an earlier background failure
    save_with(state_dict, request, process_group)


def async_save(
    state_dict: dict[str, Any],
    path: PathLike,
    *,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    compression: None | str | Compression = "auto",
    process_group: dist.ProcessGroup | None = None,
    staging_budget_bytes: int | None = None,
    busy: Busy = "wait",
    storage_options: StorageOptions = None,
    check_replicas: CheckReplicas = "error",
) -> AsyncSaveHandle | None:
    """Like ``save``, but return once this rank's state is copied into reused
    staging buffers; a background thread writes and commits.

    After it returns, the caller may modify or free any tensor: the checkpoint
    holds the values at call time. ``handle.result()`` waits and re-raises a
    background failure (typed, naming ranks); ``handle.done()`` polls. Only one
    save is in flight: see ``busy``. Bound staging memory with
    ``staging_budget_bytes``. ``check_replicas`` as in ``save`` (checked before
    this returns). Call ``shardckpt.close()`` (or use an
    ``AsyncCheckpointer`` as a context manager) before exiting.

    >>> h = shardckpt.async_save(sd, "ckpts/step_200")
    >>> ...  # training goes on
    >>> h.result()
    """
    return _async.default_checkpointer(process_group).async_save(
        state_dict, path, overwrite=overwrite, metadata=metadata, compression=compression,
        staging_budget_bytes=staging_budget_bytes, busy=busy, storage_options=storage_options,
        check_replicas=check_replicas,
    )


def close() -> None:
    """Finish in-flight async saves and shut the background engine down."""
    _async.close_all()


def load(
    state_dict: dict[str, Any],
    path: PathLike,
    *,
    strict: bool = True,
    process_group: dist.ProcessGroup | None = None,
    storage_options: StorageOptions = None,
) -> None:
    """Load the checkpoint at ``path`` into ``state_dict`` in place, resharding to
    the current world size and placements.

    Tensors (plain, DTensor, ShardedTensor) are filled in place; other values are
    replaced. Every chunk's CRC32C is checked before its bytes reach a tensor.
    ``strict=False`` skips keys present on only one side (shape/dtype mismatches
    still raise ``CheckpointMismatchError``). On several ranks, a piece more than
    one rank loads (DDP replicas, ``Replicate()``) is read from storage once and
    sent over ``process_group`` (remote backends; see ``knobs.shared_reads``).
    """
    k = knobs.get()  # this load's snapshot: every thread of it reads these
    group = Group(process_group, k)
    opts = dict(storage_options) if storage_options is not None else None
    try:
        load_state_dict(state_dict, path, strict, group, process_group, opts, k)
    except ShardckptError as e:
        _name_checkpoint(e, os.fspath(path))
        raise
    except Exception as e:  # single process: what no rank gathered still gets the load's type
        raise CheckpointReadError(f"load from {os.fspath(path)} failed: {type(e).__name__}: {e}") from e


def _name_checkpoint(e: ShardckptError, path: str) -> None:
    """Errors name the checkpoint they are about: a chunk's message names its file
    relative to the checkpoint, which alone does not say which checkpoint failed."""
    if e.args and isinstance(e.args[0], str) and path.rstrip("/") not in e.args[0]:
        e.args = (f"{path}: {e.args[0]}", *e.args[1:])
    if getattr(e, "path", None) is None:
        e.path = path  # type: ignore[attr-defined]


def verify(path: PathLike, *, storage_options: StorageOptions = None) -> VerifyReport:
    """Check the manifest, every shard file's size, every chunk's CRC32C, and that
    every compressed chunk decodes.

    Raises ``CorruptCheckpointError`` listing every damaged place (its ``damaged``
    attribute), ``IncompleteCheckpointError`` / ``CheckpointNotFoundError`` when
    there is nothing committed to verify.
    """
    return verify_dir(CheckpointDir(open_storage(path, storage_options)))
