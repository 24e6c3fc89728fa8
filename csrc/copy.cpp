// shardckpt._copy -- bulk memory copy for async-save staging.
//
// Plain CPython C API + buffer protocol; no libtorch, no pybind11.
//
// copy(dst, src) and copy_many(dsts, srcs) copy C-contiguous buffers of equal
// length, with the GIL released (once per call for copy_many), optionally
// split over a few threads.
//
// Why not torch.Tensor.copy_ or memcpy: the blocking part of an async save is
// copying every tensor a rank writes into staging buffers that are much larger
// than the caches and are read again only later, by the background writer.
// A copy with ordinary stores reads each destination line before writing it
// (read-for-ownership): 3 bytes of memory traffic per byte copied, and the
// destination then evicts lines the training process still wants. Streaming
// (non-temporal) stores write whole lines without reading them: 2 bytes of
// traffic per byte, which is what the copy is bounded by when several ranks
// share a socket's memory bandwidth. torch's copy_ also splits a large copy
// over its intra-op threads, which only adds contention when every core
// already runs a rank; here the caller picks the thread count.
//
// Kernels (selected at import time with __builtin_cpu_supports, best first):
//   "avx512"  64-byte unaligned loads, 64-byte aligned streaming stores.
//   "avx2"    32-byte unaligned loads, 32-byte aligned streaming stores.
//   "memcpy"  libc memcpy (any CPU); also used by every kernel for copies
//             below kStreamThreshold, the unaligned head and the tail.
// SIMD code uses per-function target attributes, so the module needs no -m
// flags and loads on any x86-64 (and builds elsewhere with just "memcpy";
// SHARDCKPT_PORTABLE_ONLY forces that on x86 too).
//
// Streaming pays off only when the destination will not be read back from
// cache soon: a call whose total size is below kStreamThreshold (comparable
// to a core's L2) uses memcpy, whose stores keep the bytes in cache.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "pyext_common.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <thread>
#include <vector>


namespace {

// A call copying fewer bytes than this in total uses memcpy (bytes stay cached).
constexpr size_t kStreamThreshold = 1 << 20;
// Below this many bytes the GIL round trip costs more than it frees.
constexpr Py_ssize_t kReleaseGilThreshold = 64 * 1024;
// Each extra thread gets at least this much work (a thread start is ~20-50 us,
// i.e. about 256 KiB of copying; 4 MiB keeps that overhead under ~10%).
constexpr size_t kMinBytesPerThread = 4 << 20;
constexpr long kMaxThreads = 64;

using CopyFn = void (*)(uint8_t* dst, const uint8_t* src, size_t n);

void copy_memcpy(uint8_t* d, const uint8_t* s, size_t n) {
    if (n != 0) std::memcpy(d, s, n);
}

#if SHARDCKPT_X86

// Copy `head` bytes so that d becomes `align`-aligned; returns the bytes done.
inline size_t align_head(uint8_t* d, const uint8_t* s, size_t n, size_t align) {
    size_t head = (align - (reinterpret_cast<uintptr_t>(d) & (align - 1))) & (align - 1);
    head = std::min(head, n);
    if (head != 0) std::memcpy(d, s, head);
    return head;
}

#define AVX2_FN __attribute__((target("avx2")))
#define AVX512_FN __attribute__((target("avx512f")))

AVX2_FN void copy_stream_avx2(uint8_t* d, const uint8_t* s, size_t n) {
    const size_t head = align_head(d, s, n, 32);
    d += head;
    s += head;
    n -= head;
    // 4 vectors (2 cache lines) per iteration: loads issued before stores so
    // the load stream runs ahead of the write-combining buffers.
    for (; n >= 128; n -= 128, s += 128, d += 128) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 32));
        const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 64));
        const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 96));
        _mm256_stream_si256(reinterpret_cast<__m256i*>(d), a);
        _mm256_stream_si256(reinterpret_cast<__m256i*>(d + 32), b);
        _mm256_stream_si256(reinterpret_cast<__m256i*>(d + 64), c);
        _mm256_stream_si256(reinterpret_cast<__m256i*>(d + 96), e);
    }
    for (; n >= 32; n -= 32, s += 32, d += 32) {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(d),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
    }
    // Streaming stores are weakly ordered: fence so that the bytes are visible
    // to other threads (the background writer) once the call returns.
    _mm_sfence();
    if (n != 0) std::memcpy(d, s, n);
}

