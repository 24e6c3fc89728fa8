"""Bulk copies into staging buffers, with a numpy fallback.

The blocking part of an async save is copying the tensors a rank writes into
reused staging buffers, so that copy should run at the memory-copy limit. The
real work is done by the C++ extension ``shardckpt.native._copy`` (``csrc/copy.cpp``):
streaming (non-temporal) AVX-512 / AVX2 stores chosen at import time, which
skip the read-for-ownership of every destination line (2 bytes of memory
traffic per byte copied instead of 3), one GIL release per batch of tensors,
and an explicit thread count instead of torch's intra-op pool (which only adds
contention when every core already runs a rank).

If the extension cannot be imported (a source checkout never built, an unusual
platform), ``numpy.copyto`` does the same copies at plain-memcpy speed; a
``RuntimeWarning`` says so once, on first use. Set
``SHARDCKPT_FORCE_NUMPY_COPY=1`` to force the fallback (useful for testing it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .loader import Native, as_u8

__all__ = ["copy", "copy_many", "implementation", "is_compiled"]

_FORCE_ENV = "SHARDCKPT_FORCE_NUMPY_COPY"
_MAX_THREADS = 64


# ---------------------------------------------------------------------------
# numpy reference implementation (always available; tests call it directly).
# ---------------------------------------------------------------------------


def _check_threads(threads: int) -> None:
    if not 1 <= threads <= _MAX_THREADS:
        raise ValueError(f"threads must be in 1..{_MAX_THREADS}, not {threads}")


def _pair(dst: Any, src: Any, fname: str, index: int | None) -> tuple[np.ndarray, np.ndarray]:
    d, s = as_u8(dst, True, "dst"), as_u8(src, False, "src")
    where = "" if index is None else f"pair {index}: "
    if len(d) != len(s):
        raise ValueError(
            f"{fname}(): {where}dst and src must have the same length "
            f"(len(dst)={len(d)}, len(src)={len(s)})"
        )
    if len(d) and np.may_share_memory(d, s):  # bounds overlap == overlap for 1-D contiguous
        raise ValueError(f"{fname}(): {where}dst and src must not overlap")
    return d, s


def _numpy_copy(dst: Any, src: Any, threads: int = 1) -> None:
    """``dst[:] = src`` for two equal-length buffers (same contract as the extension)."""
    _check_threads(threads)
    d, s = _pair(dst, src, "copy", None)
    np.copyto(d, s)


def _numpy_copy_many(dsts: Sequence[Any], srcs: Sequence[Any], threads: int = 1) -> None:
    """``copy(dsts[i], srcs[i])`` for every i; every pair is checked before any copy."""
    _check_threads(threads)
    if len(dsts) != len(srcs):
        raise ValueError(
            f"copy_many(): dsts and srcs must have the same length ({len(dsts)} != {len(srcs)})"
        )
    pairs = [_pair(d, s, "copy_many", i) for i, (d, s) in enumerate(zip(dsts, srcs))]
    for d, s in pairs:
        np.copyto(d, s)


# ---------------------------------------------------------------------------
# Selection between the extension and the fallback.
# ---------------------------------------------------------------------------

_native = Native("_copy", _FORCE_ENV, fallback="numpy staging copy", label="numpy",
                 consequence="the blocking part of async_save will be slower than with the extension")
copy, copy_many = _native.bind(copy=_numpy_copy, copy_many=_numpy_copy_many)
implementation, is_compiled = _native.implementation, _native.is_compiled
