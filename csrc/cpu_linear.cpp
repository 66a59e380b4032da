// cpu_linear: y[M, N] = x[M, K] @ weight[N, K]^T (+ bias[N]) in float32 for a few rows (M <= 8), on x86 CPUs
// with AVX2 and FMA: the large model's verify pass over k + 1 tokens on a CPU (bild_kernels.ops.cpu_linear).
//
// Why: a decode step reads every weight once and is memory-bound; a verify pass over 2-4 tokens should cost
// the same. Library small-M paths do not always manage that (MKL on an AMD EPYC costs about M times one row
// at M = 2..3), so here each group of R weight rows is streamed once while all M input rows (hot in L1) are
// multiplied against it: M x R accumulators of 8 lanes live in registers.
// cpu_linear_int8: the same with int8 weights and a float32 scale per output row (w ~= q * scale), float32
// activations, any M (chunks of 8 rows): a CPU draft step reads a quarter of the float32 bytes.
// cpu_linear_q8_0: int8 weights with a scale per 32 of a row's weights (a GGUF Q8_0 matrix, the default large
// model's head): each weight rebuilt exactly in registers, so the same bits as cpu_linear on the float32 weights.
// cpu_linear_q4_1: the same for a GGUF Q4_1 matrix (4-bit values with a scale and a minimum per 32 weights: the
// default large model's layers), from 0.75 bytes a weight.
//
// Work split: at::parallel_for over groups of R output rows; each output is computed by one thread alone.
// Summation order: lane j (0..7) accumulates k = j, j + 8, j + 16, ... with FMA in increasing k; the 8 lanes
// are then added in a fixed tree, then the K mod 8 tail in order, then the scale (int8), then the bias. That order depends on K
// only, so an output row's values are bit-identical whatever M, the row's position in x, R, or the thread
// count (batch invariance: a token verified in a pass of three rows gets the logits it gets alone).
//
// Built into bild_kernels._cpu by setup.py on x86-64; the AVX2 code is compiled with a target attribute and
// only entered when the CPU reports AVX2 and FMA (cpu_linear_supported), so the module loads anywhere.
// Where the CPU has AVX-512VL the same 8-lane code runs from a second build that may use 32 ymm registers
// (cpu_linear_isa() says which): the M input vectors of each k stay in registers and more accumulators fit, and
// no accumulator is stored to the stack inside the loop (a fully unrolled epilogue keeps every index constant;
// before, GCC spilled them every k, which cost ~2x on Q8_0 at M = 4). Same instructions, same bits.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <Python.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "cpu_simd.h"  // reduce_lanes; defines BILD_X86 on x86-64

namespace bild {
namespace {

constexpr int64_t kMaxRows = 8;

#ifdef BILD_X86
// Two builds of the same code: kAvx2 (16 ymm registers) and kAvx512 (the same 8-lane AVX2 arithmetic compiled
// with AVX-512VL, so that the compiler may use 32 ymm registers: more accumulators, the input rows held in
// registers). Same instructions' results, so the same bits; kAvx512 is entered only where the CPU has AVX-512VL.
enum class Isa { kAvx2, kAvx512 };
#define BILD_AVX2 __attribute__((target("avx2,fma")))
#define BILD_AVX512 __attribute__((target("avx2,fma,avx512f,avx512vl")))
#define BILD_UNROLL _Pragma("GCC unroll 64")

// Output rows [n0, n0 + R) for all M input rows. R is what fits the registers: M * R accumulators, the M input
// vectors of the current k (loaded once, used by every row r) and a weight vector.
// W: float weights, or int8 ones with a per-row scale applied to each finished sum (w ~= q * scale).
// prefetch: also touch the rows two groups ahead (they exist), one cache line per row per line read. The
// hardware prefetcher alone keeps too few lines in flight once M > 1 slows the loop: with it, three rows cost
// ~1.4x one; with this, ~1.1x (a 30-layer stack of 3072x576 float32 weights, one thread, AMD EPYC).
// BLOCKED (int8 weights only): each run of 32 weights of a row has its own scale d (block_scale[n][k / 32], a
// Q8_0 block): the weight is rebuilt as q * d in registers, exact in float32 (d an fp16 value, |q| <= 127), so
// every product and sum is the float32 kernel's on the dequantised weights, bit for bit.
#define BILD_ROWS_BLOCK(TARGET)                                                                                   \
  template <typename W, int M, int R, bool BLOCKED>                                                               \
  TARGET void rows_block(const float* x, int64_t ldx, const W* w, int64_t K, const float* scale, const float* bias, \
                         float* y, int64_t ldy, int64_t n0, bool prefetch, const float* block_scale) {            \
    constexpr int64_t kLine = 64 / sizeof(W);                                                                     \
    __m256 acc[M][R];                                                                                             \
    BILD_UNROLL for (int m = 0; m < M; ++m)                                                                       \
      BILD_UNROLL for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();                                    \
    const int64_t K8 = K & ~int64_t{7};                                                                           \
    const W* wr = w + n0 * K;                                                                                     \
    const W* ahead = wr + 2 * R * K;                                                                              \
    for (int64_t k = 0; k < K8; k += 8) {                                                                         \
      if (prefetch && (k & (kLine - 1)) == 0) {                                                                   \
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(ahead + r * K + k), _MM_HINT_T0);  \
      }                                                                                                           \
      __m256 xv[M];                                                                                               \
      BILD_UNROLL for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + k);                           \
      BILD_UNROLL for (int r = 0; r < R; ++r) {                                                                   \
        __m256 wv = load8(wr + r * K + k);                                                                        \
        if constexpr (BLOCKED)                                                                                    \
          wv = _mm256_mul_ps(wv, _mm256_broadcast_ss(block_scale + (n0 + r) * (K / 32) + k / 32));                \
        BILD_UNROLL for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(xv[m], wv, acc[m][r]);                \
      }                                                                                                           \
    }                                                                                                             \
    /* every index a constant (unrolled), so the accumulators stay in registers instead of being stored each k */ \
    float sums[M][R];                                                                                             \
    BILD_UNROLL for (int m = 0; m < M; ++m)                                                                       \
      BILD_UNROLL for (int r = 0; r < R; ++r) sums[m][r] = reduce_lanes(acc[m][r]);                               \
    for (int m = 0; m < M; ++m) {                                                                                 \
      for (int r = 0; r < R; ++r) {                                                                               \
        float s = sums[m][r];                                                                                     \
        for (int64_t k = K8; k < K; ++k) s = std::fma(x[m * ldx + k], static_cast<float>(wr[r * K + k]), s);     \
        if (scale != nullptr) s *= scale[n0 + r];                                                                 \
        if (bias != nullptr) s += bias[n0 + r];                                                                   \
        y[m * ldy + n0 + r] = s;                                                                                  \
      }                                                                                                           \
    }                                                                                                             \
  }

#define BILD_LOAD8(TARGET)                                                                                        \
  TARGET inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }                                      \
  TARGET inline __m256 load8(const int8_t* p) { /* exact: |q| <= 127 */                                          \
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));       \
  }

