// cpu_linear: y[M, N] = x[M, K] @ weight[N, K]^T (+ bias[N]) in float32 for a few rows (M <= 8), on x86 CPUs
// with AVX2 and FMA: the large model's verify pass over k + 1 tokens on a CPU (bild_kernels.ops.cpu_linear).
//
// Why: a decode step reads every weight once and is memory-bound; a verify pass over 2-4 tokens should cost
// the same. Library small-M paths do not always manage that (MKL on an AMD EPYC costs about M times one row
// at M = 2..3), so here each group of R weight rows is streamed once while all M input rows (hot in L1) are
// multiplied against it: M x R accumulators of 8 lanes live in registers.
//
// Work split: at::parallel_for over groups of R output rows; each output is computed by one thread alone.
// Summation order: lane j (0..7) accumulates k = j, j + 8, j + 16, ... with FMA in increasing k; the 8 lanes
// are then added in a fixed tree, then the K mod 8 tail in order, then the bias. That order depends on K
// only, so an output row's values are bit-identical whatever M, the row's position in x, R, or the thread
// count (batch invariance: a token verified in a pass of three rows gets the logits it gets alone).
//
// Built into bild_kernels._cpu by setup.py on x86-64; the AVX2 code is compiled with a target attribute and
// only entered when the CPU reports AVX2 and FMA (cpu_linear_supported), so the module loads anywhere.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <Python.h>

#include <cmath>
#include <cstdint>
#include <optional>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BILD_X86 1
#endif

namespace bild {
namespace {

constexpr int64_t kMaxRows = 8;

#ifdef BILD_X86
__attribute__((target("avx2,fma"))) inline float reduce_lanes(__m256 v) {
  // ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)): fixed, whatever the caller
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Output rows [n0, n0 + R) for all M input rows. R is what fits the 16 ymm registers: M * R accumulators.
// prefetch: also touch the rows two groups ahead (they exist), one cache line per row every 16 floats. The
// hardware prefetcher alone keeps too few lines in flight once M > 1 slows the loop: with it, three rows cost
// ~1.4x one; with this, ~1.1x (a 30-layer stack of 3072x576 weights, one thread, AMD EPYC).
template <int M, int R>
__attribute__((target("avx2,fma"))) void rows_block(const float* x, int64_t ldx, const float* w, int64_t K,
                                                     const float* bias, float* y, int64_t ldy, int64_t n0,
                                                     bool prefetch) {
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t{7};
  const float* wr = w + n0 * K;
  const float* ahead = wr + 2 * R * K;
  for (int64_t k = 0; k < K8; k += 8) {
    if (prefetch && (k & 15) == 0) {
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(ahead + r * K + k), _MM_HINT_T0);
    }
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_loadu_ps(wr + r * K + k);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + k), wv, acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < R; ++r) {
      float s = reduce_lanes(acc[m][r]);
      for (int64_t k = K8; k < K; ++k) s = std::fma(x[m * ldx + k], wr[r * K + k], s);
      if (bias != nullptr) s += bias[n0 + r];
      y[m * ldy + n0 + r] = s;
    }
  }
}

template <int M>
void rows_range(const float* x, int64_t ldx, const float* w, int64_t K, const float* bias, float* y, int64_t ldy,
                int64_t begin, int64_t end) {
  constexpr int R = M <= 3 ? 4 : (M == 4 ? 3 : (M <= 6 ? 2 : 1));
  int64_t n = begin;
  for (; n + R <= end; n += R) rows_block<M, R>(x, ldx, w, K, bias, y, ldy, n, n + 3 * R <= end);
  for (; n < end; ++n) rows_block<M, 1>(x, ldx, w, K, bias, y, ldy, n, false);  // the same order per output
}

using RowsFn = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t,
                        int64_t);
constexpr RowsFn kRowsFns[kMaxRows] = {rows_range<1>, rows_range<2>, rows_range<3>, rows_range<4>,
                                       rows_range<5>, rows_range<6>, rows_range<7>, rows_range<8>};
#endif

bool cpu_supported() {
#ifdef BILD_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace

bool cpu_linear_supported() {
  static const bool ok = cpu_supported();
  return ok;
}

at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  // x [M, K] float32, weight [N, K] float32 contiguous, bias [N] float32 or None -> y [M, N]
  TORCH_CHECK(cpu_linear_supported(), "cpu_linear: this CPU lacks AVX2/FMA (use F.linear)");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "cpu_linear: x and weight must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "cpu_linear: x and weight must be float32, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "cpu_linear: x must be [M, K] and weight [N, K], got ", x.sizes(),
              " and ", weight.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "cpu_linear: x has K=", K, " columns, weight ", weight.size(1));
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "cpu_linear: x must have 1..", kMaxRows, " rows, got ", M);
  TORCH_CHECK(weight.is_contiguous(), "cpu_linear: weight must be contiguous");
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == N && bias->is_contiguous(),
                "cpu_linear: bias must be a contiguous float32 [N=", N, "] CPU tensor");
    bias_ptr = bias->data_ptr<float>();
  }
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
#ifdef BILD_X86
  const float* xp = xc.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldx = xc.stride(0);
  const RowsFn fn = kRowsFns[M - 1];
  // grain: 64 output rows (>= 37 KB of weights for K = 576), so a thread's share is worth waking it for
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) { fn(xp, ldx, wp, K, bias_ptr, yp, N, begin, end); });
#endif
  return y;
}

}  // namespace bild

TORCH_LIBRARY(bild_kernels_cpu, m) {
  m.def("cpu_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("cpu_linear_supported() -> bool", &bild::cpu_linear_supported);
}

TORCH_LIBRARY_IMPL(bild_kernels_cpu, CPU, m) { m.impl("cpu_linear", &bild::cpu_linear); }

// The module is empty: importing bild_kernels._cpu runs the registrations above.
static PyModuleDef bild_cpu_module = {PyModuleDef_HEAD_INIT, "_cpu", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__cpu() { return PyModule_Create(&bild_cpu_module); }