AVX512_FN void copy_stream_avx512(uint8_t* d, const uint8_t* s, size_t n) {
    const size_t head = align_head(d, s, n, 64);
    d += head;
    s += head;
    n -= head;
    for (; n >= 256; n -= 256, s += 256, d += 256) {
        const __m512i a = _mm512_loadu_si512(s);
        const __m512i b = _mm512_loadu_si512(s + 64);
        const __m512i c = _mm512_loadu_si512(s + 128);
        const __m512i e = _mm512_loadu_si512(s + 192);
        _mm512_stream_si512(reinterpret_cast<__m512i*>(d), a);
        _mm512_stream_si512(reinterpret_cast<__m512i*>(d + 64), b);
        _mm512_stream_si512(reinterpret_cast<__m512i*>(d + 128), c);
        _mm512_stream_si512(reinterpret_cast<__m512i*>(d + 192), e);
    }
    for (; n >= 64; n -= 64, s += 64, d += 64) {
        _mm512_stream_si512(reinterpret_cast<__m512i*>(d), _mm512_loadu_si512(s));
    }
    _mm_sfence();
    if (n != 0) std::memcpy(d, s, n);
}

#endif  // SHARDCKPT_X86

struct Impl {
    const char* name;
    bool supported;
    CopyFn stream;  // used for calls of at least kStreamThreshold bytes
};

Impl g_impls[] = {
#if SHARDCKPT_X86
    {"avx512", false, copy_stream_avx512},
    {"avx2", false, copy_stream_avx2},
#endif
    {"memcpy", true, copy_memcpy},
};
constexpr size_t kNumImpls = sizeof(g_impls) / sizeof(g_impls[0]);
const Impl* g_active = &g_impls[kNumImpls - 1];

void detect_cpu() {
#if SHARDCKPT_X86
    __builtin_cpu_init();
    g_impls[0].supported = __builtin_cpu_supports("avx512f");
    g_impls[1].supported = __builtin_cpu_supports("avx2");
#endif
    for (size_t i = 0; i < kNumImpls; ++i) {
        if (g_impls[i].supported) {
            g_active = &g_impls[i];
            break;
        }
    }
}

// One (dst, src, n) copy of a call.
struct Segment {
    uint8_t* dst;
    const uint8_t* src;
    size_t n;
};

// Copy [begin, end) of the concatenation of `segs` (prefix[i] = bytes before segs[i]).
void copy_range(const std::vector<Segment>& segs, const std::vector<size_t>& prefix,
                size_t begin, size_t end, CopyFn fn) {
    size_t i = static_cast<size_t>(
        std::upper_bound(prefix.begin(), prefix.end(), begin) - prefix.begin() - 1);
    for (; i < segs.size() && prefix[i] < end; ++i) {
        const size_t lo = std::max(begin, prefix[i]) - prefix[i];
        const size_t hi = std::min(end, prefix[i] + segs[i].n) - prefix[i];
        if (hi > lo) fn(segs[i].dst + lo, segs[i].src + lo, hi - lo);
    }
}

