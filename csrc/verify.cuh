// Batched draft verification kernels and launcher (spec: reference.verify_draft_ref). No torch headers.
#pragma once

#include "common.cuh"

namespace bild {

// Per-row inputs, all [B]: the large model's sampling parameters and BiLD's rollback threshold.
struct VerifyParams {
  const float* rollback_threshold;
  const float* temperature;
  const int* top_k;
  const float* top_p;
  const int64_t* seed;
  const int64_t* offset;
};

// Outputs: num_accepted [B] i32, output_ids [B, K+1] i64, distances [B, K] f32, target_probs [B, K+1] f32.
struct VerifyOutputs {
  int* num_accepted;
  int64_t* output_ids;
  float* distances;
  float* target_probs;
};

// Per-position results the finishing kernel needs, [B * (K+1)] each; written for positions j <= n_b.
struct VerifyScratch {
  int* verdict;      // draft j accepted (j < n_b)
  int* argmax;       // argmax of z_j
  int* tau;          // order key of the smallest kept scaled logit (kLowestKey: no filter)
  float* s_max;      // max of s_j = z_j / T
  float* kept_sum;   // sum over the kept set of exp(s_j - s_max)
};

// Number of drafted tokens of row b: the ids before the -1 padding.
__device__ inline int drafted_count(const int64_t* ids, int K) {
  int n = 0;
  for (int k = 0; k < K; ++k) n += ids[k] >= 0;
  return n;
}

// Grid (B * (K+1),), kRowThreads threads: one block per (row b, position j) with j <= n_b makes one
// pass over z_j's V logits (online logsumexp, argmax; sampling rows also the logsumexp of z_j / T,
// filtered sampling rows add the top-k/top-p bisection and a kept-mass pass), writes distance and
// target prob, and leaves the accept verdict plus what defines q_j in scratch. Blocks past n_b only
// zero their outputs. The accept rule needs all positions of a row: VerifyFinishKernel applies it.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    VerifyPositionKernel(const int64_t* __restrict__ draft_ids, const T* __restrict__ target_logits,
                         const float* __restrict__ draft_probs, int K, int V, int mode, VerifyParams prm,
                         VerifyOutputs out, VerifyScratch scr) {
  __shared__ float smem[64 * kPivots];
  const int pid = blockIdx.x, K1 = K + 1;
  const int b = pid / K1, j = pid % K1;
  const int64_t* ids = draft_ids + static_cast<int64_t>(b) * K;
  const int n = drafted_count(ids, K);
  if (j > n) {
    if (threadIdx.x == 0) {
      out.target_probs[pid] = 0.0f;
      if (j < K) out.distances[b * K + j] = 0.0f;
    }
    return;
  }
  const T* row = target_logits + static_cast<int64_t>(pid) * V;
  const float temp = prm.temperature[b];
  const bool greedy = temp <= 0.0f;
  const float t = greedy ? 1.0f : temp;
  const int top_k = prm.top_k[b];
  const float top_p = prm.top_p[b];
  const bool filtered = !greedy && ((top_k > 0 && top_k < V) || top_p < 1.0f);

  Lse z_lse, s_lse;
  ArgMax z_max;
  for_each_in_row(row, V, [&](int i, float z) {
    z_lse.add(z);
    z_max.add(z, i);
    if (!greedy) s_lse.add(__fdiv_rn(z, t));
  });
  z_lse = block_reduce(z_lse, reinterpret_cast<Lse*>(smem));
  z_max = block_reduce(z_max, reinterpret_cast<ArgMax*>(smem));
  s_lse = greedy ? z_lse : block_reduce(s_lse, reinterpret_cast<Lse*>(smem));

  int tau = kLowestKey;
  float kept_sum = s_lse.s;
  if (filtered) {
    tau = filter_threshold(row, V, t, s_lse.m, s_lse.s, top_k, top_p, smem);
    float mass = 0.0f;
    for_each_in_row(row, V, [&](int, float z) {
      const float s = __fdiv_rn(z, t);
      if (order_key(s) >= tau) mass += expf(s - s_lse.m);
    });
    kept_sum = block_reduce(mass, smem);
  }
  if (threadIdx.x != 0) return;

  const float lse = z_lse.log_sum();
  out.target_probs[pid] = expf(z_lse.m - lse);
  const bool drafted = j < n;
  const int draft = drafted ? static_cast<int>(ids[j]) : 0;
  const float z_draft = to_float(row[draft]);
  const float dist = lse - z_draft;
  if (j < K) out.distances[b * K + j] = drafted ? dist : 0.0f;
  const bool hit = draft == z_max.i;
  bool ok = hit;
  if (mode == kModeBild) {
    ok = !(dist > prm.rollback_threshold[b] && !hit);
  } else if (mode == kModeSample) {
    const float ps = drafted ? draft_probs[(static_cast<int64_t>(b) * K + j) * V + draft] : 0.0f;
    const float s_draft = __fdiv_rn(z_draft, t);
    float q_draft = order_key(s_draft) >= tau ? expf(s_draft - s_lse.m) / kept_sum : 0.0f;
    if (greedy) q_draft = hit ? 1.0f : 0.0f;  // q is one-hot on the argmax at temperature 0
    ok = uniform(prm.seed[b], 0, prm.offset[b], kPurposeVerifyAccept, j) * ps < q_draft;
  }
  scr.verdict[pid] = ok && drafted;
  scr.argmax[pid] = z_max.i;
  scr.tau[pid] = tau;
  scr.s_max[pid] = s_lse.m;
  scr.kept_sum[pid] = kept_sum;
}

