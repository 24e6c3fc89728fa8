"""Staging copies (shardckpt.engine.staging, shardckpt.native.copy, csrc/copy.cpp).

The copy runs against every backend through the ``backend`` fixture: each
compiled kernel usable on this CPU (through the extension's ``impl`` hook) and
the numpy fallback. Buffers of awkward sizes and alignments check the kernels'
heads and tails; staging checks that every dtype, strided views, 0-element
tensors and sizes that are no multiple of any block size come back bit-exact,
in both staging modes, and that the checkpoint keeps the values at call time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex

import shardckpt
from shardckpt.engine import staging
from shardckpt.engine.staging import StagingPool
from shardckpt.native import copy as _copy_shim

try:
    from shardckpt.native import _copy as _ext
except ImportError:  # reported by test_compiled_extension_is_active
    _ext = None

pytestmark = pytest.mark.filterwarnings("ignore:shardckpt is using the slow numpy:RuntimeWarning")

NUMPY_FORCED = os.environ.get("SHARDCKPT_FORCE_NUMPY_COPY", "").strip().lower() in (
    "1",
    "true",
    "yes",
    "on",
)
MiB = 1 << 20


@dataclass(frozen=True)
class Backend:
    name: str
    copy: Callable[..., None]
    copy_many: Callable[..., None]


def _compiled(kernel: str) -> Backend:
    assert _ext is not None
    return Backend(
        f"compiled-{kernel}",
        lambda d, s, threads=1: _ext.copy(d, s, threads=threads, impl=kernel),
        lambda d, s, threads=1: _ext.copy_many(d, s, threads=threads, impl=kernel),
    )


_BACKENDS = {
    f"compiled-{k}": (lambda k=k: _compiled(k))
    for k in (_ext.available_implementations() if _ext else [])
}
_BACKENDS["numpy"] = lambda: Backend("numpy", _copy_shim._numpy_copy, _copy_shim._numpy_copy_many)
_BACKENDS["active"] = lambda: Backend("active", _copy_shim.copy, _copy_shim.copy_many)


@pytest.fixture(params=list(_BACKENDS))
def backend(request) -> Backend:
    return _BACKENDS[request.param]()


@pytest.fixture(params=[k for k in _BACKENDS if k != "active"])
def staging_backend(request, monkeypatch) -> Backend:
    """Staging itself running on each backend (the shim's functions swapped)."""
    b = _BACKENDS[request.param]()
    monkeypatch.setattr(_copy_shim, "copy", b.copy)
    monkeypatch.setattr(_copy_shim, "copy_many", b.copy_many)
    return b


def _random_bytes(n: int, seed: int) -> bytearray:
    return bytearray(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())


# ---------------------------------------------------------------------------
# The copy functions
# ---------------------------------------------------------------------------

# Around every threshold and block size: 32/64/128/256-byte vectors, 4 KiB
# thread cuts, the 1 MiB streaming threshold, 4 MiB per thread.
SIZES = [0, 1, 31, 32, 33, 63, 64, 65, 255, 256, 257, 4095, 4097, 65537,
         (1 << 20) - 1, (1 << 20) + 3, (9 << 20) + 7]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("offsets", [(0, 0), (1, 0), (0, 7), (13, 45)])
def test_copy_is_exact_at_any_size_and_alignment(backend, n, offsets):
    so, do = offsets
    src = _random_bytes(n + so + 64, n)
    dst = bytearray(n + do + 64)
    before = bytes(dst)
    backend.copy(memoryview(dst)[do : do + n], memoryview(src)[so : so + n])
    assert dst[do : do + n] == src[so : so + n]
    # not one byte outside the destination range is touched
    assert dst[:do] == before[:do] and dst[do + n :] == before[do + n :]


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_threaded_copy_many_is_exact(backend, threads):
    # segments of odd sizes, so thread cuts fall inside segments and between them
    sizes = [5 * MiB + 17, 1, 0, 3 * MiB - 5, 777, 6 * MiB + 4097, 64]
    srcs = [_random_bytes(n, i) for i, n in enumerate(sizes)]
    dsts = [bytearray(n) for n in sizes]
    backend.copy_many(dsts, srcs, threads=threads)
    assert dsts == srcs
    big_src, big_dst = _random_bytes(17 * MiB + 3, 99), bytearray(17 * MiB + 3)
    backend.copy(big_dst, big_src, threads=threads)
    assert big_dst == big_src


def test_copy_many_of_nothing_and_of_many_small_buffers(backend):
    backend.copy_many([], [])
    srcs = [_random_bytes(i % 97, i) for i in range(3000)]  # 3000 tiny copies, one call
    dsts = [bytearray(len(s)) for s in srcs]
    backend.copy_many(dsts, srcs)
    assert dsts == srcs


def test_copy_accepts_any_contiguous_buffer(backend):
    src = np.arange(1000, dtype=np.float64)
    dst = np.zeros(8000, dtype=np.uint8)
    backend.copy(dst, src)  # formats and shapes do not matter, bytes do
    assert np.array_equal(dst.view(np.float64), src)
    d2 = np.zeros((10, 100), dtype=np.float64)
    backend.copy(d2, src)
    assert np.array_equal(d2.ravel(), src)


def test_copy_rejects_bad_arguments(backend):
    with pytest.raises(ValueError, match="same length"):
        backend.copy(bytearray(9), bytes(10))
    with pytest.raises(TypeError):
        backend.copy(bytes(10), bytes(10))  # read-only destination
    with pytest.raises(TypeError):
        backend.copy(bytearray(3), [1, 2, 3])  # not a buffer
    with pytest.raises(BufferError):
        backend.copy(bytearray(50), np.zeros(100, np.uint8)[::2])  # strided source
    with pytest.raises(BufferError):
        backend.copy(np.zeros(100, np.uint8)[::2], bytes(50))  # strided destination
    buf = bytearray(100)
    with pytest.raises(ValueError, match="overlap"):
        backend.copy(memoryview(buf)[10:60], memoryview(buf)[30:80])
    with pytest.raises(ValueError, match="threads"):
        backend.copy(bytearray(4), bytes(4), threads=0)
    with pytest.raises(ValueError, match="same length"):
        backend.copy_many([bytearray(4)], [bytes(4), bytes(4)])
    # a bad pair anywhere: nothing is copied, even the good pairs before it
    good = bytearray(8)
    with pytest.raises(ValueError, match="pair 1"):
        backend.copy_many([good, bytearray(3)], [b"abcdefgh", bytes(4)])
    assert good == bytearray(8)


def test_unknown_or_unsupported_kernel_is_refused():
    if _ext is None:
        pytest.skip("extension not built")
    with pytest.raises(ValueError, match="unknown"):
        _ext.copy(bytearray(8), bytes(8), impl="sse9")
    with pytest.raises(TypeError):
        _ext.copy(bytearray(8), bytes(8), impl=3)


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def test_numpy_fallback_warns_once_and_staging_works():
    proc = _run_python(
        """
        import warnings, torch
        from torch.distributed.checkpoint.metadata import MetadataIndex
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            from shardckpt.native import copy as s
            from shardckpt.engine.staging import StagingPool
            assert s.implementation() == "numpy" and not s.is_compiled()
            pool = StagingPool()
            x = torch.randn(10_000)
            for _ in range(3):
                out = pool.stage([(MetadataIndex("x"), x)])
            view, _ = next(out[MetadataIndex("x")].pieces)
            assert bytes(view) == x.numpy().tobytes()
        slow = [i for i in w if issubclass(i.category, RuntimeWarning)]
        print("COUNT", len(slow), slow[0].message if slow else "")
        """,
        SHARDCKPT_FORCE_NUMPY_COPY="1",
    )
    assert proc.returncode == 0, proc.stderr
    assert "COUNT 1" in proc.stdout and "SHARDCKPT_FORCE_NUMPY_COPY" in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------
# Staging
# ---------------------------------------------------------------------------

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
          torch.complex128, torch.uint16, torch.uint32, torch.uint64,
          torch.float8_e4m3fn, torch.float8_e5m2]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (every byte random, NaNs included)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    n = int(np.prod(shape)) if shape else 1
    raw = torch.from_numpy(np.frombuffer(_random_bytes(n * itemsize, seed), dtype=np.uint8).copy())
    if dtype == torch.bool:
        return (raw % 2).to(torch.bool).reshape(shape)
    return raw.view(dtype).reshape(shape)


