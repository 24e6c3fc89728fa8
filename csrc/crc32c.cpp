// shardckpt._crc32c -- CRC32C (Castagnoli, reflected polynomial 0x82F63B78).
//
// Plain CPython C API + buffer protocol; no libtorch, no pybind11.
//
// Kernels (selected at import time with __builtin_cpu_supports, best first;
// GB/s measured by benchmarks/bench_crc.py on a 2-vCPU AMD EPYC Zen 5 VM,
// 1 MiB cache-resident / 256 MiB from DRAM; the crc32c PyPI package does
// ~33 / ~16 there):
//   "vpclmulqdq"        AVX-512 VPCLMULQDQ folding (4 x 512-bit accumulators,
//                       256 bytes per step) running side by side with three
//                       crc32-instruction streams on other parts of each
//                       12.8 KB block; the four partial CRCs are merged with
//                       clmul shifts. ~85 / ~34-37 (memory bound).
//   "pclmulqdq+sse4.2"  the same hybrid with 8 x 128-bit PCLMULQDQ folding.
//                       ~45 / ~35-40.
//   "sse4.2"            crc32 instruction, three independent streams over large
//                       blocks, merged with precomputed x^(8n) mod P shift
//                       tables (no clmul needed). ~33 / ~27-31.
//   "table"             portable slicing-by-8 tables (any CPU, any endianness).
//                       ~2.6.
// Large inputs (>= 2 MiB) also get software prefetch one block ahead.
// Inputs shorter than a hybrid block use the plain folding / single-stream
// code of the same path. All hardware code is compiled with per-function
// target attributes, so the module itself needs no -m flags and loads on any
// x86-64 (and builds elsewhere with just the table kernel; defining
// SHARDCKPT_PORTABLE_ONLY forces that table-only build on x86 too).
//
// Every kernel takes and returns the *raw* CRC register (no pre/post inversion);
// the Python-facing functions apply the ~ on the way in and out, so
//   crc32c(b, crc32c(a)) == crc32c(a + b).
//
// Polynomial conventions used throughout ("reflected" representation): a 32-bit
// value r stands for the polynomial sum_i bit_i(r) * x^(31 - i), i.e. bit 31 is
// the x^0 coefficient and bit 0 is the x^31 coefficient. Multiplying by x is a
// right shift, with the x^32 overflow folded back in as 0x82F63B78.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "pyext_common.h"

#include <cstddef>
#include <cstdint>
#include <cstring>


namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

// ---------------------------------------------------------------------------
// GF(2) helpers (portable, used for combine, constants and the table path).
// ---------------------------------------------------------------------------

// a * b mod P, both reflected.
constexpr uint32_t gf2_mulmod(uint32_t a, uint32_t b) {
    uint32_t prod = 0;
    for (int i = 0; i < 32; ++i) {
        if (a & (0x80000000u >> i)) prod ^= b;  // coefficient of x^i in a
        b = (b >> 1) ^ ((b & 1u) ? kPoly : 0u);  // b *= x
    }
    return prod;
}

// x^e mod P by square-and-multiply (constexpr: builds the
// folding and shift constants at compile time).
constexpr uint32_t xpow_fast(uint64_t e) {
    uint32_t r = 0x80000000u;
    uint32_t base = 0x40000000u;  // x
    while (e != 0) {
        if (e & 1u) r = gf2_mulmod(r, base);
        base = gf2_mulmod(base, base);
        e >>= 1;
    }
    return r;
}

// x^(2^k) mod P for k = 0..66 (8 * nbytes needs up to bit 66 for 64-bit nbytes).
struct Pow2Table {
    uint32_t v[67];
};

constexpr Pow2Table make_pow2_table() {
    Pow2Table t{};
    uint32_t p = 0x40000000u;  // x^1
    for (int k = 0; k < 67; ++k) {
        t.v[k] = p;
        p = gf2_mulmod(p, p);
    }
    return t;
}

constexpr Pow2Table kPow2 = make_pow2_table();

// x^(8 * nbytes) mod P with O(log nbytes) multiplications.
uint32_t xpow8(uint64_t nbytes) {
    uint32_t r = 0x80000000u;  // x^0
    for (int k = 3; nbytes != 0; ++k, nbytes >>= 1) {
        if (nbytes & 1u) r = gf2_mulmod(r, kPow2.v[k]);
    }
    return r;
}

// Shift a raw CRC register forward over `nbytes` zero bytes.
inline uint32_t crc_shift(uint32_t crc, uint64_t nbytes) {
    return gf2_mulmod(xpow8(nbytes), crc);
}

