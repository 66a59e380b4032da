// Draft sampling kernel and launcher (spec: reference.sample_draft_ref). No torch headers.
#pragma once

#include "common.cuh"

namespace bild {

// Per-row inputs, all [B]: temperature f32 (<= 0: greedy), top_k i32 (0: off), top_p f32 (1: off),
// min_p f32 (0: off), seed/offset i64 (Philox key and step counter), fallback_threshold f32.
struct SampleDraftParams {
  const float* temperature;
  const int* top_k;
  const float* top_p;
  const float* min_p;  // null: 0 (off) for every row
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

// The first pass's task for row b: the logsumexp of z (max_probs) and of s = z / T (energies), the
// argmax of z (greedy rows), and for sampling rows without top-k / top-p / min-p the Gumbel-max draw over s.
struct SampleRows {
  SampleDraftParams prm;
  int V;
  __device__ RowTask operator()(int b) const {
    RowTask task;
    task.active = true;
    const float temp = prm.temperature[b];
    task.scaled = !(temp <= 0.0f);
    task.t = task.scaled ? temp : 1.0f;
    task.draw = task.scaled && !filter_on(prm.top_k[b], prm.top_p[b], row_min_p(prm.min_p, b), V);
    task.seed = prm.seed[b];
    task.offset = prm.offset[b];
    task.purpose = kPurposeDraftSample;
    return task;
  }
};

// The split cut-off search's view of row b (common.cuh CutRow): every row with top-k / top-p / min-p searches,
// greedy rows at temperature 1 (their token probability is over the kept set).
struct SampleCutRows {
  SampleDraftParams prm;
  int V;
  __device__ CutRow operator()(int b) const {
    CutRow row;
    row.filtered = filter_on(prm.top_k[b], prm.top_p[b], row_min_p(prm.min_p, b), V);
    const float temp = prm.temperature[b];
    row.use_z = temp <= 0.0f;
    row.t = row.use_z ? 1.0f : temp;
    row.top_k = prm.top_k[b];
    row.top_p = prm.top_p[b];
    row.min_p = row_min_p(prm.min_p, b);
    return row;
  }
};

// Gumbel-max over the kept set {i : order_key(z_i / t) >= tau} of the elements `visit` hands each thread of the block
// (visit(f) calls f(index, z): a whole row, or one chunk of it): each thread starts from the draw at the row's argmax
// (s_max, always kept), so an element whose s + kGumbelMax is below the best draw so far cannot win or tie and its
// Philox draw is skipped (most of them before the division: cannot_win); the block's result in every thread. Ends
// with a barrier (block_reduce's).
template <typename Visit>
__device__ ArgMax draw_kept(Visit&& visit, float t, int tau, float s_max, int argmax, int64_t seed, int64_t offset,
                            ArgMax* smem) {
  ArgMax k_max;
  k_max.add(s_max + gumbel(seed, argmax, offset, kPurposeDraftSample, 0), argmax);
  const float inv_t = 1.0f / t;
  visit([&](int i, float z) {
    if (cannot_win(z, inv_t, k_max.v)) return;
    const float s = __fdiv_rn(z, t);
    if (order_key(s) < tau || s + kGumbelMax < k_max.v) return;
    k_max.add(s + gumbel(seed, i, offset, kPurposeDraftSample, 0), i);
  });
  return block_reduce(k_max, smem);
}

// Grid (B * S,), kChunkThreads threads, S = row_splits<T>(V), after the split cut-off search (cut_state): block
// b * S + c of a sampling row with top-k / top-p / min-p leaves the draw over the kept set's elements in chunk c in
// draws[b * S + c]; SampleDraftKernel merges a row's S draws (ties to the lower index: the block draw's token).
template <typename T>
__global__ void __launch_bounds__(kChunkThreads)
    SampleCutDrawKernel(const T* __restrict__ logits, int V, int S, SampleDraftParams prm,
                        const RowPartial* __restrict__ partials, int S_first, const CutSearch* __restrict__ cut_state,
                        ArgMax* __restrict__ draws) {
  __shared__ float smem[2 * 32];  // 32 ArgMax records (no constructor runs on __shared__ memory)
  const int b = blockIdx.x / S, c = blockIdx.x % S;
  const float temp = prm.temperature[b];
  if (temp <= 0.0f || !filter_on(prm.top_k[b], prm.top_p[b], row_min_p(prm.min_p, b), V)) {
    return;  // block-uniform
  }
  const RowPartial stats = warp_merge_partials(partials + static_cast<int64_t>(b) * S_first, S_first);
  const T* row = logits + static_cast<int64_t>(b) * V;
  const ArgMax d = draw_kept([&](auto&& f) { for_each_in_chunk(row, V, S, c, f); }, temp, cut_state[b].tau(),
                             stats.s.m, stats.zmax.i, prm.seed[b], prm.offset[b], reinterpret_cast<ArgMax*>(smem));
  if (threadIdx.x == 0) draws[blockIdx.x] = d;
}

// Row b's outputs, written by one thread (SampleDraftKernel's, and SampleFusedTail's for a greedy, unfiltered row):
// the token, its probability z_token / t against the kept set's sum kept_sum (relative to s_lse.m), the max
// probability at temperature 1, the energy and the fallback flag.
__device__ inline void write_draft_sample(const SampleDraftParams& prm, const SampleDraftOutputs& out, int b,
                                          int token, float z_token, float t, Lse z_lse, Lse s_lse, float kept_sum) {
  const float s_token = __fdiv_rn(z_token, t);
  const float max_prob = expf(z_lse.m - z_lse.log_sum());
  out.token_ids[b] = token;
  out.token_probs[b] = expf(s_token - (s_lse.m + logf(kept_sum)));
  out.max_probs[b] = max_prob;
  out.energies[b] = -t * s_lse.log_sum();
  out.fallback[b] = max_prob < prm.fallback_threshold[b];
}

// Grid (B,), kRowThreads threads, after RowChunkStatsKernel made the one pass over every row (split
// into S chunks, see common.cuh): one block per row merges its S partials; the softmax never reaches
// memory. Rows with top-k / top-p / min-p add the cut-off search (filter_cut: about three histogram passes, which
// also sum the kept set; or, with cut_state, the split search's result), and sampling rows among them one pass that
// draws over the kept set (or, with draws, the merge of SampleCutDrawKernel's chunk draws, S_draw a row).
// One block an SM asked for: a grid of B rows rarely fills the GPU, and without it ptxas caps the registers
// at 64 and spills filter_cut's state.
template <typename T>
__global__ void __launch_bounds__(kRowThreads, 1)
    SampleDraftKernel(const T* __restrict__ logits, int V, SampleDraftParams prm, SampleDraftOutputs out,
                      const RowPartial* __restrict__ partials, int S, const CutSearch* __restrict__ cut_state,
                      const ArgMax* __restrict__ draws, int S_draw) {
  __shared__ float smem[2 * 32];
  __shared__ CutSmem cut_smem;
  const int b = blockIdx.x;
  const T* row = logits + static_cast<int64_t>(b) * V;
  const float temp = prm.temperature[b];
  const bool greedy = temp <= 0.0f;
  const float t = greedy ? 1.0f : temp;  // greedy rows report probabilities at temperature 1
  const int top_k = prm.top_k[b];
  const float top_p = prm.top_p[b], min_p = row_min_p(prm.min_p, b);
  const bool filtered = filter_on(top_k, top_p, min_p, V);
  const int64_t seed = prm.seed[b], offset = prm.offset[b];
  const bool draw_now = !greedy && !filtered;  // filtered rows draw over the kept set instead

  const RowPartial stats = warp_merge_partials(partials + static_cast<int64_t>(b) * S, S);
  const Lse z_lse = stats.z;
  const Lse s_lse = greedy ? z_lse : stats.s;
  int token = stats.zmax.i;  // the filters always keep the maximum, so greedy rows need nothing else
  if (draw_now) token = stats.g.i;

  float kept_sum = s_lse.s;
  if (filtered) {
    const CutSearch cut =
        cut_state != nullptr ? cut_state[b]
                             : filter_cut(row, V, t, s_lse.m, s_lse.s, top_k, top_p, min_p, cut_smem);
    kept_sum = cut.kept_sum(s_lse.s);  // the search's exact sum over the kept set
    if (!greedy && draws != nullptr) {  // sampling rows: the split draws, merged (every lane of every warp)
      ArgMax k_max;
      for (int k = threadIdx.x & 31; k < S_draw; k += 32) {
        k_max = merge(k_max, draws[static_cast<int64_t>(b) * S_draw + k]);
      }
      token = warp_reduce(k_max).i;
    } else if (!greedy) {  // greedy rows keep the argmax; sampling rows draw over the kept set
      token = draw_kept([&](auto&& f) { for_each_in_row(row, V, f); }, t, cut.tau(), s_lse.m, stats.zmax.i, seed,
                        offset, reinterpret_cast<ArgMax*>(smem)).i;
    }
  }

  if (threadIdx.x == 0) write_draft_sample(prm, out, b, token, to_float(row[token]), t, z_lse, s_lse, kept_sum);
}

// The fused tail of a sample_draft whose rows neither sample nor filter (kTailFused, use_fused_tail): the block that
// writes row b's last first-pass partial merges the partials and writes the row's outputs, as SampleDraftKernel does
// for such a row (its argmax, the probability at temperature 1, the energy, the fallback flag), so the first pass is
// the op's only launch besides clearing the counts. chunks_done: [B], zero before the launch and left at zero.
template <typename T>
struct SampleFusedTail {
  static constexpr bool kNone = false;
  int* chunks_done;
  const T* logits;
  int V;
  SampleDraftParams prm;
  SampleDraftOutputs out;

