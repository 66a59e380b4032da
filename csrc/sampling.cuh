// Draft sampling kernel and launcher (spec: reference.sample_draft_ref). No torch headers.
#pragma once

#include "common.cuh"

namespace bild {

// Per-row inputs, all [B]: temperature f32 (<= 0: greedy), top_k i32 (0: off), top_p f32 (1: off),
// seed/offset i64 (Philox key and step counter), fallback_threshold f32.
struct SampleDraftParams {
  const float* temperature;
  const int* top_k;
  const float* top_p;
  const int64_t* seed;
  const int64_t* offset;
  const float* fallback_threshold;
};

// Outputs, all [B]: token_ids i64, token_probs f32, max_probs f32, energies f32, fallback bool.
struct SampleDraftOutputs {
  int64_t* token_ids;
  float* token_probs;
  float* max_probs;
  float* energies;
  bool* fallback;
};

// Grid (B,), kRowThreads threads: one block owns one row of V logits, each thread a strided share of it.
// Rows without top-k/top-p make ONE pass: online logsumexp of z (max_probs) and of s = z / T (energies),
// running argmax of z (greedy rows) or of s + Gumbel noise (sampling rows), merged across the block at
// the end; the softmax never reaches memory. Rows with top-k/top-p add the threshold bisection (one
// counting pass per step) and one pass that sums and samples over the kept set.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    SampleDraftKernel(const T* __restrict__ logits, int V, SampleDraftParams prm, SampleDraftOutputs out) {
  __shared__ float smem[64 * kPivots];
  const int b = blockIdx.x;
  const T* row = logits + static_cast<int64_t>(b) * V;
  const float temp = prm.temperature[b];
  const bool greedy = temp <= 0.0f;
  const float t = greedy ? 1.0f : temp;  // greedy rows report probabilities at temperature 1
  const int top_k = prm.top_k[b];
  const float top_p = prm.top_p[b];
  const bool filtered = (top_k > 0 && top_k < V) || top_p < 1.0f;
  const int64_t seed = prm.seed[b], offset = prm.offset[b];
  const bool draw_now = !greedy && !filtered;  // filtered rows draw over the kept set instead

  Lse z_lse, s_lse;
  ArgMax z_max, g_max;
  for_each_in_row(row, V, [&](int i, float z) {
    z_lse.add(z);
    z_max.add(z, i);
    if (!greedy) {
      const float s = __fdiv_rn(z, t);
      s_lse.add(s);
      if (draw_now) g_max.add(s + gumbel(seed, i, offset, kPurposeDraftSample, 0), i);
    }
  });
  z_lse = block_reduce(z_lse, reinterpret_cast<Lse*>(smem));
  z_max = block_reduce(z_max, reinterpret_cast<ArgMax*>(smem));
  s_lse = greedy ? z_lse : block_reduce(s_lse, reinterpret_cast<Lse*>(smem));  // block-uniform branch
  int token = z_max.i;  // the filters always keep the maximum, so greedy rows need nothing else
  if (draw_now) token = block_reduce(g_max, reinterpret_cast<ArgMax*>(smem)).i;

  float kept_sum = s_lse.s;
  if (filtered) {
    const int tau = filter_threshold(row, V, t, s_lse.m, s_lse.s, top_k, top_p, smem);
    float mass = 0.0f;
    ArgMax k_max;
    for_each_in_row(row, V, [&](int i, float z) {
      const float s = __fdiv_rn(z, t);
      if (order_key(s) >= tau) {
        mass += expf(s - s_lse.m);
        if (!greedy) k_max.add(s + gumbel(seed, i, offset, kPurposeDraftSample, 0), i);
      }
    });
    kept_sum = block_reduce(mass, smem);
    if (!greedy) token = block_reduce(k_max, reinterpret_cast<ArgMax*>(smem)).i;
  }

  if (threadIdx.x == 0) {
    const float s_token = __fdiv_rn(to_float(row[token]), t);
    const float max_prob = expf(z_lse.m - z_lse.log_sum());
    out.token_ids[b] = token;
    out.token_probs[b] = expf(s_token - (s_lse.m + logf(kept_sum)));
    out.max_probs[b] = max_prob;
    out.energies[b] = -t * s_lse.log_sum();
    out.fallback[b] = max_prob < prm.fallback_threshold[b];
  }
}

// logits: [B, V] row-major, T = float | __half | __nv_bfloat16. Capturable: no sync, no allocation.
template <typename T>
cudaError_t SampleDraft(const T* logits, int B, int V, SampleDraftParams prm, SampleDraftOutputs out,
                        cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  SampleDraftKernel<T><<<B, kRowThreads, 0, stream>>>(logits, V, prm, out);
  return cudaGetLastError();
}

}  // namespace bild