def _state() -> list[tuple[MetadataIndex, torch.Tensor]]:
    items: list[tuple[str, torch.Tensor]] = []
    for i, dt in enumerate(DTYPES):
        items.append((f"{dt}", _sample(dt, (37, 11), i)))  # 407 elements: no block multiple
    big = _sample(torch.float32, (1000, 1037), 100)  # > the streaming threshold, odd size
    items += [
        ("big", big),
        ("col", big[:, 5]),  # strided view
        ("t", _sample(torch.float64, (64, 33), 101).t()),  # transposed
        ("offset", big.view(-1)[3:1_000_003]),  # contiguous view at an odd byte offset
        ("empty", torch.empty(0, 5)),
        ("empty_bf16", torch.empty(3, 0, dtype=torch.bfloat16)),
        ("scalar", torch.tensor(2.5)),
        ("conj", _sample(torch.complex64, (50,), 102).conj()),  # lazy conjugate view
        ("neg", _sample(torch.complex128, (50,), 103).conj().imag),  # lazy negative view
        ("param", torch.nn.Parameter(torch.randn(33, 3))),
        ("expanded", torch.arange(7.0).expand(5, 7)),  # stride 0
    ]
    return [(MetadataIndex(fqn=k), t) for k, t in items]


def _scramble(t: torch.Tensor) -> None:
    """Change every element of ``t`` in place (as a training step would)."""
    with torch.no_grad():
        if t.is_contiguous():
            t.reshape(-1).view(torch.uint8).bitwise_not_()
        else:
            t.zero_()