// Q4_1 (a GGUF's 4-bit matrix, the default large model's layers): each run of 32 weights of a row has a scale d
// and a minimum m, and 16 bytes of 4-bit values q, byte j holding weight j (low nibble) and weight j + 16 (high
// nibble). q is qweight [N, K / 2] uint8 (a row's blocks in order), (d, m) dm [N, K / 32, 2] float32. The weight
// is rebuilt as fma(d, q, m): d * q is exact in float32 (d an fp16 value, q < 16), so that is the one rounding of
// d * q + m, the value a loader's float32 copy holds; each k-step of 8 weights is then multiplied into the same
// accumulators in the same order as the float32 kernel, so the result is cpu_linear's on those weights, bit for
// bit, from 0.75 bytes a weight instead of 4.
#define BILD_ROWS_BLOCK_Q4_1(TARGET, TABLE)                                                                       \
  template <int M, int R>                                                                                         \
  TARGET void rows_block_q4_1(const float* x, int64_t ldx, const uint8_t* q, const float* dm, int64_t K,          \
                              const float* bias, float* y, int64_t ldy, int64_t n0, bool prefetch) {              \
    __m256 acc[M][R];                                                                                             \
    BILD_UNROLL for (int m = 0; m < M; ++m)                                                                       \
      BILD_UNROLL for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();                                    \
    const int64_t nb = K / 32, qrow = K / 2;                                                                      \
    const uint8_t* qr = q + n0 * qrow;                                                                            \
    const float* dr = dm + n0 * nb * 2;                                                                           \
    const __m256i low = _mm256_set1_epi32(15);                                                                    \
    const __m256 iota_lo = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);                                                \
    const __m256 iota_hi = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);                                          \
    for (int64_t b = 0; b < nb; ++b) {                                                                            \
      if (prefetch) { /* two groups ahead: a line of q every 4 blocks, of dm every 8 */                         \
        if ((b & 3) == 0)                                                                                         \
          for (int r = 0; r < R; ++r)                                                                             \
            _mm_prefetch(reinterpret_cast<const char*>(qr + (2 * R + r) * qrow + b * 16), _MM_HINT_T0);           \
        if ((b & 7) == 0)                                                                                         \
          for (int r = 0; r < R; ++r)                                                                             \
            _mm_prefetch(reinterpret_cast<const char*>(dr + ((2 * R + r) * nb + b) * 2), _MM_HINT_T0);            \
      }                                                                                                           \
      /* TABLE: the block's 16 possible weights fma(d, j, m), j = 0..15, in two registers a row; each weight is  \
         then one two-register lookup by its nibble (vpermt2ps reads the index's low 4 bits only) */           \
      __m256 tlo[TABLE ? R : 1], thi[TABLE ? R : 1];                                                              \
      if constexpr (TABLE) {                                                                                      \
        BILD_UNROLL for (int r = 0; r < R; ++r) {                                                                 \
          const __m256 d = _mm256_broadcast_ss(dr + (r * nb + b) * 2), m = _mm256_broadcast_ss(dr + (r * nb + b) * 2 + 1); \
          tlo[r] = _mm256_fmadd_ps(d, iota_lo, m);                                                                \
          thi[r] = _mm256_fmadd_ps(d, iota_hi, m);                                                                \
        }                                                                                                         \
      }                                                                                                           \
      BILD_UNROLL for (int s = 0; s < 4; ++s) { /* k-steps of 8: low nibbles of bytes 0-7, 8-15, then high */     \
        const int64_t k = b * 32 + s * 8;                                                                         \
        __m256 xv[M];                                                                                             \
        BILD_UNROLL for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + k);                         \
        BILD_UNROLL for (int r = 0; r < R; ++r) {                                                                 \
          const __m256i bytes = _mm256_cvtepu8_epi32(                                                             \
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qr + r * qrow + b * 16 + (s & 1) * 8)));           \
          __m256 wv;                                                                                              \
          if constexpr (TABLE) {                                                                                  \
            wv = _mm256_permutex2var_ps(tlo[r], s < 2 ? bytes : _mm256_srli_epi32(bytes, 4), thi[r]);             \
          } else {                                                                                                \
            const __m256i nib = s < 2 ? _mm256_and_si256(bytes, low) : _mm256_srli_epi32(bytes, 4);               \
            const float* p = dr + (r * nb + b) * 2;                                                               \
            wv = _mm256_fmadd_ps(_mm256_broadcast_ss(p), _mm256_cvtepi32_ps(nib), _mm256_broadcast_ss(p + 1));    \
          }                                                                                                       \
          BILD_UNROLL for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(xv[m], wv, acc[m][r]);              \
        }                                                                                                         \
      }                                                                                                           \
    }                                                                                                             \
    float sums[M][R];                                                                                             \
    BILD_UNROLL for (int m = 0; m < M; ++m)                                                                       \
      BILD_UNROLL for (int r = 0; r < R; ++r) sums[m][r] = reduce_lanes(acc[m][r]);                               \
    for (int m = 0; m < M; ++m)                                                                                   \
      for (int r = 0; r < R; ++r) y[m * ldy + n0 + r] = bias != nullptr ? sums[m][r] + bias[n0 + r] : sums[m][r]; \
  }

namespace avx2 {
BILD_LOAD8(BILD_AVX2)
BILD_ROWS_BLOCK(BILD_AVX2)
BILD_ROWS_BLOCK_Q4_1(BILD_AVX2, false)
}  // namespace avx2
namespace avx512 {
BILD_LOAD8(BILD_AVX512)
BILD_ROWS_BLOCK(BILD_AVX512)
BILD_ROWS_BLOCK_Q4_1(BILD_AVX512, true)
}  // namespace avx512
#undef BILD_ROWS_BLOCK
#undef BILD_ROWS_BLOCK_Q4_1
#undef BILD_LOAD8

// Rows per block: M * R accumulators + M inputs + a weight within 16 (AVX2) or 32 (AVX-512VL) registers.
template <Isa I>
constexpr int rows_per_block(int M) {
  if constexpr (I == Isa::kAvx2) {
    return M <= 3 ? 4 : (M == 4 ? 3 : (M <= 6 ? 2 : 1));
  } else {
    return M == 1 ? 4 : (M <= 3 ? 8 : (M == 4 ? 6 : (M == 5 ? 4 : (M <= 7 ? 3 : 2))));
  }
}

template <Isa I, typename W, int M, int R, bool BLOCKED>
inline void block_of(const float* x, int64_t ldx, const W* w, int64_t K, const float* scale, const float* bias,
                     float* y, int64_t ldy, int64_t n0, bool prefetch, const float* block_scale) {
  if constexpr (I == Isa::kAvx2) {
    avx2::rows_block<W, M, R, BLOCKED>(x, ldx, w, K, scale, bias, y, ldy, n0, prefetch, block_scale);
  } else {
    avx512::rows_block<W, M, R, BLOCKED>(x, ldx, w, K, scale, bias, y, ldy, n0, prefetch, block_scale);
  }
}

template <Isa I, typename W, int M, bool BLOCKED = false>
void rows_range(const float* x, int64_t ldx, const W* w, int64_t K, const float* scale, const float* bias, float* y,
                int64_t ldy, int64_t begin, int64_t end, const float* block_scale) {
  constexpr int R = rows_per_block<I>(M);
  int64_t n = begin;
  for (; n + R <= end; n += R) {
    block_of<I, W, M, R, BLOCKED>(x, ldx, w, K, scale, bias, y, ldy, n, n + 3 * R <= end, block_scale);
  }
  for (; n < end; ++n) {  // same order per output
    block_of<I, W, M, 1, BLOCKED>(x, ldx, w, K, scale, bias, y, ldy, n, false, block_scale);
  }
}

template <typename W>
using RowsFn = void (*)(const float*, int64_t, const W*, int64_t, const float*, const float*, float*, int64_t,
                        int64_t, int64_t, const float*);
template <Isa I, typename W, bool BLOCKED>
constexpr RowsFn<W> kRowsFns[kMaxRows] = {rows_range<I, W, 1, BLOCKED>, rows_range<I, W, 2, BLOCKED>,
                                          rows_range<I, W, 3, BLOCKED>, rows_range<I, W, 4, BLOCKED>,
                                          rows_range<I, W, 5, BLOCKED>, rows_range<I, W, 6, BLOCKED>,
                                          rows_range<I, W, 7, BLOCKED>, rows_range<I, W, 8, BLOCKED>};

// Whether the kernels run their AVX-512VL build: the CPU has it and BILD_CPU_NO_AVX512 is unset (read once; the
// tests set it in a subprocess to check that both builds give the same bits).
bool has_avx512vl() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           std::getenv("BILD_CPU_NO_AVX512") == nullptr;
  }();
  return ok;
}

// y[M, N] for any M: the output rows split over the threads, and each thread's rows done for chunks of up to
// kMaxRows input rows, each chunk over the same weights (hot in cache after the first): fn(m0, rows, begin, end).
// grain: 64 output rows (>= 37 KB of float32 weights for K = 576), so a thread's share is worth waking it for.
template <typename Fn>
void over_chunks(int64_t M, int64_t N, const Fn& fn) {
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) fn(m0, std::min(kMaxRows, M - m0), begin, end);
  });
}

template <typename W, bool BLOCKED = false>
void rows_all(const float* x, int64_t ldx, int64_t M, const W* w, int64_t K, int64_t N, const float* scale,
              const float* bias, float* y, const float* block_scale = nullptr) {
  const RowsFn<W>* fns = has_avx512vl() ? kRowsFns<Isa::kAvx512, W, BLOCKED> : kRowsFns<Isa::kAvx2, W, BLOCKED>;
  over_chunks(M, N, [&](int64_t m0, int64_t rows, int64_t begin, int64_t end) {
    fns[rows - 1](x + m0 * ldx, ldx, w, K, scale, bias, y + m0 * N, N, begin, end, block_scale);
  });
}

