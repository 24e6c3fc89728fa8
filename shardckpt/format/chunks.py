"""Reading a run of stored chunks: one ranged read, then a CRC32C check per chunk
before any byte is interpreted."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ..errors import CorruptCheckpointError
from ..native.crc32c import crc32c
from .codec import CodecError, check, decode
from .layout import chunk_span
from .manifest import BlobRef, ChunkInfo

__all__ = ["read_chunks", "check_chunk", "check_decodes", "check_decodes_bounded", "RangeReader"]


class RangeReader(Protocol):
    """What reading chunks needs from a storage backend (kept here so format/ imports no I/O)."""

    def read_into(self, offset: int, out: memoryview) -> None: ...


def check_chunk(data: memoryview, expected: int, file: str, key: str | None, index: int, offset: int) -> None:
    actual = crc32c(data)
    if actual != expected:
        raise CorruptCheckpointError(
            f"{file}: chunk {index} of key {key!r} (file bytes [{offset}, {offset + data.nbytes})) "
            f"failed its CRC32C check: stored {expected:08x}, computed {actual:08x}",
            file=file,
            key=key,
            chunk=index,
        )


def check_decodes(stored: memoryview, info: ChunkInfo, out: memoryview, file: str, key: str | None, index: int) -> None:
    """Decode one CRC-checked chunk into ``out`` (``info.raw_len`` bytes); a chunk whose
    CRC matches but that does not decode is corrupt too (a bug or a crafted file)."""
    try:
        decode(info.codec, stored, info.raw_len, out)
    except CodecError as e:
        raise CorruptCheckpointError(
            f"{file}: chunk {index} of key {key!r} passed its CRC32C but does not decode: {e}",
            file=file, key=key, chunk=index,
        ) from None


def check_decodes_bounded(stored: memoryview, info: ChunkInfo, file: str, key: str | None, index: int) -> None:
    """:func:`check_decodes` without an output buffer: the decoded bytes stream through
    ~1 MiB, so a chunk claiming a huge ``raw_len`` (a decompression bomb) costs no memory."""
    try:
        check(info.codec, stored, info.raw_len)
    except CodecError as e:
        raise CorruptCheckpointError(
            f"{file}: chunk {index} of key {key!r} passed its CRC32C but does not decode: {e}",
            file=file, key=key, chunk=index,
        ) from None


def read_chunks(
    reader: RangeReader,
    blob: BlobRef,
    byte_lo: int,
    byte_hi: int,
    alloc: Callable[[int], torch.Tensor],
    key: str | None,
) -> tuple[torch.Tensor, int]:
    """Read and verify the chunks covering raw bytes ``[byte_lo, byte_hi)`` of ``blob``.

    Returns a uint8 tensor with the raw bytes of those whole chunks and the raw
    offset (within the blob) where it starts.
    """
    first, end, raw_start = chunk_span([c.raw_len for c in blob.chunks], byte_lo, byte_hi)
    chunks = blob.chunks[first:end]
    stored_start = blob.offset + sum(c.stored_len for c in blob.chunks[:first])
    all_raw = all(c.codec == "raw" for c in chunks)
    stored_buf = alloc(sum(c.stored_len for c in chunks))
    stored = _view(stored_buf)
    try:
        reader.read_into(stored_start, stored)
    except EOFError as e:
        raise CorruptCheckpointError(f"{blob.file}: truncated while reading key {key!r}: {e}", file=blob.file, key=key) from None
    # Raw chunks are used where they were read; encoded ones are decoded into a second buffer.
    out_buf = stored_buf if all_raw else alloc(sum(c.raw_len for c in chunks))
    out = _view(out_buf)
    pos = out_pos = 0
    for i, c in enumerate(chunks, start=first):
        piece = stored[pos : pos + c.stored_len]
        check_chunk(piece, c.crc32c, blob.file, key, i, stored_start + pos)
        if not all_raw:
            check_decodes(piece, c, out[out_pos : out_pos + c.raw_len], blob.file, key, i)
        pos += c.stored_len
        out_pos += c.raw_len
    return out_buf, raw_start


def _view(buf: torch.Tensor) -> memoryview:
    return memoryview(buf.numpy()) if buf.numel() else memoryview(b"")
