// sample_draft and verify_draft on CPU tensors: the "cpu" backend of those two ops (bild_kernels/ops/_cpu_impls.py),
// exactly their references' definitions (bild_kernels.reference.sample_draft_ref and verify_draft_ref) for the
// calls a CPU engine makes at every step: greedy rows (temperature <= 0) and sampling rows (temperature > 0), with
// or without top-k / top-p / min-p, whose Gumbel-max draws use the reference's Philox counter (the same code as
// csrc/common.cuh's host side). verify_draft: modes greedy and bild (sample mode's accept/resample runs the
// reference). Top-k / top-p (filter_row) select without a full sort: the k-th largest by nth_element, top-p's
// threshold from a partial sort of the most probable tokens that grows until their mass passes top_p. Per row one pass for the max, a scan for
// its first index, one pass for sum(exp(z - max)) in AVX2; a sampling row adds one Philox draw and two logs per
// logit. The references cost ~0.2-0.4 ms (sample_draft, one greedy row of 8,192 to 49,152) and ~1.6 ms
// (verify_draft, four greedy positions of 49,152) a call in PyTorch ops on one core of the AMD EPYC, and several
// milliseconds more per sampling row (the Philox rounds as int64 tensor ops); here tens of microseconds for a
// greedy row.
//
// Each op returns a last output `handled` (a bool scalar): false when a row holds a logit that is not finite at a
// position it needs (the references define NaN / inf rows through PyTorch's own
// conventions); the Python wrapper then runs the reference on the whole call. Nothing is written then.
//
// Summation order: lane j (0..7) adds exp(z[k] - max) for k = j, j + 8, ... in increasing k, the lanes are added
// in reduce_lanes' fixed tree, then the V mod 8 tail in order: a row's result depends on the row alone, never on
// the batch around it (verify_draft computes its positions' statistics on torch's threads, each position by one
// thread alone, so the thread count changes nothing either). exp is cpu_simd.h's exp8 (relative error ~2 ulp), logs std::log; the references use
// PyTorch's vectorised exp and log, so floats agree within float32 rounding and ids exactly (a Gumbel-max draw
// could differ only where two candidates tie within an ulp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <optional>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_ops.h"  // greedy_row
#include "cpu_simd.h"  // reduce_lanes; defines BILD_X86 on x86-64
#include "cut_search.h"  // the CUDA kernels' top-k / top-p cut-off search, run here by cpu_filter_cut