// Runs without the GIL. If a thread cannot be started, the calling thread
// copies its share too, so the copy is always complete.
void run_copy(const std::vector<Segment>& segs, const Impl* impl, long threads) {
    size_t total = 0;
    std::vector<size_t> prefix(segs.size());
    for (size_t i = 0; i < segs.size(); ++i) {
        prefix[i] = total;
        total += segs[i].n;
    }
    if (total == 0) return;
    const CopyFn fn = total >= kStreamThreshold ? impl->stream : copy_memcpy;
    size_t nthreads = std::min<size_t>(static_cast<size_t>(threads),
                                       std::max<size_t>(1, total / kMinBytesPerThread));
    if (nthreads <= 1) {
        for (const Segment& sg : segs) fn(sg.dst, sg.src, sg.n);
        return;
    }
    // Equal shares, cut at 4 KiB so no two threads write into the same page.
    auto cut = [&](size_t k) {
        if (k >= nthreads) return total;
        return std::min(total, (total / nthreads * k) & ~static_cast<size_t>(4095));
    };
    std::vector<std::thread> pool;
    pool.reserve(nthreads - 1);
    size_t k = 1;
    try {
        for (; k < nthreads; ++k) {
            pool.emplace_back(copy_range, std::cref(segs), std::cref(prefix), cut(k), cut(k + 1),
                              fn);
        }
    } catch (const std::exception&) {
        // Could not start thread k: this thread copies the rest as well.
    }
    copy_range(segs, prefix, 0, cut(1), fn);
    if (k < nthreads) copy_range(segs, prefix, cut(k), total, fn);
    for (std::thread& t : pool) t.join();
}

// ---------------------------------------------------------------------------
// Python glue.
// ---------------------------------------------------------------------------

using shardckpt_ext::get_buffer;
using shardckpt_ext::overlaps;
using shardckpt_ext::parse_args;

const Impl* pick_impl(PyObject* impl) {
    return shardckpt_ext::pick_impl(impl, g_active, g_impls, kNumImpls, "copy");
}

int parse_threads(PyObject* obj, long* threads) {
    if (obj == nullptr || obj == Py_None) {
        *threads = 1;
        return 0;
    }
    const long t = PyLong_AsLong(obj);
    if (t == -1 && PyErr_Occurred()) return -1;
    if (t < 1 || t > kMaxThreads) {
        PyErr_Format(PyExc_ValueError, "threads must be in 1..%ld, not %ld", kMaxThreads, t);
        return -1;
    }
    *threads = t;
    return 0;
}

// Views acquired for one call, released on every exit path.
struct Views {
    std::vector<Py_buffer> bufs;
    ~Views() {
        for (Py_buffer& b : bufs) PyBuffer_Release(&b);
    }
};

// Acquire dst/src views into `views`, check them and append a segment. -1 on error.
int add_pair(const char* fname, Py_ssize_t index, PyObject* dst, PyObject* src, Views& views,
             std::vector<Segment>& segs) {
    Py_buffer d, s;
    if (get_buffer(dst, &d, true, "dst") < 0) return -1;
    views.bufs.push_back(d);
    if (get_buffer(src, &s, false, "src") < 0) return -1;
    views.bufs.push_back(s);
    const char* err = nullptr;
    if (d.len != s.len) {
        err = "dst and src must have the same length";
    } else if (overlaps(d.buf, d.len, s.buf, s.len)) {
        err = "dst and src must not overlap";
    }
    if (err != nullptr) {
        if (index < 0) {
            PyErr_Format(PyExc_ValueError, "%s(): %s (len(dst)=%zd, len(src)=%zd)", fname, err,
                         d.len, s.len);
        } else {
            PyErr_Format(PyExc_ValueError, "%s(): pair %zd: %s (len(dst)=%zd, len(src)=%zd)",
                         fname, index, err, d.len, s.len);
        }
        return -1;
    }
    segs.push_back({static_cast<uint8_t*>(d.buf), static_cast<const uint8_t*>(s.buf),
                    static_cast<size_t>(s.len)});
    return 0;
}

void copy_segments(const std::vector<Segment>& segs, const Impl* impl, long threads) {
    size_t total = 0;
    for (const Segment& sg : segs) total += sg.n;
    if (total >= static_cast<size_t>(kReleaseGilThreshold)) {
        Py_BEGIN_ALLOW_THREADS run_copy(segs, impl, threads);
        Py_END_ALLOW_THREADS
    } else {
        run_copy(segs, impl, threads);
    }
}