// Rows per block of the Q4_1 kernel: M * R accumulators + M inputs + ~4 temporaries.
template <Isa I>
constexpr int rows_per_block_q4_1(int M) {
  if constexpr (I == Isa::kAvx2) {
    return M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  } else {
    return M == 1 ? 8 : (M <= 3 ? 6 : (M == 4 ? 5 : (M == 5 ? 4 : (M == 6 ? 3 : 2))));
  }
}

template <Isa I, int M, int R>
inline void block_of_q4_1(const float* x, int64_t ldx, const uint8_t* q, const float* dm, int64_t K,
                          const float* bias, float* y, int64_t ldy, int64_t n0, bool prefetch) {
  if constexpr (I == Isa::kAvx2) {
    avx2::rows_block_q4_1<M, R>(x, ldx, q, dm, K, bias, y, ldy, n0, prefetch);
  } else {
    avx512::rows_block_q4_1<M, R>(x, ldx, q, dm, K, bias, y, ldy, n0, prefetch);
  }
}

template <Isa I, int M>
void rows_range_q4_1(const float* x, int64_t ldx, const uint8_t* q, const float* dm, int64_t K, const float* bias,
                     float* y, int64_t ldy, int64_t begin, int64_t end) {
  constexpr int R = rows_per_block_q4_1<I>(M);
  int64_t n = begin;
  for (; n + R <= end; n += R) block_of_q4_1<I, M, R>(x, ldx, q, dm, K, bias, y, ldy, n, n + 3 * R <= end);
  for (; n < end; ++n) block_of_q4_1<I, M, 1>(x, ldx, q, dm, K, bias, y, ldy, n, false);
}

using RowsFnQ4 = void (*)(const float*, int64_t, const uint8_t*, const float*, int64_t, const float*, float*,
                          int64_t, int64_t, int64_t);
template <Isa I>
constexpr RowsFnQ4 kRowsFnsQ4[kMaxRows] = {rows_range_q4_1<I, 1>, rows_range_q4_1<I, 2>, rows_range_q4_1<I, 3>,
                                           rows_range_q4_1<I, 4>, rows_range_q4_1<I, 5>, rows_range_q4_1<I, 6>,
                                           rows_range_q4_1<I, 7>, rows_range_q4_1<I, 8>};

void rows_all_q4_1(const float* x, int64_t ldx, int64_t M, const uint8_t* q, const float* dm, int64_t K, int64_t N,
                   const float* bias, float* y) {
  const RowsFnQ4* fns = has_avx512vl() ? kRowsFnsQ4<Isa::kAvx512> : kRowsFnsQ4<Isa::kAvx2>;
  over_chunks(M, N, [&](int64_t m0, int64_t rows, int64_t begin, int64_t end) {
    fns[rows - 1](x + m0 * ldx, ldx, q, dm, K, bias, y + m0 * N, N, begin, end);
  });
}

// Q4_1 x int16 (cpu_linear_q4_1x16): the same Q4_1 weights, repacked once (reference.q4_1x16_pack) so that
// each 512-bit register holds 16 output rows, and the activations rounded to int16 per run of 32 (one scale a
// run: amax / 32767, so each rounding error is at most 2^-16 of the run's largest |x|). A block's dot product
// is then exact integer arithmetic: vpdpwssd multiplies pairs of int16 (a weight's 4-bit q, an activation) and
// adds both products to an int32 lane, 16 output rows at once; per block and row one conversion and two FMAs
// apply the scales: y += (d * dx) * sum(q * xq) + m * sum(x) (the m term from the float sum of the run, not
// the rounded one). Against the float kernel it removes the per-weight table lookup and float FMA (the float
// kernels are compute-bound on this CPU at every M), at the price of the activation rounding.
// Layout per 16 output rows g and block b: packed[g, b, t, n, 0..3] (4 bytes = 8 nibbles a row n, t = 0..3):
// nibble s (bits 4s..4s+3) is q[n, 8t + 2s] and nibble s + 4 is q[n, 8t + 2s + 1], so (v >> 4s) & 0x000F000F
// gives row n's pair (k, k + 1) = (8t + 2s, 8t + 2s + 1) as two int16, to meet the activations' pair there.
// dm16[g, b, 0, n] = d, dm16[g, b, 1, n] = m. Order: each (row m, output n) sums its blocks in increasing b, so
// a row's result does not depend on M, on the other rows, or on the threads.
#define BILD_X16 __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))

// Software prefetch for the packed kernels (x16 and x8, both formats): at each block, the cache lines of the block
// kAheadBlocks further on in the same stream (packed weights and their scales; a group's blocks are contiguous and
// the next group follows, so "further on" crosses groups; a prefetch past the end cannot fault). The hardware
// prefetcher alone lets the loads of a verify pass's rows wait on memory: the loop is too slow at M = 3-4 for it to
// run far enough ahead. Measured on the 2-core AMD EPYC, a forward's products (30 layers and the head, int16
// activations): a verify pass over 3 rows 1.20x a decode step without, 1.05-1.10x with; the decode step itself
// 0-7% faster (2 threads).
constexpr int64_t kAheadBlocks = 8;
// (the address in integers: a pointer past the end of its array is not formed)
BILD_X16 inline void prefetch_lines(const void* base, int64_t offset, int bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(offset);
  for (int l = 0; l < bytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(a + l), _MM_HINT_T0);
}
// Block i (of 16 rows, in the order of the packed streams) kAheadBlocks further on, in each format: Q4_1 256 bytes
// of nibbles and 16 (d, m) pairs in float32; Q8_0 512 bytes of int8 and 16 float32 scales.
BILD_X16 inline void prefetch_q4_1x16_ahead(const uint8_t* pk, const float* dm, int64_t i) {
  prefetch_lines(pk, (i + kAheadBlocks) * 256, 256);
  prefetch_lines(dm, (i + kAheadBlocks) * 128, 128);
}
BILD_X16 inline void prefetch_q8_0x16_ahead(const int8_t* pk, const float* d, int64_t i) {
  prefetch_lines(pk, (i + kAheadBlocks) * 512, 512);
  prefetch_lines(d, (i + kAheadBlocks) * 64, 64);
}

// One run of 32 activations p[0..31] scaled to [-top, top]: its 32 values rounded to nearest even (the default
// MXCSR mode) as int32 (|x * inv| <= top up to one rounding), the scale amax / top and the float sum (in a fixed
// order: the 16 lanes' pairwise sums of x[i] + x[i + 16], then reduce_add's tree).
struct RoundedRun {
  __m512i i0, i1;
  float dx, sx;
};
BILD_X16 inline RoundedRun round_run(const float* p, float top) {
  const __m512 a0 = _mm512_loadu_ps(p), a1 = _mm512_loadu_ps(p + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
  const __m512 inv = _mm512_set1_ps(amax > 0 ? top / amax : 0.0f);
  return {_mm512_cvtps_epi32(_mm512_mul_ps(a0, inv)), _mm512_cvtps_epi32(_mm512_mul_ps(a1, inv)), amax / top,
          _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))};
}

// x [M, K] -> xq [M, K] int16 (saturated), dx [M, K / 32] (amax / 32767), sx [M, K / 32] (the run's float sum).
BILD_X16 void quantize_rows_x16(const float* x, int64_t ldx, int64_t M, int64_t K, int16_t* xq, float* dx,
                                 float* sx) {
  const int64_t nb = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const RoundedRun r = round_run(x + m * ldx + b * 32, 32767.0f);
      dx[m * nb + b] = r.dx;
      sx[m * nb + b] = r.sx;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + m * K + b * 32), _mm512_cvtsepi32_epi16(r.i0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + m * K + b * 32 + 16), _mm512_cvtsepi32_epi16(r.i1));
    }
  }
}

