"""The user-facing calls: ``save``, ``load``, ``verify``."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from . import _async, knobs
from ._async import AsyncSaveHandle, Busy
from ._checksum import implementation as crc_implementation
from ._dist import Group, raise_gathered
from ._save import plan_save, write_and_commit
from .dcp._chunks import check_chunk
from .dcp.planner import SafeLoadPlanner
from .dcp.reader import ShardckptReader
from .dcp.writer import ShardckptWriter
from .errors import (
    CheckpointReadError,
    CheckpointWriteError,
    CorruptCheckpointError,
    ShardckptError,
)
from .format.codec import Compression
from .format.manifest import BlobRef, Manifest, ObjectEntry, TensorEntry
from .storage import open_storage
from .storage.commit import read_manifest, size_mismatches

__all__ = ["save", "async_save", "close", "load", "verify", "VerifyReport"]

PathLike = str | os.PathLike[str]


def _reraise(e: CheckpointException, step: str, default: type[ShardckptError], group: Group) -> None:
    failures = {r: f[0] if isinstance(f, tuple) else f for r, f in e.failures.items()}
    if group.world_size == 1 and len(failures) == 1:
        (exc,) = failures.values()
        if isinstance(exc, ShardckptError):
            raise exc.with_traceback(exc.__traceback__) from None
        raise default(f"{step} failed: {type(exc).__name__}: {exc}") from exc
    raise_gathered(step, failures, default)


@contextmanager
def _dcp_quiet(group: Group) -> Iterator[None]:
    # DCP warns on every single-process call that it assumes a single process; we know.
    with warnings.catch_warnings():
        if not group.enabled:
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _check_metadata(metadata: dict[str, Any] | None) -> None:
    if metadata is not None:
        try:
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"save(metadata=...) must be JSON-serializable: {e}") from None


def save(
    state_dict: dict[str, Any],
    path: PathLike,
    *,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
    compression: None | str | Compression = "auto",
    process_group: dist.ProcessGroup | None = None,
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
    chunk records its codec).

    >>> shardckpt.save({"model": model.state_dict(), "step": 100}, "ckpts/step_100")
    """
    _check_metadata(metadata)
    _async.wait_all()  # one save at a time; reports an earlier background failure
    group = Group(process_group)
    writer = ShardckptWriter(path, overwrite=overwrite, metadata=metadata, compression=compression)
    try:
        planned = plan_save(state_dict, writer, group)
        write_and_commit(planned, planned.planner.resolve_data, group)
    except ShardckptError:
        raise
    except Exception as e:  # single process: give I/O errors etc. the save's type too
        raise CheckpointWriteError(f"save to {os.fspath(path)} failed: {type(e).__name__}: {e}") from e


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
) -> AsyncSaveHandle | None:
    """Like ``save``, but return once this rank's state is copied into reused
    staging buffers; a background thread writes and commits.

    After it returns, the caller may modify or free any tensor: the checkpoint
    holds the values at call time. ``handle.result()`` waits and re-raises a
    background failure (typed, naming ranks); ``handle.done()`` polls. Only one
    save is in flight: see ``busy``. Bound staging memory with
    ``staging_budget_bytes``. Call ``shardckpt.close()`` (or use an
    ``AsyncCheckpointer`` as a context manager) before exiting.

    >>> h = shardckpt.async_save(sd, "ckpts/step_200")
    >>> ...  # training goes on
    >>> h.result()
    """
    _check_metadata(metadata)
    return _async.default_checkpointer(process_group).async_save(
        state_dict, path, overwrite=overwrite, metadata=metadata, compression=compression,
        staging_budget_bytes=staging_budget_bytes, busy=busy,
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
) -> None:
    """Load the checkpoint at ``path`` into ``state_dict`` in place, resharding to
    the current world size and placements.

    Tensors (plain, DTensor, ShardedTensor) are filled in place; other values are
    replaced. Every chunk's CRC32C is checked before its bytes reach a tensor.
    ``strict=False`` skips keys present on only one side (shape/dtype mismatches
    still raise ``CheckpointMismatchError``).
    """
    group = Group(process_group)
    storage = open_storage(path)
    manifest = group.run("reading the manifest", lambda: read_manifest(storage), CheckpointReadError)
    reader = ShardckptReader(path, manifest=manifest)
    try:
        with _dcp_quiet(group):
            dcp.load(
                state_dict,
                storage_reader=reader,
                planner=SafeLoadPlanner(strict=strict),
                process_group=process_group,
                no_dist=not group.enabled,
            )
    except CheckpointException as e:
        _reraise(e, f"load from {os.fspath(path)}", CheckpointReadError, group)


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` checked."""

    path: str
    files: int
    chunks: int
    bytes_checked: int
    seconds: float
    crc_implementation: str
    manifest: Manifest = field(repr=False)


def _blobs(m: Manifest) -> list[tuple[str, BlobRef]]:
    out = []
    for key, e in m.entries.items():
        if isinstance(e, TensorEntry):
            out += [(key, s.blob) for s in e.shards]
        elif isinstance(e, ObjectEntry) and e.blob is not None:
            out.append((key, e.blob))
    return out


def verify(path: PathLike) -> VerifyReport:
    """Check the manifest, every shard file's size and every chunk's CRC32C.

    Raises ``CorruptCheckpointError`` listing every damaged place (its ``damaged``
    attribute), ``IncompleteCheckpointError`` / ``CheckpointNotFoundError`` when
    there is nothing committed to verify.
    """
    t0 = time.perf_counter()
    storage = open_storage(path)
    manifest = read_manifest(storage)
    wrong_size = size_mismatches(storage, manifest.files)
    damaged = [CorruptCheckpointError(f"{rel}: {why}", file=rel) for rel, why in wrong_size.items()]
    good_files = set(manifest.files) - set(wrong_size)

    def check(job: tuple[str, BlobRef]) -> tuple[int, int, list[CorruptCheckpointError]]:
        key, blob = job
        reader = storage.open_reader(blob.file)
        errs, pos, buf = [], blob.offset, bytearray()
        try:
            for i, c in enumerate(blob.chunks):
                if len(buf) < c.stored_len:
                    buf = bytearray(c.stored_len)
                view = memoryview(buf)[: c.stored_len]
                reader.read_into(pos, view)
                try:
                    check_chunk(view, c.crc32c, blob.file, key, i, pos)
                except CorruptCheckpointError as e:
                    errs.append(e)
                pos += c.stored_len
        finally:
            reader.close()
        return len(blob.chunks), pos - blob.offset, errs

    jobs = [j for j in _blobs(manifest) if j[1].file in good_files]
    chunks = nbytes = 0
    with ThreadPoolExecutor(max_workers=knobs.get().io_threads) as pool:
        for n, b, errs in pool.map(check, jobs):
            chunks, nbytes = chunks + n, nbytes + b
            damaged += errs
    if damaged:
        first = damaged[0]
        raise CorruptCheckpointError(
            f"{storage.url}: {len(damaged)} damaged place(s): " + "; ".join(str(d) for d in damaged[:10]),
            file=first.file, key=first.key, chunk=first.chunk, damaged=damaged,
        )
    return VerifyReport(
        path=storage.url,
        files=len(manifest.files),
        chunks=chunks,
        bytes_checked=nbytes,
        seconds=time.perf_counter() - t0,
        crc_implementation=crc_implementation(),
        manifest=manifest,
    )


