// shardckpt._bytegroup -- byte grouping ("byte shuffle") of fixed-width elements.
//
// Plain CPython C API + buffer protocol; no libtorch, no pybind11.
//
// group(src, dst, width) splits n elements of `width` bytes (2, 4 or 8) into
// `width` contiguous planes of n bytes each: dst[k*n + i] = src[i*width + k],
// i.e. plane k holds byte k (in memory order, so for little-endian floats the
// last plane holds the sign and high exponent bits) of every element.
// ungroup(src, dst, width) is the inverse, and ungroup_planes(planes, dst)
// the inverse taking the planes as separate buffers (so a decoder can
// interleave decompressed planes and raw slices of the stored bytes straight
// into the destination without first gathering them into one buffer).
//
// Why: the exponent bytes of floating-point tensors are highly compressible
// while the low mantissa bytes are noise; a general-purpose compressor sees
// them interleaved and can do little. Grouped, each plane can be entropy coded
// (or stored raw) on its own. The transform must cost much less than the
// compressor, so it runs at (cache) memory speed.
//
// Kernels (selected at import time with __builtin_cpu_supports, best first):
//   "avx512vbmi"  64-byte vpermt2b gathers planes from pairs of registers,
//                 then 128/256-bit lane shuffles finish the transpose.
//   "avx2"        per-lane pshufb splits each 16-byte lane into planes, then
//                 unpack / permute instructions transpose across registers.
//   "scalar"      portable byte loop (any CPU, any endianness).
// All SIMD code is compiled with per-function target attributes, so the module
// needs no -m flags and loads on any x86-64 (and builds elsewhere with just the
// scalar kernel; SHARDCKPT_PORTABLE_ONLY forces that on x86 too). The vector
// kernels handle whole blocks of 32 or 64 elements; the scalar kernel finishes
// the tail, so any element count works.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "pyext_common.h"

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(SHARDCKPT_PORTABLE_ONLY)
#define SHARDCKPT_X86 1
#include <immintrin.h>
#if !defined(__clang__)
// GCC 12 reports the deliberately undefined pass-through operand inside the
// AVX-512 shuffle intrinsics (_mm512_undefined_epi32) as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#else
#define SHARDCKPT_X86 0
#endif

namespace {

constexpr int kMaxWidth = 8;

// A kernel moves elements [0, n) between an interleaved buffer and `width`
// plane pointers. Planes never alias the interleaved buffer (checked by the
// Python glue).
using GroupFn = void (*)(const uint8_t* src, uint8_t* const* planes, size_t n);
using UngroupFn = void (*)(const uint8_t* const* planes, uint8_t* dst, size_t n);

// ---------------------------------------------------------------------------
// Portable scalar kernels (also used for the tails of the vector kernels).
// ---------------------------------------------------------------------------

template <int W>
void group_tail(const uint8_t* src, uint8_t* const* planes, size_t begin, size_t n) {
    for (size_t i = begin; i < n; ++i) {
        const uint8_t* e = src + i * W;
        for (int k = 0; k < W; ++k) planes[k][i] = e[k];
    }
}

template <int W>
void ungroup_tail(const uint8_t* const* planes, uint8_t* dst, size_t begin, size_t n) {
    for (size_t i = begin; i < n; ++i) {
        uint8_t* e = dst + i * W;
        for (int k = 0; k < W; ++k) e[k] = planes[k][i];
    }
}

// The scalar kernels work on blocks of 8 elements so that every plane gets
// one 8-byte store (group) / load (ungroup) per block, which the compiler
// keeps in registers; ~4-5x faster than the plain byte loop.
template <int W>
void group_scalar(const uint8_t* src, uint8_t* const* planes, size_t n) {
    const size_t nblk = n / 8 * 8;
    for (size_t i = 0; i < nblk; i += 8) {
        uint8_t tmp[W][8];
        const uint8_t* e = src + i * W;
        for (int j = 0; j < 8; ++j)
            for (int k = 0; k < W; ++k) tmp[k][j] = e[j * W + k];
        for (int k = 0; k < W; ++k) std::memcpy(planes[k] + i, tmp[k], 8);
    }
    group_tail<W>(src, planes, nblk, n);
}

template <int W>
void ungroup_scalar(const uint8_t* const* planes, uint8_t* dst, size_t n) {
    const size_t nblk = n / 8 * 8;
    for (size_t i = 0; i < nblk; i += 8) {
        uint8_t tmp[W][8];
        for (int k = 0; k < W; ++k) std::memcpy(tmp[k], planes[k] + i, 8);
        uint8_t* e = dst + i * W;
        for (int j = 0; j < 8; ++j)
            for (int k = 0; k < W; ++k) e[j * W + k] = tmp[k][j];
    }
    ungroup_tail<W>(planes, dst, nblk, n);
}

#if SHARDCKPT_X86

// ---------------------------------------------------------------------------
// AVX2 kernels: 32 elements per step, 32 bytes per plane.
// ---------------------------------------------------------------------------

#define AVX2_FN __attribute__((target("avx2")))

AVX2_FN inline __m256i load256(const uint8_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
AVX2_FN inline void store256(uint8_t* p, __m256i v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
}
// [lo 16 bytes from p | hi 16 bytes from q]
AVX2_FN inline __m256i load2x128(const uint8_t* p, const uint8_t* q) {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}
AVX2_FN inline void store2x128(uint8_t* p, uint8_t* q, __m256i v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm256_extracti128_si256(v, 1));
}
AVX2_FN inline __m256i lanes_mask(const int8_t (&m)[16]) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(m));
    return _mm256_broadcastsi128_si256(x);
}