// crc(A+B) from crc(A), crc(B), len(B) (standard pre/post-inverted CRCs).
inline uint32_t crc_combine(uint32_t crc1, uint32_t crc2, uint64_t len2) {
    // len2 == 0 gives crc1 ^ crc2 (crc2 of an empty B is 0), like zlib's combine.
    return crc_shift(crc1, len2) ^ crc2;
}

// ---------------------------------------------------------------------------
// Portable slicing-by-8 table kernel.
// ---------------------------------------------------------------------------

struct SliceTables {
    uint32_t t[8][256];
};

constexpr SliceTables make_slice_tables() {
    SliceTables s{};
    for (uint32_t b = 0; b < 256; ++b) {
        uint32_t c = b;
        for (int k = 0; k < 8; ++k) c = (c >> 1) ^ ((c & 1u) ? kPoly : 0u);
        s.t[0][b] = c;
    }
    for (int j = 1; j < 8; ++j) {
        for (uint32_t b = 0; b < 256; ++b) {
            uint32_t c = s.t[j - 1][b];
            s.t[j][b] = (c >> 8) ^ s.t[0][c & 0xFFu];
        }
    }
    return s;
}

constexpr SliceTables kSlice = make_slice_tables();

inline uint32_t load_le32(const uint8_t* p) {
    return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
           (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}

inline uint64_t load_u64(const uint8_t* p) {
    uint64_t v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

uint32_t crc_table(uint32_t crc, const uint8_t* p, size_t n) {
    const auto& T = kSlice.t;
    while (n != 0 && (reinterpret_cast<uintptr_t>(p) & 7u) != 0) {
        crc = (crc >> 8) ^ T[0][(crc ^ *p++) & 0xFFu];
        --n;
    }
    while (n >= 8) {
        uint32_t lo = crc ^ load_le32(p);
        uint32_t hi = load_le32(p + 4);
        crc = T[7][lo & 0xFFu] ^ T[6][(lo >> 8) & 0xFFu] ^ T[5][(lo >> 16) & 0xFFu] ^
              T[4][lo >> 24] ^ T[3][hi & 0xFFu] ^ T[2][(hi >> 8) & 0xFFu] ^
              T[1][(hi >> 16) & 0xFFu] ^ T[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n != 0) {
        crc = (crc >> 8) ^ T[0][(crc ^ *p++) & 0xFFu];
        --n;
    }
    return crc;
}

// Linear "multiply by a fixed constant mod P" via four byte tables; used to
// merge the sse4.2 three-way streams on CPUs that lack PCLMULQDQ.
struct ShiftTable {
    uint32_t t[4][256];
};

constexpr ShiftTable make_shift_table(uint32_t nbytes) {
    ShiftTable s{};
    const uint32_t k = xpow_fast(8ull * nbytes);
    for (int j = 0; j < 4; ++j) {
        for (uint32_t b = 0; b < 256; ++b) {
            s.t[j][b] = gf2_mulmod(b << (8 * j), k);
        }
    }
    return s;
}

inline uint32_t apply_shift(const ShiftTable& s, uint32_t crc) {
    return s.t[0][crc & 0xFFu] ^ s.t[1][(crc >> 8) & 0xFFu] ^ s.t[2][(crc >> 16) & 0xFFu] ^
           s.t[3][crc >> 24];
}

// ---------------------------------------------------------------------------
// x86 hardware kernels.
// ---------------------------------------------------------------------------
#if SHARDCKPT_X86

#define TGT_SSE42 __attribute__((target("sse4.2")))
#define TGT_PCLMUL __attribute__((target("sse4.2,pclmul")))
#define TGT_VPCLMUL \
    __attribute__((target("sse4.2,pclmul,avx2,avx512f,avx512bw,avx512vl,vpclmulqdq")))

// Inputs at least this long are assumed not to be cache resident: the hot
// loops then prefetch one block ahead.
constexpr size_t kPrefetchMin = size_t{2} << 20;

constexpr size_t kLong = 8192;   // bytes per stream, big 3-way blocks
constexpr size_t kShort = 256;   // bytes per stream, small 3-way blocks

constexpr ShiftTable kShiftLong1 = make_shift_table(kLong);
constexpr ShiftTable kShiftLong2 = make_shift_table(2 * kLong);
constexpr ShiftTable kShiftShort1 = make_shift_table(kShort);
constexpr ShiftTable kShiftShort2 = make_shift_table(2 * kShort);

TGT_SSE42 inline uint32_t sse42_bytes(uint32_t crc, const uint8_t* p, size_t n) {
    while (n != 0) {
        crc = _mm_crc32_u8(crc, *p++);
        --n;
    }
    return crc;
}

// Single stream; latency bound (one crc32 per 3 cycles or so).
TGT_SSE42 uint32_t sse42_1way(uint32_t crc, const uint8_t* p, size_t n) {
    if (n >= 8) {
        size_t head = (8u - (reinterpret_cast<uintptr_t>(p) & 7u)) & 7u;
        crc = sse42_bytes(crc, p, head);
        p += head;
        n -= head;
    }
    uint64_t c = crc;
    while (n >= 8) {
        c = _mm_crc32_u64(c, load_u64(p));
        p += 8;
        n -= 8;
    }
    return sse42_bytes(static_cast<uint32_t>(c), p, n);
}

// Three independent streams over [0,L), [L,2L), [2L,3L). L % 8 == 0.
TGT_SSE42 inline void sse42_3streams(uint64_t& a, uint64_t& b, uint64_t& c, const uint8_t* p,
                                     size_t L) {
    const uint8_t* pa = p;
    const uint8_t* pb = p + L;
    const uint8_t* pc = p + 2 * L;
    uint64_t ca = a, cb = b, cc = c;
    for (size_t i = 0; i < L; i += 16) {
        ca = _mm_crc32_u64(ca, load_u64(pa + i));
        cb = _mm_crc32_u64(cb, load_u64(pb + i));
        cc = _mm_crc32_u64(cc, load_u64(pc + i));
        ca = _mm_crc32_u64(ca, load_u64(pa + i + 8));
        cb = _mm_crc32_u64(cb, load_u64(pb + i + 8));
        cc = _mm_crc32_u64(cc, load_u64(pc + i + 8));
    }
    a = ca;
    b = cb;
    c = cc;
}

// As sse42_3streams(), also prefetching each stream `ahead` bytes in front.
TGT_SSE42 inline void sse42_3streams_pf(uint64_t& a, uint64_t& b, uint64_t& c, const uint8_t* p,
                                        size_t L, size_t ahead) {
    const uint8_t* pa = p;
    const uint8_t* pb = p + L;
    const uint8_t* pc = p + 2 * L;
    uint64_t ca = a, cb = b, cc = c;
    for (size_t i = 0; i < L; i += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(pa + i + ahead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(pb + i + ahead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(pc + i + ahead), _MM_HINT_T0);
        for (size_t j = 0; j < 64; j += 8) {
            ca = _mm_crc32_u64(ca, load_u64(pa + i + j));
            cb = _mm_crc32_u64(cb, load_u64(pb + i + j));
            cc = _mm_crc32_u64(cc, load_u64(pc + i + j));
        }
    }
    a = ca;
    b = cb;
    c = cc;
}

TGT_SSE42 uint32_t crc_sse42(uint32_t crc, const uint8_t* p, size_t n) {
    if (n < 3 * kShort) return sse42_1way(crc, p, n);
    size_t head = (8u - (reinterpret_cast<uintptr_t>(p) & 7u)) & 7u;
    crc = sse42_bytes(crc, p, head);
    p += head;
    n -= head;
    const bool prefetch = n >= kPrefetchMin;
    while (n >= 3 * kLong) {
        uint64_t a = crc, b = 0, c = 0;
        if (prefetch) {
            sse42_3streams_pf(a, b, c, p, kLong, 3 * kLong);  // next block
        } else {
            sse42_3streams(a, b, c, p, kLong);
        }
        crc = apply_shift(kShiftLong2, static_cast<uint32_t>(a)) ^
              apply_shift(kShiftLong1, static_cast<uint32_t>(b)) ^ static_cast<uint32_t>(c);
        p += 3 * kLong;
        n -= 3 * kLong;
    }
    while (n >= 3 * kShort) {
        uint64_t a = crc, b = 0, c = 0;
        sse42_3streams(a, b, c, p, kShort);
        crc = apply_shift(kShiftShort2, static_cast<uint32_t>(a)) ^
              apply_shift(kShiftShort1, static_cast<uint32_t>(b)) ^ static_cast<uint32_t>(c);
        p += 3 * kShort;
        n -= 3 * kShort;
    }
    return sse42_1way(crc, p, n);
}

// --- carry-less multiply folding -------------------------------------------
//
// A 16-byte little-endian chunk A = H*x^64 + L (H = low qword = earlier bits)
// that sits D bits before a chunk C can be replaced by
//   A' = H * (x^(D+32) mod P) + L * (x^(D-32) mod P)     (degree < 96)
// XORed into C, with the 32-bit constants stored reflected and shifted left by
// one (so that the 95-bit clmul product lines up with C's bit positions).
//
// Once everything is folded into one 16-byte remainder X, the CRC register is
// exactly the CRC (zero initial register) of X's own 16 bytes, which two crc32
// instructions compute -- no Barrett reduction needed.

struct FoldK {
    uint64_t hi_mul;  // multiplies the low qword  (x^(D+32))
    uint64_t lo_mul;  // multiplies the high qword (x^(D-32))
};

constexpr FoldK fold_k(uint32_t dbits) {
    return FoldK{static_cast<uint64_t>(xpow_fast(dbits + 32)) << 1,
                 static_cast<uint64_t>(xpow_fast(dbits - 32)) << 1};
}

// Multiplier that shifts a CRC register over `nbytes` zero bytes with one
// clmul + one crc32: crc32_u64(0, clmul(c, K)) == c * x^(8 nbytes) mod P for
// K = x^(8 nbytes - 33) mod P (the crc32 adds x^32, the clmul of two
// reflected values another x).
constexpr uint64_t shift_k(uint64_t nbytes) { return xpow_fast(8 * nbytes - 33); }

constexpr FoldK kFold128 = fold_k(128);
constexpr FoldK kFold256 = fold_k(256);
constexpr FoldK kFold384 = fold_k(384);
constexpr FoldK kFold512 = fold_k(512);
constexpr FoldK kFold640 = fold_k(640);
constexpr FoldK kFold768 = fold_k(768);
constexpr FoldK kFold896 = fold_k(896);
constexpr FoldK kFold1024 = fold_k(1024);
constexpr FoldK kFold1536 = fold_k(1536);
constexpr FoldK kFold2048 = fold_k(2048);

TGT_PCLMUL inline __m128i k128(const FoldK& k) {
    return _mm_set_epi64x(static_cast<long long>(k.lo_mul), static_cast<long long>(k.hi_mul));
}

TGT_PCLMUL inline __m128i load128(const uint8_t* q) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
}

TGT_PCLMUL inline __m128i fold128(__m128i x, __m128i k, __m128i next) {
    __m128i a = _mm_clmulepi64_si128(x, k, 0x00);
    __m128i b = _mm_clmulepi64_si128(x, k, 0x11);
    return _mm_xor_si128(_mm_xor_si128(a, b), next);
}

TGT_PCLMUL inline uint32_t reduce128(__m128i x) {
    uint64_t lo = static_cast<uint64_t>(_mm_cvtsi128_si64(x));
    uint64_t hi = static_cast<uint64_t>(_mm_extract_epi64(x, 1));
    return static_cast<uint32_t>(_mm_crc32_u64(_mm_crc32_u64(0, lo), hi));
}

// CRC register of [V | A | B | C] where v, a, b, c are the registers of the
// four regions (v with the incoming state, the others from zero) and A, B, C
// are each `s` bytes long: shift v by 3s, a by 2s, b by s, XOR.
TGT_PCLMUL inline __m128i clmul_lo(uint32_t x, uint64_t k) {
    return _mm_clmulepi64_si128(_mm_cvtsi32_si128(static_cast<int>(x)),
                                _mm_cvtsi64_si128(static_cast<long long>(k)), 0x00);
}

TGT_PCLMUL inline uint32_t merge4(uint32_t v, uint32_t a, uint32_t b, uint32_t c, uint64_t k3,
                                  uint64_t k2, uint64_t k1) {
    __m128i t = _mm_xor_si128(_mm_xor_si128(clmul_lo(v, k3), clmul_lo(a, k2)), clmul_lo(b, k1));
    return static_cast<uint32_t>(
               _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(t)))) ^ c;
}

// Fold remaining whole 16-byte chunks into x, reduce, then finish the tail.
TGT_PCLMUL uint32_t finish128(__m128i x, const uint8_t* p, size_t n) {
    const __m128i k = k128(kFold128);
    while (n >= 16) {
        x = fold128(x, k, load128(p));
        p += 16;
        n -= 16;
    }
    uint64_t c = reduce128(x);
    while (n >= 8) {
        c = _mm_crc32_u64(c, load_u64(p));
        p += 8;
        n -= 8;
    }
    return sse42_bytes(static_cast<uint32_t>(c), p, n);
}

// 8 x 128-bit accumulators (128 bytes per step).
struct X8 {
    __m128i x[8];

    TGT_PCLMUL inline void start(const uint8_t* p, uint32_t crc) {
        x[0] = _mm_xor_si128(load128(p), _mm_cvtsi32_si128(static_cast<int>(crc)));
        for (int i = 1; i < 8; ++i) x[i] = load128(p + 16 * i);
    }
    TGT_PCLMUL inline void step(const uint8_t* p, __m128i k) {
        for (int i = 0; i < 8; ++i) x[i] = fold128(x[i], k, load128(p + 16 * i));
    }
    // Fold x0..x6 onto x7 (independent folds, so they overlap).
    TGT_PCLMUL inline __m128i collapse() const {
        const __m128i z = _mm_setzero_si128();
        __m128i acc = fold128(x[0], k128(kFold896), x[7]);
        acc = _mm_xor_si128(acc, fold128(x[1], k128(kFold768), fold128(x[2], k128(kFold640), z)));
        acc = _mm_xor_si128(acc, fold128(x[3], k128(kFold512), fold128(x[4], k128(kFold384), z)));
        acc = _mm_xor_si128(acc, fold128(x[5], k128(kFold256), fold128(x[6], k128(kFold128), z)));
        return acc;
    }
};

// Plain 128-bit folding.
TGT_PCLMUL uint32_t crc_pclmul_fold(uint32_t crc, const uint8_t* p, size_t n) {
    if (n < 256) return crc_sse42(crc, p, n);
    X8 v;
    v.start(p, crc);
    p += 128;
    n -= 128;
    const __m128i k = k128(kFold1024);
    while (n >= 128) {
        v.step(p, k);
        p += 128;
        n -= 128;
    }
    return finish128(v.collapse(), p, n);
}

// Hybrid: PCLMULQDQ folding and three crc32-instruction streams run side by
// side on separate regions of each block (vector units and the scalar crc32
// unit are different ports), merged once per block with merge4().
constexpr size_t kHxSteps = 64;
constexpr size_t kHxScalar = 96;  // bytes per scalar stream per step
constexpr size_t kHxVec = 128 * kHxSteps;
constexpr size_t kHxS = kHxScalar * kHxSteps;
constexpr size_t kHxBlock = kHxVec + 3 * kHxS;
constexpr uint64_t kHxK1 = shift_k(kHxS);
constexpr uint64_t kHxK2 = shift_k(2 * kHxS);
constexpr uint64_t kHxK3 = shift_k(3 * kHxS);
static_assert(7 * 64 * kHxSteps >= kHxBlock, "prefetch must cover a whole block");

TGT_PCLMUL uint32_t crc_pclmul(uint32_t crc, const uint8_t* p, size_t n) {
    const __m128i k = k128(kFold1024);
    const bool prefetch = n >= kPrefetchMin;  // see crc_vpclmul()
    while (n >= kHxBlock) {
        const uint8_t* pa = p + kHxVec;
        const uint8_t* pb = pa + kHxS;
        const uint8_t* pc = pb + kHxS;
        X8 v;
        v.start(p, crc);
        uint64_t a = 0, b = 0, c = 0;
        for (size_t s = 0; s < kHxSteps; ++s) {
            if (s != 0) v.step(p + 128 * s, k);
            if (prefetch) {
                // Next block, spread over the steps: 7 lines x 64 steps >= 416 lines.
                const char* q = reinterpret_cast<const char*>(p + kHxBlock + 448 * s);
                for (int i = 0; i < 7; ++i) _mm_prefetch(q + 64 * i, _MM_HINT_T0);
            }
            const size_t o = kHxScalar * s;
            for (size_t j = 0; j < kHxScalar; j += 8) {
                a = _mm_crc32_u64(a, load_u64(pa + o + j));
                b = _mm_crc32_u64(b, load_u64(pb + o + j));
                c = _mm_crc32_u64(c, load_u64(pc + o + j));
            }
        }
        crc = merge4(reduce128(v.collapse()), static_cast<uint32_t>(a), static_cast<uint32_t>(b),
                     static_cast<uint32_t>(c), kHxK3, kHxK2, kHxK1);
        p += kHxBlock;
        n -= kHxBlock;
    }
    return crc_pclmul_fold(crc, p, n);
}

// --- AVX-512 VPCLMULQDQ folding --------------------------------------------

TGT_VPCLMUL inline __m512i k512(const FoldK& k) {
    const auto h = static_cast<long long>(k.hi_mul);
    const auto l = static_cast<long long>(k.lo_mul);
    return _mm512_set_epi64(l, h, l, h, l, h, l, h);
}

TGT_VPCLMUL inline __m512i load512(const uint8_t* q) {
    return _mm512_loadu_si512(reinterpret_cast<const void*>(q));
}

// Lane i (0..3) of a 512-bit register. (The maskz forms avoid GCC 12's
// spurious -Wmaybe-uninitialized from _mm512_undefined_* in the plain ones.)
template <int I>
TGT_VPCLMUL inline __m128i lane(__m512i v) {
    return _mm512_maskz_extracti32x4_epi32(0xF, v, I);
}

TGT_VPCLMUL inline __m512i fold512(__m512i x, __m512i k, __m512i next) {
    __m512i a = _mm512_clmulepi64_epi128(x, k, 0x00);
    __m512i b = _mm512_clmulepi64_epi128(x, k, 0x11);
    return _mm512_ternarylogic_epi64(a, b, next, 0x96);  // a ^ b ^ next
}

TGT_VPCLMUL inline __m512i inject512(uint32_t crc) {
    return _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(crc)));
}

