"""Chunk codecs: pure functions from a chunk's raw bytes to its stored bytes and back.

Checkpoints are mostly floating-point weights and optimizer state. Their low
mantissa bytes are noise, while their sign/exponent bytes carry a few bits of
information each; interleaved, a general-purpose compressor barely shrinks
them (zstd: ~1.09x on fp32 weights). Split into byte planes ("byte grouping"),
the exponent plane compresses close to its entropy and the mantissa planes can
be stored raw without spending time on them.

Codecs (the manifest records one per chunk, with the CRC32C over the *stored*
bytes, verified before :func:`decode` sees them):

``"raw"``   stored bytes are the raw bytes.
``"zstd"``  one zstd frame of the whole chunk (1-byte dtypes, integers, or
            ``byte_group=False``).
``"bgz"``   byte-grouped planes, each zstd or raw. Layout::

              u8  version (1)
              u8  width: 2, 4 or 8 (bytes per element = number of planes)
              u8  mode mask: bit k set = plane k is a zstd frame, else raw bytes
              LEB128 stored length of each zstd plane, in plane order
              plane payloads, in plane order (a raw plane is raw_len // width bytes)

A chunk is only stored compressed when that saves at least 1%; otherwise the
encoder returns ``"raw"`` and the data object itself (zero copy).

:func:`decode` treats stored bytes as hostile: a crafted checkpoint can carry
consistent CRCs. Every header field is validated, plane lengths must add up
exactly, and each zstd frame must declare (if it declares anything) exactly the
expected size and a window no larger than needed *before* it is decompressed
into a buffer bounded by that size, so a small frame claiming a huge size can
never make us allocate it. Every inconsistency raises :class:`CodecError`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import zstandard

from ..native import bytegroup as _bg

__all__ = ["CODECS", "CodecError", "Compression", "check", "decode", "encode", "resolve"]

#: Codec names this module writes and reads.
CODECS = ("raw", "zstd", "bgz")

_BGZ_VERSION = 1
_MIN_LEVEL, _MAX_LEVEL = -(1 << 17), zstandard.MAX_COMPRESSION_LEVEL
_PROBE_BYTES = 64 << 10  # sample compressed to decide whether a plane is worth it
_PROBE_MIN_SAVING = 0.03  # a plane must shrink by >= 3% on the sample
_MIN_SAVING = 0.01  # a whole chunk must shrink by >= 1%, else stored raw
_SCRATCH_MAX = 64 << 20  # larger grouping buffers are not kept per thread
_MIN_BYTES = 64  # smaller chunks are stored raw: a frame's overhead eats any saving
_MAX_FLOOR_WINDOW = 8 << 20  # largest zstd window accepted regardless of chunk size


class CodecError(ValueError):
    """Stored chunk bytes are inconsistent with their codec or expected size."""


@dataclass(frozen=True)
class Compression:
    """How tensor chunks are compressed.

    ``level`` is the zstd level. Byte-grouped planes (and 1-byte floats) at
    levels <= 3 use a literal-oriented parameter set (fast strategy, 7-byte
    minimum match, 64-entry hash table, 128 KiB window): on exponent planes
    zstd's own level 1-3 presets spend time on short matches that cost more
    bits than they save, while this set is ~2-3x faster and within ~1% of the
    plane's order-0 entropy. Levels >= 4 use zstd's preset for the level.
    ``byte_group=False`` stores floats as plain zstd frames. ``threads`` is
    the number of worker threads encoding/decoding chunks in parallel.
    """

    level: int = 3
    byte_group: bool = True
    threads: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.level, int) or isinstance(self.level, bool):
            raise TypeError(f"Compression.level must be an int, not {type(self.level).__name__}")
        if not _MIN_LEVEL <= self.level <= _MAX_LEVEL:
            raise ValueError(
                f"Compression.level must be in [{_MIN_LEVEL}, {_MAX_LEVEL}], got {self.level}"
            )
        if not isinstance(self.byte_group, bool):
            raise TypeError("Compression.byte_group must be a bool")
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1:
            raise ValueError(f"Compression.threads must be an int >= 1, got {self.threads!r}")


def resolve(compression: None | str | Compression) -> Compression | None:
    """Normalize the user's ``compression=`` argument: None (raw), ``"zstd"`` or a Compression."""
    if compression is None or isinstance(compression, Compression):
        return compression
    if isinstance(compression, str):
        if compression == "zstd":
            return Compression()
        raise ValueError(
            f"unknown compression {compression!r}: use None, 'zstd' or shardckpt.Compression(...)"
        )
    raise TypeError(
        f"compression must be None, 'zstd' or a shardckpt.Compression, not {type(compression).__name__}"
    )