// G groups of 16 output rows, starting at group g0, for M activation rows.
template <int M, int G>
BILD_X16 void groups_x16(const int16_t* xq, const float* dx, const float* sx, int64_t K, const uint8_t* pk,
                         const float* dm, const float* bias, float* y, int64_t ldy, int64_t g0) {
  const int64_t nb = K / 32;
  __m512 acc[M][G];
  BILD_UNROLL for (int m = 0; m < M; ++m) BILD_UNROLL for (int g = 0; g < G; ++g) acc[m][g] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi32(0x000F000F);
  for (int64_t b = 0; b < nb; ++b) {
    __m512i is[M][G];
    BILD_UNROLL for (int g = 0; g < G; ++g) prefetch_q4_1x16_ahead(pk, dm, (g0 + g) * nb + b);
    BILD_UNROLL for (int m = 0; m < M; ++m) BILD_UNROLL for (int g = 0; g < G; ++g) is[m][g] = _mm512_setzero_si512();
    BILD_UNROLL for (int t = 0; t < 4; ++t) {
      __m512i v[G];
      BILD_UNROLL for (int g = 0; g < G; ++g) v[g] = _mm512_loadu_si512(pk + ((g0 + g) * nb + b) * 256 + t * 64);
      BILD_UNROLL for (int s = 0; s < 4; ++s) {
        __m512i xs[M];
        BILD_UNROLL for (int m = 0; m < M; ++m) {
          int32_t pair;
          std::memcpy(&pair, xq + m * K + b * 32 + 8 * t + 2 * s, sizeof(pair));
          xs[m] = _mm512_set1_epi32(pair);
        }
        BILD_UNROLL for (int g = 0; g < G; ++g) {
          const __m512i w = _mm512_and_si512(s == 0 ? v[g] : _mm512_srli_epi32(v[g], 4 * s), low);
          BILD_UNROLL for (int m = 0; m < M; ++m) is[m][g] = _mm512_dpwssd_epi32(is[m][g], w, xs[m]);
        }
      }
    }
    BILD_UNROLL for (int g = 0; g < G; ++g) {
      const float* d = dm + ((g0 + g) * nb + b) * 32;
      const __m512 dv = _mm512_loadu_ps(d), mv = _mm512_loadu_ps(d + 16);
      BILD_UNROLL for (int m = 0; m < M; ++m) {
        const __m512 scale = _mm512_mul_ps(dv, _mm512_set1_ps(dx[m * nb + b]));
        acc[m][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[m][g]), scale, acc[m][g]);
        acc[m][g] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[m * nb + b]), acc[m][g]);
      }
    }
  }
  BILD_UNROLL for (int m = 0; m < M; ++m) BILD_UNROLL for (int g = 0; g < G; ++g) {
    __m512 out = acc[m][g];
    if (bias != nullptr) out = _mm512_add_ps(out, _mm512_loadu_ps(bias + (g0 + g) * 16));
    _mm512_storeu_ps(y + m * ldy + (g0 + g) * 16, out);
  }
}

template <int M>
void range_x16(const int16_t* xq, const float* dx, const float* sx, int64_t K, const uint8_t* pk, const float* dm,
               const float* bias, float* y, int64_t ldy, int64_t begin, int64_t end) {
  constexpr int G = 1;  // groups at a time: 1 measured fastest at M = 1 and 4 (2-4 groups: 20-30% slower, register pressure)
  int64_t g = begin;
  for (; g + G <= end; g += G) groups_x16<M, G>(xq, dx, sx, K, pk, dm, bias, y, ldy, g);
  for (; g < end; ++g) groups_x16<M, 1>(xq, dx, sx, K, pk, dm, bias, y, ldy, g);
}

using RangeX16 = void (*)(const int16_t*, const float*, const float*, int64_t, const uint8_t*, const float*,
                          const float*, float*, int64_t, int64_t, int64_t);
// Activation rows a chunk multiplies at once: up to 8 (8 float and 8 integer accumulators and 8 broadcasts fit the
// 32 registers), so a batch's verify pass of 5-8 rows reads each weight once (it was 4: two passes). The 30 layers'
// products on 2 threads of the AMD EPYC, chunks of 4 against 8 (in-process, interleaved): 5 rows 7.5 -> 6.2 ms, 8
// rows 10.0 -> 8.7; 16 and 40 rows (tiled) unchanged; 1-4 rows are the same kernels as before.
constexpr int64_t kMaxRowsX16 = 8;
constexpr RangeX16 kRangesX16[kMaxRowsX16] = {range_x16<1>, range_x16<2>, range_x16<3>, range_x16<4>,
                                              range_x16<5>, range_x16<6>, range_x16<7>, range_x16<8>};

// x [M, K] rounded as quantize_rows_x16 rounds it, in buffers of its own.
struct QuantizedX16 {
  std::vector<int16_t> xq;
  std::vector<float> dx, sx;
  QuantizedX16(const float* x, int64_t ldx, int64_t M, int64_t K)
      : xq(static_cast<size_t>(M * K)), dx(static_cast<size_t>(M * (K / 32))), sx(static_cast<size_t>(M * (K / 32))) {
    quantize_rows_x16(x, ldx, M, K, xq.data(), dx.data(), sx.data());
  }
};

// Quantises x once, then fn(xq, dx, sx, m0, rows, begin, end) for chunks of up to kMaxRowsX16 activation rows
// over the output groups of each thread (grain: 4 groups, 64 output rows, as the float kernels' 64). With more
// than one chunk (a prefill, a batch's verify pass) the groups go in tiles of ~96 KB of packed weights, every
// chunk over a tile before the next, so that the weights stream from memory once and the chunks read them from the
// L2 cache (against once a chunk before: a prefill of 64 tokens read each layer's weights 16 times). The order of
// each output's sum is unchanged.
template <typename Fn>
void over_x16(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t N, const Fn& fn) {
  const int64_t nb = K / 32;
  const QuantizedX16 q(x, ldx, M, K);
  const int64_t tile = std::max<int64_t>(1, (96 << 10) / (nb * 384));  // groups: ~96 KB of q + dm (Q4_1; Q8_0 ~ 1.5x)
  at::parallel_for(0, N / 16, 4, [&](int64_t begin, int64_t end) {
    const int64_t step = M > kMaxRowsX16 ? tile : end - begin;
    for (int64_t g0 = begin; g0 < end; g0 += step) {
      const int64_t g1 = std::min(end, g0 + step);
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRowsX16) {
        fn(q.xq.data() + m0 * K, q.dx.data() + m0 * nb, q.sx.data() + m0 * nb, m0, std::min(kMaxRowsX16, M - m0), g0,
           g1);
      }
    }
  });
}

void rows_all_x16(const float* x, int64_t ldx, int64_t M, const uint8_t* pk, const float* dm, int64_t K, int64_t N,
                  const float* bias, float* y) {
  over_x16(x, ldx, M, K, N, [&](const int16_t* xq, const float* dx, const float* sx, int64_t m0, int64_t rows,
                                int64_t begin, int64_t end) {
    kRangesX16[rows - 1](xq, dx, sx, K, pk, dm, bias, y + m0 * N, N, begin, end);
  });
}

// Q8_0 x int16 (cpu_linear_q8_0x16): a Q8_0 matrix (int8 q, a scale d per 32 weights of a row: the default large
// model's head) repacked 16 output rows a register (reference.q8_0x16_pack): per group g of 16 rows and block b,
// packed[g, b, p, n, 0..1] = q[16g + n, 32b + 2p + {0, 1}] (int8), d16[g, b, n] = d. Each pair p sign-extends to
// two int16 a lane (vpmovsxbw) and meets the activations' pair (2p, 2p + 1) in vpdpwssd; per block and row one
// conversion and one FMA apply d * dx. The activations as in cpu_linear_q4_1x16.
template <int M, int G>
BILD_X16 void groups_q8_x16(const int16_t* xq, const float* dx, int64_t K, const int8_t* pk, const float* d,
                            const float* bias, float* y, int64_t ldy, int64_t g0) {
  const int64_t nb = K / 32;
  __m512 acc[M][G];
  BILD_UNROLL for (int m = 0; m < M; ++m) BILD_UNROLL for (int g = 0; g < G; ++g) acc[m][g] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i is[M][G];
    BILD_UNROLL for (int g = 0; g < G; ++g) prefetch_q8_0x16_ahead(pk, d, (g0 + g) * nb + b);
    BILD_UNROLL for (int m = 0; m < M; ++m) BILD_UNROLL for (int g = 0; g < G; ++g) is[m][g] = _mm512_setzero_si512();
    BILD_UNROLL for (int p = 0; p < 16; ++p) {
      __m512i xs[M];
      BILD_UNROLL for (int m = 0; m < M; ++m) {
        int32_t pair;
        std::memcpy(&pair, xq + m * K + b * 32 + 2 * p, sizeof(pair));
        xs[m] = _mm512_set1_epi32(pair);
      }
      BILD_UNROLL for (int g = 0; g < G; ++g) {
        const __m512i w = _mm512_cvtepi8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pk + ((g0 + g) * nb + b) * 512 + p * 32)));
        BILD_UNROLL for (int m = 0; m < M; ++m) is[m][g] = _mm512_dpwssd_epi32(is[m][g], w, xs[m]);
      }
    }
    BILD_UNROLL for (int g = 0; g < G; ++g) {
      const __m512 dv = _mm512_loadu_ps(d + ((g0 + g) * nb + b) * 16);
      BILD_UNROLL for (int m = 0; m < M; ++m) {
        acc[m][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[m][g]), _mm512_mul_ps(dv, _mm512_set1_ps(dx[m * nb + b])),
                                    acc[m][g]);
      }
    }
  }
  BILD_UNROLL for (int m = 0; m < M; ++m) BILD_UNROLL for (int g = 0; g < G; ++g) {
    __m512 out = acc[m][g];
    if (bias != nullptr) out = _mm512_add_ps(out, _mm512_loadu_ps(bias + (g0 + g) * 16));
    _mm512_storeu_ps(y + m * ldy + (g0 + g) * 16, out);
  }
}