// 4 lanes -> 1: lanes 0, 1, 2 sit 384, 256, 128 bits before lane 3.
TGT_VPCLMUL inline __m128i collapse_lanes(__m512i acc) {
    const __m512i kv = _mm512_set_epi64(
        0, 0, static_cast<long long>(kFold128.lo_mul), static_cast<long long>(kFold128.hi_mul),
        static_cast<long long>(kFold256.lo_mul), static_cast<long long>(kFold256.hi_mul),
        static_cast<long long>(kFold384.lo_mul), static_cast<long long>(kFold384.hi_mul));
    __m512i prod = _mm512_xor_si512(_mm512_clmulepi64_epi128(acc, kv, 0x00),
                                    _mm512_clmulepi64_epi128(acc, kv, 0x11));
    __m128i x = _mm_ternarylogic_epi64(lane<3>(acc), lane<0>(prod), lane<1>(prod), 0x96);
    return _mm_xor_si128(x, lane<2>(prod));
}

// 4 x 512-bit accumulators (256 bytes per step).
struct Z4 {
    __m512i z0, z1, z2, z3;

    TGT_VPCLMUL inline void start(const uint8_t* p, uint32_t crc) {
        z0 = _mm512_xor_si512(load512(p), inject512(crc));
        z1 = load512(p + 64);
        z2 = load512(p + 128);
        z3 = load512(p + 192);
    }
    TGT_VPCLMUL inline void step(const uint8_t* p, __m512i k) {
        z0 = fold512(z0, k, load512(p));
        z1 = fold512(z1, k, load512(p + 64));
        z2 = fold512(z2, k, load512(p + 128));
        z3 = fold512(z3, k, load512(p + 192));
    }
    // 4 x 512 -> 1 x 512 (z0, z1, z2 sit 192, 128, 64 bytes before z3).
    TGT_VPCLMUL inline __m512i collapse() const {
        __m512i acc = fold512(z0, k512(kFold1536), z3);
        acc = fold512(z1, k512(kFold1024), acc);
        return fold512(z2, k512(kFold512), acc);
    }
};

