// Batched draft verification kernels and launcher (spec: reference.verify_draft_ref). No torch headers.
#pragma once

#include "common.cuh"

namespace bild {

// Per-row inputs, all [B]: the large model's sampling parameters (temperature f32, <= 0: greedy; top_k i32, 0: off;
// top_p f32, 1: off; min_p f32, 0: off; seed/offset i64) and BiLD's rollback threshold.
struct VerifyParams {
  const float* rollback_threshold;
  const float* temperature;
  const int* top_k;
  const float* top_p;
  const float* min_p;  // null: 0 (off) for every row
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

// What the emitting pass over z_c leaves per (row, chunk) for a sampling row.
struct CutPartial {
  ArgMax q;           // Gumbel-max over log q_c
  ArgMax r;           // Gumbel-max over log max(0, q_c - p_S) (sample mode, at a rejection)
  int any_resid = 0;  // threads that saw a positive residual
  int unused = 0;
};
static_assert(sizeof(CutPartial) == 24, "CutPartial is three 8-byte records");

// Per-position results the finishing kernels need, [B * (K+1)] each, written for positions j <= n_b;
// and the two passes' chunk partials.
struct VerifyScratch {
  int* verdict;      // draft j accepted (j < n_b)
  int* argmax;       // argmax of z_j
  int* tau;          // order key of the smallest kept scaled logit (kLowestKey: no filter)
  float* s_max;      // max of s_j = z_j / T
  float* kept_sum;   // sum over the kept set of exp(s_j - s_max)
  RowPartial* partials;      // [B * (K+1) * row_splits<T>(V)]: the first pass's chunk statistics
  CutPartial* cut_partials;  // [B * row_splits<T>(V)]: the emitting pass's, per row and chunk
};

// Elements of VerifyScratch::partials and ::cut_partials that VerifyDraft<T> needs.
template <typename T>
inline int64_t verify_partials(int B, int K, int V) {
  return static_cast<int64_t>(B) * (K + 1) * row_splits<T>(V);
}
template <typename T>
inline int64_t verify_cut_partials(int B, int V) {
  return static_cast<int64_t>(B) * row_splits<T>(V);
}

// Number of drafted tokens of row b: the ids before the -1 padding.
__device__ inline int drafted_count(const int64_t* ids, int K) {
  int n = 0;
  for (int k = 0; k < K; ++k) n += ids[k] >= 0;
  return n;
}

// Row b's cut: its first rejected position, or n (its drafted tokens) when every one was accepted. kL2: the verdicts
// were written by other blocks of the same launch (a fused tail): read past this SM's L1.
template <bool kL2 = false>
__device__ inline int cut_position(const int* verdict, int b, int K, int n) {
  int c = 0;
  while (c < n && (kL2 ? __ldcg(verdict + b * (K + 1) + c) : verdict[b * (K + 1) + c])) ++c;
  return c;
}

// One warp writes row b's outputs from its cut c: the accepted drafts, then the token `emitted` at the cut, then -1.
__device__ inline void write_cut_row(const VerifyOutputs& out, const int64_t* ids, int b, int K, int c, int emitted) {
  const int K1 = K + 1;
  for (int k = threadIdx.x & 31; k < K1; k += 32) {
    out.output_ids[static_cast<int64_t>(b) * K1 + k] = k < c ? ids[k] : (k == c ? emitted : -1);
  }
  if ((threadIdx.x & 31) == 0) out.num_accepted[b] = c;
}

// Position pid = b * (K+1) + j of the batch: what both position kernels read first.
struct VerifyPosition {
  int pid, b, j, n;  // n: the row's drafted tokens; positions j > n are padding
  bool greedy, filtered;
  float t;
  __device__ VerifyPosition(int pid_, const int64_t* draft_ids, int K, int V, const VerifyParams& prm) : pid(pid_) {
    b = pid / (K + 1);
    j = pid % (K + 1);
    n = drafted_count(draft_ids + static_cast<int64_t>(b) * K, K);
    const float temp = prm.temperature[b];
    greedy = temp <= 0.0f;
    t = greedy ? 1.0f : temp;
    filtered = !greedy && filter_on(prm.top_k[b], prm.top_p[b], row_min_p(prm.min_p, b), V);
  }
};

// The first pass's task for position row pid: rows past the drafts (j > n_b) are skipped; sampling rows
// (temperature > 0) also need the logsumexp of z / T.
struct VerifyRows {
  const int64_t* draft_ids;
  VerifyParams prm;
  int K, V;
  __device__ RowTask operator()(int pid) const {
    const VerifyPosition at(pid, draft_ids, K, V, prm);
    RowTask task;
    task.active = at.j <= at.n;
    task.scaled = !at.greedy;
    task.t = at.t;
    return task;
  }
};

// The split cut-off search's view of position row pid (common.cuh CutRow): the active positions of rows that
// sample with top-k / top-p / min-p, as VerifyFilterKernel's.
struct VerifyCutRows {
  const int64_t* draft_ids;
  VerifyParams prm;
  int K, V;
  __device__ CutRow operator()(int pid) const {
    const VerifyPosition at(pid, draft_ids, K, V, prm);
    CutRow row;
    row.filtered = at.filtered && at.j <= at.n;
    row.t = at.t;
    row.top_k = prm.top_k[at.b];
    row.top_p = prm.top_p[at.b];
    row.min_p = row_min_p(prm.min_p, at.b);
    return row;
  }
};

// One thread's closing work for an active position (j <= n): target prob, distance, and the accept
// verdict plus what defines q_j, from the merged statistics and the kept set (tau, kept_sum).
template <typename T>
__device__ void finish_position(const VerifyPosition& at, const RowPartial& stats, int tau, float kept_sum,
                                const int64_t* __restrict__ draft_ids, const T* __restrict__ target_logits,
                                const float* __restrict__ draft_probs, int K, int V, int mode,
                                const VerifyParams& prm, const VerifyOutputs& out, const VerifyScratch& scr) {
  const int pid = at.pid, b = at.b, j = at.j;
  const Lse z_lse = stats.z;
  const Lse s_lse = at.greedy ? z_lse : stats.s;
  const T* row = target_logits + static_cast<int64_t>(pid) * V;
  const float lse = z_lse.log_sum();
  out.target_probs[pid] = expf(z_lse.m - lse);
  const bool drafted = j < at.n;
  const int draft = drafted ? static_cast<int>(draft_ids[static_cast<int64_t>(b) * K + j]) : 0;
  const float z_draft = to_float(row[draft]);
  const float dist = lse - z_draft;
  if (j < K) out.distances[b * K + j] = drafted ? dist : 0.0f;
  const bool hit = draft == stats.zmax.i;
  bool ok = hit;
  if (mode == kModeBild) {
    ok = !(dist > prm.rollback_threshold[b] && !hit);
  } else if (mode == kModeSample) {
    const float ps = drafted ? draft_probs[(static_cast<int64_t>(b) * K + j) * V + draft] : 0.0f;
    const float s_draft = __fdiv_rn(z_draft, at.t);
    float q_draft = order_key(s_draft) >= tau ? expf(s_draft - s_lse.m) / kept_sum : 0.0f;
    if (at.greedy) q_draft = hit ? 1.0f : 0.0f;  // q is one-hot on the argmax at temperature 0
    ok = uniform(prm.seed[b], 0, prm.offset[b], kPurposeVerifyAccept, j) * ps < q_draft;
  }
  scr.verdict[pid] = ok && drafted;
  scr.argmax[pid] = stats.zmax.i;
  scr.tau[pid] = tau;
  scr.s_max[pid] = s_lse.m;
  scr.kept_sum[pid] = kept_sum;
}

constexpr int kMergeWarps = 4;  // positions per block of VerifyMergeKernel, one warp each

// Grid (ceil(B * (K+1) / kMergeWarps),), 32 * kMergeWarps threads: one warp per position merges the first
// pass's S partials of z_j (logsumexp, argmax; sampling rows also the logsumexp of z_j / T) and finishes the
// position, unless the row filters with top-k / top-p / min-p and no cut_state (the split search's) is given: then
// that is VerifyFilterKernel's job. Positions past n_b only zero their outputs.
template <typename T>
__global__ void __launch_bounds__(32 * kMergeWarps)
    VerifyMergeKernel(const int64_t* __restrict__ draft_ids, const T* __restrict__ target_logits,
                      const float* __restrict__ draft_probs, int B, int K, int V, int S, int mode,
                      VerifyParams prm, VerifyOutputs out, VerifyScratch scr, const CutSearch* __restrict__ cut_state) {
  const int pid = blockIdx.x * kMergeWarps + (threadIdx.x >> 5);
  if (pid >= B * (K + 1)) return;  // warp-uniform
  const VerifyPosition at(pid, draft_ids, K, V, prm);
  const bool lane0 = (threadIdx.x & 31) == 0;
  if (at.j > at.n) {
    if (lane0) {
      out.target_probs[pid] = 0.0f;
      if (at.j < K) out.distances[at.b * K + at.j] = 0.0f;
    }
    return;
  }
  if (at.filtered && cut_state == nullptr) return;
  const RowPartial stats = warp_merge_partials(scr.partials + static_cast<int64_t>(pid) * S, S);
  if (lane0) {
    int tau = kLowestKey;
    float kept_sum = at.greedy ? stats.z.s : stats.s.s;
    if (at.filtered) {
      const CutSearch cut = cut_state[pid];
      tau = cut.tau();
      kept_sum = cut.kept_sum(stats.s.s);
    }
    finish_position(at, stats, tau, kept_sum, draft_ids, target_logits, draft_probs, K, V, mode, prm, out, scr);
  }
}

// The fused tail of a verification without sampling rows (kTailFused, use_fused_tail): the block that writes position
// pid's last first-pass partial merges the partials and finishes the position (VerifyMergeKernel's work), and the
// last position of row b to finish cuts the row and writes its outputs (VerifyFinishKernel's), so the first pass is
// the verification's only launch besides clearing the counts. counts: [B * (K+1)] chunks done, then [B] positions
// done, zero before the launch and left at zero after it. Warp 0 of the block does the work.
template <typename T>
struct VerifyFusedTail {
  static constexpr bool kNone = false;
  int* chunks_done;     // [B * (K+1)]
  int* positions_done;  // [B]
  const int64_t* draft_ids;
  const T* target_logits;
  const float* draft_probs;
  int K, V, mode;
  VerifyParams prm;
  VerifyOutputs out;
  VerifyScratch scr;