def _bytes_of(t: torch.Tensor) -> bytes:
    c = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return c.view(torch.uint8).numpy().tobytes() if c.numel() else b""


def _staged_bytes(st: staging.StagedTensor) -> tuple[bytes, list]:
    parts, releases = [], []
    for view, release in st.pieces:
        parts.append(bytes(view))
        releases.append(release)
    return b"".join(parts), releases


def test_stage_copies_every_dtype_and_layout_exactly(staging_backend):
    items = _state()
    expected = {i: _bytes_of(t) for i, t in items}
    pool = StagingPool()
    for _ in range(2):  # the second save reuses the buffers
        staged = pool.stage(items)
        for index, t in items:
            st = staged[index]
            got, _ = _staged_bytes(st)
            assert st.dtype == t.dtype and st.nbytes == len(expected[index]), index.fqn
            assert got == expected[index], index.fqn


def test_stage_is_a_snapshot(staging_backend):
    items = [(i, t) for i, t in _state() if t.numel() and not t.is_conj() and not t.is_neg()
             and t.dtype != torch.bool and t.stride() != (0, 1)]
    expected = {i: _bytes_of(t) for i, t in items}
    pool = StagingPool()
    staged = pool.stage(items)
    for _, t in items:
        _scramble(t)
    for index, _ in items:
        assert _staged_bytes(staged[index])[0] == expected[index], index.fqn


def test_contiguous_cpu_tensors_go_through_one_batched_copy(monkeypatch):
    calls: list[int] = []
    real = _copy_shim.copy_many

    def counting(dsts, srcs, threads=1):
        calls.append(len(dsts))
        real(dsts, srcs, threads=threads)

    monkeypatch.setattr(_copy_shim, "copy_many", counting)
    items = _state()
    fast = [t for _, t in items if staging._host_bytes(t) is not None and t.numel()]
    StagingPool().stage(items)
    assert calls == [len(fast)]
    # the ones that need strides or lazy views went through torch instead
    slow = {i.fqn for i, t in items if staging._host_bytes(t) is None}
    assert {"col", "t", "conj", "neg", "expanded"} <= slow
    assert not {"big", "offset", "param", "scalar", str(torch.bfloat16)} & slow