// Byte permutations within a 16-byte lane.
alignas(16) constexpr int8_t kEvenOdd[16] = {0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15};
alignas(16) constexpr int8_t kTranspose4[16] = {0, 4, 8, 12, 1, 5, 9, 13,
                                                2, 6, 10, 14, 3, 7, 11, 15};  // self-inverse
alignas(16) constexpr int8_t kPairs8[16] = {0, 8, 1, 9, 2, 10, 3, 11,
                                            4, 12, 5, 13, 6, 14, 7, 15};  // inverse: kEvenOdd

AVX2_FN void group2_avx2(const uint8_t* src, uint8_t* const* planes, size_t n) {
    const __m256i m = lanes_mask(kEvenOdd);
    uint8_t* p0 = planes[0];
    uint8_t* p1 = planes[1];
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        // each lane -> [8 low bytes | 8 high bytes]; then gather qwords across lanes
        __m256i a = _mm256_shuffle_epi8(load256(src + 2 * i), m);
        __m256i b = _mm256_shuffle_epi8(load256(src + 2 * i + 32), m);
        a = _mm256_permute4x64_epi64(a, 0xD8);  // [lo0 lo1 hi0 hi1]
        b = _mm256_permute4x64_epi64(b, 0xD8);
        store256(p0 + i, _mm256_permute2x128_si256(a, b, 0x20));
        store256(p1 + i, _mm256_permute2x128_si256(a, b, 0x31));
    }
    group_tail<2>(src, planes, i, n);
}

AVX2_FN void ungroup2_avx2(const uint8_t* const* planes, uint8_t* dst, size_t n) {
    const uint8_t* p0 = planes[0];
    const uint8_t* p1 = planes[1];
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m256i a = load256(p0 + i);
        const __m256i b = load256(p1 + i);
        const __m256i lo = _mm256_unpacklo_epi8(a, b);  // elements [0,8) | [16,24)
        const __m256i hi = _mm256_unpackhi_epi8(a, b);  // elements [8,16) | [24,32)
        store256(dst + 2 * i, _mm256_permute2x128_si256(lo, hi, 0x20));
        store256(dst + 2 * i + 32, _mm256_permute2x128_si256(lo, hi, 0x31));
    }
    ungroup_tail<2>(planes, dst, i, n);
}