  __device__ void operator()(int pid, int S, const RowPartial* partials) const {
    if (threadIdx.x >= 32) return;  // warp-uniform
    const int lane = threadIdx.x;  // (warp 0)
    const RowPartial stats = warp_merge_partials<true>(partials, S);
    const VerifyPosition at(pid, draft_ids, K, V, prm);
    bool row_last = false;
    if (lane == 0) {
      finish_position(at, stats, kLowestKey, at.greedy ? stats.z.s : stats.s.s, draft_ids, target_logits,
                      draft_probs, K, V, mode, prm, out, scr);
      __threadfence();  // the position's verdict and argmax, before the count that publishes them
      row_last = atomicAdd(positions_done + at.b, 1) == at.n;  // the row's positions 0..n are active
      if (row_last) {
        positions_done[at.b] = 0;
        __threadfence();  // the other positions' results, after their counts
      }
    }
    if (!__shfl_sync(0xffffffffu, row_last, 0)) return;  // warp-uniform
    const int b = at.b, n = at.n, K1 = K + 1;
    const int c = cut_position<true>(scr.verdict, b, K, n);  // other blocks wrote the verdicts and argmaxes
    write_cut_row(out, draft_ids + static_cast<int64_t>(b) * K, b, K, c, __ldcg(scr.argmax + b * K1 + c));
    for (int k = n + 1 + lane; k < K1; k += 32) {  // the padding positions, which the first pass skipped:
      out.target_probs[b * K1 + k] = 0.0f;        // VerifyMergeKernel zeroes them
      if (k < K) out.distances[b * K + k] = 0.0f;
    }
  }
};

// Blocks of the kernels below that stride over their positions or chunks: without filtering rows, or without
// sampling rows, nearly all of those return at once, and a grid of one block each cost more than their work
// (the H200 profile of 2026-11-26b: 8.8 us for 576 such filter blocks of 512 threads, one resident an SM).
constexpr int kVerifyLoopBlocks = 256;

// Grid (min(B * (K+1), kVerifyLoopBlocks),), kRowThreads threads, striding over the positions: each active
// position of a row that filters with top-k / top-p / min-p (the others are passed over) finds the kept set's
// cut-off over z_j / T and its mass (filter_cut) and finishes the position.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    VerifyFilterKernel(const int64_t* __restrict__ draft_ids, const T* __restrict__ target_logits,
                       const float* __restrict__ draft_probs, int positions, int K, int V, int S, int mode,
                       VerifyParams prm, VerifyOutputs out, VerifyScratch scr) {
  __shared__ CutSmem cut_smem;
  int mine = 0;  // whether any position filters: one parallel round, then every block without work returns
  for (int pid = threadIdx.x; pid < positions; pid += blockDim.x) {
    const VerifyPosition at(pid, draft_ids, K, V, prm);
    mine |= at.filtered && at.j <= at.n;
  }
  if (!__syncthreads_or(mine)) return;  // block-uniform
  for (int pid = blockIdx.x; pid < positions; pid += gridDim.x) {
    const VerifyPosition at(pid, draft_ids, K, V, prm);
    if (!at.filtered || at.j > at.n) continue;  // block-uniform
    const RowPartial stats = warp_merge_partials(scr.partials + static_cast<int64_t>(at.pid) * S, S);
    const T* row = target_logits + static_cast<int64_t>(at.pid) * V;
    const float t = at.t, s_max = stats.s.m;
    const CutSearch cut =
        filter_cut(row, V, t, s_max, stats.s.s, prm.top_k[at.b], prm.top_p[at.b], row_min_p(prm.min_p, at.b),
                   cut_smem);
    if (threadIdx.x == 0) {  // filter_cut's trailing barrier: the next position may clear cut_smem at once
      finish_position(at, stats, cut.tau(), cut.kept_sum(stats.s.s), draft_ids, target_logits, draft_probs, K, V,
                      mode, prm, out, scr);
    }
  }
}

// The work of one (row b, chunk) item of VerifyCutChunkKernel; every thread of the block calls it. Ends with a
// barrier (block_reduce's), so smem is free again on return.
template <typename T>
__device__ void cut_chunk(const int64_t* __restrict__ draft_ids, const T* __restrict__ target_logits,
                          const float* __restrict__ draft_probs, int K, int V, int S, int b, int chunk, int mode,
                          const VerifyParams& prm, const VerifyScratch& scr, float* smem) {
  const float t = prm.temperature[b];
  const int n = drafted_count(draft_ids + static_cast<int64_t>(b) * K, K);
  const int c = cut_position(scr.verdict, b, K, n);
  const int pc = b * (K + 1) + c;
  const int tau = scr.tau[pc];
  const float s_max = scr.s_max[pc], kept_sum = scr.kept_sum[pc];
  const int64_t seed = prm.seed[b], offset = prm.offset[b];
  const bool resid = mode == kModeSample && c < n;
  const float* ps_row = resid ? draft_probs + (static_cast<int64_t>(b) * K + c) * V : nullptr;
  const T* row = target_logits + static_cast<int64_t>(pc) * V;
  auto q_of = [&](float z) {  // q = the target's filtered distribution at temperature t, 0 outside the kept set
    const float s = __fdiv_rn(z, t);
    return order_key(s) >= tau ? expf(s - s_max) / kept_sum : 0.0f;
  };
  CutPartial p;
  // Every thread starts the q draw from the draw at the position's argmax (always kept; the same candidate in every
  // chunk changes no maximum), so that the bar below is high from the first element.
  const int amax = scr.argmax[pc];
  const float q_amax = q_of(to_float(row[amax]));
  if (q_amax > 0.0f) p.q.add(logf(q_amax) + gumbel(seed, amax, offset, kPurposeVerifyToken, c), amax);
  // An upper bound of log q without the division, exp or log: lq = log(exp(s - s_max) / kept_sum) is at most
  // (s - s_max) - log(kept_sum) plus the rounding of expf (2 ulp), the division and logf (1 ulp each), which the
  // margin below covers many times over; s <= scaled_upper. Where it already fails the bar (for q, and for
  // the residual r <= q too), the element cannot win either draw: skipped outright, unless it still has to tell
  // whether this thread sees a positive residual at all.
  const float inv_t = 1.0f / t, log_kept = logf(kept_sum);
  for_each_in_chunk(row, V, S, chunk, [&](int i, float z) {
    if (!resid || p.any_resid) {
      const float lq_hi = (scaled_upper(z, inv_t) - s_max) - log_kept;
      const float bound = lq_hi + (1e-4f + 1e-5f * (fabsf(lq_hi) + fabsf(log_kept)));  // NaN: no skip
      if (bound + kGumbelMax < (resid ? fminf(p.q.v, p.r.v) : p.q.v)) return;
    }
    const float q = q_of(z);
    const float lq = q > 0.0f ? logf(q) : -kInf;  // log(0) + g = -inf, as in the reference
    const float r = resid ? fmaxf(q - ps_row[i], 0.0f) : 0.0f;
    const float lr = r > 0.0f ? logf(r) : -kInf;
    p.any_resid |= r > 0.0f;
    // Every Gumbel draw is below kGumbelMax and rounding is monotone: an element whose log + kGumbelMax is below
    // the best draw so far cannot win or tie, so its Philox draw is skipped (most of a peaked row's elements).
    const bool q_may_win = !(lq + kGumbelMax < p.q.v), r_may_win = resid && !(lr + kGumbelMax < p.r.v);
    if (!q_may_win && !r_may_win) return;
    const float g = lq > -kInf || lr > -kInf ? gumbel(seed, i, offset, kPurposeVerifyToken, c) : 0.0f;
    if (q_may_win) p.q.add(lq + g, i);
    if (r_may_win) p.r.add(lr + g, i);
  });
  p.q = block_reduce(p.q, reinterpret_cast<ArgMax*>(smem));
  if (resid) {
    p.r = block_reduce(p.r, reinterpret_cast<ArgMax*>(smem));
    p.any_resid = block_reduce(p.any_resid, reinterpret_cast<int*>(smem));
  }
  if (threadIdx.x == 0) scr.cut_partials[static_cast<int64_t>(b) * S + chunk] = p;
}

// Grid (min(B * S, kVerifyLoopBlocks),), kChunkThreads threads, S = row_splits<T>(V), striding over the items
// b * S + c: for a sampling row b (temperature > 0; greedy rows are passed over), item b * S + c reads chunk c
// of z at the row's cut position and draws Gumbel-max over log q and, at a rejection in sample mode, over the
// residual max(0, q - p_S), leaving a CutPartial. The noise is addressed by the vocabulary index, so the split
// changes no draw.
template <typename T>
__global__ void __launch_bounds__(kChunkThreads)
    VerifyCutChunkKernel(const int64_t* __restrict__ draft_ids, const T* __restrict__ target_logits,
                         const float* __restrict__ draft_probs, int B, int K, int V, int mode, VerifyParams prm,
                         VerifyScratch scr) {
  __shared__ float smem[2 * 32];
  const int S = row_splits<T>(V);
  int mine = 0;  // whether any row samples: one parallel round, then every block without work returns
  for (int b = threadIdx.x; b < B; b += blockDim.x) mine |= !(prm.temperature[b] <= 0.0f);
  if (!__syncthreads_or(mine)) return;  // block-uniform
  for (int item = blockIdx.x; item < B * S; item += gridDim.x) {
    const int b = item / S;
    if (prm.temperature[b] <= 0.0f) continue;  // block-uniform
    cut_chunk(draft_ids, target_logits, draft_probs, K, V, S, b, item % S, mode, prm, scr, smem);
  }
}

// Grid (B,), one warp per row: cuts at the first rejection c (or n_b) and writes num_accepted and
// output_ids. Greedy rows emit the argmax of z_c; sampling rows merge their S CutPartials (chunk order
// per lane, then a butterfly: the same result in every lane): the residual's draw wins at a rejection in
// sample mode unless the residual is zero everywhere, else the draw over q_c.
template <typename T>
__global__ void __launch_bounds__(32)
    VerifyFinishKernel(const int64_t* __restrict__ draft_ids, int K, int V, int mode, VerifyParams prm,
                       VerifyOutputs out, VerifyScratch scr) {
  const int b = blockIdx.x, K1 = K + 1, lane = threadIdx.x;
  const int64_t* ids = draft_ids + static_cast<int64_t>(b) * K;
  const int n = drafted_count(ids, K);
  const int c = cut_position(scr.verdict, b, K, n);
  int emitted = scr.argmax[b * K1 + c];
  if (!(prm.temperature[b] <= 0.0f)) {
    const int S = row_splits<T>(V);
    const CutPartial* part = scr.cut_partials + static_cast<int64_t>(b) * S;
    ArgMax q, r;
    int any_resid = 0;
    for (int k = lane; k < S; k += 32) {
      q = merge(q, part[k].q);
      r = merge(r, part[k].r);
      any_resid += part[k].any_resid;
    }
    q = warp_reduce(q);
    r = warp_reduce(r);
    any_resid = warp_reduce(any_resid);
    emitted = mode == kModeSample && c < n && any_resid > 0 ? r.i : q.i;
  }
  write_cut_row(out, ids, b, K, c, emitted);
}

// draft_ids: [B, K] (drafts then -1), target_logits: [B, K+1, V] (T = float | __half | __nv_bfloat16),
// draft_probs: [B, K, V] f32, read in sample mode only (may be null otherwise). scratch: 5 arrays of
// B * (K+1) elements, verify_partials<T>(B, K, V) partials and verify_cut_partials<T>(B, V) cut partials.
// Five launches on `stream` (with `split`, the split cut-off search's scratch for B * (K+1) rows: its memset and
// kCutMaxPasses launches instead of VerifyFilterKernel); capturable: no sync, no allocation. B * (K+1) *
// row_splits<T>(V) must be below 2^31 (the first pass's grid). first_pass: kFirstPassChunked, kFirstPassWide,
// kFirstPassStream or kFirstPassLong (common.cuh).
// rows: what the caller knows of the rows (kRowsSampled | kRowsFiltered, common.cuh; kRowsAll: nothing): without
// sampling rows the scaled statistics, top-k / top-p / min-p and sampled-token kernels are not launched (the filters
// apply to sampling rows only); a row of a kind left out computes wrong results.
// tail_counts: B * (K+1) + B ints of scratch for the fused tail (VerifyFusedTail: a memset and the first pass, two
// launches instead of three) where it applies (use_fused_tail); nullptr: the launches.
template <typename T>
cudaError_t VerifyDraft(const int64_t* draft_ids, const T* target_logits, const float* draft_probs, int B, int K,
                        int V, int mode, VerifyParams prm, VerifyOutputs out, VerifyScratch scr,
                        cudaStream_t stream, int first_pass = kFirstPassChunked, const CutSplit* split = nullptr,
                        int rows = kRowsAll, int* tail_counts = nullptr) {
  if (B == 0) return cudaSuccess;
  const bool sampled = rows & kRowsSampled, filtered = sampled && (rows & kRowsFiltered);
  const int S = first_pass_splits<T>(first_pass, V);
  const int positions = B * (K + 1);
  if (tail_counts != nullptr && use_fused_tail(kTailFused, rows, first_pass, /*verify=*/true)) {
    cudaError_t err = cudaMemsetAsync(tail_counts, 0, sizeof(int) * (static_cast<size_t>(positions) + B), stream);
    if (err != cudaSuccess) return err;
    const VerifyFusedTail<T> tail{tail_counts, tail_counts + positions, draft_ids, target_logits, draft_probs, K, V,
                                  mode, prm, out, scr};
    launch_first_pass(first_pass, target_logits, positions, V, VerifyRows{draft_ids, prm, K, V}, scr.partials, stream,
                      false, tail);
    return cudaGetLastError();
  }
  launch_first_pass(first_pass, target_logits, positions, V, VerifyRows{draft_ids, prm, K, V}, scr.partials, stream,
                    sampled);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (!filtered) split = nullptr;  // no search to run: the merge kernel reads no state
  if (split != nullptr) {
    err = launch_cut_split(target_logits, positions, V, VerifyCutRows{draft_ids, prm, K, V}, scr.partials, S, *split,
                           stream);
    if (err != cudaSuccess) return err;
  }
  VerifyMergeKernel<T><<<(positions + kMergeWarps - 1) / kMergeWarps, 32 * kMergeWarps, 0, stream>>>(
      draft_ids, target_logits, draft_probs, B, K, V, S, mode, prm, out, scr,
      split != nullptr ? split->state : nullptr);
  if (split == nullptr && filtered) {
    const int filter_grid = positions < kVerifyLoopBlocks ? positions : kVerifyLoopBlocks;
    VerifyFilterKernel<T><<<filter_grid, kRowThreads, 0, stream>>>(draft_ids, target_logits, draft_probs, positions,
                                                                   K, V, S, mode, prm, out, scr);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (sampled) {
    const int64_t cut_items = verify_cut_partials<T>(B, V);
    const unsigned cut_grid = static_cast<unsigned>(cut_items < kVerifyLoopBlocks ? cut_items : kVerifyLoopBlocks);
    VerifyCutChunkKernel<T><<<cut_grid, kChunkThreads, 0, stream>>>(draft_ids, target_logits, draft_probs, B, K, V,
                                                                     mode, prm, scr);
  }
  VerifyFinishKernel<T><<<B, 32, 0, stream>>>(draft_ids, K, V, mode, prm, out, scr);
  return cudaGetLastError();
}

}  // namespace bild