// Grid (B,), kRowThreads threads: one block per row reads the verdicts, cuts at the first rejection
// c (or n_b), and writes num_accepted and output_ids. Greedy rows emit the argmax of z_c; sampling rows
// make one pass over z_c drawing Gumbel-max over log q_c and, at a rejection in sample mode, over the
// residual max(0, q_c - p_S) in the same pass (the residual wins unless it is zero everywhere).
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    VerifyFinishKernel(const int64_t* __restrict__ draft_ids, const T* __restrict__ target_logits,
                       const float* __restrict__ draft_probs, int K, int V, int mode, VerifyParams prm,
                       VerifyOutputs out, VerifyScratch scr) {
  __shared__ float smem[2 * 32];
  const int b = blockIdx.x, K1 = K + 1;
  const int64_t* ids = draft_ids + static_cast<int64_t>(b) * K;
  const int n = drafted_count(ids, K);
  int c = 0;
  while (c < n && scr.verdict[b * K1 + c]) ++c;
  const int pc = b * K1 + c;

  int emitted = scr.argmax[pc];
  if (!(prm.temperature[b] <= 0.0f)) {
    const float t = prm.temperature[b];
    const int tau = scr.tau[pc];
    const float s_max = scr.s_max[pc], kept_sum = scr.kept_sum[pc];
    const int64_t seed = prm.seed[b], offset = prm.offset[b];
    const bool resid = mode == kModeSample && c < n;
    const float* ps_row = resid ? draft_probs + (static_cast<int64_t>(b) * K + c) * V : nullptr;
    ArgMax q_max, r_max;
    int any_resid = 0;
    for_each_in_row(target_logits + static_cast<int64_t>(pc) * V, V, [&](int i, float z) {
      const float s = __fdiv_rn(z, t);
      const float q = order_key(s) >= tau ? expf(s - s_max) / kept_sum : 0.0f;
      const float g = gumbel(seed, i, offset, kPurposeVerifyToken, c);
      q_max.add(q > 0.0f ? logf(q) + g : -kInf, i);  // log(0) + g = -inf, as in the reference
      if (resid) {
        const float r = fmaxf(q - ps_row[i], 0.0f);
        any_resid |= r > 0.0f;
        r_max.add(r > 0.0f ? logf(r) + g : -kInf, i);
      }
    });
    q_max = block_reduce(q_max, reinterpret_cast<ArgMax*>(smem));
    emitted = q_max.i;
    if (resid) {
      r_max = block_reduce(r_max, reinterpret_cast<ArgMax*>(smem));
      if (block_reduce(any_resid, reinterpret_cast<int*>(smem)) > 0) emitted = r_max.i;
    }
  }
  for (int k = threadIdx.x; k < K1; k += blockDim.x) {
    out.output_ids[static_cast<int64_t>(b) * K1 + k] = k < c ? ids[k] : (k == c ? emitted : -1);
  }
  if (threadIdx.x == 0) out.num_accepted[b] = c;
}

// draft_ids: [B, K] (drafts then -1), target_logits: [B, K+1, V] (T = float | __half | __nv_bfloat16),
// draft_probs: [B, K, V] f32, read in sample mode only (may be null otherwise). scratch: 5 arrays of
// B * (K+1) elements. Two launches on `stream`; capturable: no sync, no allocation.
template <typename T>
cudaError_t VerifyDraft(const int64_t* draft_ids, const T* target_logits, const float* draft_probs, int B, int K,
                        int V, int mode, VerifyParams prm, VerifyOutputs out, VerifyScratch scr,
                        cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  VerifyPositionKernel<T><<<B * (K + 1), kRowThreads, 0, stream>>>(draft_ids, target_logits, draft_probs, K, V,
                                                                   mode, prm, out, scr);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  VerifyFinishKernel<T><<<B, kRowThreads, 0, stream>>>(draft_ids, target_logits, draft_probs, K, V, mode, prm, out,
                                                       scr);
  return cudaGetLastError();
}

}  // namespace bild