template <int M>
void range_q8_x16(const int16_t* xq, const float* dx, int64_t K, const int8_t* pk, const float* d, const float* bias,
                  float* y, int64_t ldy, int64_t begin, int64_t end) {
  constexpr int G = 1;  // as range_x16: one group at a time measured fastest
  int64_t g = begin;
  for (; g + G <= end; g += G) groups_q8_x16<M, G>(xq, dx, K, pk, d, bias, y, ldy, g);
  for (; g < end; ++g) groups_q8_x16<M, 1>(xq, dx, K, pk, d, bias, y, ldy, g);
}

using RangeQ8X16 = void (*)(const int16_t*, const float*, int64_t, const int8_t*, const float*, const float*, float*,
                            int64_t, int64_t, int64_t);
constexpr RangeQ8X16 kRangesQ8X16[kMaxRowsX16] = {range_q8_x16<1>, range_q8_x16<2>, range_q8_x16<3>, range_q8_x16<4>,
                                                  range_q8_x16<5>, range_q8_x16<6>, range_q8_x16<7>, range_q8_x16<8>};

void rows_all_q8_x16(const float* x, int64_t ldx, int64_t M, const int8_t* pk, const float* d, int64_t K, int64_t N,
                     const float* bias, float* y) {
  over_x16(x, ldx, M, K, N, [&](const int16_t* xq, const float* dx, const float*, int64_t m0, int64_t rows,
                                int64_t begin, int64_t end) {
    kRangesQ8X16[rows - 1](xq, dx, K, pk, d, bias, y + m0 * N, N, begin, end);
  });
}

// Logit statistics with the head's product (cpu_linear_q8_0x16_stats): what the engine's verification and its
// non-finite screen read from a pass's logits (each row's max, first argmax, logsumexp, and whether every logit is
// finite), taken segment by segment (kStatGroups output groups, 1,024 logits) right after the segment's product,
// by the thread that wrote it, while the segment is still in its cache. A separate pass after the product reads
// the logits back cold (each thread's columns in the other core's cache: 74-128 us for one to four rows of 49,152
// on the 2-core AMD EPYC, against ~10 us hot). Segment statistics: max (16 lanes, then the lanes), first index of
// it, sum(exp(z - max)) (exp8, the 8 lanes in reduce_lanes' tree, the halves in order), finite (every z - z == 0);
// a row's are combined over its segments in increasing order (combine_segments): the same bits whatever the thread
// count, within float32 rounding of cpu_verify_draft's own statistics (one pass over the row).
constexpr int64_t kStatGroups = 64;
struct SegStats {
  float max;
  float sum;  // sum(exp(z - max)) over the segment
  int64_t arg;  // column of the segment's first max
  bool finite;
};

BILD_X16 void segment_stats(const float* z, int64_t col0, int64_t n, SegStats* out) {
  // n: a multiple of 16 (whole output groups)
  __m512 m = _mm512_loadu_ps(z);
  __mmask16 ok = 0xFFFF;
  for (int64_t k = 0; k < n; k += 16) {
    const __m512 v = _mm512_loadu_ps(z + k);
    ok &= _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_EQ_OQ);  // NaN, +-inf: not 0
    m = _mm512_max_ps(m, v);
  }
  if (ok != 0xFFFF) {
    *out = SegStats{0.0f, 0.0f, col0, false};
    return;
  }
  const float mx = _mm512_reduce_max_ps(m);
  int64_t arg = 0;
  while (z[arg] != mx) ++arg;
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; k += 8) acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(_mm256_loadu_ps(z + k), vmx)));
  *out = SegStats{mx, reduce_lanes(acc), col0 + arg, true};
}

// Row m's statistics from its S segments st[m * S + s].
void combine_segments(const SegStats* st, int64_t M, int64_t S, float* row_max, float* row_lse, int64_t* row_arg,
                      bool* finite) {
  for (int64_t m = 0; m < M; ++m) {
    const SegStats* r = st + m * S;
    bool fin = true;
    int64_t best = 0;
    for (int64_t s = 0; s < S; ++s) {
      fin &= r[s].finite;
      if (r[s].max > r[best].max) best = s;  // strictly greater: the first segment holding the max
    }
    finite[m] = fin;
    if (!fin) {
      row_max[m] = row_lse[m] = 0.0f;
      row_arg[m] = 0;
      continue;
    }
    const float mx = r[best].max;
    float sum = 0.0f;
    for (int64_t s = 0; s < S; ++s) sum += r[s].sum * std::exp(r[s].max - mx);
    row_max[m] = mx;
    row_arg[m] = r[best].arg;
    row_lse[m] = mx + std::log(sum);
  }
}

// For each segment of y [M, N] in parallel: product(g0, g1) (the segment's output groups; nothing where y is made
// already), then its rows' statistics st[m * S + s], by the same thread.
template <typename Fn>
void over_segments(float* y, int64_t M, int64_t N, SegStats* st, const Fn& product) {
  const int64_t G = N / 16, S = (G + kStatGroups - 1) / kStatGroups;
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t g0 = s * kStatGroups, g1 = std::min(G, g0 + kStatGroups);
      product(g0, g1);
      for (int64_t m = 0; m < M; ++m) segment_stats(y + m * N + g0 * 16, g0 * 16, (g1 - g0) * 16, &st[m * S + s]);
    }
  });
}

// rows_all_q8_x16 segment by segment, st [M, S] filled. The products' bits are rows_all_q8_x16's: every output's
// sum is in the same order.
void rows_all_q8_x16_stats(const float* x, int64_t ldx, int64_t M, const int8_t* pk, const float* d, int64_t K,
                           int64_t N, const float* bias, float* y, SegStats* st) {
  const int64_t nb = K / 32;
  const QuantizedX16 q(x, ldx, M, K);
  over_segments(y, M, N, st, [&](int64_t g0, int64_t g1) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRowsX16) {
      kRangesQ8X16[std::min(kMaxRowsX16, M - m0) - 1](q.xq.data() + m0 * K, q.dx.data() + m0 * nb, K, pk, d, bias,
                                                      y + m0 * N, N, g0, g1);
    }
  });
}