namespace bild {

namespace {

struct RowStats {
  float max;
  int64_t argmax;  // first index holding max
  float lse;       // max + log(sum(exp(z - max)))
};

// Philox4x32-10, first output word (reference.philox_ref; csrc/common.cuh's host/device code, which this CPU-only
// build cannot include): key (seed_lo, seed_hi), counter (c0, c1, c2, c3).
inline uint32_t philox_first_word(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2, pa = static_cast<uint64_t>(0xD2511F53u) * c0;
    c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    c1 = static_cast<uint32_t>(pb);
    c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c3 = static_cast<uint32_t>(pa);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

constexpr int kPurposeDraftSample = 1, kPurposeVerifyAccept = 2, kPurposeVerifyToken = 3;  // reference.PURPOSE_*
constexpr float kGumbelMax = 16.64f;                              // reference.GUMBEL_MAX

// reference.uniform_ref: u = ((x >> 9) + 0.5) / 2^23 (exact in float32), in [2^-24, 1 - 2^-24].
inline float uniform(int64_t seed, uint32_t index, int64_t offset, int purpose, int64_t position) {
  const uint32_t x = philox_first_word(static_cast<uint64_t>(seed), index, static_cast<uint32_t>(offset),
                                       static_cast<uint32_t>(static_cast<uint64_t>(offset) >> 32),
                                       (static_cast<uint32_t>(purpose) << 24) | static_cast<uint32_t>(position));
  return (static_cast<float>(x >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

// reference.gumbel_ref at vocabulary index v: g = -log(-log(u)), finite and below kGumbelMax (reference.GUMBEL_MAX).
inline float gumbel(int64_t seed, uint32_t v, int64_t offset, int purpose, int64_t position) {
  return -std::log(-std::log(uniform(seed, v, offset, purpose, position)));
}

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

// The per-row sampling parameters both ops take: temperature, top_p [B] f32; top_k [B] i32; seed, offset [B] i64.
void check_sampling_rows(const char* op, int64_t B, const at::Tensor& temperature, const at::Tensor& top_k,
                         const at::Tensor& top_p, const at::Tensor& seed, const at::Tensor& offset) {
  check_rows(op, "temperature", temperature, B, at::kFloat);
  check_rows(op, "top_k", top_k, B, at::kInt);
  check_rows(op, "top_p", top_p, B, at::kFloat);
  check_rows(op, "seed", seed, B, at::kLong);
  check_rows(op, "offset", offset, B, at::kLong);
}

// reference._filter_top_k_top_p on one row s [V] (scaled logits, finite max): filt[v] = s[v] where v passes
// both filters, else -inf. top-k keeps s[v] >= the k-th largest s (exact: the same comparisons). top-p keeps
// q[v] >= thr, q = softmax(s) in float32, thr the n-th largest q where n = max(1, #{i : excl_i < top_p}) over
// the q sorted in descending order, excl_i = float(cumsum_i) - q_i with the cumulative sum in double (as
// torch.cumsum accumulates float32 on a CPU). Only a prefix of that order is needed: it is sorted (partial
// sort) until excl passes top_p by a margin (excl never falls by more than a float32 rounding of a sum <= 1
// later), doubling from 64 entries. q comes from this file's exp, the reference's from PyTorch's: a kept set
// can differ only where the mass crosses top_p within float rounding. min-p (> 0) keeps s[v] >= smax + log(min_p)
// (float32, as the reference's; its log is PyTorch's, so a kept set can differ only for a logit within an ulp of
// that bound).
void filter_row(const float* s, int64_t V, int32_t top_k, float top_p, float min_p, float smax,
                std::vector<float>& filt, std::vector<float>& work) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  filt.assign(s, s + V);
  if (min_p > 0.0f) {
    const float cut = smax + std::log(min_p);
    for (int64_t v = 0; v < V; ++v) filt[v] = s[v] >= cut ? filt[v] : kNegInf;
  }
  if (top_k > 0 && top_k < V) {
    work.assign(s, s + V);
    std::nth_element(work.begin(), work.begin() + (top_k - 1), work.end(), std::greater<float>());
    const float kth = work[static_cast<size_t>(top_k - 1)];
    for (int64_t v = 0; v < V; ++v) filt[v] = s[v] >= kth ? filt[v] : kNegInf;
  }
  if (top_p < 1.0f) {
    std::vector<float>& q = work;
    q.resize(static_cast<size_t>(V));
    double sum = 0.0;
    for (int64_t v = 0; v < V; ++v) sum += q[v] = std::exp(s[v] - smax);
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t v = 0; v < V; ++v) q[v] *= inv;
    std::vector<float> sorted(q);
    int64_t n_keep = 0, m = std::min<int64_t>(V, 64);
    for (;;) {
      std::partial_sort(sorted.begin(), sorted.begin() + m, sorted.end(), std::greater<float>());
      double acc = 0.0;
      float excl = 0.0f;
      n_keep = 0;
      for (int64_t i = 0; i < m; ++i) {
        acc += static_cast<double>(sorted[i]);
        excl = static_cast<float>(acc) - sorted[i];
        n_keep += excl < top_p;
      }
      if (m == V || excl >= top_p + 1e-5f) break;
      m = std::min<int64_t>(V, 2 * m);
    }
    const float thr = sorted[static_cast<size_t>(std::max<int64_t>(n_keep, 1) - 1)];
    for (int64_t v = 0; v < V; ++v) filt[v] = q[v] >= thr ? filt[v] : kNegInf;
  }
}

// q = softmax(filter(z / t)) of one row, as the reference builds a sampling row's target distribution (the division
// in float32, the softmax as exp(x - max) / sum); *am gets the first index of the max of z / t, which both filters
// keep. False (q untouched) when that max is not finite.
bool target_q(const float* z, int64_t V, float t, int32_t top_k, float top_p, float min_p, std::vector<float>& q,
              std::vector<float>& filt, std::vector<float>& work, int64_t* am) {
  q.resize(static_cast<size_t>(V));
  float m = -std::numeric_limits<float>::infinity();
  *am = 0;
  for (int64_t v = 0; v < V; ++v) {
    q[v] = z[v] / t;
    if (q[v] > m) {
      m = q[v];
      *am = v;
    }
  }
  if (!std::isfinite(m)) return false;
  if (filter_on(top_k, top_p, min_p, V)) {  // the filters keep the max, so m stays the filtered row's max
    filter_row(q.data(), V, top_k, top_p, min_p, m, filt, work);
    q.swap(filt);
  }
  float sum = 0.0f;
  for (int64_t v = 0; v < V; ++v) sum += q[v] = std::exp(q[v] - m);
  for (int64_t v = 0; v < V; ++v) q[v] /= sum;
  return true;
}

at::Tensor flag(bool v) { return at::scalar_tensor(v, at::TensorOptions().dtype(at::kBool)); }

}  // namespace

namespace {
#ifdef BILD_X86
// argmax over v of s[v] + gumbel(seed, v, offset, purpose, position), the first index on ties, a NaN winning
// (torch.argmax's rule); s [V] may hold -inf. `hint` (an index, e.g. the row's max) is drawn first, so that the
// best so far starts high; then a logit with s[v] + kGumbelMax < best cannot win (every draw is below
// kGumbelMax, and float addition is monotone) and its Philox draw is skipped: exactly the reference's token at
// a fraction of the draws (all of those a top-k / top-p filter removed, and most of a peaked row).
int64_t gumbel_argmax(const float* s, int64_t V, int64_t seed, int64_t offset, int purpose, int64_t position,
                      int64_t hint) {
  const auto draw = [&](int64_t v) { return s[v] + gumbel(seed, static_cast<uint32_t>(v), offset, purpose, position); };
  float best = draw(hint);
  int64_t arg = hint;
  if (std::isnan(best)) best = -std::numeric_limits<float>::infinity();  // NaN only from a NaN logit: scan all
  for (int64_t v = 0; v < V; ++v) {
    if (v == hint || s[v] + kGumbelMax < best) continue;
    const float val = draw(v);
    if (std::isnan(val)) return v;
    if (val > best || (val == best && v < arg)) {
      best = val;
      arg = v;
    }
  }
  return arg;
}
#endif
}  // namespace

// logits [B, V] f32; temperature, top_p, fallback_threshold [B] f32; top_k [B] i32; seed, offset [B] i64 ->
// (token_ids [B] i64, token_probs, max_probs, energies [B] f32, fallback [B] bool, handled bool scalar)
// One greedy row as cpu_sample_draft computes it at temperature 0 without filters: the argmax (first index), its
// probability exp(max - lse) at temperature 1 (BiLD's max probability) and the energy -lse; false, nothing written,
// when the row's max is not finite. Shared with cpu_feature_draft.cpp, whose draft chain then decides alike.
bool greedy_row(const float* z, int64_t V, int64_t* argmax, float* max_prob, float* energy) {
#ifdef BILD_X86
  RowStats s;
  if (!row_stats(z, V, &s)) return false;
  *argmax = s.argmax;
  *max_prob = std::exp(s.max - s.lse);
  *energy = -s.lse;
  return true;
#else
  return false;
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_sample_draft(
    const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& fallback_threshold,
    const std::optional<at::Tensor>& min_p) {
  constexpr const char* op = "cpu_sample_draft";
  check_logits(op, logits, 2);
  const int64_t B = logits.size(0), V = logits.size(1);
  check_sampling_rows(op, B, temperature, top_k, top_p, seed, offset);
  check_rows(op, "fallback_threshold", fallback_threshold, B, at::kFloat);
  if (min_p.has_value()) check_rows(op, "min_p", *min_p, B, at::kFloat);
  const auto f32 = logits.options();
  at::Tensor token = at::empty({B}, f32.dtype(at::kLong)), prob = at::empty({B}, f32), maxp = at::empty({B}, f32);
  at::Tensor energy = at::empty({B}, f32), fallback = at::empty({B}, f32.dtype(at::kBool));
  const auto unhandled = [&] { return std::make_tuple(token, prob, maxp, energy, fallback, flag(false)); };
  const float* t = temperature.data_ptr<float>();
  const int32_t* k = top_k.data_ptr<int32_t>();
  const float* p = top_p.data_ptr<float>();
  const float* mn = min_p.has_value() ? min_p->data_ptr<float>() : nullptr;
#ifdef BILD_X86
  const float* z = logits.data_ptr<float>();
  const float* thr = fallback_threshold.data_ptr<float>();
  const int64_t* sd = seed.data_ptr<int64_t>();
  const int64_t* off = offset.data_ptr<int64_t>();
  int64_t* tok = token.data_ptr<int64_t>();
  float* pr = prob.data_ptr<float>();
  float* mp = maxp.data_ptr<float>();
  float* en = energy.data_ptr<float>();
  bool* fb = fallback.data_ptr<bool>();
  std::vector<float> scaled, filt, work;
  for (int64_t b = 0; b < B; ++b) {
    const float* zr = z + b * V;
    const float m_b = mn != nullptr ? mn[b] : 0.0f;
    const bool filtered = filter_on(k[b], p[b], m_b, V);
    RowStats zs, fs;  // fs: the filtered row's (exp8 counts its -inf entries as ~e^-87 each: nothing a sum can tell)
    if (!row_stats(zr, V, &zs)) return unhandled();
    mp[b] = std::exp(zs.max - zs.lse);  // at temperature 1, unfiltered
    if (t[b] <= 0.0f) {  // greedy: the argmax (which both filters keep), its probability at temperature 1
      tok[b] = zs.argmax;
      en[b] = -zs.lse;
      pr[b] = mp[b];
      if (filtered) {  // ... renormalised over the tokens the filters keep
        filter_row(zr, V, k[b], p[b], m_b, zs.max, filt, work);
        row_stats(filt.data(), V, &fs);  // its max, kept by both filters, is finite
        pr[b] = std::exp(zs.max - fs.lse);
      }
    } else {  // s = z / T; the token argmax(filter(s) + g); its probability under softmax(filter(s)); energy
              // -T logsumexp(s), unfiltered
      scaled.resize(static_cast<size_t>(V));
      for (int64_t v = 0; v < V; ++v) scaled[v] = zr[v] / t[b];
      RowStats ss;
      if (!row_stats(scaled.data(), V, &ss)) return unhandled();
      en[b] = -t[b] * ss.lse;
      if (filtered) {
        filter_row(scaled.data(), V, k[b], p[b], m_b, ss.max, filt, work);
        row_stats(filt.data(), V, &fs);
        tok[b] = gumbel_argmax(filt.data(), V, sd[b], off[b], kPurposeDraftSample, 0, ss.argmax);
        pr[b] = std::exp(filt[tok[b]] - fs.lse);
      } else {
        tok[b] = gumbel_argmax(scaled.data(), V, sd[b], off[b], kPurposeDraftSample, 0, ss.argmax);
        pr[b] = std::exp(scaled[tok[b]] - ss.lse);
      }
    }
    fb[b] = mp[b] < thr[b];
  }
  return {token, prob, maxp, energy, fallback, flag(true)};
#else
  return unhandled();
#endif
}

// draft_ids [B, K] i64 (drafts, then -1); logits [B, K+1, V] f32; mode 0 (greedy), 1 (bild) or 2 (sample);
// rollback_threshold, temperature, top_p [B] f32; top_k [B] i32; seed, offset [B] i64; draft_probs [B, K, V] f32
// (mode 2 only) -> (num_accepted [B] i32, output_ids [B, K+1] i64, distances [B, K] f32, target_probs [B, K+1] f32,
// handled bool scalar). Statistics only at the positions j <= n_b a row uses. A sampling row (temperature > 0)
// emits at its cut c the argmax of log w + g, g = gumbel(seed, v, offset, VERIFY_TOKEN, c), w = q_c =
// softmax(filter(z_c / T)), or in mode 2 after a rejection the residual max(0, q_c - p_S) unless it is zero
// everywhere; a greedy row emits the argmax whatever its filters (the reference's q is then one-hot at the
// argmax). Mode 2 accepts draft j while u_j * p_S(draft_j) < q_j(draft_j), u_j = uniform(seed, 0, offset,
// VERIFY_ACCEPT, j): speculative sampling, the reference's rule.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_verify_draft(
    const at::Tensor& draft_ids, const at::Tensor& logits, int64_t mode, const at::Tensor& rollback_threshold,
    const std::optional<at::Tensor>& draft_probs, const at::Tensor& temperature, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& seed, const at::Tensor& offset, const std::optional<at::Tensor>& min_p,
    const std::optional<at::Tensor>& row_max,
    const std::optional<at::Tensor>& row_lse, const std::optional<at::Tensor>& row_argmax) {
  constexpr const char* op = "cpu_verify_draft";
  check_logits(op, logits, 3);
  const int64_t B = logits.size(0), K1 = logits.size(1), K = K1 - 1, V = logits.size(2);
  TORCH_CHECK(mode == 0 || mode == 1 || mode == 2, op, ": mode must be 0 (greedy), 1 (bild) or 2 (sample), got ",
              mode);
  TORCH_CHECK(draft_ids.device().is_cpu() && draft_ids.scalar_type() == at::kLong && draft_ids.dim() == 2 &&
                  draft_ids.size(0) == B && draft_ids.size(1) == K && draft_ids.is_contiguous(),
              op, ": draft_ids must be a contiguous int64 [", B, ", ", K, "] CPU tensor");
  if (mode == 2) {
    TORCH_CHECK(draft_probs.has_value() && draft_probs->device().is_cpu() &&
                    draft_probs->scalar_type() == at::kFloat && draft_probs->is_contiguous() &&
                    draft_probs->dim() == 3 && draft_probs->size(0) == B && draft_probs->size(1) == K &&
                    draft_probs->size(2) == V,
                op, ": mode 2 (sample) needs draft_probs, a contiguous float32 [", B, ", ", K, ", ", V, "] CPU tensor");
  }
  check_rows(op, "rollback_threshold", rollback_threshold, B, at::kFloat);
  // row_max / row_lse / row_argmax [B, K + 1]: every position's statistics, given (a head product that took them,
  // cpu_linear_q8_0x16_stats, of logits all finite) instead of read here; all three or none
  const bool given = row_max.has_value();
  TORCH_CHECK(given == row_lse.has_value() && given == row_argmax.has_value(), op,
              ": row_max, row_lse and row_argmax go together (all three or none)");
  if (given) {
    for (const auto& [name, t, dtype] : {std::make_tuple("row_max", &*row_max, at::kFloat),
                                          std::make_tuple("row_lse", &*row_lse, at::kFloat),
                                          std::make_tuple("row_argmax", &*row_argmax, at::kLong)}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dtype && t->dim() == 2 && t->size(0) == B &&
                      t->size(1) == K1 && t->is_contiguous(),
                  op, ": ", name, " must be a contiguous ", dtype, " [", B, ", ", K1, "] CPU tensor");
    }
  }
  check_sampling_rows(op, B, temperature, top_k, top_p, seed, offset);
  if (min_p.has_value()) check_rows(op, "min_p", *min_p, B, at::kFloat);
  const auto f32 = logits.options();
  at::Tensor num_accepted = at::empty({B}, f32.dtype(at::kInt));
  at::Tensor out_ids = at::full({B, K1}, -1, f32.dtype(at::kLong));
  at::Tensor distances = at::zeros({B, K}, f32), target_probs = at::zeros({B, K1}, f32);
  const auto unhandled = [&] { return std::make_tuple(num_accepted, out_ids, distances, target_probs, flag(false)); };
  const float* t = temperature.data_ptr<float>();
  const int32_t* tk = top_k.data_ptr<int32_t>();
  const float* tp_ = top_p.data_ptr<float>();
  const float* mn = min_p.has_value() ? min_p->data_ptr<float>() : nullptr;
#ifdef BILD_X86
  const int64_t* ids = draft_ids.data_ptr<int64_t>();
  const float* z = logits.data_ptr<float>();
  const float* thr = rollback_threshold.data_ptr<float>();
  const float* ps = mode == 2 ? draft_probs->data_ptr<float>() : nullptr;
  const int64_t* sd = seed.data_ptr<int64_t>();
  const int64_t* off = offset.data_ptr<int64_t>();
  int32_t* na = num_accepted.data_ptr<int32_t>();
  int64_t* out = out_ids.data_ptr<int64_t>();
  float* dist = distances.data_ptr<float>();
  float* tp = target_probs.data_ptr<float>();
  std::vector<float> q, filt, work;
  // Every examined position's statistics first, on torch's threads (a verify pass of one row has K + 1 of them,
  // each a pass over V; each is the same bits on any thread), then the accept / cut logic in order.
  std::vector<int64_t> drafted(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    int64_t n = 0;
    for (int64_t j = 0; j < K; ++j) n += ids[b * K + j] >= 0;  // as the reference counts them
    drafted[b] = n;
  }
  std::vector<RowStats> stats(static_cast<size_t>(B * K1));
  std::vector<char> finite(static_cast<size_t>(B * K1), 1);
  if (given) {
    const float* gm = row_max->data_ptr<float>();
    const float* gl = row_lse->data_ptr<float>();
    const int64_t* ga = row_argmax->data_ptr<int64_t>();
    for (int64_t i = 0; i < B * K1; ++i) {
      TORCH_CHECK(ga[i] >= 0 && ga[i] < V, op, ": row_argmax holds ", ga[i], ", outside the vocabulary [0, ", V, ")");
      stats[i] = RowStats{gm[i], ga[i], gl[i]};
    }
  } else {
    at::parallel_for(0, B * K1, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (i % K1 <= drafted[i / K1]) finite[i] = row_stats(z + i * V, V, &stats[i]);  // positions past n: unread
      }
    });
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* row = ids + b * K;
    const bool sampling = !(t[b] <= 0.0f);
    const float m_b = mn != nullptr ? mn[b] : 0.0f;
    const int64_t n = drafted[b];
    int64_t c = -1;       // the cut: the first position not accepted
    int64_t emitted = 0;  // argmax at the cut
    int64_t q_pos = -1;   // the position whose q_j `q` holds (sampling rows)
    int64_t q_am = 0;     // and the first index of its max
    for (int64_t j = 0; j <= n; ++j) {
      const float* zj = z + (b * K1 + j) * V;
      if (!finite[b * K1 + j]) return unhandled();
      const RowStats& s = stats[b * K1 + j];
      tp[b * K1 + j] = std::exp(s.max - s.lse);
      bool ok = false;
      if (j < n) {
        const int64_t d = row[j] < 0 ? 0 : row[j];
        const float dj = s.lse - zj[d];
        if (j < K) dist[b * K + j] = dj;
        if (mode == 2) {
          if (c < 0) {  // past the cut nothing is accepted: no q needed there
            float qd = d == s.argmax ? 1.0f : 0.0f;  // a greedy row's q: one-hot at the argmax
            if (sampling) {
              if (!target_q(zj, V, t[b], tk[b], tp_[b], m_b, q, filt, work, &q_am)) return unhandled();
              q_pos = j;
              qd = q[d];
            }
            ok = uniform(sd[b], 0, off[b], kPurposeVerifyAccept, j) * ps[(b * K + j) * V + d] < qd;
          }
        } else {
          ok = mode == 0 ? row[j] == s.argmax : !(dj > thr[b] && row[j] != s.argmax);
        }
      }
      if (c < 0 && !ok) {
        c = j;
        emitted = s.argmax;
      }
    }
    // c <= n always: position n is never accepted. Positions past the cut still get their distances and
    // target probabilities (the reference reports them for every drafted position).
    if (sampling) {  // a sampling row draws its token at the cut from w = q_c (or mode 2's residual)
      if (q_pos != c && !target_q(z + (b * K1 + c) * V, V, t[b], tk[b], tp_[b], m_b, q, filt, work, &q_am)) {
        return unhandled();
      }
      int64_t hint = q_am;
      if (mode == 2 && c < n) {  // a rejection: the residual norm(max(0, q_c - p_S)), unless it is zero everywhere
        const float* pc = ps + (b * K + c) * V;
        work.resize(static_cast<size_t>(V));
        int64_t r_am = -1;
        for (int64_t v = 0; v < V; ++v) {
          work[v] = std::max(q[v] - pc[v], 0.0f);
          if (work[v] > 0.0f && (r_am < 0 || work[v] > work[r_am])) r_am = v;
        }
        if (r_am >= 0) {
          q.swap(work);
          hint = r_am;
        }
      }
      for (int64_t v = 0; v < V; ++v) q[v] = std::log(q[v]);  // log(0) = -inf: never drawn
      emitted = gumbel_argmax(q.data(), V, sd[b], off[b], kPurposeVerifyToken, c, hint);
    }
    na[b] = static_cast<int32_t>(c);
    for (int64_t j = 0; j < c; ++j) out[b * K1 + j] = row[j];
    out[b * K1 + c] = emitted;
  }
  return {num_accepted, out_ids, distances, target_probs, flag(true)};
#else
  return unhandled();
#endif
}