  __device__ void operator()(int b, int S, const RowPartial* partials) const {
    if (threadIdx.x >= 32) return;  // warp-uniform
    const RowPartial stats = warp_merge_partials<true>(partials, S);
    if (threadIdx.x == 0) {  // SampleDraftKernel's greedy, unfiltered row: its argmax at t = 1, the whole vocabulary
      const int token = stats.zmax.i;
      write_draft_sample(prm, out, b, token, to_float(logits[static_cast<int64_t>(b) * V + token]), 1.0f, stats.z,
                         stats.z, stats.z.s);
    }
  }
};

// Elements of the partials buffer SampleDraft<T> needs.
template <typename T>
inline int64_t sample_draft_partials(int B, int V) {
  return static_cast<int64_t>(B) * row_splits<T>(V);
}

// logits: [B, V] row-major, T = float | __half | __nv_bfloat16; partials: sample_draft_partials<T>(B, V)
// elements of scratch, below 2^31. Two launches on `stream` (with `split`, the split cut-off search's scratch for
// B rows with room for B * row_splits<T>(V) draws: its memset, kCutMaxPasses launches and the chunked draws between
// them); capturable: no sync, no allocation.
// first_pass: kFirstPassChunked, kFirstPassWide, kFirstPassStream or kFirstPassLong (common.cuh).
// rows: what the caller knows of the rows (kRowsSampled | kRowsFiltered, common.cuh; kRowsAll: nothing): a row of a
// kind left out computes wrong results.
// tail_counts: B ints of scratch for the fused tail (SampleFusedTail: a memset and the first pass, two launches as
// before but no row kernel) where it applies (use_fused_tail); nullptr: the launches.
template <typename T>
cudaError_t SampleDraft(const T* logits, int B, int V, SampleDraftParams prm, SampleDraftOutputs out,
                        RowPartial* partials, cudaStream_t stream, int first_pass = kFirstPassChunked,
                        const CutSplit* split = nullptr, int rows = kRowsAll, int* tail_counts = nullptr) {
  if (B == 0) return cudaSuccess;
  const bool sampled = rows & kRowsSampled, filtered = rows & kRowsFiltered;
  if (tail_counts != nullptr && use_fused_tail(kTailFused, rows, first_pass, /*verify=*/false)) {
    const cudaError_t err = cudaMemsetAsync(tail_counts, 0, sizeof(int) * static_cast<size_t>(B), stream);
    if (err != cudaSuccess) return err;
    launch_first_pass(first_pass, logits, B, V, SampleRows{prm, V}, partials, stream, false,
                      SampleFusedTail<T>{tail_counts, logits, V, prm, out});
    return cudaGetLastError();
  }
  launch_first_pass(first_pass, logits, B, V, SampleRows{prm, V}, partials, stream, sampled);
  cudaError_t first = cudaGetLastError();
  if (first != cudaSuccess) return first;
  const int S = first_pass_splits<T>(first_pass, V), S_draw = row_splits<T>(V);
  if (!filtered) split = nullptr;  // no search to run: the row kernel reads no state
  if (split != nullptr) {
    const cudaError_t err = launch_cut_split(logits, B, V, SampleCutRows{prm, V}, partials, S, *split, stream);
    if (err != cudaSuccess) return err;
    if (sampled) {
      SampleCutDrawKernel<T><<<static_cast<unsigned>(static_cast<int64_t>(B) * S_draw), kChunkThreads, 0, stream>>>(
          logits, V, S_draw, prm, partials, S, split->state, split->draws);
    }
  }
  SampleDraftKernel<T><<<B, kRowThreads, 0, stream>>>(logits, V, prm, out, partials, S,
                                                      split != nullptr ? split->state : nullptr,
                                                      split != nullptr && sampled ? split->draws : nullptr, S_draw);
  return cudaGetLastError();
}

}  // namespace bild
