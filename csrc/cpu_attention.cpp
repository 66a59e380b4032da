// cpu_paged_attention: attention of T new tokens over the paged KV cache, float32, on x86 CPUs with AVX2 and
// FMA: the executor's per-layer attention on a CPU (bild_kernels.models.attention, backend "cpu").
//
// Why: the reference gathers each sequence's blocks and calls PyTorch's SDPA once per sequence and layer;
// at decode sizes (one to a few queries, a few hundred keys) that costs ~150 us of fixed overhead for
// ~10 us of arithmetic. Here the keys and values are read in place through the block table, one call per
// layer serves the whole batch, and no intermediate tensor is allocated.
//
// Semantics (those of paged_attention_ref): token t of sequence b (query_start_loc[b] <= t <
// query_start_loc[b + 1]) at position positions[t] sees the keys at positions p with p <= positions[t],
// p < context_lens[b] and, if sliding_window > 0, p > positions[t] - sliding_window; query head h reads kv
// head h / (Hq / Hkv). softmax(scale * q.k) over those keys, times v; a token that sees no key gets zeros.
// Work split: at::parallel_for over (kv head, token) pairs; each output is computed by one thread alone, in
// a fixed order (keys in increasing position; with AVX-512 and D = 64 or 128 each score a fixed chain over D in
// 16 lanes, 16 keys' lanes reduced together in fixed trees; else 8-lane dot products reduced in a fixed tree;
// each key's row found by walking the block table, no division a key), so a token's
// output does not depend on the batch around it, its position in it, or the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_simd.h"  // reduce_lanes; defines BILD_X86 on x86-64

namespace bild {
bool cpu_linear_supported();  // cpu_linear.cpp: AVX2 and FMA present

namespace {

template <typename I>
int64_t at_index(const at::Tensor& t, int64_t i) {
  return static_cast<int64_t>(t.data_ptr<I>()[i]);
}

int64_t read_int(const at::Tensor& t, int64_t i) {
  return t.scalar_type() == at::kInt ? at_index<int32_t>(t, i) : at_index<int64_t>(t, i);
}

#ifdef BILD_X86
__attribute__((target("avx2,fma"))) inline float dot(const float* a, const float* b, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
  float r = reduce_lanes(acc);
  for (; d < D; ++d) r = std::fma(a[d], b[d], r);
  return r;
}

__attribute__((target("avx2,fma"))) inline void axpy(float w, const float* x, float* y, int64_t D) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(y + d, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d)));
  for (; d < D; ++d) y[d] = std::fma(w, x[d], y[d]);
}

// Each visible key's row offset (in floats) in the caches for kv head g: the block table walked block by block
// (no division a key).
inline void key_rows(const int32_t* table, int64_t BS, int64_t Hkv, int64_t D, int64_t g, int64_t lo, int64_t hi,
                     std::vector<int64_t>& rows) {
  rows.resize(static_cast<size_t>(hi - lo + 1));
  int64_t p = lo;
  while (p <= hi) {
    const int64_t base = static_cast<int64_t>(table[p / BS]) * BS;
    for (int64_t off = p % BS; off < BS && p <= hi; ++off, ++p) rows[p - lo] = ((base + off) * Hkv + g) * D;
  }
}

// softmax of each of the rep rows of s [rep, n] in place, each row's sum's inverse in inv[r]: exp in 8 lanes (lane j
// sums i = j, j + 8, ... in order, the lanes in reduce_lanes' tree), then the tail.
__attribute__((target("avx2,fma"))) inline void exp_rows(float* s, int64_t rep, int64_t n, float* inv) {
  for (int64_t r = 0; r < rep; ++r) {
    float* sr = s + r * n;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, sr[i]);
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + i), vmx));
      _mm256_storeu_ps(sr + i, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float sum = reduce_lanes(vsum);
    for (; i < n; ++i) {
      sr[i] = std::exp(sr[i] - mx);
      sum += sr[i];
    }
    inv[r] = 1.f / sum;
  }
}

// One (token, kv head) pair: its rep query heads over keys [lo, hi] of one sequence, any D (AVX2, through memory).
__attribute__((target("avx2,fma"))) void attend_any(const float* q, const float* kc, const float* vc,
                                                    const int32_t* table, int64_t BS, int64_t Hkv, int64_t D,
                                                    int64_t g, int64_t rep, int64_t lo, int64_t hi, float scale,
                                                    float* out, std::vector<float>& s, std::vector<int64_t>& rows) {
  const int64_t n = hi - lo + 1;
  key_rows(table, BS, Hkv, D, g, lo, hi, rows);
  s.resize(static_cast<size_t>(rep * n));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t r = 0; r < rep; ++r) s[r * n + i] = dot(q + r * D, kc + rows[i], D) * scale;
  }
  float inv[64];
  for (int64_t r0 = 0; r0 < rep; r0 += 64) {
    const int64_t rr = std::min<int64_t>(64, rep - r0);
    exp_rows(s.data() + r0 * n, rr, n, inv);
    for (int64_t r = 0; r < rr; ++r) {
      for (int64_t i = 0; i < n; ++i) axpy(s[(r0 + r) * n + i] * inv[r], vc + rows[i], out + (r0 + r) * D, D);
    }
  }
}