# --- per-thread zstd contexts and scratch (zstandard objects are not thread-safe) ---

_tls = threading.local()


def _cctx(level: int, planes: bool) -> zstandard.ZstdCompressor:
    cache = _tls.__dict__.setdefault("cctx", {})
    key = (level, planes and level <= 3)
    c = cache.get(key)
    if c is None:
        if key[1]:
            params = zstandard.ZstdCompressionParameters(
                strategy=zstandard.STRATEGY_FAST, window_log=17, hash_log=6, chain_log=6,
                search_log=1, min_match=7, target_length=0,
                write_content_size=True, write_checksum=False, write_dict_id=False,
            )  # fmt: skip
            c = zstandard.ZstdCompressor(compression_params=params)
        else:
            c = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True)
        cache[key] = c
    return c


def _dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "dctx", None)
    if d is None:
        d = _tls.dctx = zstandard.ZstdDecompressor()
    return d


def _scratch(n: int) -> memoryview:
    buf = getattr(_tls, "scratch", None)
    if buf is None or len(buf) < n:
        buf = bytearray(n)
        if n <= _SCRATCH_MAX:
            _tls.scratch = buf
    return memoryview(buf)[:n]


def _bytes_view(data: Any) -> memoryview:
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise BufferError("chunk buffer must be C-contiguous")
    return mv if (mv.format == "B" and mv.ndim == 1) else mv.cast("B")


# --- encode ---


def _sample(mv: memoryview) -> bytes | memoryview:
    """Up to _PROBE_BYTES from four evenly spaced places (a tensor's start may be atypical)."""
    n = len(mv)
    if n <= _PROBE_BYTES:
        return mv
    piece = _PROBE_BYTES // 4
    step = (n - piece) // 3
    return b"".join(mv[i * step : i * step + piece] for i in range(4))


def _compress(mv: memoryview, cctx: zstandard.ZstdCompressor) -> bytes | None:
    """zstd frame of ``mv``, or None when it would not save _PROBE_MIN_SAVING."""
    sample = _sample(mv)
    if len(sample) < len(mv) and len(cctx.compress(sample)) > len(sample) * (1 - _PROBE_MIN_SAVING):
        return None  # the probe on a sample says no: skip paying for the whole buffer
    out = cctx.compress(mv)
    return out if len(out) <= len(mv) * (1 - _PROBE_MIN_SAVING) else None


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def encode(
    data: Any, itemsize: int, cfg: Compression | None, *, floating: bool = True
) -> tuple[str, Any]:
    """Encode one chunk; returns ``(codec, stored)``.

    ``itemsize`` is the element size in bytes; for complex dtypes pass the size
    of the real component (so planes line up with float bytes). ``floating``
    says the elements are floats: integers/bools (``floating=False``) and
    1-byte dtypes are stored as plain zstd or raw, chosen by a probe.
    ``stored`` is ``data`` itself for ``"raw"``, else a new ``bytes``.
    """
    mv = _bytes_view(data)
    n = len(mv)
    if itemsize < 1 or n % itemsize:
        raise ValueError(f"chunk of {n} bytes is not a whole number of {itemsize}-byte elements")
    if cfg is None or n < _MIN_BYTES:
        return "raw", data
    width = itemsize if itemsize in (2, 4, 8) else 8 if itemsize % 8 == 0 else 0
    if not (floating and cfg.byte_group and width):
        out = _compress(mv, _cctx(cfg.level, floating and itemsize == 1 and cfg.byte_group))
        if out is None or len(out) > n * (1 - _MIN_SAVING):
            return "raw", data
        return "zstd", out
    grouped = _scratch(n)
    _bg.group(mv, grouped, width)
    cctx = _cctx(cfg.level, True)
    m = n // width
    mask, lengths, parts = 0, [], []
    for k in range(width):
        plane = grouped[k * m : (k + 1) * m]
        frame = _compress(plane, cctx)
        if frame is None:
            parts.append(plane)
        else:
            mask |= 1 << k
            lengths.append(_varint(len(frame)))
            parts.append(frame)
    header = bytes((_BGZ_VERSION, width, mask)) + b"".join(lengths)
    if mask == 0 or len(header) + sum(map(len, parts)) > n * (1 - _MIN_SAVING):
        return "raw", data
    return "bgz", b"".join([header, *parts])


