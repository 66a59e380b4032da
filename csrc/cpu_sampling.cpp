// sample_draft and verify_draft on CPU tensors for greedy rows: the "cpu" backend of those two ops
// (bild_kernels/ops/_cpu_impls.py), exactly their references' definitions (bild_kernels.reference.sample_draft_ref
// and verify_draft_ref) for the case a CPU engine runs at every step: every row greedy (temperature <= 0), and
// for sample_draft no top-k / top-p filter. Per row one pass for the max, a scan for its first index, one pass
// for sum(exp(z - max)) in AVX2; the per-row outputs in plain loops. The references cost ~0.4 ms
// (sample_draft, one row of 8,192) and ~1.7 ms (verify_draft, four positions of 49,152) a call in PyTorch ops
// on one core of the AMD EPYC; here tens of microseconds.
//
// Each op returns a last output `handled` (a bool scalar): false when a row samples, filters, or holds a logit
// that is not finite at a position it needs (the references define NaN / inf rows through PyTorch's own
// conventions); the Python wrapper then runs the reference on the whole call. Nothing is written then.
//
// Summation order: lane j (0..7) adds exp(z[k] - max) for k = j, j + 8, ... in increasing k, the lanes are added
// in reduce_lanes' fixed tree, then the V mod 8 tail in order: a row's result depends on the row alone, never on
// the batch around it. exp is cpu_simd.h's exp8 (relative error ~2 ulp); the references use
// PyTorch's vectorised exp, so floats agree within float32 rounding and ids exactly.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "cpu_simd.h"  // reduce_lanes; defines BILD_X86 on x86-64

namespace bild {
bool cpu_linear_supported();

namespace {

struct RowStats {
  float max;
  int64_t argmax;  // first index holding max
  float lse;       // max + log(sum(exp(z - max)))
};

#ifdef BILD_X86
// The row's statistics; false (and nothing else) when its max is not finite (NaN, +inf, or every logit -inf).
__attribute__((target("avx2,fma"))) bool row_stats(const float* z, int64_t V, RowStats* out) {
  const int64_t V8 = V & ~int64_t{7};
  float mx = -std::numeric_limits<float>::infinity();
  bool nan = false;
  if (V8 > 0) {
    __m256 m = _mm256_loadu_ps(z);
    __m256 unordered = _mm256_cmp_ps(m, m, _CMP_UNORD_Q);
    for (int64_t k = 8; k < V8; k += 8) {
      const __m256 v = _mm256_loadu_ps(z + k);
      m = _mm256_max_ps(m, v);
      unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    nan = _mm256_movemask_ps(unordered) != 0;
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m);
    for (float l : lanes) mx = l > mx ? l : mx;
  }
  for (int64_t k = V8; k < V; ++k) {
    nan |= std::isnan(z[k]);
    mx = z[k] > mx ? z[k] : mx;
  }
  if (nan || !std::isfinite(mx)) return false;
  int64_t arg = 0;
  while (z[arg] != mx) ++arg;  // the max is there: the scan ends at its first index
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t k = 0; k < V8; k += 8) acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(_mm256_loadu_ps(z + k), vmx)));
  float s = reduce_lanes(acc);
  for (int64_t k = V8; k < V; ++k) s += std::exp(z[k] - mx);
  *out = RowStats{mx, arg, mx + std::log(s)};
  return true;
}
#endif

void check_logits(const char* op, const at::Tensor& z, int64_t dim) {
  TORCH_CHECK(cpu_linear_supported(), op, ": this CPU lacks AVX2/FMA (use the reference)");
  TORCH_CHECK(z.device().is_cpu() && z.scalar_type() == at::kFloat && z.dim() == dim && z.is_contiguous() &&
                  z.size(dim - 1) > 0,
              op, ": logits must be a contiguous float32 CPU tensor of ", dim, " dims with V > 0, got ", z.sizes());
}

void check_rows(const char* op, const char* name, const at::Tensor& t, int64_t B, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == B && t.is_contiguous(),
              op, ": ", name, " must be a contiguous ", dtype, " [", B, "] CPU tensor");
}

at::Tensor flag(bool v) { return at::scalar_tensor(v, at::TensorOptions().dtype(at::kBool)); }

}  // namespace

// logits [B, V] f32; temperature, top_p, fallback_threshold [B] f32; top_k [B] i32 ->
// (token_ids [B] i64, token_probs, max_probs, energies [B] f32, fallback [B] bool, handled bool scalar)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_sample_draft_greedy(
    const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& fallback_threshold) {
  constexpr const char* op = "cpu_sample_draft_greedy";
  check_logits(op, logits, 2);
  const int64_t B = logits.size(0), V = logits.size(1);
  check_rows(op, "temperature", temperature, B, at::kFloat);
  check_rows(op, "top_k", top_k, B, at::kInt);
  check_rows(op, "top_p", top_p, B, at::kFloat);
  check_rows(op, "fallback_threshold", fallback_threshold, B, at::kFloat);
  const auto f32 = logits.options();
  at::Tensor token = at::empty({B}, f32.dtype(at::kLong)), prob = at::empty({B}, f32), energy = at::empty({B}, f32);
  at::Tensor fallback = at::empty({B}, f32.dtype(at::kBool));
  const float* t = temperature.data_ptr<float>();
  const int32_t* k = top_k.data_ptr<int32_t>();
  const float* p = top_p.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {  // every row an unfiltered argmax, or the reference does the whole call
    if (!(t[b] <= 0.0f) || (k[b] > 0 && k[b] < V) || p[b] < 1.0f) return {token, prob, prob, energy, fallback, flag(false)};
  }
#ifdef BILD_X86
  const float* z = logits.data_ptr<float>();
  const float* thr = fallback_threshold.data_ptr<float>();
  int64_t* tok = token.data_ptr<int64_t>();
  float* pr = prob.data_ptr<float>();
  float* en = energy.data_ptr<float>();
  bool* fb = fallback.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) {
    RowStats s;
    if (!row_stats(z + b * V, V, &s)) return {token, prob, prob, energy, fallback, flag(false)};
    tok[b] = s.argmax;
    pr[b] = std::exp(s.max - s.lse);
    en[b] = -s.lse;
    fb[b] = pr[b] < thr[b];
  }
  return {token, prob, prob.clone(), energy, fallback, flag(true)};
