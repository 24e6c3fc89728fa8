"""A rank's shard files: blobs appended in chunks, each encoded and checksummed,
rolled over into several objects on object stores. The one shard writer: saves
(``SaveTarget``), converters and the local tier all append through it.

A blob arrives as consecutive pieces (a tensor's bytes, or a ``StagedTensor``'s
slabs from the async stager, each with a ``release`` to hand the slab back)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ..backends import Storage
from ..format.codec import Compression, encode
from ..format.layout import split_chunks
from ..format.manifest import ChunkInfo
from ..native.crc32c import crc32c

__all__ = ["ShardWriter", "RollingShard", "StagedTensor", "Release", "staged_pieces"]

Release = Callable[[], None]


@dataclass
class StagedTensor:
    """A staged copy of one write item's tensor: its bytes as pieces, in order.

    Each piece comes with a ``release`` callable (or None) that the writer calls
    once the piece's bytes are written, handing its slab back to the stager.
    """

    dtype: torch.dtype
    nbytes: int
    pieces: Iterator[tuple[memoryview, Release | None]]


def staged_pieces(value: Any) -> tuple[Iterator[tuple[memoryview, Release | None]], int] | None:
    """A staged tensor's pieces and size (None for anything else)."""
    return (value.pieces, value.nbytes) if isinstance(value, StagedTensor) else None


def _encode_chunk(data: memoryview, itemsize: int, cfg: Compression, floating: bool) -> tuple[ChunkInfo, Any]:
    codec, stored = encode(data, itemsize, cfg, floating=floating)
    view = memoryview(stored)
    return ChunkInfo(codec, data.nbytes, view.nbytes, crc32c(view)), stored


class ShardWriter:
    """Appends blobs to one shard file, chunked, encoded and checksummed.

    With compression, chunks are encoded on a small thread pool (zstd and the
    byte-grouping kernel release the GIL) while earlier chunks are written, in
    order; at most ``2 * threads`` encoded chunks wait in memory.
    """

    def __init__(self, storage: Storage, rel: str, chunk_bytes: int, compression: Compression | None) -> None:
        self._file = storage.open_writer(rel)
        self.rel, self.pos, self._chunk_bytes = rel, 0, chunk_bytes
        self._cfg = compression
        self._pool = ThreadPoolExecutor(compression.threads, "shardckpt-encode") if compression else None

    def append(
        self,
        pieces: Iterable[tuple[memoryview, Release | None]],
        itemsize: int = 1,
        *,
        floating: bool = False,
        compress: bool = True,
    ) -> tuple[int, tuple[ChunkInfo, ...]]:
        """Write one blob given as consecutive pieces; returns its offset and chunks.

        Chunks never cross a piece boundary (pieces are whole elements), so a
        staged piece can be handed back (``release``) as soon as it is written.
        """
        start, chunks = self.pos, []
        cfg = self._cfg if compress else None
        window: deque[Any] = deque()
        limit = 2 * (cfg.threads if cfg else 1)

        def write_oldest() -> None:
            head = window.popleft()
            info, stored = head.result() if isinstance(head, Future) else head
            self._file.write(stored)
            self.pos += info.stored_len
            chunks.append(info)

        for data, release in pieces:
            for s, e in split_chunks(data.nbytes, self._chunk_bytes, itemsize):
                view = data[s:e]
                if cfg is None or self._pool is None:
                    window.append((ChunkInfo("raw", e - s, e - s, crc32c(view)), view))
                else:
                    window.append(self._pool.submit(_encode_chunk, view, itemsize, cfg, floating))
                while len(window) > limit:
                    write_oldest()
            if release is not None:
                # The stager is waiting for this slab: finish its chunks and hand it back
                # now (the next piece can only arrive after that).
                while window:
                    write_oldest()
                release()
        while window:
            write_oldest()
        return start, tuple(chunks)

    def close(self) -> None:
        self._shutdown()
        self._file.close()

    def abort(self) -> None:
        self._shutdown()
        self._file.abort()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class RollingShard:
    """A rank's shard files: ``data/<id>-r<rank>.bin``, then ``...-r<rank>-1.bin`` ...
    whenever the next blob would take the current one past ``limit`` bytes (0:
    never), cut at blob boundaries (a blob lives in one file). A full file is finished (its upload completed) in
    the background while the next is filled, at most ``finishers`` (the save's
    ``upload_concurrency``) at once, so a rank's objects go up in parallel;
    ``close`` waits for all."""

    def __init__(self, storage: Storage, rel: str, chunk_bytes: int, compression: Compression | None,
                 limit: int, finishers: int = 1) -> None:
        self._args = (storage, chunk_bytes, compression)
        self._stem, self._limit, self._count = rel[: -len(".bin")], limit, 0
        self._current: ShardWriter | None = None
        self._closing: deque[Future[None]] = deque()
        self._pool: ThreadPoolExecutor | None = None
        self._finishers = max(1, finishers)

    def next_blob(self, nbytes: int) -> ShardWriter:
        """The file the next blob (``nbytes`` before encoding) goes into: a new one if
        it would take the current one past the limit, so a large tensor usually has
        an object of its own and is read back whole, in one request."""
        cur = self._current
        if cur is not None and self._limit and cur.pos and cur.pos + nbytes > self._limit:
            self._finish_later(cur)
            cur = None
        if cur is None:
            storage, chunk_bytes, compression = self._args
            rel = f"{self._stem}.bin" if self._count == 0 else f"{self._stem}-{self._count}.bin"
            self._count += 1
            cur = self._current = ShardWriter(storage, rel, chunk_bytes, compression)
        return cur

    def _finish_later(self, shard: ShardWriter) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._finishers, thread_name_prefix="shardckpt-finish")
        while len(self._closing) >= self._finishers:  # bounded memory: wait for the oldest
            self._closing.popleft().result()
        self._closing.append(self._pool.submit(shard.close))

    def close(self) -> None:
        try:
            if self._current is not None:
                self._current.close()
            while self._closing:
                self._closing.popleft().result()
        finally:
            self._shutdown()

    def abort(self) -> None:
        # Files already finished stay until the next save or retention removes them
        # (nothing references them); the unfinished one is aborted.
        for f in self._closing:
            f.cancel()
        if self._current is not None:
            self._current.abort()
        self._shutdown()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
