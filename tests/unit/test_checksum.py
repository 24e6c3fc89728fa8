"""Tests for the CRC32C extension (csrc/crc32c.cpp) and its shim (shardckpt.native.crc32c).

Every behavioural test runs against each backend via the ``impl`` fixture:

* ``active``            -- the public ``shardckpt.native.crc32c`` API, whatever it dispatches to;
* ``compiled-<kernel>`` -- each kernel of the extension usable on this CPU, through its
                           ``_crc32c_impl`` testing hook;
* ``software``          -- the pure-Python/numpy fallback, called directly.

The software fallback is itself checked against a bit-at-a-time reference written here,
and (when the ``crc32c`` PyPI package is installed) everything is cross-checked with it.
"""

from __future__ import annotations

import array
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest

from shardckpt.native import crc32c as _checksum

try:
    from shardckpt.native import _crc32c as _ext
except ImportError:  # reported by tests/unit/test_native.py::test_compiled_kernels_are_active
    _ext = None

pytestmark = pytest.mark.filterwarnings("ignore:shardckpt is using the slow:RuntimeWarning")

SOFTWARE_FORCED = os.environ.get("SHARDCKPT_FORCE_SOFTWARE_CRC", "").strip().lower() in (
    "1",
    "true",
    "yes",
    "on",
)


@dataclass(frozen=True)
class Impl:
    name: str
    crc: Callable[..., int]
    combine: Callable[[int, int, int], int]
    slow: bool  # pure Python: keep inputs smaller


def _compiled_impl(kernel: str) -> Impl:
    assert _ext is not None

    def crc(data, value=0):
        return _ext._crc32c_impl(kernel, data, value)

    return Impl(f"compiled-{kernel}", crc, _ext.crc32c_combine, slow=False)


def _impl_params() -> list:
    params = [pytest.param("active", id="active")]
    if _ext is not None:
        params += [pytest.param(k, id=f"compiled-{k}") for k in _ext.available_implementations()]
    params.append(pytest.param("software", id="software"))
    return params


@pytest.fixture(params=_impl_params())
def impl(request) -> Impl:
    if request.param == "active":
        return Impl(
            "active",
            _checksum.crc32c,
            _checksum.crc32c_combine,
            slow=not _checksum.is_compiled(),
        )
    if request.param == "software":
        return Impl(
            "software", _checksum._software_crc32c, _checksum._software_crc32c_combine, slow=True
        )
    return _compiled_impl(request.param)


# ---------------------------------------------------------------------------
# Independent references.
# ---------------------------------------------------------------------------


def bitwise_crc32c(data: bytes, value: int = 0) -> int:
    """Textbook bit-at-a-time CRC32C; deliberately shares nothing with the module."""
    crc = value ^ 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def reference(data, value: int = 0) -> int:
    """Trusted answer for larger inputs: the software fallback (validated below)."""
    return _checksum._software_crc32c(data, value)


RNG_SEED = 0xC0FFEE


@pytest.fixture(scope="module")
def big_buffer() -> bytes:
    return random.Random(RNG_SEED).randbytes((4 << 20) + 4096)


@pytest.fixture(scope="module")
def random_cases(big_buffer) -> list[tuple[int, int, int, int]]:
    """(offset, length, value, expected) for random lengths 0..10000 and alignments."""
    rnd = random.Random(RNG_SEED + 1)
    cases = []
    for _ in range(400):
        off = rnd.randrange(0, 128)
        length = rnd.randrange(0, 10001)
        value = rnd.choice([0, 0xFFFFFFFF, rnd.getrandbits(32)])
        view = memoryview(big_buffer)[off : off + length]
        cases.append((off, length, value, reference(view, value)))
    return cases


# ---------------------------------------------------------------------------
# Known answers.
# ---------------------------------------------------------------------------

KNOWN_VECTORS = [
    pytest.param(b"123456789", 0xE3069283, id="check-123456789"),
    pytest.param(b"", 0x00000000, id="empty"),
    pytest.param(bytes(32), 0x8A9136AA, id="32-zeros"),
    pytest.param(b"\xff" * 32, 0x62A8AB43, id="32-ones"),
    pytest.param(bytes(range(32)), 0x46DD794E, id="ascending-32"),
    pytest.param(bytes(range(31, -1, -1)), 0x113FDB5C, id="descending-32"),
    pytest.param(b"a", 0xC1D04330, id="a"),
    pytest.param(b"\x00", 0x527D5351, id="one-zero"),
    pytest.param(b"The quick brown fox jumps over the lazy dog", 0x22620404, id="quick-brown-fox"),
    pytest.param(bytes(1 << 20), 0x14298C12, id="1MiB-zeros"),
]


