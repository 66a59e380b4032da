// Penalties kernels and launcher (spec: reference.apply_penalties_ref). No torch headers.
// Two launches after zeroing a scratch of B * V + B int32: each row's token histogram, then each row's n_out.
// PenaltyCountsKernel, grid (cdiv(L, 256), B), 256 threads: one thread per committed token adds 1 to its histogram
// entry (an output token) or ORs in kPromptBit (a prompt token), and the block adds its output-token count to n_out.
// ApplyPenaltiesKernel, grid (cdiv(V, threads * N), B): each thread owns N = 16 / sizeof(T) tokens of a row (one
// 16-byte vector where rows are 16-byte aligned, else N tokens `threads` apart), reads their histogram entries,
// banned flags and logit bias once and serves the row's P positions: position p adds drafted token p - 1 to its
// counts, then loads, penalizes in the reference's order and rounding (no fused multiply-adds) and stores.
#pragma once

#include "common.cuh"

namespace bild {

constexpr int kPenaltyThreads = 256;
// A histogram entry: the token's count in the row's output (bits 0-29, so L < 2^30) and whether the prompt holds it.
constexpr int kPromptBit = 1 << 30;

// float32 arithmetic, float64 for float64 logits; the _rn intrinsics are never contracted into an fma, so each
// operation rounds once, as the reference's separate tensor ops do.
template <typename T>
using PenaltyAcc = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

__device__ __forceinline__ double to_acc(double x) { return x; }
template <typename T>
__device__ __forceinline__ float to_acc(T x) { return to_float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(PenaltyAcc<T> x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

__global__ void __launch_bounds__(kPenaltyThreads)
    PenaltyCountsKernel(const int64_t* __restrict__ token_ids, const int* __restrict__ prompt_lens,
                        int* __restrict__ hist, int* __restrict__ n_out, int L, int V) {
  const int b = blockIdx.y;
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t id = j < L ? token_ids[static_cast<int64_t>(b) * L + j] : -1;
  const bool is_out = id >= 0 && j >= prompt_lens[b];
  if (id >= 0) {
    int* entry = hist + static_cast<int64_t>(b) * V + id;
    if (is_out) {
      atomicAdd(entry, 1);
    } else {
      atomicOr(entry, kPromptBit);
    }
  }
  const int block_out = __syncthreads_count(is_out);
  if (threadIdx.x == 0 && block_out) atomicAdd(n_out + b, block_out);
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kPenaltyThreads)
    ApplyPenaltiesKernel(const T* __restrict__ logits, T* __restrict__ out, const int* __restrict__ hist,
                         const int* __restrict__ n_out, const int64_t* __restrict__ draft_ids,
                         const double* __restrict__ repetition_penalty, const double* __restrict__ presence_penalty,
                         const double* __restrict__ frequency_penalty, const int* __restrict__ min_tokens,
                         const int64_t* __restrict__ banned_ids, const int64_t* __restrict__ bias_ids,
                         const double* __restrict__ bias_values, int P, int V, int E, int E2) {
  using Acc = PenaltyAcc<T>;
  constexpr int N = 16 / sizeof(T);
  const int b = blockIdx.y;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x * N;
  int col[N], count[N];
  bool prompt[N], banned[N];
  Acc bias[N];
  // V is a multiple of N where kVec: a vector lies wholly in the row or wholly past it
  if (kVec && base + threadIdx.x * N >= V) return;
#pragma unroll
  for (int q = 0; q < N; ++q) {
    col[q] = static_cast<int>(kVec ? base + threadIdx.x * N + q : base + q * blockDim.x + threadIdx.x);
    const int h = col[q] < V ? hist[static_cast<int64_t>(b) * V + col[q]] : 0;
    count[q] = h & (kPromptBit - 1);
    prompt[q] = (h & kPromptBit) != 0;
    banned[q] = false;
    bias[q] = Acc(0);
  }
  for (int e = 0; e < E2; ++e) {  // the row's logit bias: an id at most once, -1 pads match no column
    const int64_t id = bias_ids[static_cast<int64_t>(b) * E2 + e];
    const Acc value = static_cast<Acc>(bias_values[static_cast<int64_t>(b) * E2 + e]);
#pragma unroll
    for (int q = 0; q < N; ++q)
      if (col[q] == id) bias[q] += value;  // 0 + value, as the reference's scatter_add (-0.0 gives +0.0)
  }
  for (int e = 0; e < E; ++e) {  // -1 pads match no column
    const int64_t id = banned_ids[static_cast<int64_t>(b) * E + e];
#pragma unroll
    for (int q = 0; q < N; ++q) banned[q] |= col[q] == id;
  }
  const Acc r = static_cast<Acc>(repetition_penalty[b]);
  const Acc presence = static_cast<Acc>(presence_penalty[b]);
  const Acc frequency = static_cast<Acc>(frequency_penalty[b]);
  const int rows_out = n_out[b], min_len = min_tokens[b];
  for (int p = 0; p < P; ++p) {
    if (p > 0) {  // the draft before position p counts as output there
      const int64_t drafted = draft_ids[static_cast<int64_t>(b) * (P - 1) + p - 1];
#pragma unroll
      for (int q = 0; q < N; ++q) count[q] += col[q] == drafted;
    }
    const int64_t row = (static_cast<int64_t>(b) * P + p) * V;
    alignas(16) T z[N];
    if constexpr (kVec) {
      *reinterpret_cast<uint4*>(z) = *reinterpret_cast<const uint4*>(logits + row + col[0]);
    } else {
#pragma unroll
      for (int q = 0; q < N; ++q) z[q] = col[q] < V ? logits[row + col[q]] : T{};
    }
    const bool hold_back = rows_out + p < min_len;
#pragma unroll
    for (int q = 0; q < N; ++q) {
      Acc x = to_acc(z[q]);
      if (E2 > 0) x = add_rn(x, bias[q]);  // the bias first (+0 elsewhere: the same values, as the reference)
      if (prompt[q] || count[q] > 0) x = x < Acc(0) ? mul_rn(x, r) : div_rn(x, r);
      x = sub_rn(x, mul_rn(frequency, static_cast<Acc>(count[q])));
      x = sub_rn(x, mul_rn(presence, count[q] > 0 ? Acc(1) : Acc(0)));
      if (hold_back && banned[q]) x = static_cast<Acc>(-kInf);
      z[q] = from_acc<T>(x);
    }
    if constexpr (kVec) {
      *reinterpret_cast<uint4*>(out + row + col[0]) = *reinterpret_cast<const uint4*>(z);
    } else {
#pragma unroll
      for (int q = 0; q < N; ++q)
        if (col[q] < V) out[row + col[q]] = z[q];
    }
  }
}

// logits, out [B, P, V] of T; token_ids [B, L] i64 (-1 pads); prompt_lens [B] i32; draft_ids [B, P-1] i64 (-1 pads);
// repetition / presence / frequency_penalty [B] f64; min_tokens [B] i32; banned_ids [B, E] i64 (-1 pads); bias_ids
// [B, E2] i64 (-1 pads, an id at most once a row) with bias_values [B, E2] f64; scratch:
// B * V + B int32 of device memory (zeroed here, on `stream`). Ids must lie in [-1, V); B <= 65535, L < 2^30.
template <typename T>
cudaError_t ApplyPenalties(const T* logits, T* out, const int64_t* token_ids, const int* prompt_lens,
                           const int64_t* draft_ids, const double* repetition_penalty, const double* presence_penalty,
                           const double* frequency_penalty, const int* min_tokens, const int64_t* banned_ids,
                           const int64_t* bias_ids, const double* bias_values, int* scratch, int B, int P, int L,
                           int V, int E, int E2, cudaStream_t stream) {
  if (B == 0 || P == 0 || V == 0) return cudaSuccess;
  int* hist = scratch;
  int* n_out = scratch + static_cast<int64_t>(B) * V;
  cudaError_t err = cudaMemsetAsync(scratch, 0, (static_cast<size_t>(B) * V + B) * sizeof(int), stream);
  if (err != cudaSuccess) return err;
  if (L > 0) {
    PenaltyCountsKernel<<<dim3((L + kPenaltyThreads - 1) / kPenaltyThreads, B), kPenaltyThreads, 0, stream>>>(
        token_ids, prompt_lens, hist, n_out, L, V);
  }
  constexpr int N = 16 / sizeof(T);
  // Fewer threads a block where full blocks would leave SMs idle (a batch of one row): the work is a stream.
  int threads = kPenaltyThreads;
  while (threads > 64 && static_cast<int64_t>(B) * ((V + threads * N - 1) / (threads * N)) < 264) threads /= 2;
  const dim3 grid((V + threads * N - 1) / (threads * N), B);
  const bool vec = (static_cast<int64_t>(V) * sizeof(T)) % 16 == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (vec) {
    ApplyPenaltiesKernel<T, true><<<grid, threads, 0, stream>>>(logits, out, hist, n_out, draft_ids,
                                                                repetition_penalty, presence_penalty,
                                                                frequency_penalty, min_tokens, banned_ids, bias_ids,
                                                                bias_values, P, V, E, E2);
  } else {
    ApplyPenaltiesKernel<T, false><<<grid, threads, 0, stream>>>(logits, out, hist, n_out, draft_ids,
                                                                 repetition_penalty, presence_penalty,
                                                                 frequency_penalty, min_tokens, banned_ids, bias_ids,
                                                                 bias_values, P, V, E, E2);
  }
  return cudaGetLastError();
}

}  // namespace bild