// Plain 512-bit folding; any length.
TGT_VPCLMUL uint32_t crc_vpclmul_fold(uint32_t crc, const uint8_t* p, size_t n) {
    if (n < 64) return sse42_1way(crc, p, n);
    __m512i acc;
    if (n >= 256) {
        Z4 v;
        v.start(p, crc);
        p += 256;
        n -= 256;
        const __m512i k = k512(kFold2048);
        while (n >= 256) {
            v.step(p, k);
            p += 256;
            n -= 256;
        }
        acc = v.collapse();
    } else {
        acc = _mm512_xor_si512(load512(p), inject512(crc));
        p += 64;
        n -= 64;
    }
    const __m512i k64 = k512(kFold512);
    while (n >= 64) {
        acc = fold512(acc, k64, load512(p));
        p += 64;
        n -= 64;
    }
    return finish128(collapse_lanes(acc), p, n);
}

// Hybrid, as crc_pclmul() but with 512-bit folding for the vector share.
constexpr size_t kHzSteps = 32;
constexpr size_t kHzScalar = 48;  // bytes per scalar stream per 256-byte vector step
constexpr size_t kHzVec = 256 * kHzSteps;
constexpr size_t kHzS = kHzScalar * kHzSteps;
constexpr size_t kHzBlock = kHzVec + 3 * kHzS;
constexpr uint64_t kHzK1 = shift_k(kHzS);
constexpr uint64_t kHzK2 = shift_k(2 * kHzS);
constexpr uint64_t kHzK3 = shift_k(3 * kHzS);
static_assert(7 * 64 * kHzSteps >= kHzBlock, "prefetch must cover a whole block");