PyObject* py_copy(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
    static const char* const names[] = {"dst", "src", "threads", "impl"};
    PyObject* a[4];
    if (parse_args("copy", args, nargs, kwnames, names, 4, 2, a) < 0) return nullptr;
    long threads;
    if (parse_threads(a[2], &threads) < 0) return nullptr;
    const Impl* impl = pick_impl(a[3]);
    if (impl == nullptr) return nullptr;
    Views views;
    std::vector<Segment> segs;
    views.bufs.reserve(2);
    if (add_pair("copy", -1, a[0], a[1], views, segs) < 0) return nullptr;
    copy_segments(segs, impl, threads);
    Py_RETURN_NONE;
}

PyObject* py_copy_many(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
    static const char* const names[] = {"dsts", "srcs", "threads", "impl"};
    PyObject* a[4];
    if (parse_args("copy_many", args, nargs, kwnames, names, 4, 2, a) < 0) return nullptr;
    long threads;
    if (parse_threads(a[2], &threads) < 0) return nullptr;
    const Impl* impl = pick_impl(a[3]);
    if (impl == nullptr) return nullptr;
    PyObject* dsts = PySequence_Fast(a[0], "copy_many(): dsts must be a sequence");
    if (dsts == nullptr) return nullptr;
    PyObject* srcs = PySequence_Fast(a[1], "copy_many(): srcs must be a sequence");
    if (srcs == nullptr) {
        Py_DECREF(dsts);
        return nullptr;
    }
    PyObject* result = nullptr;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(dsts);
    if (PySequence_Fast_GET_SIZE(srcs) != n) {
        PyErr_Format(PyExc_ValueError,
                     "copy_many(): dsts and srcs must have the same length (%zd != %zd)", n,
                     PySequence_Fast_GET_SIZE(srcs));
    } else {
        Views views;
        std::vector<Segment> segs;
        views.bufs.reserve(static_cast<size_t>(2 * n));
        segs.reserve(static_cast<size_t>(n));
        Py_ssize_t i = 0;
        for (; i < n; ++i) {
            if (add_pair("copy_many", i, PySequence_Fast_GET_ITEM(dsts, i),
                         PySequence_Fast_GET_ITEM(srcs, i), views, segs) < 0)
                break;
        }
        if (i == n) {
            copy_segments(segs, impl, threads);
            Py_INCREF(Py_None);
            result = Py_None;
        }
    }
    Py_DECREF(dsts);
    Py_DECREF(srcs);
    return result;
}

SHARDCKPT_IMPL_INTROSPECTION(g_active, g_impls, kNumImpls)

PyMethodDef g_methods[] = {
    {"copy", FASTCALL_KW(py_copy), METH_FASTCALL | METH_KEYWORDS,
     "copy(dst, src, threads=1, impl=None) -> None\n\n"
     "Copy the C-contiguous buffer src into the writable C-contiguous buffer dst\n"
     "(same length, not overlapping), GIL released, on up to `threads` threads.\n"
     "impl names a kernel (testing hook); None uses the best one."},
    {"copy_many", FASTCALL_KW(py_copy_many), METH_FASTCALL | METH_KEYWORDS,
     "copy_many(dsts, srcs, threads=1, impl=None) -> None\n\n"
     "copy(dsts[i], srcs[i]) for every i, all buffers checked before any byte is\n"
     "copied, in one call that releases the GIL once."},
    SHARDCKPT_IMPL_METHODS("copy()/copy_many()"),
    {nullptr, nullptr, 0, nullptr},
};

SHARDCKPT_MODULE_DEF(g_module, "shardckpt.native._copy",
                     "Bulk copy between contiguous buffers with streaming stores, GIL released.",
                     g_methods);

}  // namespace

PyMODINIT_FUNC PyInit__copy(void) {
    detect_cpu();
    return PyModule_Create(&g_module);
}
