"""Reading a run of stored chunks: one ranged read, then a CRC32C check per chunk
before any byte is interpreted."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._checksum import crc32c
from ..errors import CorruptCheckpointError
from ..format.layout import chunk_span
from ..format.manifest import BlobRef
from ..storage import RandomReader

__all__ = ["read_chunks", "check_chunk"]


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


def read_chunks(
    reader: RandomReader,
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
    total = sum(c.stored_len for c in chunks)
    buf = alloc(total)
    view = memoryview(buf.numpy()) if total else memoryview(b"")
    try:
        reader.read_into(stored_start, view)
    except EOFError as e:
        raise CorruptCheckpointError(f"{blob.file}: truncated while reading key {key!r}: {e}", file=blob.file, key=key) from None
    pos = 0
    for i, c in enumerate(chunks, start=first):
        if c.codec != "raw":  # decode_manifest admits only codecs this version implements
            raise CorruptCheckpointError(f"{blob.file}: chunk {i} of key {key!r} has codec {c.codec!r}", file=blob.file, key=key, chunk=i)
        check_chunk(view[pos : pos + c.stored_len], c.crc32c, blob.file, key, i, stored_start + pos)
        pos += c.stored_len
    return buf, raw_start