TGT_VPCLMUL uint32_t crc_vpclmul(uint32_t crc, const uint8_t* p, size_t n) {
    const __m512i k = k512(kFold2048);
    // Software prefetch one block ahead: +15% from DRAM (28.8 -> 33.9 GB/s on
    // Zen 5), ~2% slower on cache-resident data, so only for big inputs.
    // (Prefetches past the end of the buffer are harmless: they never fault.)
    const bool prefetch = n >= kPrefetchMin;
    while (n >= kHzBlock) {
        const uint8_t* pa = p + kHzVec;
        const uint8_t* pb = pa + kHzS;
        const uint8_t* pc = pb + kHzS;
        Z4 v;
        v.start(p, crc);
        uint64_t a = 0, b = 0, c = 0;
        for (size_t s = 0; s < kHzSteps; ++s) {
            if (s != 0) v.step(p + 256 * s, k);
            if (prefetch) {
                // Next block, spread over the steps: 7 lines x 32 steps >= 200 lines.
                const char* q = reinterpret_cast<const char*>(p + kHzBlock + 448 * s);
                for (int i = 0; i < 7; ++i) _mm_prefetch(q + 64 * i, _MM_HINT_T0);
            }
            const size_t o = kHzScalar * s;
            for (size_t j = 0; j < kHzScalar; j += 8) {
                a = _mm_crc32_u64(a, load_u64(pa + o + j));
                b = _mm_crc32_u64(b, load_u64(pb + o + j));
                c = _mm_crc32_u64(c, load_u64(pc + o + j));
            }
        }
        crc = merge4(reduce128(collapse_lanes(v.collapse())), static_cast<uint32_t>(a),
                     static_cast<uint32_t>(b), static_cast<uint32_t>(c), kHzK3, kHzK2, kHzK1);
        p += kHzBlock;
        n -= kHzBlock;
    }
    return crc_vpclmul_fold(crc, p, n);
}