// The CUDA kernels' top-k / top-p cut-off search (cut_search.h, filter_cut in common.cuh) run on the host, one
// row at a time, each pass's histogram summed in order: the same bucket, bracket and settle code as on the GPU,
// so the tests check it against the reference on the CPU. scaled: [R, V] float32, the rows' z / t; top_k [R]
// int32, top_p [R] float32, min_p None or [R] float32. Returns tau [R] int32 (keys >= it are kept), kept_sum [R]
// float32 (sum of exp(s - s_max) over them) and passes [R] int32 (passes over the row the search made).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_filter_cut(const at::Tensor& scaled, const at::Tensor& top_k,
                                                             const at::Tensor& top_p,
                                                             const std::optional<at::Tensor>& min_p) {
  TORCH_CHECK(scaled.dim() == 2 && scaled.scalar_type() == at::kFloat && scaled.is_contiguous(),
              "cpu_filter_cut: scaled must be a contiguous [R, V] float32 tensor");
  const int64_t R = scaled.size(0), V = scaled.size(1);
  TORCH_CHECK(V > 0 && V < (1LL << 24), "cpu_filter_cut: V must be in [1, 2^24), got ", V);
  TORCH_CHECK(top_k.dim() == 1 && top_k.size(0) == R && top_k.scalar_type() == at::kInt && top_k.is_contiguous(),
              "cpu_filter_cut: top_k must be a contiguous [R] int32 tensor");
  TORCH_CHECK(top_p.dim() == 1 && top_p.size(0) == R && top_p.scalar_type() == at::kFloat && top_p.is_contiguous(),
              "cpu_filter_cut: top_p must be a contiguous [R] float32 tensor");
  TORCH_CHECK(!min_p.has_value() || (min_p->dim() == 1 && min_p->size(0) == R && min_p->scalar_type() == at::kFloat &&
                                     min_p->is_contiguous()),
              "cpu_filter_cut: min_p must be a contiguous [R] float32 tensor");
  at::Tensor tau = at::empty({R}, at::TensorOptions().dtype(at::kInt));
  at::Tensor kept = at::empty({R}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor passes = at::empty({R}, at::TensorOptions().dtype(at::kInt));
  const float* s_all = scaled.const_data_ptr<float>();
  const int32_t* kk = top_k.const_data_ptr<int32_t>();
  const float* pp = top_p.const_data_ptr<float>();
  const float* mm = min_p.has_value() ? min_p->const_data_ptr<float>() : nullptr;
  std::vector<unsigned int> cnt(kCutBuckets);
  std::vector<unsigned long long> mass(kCutBuckets);
  for (int64_t r = 0; r < R; ++r) {
    const float* s = s_all + r * V;
    float s_max = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < V; ++i) s_max = std::max(s_max, s[i]);
    float s_sum = 0.0f;
    for (int64_t i = 0; i < V; ++i) s_sum += s_max == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(s[i] - s_max);
    CutSearch cs;
    cs.init(s_max, s_sum, kk[r], pp[r], static_cast<int>(V), mm != nullptr ? mm[r] : 0.0f);
    int n = 0;
    while (!cs.done()) {
      cs.begin_pass();
      std::fill(cnt.begin(), cnt.end(), 0u);
      std::fill(mass.begin(), mass.end(), 0ull);
      for (int64_t i = 0; i < V; ++i) {
        const int j = cs.bucket(order_key(s[i]), s[i]);
        if (j < 0) continue;
        cnt[j] += 1u;
        const float e = std::exp(s[i] - s_max);
        if (e > 0.0f) mass[j] += cut_fixed_mass(e);
      }
      unsigned int c = 0u;
      unsigned long long m = 0ull;
      int first = -1;
      unsigned int c_excl = 0u;
      unsigned long long m_excl = 0ull;
      for (int j = 0; j < kCutBuckets; ++j) {
        c_excl = c;
        m_excl = m;
        c += cnt[j];
        m += mass[j];
        if (cs.satisfied(j, c, m)) {
          first = j;
          break;
        }
      }
      if (first >= 0) {
        cs.settle(first, c_excl, m_excl, c, m);
      } else {
        cs.settle(-1, 0u, 0ull, c, m);
      }
      ++n;
    }
    tau.data_ptr<int32_t>()[r] = cs.tau();
    kept.data_ptr<float>()[r] = cs.kept_sum(s_sum);
    passes.data_ptr<int32_t>()[r] = n;
  }
  return {tau, kept, passes};
}

}  // namespace bild

TORCH_LIBRARY_FRAGMENT(bild_kernels_cpu, m) {
  m.def("cpu_filter_cut(Tensor scaled, Tensor top_k, Tensor top_p, Tensor? min_p=None) -> (Tensor, Tensor, Tensor)");
  m.def("cpu_sample_draft(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor seed, "
        "Tensor offset, Tensor fallback_threshold, Tensor? min_p=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
  m.def("cpu_verify_draft(Tensor draft_ids, Tensor logits, int mode, Tensor rollback_threshold, "
        "Tensor? draft_probs, Tensor temperature, Tensor top_k, Tensor top_p, Tensor seed, Tensor offset, "
        "Tensor? min_p=None, Tensor? row_max=None, Tensor? row_lse=None, Tensor? row_argmax=None) -> (Tensor, "
        "Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bild_kernels_cpu, CPU, m) {
  m.impl("cpu_sample_draft", &bild::cpu_sample_draft);
  m.impl("cpu_verify_draft", &bild::cpu_verify_draft);
  m.impl("cpu_filter_cut", &bild::cpu_filter_cut);
}