@pytest.mark.parametrize("data, expected", KNOWN_VECTORS)
def test_known_vectors(impl, data, expected):
    assert impl.crc(data) == expected
    assert impl.crc(bytearray(data)) == expected
    assert impl.crc(memoryview(data)) == expected


@pytest.mark.parametrize("data, expected", KNOWN_VECTORS[:9])
def test_bitwise_reference_agrees_with_known_vectors(data, expected):
    assert bitwise_crc32c(data) == expected


def test_software_matches_bitwise_reference():
    rnd = random.Random(RNG_SEED + 2)
    for length in list(range(0, 80)) + [rnd.randrange(80, 3000) for _ in range(12)]:
        data = rnd.randbytes(length)
        value = rnd.getrandbits(32)
        assert _checksum._software_crc32c(data, value) == bitwise_crc32c(data, value), length
    # Beyond the numpy threshold and with a non-multiple-of-block tail.
    data = rnd.randbytes(20011)
    assert _checksum._software_crc32c(data) == bitwise_crc32c(data)


def test_crc32c_package_agrees(impl, big_buffer):
    crc32c_pkg = pytest.importorskip("crc32c")
    rnd = random.Random(RNG_SEED + 3)
    sizes = [rnd.randrange(0, 5000) for _ in range(40)] + [65536 + 5, (1 << 20) + 3]
    for size in sizes:
        off = rnd.randrange(0, 64)
        view = memoryview(big_buffer)[off : off + size]
        value = rnd.getrandbits(32)
        assert impl.crc(view, value) == crc32c_pkg.crc32c(view, value), (size, off)


# ---------------------------------------------------------------------------
# Lengths, alignments, large inputs.
# ---------------------------------------------------------------------------


def test_random_lengths_and_alignments(impl, big_buffer, random_cases):
    cases = random_cases[:80] if impl.slow else random_cases
    for off, length, value, expected in cases:
        view = memoryview(big_buffer)[off : off + length]
        assert impl.crc(view, value) == expected, (off, length, value)


def test_every_small_length(impl, big_buffer):
    # Covers every kernel threshold (8/16/64/256/512/768 bytes) and tail length.
    top = 300 if impl.slow else 1100
    for length in range(top):
        off = (length * 7) % 61
        view = memoryview(big_buffer)[off : off + length]
        assert impl.crc(view, 0x1234567) == reference(view, 0x1234567), length


def test_unaligned_start_offsets(impl, big_buffer):
    size = 20000 if impl.slow else 100_003
    for off in range(0, 72, 1 if not impl.slow else 5):
        view = memoryview(big_buffer)[off : off + size]
        assert impl.crc(view) == reference(view), off


@pytest.mark.parametrize(
    "size",
    [
        3 * 8192 - 1,
        3 * 8192,
        3 * 8192 + 1,
        2 * 3 * 8192 + 3 * 256 + 17,
        (1 << 20) + 13,
        (4 << 20) + 5,
        # Around the hybrid kernels' block sizes (12800 for vpclmulqdq, 26624 for
        # pclmulqdq+sse4.2) and a few blocks plus every kind of tail.
        12799,
        12800,
        12801,
        2 * 12800 + 3 * 256 + 64 + 16 + 8 + 7,
        26623,
        26624,
        26625,
        3 * 26624 + 3 * 256 + 64 + 16 + 8 + 7,
    ],
)
def test_large_inputs(impl, big_buffer, size):
    off = 3
    view = memoryview(big_buffer)[off : off + size]
    assert impl.crc(view) == reference(view)
    assert impl.crc(view, 0xDEADBEEF) == reference(view, 0xDEADBEEF)