AVX2_FN void group4_avx2(const uint8_t* src, uint8_t* const* planes, size_t n) {
    const __m256i m = lanes_mask(kTranspose4);
    const __m256i spread = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i r[4];
        for (int j = 0; j < 4; ++j) {
            // lane: 4 dwords = planes 0..3 of 4 elements; after the dword
            // permute, qword k = plane k of the register's 8 elements.
            r[j] = _mm256_shuffle_epi8(load256(src + 4 * i + 32 * j), m);
            r[j] = _mm256_permutevar8x32_epi32(r[j], spread);
        }
        // 4x4 transpose of qwords.
        const __m256i t0 = _mm256_unpacklo_epi64(r[0], r[1]);  // P0 P0 | P2 P2
        const __m256i t1 = _mm256_unpackhi_epi64(r[0], r[1]);  // P1 P1 | P3 P3
        const __m256i t2 = _mm256_unpacklo_epi64(r[2], r[3]);
        const __m256i t3 = _mm256_unpackhi_epi64(r[2], r[3]);
        store256(planes[0] + i, _mm256_permute2x128_si256(t0, t2, 0x20));
        store256(planes[1] + i, _mm256_permute2x128_si256(t1, t3, 0x20));
        store256(planes[2] + i, _mm256_permute2x128_si256(t0, t2, 0x31));
        store256(planes[3] + i, _mm256_permute2x128_si256(t1, t3, 0x31));
    }
    group_tail<4>(src, planes, i, n);
}

AVX2_FN void ungroup4_avx2(const uint8_t* const* planes, uint8_t* dst, size_t n) {
    const __m256i m = lanes_mask(kTranspose4);
    const __m256i gather = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);  // inverse of spread
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m256i o0 = load256(planes[0] + i);
        const __m256i o1 = load256(planes[1] + i);
        const __m256i o2 = load256(planes[2] + i);
        const __m256i o3 = load256(planes[3] + i);
        const __m256i t0 = _mm256_permute2x128_si256(o0, o2, 0x20);
        const __m256i t2 = _mm256_permute2x128_si256(o0, o2, 0x31);
        const __m256i t1 = _mm256_permute2x128_si256(o1, o3, 0x20);
        const __m256i t3 = _mm256_permute2x128_si256(o1, o3, 0x31);
        __m256i r[4] = {_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1),
                        _mm256_unpacklo_epi64(t2, t3), _mm256_unpackhi_epi64(t2, t3)};
        for (int j = 0; j < 4; ++j) {
            r[j] = _mm256_permutevar8x32_epi32(r[j], gather);
            store256(dst + 4 * i + 32 * j, _mm256_shuffle_epi8(r[j], m));
        }
    }
    ungroup_tail<4>(planes, dst, i, n);
}

// 8x8 transpose of 16-bit words, independently in each 128-bit lane.
AVX2_FN inline void transpose8x16_lanes(__m256i (&a)[8]) {
    __m256i b[8], c[8];
    for (int j = 0; j < 4; ++j) {
        b[2 * j] = _mm256_unpacklo_epi16(a[2 * j], a[2 * j + 1]);
        b[2 * j + 1] = _mm256_unpackhi_epi16(a[2 * j], a[2 * j + 1]);
    }
    c[0] = _mm256_unpacklo_epi32(b[0], b[2]);
    c[1] = _mm256_unpackhi_epi32(b[0], b[2]);
    c[2] = _mm256_unpacklo_epi32(b[1], b[3]);
    c[3] = _mm256_unpackhi_epi32(b[1], b[3]);
    c[4] = _mm256_unpacklo_epi32(b[4], b[6]);
    c[5] = _mm256_unpackhi_epi32(b[4], b[6]);
    c[6] = _mm256_unpacklo_epi32(b[5], b[7]);
    c[7] = _mm256_unpackhi_epi32(b[5], b[7]);
    for (int j = 0; j < 4; ++j) {
        a[2 * j] = _mm256_unpacklo_epi64(c[j], c[j + 4]);
        a[2 * j + 1] = _mm256_unpackhi_epi64(c[j], c[j + 4]);
    }
}

