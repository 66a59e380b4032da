// AVX2 helpers shared by the CPU extension's kernels (cpu_linear.cpp, cpu_attention.cpp).
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BILD_X86 1

namespace bild {

// The sum of the 8 lanes in a fixed tree, ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), whatever the
// caller: part of what makes the kernels' results independent of the batch around a row.
__attribute__((target("avx2,fma"))) inline float reduce_lanes(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

}  // namespace bild
#endif