# --- decode ---


def _frame_checks(frame: memoryview, expected: int, what: str) -> zstandard.FrameParameters:
    """Validate a zstd frame's header against the ``expected`` decoded size."""
    if expected <= 0:
        raise CodecError(f"{what}: a zstd frame cannot encode an empty chunk")
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as e:
        raise CodecError(f"{what}: bad zstd frame header ({e})") from None
    declared = params.content_size
    if declared != zstandard.CONTENTSIZE_UNKNOWN and declared != expected:
        raise CodecError(f"{what}: zstd frame declares {declared} bytes, expected {expected}")
    # One-shot encoders size the window to the content (next power of 2); the 8 MiB
    # floor admits streaming encoders (zstd levels <= 19) and still bounds the
    # decoder's window buffer for a frame that declares no content size.
    if params.window_size > max(_MAX_FLOOR_WINDOW, 1 << (expected - 1).bit_length()):
        raise CodecError(
            f"{what}: zstd frame window {params.window_size} too large for {expected} bytes"
        )
    return params


def _unzstd(frame: memoryview, expected: int, what: str) -> bytes:
    """Decompress one zstd frame that must produce exactly ``expected`` bytes."""
    _frame_checks(frame, expected, what)
    try:
        out = _dctx().decompress(frame, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise CodecError(f"{what}: corrupt zstd frame ({e})") from None
    if len(out) != expected:
        raise CodecError(f"{what}: zstd frame decoded to {len(out)} bytes, expected {expected}")
    return out


def _read_varint(sv: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(pos + 10, len(sv))):
        b = sv[i]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            if b == 0 and i > pos:
                raise CodecError("bgz header: overlong plane length")
            return value, i + 1
        shift += 7
    raise CodecError("bgz header: truncated or overlong plane length")


def _bgz_planes(sv: memoryview, raw_len: int, unzstd: Any = _unzstd) -> list[Any]:
    if len(sv) < 3:
        raise CodecError(f"bgz chunk of {len(sv)} bytes is shorter than its header")
    version, width, mask = sv[0], sv[1], sv[2]
    if version != _BGZ_VERSION:
        raise CodecError(f"bgz chunk has unsupported version {version}")
    if width not in (2, 4, 8):
        raise CodecError(f"bgz chunk has invalid width {width}")
    if mask >> width:
        raise CodecError(f"bgz chunk mode mask {mask:#x} names planes beyond width {width}")
    if raw_len <= 0 or raw_len % width:
        raise CodecError(
            f"bgz chunk raw length {raw_len} is not a positive multiple of width {width}"
        )
    m = raw_len // width
    pos, lengths = 3, []
    for k in range(width):
        if mask >> k & 1:
            length, pos = _read_varint(sv, pos)
            if length == 0:
                raise CodecError(f"bgz chunk: zstd plane {k} has length 0")
        else:
            length = m
        lengths.append(length)
    if pos + sum(lengths) != len(sv):
        raise CodecError(
            f"bgz chunk: header and plane lengths total {pos + sum(lengths)} bytes, stored {len(sv)}"
        )
    planes: list[Any] = []
    for k, length in enumerate(lengths):
        payload = sv[pos : pos + length]
        pos += length
        planes.append(unzstd(payload, m, f"bgz plane {k}") if mask >> k & 1 else payload)
    return planes


def decode(codec: str, stored: Any, raw_len: int, out: Any = None) -> Any:
    """Inverse of :func:`encode`: the chunk's ``raw_len`` raw bytes.

    With ``out`` (a writable C-contiguous buffer of exactly ``raw_len`` bytes)
    the bytes are decoded into it and ``out`` is returned; otherwise a new
    buffer (or ``stored`` itself for ``"raw"``). Raises :class:`CodecError`
    for any inconsistency in the stored bytes.
    """
    if not isinstance(raw_len, int) or raw_len < 0:
        raise ValueError(f"raw_len must be a non-negative int, got {raw_len!r}")
    ov = None
    if out is not None:
        ov = _bytes_view(out)
        if ov.readonly or len(ov) != raw_len:
            raise ValueError(f"out must be a writable buffer of raw_len={raw_len} bytes")
    sv = _bytes_view(stored)
    if codec == "raw":
        if len(sv) != raw_len:
            raise CodecError(f"raw chunk holds {len(sv)} bytes, expected {raw_len}")
        if ov is None:
            return stored
        ov[:] = sv
        return out
    if codec == "zstd":
        data = _unzstd(sv, raw_len, "zstd chunk")
        if ov is None:
            return data
        ov[:] = data
        return out
    if codec == "bgz":
        planes = _bgz_planes(sv, raw_len)
        dst = ov if ov is not None else memoryview(bytearray(raw_len))
        _bg.ungroup_planes(planes, dst)
        return out if out is not None else dst
    raise CodecError(f"unknown chunk codec {codec!r}")


# --- checking without decoding into memory (verify) ---

_CHECK_PIECE = 1 << 20  # decoded bytes held at once while checking a frame
_ZSTD_MAX_WINDOW = 1 << 27  # zstd's own default limit; no encoder here needs more


def _frame_length(frame: memoryview, has_checksum: bool, what: str) -> int:
    """Byte length of the zstd frame at the start of ``frame``, from its block headers."""
    pos = zstandard.frame_header_size(frame)
    while True:
        if pos + 3 > len(frame):
            raise CodecError(f"{what}: zstd frame truncated in a block header")
        header = frame[pos] | frame[pos + 1] << 8 | frame[pos + 2] << 16
        last, kind, size = header & 1, header >> 1 & 3, header >> 3
        if kind == 3:
            raise CodecError(f"{what}: zstd block of reserved type")
        pos += 3 + (1 if kind == 1 else size)
        if last:
            break
    return pos + (4 if has_checksum else 0)


def _check_zstd(frame: memoryview, expected: int, what: str) -> None:
    """Like :func:`_unzstd` without holding the output: streams it through a small buffer."""
    params = _frame_checks(frame, expected, what)
    try:
        length = _frame_length(frame, params.has_checksum, what)
        if length != len(frame):
            raise CodecError(f"{what}: zstd frame is {length} bytes, stored {len(frame)}")
        buf, total = _scratch(min(expected, _CHECK_PIECE)), 0
        dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
        with dctx.stream_reader(frame, read_size=1 << 16, read_across_frames=False) as r:
            while total <= expected:
                n = r.readinto(buf)
                if not n:
                    break
                total += n
    except zstandard.ZstdError as e:
        raise CodecError(f"{what}: corrupt zstd frame ({e})") from None
    if total != expected:
        raise CodecError(f"{what}: zstd frame decodes to {'more than ' if total > expected else ''}"
                         f"{total} bytes, expected {expected}")


def check(codec: str, stored: Any, raw_len: int) -> None:
    """Raise :class:`CodecError` unless ``stored`` decodes (as :func:`decode` would) to
    exactly ``raw_len`` bytes, holding at most ~1 MiB of output and a window the
    frame header declares (checked against ``raw_len``), never ``raw_len`` bytes:
    a small chunk claiming a huge size costs no memory to reject."""
    if not isinstance(raw_len, int) or raw_len < 0:
        raise ValueError(f"raw_len must be a non-negative int, got {raw_len!r}")
    sv = _bytes_view(stored)
    if codec == "raw":
        if len(sv) != raw_len:
            raise CodecError(f"raw chunk holds {len(sv)} bytes, expected {raw_len}")
    elif codec == "zstd":
        _check_zstd(sv, raw_len, "zstd chunk")
    elif codec == "bgz":
        _bgz_planes(sv, raw_len, _check_zstd)
    else:
        raise CodecError(f"unknown chunk codec {codec!r}")