AVX2_FN void group8_avx2(const uint8_t* src, uint8_t* const* planes, size_t n) {
    const __m256i m = lanes_mask(kPairs8);
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        // Register j holds element pairs j (lane 0) and j + 8 (lane 1); after
        // pshufb, word k of a lane is byte k of both elements of its pair.
        const uint8_t* s = src + 8 * i;
        __m256i a[8];
        for (int j = 0; j < 8; ++j)
            a[j] = _mm256_shuffle_epi8(load2x128(s + 16 * j, s + 16 * (j + 8)), m);
        transpose8x16_lanes(a);  // a[k] = plane k: elements [0,16) | [16,32)
        for (int k = 0; k < 8; ++k) store256(planes[k] + i, a[k]);
    }
    group_tail<8>(src, planes, i, n);
}

AVX2_FN void ungroup8_avx2(const uint8_t* const* planes, uint8_t* dst, size_t n) {
    const __m256i m = lanes_mask(kEvenOdd);
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i a[8];
        for (int k = 0; k < 8; ++k) a[k] = load256(planes[k] + i);
        transpose8x16_lanes(a);  // the transpose is its own inverse
        uint8_t* d = dst + 8 * i;
        for (int j = 0; j < 8; ++j)
            store2x128(d + 16 * j, d + 16 * (j + 8), _mm256_shuffle_epi8(a[j], m));
    }
    ungroup_tail<8>(planes, dst, i, n);
}

// ---------------------------------------------------------------------------
// AVX-512 VBMI kernels: 64 elements per step, 64 bytes per plane.
// ---------------------------------------------------------------------------

#define VBMI_FN __attribute__((target("avx512f,avx512bw,avx512vbmi")))

struct VbmiTables {
    uint8_t g2[2][64];    // group 2: plane k <- (a, b)
    uint8_t u2[2][64];    // ungroup 2: element half h <- (p0, p1)
    uint8_t g4[2][64];    // group 4: [plane 2h | plane 2h+1] of 32 elements <- (r0, r1)
    uint8_t u4[2][64];    // ungroup 4: 16 elements (half h) <- ([P0|P1], [P2|P3])
    uint8_t g8[2][64];    // group 8: planes 4h..4h+3 of 16 elements <- (r0, r1)
    uint8_t u8[2][64];    // ungroup 8: 8 elements (half h) <- (S0, S1)
    constexpr VbmiTables() : g2{}, u2{}, g4{}, u4{}, g8{}, u8{} {
        for (int h = 0; h < 2; ++h) {
            for (int i = 0; i < 64; ++i) g2[h][i] = static_cast<uint8_t>(2 * i + h);
            for (int e = 0; e < 32; ++e) {
                u2[h][2 * e] = static_cast<uint8_t>(32 * h + e);
                u2[h][2 * e + 1] = static_cast<uint8_t>(64 + 32 * h + e);
            }
            for (int k = 0; k < 2; ++k)
                for (int e = 0; e < 32; ++e)
                    g4[h][32 * k + e] = static_cast<uint8_t>(4 * e + 2 * h + k);
            for (int e = 0; e < 16; ++e)
                for (int k = 0; k < 4; ++k)
                    u4[h][4 * e + k] =
                        static_cast<uint8_t>((k >= 2 ? 64 : 0) + 32 * (k & 1) + 16 * h + e);
            for (int k = 0; k < 4; ++k)
                for (int e = 0; e < 16; ++e)
                    g8[h][16 * k + e] = static_cast<uint8_t>(8 * e + 4 * h + k);
            for (int e = 0; e < 8; ++e)
                for (int k = 0; k < 8; ++k)
                    u8[h][8 * e + k] =
                        static_cast<uint8_t>((k >= 4 ? 64 : 0) + 16 * (k & 3) + 8 * h + e);
        }
    }
};
constexpr VbmiTables kVbmi{};

VBMI_FN inline __m512i load512(const void* p) { return _mm512_loadu_si512(p); }
VBMI_FN inline void store512(void* p, __m512i v) { _mm512_storeu_si512(p, v); }