// The same with D = 16 * DV (64, 128) in AVX-512 registers. Scores 16 keys at a time, every query head over the
// same 16 keys (their rows stay in L1 across the heads): 16 dot products in 16 accumulators (a fixed chain over D
// each), reduced together (halves added, then two 8-way hadd trees). Values: each key's row read once for a group
// of heads, accumulated into their outputs in registers (up to 16 of them).
template <int DV>
__attribute__((target("avx2,fma,avx512f,avx512vl"))) inline __m256 fold_halves(__m512 a) {
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}

template <int DV>
__attribute__((target("avx2,fma,avx512f,avx512vl"))) void attend_512(
    const float* q, const float* kc, const float* vc, const int32_t* table, int64_t BS, int64_t Hkv, int64_t D,
    int64_t g, int64_t rep, int64_t lo, int64_t hi, float scale, float* out, std::vector<float>& s,
    std::vector<int64_t>& rows) {
  const int64_t n = hi - lo + 1;
  key_rows(table, BS, Hkv, D, g, lo, hi, rows);
  s.resize(static_cast<size_t>(rep * n));
  const __m256 vscale = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int64_t r = 0; r < rep; ++r) {
      const float* qr = q + r * D;
      __m256 h[16];
      for (int k = 0; k < 16; ++k) {
        const float* kr = kc + rows[i + k];
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qr), _mm512_loadu_ps(kr));
        for (int j = 1; j < DV; ++j) a = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * j), _mm512_loadu_ps(kr + 16 * j), a);
        h[k] = fold_halves<DV>(a);
      }
      for (int half = 0; half < 2; ++half) {  // 8 vectors -> their 8 lane sums, in key order
        const __m256* v = h + 8 * half;
        const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
        const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
        const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
        const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
        _mm256_storeu_ps(s.data() + r * n + i + 8 * half, _mm256_mul_ps(sum, vscale));
      }
    }
  }
  for (; i < n; ++i) {  // the tail, one key at a time (the same chain, then reduce_lanes)
    const float* kr = kc + rows[i];
    for (int64_t r = 0; r < rep; ++r) {
      const float* qr = q + r * D;
      __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qr), _mm512_loadu_ps(kr));
      for (int j = 1; j < DV; ++j) a = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * j), _mm512_loadu_ps(kr + 16 * j), a);
      s[r * n + i] = reduce_lanes(fold_halves<DV>(a)) * scale;
    }
  }
  constexpr int kGroup = 16 / DV;  // heads whose outputs fit in 16 registers
  float inv[64];
  for (int64_t r0 = 0; r0 < rep; r0 += 64) {
    const int64_t rr = std::min<int64_t>(64, rep - r0);
    exp_rows(s.data() + r0 * n, rr, n, inv);
    for (int64_t h0 = 0; h0 < rr; h0 += kGroup) {
      const int64_t hg = std::min<int64_t>(kGroup, rr - h0);
      __m512 acc[kGroup][DV];
      for (int r = 0; r < kGroup; ++r)
        for (int j = 0; j < DV; ++j) acc[r][j] = _mm512_setzero_ps();
      const float* sr = s.data() + (r0 + h0) * n;
      for (int64_t k = 0; k < n; ++k) {
        const float* v = vc + rows[k];
        __m512 vv[DV];
        for (int j = 0; j < DV; ++j) vv[j] = _mm512_loadu_ps(v + 16 * j);
        for (int r = 0; r < kGroup; ++r) {
          if (r >= hg) break;
          const __m512 w = _mm512_set1_ps(sr[r * n + k] * inv[h0 + r]);
          for (int j = 0; j < DV; ++j) acc[r][j] = _mm512_fmadd_ps(w, vv[j], acc[r][j]);
        }
      }
      for (int r = 0; r < hg; ++r)
        for (int j = 0; j < DV; ++j) _mm512_storeu_ps(out + (r0 + h0 + r) * D + 16 * j, acc[r][j]);
    }
  }
}

using AttendFn = void (*)(const float*, const float*, const float*, const int32_t*, int64_t, int64_t, int64_t,
                          int64_t, int64_t, int64_t, int64_t, float, float*, std::vector<float>&,
                          std::vector<int64_t>&);

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  return yes;
}

AttendFn attend_for(int64_t D) {
  if (has_avx512() && D == 64) return attend_512<4>;
  if (has_avx512() && D == 128) return attend_512<8>;
  return attend_any;
}
#endif

void check_index(const char* name, const at::Tensor& t, int64_t n, bool int32_only) {
  TORCH_CHECK(t.device().is_cpu(), "cpu_paged_attention: ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kInt || (!int32_only && t.scalar_type() == at::kLong), "cpu_paged_attention: ",
              name, " must be int32", int32_only ? "" : " or int64", ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.is_contiguous(), "cpu_paged_attention: ", name,
              " must be a contiguous [", n, "] tensor, got ", t.sizes());
}

}  // namespace