@pytest.mark.parametrize("budget", [4096, 64 << 10, 3 * MiB + 5])
def test_slab_stream_copies_every_dtype_and_layout_exactly(staging_backend, budget):
    items = _state()
    expected = {i: _bytes_of(t) for i, t in items}
    pool = StagingPool()
    stream = pool.stream(items, budget)
    got: dict[MetadataIndex, bytes] = {}

    def consume() -> None:  # the writer: reads each piece, then hands its slab back
        for index, _ in items:
            parts = []
            for view, release in stream.staged[index].pieces:
                assert len(view) <= max(budget // 2, 1 << 12)
                parts.append(bytes(view))
                if release is not None:
                    release()
            got[index] = b"".join(parts)

    th = threading.Thread(target=consume, daemon=True)  # a failed produce() must not hang exit
    th.start()
    stream.produce()
    th.join(60)
    assert not th.is_alive()
    assert pool.held_bytes <= max(budget, 2 << 12)
    for index, _ in items:
        assert got[index] == expected[index], index.fqn


def test_copy_threads_follows_torch_and_cpus(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    assert 1 <= staging.copy_threads() <= (os.cpu_count() or 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert staging.copy_threads() == 1


@pytest.mark.parametrize("budget", [None, 8192])
def test_async_save_of_every_dtype_holds_values_at_call_time(tmp_path, staging_backend, budget):
    sd = {i.fqn.replace(".", "_"): t.clone() if not t.is_conj() and not t.is_neg() else t
          for i, t in _state() if i.fqn not in ("expanded",)}
    sd["nc"] = sd["big"][:, 3]
    expected = {k: v.detach().resolve_conj().resolve_neg().clone() for k, v in sd.items()}
    with shardckpt.AsyncCheckpointer() as ckpt:
        with shardckpt.knobs.override(chunk_bytes=1 << 16):
            h = ckpt.async_save(sd, tmp_path / "c", staging_budget_bytes=budget)
        for v in sd.values():
            if v.numel() and not v.is_conj() and not v.is_neg():
                _scramble(v)
        h.result()
    out = {k: torch.zeros_like(v) for k, v in expected.items()}
    shardckpt.load(out, tmp_path / "c")
    for k, v in expected.items():
        assert _bytes_of(out[k]) == _bytes_of(v), k
    shardckpt.verify(tmp_path / "c")


def test_a_failed_staging_copy_releases_the_writer(tmp_path, monkeypatch):
    """Budgeted mode: the caller's copy fails midway; the background write must end
    (in an error, nothing committed), not wait forever for slabs that never come."""
    import shardckpt
    from shardckpt.engine import staging

    calls = {"n": 0}
    real = staging.SlabStream._filler

    def failing(self, t, slab_views, threads):
        fill = real(self, t, slab_views, threads)

        def f(slab, start, n):
            calls["n"] += 1
            if calls["n"] == 3:
                raise MemoryError("simulated copy failure")
            fill(slab, start, n)

        return f

    monkeypatch.setattr(staging.SlabStream, "_filler", failing)
    sd = {f"t{i}": torch.arange(4096, dtype=torch.float32) + i for i in range(4)}
    with shardckpt.AsyncCheckpointer() as ckpt:
        with pytest.raises((MemoryError, shardckpt.CheckpointWriteError)):
            h = ckpt.async_save(sd, tmp_path / "c", staging_budget_bytes=8192)
            h.result()
        with pytest.raises(shardckpt.CheckpointWriteError):
            ckpt.wait()  # the background part ended too, with an error
    assert not (tmp_path / "c" / "manifest.json").exists()
