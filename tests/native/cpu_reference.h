// CPU twins of the kernels for the native test, written from bild_kernels/reference/ (loops and
// sorts, nothing clever), so that the test needs neither torch nor Python. Random numbers come from
// the same host/device Philox in csrc/common.cuh, which the test first checks against values of the
// Python reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "common.cuh"

namespace ref {

constexpr float kInf = std::numeric_limits<float>::infinity();

inline int argmax(const std::vector<float>& x) {  // first index on ties, as torch.argmax
  return static_cast<int>(std::max_element(x.begin(), x.end()) - x.begin());
}

inline float logsumexp(const std::vector<float>& x) {
  const float m = *std::max_element(x.begin(), x.end());
  if (m == -kInf) return m;
  double s = 0;
  for (float v : x) s += std::exp(static_cast<double>(v) - m);
  return m + static_cast<float>(std::log(s));
}

// reference._filter_top_k_top_p on one row of scaled logits: top-k, top-p and min-p (0: off).
inline std::vector<float> filter_top_k_top_p(const std::vector<float>& s, int top_k, float top_p, float min_p) {
  const int V = static_cast<int>(s.size());
  std::vector<float> out = s;
  if (top_k > 0 && top_k < V) {
    std::vector<float> srt = s;
    std::sort(srt.begin(), srt.end(), std::greater<float>());
    for (int v = 0; v < V; ++v)
      if (s[v] < srt[top_k - 1]) out[v] = -kInf;
  }
  if (top_p < 1.0f) {
    const float lse = logsumexp(s);
    std::vector<float> p(V);
    for (int v = 0; v < V; ++v) p[v] = std::exp(s[v] - lse);
    std::vector<float> sp = p;
    std::sort(sp.begin(), sp.end(), std::greater<float>());
    int n_keep = 0;
    double excl = 0;
    for (int i = 0; i < V && excl < top_p; ++i, excl += sp[i - 1]) ++n_keep;
    const float thr = sp[std::max(n_keep, 1) - 1];
    for (int v = 0; v < V; ++v)
      if (p[v] < thr) out[v] = -kInf;
  }
  if (min_p > 0.0f) {  // s >= s_max + log(min_p), float sums; a row whose max is not finite keeps everything
    const float s_max = *std::max_element(s.begin(), s.end());
    if (std::isfinite(s_max)) {
      const float cut = s_max + std::log(min_p);
      for (int v = 0; v < V; ++v)
        if (s[v] < cut) out[v] = -kInf;
    }
  }
  return out;
}

struct Sample {
  int64_t token;
  float token_prob, max_prob, energy;
  bool fallback;
};

inline Sample sample_draft(const std::vector<float>& z, float temp, int top_k, float top_p, float min_p, int64_t seed,
                           int64_t offset, float fallback_threshold) {
  const int V = static_cast<int>(z.size());
  const bool greedy = temp <= 0;
  const float t = greedy ? 1.0f : temp;
  std::vector<float> s(V);
  for (int v = 0; v < V; ++v) s[v] = z[v] / t;
  const std::vector<float> filt = filter_top_k_top_p(s, top_k, top_p, min_p);
  std::vector<float> pert = filt;
  if (!greedy)
    for (int v = 0; v < V; ++v) pert[v] += bild::gumbel(seed, v, offset, bild::kPurposeDraftSample, 0);
  Sample r;
  r.token = argmax(pert);
  r.token_prob = std::exp(filt[r.token] - logsumexp(filt));
  r.max_prob = std::exp(*std::max_element(z.begin(), z.end()) - logsumexp(z));
  r.energy = -t * logsumexp(s);
  r.fallback = r.max_prob < fallback_threshold;
  return r;
}

// q_j of reference.verify_draft_ref: softmax of the filtered scaled logits, one-hot at temperature 0.
inline std::vector<float> target_dist(const std::vector<float>& z, float temp, int top_k, float top_p, float min_p) {
  const int V = static_cast<int>(z.size());
  std::vector<float> q(V, 0.0f);
  if (temp <= 0) {
    q[argmax(z)] = 1.0f;
    return q;
  }
  std::vector<float> s(V);
  for (int v = 0; v < V; ++v) s[v] = z[v] / temp;
  const std::vector<float> filt = filter_top_k_top_p(s, top_k, top_p, min_p);
  const float lse = logsumexp(filt);
  for (int v = 0; v < V; ++v) q[v] = std::exp(filt[v] - lse);
  return q;
}

struct Verify {
  int num_accepted;
  std::vector<int64_t> output_ids;  // K+1
  std::vector<float> distances;     // K
  std::vector<float> target_probs;  // K+1
};

// One row: ids [K], logits [K+1][V], probs [K][V] (sample mode).
inline Verify verify_draft(const std::vector<int64_t>& ids, const std::vector<std::vector<float>>& z, int mode,
                           float rollback_threshold, const std::vector<std::vector<float>>& probs, float temp,
                           int top_k, float top_p, float min_p, int64_t seed, int64_t offset) {
  const int K = static_cast<int>(ids.size());
  int n = 0;
  while (n < K && ids[n] >= 0) ++n;
  Verify r{0, std::vector<int64_t>(K + 1, -1), std::vector<float>(K, 0.0f), std::vector<float>(K + 1, 0.0f)};
  int c = n;
  for (int j = 0; j <= n; ++j) {
    const float lse = logsumexp(z[j]);
    const int amax = argmax(z[j]);
    r.target_probs[j] = std::exp(z[j][amax] - lse);
    if (j == n) break;
    const int d = static_cast<int>(ids[j]);
    r.distances[j] = lse - z[j][d];
    bool ok = d == amax;
    if (mode == bild::kModeBild) ok = !(r.distances[j] > rollback_threshold && d != amax);
    if (mode == bild::kModeSample) {
      const float u = bild::uniform(seed, 0, offset, bild::kPurposeVerifyAccept, j);
      ok = u * probs[j][d] < target_dist(z[j], temp, top_k, top_p, min_p)[d];
    }
    if (!ok && c == n) c = j;
  }
  const int V = static_cast<int>(z[c].size());
  int64_t emitted = argmax(z[c]);
  if (temp > 0) {
    std::vector<float> w = target_dist(z[c], temp, top_k, top_p, min_p);
    if (mode == bild::kModeSample && c < n) {
      std::vector<float> resid(V);
      double sum = 0;
      for (int v = 0; v < V; ++v) sum += resid[v] = std::max(w[v] - probs[c][v], 0.0f);
      if (sum > 0) w = resid;
    }
    std::vector<float> pert(V);
    for (int v = 0; v < V; ++v) pert[v] = std::log(w[v]) + bild::gumbel(seed, v, offset, bild::kPurposeVerifyToken, c);
    emitted = argmax(pert);
  }
  r.num_accepted = c;
  for (int j = 0; j < c; ++j) r.output_ids[j] = ids[j];
  r.output_ids[c] = emitted;
  return r;
}

// reference.apply_penalties_ref for row b of logits [B, P, V] (float arithmetic, one rounding per operation, the
// reference's order: the logit bias, the penalties, min_tokens); returns the row's [P, V] penalized logits.
inline std::vector<float> apply_penalties(const std::vector<float>& logits, const std::vector<int64_t>& token_ids,
                                          int prompt_len, const std::vector<int64_t>& draft_ids, double repetition,
                                          double presence, double frequency, int min_tokens,
                                          const std::vector<int64_t>& banned_ids, const std::vector<int64_t>& bias_ids,
                                          const std::vector<double>& bias_values, int b, int P, int V) {
  const int L = static_cast<int>(token_ids.size());  // this row's
  std::vector<int> count(V, 0);
  std::vector<bool> in_prompt(V, false);
  int n_out = 0;
  for (int j = 0; j < L; ++j) {
    if (token_ids[j] < 0) continue;
    if (j >= prompt_len) {
      ++count[token_ids[j]];
      ++n_out;
    } else {
      in_prompt[token_ids[j]] = true;
    }
  }
  const float r = static_cast<float>(repetition), pres = static_cast<float>(presence);
  const float freq = static_cast<float>(frequency);
  std::vector<float> bias(V, 0.0f);
  for (size_t j = 0; j < bias_ids.size(); ++j)
    if (bias_ids[j] >= 0) bias[bias_ids[j]] += static_cast<float>(bias_values[j]);
  std::vector<float> out(static_cast<size_t>(P) * V);
  for (int p = 0; p < P; ++p) {
    if (p > 0 && draft_ids[p - 1] >= 0) ++count[draft_ids[p - 1]];
    for (int v = 0; v < V; ++v) {
      float z = logits[(static_cast<size_t>(b) * P + p) * V + v];
      if (!bias_ids.empty()) z = z + bias[v];  // the logit bias first
      if (in_prompt[v] || count[v] > 0) z = z < 0.0f ? z * r : z / r;
      z = z - freq * static_cast<float>(count[v]);
      z = z - pres * (count[v] > 0 ? 1.0f : 0.0f);
      out[static_cast<size_t>(p) * V + v] = z;
    }
    if (n_out + p < min_tokens)
      for (int64_t id : banned_ids)
        if (id >= 0) out[static_cast<size_t>(p) * V + id] = -kInf;
  }
  return out;
}

// reference.apply_token_bitmask_ref for row b of logits [R, V] with bitmask [R, ceil(V / 32)]: token t's logit where
// bit t % 32 of the row's word t / 32 is set, else -inf (the bits past V ignored); returns the row's V logits.
inline std::vector<float> apply_token_bitmask(const std::vector<float>& logits, const std::vector<int32_t>& bitmask,
                                              int b, int V) {
  const int W = (V + 31) / 32;
  std::vector<float> out(V);
  for (int t = 0; t < V; ++t) {
    const uint32_t word = static_cast<uint32_t>(bitmask[static_cast<size_t>(b) * W + t / 32]);
    out[t] = (word >> (t % 32)) & 1u ? logits[static_cast<size_t>(b) * V + t] : -kInf;
  }
  return out;
}

}  // namespace ref
