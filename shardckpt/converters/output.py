"""Writing output files: published whole or not at all, never over existing data.

``OutFile`` streams through the backend's writer. Where the backend renames
atomically (POSIX) it writes ``<name>.tmp-<id>`` and renames it into place after
the writer made it durable, so a crash leaves a temporary name, never a
truncated file under the real one. Object stores need no rename: a multipart
upload only appears when it completes, and an aborted one leaves nothing.

``checked_pieces`` sits between a source's stream and a writer: it checks that
pieces arrive in the order the target laid out and that each tensor brings
exactly the bytes its header promised, so a source inconsistency fails the
conversion instead of shifting every later tensor in the file.
"""

from __future__ import annotations

import io
import posixpath
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..backends import Storage
from ..errors import CheckpointExistsError, CheckpointWriteError, CorruptCheckpointError
from ..format.objects import encode_object, raw_bytesio
from .items import ByteProgress, Dropped, Source
from .selection import Planned, PlannedObject

__all__ = ["OutFile", "Written", "checked_pieces", "encode_value", "require_absent", "require_empty_dir",
           "encoded_objects"]


@dataclass
class Written:
    """What a target wrote (URLs of published files, their bytes, output keys)."""

    files: list[str] = field(default_factory=list)
    bytes_written: int = 0
    keys: list[str] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)


class OutFile:
    """One output file, streamed; ``close`` publishes it, ``abort`` leaves nothing."""

    def __init__(self, storage: Storage, rel: str) -> None:
        self.storage, self.rel, self.size = storage, rel, 0
        self._tmp = f"{rel}.tmp-{uuid.uuid4().hex[:12]}" if storage.capabilities.atomic_rename else rel
        self._w = storage.open_writer(self._tmp)

    @property
    def url(self) -> str:
        return f"{self.storage.url.rstrip('/')}/{self.rel}"

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._w.write(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:  # torch.save calls it; durability comes with close()
        pass

    def close(self) -> None:
        self._w.close()  # fsync / complete the upload
        if self._tmp != self.rel:
            self.storage.rename(self._tmp, self.rel)
            self.storage.sync_dir(posixpath.dirname(self.rel))

    def abort(self) -> None:
        self._w.abort()


def require_absent(storage: Storage, rel: str) -> None:
    """Fail closed: never replace an existing file."""
    if storage.exists(rel):
        raise CheckpointExistsError(f"{storage.url.rstrip('/')}/{rel} already exists; convert never "
                                    "overwrites: remove it or choose another destination", path=rel)


def require_empty_dir(storage: Storage) -> None:
    """A directory target must not exist, or be empty."""
    if storage.exists() and not storage.isdir():
        raise CheckpointExistsError(f"{storage.url} exists and is not a directory", path=storage.url)
    names = storage.listdir()
    if names:
        raise CheckpointExistsError(f"{storage.url} is not empty ({names[:5]}); convert never writes into "
                                    "an existing directory's files: choose a new destination", path=storage.url)


def checked_pieces(source: Source, order: Sequence[Planned], max_bytes: int,
                   progress: ByteProgress) -> Iterator[tuple[Planned, memoryview]]:
    """``source.stream`` for ``order``, as byte views, checked against each tensor's size."""
    stream = source.stream([p.item for p in order], [p.dtype for p in order], max_bytes)
    j, got = 0, 0

    def short(p: Planned, n: int) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{source.url}: key {p.item.key!r} produced {n} bytes, expected {p.nbytes}",
                                      key=p.item.key)

    for item, piece in stream:
        if not piece.numel():
            continue
        while j < len(order) and order[j].item is not item:
            if got != order[j].nbytes:
                raise short(order[j], got)
            j, got = j + 1, 0
        if j == len(order) or piece.dtype != order[j].dtype:
            raise CorruptCheckpointError(f"{source.url}: key {item.key!r} arrived out of order", key=item.key)
        data = memoryview(piece.view(torch.uint8).numpy())  # type: ignore[arg-type]
        got += data.nbytes
        if got > order[j].nbytes:
            raise short(order[j], got)
        yield order[j], data
        progress.advance(data.nbytes)
    for p in order[j:]:
        if got != p.nbytes:
            raise short(p, got)
        got = 0


def encode_value(key: str, value: Any) -> tuple[str, bytes, Any]:
    """``(encoding, payload, value)`` as a shardckpt save would store ``value``:
    ``"json"`` (payload is its JSON text), ``"bytes"`` or ``"torch"`` (weights-only
    loadable), ``"bytesio"`` (an ``io.BytesIO``'s bytes). ``CheckpointWriteError``
    for a value that would need pickled code."""
    if type(value) is io.BytesIO:
        return encode_object(key, raw_bytesio(value))
    buf = io.BytesIO()
    try:
        torch.save(value, buf)
    except Exception as e:  # noqa: BLE001 - reported as this key's reason
        raise CheckpointWriteError(f"value at key {key!r} cannot be serialized: {type(e).__name__}: {e}",
                                   key=key) from None
    return encode_object(key, buf)


def encoded_objects(source: Source, objects: Sequence[PlannedObject],
                    done: Written) -> list[tuple[PlannedObject, tuple[str, bytes, Any]]]:
    """Each object's stored form (``encode_value``); one that would need pickled
    code to load is dropped with the reason. Errors reading the source propagate."""
    out = []
    for o in objects:
        value = source.read_object(o.item)
        try:
            out.append((o, encode_value(o.key, value)))
        except CheckpointWriteError as e:
            done.dropped.append(Dropped(o.item.key, str(e)))
    return out