// out[j] = lane j of (s[0], s[1], s[2], s[3]) for the four 128-bit lanes:
// a 4x4 transpose of 128-bit blocks (its own inverse).
VBMI_FN inline void transpose4x128(__m512i (&s)[4]) {
    const __m512i t0 = _mm512_shuffle_i64x2(s[0], s[1], 0x44);
    const __m512i t1 = _mm512_shuffle_i64x2(s[0], s[1], 0xEE);
    const __m512i t2 = _mm512_shuffle_i64x2(s[2], s[3], 0x44);
    const __m512i t3 = _mm512_shuffle_i64x2(s[2], s[3], 0xEE);
    s[0] = _mm512_shuffle_i64x2(t0, t2, 0x88);
    s[1] = _mm512_shuffle_i64x2(t0, t2, 0xDD);
    s[2] = _mm512_shuffle_i64x2(t1, t3, 0x88);
    s[3] = _mm512_shuffle_i64x2(t1, t3, 0xDD);
}

VBMI_FN void group2_vbmi(const uint8_t* src, uint8_t* const* planes, size_t n) {
    const __m512i i0 = load512(kVbmi.g2[0]);
    const __m512i i1 = load512(kVbmi.g2[1]);
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        const __m512i a = load512(src + 2 * i);
        const __m512i b = load512(src + 2 * i + 64);
        store512(planes[0] + i, _mm512_permutex2var_epi8(a, i0, b));
        store512(planes[1] + i, _mm512_permutex2var_epi8(a, i1, b));
    }
    group_tail<2>(src, planes, i, n);
}

VBMI_FN void ungroup2_vbmi(const uint8_t* const* planes, uint8_t* dst, size_t n) {
    const __m512i i0 = load512(kVbmi.u2[0]);
    const __m512i i1 = load512(kVbmi.u2[1]);
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        const __m512i a = load512(planes[0] + i);
        const __m512i b = load512(planes[1] + i);
        store512(dst + 2 * i, _mm512_permutex2var_epi8(a, i0, b));
        store512(dst + 2 * i + 64, _mm512_permutex2var_epi8(a, i1, b));
    }
    ungroup_tail<2>(planes, dst, i, n);
}

VBMI_FN void group4_vbmi(const uint8_t* src, uint8_t* const* planes, size_t n) {
    const __m512i i0 = load512(kVbmi.g4[0]);
    const __m512i i1 = load512(kVbmi.g4[1]);
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        const uint8_t* s = src + 4 * i;
        const __m512i r0 = load512(s), r1 = load512(s + 64);
        const __m512i r2 = load512(s + 128), r3 = load512(s + 192);
        const __m512i a = _mm512_permutex2var_epi8(r0, i0, r1);  // P0 | P1, elements [0,32)
        const __m512i b = _mm512_permutex2var_epi8(r0, i1, r1);  // P2 | P3
        const __m512i c = _mm512_permutex2var_epi8(r2, i0, r3);  // P0 | P1, elements [32,64)
        const __m512i d = _mm512_permutex2var_epi8(r2, i1, r3);
        store512(planes[0] + i, _mm512_shuffle_i64x2(a, c, 0x44));
        store512(planes[1] + i, _mm512_shuffle_i64x2(a, c, 0xEE));
        store512(planes[2] + i, _mm512_shuffle_i64x2(b, d, 0x44));
        store512(planes[3] + i, _mm512_shuffle_i64x2(b, d, 0xEE));
    }
    group_tail<4>(src, planes, i, n);
}

VBMI_FN void ungroup4_vbmi(const uint8_t* const* planes, uint8_t* dst, size_t n) {
    const __m512i i0 = load512(kVbmi.u4[0]);
    const __m512i i1 = load512(kVbmi.u4[1]);
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        const __m512i p0 = load512(planes[0] + i), p1 = load512(planes[1] + i);
        const __m512i p2 = load512(planes[2] + i), p3 = load512(planes[3] + i);
        const __m512i a = _mm512_shuffle_i64x2(p0, p1, 0x44);  // P0 | P1, elements [0,32)
        const __m512i c = _mm512_shuffle_i64x2(p0, p1, 0xEE);  // elements [32,64)
        const __m512i b = _mm512_shuffle_i64x2(p2, p3, 0x44);
        const __m512i d = _mm512_shuffle_i64x2(p2, p3, 0xEE);
        uint8_t* o = dst + 4 * i;
        store512(o, _mm512_permutex2var_epi8(a, i0, b));
        store512(o + 64, _mm512_permutex2var_epi8(a, i1, b));
        store512(o + 128, _mm512_permutex2var_epi8(c, i0, d));
        store512(o + 192, _mm512_permutex2var_epi8(c, i1, d));
    }
    ungroup_tail<4>(planes, dst, i, n);
}