# ---------------------------------------------------------------------------
# Streaming / combine.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 7, 100, 4095, 65536 + 3, (1 << 20) + 11, (3 << 20) + 17])
def test_chunked_equals_whole(impl, big_buffer, size):
    if impl.slow and size > (1 << 20) + 11:
        size = (1 << 20) + 11
    rnd = random.Random(size)
    data = memoryview(big_buffer)[5 : 5 + size]
    whole = impl.crc(data)
    for _ in range(3):
        cuts = sorted(rnd.randrange(0, size + 1) for _ in range(rnd.randrange(1, 8)))
        crc = 0
        prev = 0
        for cut in [*cuts, size]:
            crc = impl.crc(data[prev:cut], crc)
            prev = cut
        assert crc == whole, cuts


def test_continuation_value(impl):
    rnd = random.Random(RNG_SEED + 4)
    for _ in range(30):
        a = rnd.randbytes(rnd.randrange(0, 3000))
        b = rnd.randbytes(rnd.randrange(0, 3000))
        assert impl.crc(b, impl.crc(a)) == impl.crc(a + b)
    assert impl.crc(b"", 0x12345678) == 0x12345678
    assert impl.crc(b"", value=0xFFFFFFFF) == 0xFFFFFFFF


def test_combine(impl, big_buffer):
    rnd = random.Random(RNG_SEED + 5)
    lengths = [0, 1, 3, 4, 8, 100, 4096, 65537]
    for la in lengths:
        for lb in lengths:
            a = big_buffer[:la]
            b = big_buffer[la + 11 : la + 11 + lb]
            expected = reference(a + b)
            assert impl.combine(reference(a), reference(b), lb) == expected, (la, lb)
    for _ in range(20):
        la, lb = rnd.randrange(0, 200_000), rnd.randrange(0, 200_000)
        a, b = big_buffer[:la], big_buffer[la : la + lb]
        assert impl.combine(impl.crc(a), impl.crc(b), lb) == impl.crc(big_buffer[: la + lb])


def test_combine_huge_lengths_are_consistent(impl):
    # combine must be associative: ((x + y) + z) == (x + (y + z)), with lengths far beyond
    # anything we could actually checksum.
    rnd = random.Random(RNG_SEED + 6)
    for _ in range(10):
        x, y, z = (rnd.getrandbits(32) for _ in range(3))
        ly, lz = rnd.randrange(0, 1 << 62), rnd.randrange(0, 1 << 62)
        left = impl.combine(impl.combine(x, y, ly), z, lz)
        right = impl.combine(x, impl.combine(y, z, lz), ly + lz)
        assert left == right
    assert impl.combine(0x1234, 0, 0) == 0x1234  # crc32c(b"") == 0
    assert impl.combine(0x1234, 0x5678, 0) == 0x1234 ^ 0x5678  # zlib's convention
    # Shifting over 2**64 - 1 bytes is allowed; 2**64 is not.
    impl.combine(1, 2, (1 << 64) - 1)
    with pytest.raises((OverflowError, ValueError)):
        impl.combine(1, 2, 1 << 64)
    with pytest.raises(ValueError):
        impl.combine(1, 2, -1)


def test_combine_matches_zero_block():
    # crc(A + zeros(n)) == combine(crc(A), crc(zeros(n)), n) for several n, both backends.
    a = b"shardckpt"
    for n in (1, 5, 64, 1000, 123457):
        zeros = bytes(n)
        expected = _checksum.crc32c(a + zeros)
        assert _checksum.crc32c_combine(_checksum.crc32c(a), _checksum.crc32c(zeros), n) == expected
        assert (
            _checksum._software_crc32c_combine(
                _checksum._software_crc32c(a), _checksum._software_crc32c(zeros), n
            )
            == expected
        )


# ---------------------------------------------------------------------------
# Buffer types and argument validation.
# ---------------------------------------------------------------------------


def test_buffer_types(impl):
    torch = pytest.importorskip("torch")
    raw = random.Random(RNG_SEED + 7).randbytes(4096 * 3)
    expected = reference(raw)
    arr_u8 = np.frombuffer(raw, dtype=np.uint8).copy()
    tensor = torch.frombuffer(bytearray(raw), dtype=torch.float32)
    objects = {
        "bytes": raw,
        "bytearray": bytearray(raw),
        "memoryview": memoryview(raw),
        "memoryview-cast-f": memoryview(raw).cast("f"),
        "memoryview-2d": memoryview(raw).cast("B", (3, 4096)),
        "numpy-u8": arr_u8,
        "numpy-f32": arr_u8.view(np.float32),
        "numpy-2d": arr_u8.view(np.int64).reshape(48, 32),
        "array-I": array.array("I", raw),
        "torch-numpy": tensor.numpy(),
        "torch-numpy-memoryview": memoryview(tensor.numpy()),
        "numpy-big-endian": arr_u8.view(">i4"),
        "numpy-structured": arr_u8.view([("a", "<i4"), ("b", "<f8")]),
    }
    for name, obj in objects.items():
        assert impl.crc(obj) == expected, name
    empty = reference(b"")
    for obj in (np.zeros((0, 3)), memoryview(b""), bytearray(), np.zeros((4, 0), dtype=np.int16)):
        assert impl.crc(obj) == empty == 0
    # Slices that start mid-buffer.
    assert impl.crc(arr_u8[1:]) == reference(raw[1:])
    assert impl.crc(memoryview(tensor.numpy())[3:]) == reference(raw[12:])