#else
  return {token, prob, prob, energy, fallback, flag(false)};
#endif
}

// draft_ids [B, K] i64 (drafts, then -1); logits [B, K+1, V] f32; mode 0 (greedy) or 1 (bild);
// rollback_threshold, temperature [B] f32 -> (num_accepted [B] i32, output_ids [B, K+1] i64, distances [B, K] f32,
// target_probs [B, K+1] f32, handled bool scalar). Statistics only at the positions j <= n_b a row uses.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_verify_draft_greedy(
    const at::Tensor& draft_ids, const at::Tensor& logits, int64_t mode, const at::Tensor& rollback_threshold,
    const at::Tensor& temperature) {
  constexpr const char* op = "cpu_verify_draft_greedy";
  check_logits(op, logits, 3);
  const int64_t B = logits.size(0), K1 = logits.size(1), K = K1 - 1, V = logits.size(2);
  TORCH_CHECK(mode == 0 || mode == 1, op, ": mode must be 0 (greedy) or 1 (bild), got ", mode);
  TORCH_CHECK(draft_ids.device().is_cpu() && draft_ids.scalar_type() == at::kLong && draft_ids.dim() == 2 &&
                  draft_ids.size(0) == B && draft_ids.size(1) == K && draft_ids.is_contiguous(),
              op, ": draft_ids must be a contiguous int64 [", B, ", ", K, "] CPU tensor");
  check_rows(op, "rollback_threshold", rollback_threshold, B, at::kFloat);
  check_rows(op, "temperature", temperature, B, at::kFloat);
  const auto f32 = logits.options();
  at::Tensor num_accepted = at::empty({B}, f32.dtype(at::kInt));
  at::Tensor out_ids = at::full({B, K1}, -1, f32.dtype(at::kLong));
  at::Tensor distances = at::zeros({B, K}, f32), target_probs = at::zeros({B, K1}, f32);
  const float* t = temperature.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    if (!(t[b] <= 0.0f)) return {num_accepted, out_ids, distances, target_probs, flag(false)};
  }
#ifdef BILD_X86
  const int64_t* ids = draft_ids.data_ptr<int64_t>();
  const float* z = logits.data_ptr<float>();
  const float* thr = rollback_threshold.data_ptr<float>();
  int32_t* na = num_accepted.data_ptr<int32_t>();
  int64_t* out = out_ids.data_ptr<int64_t>();
  float* dist = distances.data_ptr<float>();
  float* tp = target_probs.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* row = ids + b * K;
    int64_t n = 0;
    for (int64_t j = 0; j < K; ++j) n += row[j] >= 0;  // as the reference counts them
    int64_t c = -1;       // the cut: the first position not accepted
    int64_t emitted = 0;  // argmax at the cut
    for (int64_t j = 0; j <= n; ++j) {
      const float* zj = z + (b * K1 + j) * V;
      RowStats s;
      if (!row_stats(zj, V, &s)) return {num_accepted, out_ids, distances, target_probs, flag(false)};
      tp[b * K1 + j] = std::exp(s.max - s.lse);
      bool ok = false;
      if (j < n) {
        const int64_t d = row[j] < 0 ? 0 : row[j];
        const float dj = s.lse - zj[d];
        if (j < K) dist[b * K + j] = dj;
        ok = mode == 0 ? row[j] == s.argmax : !(dj > thr[b] && row[j] != s.argmax);
      }
      if (c < 0 && !ok) {
        c = j;
        emitted = s.argmax;
      }
    }
    // c <= n always: position n is never accepted. Positions past the cut still get their distances and
    // target probabilities (the reference reports them for every drafted position).
    na[b] = static_cast<int32_t>(c);
    for (int64_t j = 0; j < c; ++j) out[b * K1 + j] = row[j];
    out[b * K1 + c] = emitted;
  }
  return {num_accepted, out_ids, distances, target_probs, flag(true)};
#else
  return {num_accepted, out_ids, distances, target_probs, flag(false)};
#endif
}

}  // namespace bild

TORCH_LIBRARY_FRAGMENT(bild_kernels_cpu, m) {
  m.def("cpu_sample_draft_greedy(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, "
        "Tensor fallback_threshold) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_verify_draft_greedy(Tensor draft_ids, Tensor logits, int mode, Tensor rollback_threshold, "
        "Tensor temperature) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bild_kernels_cpu, CPU, m) {
  m.impl("cpu_sample_draft_greedy", &bild::cpu_sample_draft_greedy);
  m.impl("cpu_verify_draft_greedy", &bild::cpu_verify_draft_greedy);
}