VBMI_FN void group8_vbmi(const uint8_t* src, uint8_t* const* planes, size_t n) {
    const __m512i i0 = load512(kVbmi.g8[0]);
    const __m512i i1 = load512(kVbmi.g8[1]);
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        const uint8_t* s = src + 8 * i;
        __m512i lo[4], hi[4];  // per 16 elements: planes 0..3 / 4..7, 16 bytes each
        for (int p = 0; p < 4; ++p) {
            const __m512i r0 = load512(s + 128 * p);
            const __m512i r1 = load512(s + 128 * p + 64);
            lo[p] = _mm512_permutex2var_epi8(r0, i0, r1);
            hi[p] = _mm512_permutex2var_epi8(r0, i1, r1);
        }
        transpose4x128(lo);
        transpose4x128(hi);
        for (int k = 0; k < 4; ++k) {
            store512(planes[k] + i, lo[k]);
            store512(planes[k + 4] + i, hi[k]);
        }
    }
    group_tail<8>(src, planes, i, n);
}

VBMI_FN void ungroup8_vbmi(const uint8_t* const* planes, uint8_t* dst, size_t n) {
    const __m512i i0 = load512(kVbmi.u8[0]);
    const __m512i i1 = load512(kVbmi.u8[1]);
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m512i lo[4], hi[4];
        for (int k = 0; k < 4; ++k) {
            lo[k] = load512(planes[k] + i);
            hi[k] = load512(planes[k + 4] + i);
        }
        transpose4x128(lo);  // lo[p] = planes 0..3 of elements [16p, 16p+16)
        transpose4x128(hi);
        uint8_t* o = dst + 8 * i;
        for (int p = 0; p < 4; ++p) {
            store512(o + 128 * p, _mm512_permutex2var_epi8(lo[p], i0, hi[p]));
            store512(o + 128 * p + 64, _mm512_permutex2var_epi8(lo[p], i1, hi[p]));
        }
    }
    ungroup_tail<8>(planes, dst, i, n);
}

#endif  // SHARDCKPT_X86

// ---------------------------------------------------------------------------
// Dispatch.
// ---------------------------------------------------------------------------

struct Impl {
    const char* name;
    bool supported;
    GroupFn group[3];  // widths 2, 4, 8
    UngroupFn ungroup[3];
};

Impl g_impls[] = {
#if SHARDCKPT_X86
    {"avx512vbmi", false, {group2_vbmi, group4_vbmi, group8_vbmi},
     {ungroup2_vbmi, ungroup4_vbmi, ungroup8_vbmi}},
    {"avx2", false, {group2_avx2, group4_avx2, group8_avx2},
     {ungroup2_avx2, ungroup4_avx2, ungroup8_avx2}},
#endif
    {"scalar", true, {group_scalar<2>, group_scalar<4>, group_scalar<8>},
     {ungroup_scalar<2>, ungroup_scalar<4>, ungroup_scalar<8>}},
};
constexpr size_t kNumImpls = sizeof(g_impls) / sizeof(g_impls[0]);
const Impl* g_active = &g_impls[kNumImpls - 1];

void detect_cpu() {
#if SHARDCKPT_X86
    __builtin_cpu_init();
    g_impls[0].supported = __builtin_cpu_supports("avx512f") &&
                           __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vbmi");
    g_impls[1].supported = __builtin_cpu_supports("avx2");
#endif
    for (size_t i = 0; i < kNumImpls; ++i) {
        if (g_impls[i].supported) {
            g_active = &g_impls[i];
            break;
        }
    }
}