#endif  // SHARDCKPT_X86

// ---------------------------------------------------------------------------
// Dispatch.
// ---------------------------------------------------------------------------

using KernelFn = uint32_t (*)(uint32_t, const uint8_t*, size_t);

struct Impl {
    const char* name;
    KernelFn fn;
    bool supported;
};

// Preference order (fastest first, as measured on AMD Zen 5; see
// benchmarks/bench_crc.py). "table" is always last and always supported.
Impl g_impls[] = {
#if SHARDCKPT_X86
    {"vpclmulqdq", crc_vpclmul, false},
    {"pclmulqdq+sse4.2", crc_pclmul, false},
    {"sse4.2", crc_sse42, false},
#endif
    {"table", crc_table, true},
};
constexpr size_t kNumImpls = sizeof(g_impls) / sizeof(g_impls[0]);

const Impl* g_active = nullptr;

void detect_cpu() {
#if SHARDCKPT_X86
    __builtin_cpu_init();
    const bool sse42 = __builtin_cpu_supports("sse4.2");
    const bool pclmul = sse42 && __builtin_cpu_supports("pclmul");
    // libgcc only reports AVX-512 features when the OS has enabled the
    // AVX-512 register state (XCR0), so this is safe under any kernel/VM.
    const bool vpclmul = pclmul && __builtin_cpu_supports("avx2") &&
                         __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("vpclmulqdq");
    g_impls[0].supported = vpclmul;
    g_impls[1].supported = pclmul;
    g_impls[2].supported = sse42;
#endif
    for (size_t i = 0; i < kNumImpls; ++i) {
        if (g_impls[i].supported) {
            g_active = &g_impls[i];
            break;
        }
    }
}