// int8 activations (activation_bits = 8, both weight formats): each run of 32 rounded to int8 (scale amax / 127,
// so each rounding is at most 1/254 of the run's largest |x|: what llama.cpp does to the activations of a Q4_1 or
// Q8_0 product), and each block's integer dot product in vpdpbusd (u8 x s8, four products a lane: half the
// instructions of vpdpwssd's two, the verify pass's matrix products on this CPU being bound by them from M = 3).
// Q4_1 (the x16 packing as is): byte i of a row's word t holds nibbles q[8t + {0, 4, 1, 5}[i]] (low) and
// q[8t + {2, 6, 3, 7}[i]] (high) (see q4_1x16_pack), so the activations are stored in that order within each 8
// (kX8Order) and v & 0x0F, (v >> 4) & 0x0F meet xq's words [8t, 8t + 4) and [8t + 4, 8t + 8) as u8 weights.
// Q8_0: one 64-byte load holds the pairs p = 2h, 2h + 1 of 16 rows; vpermw gathers each row's four bytes into
// its lane, and q ^ 0x80 = q + 128 makes them u8: sum((q + 128) xq) - 128 sum(xq) is the exact product.
// x [M, K] -> xq [M, K] int8 (interleaved: kX8Order within each 8), dx = amax / 127, sx the run's float sum (as
// quantize_rows_x16), xs the run's integer sum of xq.
BILD_X16 void quantize_rows_x8(const float* x, int64_t ldx, int64_t M, int64_t K, bool interleave, int8_t* xq,
                               float* dx, float* sx, int32_t* xs) {
  const int64_t nb = K / 32;
  // kX8Order within each 8 (both 16-byte halves alike), or the identity
  const __m128i order = interleave ? _mm_setr_epi8(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15)
                                   : _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const RoundedRun r = round_run(x + m * ldx + b * 32, 127.0f);
      dx[m * nb + b] = r.dx;
      sx[m * nb + b] = r.sx;
      const __m512i i0 = _mm512_min_epi32(_mm512_max_epi32(r.i0, lo), hi);
      const __m512i i1 = _mm512_min_epi32(_mm512_max_epi32(r.i1, lo), hi);
      xs[m * nb + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + m * K + b * 32), _mm_shuffle_epi8(_mm512_cvtepi32_epi8(i0), order));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + m * K + b * 32 + 16),
                       _mm_shuffle_epi8(_mm512_cvtepi32_epi8(i1), order));
    }
  }
}

BILD_X16 inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}

// One group of 16 output rows (g) of Q4_1 for M rows of int8 activations; two integer chains a row (low and
// high nibbles) so that M = 1 is not bound by vpdpbusd's latency.
template <int M>
BILD_X16 void group_q4_1_x8(const int8_t* xq, const float* dx, const float* sx, int64_t K, const uint8_t* pk,
                            const float* dm, const float* bias, float* y, int64_t ldy, int64_t g) {
  const int64_t nb = K / 32;
  __m512 acc[M];
  BILD_UNROLL for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    __m512i is0[M], is1[M];
    prefetch_q4_1x16_ahead(pk, dm, g * nb + b);
    BILD_UNROLL for (int m = 0; m < M; ++m) is0[m] = is1[m] = _mm512_setzero_si512();
    BILD_UNROLL for (int t = 0; t < 4; ++t) {
      const __m512i v = _mm512_loadu_si512(pk + (g * nb + b) * 256 + t * 64);
      const __m512i w0 = _mm512_and_si512(v, low), w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      BILD_UNROLL for (int m = 0; m < M; ++m) {
        is0[m] = _mm512_dpbusd_epi32(is0[m], w0, bcast4(xq + m * K + b * 32 + 8 * t));
        is1[m] = _mm512_dpbusd_epi32(is1[m], w1, bcast4(xq + m * K + b * 32 + 8 * t + 4));
      }
    }
    const float* d = dm + (g * nb + b) * 32;
    const __m512 dv = _mm512_loadu_ps(d), mv = _mm512_loadu_ps(d + 16);
    BILD_UNROLL for (int m = 0; m < M; ++m) {
      const __m512 scale = _mm512_mul_ps(dv, _mm512_set1_ps(dx[m * nb + b]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(is0[m], is1[m])), scale, acc[m]);
      acc[m] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[m * nb + b]), acc[m]);
    }
  }
  BILD_UNROLL for (int m = 0; m < M; ++m) {
    __m512 out = acc[m];
    if (bias != nullptr) out = _mm512_add_ps(out, _mm512_loadu_ps(bias + g * 16));
    _mm512_storeu_ps(y + m * ldy + g * 16, out);
  }
}

// The same for Q8_0 (q8_0x16_pack's layout): 8 loads a block, each two pairs of 16 rows.
template <int M>
BILD_X16 void group_q8_0_x8(const int8_t* xq, const float* dx, const int32_t* xs, int64_t K, const int8_t* pk,
                            const float* d, const float* bias, float* y, int64_t ldy, int64_t g) {
  const int64_t nb = K / 32;
  // lane n <- (pair 2h of row n, pair 2h + 1 of row n): 16-bit words n and 16 + n of the load
  const __m512i gather = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                          21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[M];
  BILD_UNROLL for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i is0[M], is1[M];
    prefetch_q8_0x16_ahead(pk, d, g * nb + b);
    BILD_UNROLL for (int m = 0; m < M; ++m) is0[m] = is1[m] = _mm512_setzero_si512();
    BILD_UNROLL for (int h = 0; h < 8; h += 2) {
      const int8_t* src = pk + (g * nb + b) * 512 + h * 64;
      const __m512i w0 = _mm512_xor_si512(_mm512_permutexvar_epi16(gather, _mm512_loadu_si512(src)), flip);
      const __m512i w1 = _mm512_xor_si512(_mm512_permutexvar_epi16(gather, _mm512_loadu_si512(src + 64)), flip);
      BILD_UNROLL for (int m = 0; m < M; ++m) {
        is0[m] = _mm512_dpbusd_epi32(is0[m], w0, bcast4(xq + m * K + b * 32 + 4 * h));
        is1[m] = _mm512_dpbusd_epi32(is1[m], w1, bcast4(xq + m * K + b * 32 + 4 * h + 4));
      }
    }
    const __m512 dv = _mm512_loadu_ps(d + (g * nb + b) * 16);
    BILD_UNROLL for (int m = 0; m < M; ++m) {
      const __m512i s = _mm512_sub_epi32(_mm512_add_epi32(is0[m], is1[m]), _mm512_set1_epi32(128 * xs[m * nb + b]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dv, _mm512_set1_ps(dx[m * nb + b])), acc[m]);
    }
  }
  BILD_UNROLL for (int m = 0; m < M; ++m) {
    __m512 out = acc[m];
    if (bias != nullptr) out = _mm512_add_ps(out, _mm512_loadu_ps(bias + g * 16));
    _mm512_storeu_ps(y + m * ldy + g * 16, out);
  }
}

constexpr int64_t kMaxRowsX8 = 4;  // the int8-activation kernels' chunk (two integer chains a row)
// group<rows> of each format, rows = 1..kMaxRowsX8 (the integer sums s: float sx for Q4_1, int xs for Q8_0)
using GroupQ4X8 = void (*)(const int8_t*, const float*, const float*, int64_t, const uint8_t*, const float*,
                           const float*, float*, int64_t, int64_t);
using GroupQ8X8 = void (*)(const int8_t*, const float*, const int32_t*, int64_t, const int8_t*, const float*,
                           const float*, float*, int64_t, int64_t);
constexpr GroupQ4X8 kGroupsQ4X8[kMaxRowsX8] = {group_q4_1_x8<1>, group_q4_1_x8<2>, group_q4_1_x8<3>,
                                                group_q4_1_x8<4>};
constexpr GroupQ8X8 kGroupsQ8X8[kMaxRowsX8] = {group_q8_0_x8<1>, group_q8_0_x8<2>, group_q8_0_x8<3>,
                                                group_q8_0_x8<4>};

// Quantises x once (int8), then for chunks of up to kMaxRowsX8 rows runs group<rows> over each thread's groups.
template <bool Q4>
void rows_all_x8(const float* x, int64_t ldx, int64_t M, const void* pk, const float* scale, int64_t K, int64_t N,
                 const float* bias, float* y) {
  const int64_t nb = K / 32;
  std::vector<int8_t> xq(static_cast<size_t>(M * K));
  std::vector<float> dx(static_cast<size_t>(M * nb)), sx(static_cast<size_t>(M * nb));
  std::vector<int32_t> xs(static_cast<size_t>(M * nb));
  quantize_rows_x8(x, ldx, M, K, Q4, xq.data(), dx.data(), sx.data(), xs.data());
  at::parallel_for(0, N / 16, 4, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRowsX8) {
      const int64_t rows = std::min(kMaxRowsX8, M - m0);
      for (int64_t g = begin; g < end; ++g) {
        if constexpr (Q4) {
          kGroupsQ4X8[rows - 1](xq.data() + m0 * K, dx.data() + m0 * nb, sx.data() + m0 * nb, K,
                                static_cast<const uint8_t*>(pk), scale, bias, y + m0 * N, N, g);
        } else {
          kGroupsQ8X8[rows - 1](xq.data() + m0 * K, dx.data() + m0 * nb, xs.data() + m0 * nb, K,
                                static_cast<const int8_t*>(pk), scale, bias, y + m0 * N, N, g);
        }
      }
    }
  });
}
#endif

