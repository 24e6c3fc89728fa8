"""CRC32C (Castagnoli) checksums for checkpoint chunks.

Every chunk shardckpt writes carries a CRC32C, and every read verifies it, so
the checksum sits on the hot path of both save and load: it has to run at
memory bandwidth or it becomes the bottleneck of a multi-GB checkpoint. That is
why the real work is done by the C++ extension ``shardckpt.native._crc32c``
(``csrc/crc32c.cpp``), which picks the fastest kernel for the CPU at import
time (AVX-512 VPCLMULQDQ folding, PCLMULQDQ folding, the SSE4.2 ``crc32``
instruction in three interleaved streams, or a portable slicing-by-8 table) and
releases the GIL on large buffers so I/O threads can checksum in parallel.

This module is the thin layer the rest of the package imports. If the extension
cannot be imported (a source checkout that was never built, an unusual
platform) it falls back to a pure-Python/numpy implementation that gives the
same answers but is orders of magnitude slower; it says so once with a
``RuntimeWarning`` on first use rather than failing, because a slow checksum is
better than an unverifiable checkpoint. Set ``SHARDCKPT_FORCE_SOFTWARE_CRC=1``
to force the fallback (useful for testing it).

The CRC convention is the standard one (initial register and final XOR of
0xFFFFFFFF, reflected polynomial 0x82F63B78), so ``crc32c(b"123456789") ==
0xE3069283`` and ``crc32c(b, crc32c(a)) == crc32c(a + b)``.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

from .loader import Native

__all__ = ["crc32c", "crc32c_combine", "implementation", "is_compiled"]

_POLY = 0x82F63B78
_MASK = 0xFFFFFFFF
_FORCE_ENV = "SHARDCKPT_FORCE_SOFTWARE_CRC"


# ---------------------------------------------------------------------------
# Software reference implementation (always available; tests call it directly).
# ---------------------------------------------------------------------------


def _make_byte_table() -> list[int]:
    table = []
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ (_POLY if c & 1 else 0)
        table.append(c)
    return table


_TABLE = _make_byte_table()


def _mulmod(a: int, b: int) -> int:
    """a * b mod P for reflected 32-bit polynomials (bit 31 is x^0)."""
    prod = 0
    for i in range(32):
        if a & (0x80000000 >> i):
            prod ^= b
        b = (b >> 1) ^ (_POLY if b & 1 else 0)
    return prod


def _make_pow2() -> list[int]:
    out = []
    p = 0x40000000  # x^1
    for _ in range(67):
        out.append(p)
        p = _mulmod(p, p)
    return out


_POW2 = _make_pow2()  # x^(2^k) mod P


def _xpow8(nbytes: int) -> int:
    """x^(8 * nbytes) mod P."""
    r = 0x80000000  # x^0
    k = 3
    while nbytes:
        if nbytes & 1:
            r = _mulmod(r, _POW2[k])
        nbytes >>= 1
        k += 1
    return r


def _shift(crc: int, nbytes: int) -> int:
    """Advance a raw CRC register over ``nbytes`` zero bytes."""
    return _mulmod(_xpow8(nbytes), crc) if nbytes else crc


def _check_u32(value: Any, what: str) -> int:
    v = operator.index(value)
    if v < 0:
        raise ValueError(f"{what} must be non-negative")
    if v > _MASK:
        raise OverflowError(f"{what} is too large (max {_MASK})")
    return v


def _as_bytes_view(data: Any) -> memoryview:
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise BufferError(
            "crc32c: buffer is not C-contiguous; pass a contiguous copy "
            "(e.g. bytes(view) or numpy.ascontiguousarray(a))"
        )
    if mv.nbytes == 0:
        return memoryview(b"")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _crc_bytes_py(crc: int, mv: memoryview | bytes) -> int:
    """Byte-at-a-time table loop on a raw register."""
    table = _TABLE
    for b in mv:
        crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
    return crc


try:  # numpy makes the fallback ~50x faster on large buffers; optional.
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is a torch dependency
    _np = None

_NUMPY_MIN = 1024  # below this the plain loop wins
_NUMPY_PIECE = 8 << 20  # bytes handled per vectorised pass
_np_tables: Any = None


def _numpy_tables() -> Any:
    global _np_tables
    if _np_tables is None:
        t = _np.zeros((4, 256), dtype=_np.uint32)
        t[0] = _TABLE
        for j in range(1, 4):
            prev = t[j - 1]
            t[j] = (prev >> 8) ^ t[0][prev & 0xFF]
        _np_tables = t
    return _np_tables


@functools.lru_cache(maxsize=64)
def _np_shift_tables(nbytes: int) -> Any:
    """4 x 256 tables T with T[j][b] = (b << 8j) * x^(8 nbytes) mod P."""
    k = _xpow8(nbytes)
    basis = []  # (1 << i) * k, i = 0..31  (bit i is the x^(31-i) coefficient)
    v = k
    for _ in range(32):
        basis.append(v)
        v = (v >> 1) ^ (_POLY if v & 1 else 0)
    basis.reverse()  # basis[i] now = x^(31-i) * k ... for bit i
    t = _np.zeros((4, 256), dtype=_np.uint32)
    for j in range(4):
        row = t[j]
        for i in range(8):
            row[1 << i : 2 << i] = row[: 1 << i] ^ _np.uint32(basis[8 * j + i])
    return t


def _np_apply_shift(t: Any, c: Any) -> Any:
    return t[0][c & 0xFF] ^ t[1][(c >> 8) & 0xFF] ^ t[2][(c >> 16) & 0xFF] ^ t[3][c >> 24]


def _crc_numpy(crc: int, mv: memoryview) -> tuple[int, int]:
    """Vectorised CRC over the largest prefix that splits into equal blocks.

    The prefix is cut into ``nblocks`` blocks of ``blen`` bytes, all blocks are
    advanced in lock-step (slicing-by-4, one numpy op over all blocks per word),
    and the per-block registers are merged pairwise with shift tables, which is
    valid because the CRC register is linear over GF(2). Returns the register
    after the prefix and the prefix length.
    """
    n = len(mv)
    # Short blocks mean fewer (per-call-overhead-bound) numpy steps; measured.
    blen = 16 if n < (12 << 10) else 32 if n < (512 << 10) else 64 if n < (4 << 20) else 256
    nblocks = n // blen
    if nblocks < 2:
        return crc, 0
    words = _np.frombuffer(mv, dtype="<u4", count=nblocks * blen // 4)
    cols = words.reshape(nblocks, blen // 4).T.astype(_np.uint32, order="C")
    t0, t1, t2, t3 = _numpy_tables()
    regs = _np.zeros(nblocks, dtype=_np.uint32)
    regs[0] = crc
    for w in cols:
        regs ^= w
        regs = t3[regs & 0xFF] ^ t2[(regs >> 8) & 0xFF] ^ t1[(regs >> 16) & 0xFF] ^ t0[regs >> 24]
    # Pairwise merge; an odd leftover at each level is the rightmost segment.
    leftovers: list[tuple[int, int]] = []
    seg = blen
    while len(regs) > 1:
        if len(regs) & 1:
            leftovers.append((int(regs[-1]), seg))
            regs = regs[:-1]
        regs = _np_apply_shift(_np_shift_tables(seg), regs[0::2]) ^ regs[1::2]
        seg *= 2
    out = int(regs[0])
    for reg, length in reversed(leftovers):
        out = _shift(out, length) ^ reg
    return out, nblocks * blen


def _software_crc32c(data: Any, value: int = 0) -> int:
    """Pure-Python/numpy CRC32C; same contract as the compiled ``crc32c``."""
    value = _check_u32(value, "value")
    mv = _as_bytes_view(data)
    crc = value ^ _MASK
    pos, n = 0, len(mv)
    if _np is not None:
        # Bounded pieces keep the transposed working copy small.
        while n - pos >= _NUMPY_MIN:
            crc, done = _crc_numpy(crc, mv[pos : pos + _NUMPY_PIECE])
            pos += done
            if done == 0:
                break
    crc = _crc_bytes_py(crc, mv[pos:])
    return crc ^ _MASK


def _software_crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32c(A + B) from crc32c(A), crc32c(B) and len(B), in O(log len2)."""
    crc1 = _check_u32(crc1, "crc1")
    crc2 = _check_u32(crc2, "crc2")
    len2 = operator.index(len2)
    if len2 < 0:
        raise ValueError("len2 must be non-negative")
    if len2 > 0xFFFFFFFFFFFFFFFF:
        raise OverflowError("len2 is too large")
    return _shift(crc1, len2) ^ crc2


# ---------------------------------------------------------------------------
# Selection between the extension and the fallback.
# ---------------------------------------------------------------------------


_native = Native("_crc32c", _FORCE_ENV, fallback="pure-Python CRC32C fallback", label="software",
                 consequence="checksumming will be orders of magnitude slower than with the extension")
crc32c, crc32c_combine = _native.bind(crc32c=_software_crc32c, crc32c_combine=_software_crc32c_combine)
implementation, is_compiled = _native.implementation, _native.is_compiled