at::Tensor cpu_paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                               const at::Tensor& query_start_loc, const at::Tensor& positions,
                               const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                               int64_t sliding_window) {
  TORCH_CHECK(cpu_linear_supported(), "cpu_paged_attention: this CPU lacks AVX2/FMA (use the reference)");
  for (const at::Tensor* t : {&query, &key_cache, &value_cache}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "cpu_paged_attention: query and the caches must be contiguous float32 CPU tensors");
  }
  TORCH_CHECK(query.dim() == 3, "cpu_paged_attention: query must be [T, Hq, D], got ", query.sizes());
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(),
              "cpu_paged_attention: the caches must both be [num_blocks, block_size, Hkv, D], got ", key_cache.sizes(),
              " and ", value_cache.sizes());
  const int64_t T = query.size(0), Hq = query.size(1), D = query.size(2);
  const int64_t NB = key_cache.size(0), BS = key_cache.size(1), Hkv = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D, "cpu_paged_attention: the caches' head size ", key_cache.size(3),
              " differs from the query's ", D);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "cpu_paged_attention: ", Hq, " query heads cannot share ", Hkv, " kv heads");
  TORCH_CHECK(block_tables.device().is_cpu() && block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  block_tables.is_contiguous(),
              "cpu_paged_attention: block_tables must be a contiguous int32 [B, M] CPU tensor");
  const int64_t B = block_tables.size(0), M = block_tables.size(1);
  check_index("query_start_loc", query_start_loc, B + 1, false);
  check_index("positions", positions, T, false);
  check_index("context_lens", context_lens, B, true);
  TORCH_CHECK(sliding_window >= 0, "cpu_paged_attention: sliding_window must be >= 0, got ", sliding_window);

  // Each token's sequence, its visible key range; checked before any work.
  std::vector<int64_t> seq(T, -1), lo(T, 0), hi(T, -1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = read_int(query_start_loc, b), e = read_int(query_start_loc, b + 1);
    TORCH_CHECK(0 <= s && s <= e && e <= T, "cpu_paged_attention: query_start_loc must rise within [0, ", T, "]");
    const int64_t L = at_index<int32_t>(context_lens, b);
    TORCH_CHECK(L <= M * BS, "cpu_paged_attention: context_lens[", b, "] = ", L, " exceeds the table's ", M * BS);
    const int32_t* row = block_tables.data_ptr<int32_t>() + b * M;
    for (int64_t j = 0; j < (L + BS - 1) / BS && e > s; ++j) {
      const int64_t blk = row[j];
      TORCH_CHECK(0 <= blk && blk < NB, "cpu_paged_attention: sequence ", b, " holds block ", blk, " of ", NB);
    }
    for (int64_t t = s; t < e; ++t) {
      seq[t] = b;
      const int64_t pos = read_int(positions, t);
      hi[t] = std::min(pos, L - 1);
      lo[t] = sliding_window > 0 ? std::max<int64_t>(0, pos - sliding_window + 1) : 0;
    }
  }
  at::Tensor out = at::zeros({T, Hq, D}, query.options());
#ifdef BILD_X86
  const float* q = query.data_ptr<float>();
  const float* kc = key_cache.data_ptr<float>();
  const float* vc = value_cache.data_ptr<float>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  float* o = out.data_ptr<float>();
  const int64_t rep = Hq / Hkv;
  const AttendFn attend = attend_for(D);
  // Items in kv-head-major order, so that a thread's consecutive items read one head's keys and values (a long
  // prompt's fit in L2, its three heads' did not); within a head the tokens alternate from both ends (0, T-1, 1,
  // T-2, ...), so that the threads' contiguous ranges hold as many early (cheap) as late (costly) tokens of a causal
  // prefill. Each output is still computed by one thread alone, the same way: the same bits in any order.
  at::parallel_for(0, T * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s;
    std::vector<int64_t> rows;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = i / T, k = i % T;
      const int64_t t = (k % 2 == 0) ? k / 2 : T - 1 - k / 2;
      if (seq[t] < 0 || hi[t] < lo[t]) continue;  // no sequence, or no visible key: zeros
      attend(q + (t * Hq + g * rep) * D, kc, vc, tables + seq[t] * M, BS, Hkv, D, g, rep, lo[t], hi[t],
                 static_cast<float>(scale), o + (t * Hq + g * rep) * D, s, rows);
    }
  });
#endif
  return out;
}

}  // namespace bild

TORCH_LIBRARY_FRAGMENT(bild_kernels_cpu, m) {
  m.def("paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor query_start_loc, "
        "Tensor positions, Tensor block_tables, Tensor context_lens, float scale, int sliding_window) -> Tensor");
}

TORCH_LIBRARY_IMPL(bild_kernels_cpu, CPU, m) { m.impl("paged_attention", &bild::cpu_paged_attention); }
