"""Tests for the chunk codecs (shardckpt.format.codec) and byte grouping (csrc/bytegroup.cpp).

Byte grouping runs against every backend through the ``bg`` fixture: each compiled
kernel set usable on this CPU (through the extension's ``impl`` hook) and the numpy
fallback. The codec is checked for bitwise-exact round trips of every dtype, for
the choice of codec and plane modes, and for robustness: corrupted or crafted
stored bytes (including decompression bombs) raise ``CodecError`` and nothing else.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import FrozenInstanceError, dataclass

import numpy as np
import pytest
import torch
import zstandard

from shardckpt.format import codec
from shardckpt.format.codec import CodecError, Compression, decode, encode, resolve
from shardckpt.native import bytegroup as _bytegroup_shim

try:
    from shardckpt.native import _bytegroup as _ext
except ImportError:  # reported by test_compiled_extension_is_active
    _ext = None

pytestmark = pytest.mark.filterwarnings("ignore:shardckpt is using the slow numpy:RuntimeWarning")

NUMPY_FORCED = os.environ.get("SHARDCKPT_FORCE_NUMPY_BYTEGROUP", "").strip().lower() in (
    "1",
    "true",
    "yes",
    "on",
)


# ---------------------------------------------------------------------------
# Byte grouping
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BG:
    name: str
    group: Callable[..., None]
    ungroup: Callable[..., None]
    ungroup_planes: Callable[..., None]


def _compiled(kernel: str) -> BG:
    assert _ext is not None
    return BG(
        f"compiled-{kernel}",
        lambda s, d, w: _ext.group(s, d, w, impl=kernel),
        lambda s, d, w: _ext.ungroup(s, d, w, impl=kernel),
        lambda p, d: _ext.ungroup_planes(p, d, impl=kernel),
    )


_BACKENDS = {
    f"compiled-{k}": (lambda k=k: _compiled(k))
    for k in (_ext.available_implementations() if _ext else [])
}
_BACKENDS["numpy"] = lambda: BG(
    "numpy",
    _bytegroup_shim._numpy_group,
    _bytegroup_shim._numpy_ungroup,
    _bytegroup_shim._numpy_ungroup_planes,
)
_BACKENDS["active"] = lambda: BG(
    "active", _bytegroup_shim.group, _bytegroup_shim.ungroup, _bytegroup_shim.ungroup_planes
)


@pytest.fixture(params=list(_BACKENDS))
def bg(request) -> BG:
    return _BACKENDS[request.param]()


@pytest.mark.parametrize("width", [2, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 3, 31, 32, 33, 63, 64, 65, 127, 129, 1000, 4099, 300_007])
def test_group_matches_reference_and_inverts(bg, width, n):
    rng = np.random.default_rng(n * 10 + width)
    src = rng.integers(0, 256, n * width, dtype=np.uint8)
    planar = np.full_like(src, 0xAB)
    bg.group(src, planar, width)
    assert np.array_equal(planar, src.reshape(-1, width).T.ravel())
    back = np.zeros_like(src)
    bg.ungroup(planar, back, width)
    assert np.array_equal(back, src)
    back2 = np.zeros_like(src)
    bg.ungroup_planes([planar[k * n : (k + 1) * n] for k in range(width)], back2)
    assert np.array_equal(back2, src)


def test_group_accepts_any_buffer(bg):
    src = bytes(range(256)) * 4
    dst = bytearray(len(src))
    bg.group(memoryview(src), dst, 4)
    out = np.empty(len(src), np.uint8)
    bg.ungroup(dst, out, 4)
    assert out.tobytes() == src
    bg.ungroup_planes(
        [bytes(dst[:256]), memoryview(dst)[256:512], dst[512:768], bytearray(dst[768:])], out
    )
    assert out.tobytes() == src


@pytest.mark.parametrize("offset", [1, 3, 7])
def test_group_misaligned_buffers(bg, offset):
    rng = np.random.default_rng(offset)
    for width in (2, 4, 8):
        n = 1000 + offset
        base = np.zeros(n * width + 16, np.uint8)
        src = base[offset : offset + n * width]
        src[:] = rng.integers(0, 256, n * width, dtype=np.uint8)
        planar_base = np.zeros(n * width + 16, np.uint8)
        planar = planar_base[offset + 1 : offset + 1 + n * width]
        bg.group(src, planar, width)
        assert np.array_equal(planar, src.reshape(-1, width).T.ravel())
        back = np.zeros(n * width + 16, np.uint8)[offset + 2 : offset + 2 + n * width]
        bg.ungroup(planar, back, width)
        assert np.array_equal(back, src)


@pytest.mark.parametrize(
    ("src_len", "dst_len", "width"),
    [(12, 8, 4), (10, 10, 4), (7, 7, 2), (8, 8, 3), (8, 8, 1), (16, 16, 16), (8, 8, 0), (8, 8, -2)],
)
def test_group_rejects_bad_lengths_and_widths(bg, src_len, dst_len, width):
    with pytest.raises(ValueError):
        bg.group(bytes(src_len), bytearray(dst_len), width)
    with pytest.raises(ValueError):
        bg.ungroup(bytes(src_len), bytearray(dst_len), width)


def test_group_rejects_bad_buffers(bg):
    with pytest.raises(TypeError):
        bg.group(bytes(8), bytes(8), 2)  # read-only dst
    with pytest.raises(TypeError):
        bg.group(12345, bytearray(8), 2)
    with pytest.raises(BufferError):
        bg.group(np.zeros(16, np.uint8)[::2], bytearray(8), 2)
    buf = bytearray(64)
    with pytest.raises(ValueError):
        bg.group(memoryview(buf)[:32], memoryview(buf)[16:48], 2)  # overlap


def test_ungroup_planes_rejects_bad_planes(bg):
    with pytest.raises(ValueError):
        bg.ungroup_planes([bytes(4)] * 3, bytearray(12))
    with pytest.raises(ValueError):
        bg.ungroup_planes([bytes(4), bytes(5)], bytearray(8))
    dst = bytearray(8)
    with pytest.raises(ValueError):
        bg.ungroup_planes([memoryview(dst)[:4], bytes(4)], dst)


def test_unknown_impl_is_rejected():
    if _ext is None:
        pytest.skip("extension not built")
    with pytest.raises(ValueError):
        _ext.group(bytes(8), bytearray(8), 2, impl="sse9")


def test_numpy_fallback_warns_once_and_codec_works():
    code = textwrap.dedent(
        """
        import warnings, torch
        warnings.simplefilter("always")
        from shardckpt.native import bytegroup as s
        from shardckpt.format import codec
        assert s.implementation() == "numpy" and not s.is_compiled()
        x = torch.randn(50_000)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            name, stored = codec.encode(x.view(torch.uint8).numpy(), 4, codec.Compression())
            out = codec.decode(name, stored, x.numel() * 4)
            codec.encode(x.view(torch.uint8).numpy(), 4, codec.Compression())
        assert name == "bgz" and bytes(out) == x.view(torch.uint8).numpy().tobytes()
        assert sum(issubclass(i.category, RuntimeWarning) for i in w) == 1, [str(i.message) for i in w]
        print("ok")
        """
    )
    env = dict(os.environ, SHARDCKPT_FORCE_NUMPY_BYTEGROUP="1")
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# ---------------------------------------------------------------------------
# Compression / resolve
# ---------------------------------------------------------------------------


def test_resolve():
    assert resolve(None) is None
    assert resolve("zstd") == Compression() == Compression(level=3, byte_group=True, threads=2)
    c = Compression(level=7, byte_group=False, threads=4)
    assert resolve(c) is c
    with pytest.raises(ValueError, match="unknown compression"):
        resolve("gzip")
    with pytest.raises(ValueError):
        resolve("ZSTD ")
    for bad in (3, True, b"zstd", {"level": 3}):
        with pytest.raises(TypeError, match="compression must be"):
            resolve(bad)


def test_compression_validation():
    Compression(level=-5)
    Compression(level=22)
    for kwargs, exc in [
        ({"level": 23}, ValueError),
        ({"level": -(1 << 20)}, ValueError),
        ({"level": "3"}, TypeError),
        ({"level": 3.0}, TypeError),
        ({"level": True}, TypeError),
        ({"threads": 0}, ValueError),
        ({"threads": 1.5}, ValueError),
        ({"byte_group": 1}, TypeError),
    ]:
        with pytest.raises(exc):
            Compression(**kwargs)
    with pytest.raises(FrozenInstanceError):
        Compression().level = 5  # type: ignore[misc]


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------

FLOAT_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.complex64,
    torch.complex128,
]
FP8_DTYPES = [
    getattr(torch, n)
    for n in (
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    )
    if hasattr(torch, n)
]
INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool]
CONFIGS = [
    None,
    Compression(),
    Compression(level=1),
    Compression(level=6),
    Compression(byte_group=False),
]


def _u8(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy().ravel()


def _itemsize(dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return size // 2 if dtype.is_complex else size


def _specials(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """n values mixing special values (NaN, +-Inf, denormals, -0.0, extremes) with random ones."""
    g = torch.Generator().manual_seed(seed)
    if dtype in FP8_DTYPES:  # every bit pattern, NaNs included
        return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) < 0.3
    if not (dtype.is_floating_point or dtype.is_complex):
        info = torch.iinfo(dtype)
        vals = torch.tensor([0, -1 if info.min < 0 else 1, info.min, info.max, 1], dtype=dtype)
        rnd = torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(dtype)
        rnd[: min(n, len(vals))] = vals[: min(n, len(vals))]
        return rnd
    real = (
        torch.float32 if dtype == torch.complex64 else torch.float64 if dtype.is_complex else dtype
    )
    fi = torch.finfo(real)
    special = torch.tensor(
        [
            float("nan"),
            float("inf"),
            float("-inf"),
            -0.0,
            0.0,
            fi.tiny / 4,
            -fi.tiny / 2,
            fi.max,
            fi.min,
            fi.tiny,
            1.0,
        ],
        dtype=torch.float64,
    ).to(real)
    vals = (torch.randn(n, generator=g, dtype=torch.float64) * 0.05).to(real)
    vals[: min(n, len(special))] = special[: min(n, len(special))]
    if dtype.is_complex:
        imag = vals.flip(0)
        return torch.complex(vals, imag)
    return vals


def _roundtrip(raw: np.ndarray, itemsize: int, cfg, floating: bool = True) -> str:
    name, stored = encode(raw, itemsize, cfg, floating=floating)
    assert name in codec.CODECS
    if name == "raw":
        assert stored is raw  # zero copy
    got = decode(name, stored, raw.nbytes)
    assert np.array_equal(np.frombuffer(memoryview(got).cast("B"), np.uint8), raw)
    out = bytearray(raw.nbytes)
    assert decode(name, stored, raw.nbytes, out) is out
    assert np.array_equal(np.frombuffer(out, np.uint8), raw)
    return name


@pytest.mark.parametrize("n", [1, 3, 1001, 70_001])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + FP8_DTYPES + INT_DTYPES, ids=str)
def test_roundtrip_every_dtype(dtype, n):
    t = _specials(dtype, n, seed=n)
    raw = _u8(t)
    floating = dtype.is_floating_point or dtype.is_complex
    for cfg in CONFIGS:
        _roundtrip(raw, _itemsize(dtype), cfg, floating)
    if dtype.is_complex:  # whole-element itemsize works too
        _roundtrip(raw, t.element_size(), Compression(), floating)


def test_empty_and_tiny_inputs_are_raw():
    for data in (b"", bytearray(), memoryview(b""), bytes(8)):
        name, stored = encode(data, 4, Compression())
        assert name == "raw" and stored is data
    assert bytes(decode("raw", b"", 0)) == b""
    assert bytes(decode("raw", b"", 0, bytearray())) == b""


def test_codec_choice():
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(1 << 20, generator=g) * 0.02
    for t, size in ((gauss, 4), (gauss.bfloat16(), 2), (gauss.half(), 2), (gauss.double(), 8)):
        name, stored = encode(_u8(t), size, Compression())
        assert name == "bgz" and len(stored) < t.numel() * size / 1.05, (t.dtype, len(stored))
        assert stored[0] == 1 and stored[1] == size
    noise = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    for size, floating in ((1, True), (2, True), (4, True), (8, False)):
        assert encode(noise, size, Compression(), floating=floating)[0] == "raw"
    zeros = np.zeros(1 << 20, np.uint8)
    assert len(encode(zeros, 4, Compression())[1]) < 1000
    ids = _u8(torch.arange(100_000, dtype=torch.int64))
    assert _roundtrip(ids, 8, Compression(), floating=False) == "zstd"
    assert _roundtrip(_u8(gauss), 4, Compression(byte_group=False)) == "zstd"
    assert encode(_u8(gauss), 4, None)[0] == "raw"
    with pytest.raises(ValueError):
        encode(bytes(10), 4, Compression())


def _header(stored) -> tuple[int, int, int]:
    return stored[0], stored[1], stored[2]


@pytest.mark.parametrize("width", [2, 4, 8])
def test_every_plane_mode_combination(width):
    rng = np.random.default_rng(width)
    m = 20_000
    masks = range(1 << width) if width < 8 else [0, 1, 0x80, 0x55, 0xAA, 0x7F, 0xFE, 0xFF]
    for mask in masks:
        planes = [
            rng.integers(0, 4, m, dtype=np.uint8)
            if mask >> k & 1
            else rng.integers(0, 256, m, dtype=np.uint8)
            for k in range(width)
        ]
        raw = np.stack(planes, axis=1).ravel()  # interleave: plane k = byte k
        name = _roundtrip(raw, width, Compression())
        if mask == 0:
            assert name == "raw"
            continue
        assert name == "bgz"
        stored = encode(raw, width, Compression())[1]
        version, w, got_mask = _header(stored)
        assert (version, w, got_mask) == (1, width, mask)
        # header = 3 bytes + one LEB128 length per zstd plane; then the payloads, exactly
        pos, lengths = 3, []
        for k in range(width):
            if mask >> k & 1:
                length, pos = codec._read_varint(memoryview(stored), pos)
                assert 0 < length < m
                lengths.append(length)
            else:
                lengths.append(m)
        assert pos <= 3 + 3 * bin(mask).count("1")
        assert pos + sum(lengths) == len(stored)


def test_decodes_frames_without_content_size():
    raw = np.tile(np.arange(16, dtype=np.uint8), 1000)
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(raw.tobytes())
    assert zstandard.get_frame_parameters(frame).content_size == zstandard.CONTENTSIZE_UNKNOWN
    assert bytes(decode("zstd", frame, raw.nbytes)) == raw.tobytes()
    # bgz with width 2: plane 0 raw, plane 1 a size-less frame
    m = raw.nbytes // 2
    p1 = zstandard.ZstdCompressor(write_content_size=False).compress(raw[1::2].tobytes())
    stored = bytes([1, 2, 2, len(p1)]) + raw[0::2].tobytes() + p1
    assert len(p1) < 0x80
    assert bytes(decode("bgz", stored, raw.nbytes)) == raw.tobytes()
    with pytest.raises(CodecError):
        decode("bgz", stored, raw.nbytes - 2)
    del m


def test_threads_share_nothing():
    g = torch.Generator().manual_seed(3)
    chunks = [
        _u8(torch.randn(50_000 + i, generator=g).to(dt))
        for i, dt in enumerate([torch.float32, torch.bfloat16] * 8)
    ]
    sizes = [4, 2] * 8
    expect = [encode(c, s, Compression()) for c, s in zip(chunks, sizes)]

    def work(i: int) -> bool:
        name, stored = encode(chunks[i], sizes[i], Compression())
        out = decode(name, stored, chunks[i].nbytes)
        return (name, bytes(stored)) == (expect[i][0], bytes(expect[i][1])) and bytes(
            out
        ) == chunks[i].tobytes()

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, list(range(len(chunks))) * 4))


# ---------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------


def _samples() -> list[tuple[str, bytes, int]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for t, size in (
        (torch.randn(3000, generator=g), 4),
        (torch.randn(5001, generator=g).bfloat16(), 2),
        (torch.randn(1500, generator=g).double(), 8),
    ):
        raw = _u8(t)
        name, stored = encode(raw, size, Compression())
        assert name == "bgz"
        out.append((name, bytes(stored), raw.nbytes))
    ids = _u8(torch.arange(3000, dtype=torch.int32) % 17)
    name, stored = encode(ids, 4, Compression(), floating=False)
    assert name == "zstd"
    out.append((name, bytes(stored), ids.nbytes))
    return out


def _decode_or_codec_error(name: str, stored: bytes, raw_len: int) -> bool:
    """True if rejected with CodecError; any other exception fails the test."""
    try:
        out = decode(name, stored, raw_len)
    except CodecError:
        return True
    assert (
        len(memoryview(out).cast("B")) == raw_len
    )  # a flip inside a raw plane decodes; CRC catches it
    return False


def test_fuzzed_stored_bytes_raise_only_codec_error():
    rnd = random.Random(1234)
    t0 = time.perf_counter()
    count = rejected = 0
    for name, stored, raw_len in _samples():
        for _ in range(120):
            b = bytearray(stored)
            kind = rnd.randrange(5)
            if kind == 0:  # random byte flips
                for _ in range(rnd.randint(1, 4)):
                    b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
            elif kind == 1:  # truncation
                del b[rnd.randrange(len(b)) :]
            elif kind == 2:  # appended bytes
                b += bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 20)))
            elif kind == 3:  # header lies (version, width, mask, first length byte)
                pos = rnd.randrange(min(6, len(b)))
                b[pos] = rnd.randrange(256)
            else:  # random bytes in the first zstd frame header region
                pos = rnd.randrange(min(40, len(b)))
                b[pos : pos + 4] = bytes(rnd.randrange(256) for _ in range(4))
            rejected += _decode_or_codec_error(name, bytes(b), raw_len)
            count += 1
        for delta in (-8, -4, -2, -1, 1, 2, 4, 8, 1 << 20):
            with pytest.raises(CodecError):
                decode(name, stored, raw_len + delta)
        with pytest.raises(CodecError):
            decode("bgz" if name == "zstd" else "zstd", stored, raw_len)
    assert count >= 400 and rejected > count // 2, (count, rejected)
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize(
    "stored",
    [
        b"",
        b"\x01",
        b"\x01\x04",
        b"\x02\x04\x00" + bytes(1000),  # unknown version
        b"\x01\x03\x00" + bytes(1000),  # invalid width
        b"\x01\x02\x04" + bytes(1000),  # mode bit for a plane beyond width
        b"\x01\x04\x00" + bytes(999),  # raw planes one byte short
        b"\x01\x04\x00" + bytes(1001),  # one byte too many
        b"\x01\x04\x01\x00" + bytes(750),  # zero-length zstd plane
        b"\x01\x04\x01\x80\x00" + bytes(1000),  # overlong varint
        b"\x01\x04\x01" + b"\xff" * 11,  # unterminated varint
        b"\x01\x04\x01\x05" + bytes(755),  # zstd plane that is not a frame
    ],
)
def test_malformed_bgz_headers(stored):
    with pytest.raises(CodecError):
        decode("bgz", stored, 1000)


def test_unknown_codec_and_bad_arguments():
    with pytest.raises(CodecError, match="unknown chunk codec"):
        decode("lz4", b"abc", 3)
    with pytest.raises(CodecError):
        decode("raw", b"abc", 4)
    with pytest.raises(ValueError):
        decode("raw", b"abc", 3, bytearray(4))
    with pytest.raises(ValueError):
        decode("raw", b"abc", 3, b"xyz")  # read-only out
    with pytest.raises(ValueError):
        decode("raw", b"abc", -1)


def _bomb(declared_size: int = 100_000_000) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(bytes(declared_size))


@pytest.mark.parametrize("codec_name", ["zstd", "bgz"])
def test_decompression_bomb_is_rejected_without_allocating(codec_name):
    frame = _bomb()
    assert len(frame) < 10_000 and zstandard.get_frame_parameters(frame).content_size == 100_000_000
    stored = (
        frame
        if codec_name == "zstd"
        else bytes([1, 2, 2])
        + bytes([len(frame) & 0x7F | 0x80, len(frame) >> 7])
        + bytes(500)
        + frame
    )
    if codec_name == "bgz":
        assert len(frame) >> 7 < 0x80
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        with pytest.raises(CodecError, match="declares 100000000 bytes"):
            decode(codec_name, stored, 1000)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 1 << 20, peak


def test_sizeless_frame_expanding_beyond_raw_len_is_rejected():
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(10_000_000))
    assert zstandard.get_frame_parameters(frame).content_size == zstandard.CONTENTSIZE_UNKNOWN
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            decode("zstd", frame, 1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_frame_with_oversized_window_is_rejected():
    params = zstandard.ZstdCompressionParameters(window_log=27, write_content_size=False)
    cobj = zstandard.ZstdCompressor(compression_params=params).compressobj()
    frame = cobj.compress(bytes(1000)) + cobj.flush()
    assert zstandard.get_frame_parameters(frame).window_size == 1 << 27
    with pytest.raises(CodecError, match="window"):
        decode("zstd", frame, 1000)


def test_empty_or_garbage_zstd_frames():
    for stored in (b"", b"\x28\xb5\x2f", b"\x28\xb5\x2f\xfd", b"not a zstd frame at all"):
        with pytest.raises(CodecError):
            decode("zstd", stored, 10)


def test_mismatched_declared_size_and_trailing_frames():
    raw = bytes(range(256)) * 8
    frame = zstandard.ZstdCompressor().compress(raw)
    with pytest.raises(CodecError):
        decode("zstd", frame, len(raw) - 1)
    with pytest.raises(CodecError):
        decode("zstd", frame + frame, len(raw))  # a second frame is not ignored
    with pytest.raises(CodecError):
        decode("zstd", frame + b"\0", len(raw))
    with pytest.raises(CodecError):
        decode("zstd", frame, 0)
    skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"abcd"
    with pytest.raises(CodecError):
        decode("zstd", skippable, 4)