// ---------------------------------------------------------------------------
// Python glue.
// ---------------------------------------------------------------------------

constexpr Py_ssize_t kReleaseGilThreshold = 32 * 1024;

// Get a C-contiguous byte view of `obj`; on failure sets an exception. A
// strided, non-contiguous exporter gets a BufferError that says so (numpy
// would otherwise raise ValueError, memoryview BufferError, each worded
// differently).
int get_contiguous(PyObject* obj, Py_buffer* view) {
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) == 0) return 0;
    if (!PyObject_CheckBuffer(obj)) return -1;  // keep the TypeError
    PyObject *etype, *evalue, *etb;
    PyErr_Fetch(&etype, &evalue, &etb);
    Py_buffer probe;
    if (PyObject_GetBuffer(obj, &probe, PyBUF_FULL_RO) == 0) {
        const int contiguous = PyBuffer_IsContiguous(&probe, 'C');
        PyBuffer_Release(&probe);
        if (!contiguous) {
            Py_XDECREF(etype);
            Py_XDECREF(evalue);
            Py_XDECREF(etb);
            PyErr_SetString(PyExc_BufferError,
                            "crc32c: buffer is not C-contiguous; pass a contiguous copy "
                            "(e.g. bytes(view) or numpy.ascontiguousarray(a))");
            return -1;
        }
    } else {
        PyErr_Clear();
    }
    PyErr_Restore(etype, evalue, etb);
    return -1;
}

// Convert an int-like object to an unsigned value <= max_value.
int to_unsigned(PyObject* obj, unsigned long long max_value, const char* what,
                unsigned long long* out) {
    PyObject* idx = PyNumber_Index(obj);
    if (idx == nullptr) return -1;
    int overflow = 0;
    const long long sv = PyLong_AsLongLongAndOverflow(idx, &overflow);
    if (sv == -1 && overflow == 0 && PyErr_Occurred()) {
        Py_DECREF(idx);
        return -1;
    }
    if (overflow < 0 || (overflow == 0 && sv < 0)) {
        Py_DECREF(idx);
        PyErr_Format(PyExc_ValueError, "%s must be non-negative", what);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(idx);
    Py_DECREF(idx);
    if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_OverflowError, "%s is too large (max %llu)", what, max_value);
        return -1;
    }
    if (v > max_value) {
        PyErr_Format(PyExc_OverflowError, "%s is too large (max %llu)", what, max_value);
        return -1;
    }
    *out = v;
    return 0;
}