def test_non_contiguous_rejected(impl):
    data = bytearray(range(256)) * 4
    arr = np.arange(64, dtype=np.int32).reshape(8, 8)
    bad = {
        "memoryview-step": memoryview(data)[::2],
        "numpy-step": np.frombuffer(bytes(data), dtype=np.uint8)[::3],
        "numpy-column": arr[:, 1],
        "numpy-fortran": np.asfortranarray(arr),
        "numpy-transpose": arr.T,
    }
    for name, obj in bad.items():
        with pytest.raises(BufferError, match="contiguous"):
            impl.crc(obj)
        del name


@pytest.mark.parametrize("obj", ["text", 12345, None, [1, 2, 3], 1.5])
def test_non_buffer_rejected(impl, obj):
    with pytest.raises(TypeError):
        impl.crc(obj)


def test_value_validation(impl):
    with pytest.raises(ValueError):
        impl.crc(b"abc", -1)
    with pytest.raises(OverflowError):
        impl.crc(b"abc", 1 << 32)
    with pytest.raises(TypeError):
        impl.crc(b"abc", 1.0)
    assert impl.crc(b"abc", np.uint32(5)) == impl.crc(b"abc", 5)  # __index__ accepted


def test_keyword_arguments(impl):
    assert impl.crc(data=b"123456789") == 0xE3069283
    assert impl.crc(b"6789", value=impl.crc(b"12345")) == 0xE3069283
    assert impl.combine(crc1=0, crc2=0, len2=0) == 0


def test_threads_give_consistent_results(impl):
    size = (256 << 10) if impl.slow else (2 << 20)
    rnd = random.Random(RNG_SEED + 8)
    bufs = [rnd.randbytes(size) for _ in range(4)]
    expected = [reference(b) for b in bufs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(2):
            got = list(pool.map(impl.crc, bufs))
            assert got == expected


# ---------------------------------------------------------------------------
# Extension-specific.
# ---------------------------------------------------------------------------


@pytest.mark.skipif(_ext is None, reason="extension not built")
def test_extension_introspection():
    available = _ext.available_implementations()
    assert available[-1] == "table"
    assert _ext.implementation() == available[0]
    assert set(available) <= {"vpclmulqdq", "pclmulqdq+sse4.2", "sse4.2", "table"}
    with pytest.raises(ValueError, match="unknown"):
        _ext._crc32c_impl("no-such-kernel", b"")
    for kernel in available:
        assert _ext._crc32c_impl(kernel, b"123456789") == 0xE3069283


@pytest.mark.skipif(_ext is None, reason="extension not built")
def test_extension_releases_gil_on_large_buffers():
    # A Python thread can only take a timestamp while it holds the GIL. If crc32c()
    # kept the GIL, the spinning thread could only run at the edges of each call
    # (before the call starts / after it returns); a timestamp in the middle half
    # of a call proves the GIL was released. The slow portable kernel makes each
    # call long (~20 ms); every kernel goes through the same GIL-release code.
    # (Checked against sum(range(...)) and bytes.count, which hold the GIL: 0 hits.)
    data = bytes(48 << 20)
    stamps: list[float] = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            stamps.append(time.perf_counter())

    windows = []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    t = threading.Thread(target=spin)
    try:
        t.start()
        for _ in range(3):
            start = time.perf_counter()
            _ext._crc32c_impl("table", data)
            windows.append((start, time.perf_counter()))
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    middle = [(a + (b - a) / 4, b - (b - a) / 4) for a, b in windows]
    assert any(lo < s < hi for s in stamps for lo, hi in middle)