bool cpu_supported() {
#ifdef BILD_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool x16_supported() {
#ifdef BILD_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

}  // namespace

// Whether cpu_linear_q4_1x16 runs here (AVX-512 F/VL/BW and VNNI).
bool cpu_linear_q4_1x16_supported() {
  static const bool ok = x16_supported();
  return ok;
}

bool cpu_linear_supported() {
  static const bool ok = cpu_supported();
  return ok;
}

namespace {
// weight_cols: the columns a weight row must have for x's K (K itself; K / 2 for Q4_1's packed nibbles)
void check_common(const char* op, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  int64_t (*weight_cols)(int64_t) = [](int64_t K) { return K; }) {
  TORCH_CHECK(cpu_linear_supported(), op, ": this CPU lacks AVX2/FMA (use the reference)");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, ": x and weight must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, op, ": x must be [M, K] and weight [N, K], got ", x.sizes(),
              " and ", weight.sizes());
  TORCH_CHECK(weight.size(1) == weight_cols(x.size(1)), op, ": x has K=", x.size(1), " columns, so weight rows need ",
              weight_cols(x.size(1)), ", got ", weight.size(1));
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == weight.size(0) && bias->is_contiguous(),
                op, ": bias must be a contiguous float32 [N=", weight.size(0), "] CPU tensor");
  }
}
}  // namespace

at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  // x [M, K] float32 (any M >= 1: chunks of 8 rows, each 64-row block of weights streamed from memory once and
  // re-read from cache by the later chunks), weight [N, K] float32 contiguous, bias [N] float32 or None -> y [M, N]
  check_common("cpu_linear", x, weight, bias);
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "cpu_linear: weight must be float32, got ", weight.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(M >= 1, "cpu_linear: x must have at least one row, got ", M);
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
#ifdef BILD_X86
  rows_all<float>(xc.data_ptr<float>(), xc.stride(0), M, weight.data_ptr<float>(), K, N, nullptr,
                  bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>());
#endif
  return y;
}

at::Tensor cpu_linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const std::optional<at::Tensor>& bias) {
  // x [M, K] float32 (any M), qweight [N, K] int8 contiguous, scale [N] float32, bias [N] float32 or None
  // -> y [M, N] = (x @ qweight.T) * scale + bias
  check_common("cpu_linear_int8", x, qweight, bias);
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "cpu_linear_int8: qweight must be int8, got ",
              qweight.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat && scale.dim() == 1 &&
                  scale.size(0) == N && scale.is_contiguous(),
              "cpu_linear_int8: scale must be a contiguous float32 [N=", N, "] CPU tensor");
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
#ifdef BILD_X86
  if (M > 0) {
    rows_all<int8_t>(xc.data_ptr<float>(), xc.stride(0), M, qweight.data_ptr<int8_t>(), K, N,
                     scale.data_ptr<float>(), bias.has_value() ? bias->data_ptr<float>() : nullptr,
                     y.data_ptr<float>());
  }
#endif
  return y;
}

at::Tensor cpu_linear_q8_0(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& block_scale,
                           const std::optional<at::Tensor>& bias) {
  // x [M, K] float32 (any M), qweight [N, K] int8 contiguous, block_scale [N, K / 32] float32 (K a multiple of
  // 32), bias [N] float32 or None -> y [M, N] = x @ (qweight * block_scale per 32 columns).T + bias: a Q8_0 matrix
  // (a GGUF's q and d), the same bits as cpu_linear on its dequantised float32 weights
  check_common("cpu_linear_q8_0", x, qweight, bias);
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "cpu_linear_q8_0: qweight must be int8, got ",
              qweight.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(K % 32 == 0, "cpu_linear_q8_0: K must be a multiple of 32 (Q8_0 blocks), got ", K);
  TORCH_CHECK(block_scale.device().is_cpu() && block_scale.scalar_type() == at::kFloat && block_scale.dim() == 2 &&
                  block_scale.size(0) == N && block_scale.size(1) == K / 32 && block_scale.is_contiguous(),
              "cpu_linear_q8_0: block_scale must be a contiguous float32 [N=", N, ", K/32=", K / 32, "] CPU tensor");
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
#ifdef BILD_X86
  if (M > 0) {
    rows_all<int8_t, true>(xc.data_ptr<float>(), xc.stride(0), M, qweight.data_ptr<int8_t>(), K, N, nullptr,
                           bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(),
                           block_scale.data_ptr<float>());
  }
#endif
  return y;
}

at::Tensor cpu_linear_q4_1(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& dm,
                           const std::optional<at::Tensor>& bias) {
  // x [M, K] float32 (any M), qweight [N, K / 2] uint8 contiguous (Q4_1 nibbles, a GGUF row's blocks in order),
  // dm [N, K / 32, 2] float32 (each block's d and m), bias [N] float32 or None -> y [M, N] = x @ w.T + bias with
  // w = d * q + m: the same bits as cpu_linear on those float32 weights
  check_common("cpu_linear_q4_1", x, qweight, bias, [](int64_t K) { return K / 2; });
  TORCH_CHECK(qweight.scalar_type() == at::kByte, "cpu_linear_q4_1: qweight must be uint8, got ", qweight.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(K % 32 == 0, "cpu_linear_q4_1: K must be a multiple of 32 (Q4_1 blocks), got ", K);
  TORCH_CHECK(dm.device().is_cpu() && dm.scalar_type() == at::kFloat && dm.dim() == 3 && dm.size(0) == N &&
                  dm.size(1) == K / 32 && dm.size(2) == 2 && dm.is_contiguous(),
              "cpu_linear_q4_1: dm must be a contiguous float32 [N=", N, ", K/32=", K / 32, ", 2] tensor, got ",
              dm.sizes());
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
#ifdef BILD_X86
  if (M > 0) {
    rows_all_q4_1(xc.data_ptr<float>(), xc.stride(0), M, qweight.data_ptr<uint8_t>(), dm.data_ptr<float>(), K, N,
                  bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>());
  }
#endif
  return y;
}

namespace {
// The checks the int16-activation ops share: x float32 [M, K] (K a multiple of 32), qweight of `wtype`
// [N / 16, K / 32, winner...] and `sname` float32 [N / 16, K / 32, sinner...], both contiguous, bias float32 [N]
// or None, all on the CPU. Returns N.
int64_t check_x16(const char* op, const at::Tensor& x, const at::Tensor& qweight, at::ScalarType wtype,
                  std::initializer_list<int64_t> winner, const at::Tensor& scale, const char* sname,
                  std::initializer_list<int64_t> sinner, const std::optional<at::Tensor>& bias,
                  int64_t activation_bits) {
  TORCH_CHECK(cpu_linear_q4_1x16_supported(), op, ": this CPU lacks AVX-512 VNNI (use the float kernel on the blocks)");
  TORCH_CHECK(activation_bits == 8 || activation_bits == 16, op, ": activation_bits must be 8 or 16, got ",
              activation_bits);
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scale.device().is_cpu(), op,
              ": x, qweight and ", sname, " must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, op, ": x must be float32 [M, K], got ", x.scalar_type(),
              " ", x.sizes());
  const int64_t K = x.size(1);
  TORCH_CHECK(K % 32 == 0, op, ": K must be a multiple of 32, got ", K);
  const int64_t G = qweight.dim() >= 1 ? qweight.size(0) : 0;
  std::vector<int64_t> wshape{G, K / 32}, sshape{G, K / 32};
  wshape.insert(wshape.end(), winner);
  sshape.insert(sshape.end(), sinner);
  TORCH_CHECK(qweight.scalar_type() == wtype && qweight.sizes() == at::IntArrayRef(wshape) && qweight.is_contiguous(),
              op, ": qweight must be a contiguous ", wtype, " ", at::IntArrayRef(wshape), " tensor, got ",
              qweight.scalar_type(), " ", qweight.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.sizes() == at::IntArrayRef(sshape) && scale.is_contiguous(),
              op, ": ", sname, " must be a contiguous float32 ", at::IntArrayRef(sshape), " tensor, got ",
              scale.scalar_type(), " ", scale.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == G * 16 && bias->is_contiguous(),
                op, ": bias must be a contiguous float32 [N=", G * 16, "] CPU tensor");
  }
  return G * 16;
}