// Minimal vectorcall argument parser: fills out[0..nnames) from positional
// and keyword arguments; `nrequired` leading ones are mandatory.
using shardckpt_ext::parse_args;

PyObject* run_crc(KernelFn fn, PyObject* data, PyObject* value_obj) {
    unsigned long long value = 0;
    if (value_obj != nullptr && to_unsigned(value_obj, 0xFFFFFFFFull, "value", &value) < 0) {
        return nullptr;
    }
    Py_buffer view;
    if (get_contiguous(data, &view) < 0) return nullptr;
    const auto* p = static_cast<const uint8_t*>(view.buf);
    const size_t n = static_cast<size_t>(view.len);
    uint32_t crc = ~static_cast<uint32_t>(value);
    if (view.len >= kReleaseGilThreshold) {
        Py_BEGIN_ALLOW_THREADS crc = fn(crc, p, n);
        Py_END_ALLOW_THREADS
    } else {
        crc = fn(crc, p, n);
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(~crc);
}

PyObject* py_crc32c(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
    static const char* const names[] = {"data", "value"};
    PyObject* a[2];
    if (parse_args("crc32c", args, nargs, kwnames, names, 2, 1, a) < 0) return nullptr;
    return run_crc(g_active->fn, a[0], a[1]);
}

PyObject* py_crc32c_impl(PyObject*, PyObject* const* args, Py_ssize_t nargs,
                         PyObject* kwnames) {
    static const char* const names[] = {"name", "data", "value"};
    PyObject* a[3];
    if (parse_args("_crc32c_impl", args, nargs, kwnames, names, 3, 2, a) < 0) return nullptr;
    if (!PyUnicode_Check(a[0])) {
        PyErr_SetString(PyExc_TypeError, "_crc32c_impl(): name must be a str");
        return nullptr;
    }
    const Impl* impl = shardckpt_ext::pick_impl(a[0], g_active, g_impls, kNumImpls, "CRC32C");
    return impl == nullptr ? nullptr : run_crc(impl->fn, a[1], a[2]);
}

PyObject* py_crc32c_combine(PyObject*, PyObject* const* args, Py_ssize_t nargs,
                            PyObject* kwnames) {
    static const char* const names[] = {"crc1", "crc2", "len2"};
    PyObject* a[3];
    if (parse_args("crc32c_combine", args, nargs, kwnames, names, 3, 3, a) < 0) return nullptr;
    unsigned long long crc1, crc2, len2;
    if (to_unsigned(a[0], 0xFFFFFFFFull, "crc1", &crc1) < 0) return nullptr;
    if (to_unsigned(a[1], 0xFFFFFFFFull, "crc2", &crc2) < 0) return nullptr;
    if (to_unsigned(a[2], ~0ull, "len2", &len2) < 0) return nullptr;
    return PyLong_FromUnsignedLong(crc_combine(static_cast<uint32_t>(crc1),
                                               static_cast<uint32_t>(crc2), len2));
}

SHARDCKPT_IMPL_INTROSPECTION(g_active, g_impls, kNumImpls)

PyMethodDef g_methods[] = {
    {"crc32c", FASTCALL_KW(py_crc32c), METH_FASTCALL | METH_KEYWORDS,
     "crc32c(data, value=0) -> int\n\n"
     "CRC32C (Castagnoli) of a C-contiguous buffer. `value` is a previous CRC to\n"
     "continue from, so crc32c(b, crc32c(a)) == crc32c(a + b)."},
    {"crc32c_combine", FASTCALL_KW(py_crc32c_combine), METH_FASTCALL | METH_KEYWORDS,
     "crc32c_combine(crc1, crc2, len2) -> int\n\n"
     "CRC32C of A + B given crc32c(A), crc32c(B) and len(B), in O(log len2)."},
    SHARDCKPT_IMPL_METHODS("crc32c()"),
    {"_crc32c_impl", FASTCALL_KW(py_crc32c_impl), METH_FASTCALL | METH_KEYWORDS,
     "_crc32c_impl(name, data, value=0) -> int\n\n"
     "Testing hook: crc32c() through the named kernel."},
    {nullptr, nullptr, 0, nullptr},
};

SHARDCKPT_MODULE_DEF(g_module, "shardckpt.native._crc32c",
                     "CRC32C (Castagnoli) with runtime-dispatched SSE4.2 / PCLMULQDQ / VPCLMULQDQ kernels.",
                     g_methods);

}  // namespace

PyMODINIT_FUNC PyInit__crc32c(void) {
    detect_cpu();
    return PyModule_Create(&g_module);
}