int width_slot(long width) { return width == 2 ? 0 : width == 4 ? 1 : width == 8 ? 2 : -1; }

// ---------------------------------------------------------------------------
// Python glue.
// ---------------------------------------------------------------------------

// Below this many bytes the GIL round trip costs more than it frees.
constexpr Py_ssize_t kReleaseGilThreshold = 64 * 1024;

// Minimal vectorcall argument parser: fills out[0..nnames) from positional
// and keyword arguments; `nrequired` leading ones are mandatory.
using shardckpt_ext::get_buffer;
using shardckpt_ext::overlaps;
using shardckpt_ext::parse_args;

const Impl* pick_impl(PyObject* impl) {
    return shardckpt_ext::pick_impl(impl, g_active, g_impls, kNumImpls, "byte-group");
}

int parse_width(PyObject* obj, int* slot, long* width) {
    const long w = PyLong_AsLong(obj);
    if (w == -1 && PyErr_Occurred()) return -1;
    const int s = width_slot(w);
    if (s < 0) {
        PyErr_Format(PyExc_ValueError, "width must be 2, 4 or 8, not %ld", w);
        return -1;
    }
    *slot = s;
    *width = w;
    return 0;
}

// group(src, dst, width) / ungroup(src, dst, width): one interleaved buffer,
// one planar buffer of the same length.
PyObject* run_whole(const char* fname, bool to_planes, PyObject* const* args, Py_ssize_t nargs,
                    PyObject* kwnames) {
    static const char* const names[] = {"src", "dst", "width", "impl"};
    PyObject* a[4];
    if (parse_args(fname, args, nargs, kwnames, names, 4, 3, a) < 0) return nullptr;
    int slot;
    long width;
    if (parse_width(a[2], &slot, &width) < 0) return nullptr;
    const Impl* impl = pick_impl(a[3]);
    if (impl == nullptr) return nullptr;
    Py_buffer src, dst;
    if (get_buffer(a[0], &src, false, "src") < 0) return nullptr;
    if (get_buffer(a[1], &dst, true, "dst") < 0) {
        PyBuffer_Release(&src);
        return nullptr;
    }
    const char* err = nullptr;
    if (src.len != dst.len) {
        err = "src and dst must have the same length";
    } else if (src.len % width != 0) {
        err = "buffer length must be a multiple of width";
    } else if (overlaps(src.buf, src.len, dst.buf, dst.len)) {
        err = "src and dst must not overlap";
    }
    if (err != nullptr) {
        PyErr_Format(PyExc_ValueError, "%s(): %s (len(src)=%zd, len(dst)=%zd, width=%ld)", fname,
                     err, src.len, dst.len, width);
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        return nullptr;
    }
    const size_t n = static_cast<size_t>(src.len) / width;
    const auto* s = static_cast<const uint8_t*>(src.buf);
    auto* d = static_cast<uint8_t*>(dst.buf);
    const bool release = src.len >= kReleaseGilThreshold;
    PyThreadState* ts = release ? PyEval_SaveThread() : nullptr;
    if (to_planes) {
        uint8_t* planes[kMaxWidth];
        for (long k = 0; k < width; ++k) planes[k] = d + k * n;
        impl->group[slot](s, planes, n);
    } else {
        const uint8_t* planes[kMaxWidth];
        for (long k = 0; k < width; ++k) planes[k] = s + k * n;
        impl->ungroup[slot](planes, d, n);
    }
    if (release) PyEval_RestoreThread(ts);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

PyObject* py_group(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
    return run_whole("group", true, args, nargs, kwnames);
}

PyObject* py_ungroup(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
    return run_whole("ungroup", false, args, nargs, kwnames);
}

PyObject* py_ungroup_planes(PyObject*, PyObject* const* args, Py_ssize_t nargs,
                            PyObject* kwnames) {
    static const char* const names[] = {"planes", "dst", "impl"};
    PyObject* a[3];
    if (parse_args("ungroup_planes", args, nargs, kwnames, names, 3, 2, a) < 0) return nullptr;
    const Impl* impl = pick_impl(a[2]);
    if (impl == nullptr) return nullptr;
    PyObject* seq = PySequence_Fast(a[0], "ungroup_planes(): planes must be a sequence");
    if (seq == nullptr) return nullptr;
    const Py_ssize_t width = PySequence_Fast_GET_SIZE(seq);
    const int slot = width_slot(static_cast<long>(width));
    if (slot < 0) {
        PyErr_Format(PyExc_ValueError,
                     "ungroup_planes(): need 2, 4 or 8 planes, got %zd", width);
        Py_DECREF(seq);
        return nullptr;
    }
    Py_buffer views[kMaxWidth];
    Py_buffer dst;
    Py_ssize_t got = 0;
    PyObject* result = nullptr;
    const uint8_t* planes[kMaxWidth];
    const char* err = nullptr;
    for (; got < width; ++got) {
        if (get_buffer(PySequence_Fast_GET_ITEM(seq, got), &views[got], false, "each plane") < 0)
            goto done;
        planes[got] = static_cast<const uint8_t*>(views[got].buf);
    }
    if (get_buffer(a[1], &dst, true, "dst") < 0) goto done;
    for (Py_ssize_t k = 0; k < width && err == nullptr; ++k) {
        if (views[k].len * width != dst.len) {
            err = "every plane must be len(dst) // len(planes) bytes long";
        } else if (overlaps(views[k].buf, views[k].len, dst.buf, dst.len)) {
            err = "planes must not overlap dst";
        }
    }
    if (err != nullptr) {
        PyErr_Format(PyExc_ValueError, "ungroup_planes(): %s (len(dst)=%zd, %zd planes)", err,
                     dst.len, width);
    } else {
        const size_t n = static_cast<size_t>(dst.len) / width;
        auto* d = static_cast<uint8_t*>(dst.buf);
        if (dst.len >= kReleaseGilThreshold) {
            Py_BEGIN_ALLOW_THREADS impl->ungroup[slot](planes, d, n);
            Py_END_ALLOW_THREADS
        } else {
            impl->ungroup[slot](planes, d, n);
        }
        Py_INCREF(Py_None);
        result = Py_None;
    }
    PyBuffer_Release(&dst);
done:
    for (Py_ssize_t k = 0; k < got; ++k) PyBuffer_Release(&views[k]);
    Py_DECREF(seq);
    return result;
}

SHARDCKPT_IMPL_INTROSPECTION(g_active, g_impls, kNumImpls)

PyMethodDef g_methods[] = {
    {"group", FASTCALL_KW(py_group), METH_FASTCALL | METH_KEYWORDS,
     "group(src, dst, width, impl=None) -> None\n\n"
     "Split the width-byte elements of src into width contiguous byte planes in dst:\n"
     "dst[k*n + i] = src[i*width + k]. width is 2, 4 or 8; src and dst are C-contiguous\n"
     "buffers of equal length (a multiple of width), dst writable, not overlapping.\n"
     "impl names a kernel (testing hook); None uses the best one."},
    {"ungroup", FASTCALL_KW(py_ungroup), METH_FASTCALL | METH_KEYWORDS,
     "ungroup(src, dst, width, impl=None) -> None\n\nInverse of group()."},
    {"ungroup_planes", FASTCALL_KW(py_ungroup_planes), METH_FASTCALL | METH_KEYWORDS,
     "ungroup_planes(planes, dst, impl=None) -> None\n\n"
     "Inverse of group() with the planes given as a sequence of 2, 4 or 8 separate\n"
     "buffers, each len(dst) // len(planes) bytes."},
    SHARDCKPT_IMPL_METHODS("group()/ungroup()"),
    {nullptr, nullptr, 0, nullptr},
};

SHARDCKPT_MODULE_DEF(g_module, "shardckpt.native._bytegroup",
                     "Byte grouping of 2/4/8-byte elements into planes, runtime-dispatched AVX2 / AVX-512 VBMI.",
                     g_methods);

}  // namespace

PyMODINIT_FUNC PyInit__bytegroup(void) {
    detect_cpu();
    return PyModule_Create(&g_module);
}
