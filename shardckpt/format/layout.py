"""Shard layout math: dtypes, chunk boundaries, and which bytes a slice needs.

A stored tensor shard is its elements in C order, cut into chunks of whole
elements. A resharded load wants a sub-box of a stored shard; the flat element
range covering that box tells which chunks to read.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch

__all__ = [
    "DTYPES",
    "dtype_from_name",
    "dtype_name",
    "split_chunks",
    "box_flat_range",
    "chunk_span",
    "split_box",
    "contiguous_strides",
    "numel",
    "tensor_bytes",
]

_DTYPE_NAMES = [
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
]  # fmt: skip

#: Every dtype a checkpoint may hold, by its stable name. Anything else is refused
#: at save time and treated as corruption at load time.
DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)
}
_NAMES_BY_DTYPE = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES_BY_DTYPE[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} is not supported by shardckpt") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dtype {name!r}") from None


def split_chunks(nbytes: int, chunk_bytes: int, itemsize: int) -> list[tuple[int, int]]:
    """Cut ``nbytes`` into ``[start, end)`` ranges of about ``chunk_bytes``, never splitting an element."""
    step = max(itemsize, chunk_bytes - chunk_bytes % itemsize)
    return [(s, min(s + step, nbytes)) for s in range(0, nbytes, step)]


def contiguous_strides(shape: Sequence[int]) -> list[int]:
    """C-order element strides (a zero-length dim counts as 1, so strides stay valid)."""
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * max(shape[i + 1], 1)
    return strides


def box_flat_range(
    shape: Sequence[int], offsets: Sequence[int], lengths: Sequence[int]
) -> tuple[int, int]:
    """Smallest ``[lo, hi)`` flat element range (C order) covering the box; ``(0, 0)`` if empty."""
    if any(n == 0 for n in lengths):
        return (0, 0)
    strides = contiguous_strides(shape)
    lo = sum(o * s for o, s in zip(offsets, strides))
    hi = sum((o + n - 1) * s for o, n, s in zip(offsets, lengths, strides)) + 1
    return (lo, hi)


def chunk_span(chunk_raw_lens: Sequence[int], byte_lo: int, byte_hi: int) -> tuple[int, int, int]:
    """Chunks overlapping raw bytes ``[byte_lo, byte_hi)``: ``(first, end, raw_start_of_first)``."""
    if byte_hi <= byte_lo:
        return (0, 0, 0)
    starts = [0]
    for n in chunk_raw_lens:
        starts.append(starts[-1] + n)
    first = bisect.bisect_right(starts, byte_lo) - 1
    end = bisect.bisect_left(starts, byte_hi)
    return (first, end, starts[first])


def split_box(
    shape: Sequence[int],
    offsets: Sequence[int],
    lengths: Sequence[int],
    itemsize: int,
    max_bytes: int,
) -> list[tuple[list[int], list[int], int, int]]:
    """Split a box into pieces whose flat range spans at most ``max_bytes`` (one row at least).

    Splits along the outermost dimension whose length exceeds 1. Returns
    ``(offsets, lengths, dim, shift)`` per piece, ``shift`` being the piece's start
    along ``dim`` relative to the box, so the caller can narrow its destination alike.
    """
    lo, hi = box_flat_range(shape, offsets, lengths)
    if (hi - lo) * itemsize <= max_bytes:
        return [(list(offsets), list(lengths), 0, 0)]
    dim = next(i for i, n in enumerate(lengths) if n > 1)
    row_bytes = contiguous_strides(shape)[dim] * itemsize
    rows = max(1, max_bytes // max(row_bytes, 1))
    pieces = []
    for start in range(0, lengths[dim], rows):
        n = min(rows, lengths[dim] - start)
        off, ln = list(offsets), list(lengths)
        off[dim] += start
        ln[dim] = n
        pieces.append((off, ln, dim, start))
    return pieces


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` in C order, on the host (copied only if it is elsewhere or
    not contiguous): what a shard stores and what a replica's checksum covers."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())