// y [M, N] for an integer-activation op whose inputs check_x16 accepted: x made row-contiguous, then
// run(x, ldx, M, K, bias or nullptr, y) where there is work (M, N > 0) and the kernels are built (x86-64).
template <typename Run>
at::Tensor x16_output(const at::Tensor& x, int64_t N, const std::optional<at::Tensor>& bias, const Run& run) {
  const int64_t M = x.size(0), K = x.size(1);
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
#ifdef BILD_X86
  if (M > 0 && N > 0) {
    run(xc.data_ptr<float>(), xc.stride(0), M, K, bias.has_value() ? bias->data_ptr<float>() : nullptr,
        y.data_ptr<float>());
  }
#else
  (void)run;
  (void)bias;
#endif
  return y;
}
}  // namespace

at::Tensor cpu_linear_q4_1x16(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& dm,
                              const std::optional<at::Tensor>& bias, int64_t activation_bits) {
  // x [M, K] float32 (any M), qweight uint8 [N / 16, K / 32, 4, 16, 4] and dm float32 [N / 16, K / 32, 2, 16]
  // (reference.q4_1x16_pack of Q4_1 blocks), bias [N] float32 or None -> y [M, N] = x @ w.T + bias, the
  // activations rounded to int16 (rows_all_x16) or int8 (rows_all_x8) per run of 32
  const int64_t N = check_x16("cpu_linear_q4_1x16", x, qweight, at::kByte, {4, 16, 4}, dm, "dm", {2, 16}, bias,
                              activation_bits);
  return x16_output(x, N, bias, [&](const float* xp, int64_t ldx, int64_t M, int64_t K, const float* b, float* y) {
#ifdef BILD_X86
    const uint8_t* w = qweight.data_ptr<uint8_t>();
    if (activation_bits == 8) {
      rows_all_x8<true>(xp, ldx, M, w, dm.data_ptr<float>(), K, N, b, y);
    } else {
      rows_all_x16(xp, ldx, M, w, dm.data_ptr<float>(), K, N, b, y);
    }
#endif
  });
}

at::Tensor cpu_linear_q8_0x16(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& block_scale,
                              const std::optional<at::Tensor>& bias, int64_t activation_bits) {
  // x [M, K] float32 (any M), qweight int8 [N / 16, K / 32, 16, 16, 2] and block_scale float32 [N / 16, K / 32, 16]
  // (reference.q8_0x16_pack of Q8_0 blocks), bias [N] float32 or None -> y [M, N] = x @ w.T + bias, the
  // activations rounded to int16 (rows_all_q8_x16) or int8 (rows_all_x8) per run of 32
  const int64_t N = check_x16("cpu_linear_q8_0x16", x, qweight, at::kChar, {16, 16, 2}, block_scale, "block_scale",
                              {16}, bias, activation_bits);
  return x16_output(x, N, bias, [&](const float* xp, int64_t ldx, int64_t M, int64_t K, const float* b, float* y) {
#ifdef BILD_X86
    const int8_t* w = qweight.data_ptr<int8_t>();
    if (activation_bits == 8) {
      rows_all_x8<false>(xp, ldx, M, w, block_scale.data_ptr<float>(), K, N, b, y);
    } else {
      rows_all_q8_x16(xp, ldx, M, w, block_scale.data_ptr<float>(), K, N, b, y);
    }
#endif
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_linear_q8_0x16_stats(
    const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& block_scale,
    const std::optional<at::Tensor>& bias, int64_t activation_bits) {
  // cpu_linear_q8_0x16's y, and each row's max [M] float32, logsumexp [M] float32 (max + log sum exp(y - max)),
  // first argmax [M] int64 and finite [M] bool (every y of the row finite; where not, the other three are 0)
  const int64_t N = check_x16("cpu_linear_q8_0x16_stats", x, qweight, at::kChar, {16, 16, 2}, block_scale,
                              "block_scale", {16}, bias, activation_bits);
  const int64_t M = x.size(0);
  at::Tensor row_max = at::zeros({M}, x.options()), row_lse = at::zeros({M}, x.options());
  at::Tensor row_arg = at::zeros({M}, x.options().dtype(at::kLong));
  at::Tensor finite = at::zeros({M}, x.options().dtype(at::kBool));
  at::Tensor y = x16_output(x, N, bias, [&](const float* xp, int64_t ldx, int64_t M, int64_t K, const float* b,
                                            float* yp) {
#ifdef BILD_X86
    const int8_t* w = qweight.data_ptr<int8_t>();
    const int64_t S = (N / 16 + kStatGroups - 1) / kStatGroups;
    std::vector<SegStats> st(static_cast<size_t>(M * S));
    if (activation_bits == 8) {
      rows_all_x8<false>(xp, ldx, M, w, block_scale.data_ptr<float>(), K, N, b, yp);
      over_segments(yp, M, N, st.data(), [](int64_t, int64_t) {});  // the product made: its statistics only
    } else {
      rows_all_q8_x16_stats(xp, ldx, M, w, block_scale.data_ptr<float>(), K, N, b, yp, st.data());
    }
    combine_segments(st.data(), M, S, row_max.data_ptr<float>(), row_lse.data_ptr<float>(),
                     row_arg.data_ptr<int64_t>(), finite.data_ptr<bool>());
#endif
  });
  return {y, row_max, row_lse, row_arg, finite};
}

// Which build of the kernels runs here: "avx512vl" (32 registers), "avx2", or "none" (no AVX2/FMA: the ops refuse).
std::string cpu_linear_isa() {
#ifdef BILD_X86
  if (cpu_linear_supported()) return has_avx512vl() ? "avx512vl" : "avx2";
#endif
  return "none";
}

// Whether this module was compiled with OpenMP: only then does at::parallel_for spread the kernels' loops over
// torch's threads (setup.py passes -fopenmp; without it every kernel here runs on the calling thread).
bool cpu_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace bild

TORCH_LIBRARY(bild_kernels_cpu, m) {
  m.def("cpu_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("cpu_linear_int8(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor");
  m.def("cpu_linear_q8_0(Tensor x, Tensor qweight, Tensor block_scale, Tensor? bias) -> Tensor");
  m.def("cpu_linear_q4_1(Tensor x, Tensor qweight, Tensor dm, Tensor? bias) -> Tensor");
  m.def("cpu_linear_q4_1x16(Tensor x, Tensor qweight, Tensor dm, Tensor? bias, int activation_bits=16) -> Tensor");
  m.def("cpu_linear_q8_0x16(Tensor x, Tensor qweight, Tensor block_scale, Tensor? bias, int activation_bits=16) -> "
        "Tensor");
  m.def("cpu_linear_q8_0x16_stats(Tensor x, Tensor qweight, Tensor block_scale, Tensor? bias, "
        "int activation_bits=16) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_linear_q4_1x16_supported() -> bool", &bild::cpu_linear_q4_1x16_supported);
  m.def("cpu_linear_supported() -> bool", &bild::cpu_linear_supported);
  m.def("cpu_openmp() -> bool", &bild::cpu_openmp);
  m.def("cpu_linear_isa() -> str", &bild::cpu_linear_isa);
}

TORCH_LIBRARY_IMPL(bild_kernels_cpu, CPU, m) {
  m.impl("cpu_linear", &bild::cpu_linear);
  m.impl("cpu_linear_int8", &bild::cpu_linear_int8);
  m.impl("cpu_linear_q8_0", &bild::cpu_linear_q8_0);
  m.impl("cpu_linear_q4_1", &bild::cpu_linear_q4_1);
  m.impl("cpu_linear_q4_1x16", &bild::cpu_linear_q4_1x16);
  m.impl("cpu_linear_q8_0x16", &bild::cpu_linear_q8_0x16);
  m.impl("cpu_linear_q8_0x16_stats", &bild::cpu_linear_q8_0x16_stats);
}

// The module is empty: importing bild_kernels._cpu runs the registrations above.
static PyModuleDef bild_cpu_module = {PyModuleDef_HEAD_INIT, "_cpu", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__cpu() { return PyModule_Create(&bild_cpu_module); }
