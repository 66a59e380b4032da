// Building blocks shared by every kernel of bild_kernels._C. No torch headers: the launchers in the
// other .cuh files are usable from plain CUDA C++ (tests/native) as well as from the torch layer.
//
// Spec: bild_kernels/reference/. What must match it bit for bit (token ids, counts) is written so
// that the GPU rounds exactly as the reference does: divisions are correctly rounded (__fdiv_rn, the
// reference divides in fp32), logf/expf are the accurate library versions (no --use_fast_math).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cut_search.h"  // order_key, kLowestKey and the top-k / top-p / min-p cut-off search

namespace bild {

// Stream identifiers (the `purpose` byte of the Philox counter) and verify modes, as in bild_kernels/reference/.
constexpr int kPurposeDraftSample = 1;
constexpr int kPurposeVerifyAccept = 2;
constexpr int kPurposeVerifyToken = 3;
constexpr int kModeGreedy = 0;
constexpr int kModeBild = 1;
constexpr int kModeSample = 2;

constexpr int kRowThreads = 512;    // threads of a kernel that owns one vocabulary row
constexpr int kTableThreads = 1024; // threads of the single-CTA block-table kernels
constexpr float kInf = __builtin_huge_valf();

// ------------------------------------------------------------------------------------------------
// Philox4x32-10 (reference.philox_ref): key (seed_lo, seed_hi), counter (c0, c1, c2, c3).
// Host and device, so the native test's CPU reference runs the very same code.
// ------------------------------------------------------------------------------------------------
__host__ __device__ inline uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

__host__ __device__ inline uint32_t philox_first_word(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2,
                                                      uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = mulhi32(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
    const uint32_t hi_a = mulhi32(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Counter (index, offset_lo, offset_hi, purpose << 24 | position); u = ((x >> 9) + 0.5) / 2^23, exact in float
// ((x >> 9) + 0.5 < 2^23 has a spare bit), in [2^-24, 1 - 2^-24]: a Gumbel draw is finite and below kGumbelMax.
__host__ __device__ inline float uniform(int64_t seed, uint32_t index, int64_t offset, int purpose, int position) {
  const uint32_t x = philox_first_word(static_cast<uint64_t>(seed), index, static_cast<uint32_t>(offset),
                                       static_cast<uint32_t>(static_cast<uint64_t>(offset) >> 32),
                                       (static_cast<uint32_t>(purpose) << 24) | static_cast<uint32_t>(position));
  return (static_cast<float>(x >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

// reference.GUMBEL_MAX: above every gumbel() (-log(-log(1 - 2^-24)) = 16.6355...), so a logit s with
// s + kGumbelMax < the best draw so far cannot win a Gumbel-max and its draw can be skipped.
constexpr float kGumbelMax = 16.64f;

__host__ __device__ inline float gumbel(int64_t seed, uint32_t index, int64_t offset, int purpose, int position) {
  return -logf(-logf(uniform(seed, index, offset, purpose, position)));
}

// An upper bound of s = __fdiv_rn(z, t) without the division (inv_t = 1 / t, rounded): z * inv_t is within 2^-22 |s|
// of s, so that plus 1e-6 of its magnitude is >= s (infinite or NaN z give NaN: a bound no test passes).
__device__ __forceinline__ float scaled_upper(float z, float inv_t) {
  const float sa = z * inv_t;
  return sa + fabsf(sa) * 1e-6f;
}

// Whether s = __fdiv_rn(z, t) certainly fails the draws' bar, s + kGumbelMax < bar (float sums), judged from
// scaled_upper: rounding is monotone, so fl(hi + kGumbelMax) < bar implies fl(s + kGumbelMax) < bar. Never true where
// the exact test is false (NaN: false, left to the exact test), so a caller that skips on it skips a subset of what
// the exact test skips and draws the same token.
__device__ __forceinline__ bool cannot_win(float z, float inv_t, float bar) {
  return scaled_upper(z, inv_t) + kGumbelMax < bar;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// ------------------------------------------------------------------------------------------------
// Running statistics: online logsumexp and argmax with the reference's tie rule (first index).
// ------------------------------------------------------------------------------------------------
struct Lse {
  float m = -kInf;  // running max
  float s = 0.0f;   // sum of exp(x - m)
  __device__ void add(float x) {
    if (x > m) {
      s = s * expf(m - x) + 1.0f;  // m = -inf gives s * 0 + 1
      m = x;
    } else if (m != -kInf) {       // x = m = -inf would give exp(nan)
      s += expf(x - m);
    }
  }
  __device__ float log_sum() const { return m + logf(s); }
};

__device__ inline Lse merge(Lse a, Lse b) {
  Lse r;
  r.m = fmaxf(a.m, b.m);
  if (r.m == -kInf) return r;
  r.s = a.s * expf(a.m - r.m) + b.s * expf(b.m - r.m);
  return r;
}

struct ArgMax {
  float v = -kInf;
  int i = INT_MAX;  // any index beats it on a tie, so an all -inf row gives index 0 as torch.argmax
  __device__ void add(float x, int idx) {
    if (x > v || (x == v && idx < i)) {
      v = x;
      i = idx;
    }
  }
};

__device__ inline ArgMax merge(ArgMax a, ArgMax b) {
  a.add(b.v, b.i);
  return a;
}

__device__ inline float merge(float a, float b) { return a + b; }
__device__ inline int merge(int a, int b) { return a + b; }

__device__ inline float shfl_xor(float x, int o) { return __shfl_xor_sync(0xFFFFFFFFu, x, o); }
__device__ inline int shfl_xor(int x, int o) { return __shfl_xor_sync(0xFFFFFFFFu, x, o); }
__device__ inline Lse shfl_xor(Lse x, int o) { return Lse{shfl_xor(x.m, o), shfl_xor(x.s, o)}; }
__device__ inline ArgMax shfl_xor(ArgMax x, int o) { return ArgMax{shfl_xor(x.v, o), shfl_xor(x.i, o)}; }

template <typename T>
__device__ T warp_reduce(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = merge(x, shfl_xor(x, o));
  return x;
}

// Block-wide merge of one value per thread; every thread gets the result. blockDim.x is a multiple of
// 32 and at most 1024. `smem` holds 32 values; the trailing barrier lets the caller reuse it at once.
template <typename T>
__device__ T block_reduce(T x, T* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  x = warp_reduce(x);
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  T r = smem[0];
  for (int w = 1; w < nwarps; ++w) r = merge(r, smem[w]);  // same order in every thread: same result
  __syncthreads();
  return r;
}

// A count and a fixed-point mass summed together (the top-k / top-p / min-p cut-off search's bucket sums): integers,
// so every order of summing them gives the same result.
// (No member initialisers: it lives in __shared__ memory; CutSums{} is zero.)
struct CutSums {
  unsigned int cnt;
  unsigned long long mass;
};
__device__ inline CutSums operator+(CutSums a, CutSums b) { return CutSums{a.cnt + b.cnt, a.mass + b.mass}; }
__device__ inline CutSums operator-(CutSums a, CutSums b) { return CutSums{a.cnt - b.cnt, a.mass - b.mass}; }

__device__ inline int shfl_up(int x, int o) { return __shfl_up_sync(0xFFFFFFFFu, x, o); }
__device__ inline CutSums shfl_up(CutSums x, int o) {
  return CutSums{__shfl_up_sync(0xFFFFFFFFu, x.cnt, o), __shfl_up_sync(0xFFFFFFFFu, x.mass, o)};
}

// Exclusive prefix sum of one value per thread (int or CutSums), in thread order; *total gets the block's sum.
// smem holds 32 values. Used where the order must be the reference's (the free-block stack) or the sums exact
// (the cut-off search's buckets). Ends with a barrier, so smem is free again on return.
template <typename T>
__device__ T block_exclusive_scan(T x, T* smem, T* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  T incl = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T up = shfl_up(incl, o);
    if (lane >= o) incl = incl + up;
  }
  if (lane == 31) smem[warp] = incl;
  __syncthreads();
  T before{}, sum{};
  for (int w = 0; w < nwarps; ++w) {
    if (w < warp) before = before + smem[w];
    sum = sum + smem[w];
  }
  __syncthreads();
  *total = sum;
  return before + incl - x;
}

// ------------------------------------------------------------------------------------------------
// Row traversal: every thread of the block visits its share of row[0, V) and calls f(index, value)
// with the value converted to fp32. The aligned middle is read with 16-byte loads; the unaligned
// head and the tail element by element. Visit order differs from the reference's; only sums (within
// float tolerance) can tell, argmax ties are settled by index.
// ------------------------------------------------------------------------------------------------
// A row's split for 16-byte loads: `head` elements before its first 16-byte boundary (read one by one), then
// `nvec` whole vectors of 16 / sizeof(T) elements, then the tail (V - head - nvec * N elements, one by one).
struct RowMiddle {
  int head, nvec;
};
template <typename T>
__device__ __forceinline__ RowMiddle row_middle(const T* row, int V) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  int head = static_cast<int>(((16 - (addr & 15)) & 15) / sizeof(T));
  head = head < V ? head : V;
  return RowMiddle{head, (V - head) / static_cast<int>(16 / sizeof(T))};
}

template <typename T, typename F>
__device__ void for_each_in_row(const T* __restrict__ row, int V, F&& f) {
  constexpr int N = 16 / sizeof(T);
  const auto [head, nvec] = row_middle(row, V);
  for (int i = threadIdx.x; i < head; i += blockDim.x) f(i, to_float(row[i]));
  const uint4* vec = reinterpret_cast<const uint4*>(row + head);
  for (int w = threadIdx.x; w < nvec; w += blockDim.x) {
    const uint4 raw = __ldg(vec + w);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < N; ++k) f(head + w * N + k, to_float(e[k]));
  }
  for (int i = head + nvec * N + threadIdx.x; i < V; i += blockDim.x) f(i, to_float(row[i]));
}

// ------------------------------------------------------------------------------------------------
// Split rows. A kernel that gives each vocabulary row to one block reads at most a few rows per SM at a
// time (a verify batch of 64 x 9 positions is 576 blocks of 512 threads for 132 SMs, and the row kernels
// need ~116 registers a thread for their top-k/top-p code: one block per SM), far from the bandwidth the
// first pass over V needs. So that pass is split: RowChunkStatsKernel gives each row S = row_splits<T>(V)
// blocks of kChunkThreads threads; each thread issues kChunkVecs 16-byte loads before it uses any, and
// each block leaves the statistics of its chunk in a RowPartial. The row kernel then merges a row's S
// partials (warp_merge_partials): every thread gets the same result, and S depends on V and the dtype
// only, so a row's result never depends on the batch around it (the chunks' contents do depend on the
// row's start modulo 16 bytes, as for_each_in_row's thread shares do; rows of V a multiple of 8 bf16 or
// 4 fp32 elements all start aligned).
// ------------------------------------------------------------------------------------------------
constexpr int kChunkThreads = 256;
constexpr int kChunkVecs = 4;

// Elements of T in a chunk of `vecs` 16-byte vectors a thread (the chunked pass's kChunkVecs by default; the
// wide and stream passes' chunks have kWideVecs and kStreamVecs).
template <typename T>
__host__ __device__ constexpr int chunk_elems(int vecs = kChunkVecs) {
  return kChunkThreads * vecs * static_cast<int>(16 / sizeof(T));
}

// Chunks per row of V elements of T. The aligned middle of a row has at most V / (16 / sizeof(T))
// vectors, so S chunks of kChunkThreads * vecs vectors always cover it.
template <typename T>
__host__ __device__ constexpr int row_splits(int V, int vecs = kChunkVecs) {
  return (V + chunk_elems<T>(vecs) - 1) / chunk_elems<T>(vecs);
}

struct RowPartial {
  Lse z;        // logsumexp of the logits z
  ArgMax zmax;  // argmax of z
  Lse s;        // logsumexp of s = z / t (rows with `scaled`)
  ArgMax g;     // argmax of s + Gumbel noise (rows with `draw`)
};
static_assert(sizeof(RowPartial) == 32, "RowPartial is four 8-byte records");

__device__ inline RowPartial merge(RowPartial a, RowPartial b) {
  return RowPartial{merge(a.z, b.z), merge(a.zmax, b.zmax), merge(a.s, b.s), merge(a.g, b.g)};
}
__device__ inline RowPartial shfl_xor(RowPartial x, int o) {
  return RowPartial{shfl_xor(x.z, o), shfl_xor(x.zmax, o), shfl_xor(x.s, o), shfl_xor(x.g, o)};
}

// What the first pass computes for one row (a Rows functor returns it for a row index).
struct RowTask {
  bool active = false;  // false: the row is skipped and its partials are never read
  bool scaled = false;  // also the logsumexp of z / t
  bool draw = false;    // also the Gumbel-max over z / t, noise from gumbel(seed, i, offset, purpose, position)
  float t = 1.0f;
  int64_t seed = 0, offset = 0;
  int purpose = 0, position = 0;
};

// Every thread of a kChunkThreads block visits its share of chunk c of row[0, V) (S chunks) and calls
// fv(e, base) for runs of consecutive elements, e an array of T (N = 16 / sizeof(T) of them for each 16-byte
// vector, one for an element of the unaligned head or the tail) holding row[base, base + size of e).
// Chunk c covers the vectors [c, c + 1) * kChunkThreads * VECS of the row's 16-byte-aligned middle; chunk 0
// also takes the unaligned head and chunk S - 1 the tail. A thread's runs come in increasing index order, and
// each thread issues all of its loads before it uses any.
template <int VECS = kChunkVecs, typename T, typename F>
__device__ void for_each_vector_in_chunk(const T* __restrict__ row, int V, int S, int c, F&& fv) {
  constexpr int N = 16 / sizeof(T);
  const auto [head, nvec] = row_middle(row, V);
  if (c == 0) {
    for (int i = threadIdx.x; i < head; i += kChunkThreads) {
      const T e[1] = {row[i]};
      fv(e, i);
    }
  }
  const uint4* vec = reinterpret_cast<const uint4*>(row + head);
  const int w0 = c * kChunkThreads * VECS + threadIdx.x;
  uint4 raw[VECS];
#pragma unroll
  for (int k = 0; k < VECS; ++k) {
    const int w = w0 + k * kChunkThreads;
    if (w < nvec) raw[k] = __ldg(vec + w);
  }
#pragma unroll
  for (int k = 0; k < VECS; ++k) {
    const int w = w0 + k * kChunkThreads;
    if (w < nvec) fv(*reinterpret_cast<const T(*)[N]>(&raw[k]), head + w * N);
  }
  if (c == S - 1) {
    for (int i = head + nvec * N + threadIdx.x; i < V; i += kChunkThreads) {
      const T e[1] = {row[i]};
      fv(e, i);
    }
  }
}

// The same traversal one element at a time: f(index, value) in fp32.
template <int VECS = kChunkVecs, typename T, typename F>
__device__ void for_each_in_chunk(const T* __restrict__ row, int V, int S, int c, F&& f) {
  for_each_vector_in_chunk<VECS>(row, V, S, c, [&](const auto& e, int base) {
    constexpr int n = sizeof(e) / sizeof(e[0]);
#pragma unroll
    for (int q = 0; q < n; ++q) f(base + q, to_float(e[q]));
  });
}

// Grid (R * S,), kChunkThreads threads: block r * S + c reads chunk c of row r of logits [R, V] and
// writes partials[r * S + c].
// What the chunked, stream and long first passes do after a block wrote its partial (`Tail`): nothing, or (a tail
// with kNone false: verify.cuh's VerifyFusedTail, sampling.cuh's SampleFusedTail) count the row's chunks done and, in
// the block that writes the row's last partial, call tail(r, S, the row's partials): the work of the launches that
// would follow, without them.
struct NoTail {
  static constexpr bool kNone = true;
  __device__ void operator()(int, int, const RowPartial*) const {}
};

// After thread 0 of a block wrote partial r * S + c: whether this block wrote row r's last one (then every earlier
// write of the row is visible to it), the row's count left for the next launch to find at zero again.
template <typename Tail>
__device__ inline void after_partial(const Tail& tail, int r, int S, const RowPartial* partials) {
  if constexpr (!Tail::kNone) {
    bool last = false;
    if (threadIdx.x == 0) {
      __threadfence();  // the partial, before the count that publishes it
      last = atomicAdd(tail.chunks_done + r, 1) == S - 1;
      if (last) {
        tail.chunks_done[r] = 0;
        __threadfence();  // the other blocks' partials, after their counts
      }
    }
    if (__syncthreads_or(last)) tail(r, S, partials + static_cast<int64_t>(r) * S);  // block-uniform
  }
}

template <typename T, typename Rows, typename Tail = NoTail>
__global__ void __launch_bounds__(kChunkThreads)
    RowChunkStatsKernel(const T* __restrict__ logits, int V, int S, Rows rows, RowPartial* __restrict__ partials,
                        Tail tail = Tail()) {
  __shared__ float smem[2 * 32];
  const int r = blockIdx.x / S, c = blockIdx.x % S;
  const RowTask task = rows(r);
  if (!task.active) return;  // block-uniform
  RowPartial p;
  for_each_in_chunk(logits + static_cast<int64_t>(r) * V, V, S, c, [&](int i, float z) {
    p.z.add(z);
    p.zmax.add(z, i);
    if (task.scaled) {
      const float sv = __fdiv_rn(z, task.t);
      p.s.add(sv);
      if (task.draw) p.g.add(sv + gumbel(task.seed, i, task.offset, task.purpose, task.position), i);
    }
  });
  p.z = block_reduce(p.z, reinterpret_cast<Lse*>(smem));
  p.zmax = block_reduce(p.zmax, reinterpret_cast<ArgMax*>(smem));
  if (task.scaled) p.s = block_reduce(p.s, reinterpret_cast<Lse*>(smem));
  if (task.draw) p.g = block_reduce(p.g, reinterpret_cast<ArgMax*>(smem));
  if (threadIdx.x == 0) partials[blockIdx.x] = p;
  after_partial(tail, r, S, partials);
}

// ------------------------------------------------------------------------------------------------
// The wide first pass (forced with kFirstPassWide; `auto` picked it until the stream pass was timed). The H100's
// profile of RowChunkStatsKernel (bench/results/gpu_h100_2026-11-26.md) showed it compute-bound (82% SM,
// 21% DRAM): per element an online-logsumexp update with a branch and an accurate expf, an argmax update,
// and per 32 elements two block reductions whose merges cost two expf at every level, in every thread.
// Here each thread owns kWideVecs 16-byte vectors (all loads issued before any use), and rows that need
// only the statistics of z (greedy and BiLD verification, greedy drafting) take them per vector: the
// vector's max (the argmax only when it beats the thread's best), one rescale of the running sum when the
// max grows, then one ex2.approx per element. Rows that scale or draw (sampling) keep the per-element
// code. One block reduction whose cross-warp merge runs in warp 0 only. S = row_splits<T>(V, kWideVecs).
// ------------------------------------------------------------------------------------------------
constexpr int kFirstPassChunked = 0;  // RowChunkStatsKernel, row_splits<T>(V) chunks a row
constexpr int kFirstPassWide = 1;     // RowWideStatsKernel, row_splits<T>(V, kWideVecs) chunks a row
constexpr int kFirstPassAuto = 2;     // per launch, resolve_first_pass (the default)
constexpr int kFirstPassStream = 3;   // RowStreamStatsKernel + RowScaledStatsKernel, row_splits<T>(V, kStreamVecs) chunks
constexpr int kFirstPassLong = 4;     // RowLongStatsKernel + RowScaledStatsKernel, row_splits<T>(V, kLongVecs) chunks
constexpr int kWideVecs = 16;
constexpr int kStreamVecs = 8;
constexpr int kLongIters = 2;  // the long pass: batches of kStreamVecs vectors a thread, one after another
constexpr int kLongVecs = kStreamVecs * kLongIters;

// Chunks per row of the first pass `kind`; buffers sized by row_splits<T>(V) hold any of them (the wide and
// stream chunks are larger).
template <typename T>
__host__ __device__ constexpr int first_pass_splits(int kind, int V) {
  return row_splits<T>(V, kind == kFirstPassWide     ? kWideVecs
                          : kind == kFirstPassStream ? kStreamVecs
                          : kind == kFirstPassLong   ? kLongVecs
                                                     : kChunkVecs);
}

// The first pass a launch over `rows` rows of V elements of T runs, for the process-wide setting `kind`:
// kFirstPassChunked, kFirstPassWide or kFirstPassStream as set; kFirstPassAuto picks what measured fastest on
// an H200 with all four passes timed in one run (bench/results/gpu_h200_2026-11-27.md, CUDA graphs, bf16):
// - verify_draft (`verify`): the stream pass in every mode. Greedy / BiLD at B=64, K=8, V=128256 84 us
//   against the wide pass's 101 and the chunked pass's 189; B=256 266 against 291 and 692; B=64, K=4,
//   V=32000 27.4 against 32.8; B=1, K=4 18.9 against 20.6 (chunked); sample mode at B=64, K=8 262 against
//   the chunked pass's 486 (its scaled kernel skips the draws that cannot win), at B=1 52.7 against 53.8.
// - sample_draft: the stream pass where the launch has at least as many stream blocks as SMs (B=256 greedy
//   rows 42 against 50 wide, sampled rows 340 against 375, top-k / top-p rows 658 against 749; B=64 sampled
//   93 against 96, greedy 18.8 against 17.9 wide), the chunked pass below that (one sampled row of
//   V=128256: 33.6 us chunked, 43.3 stream, 72.5 wide: a few large chunks leave most SMs idle).
// `sms`: the device's multiprocessor count. elem_size: sizeof(T) of the logits (2 or 4).
inline int resolve_first_pass(int kind, int64_t rows, int V, int elem_size, bool verify, int sms) {
  if (kind != kFirstPassAuto) return kind;
  if (verify) return kFirstPassStream;
  const int splits = elem_size == 2 ? row_splits<__half>(V, kStreamVecs) : row_splits<float>(V, kStreamVecs);
  return rows * splits >= sms ? kFirstPassStream : kFirstPassChunked;
}

// 2^x, one MUFU instruction (relative error ~2^-22; subnormal results flush to zero, which a sum of
// terms <= 1 cannot tell).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The max of VECS 16-byte vectors of T as a float: fmaxf semantics (a NaN loses to any number; NaN only if every
// element is NaN). Half types take packed maxima (__hmax2: two elements an instruction), converted once at the end.
template <typename T, int VECS>
__device__ __forceinline__ float batch_max(const uint4 (&raw)[VECS]) {
  if constexpr (sizeof(T) == 4) {
    float m = __uint_as_float(raw[0].x);
#pragma unroll
    for (int k = 0; k < VECS; ++k) {
      m = fmaxf(m, fmaxf(fmaxf(__uint_as_float(raw[k].x), __uint_as_float(raw[k].y)),
                         fmaxf(__uint_as_float(raw[k].z), __uint_as_float(raw[k].w))));
    }
    return m;
  } else {
    using T2 = typename std::conditional<std::is_same<T, __half>::value, __half2, __nv_bfloat162>::type;
    const T2* first = reinterpret_cast<const T2*>(&raw[0]);
    T2 m[4] = {first[0], first[1], first[2], first[3]};
#pragma unroll
    for (int k = 1; k < VECS; ++k) {
      const T2* h = reinterpret_cast<const T2*>(&raw[k]);
#pragma unroll
      for (int j = 0; j < 4; ++j) m[j] = __hmax2(m[j], h[j]);
    }
    const T2 m2 = __hmax2(__hmax2(m[0], m[1]), __hmax2(m[2], m[3]));
    const T* e = reinterpret_cast<const T*>(&m2);
    return fmaxf(to_float(e[0]), to_float(e[1]));
  }
}

// The per-thread state of the wide pass: an Lse and an ArgMax whose elements arrive in increasing index
// order (so a strict > keeps the first of equal maxima).
struct WideStats {
  Lse z;
  ArgMax zmax;
  // Whether vm, the max of the next elements, takes the argmax: it is larger, or it is the first number seen.
  __device__ __forceinline__ bool beats_argmax(float vm) const {
    return vm > zmax.v || (zmax.i == INT_MAX && vm == vm);
  }
  // Raises the running max to vm (rescaling the sum); false while every element so far is -inf.
  __device__ __forceinline__ bool take_max(float vm) {
    if (vm > z.m) {
      z.s *= fast_exp2((z.m - vm) * 1.4426950408889634f);  // m = -inf: 2^-inf = 0
      z.m = vm;
    }
    return z.m != -kInf;
  }
  template <int N>
  __device__ __forceinline__ void add_vector(const float (&x)[N], int base) {
    float vm = x[0];
#pragma unroll
    for (int q = 1; q < N; ++q) vm = fmaxf(vm, x[q]);  // NaN only if every element is NaN
    if (beats_argmax(vm)) {
#pragma unroll
      for (int q = N - 1; q >= 0; --q) {
        if (x[q] == vm) zmax.i = base + q;  // the last write is the first index holding the max
      }
      zmax.v = vm;
    }
    if (!take_max(vm)) return;
    const float shift = -z.m * 1.4426950408889634f;
    float acc = 0.0f;
#pragma unroll
    for (int q = 0; q < N; ++q) acc += fast_exp2(fmaf(x[q], 1.4426950408889634f, shift));
    z.s += acc;
  }
  // VECS whole 16-byte vectors of T at once, vector k's element q at index base0 + k * stride + q (increasing
  // in k, then q): the batch's max from packed maxima of the raw values (exact: the conversion to float is exact
  // and monotone), one rescale of the running sum, then one ex2 per element converted on the fly. The same
  // statistics as add_vector on each vector in turn, up to the sum's rounding (one shift for the batch instead
  // of one a vector), with ~2/3 of its instructions and no float copy of the batch in registers.
  template <typename T, int VECS>
  __device__ __forceinline__ void add_batch(const uint4 (&raw)[VECS], int base0, int stride) {
    constexpr int N = 16 / sizeof(T);
    const float vm = batch_max<T>(raw);  // NaN only if every element is NaN
    if (beats_argmax(vm)) {
#pragma unroll
      for (int k = VECS - 1; k >= 0; --k) {
#pragma unroll
        for (int q = N - 1; q >= 0; --q) {
          if (to_float(reinterpret_cast<const T*>(&raw[k])[q]) == vm) zmax.i = base0 + k * stride + q;  // last write: first index
        }
      }
      zmax.v = vm;
    }
    if (!take_max(vm)) return;
    const float shift = -z.m * 1.4426950408889634f;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // four chains of adds, not one
#pragma unroll
    for (int k = 0; k < VECS; ++k) {
#pragma unroll
      for (int q = 0; q < N; ++q) {
        acc[q & 3] += fast_exp2(fmaf(to_float(reinterpret_cast<const T*>(&raw[k])[q]), 1.4426950408889634f, shift));
      }
    }
    z.s += (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
};

// Block-wide merge of one value per thread for thread 0 only: warps merge by butterfly, warp 0 merges the
// warps' results in warp order. smem holds 32 values.
template <typename T>
__device__ T block_reduce_to_first(T x, T* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  x = warp_reduce(x);
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < nwarps ? smem[lane] : T{};
    x = warp_reduce(x);
  }
  return x;
}

// Grid (R * S,), kChunkThreads threads, S = row_splits<T>(V, kWideVecs): as RowChunkStatsKernel, with chunks of
// chunk_elems<T>(kWideVecs) elements.
template <typename T, typename Rows>
__global__ void __launch_bounds__(kChunkThreads)
    RowWideStatsKernel(const T* __restrict__ logits, int V, int S, Rows rows, RowPartial* __restrict__ partials) {
  __shared__ __align__(16) float smem[32 * sizeof(RowPartial) / sizeof(float)];  // 32 RowPartials, unconstructed
  const int r = blockIdx.x / S, c = blockIdx.x % S;
  const RowTask task = rows(r);
  if (!task.active) return;  // block-uniform
  const T* row = logits + static_cast<int64_t>(r) * V;
  RowPartial p;
  if (task.scaled) {  // sampling rows: the per-element statistics of z, z / t and the Gumbel draw
    // Compute-bound (a Philox draw and two logs per element), so the wide chunk goes as the chunked pass's
    // kWideVecs / kChunkVecs chunks that tile it, in turn: the same elements in the same order per thread
    // (head first, tail last), a quarter of the loads in flight, and the registers of the chunked pass
    // instead of 16 vectors' worth (which set the whole kernel's occupancy). Chunk c of S covers the chunked
    // pass's chunks c * sub ... c * sub + sub - 1 of row_splits<T>(V); those past the last hold nothing.
    constexpr int sub = kWideVecs / kChunkVecs;
    static_assert(kWideVecs % kChunkVecs == 0, "a wide chunk is whole chunked-pass chunks");
    const int S4 = row_splits<T>(V);
    for (int g = 0; g < sub && c * sub + g < S4; ++g) {
      for_each_in_chunk<kChunkVecs>(row, V, S4, c * sub + g, [&](int i, float z) {
        p.z.add(z);
        p.zmax.add(z, i);
        const float sv = __fdiv_rn(z, task.t);
        p.s.add(sv);
        if (task.draw) p.g.add(sv + gumbel(task.seed, i, task.offset, task.purpose, task.position), i);
      });
    }
  } else {  // greedy / BiLD rows: the statistics of z per 16-byte vector
    WideStats w;
    for_each_vector_in_chunk<kWideVecs>(row, V, S, c, [&](const auto& e, int base) {
      constexpr int n = sizeof(e) / sizeof(e[0]);
      float x[n];
#pragma unroll
      for (int q = 0; q < n; ++q) x[q] = to_float(e[q]);
      w.add_vector(x, base);
    });
    p.z = w.z;
    p.zmax = w.zmax;
  }
  p = block_reduce_to_first(p, reinterpret_cast<RowPartial*>(smem));
  if (threadIdx.x == 0) partials[blockIdx.x] = p;
}

// ------------------------------------------------------------------------------------------------
// The stream first pass (what `auto` runs wherever it launches enough blocks; timed on an H200 2026-11-27).
// The wide pass's profile on an
// H200 (bench/results/gpu_h200_2026-11-26b.md: 30% DRAM, 44% SM, 122 registers, 2 blocks an SM) showed its
// load, math and reduction phases not overlapping; and the registers of its sampling rows set the occupancy of
// every row. So the work is split in two kernels:
// - RowStreamStatsKernel: the statistics of z (logsumexp, argmax) of every active row, per 16-byte vector as
//   the wide pass's greedy rows, kStreamVecs vectors a thread (all loads issued first), registers capped for
//   kStreamMinBlocks blocks an SM so that other blocks' loads stream while one block computes or reduces; it
//   writes z and zmax of each chunk's RowPartial (s and g as the merge identity).
// - RowScaledStatsKernel: for the rows that scale (sampling: temperature > 0; every other block-item is
//   skipped), the logsumexp of s = z / t and the Gumbel-max draw over s, chunk by chunk, on top of the first
//   kernel's partials. The chunk's max of s is fdiv(max z, t) (division by t > 0 is monotone and correctly
//   rounded), so the logsumexp needs no running max, and the draw starts from the candidate at the chunk's
//   argmax: an element whose s + kGumbelMax is below the best draw so far cannot win (every Gumbel draw is
//   below kGumbelMax; rounding is monotone), and its Philox draw and two logs are skipped. On real logits
//   (most of a vocabulary tens of nats below its max) that is nearly every element. The same elements win as in
//   the other passes: the draws are addressed by vocabulary index and ties go to the lower index.
//   A grid-stride loop over (row, chunk) items, so that a launch without sampling rows costs one small grid.
// ------------------------------------------------------------------------------------------------
constexpr int kStreamMinBlocks = 4;     // RowStreamStatsKernel: at most 64 registers a thread
constexpr int kScaledMaxBlocks = 1024;  // RowScaledStatsKernel's grid cap

struct ZStats {
  Lse z;
  ArgMax zmax;
};
__device__ inline ZStats merge(ZStats a, ZStats b) { return ZStats{merge(a.z, b.z), merge(a.zmax, b.zmax)}; }
__device__ inline ZStats shfl_xor(ZStats x, int o) { return ZStats{shfl_xor(x.z, o), shfl_xor(x.zmax, o)}; }

struct ScaledStats {
  Lse s;
  ArgMax g;
};
__device__ inline ScaledStats merge(ScaledStats a, ScaledStats b) {
  return ScaledStats{merge(a.s, b.s), merge(a.g, b.g)};
}
__device__ inline ScaledStats shfl_xor(ScaledStats x, int o) { return ScaledStats{shfl_xor(x.s, o), shfl_xor(x.g, o)}; }

// Grid (R * S,), kChunkThreads threads, S = row_splits<T>(V, kStreamVecs).
template <typename T, typename Rows, typename Tail = NoTail>
__global__ void __launch_bounds__(kChunkThreads, kStreamMinBlocks)
    RowStreamStatsKernel(const T* __restrict__ logits, int V, int S, Rows rows, RowPartial* __restrict__ partials,
                         Tail tail = Tail()) {
  __shared__ __align__(16) float smem[32 * sizeof(ZStats) / sizeof(float)];  // 32 ZStats, unconstructed
  const int r = blockIdx.x / S, c = blockIdx.x % S;
  if (!rows(r).active) return;  // block-uniform
  WideStats w;
  for_each_vector_in_chunk<kStreamVecs>(logits + static_cast<int64_t>(r) * V, V, S, c, [&](const auto& e, int base) {
    constexpr int n = sizeof(e) / sizeof(e[0]);
    float x[n];
#pragma unroll
    for (int q = 0; q < n; ++q) x[q] = to_float(e[q]);
    w.add_vector(x, base);
  });
  const ZStats t = block_reduce_to_first(ZStats{w.z, w.zmax}, reinterpret_cast<ZStats*>(smem));
  if (threadIdx.x == 0) partials[blockIdx.x] = RowPartial{t.z, t.zmax, Lse{}, ArgMax{}};
  after_partial(tail, r, S, partials);
}

// The long first pass (kFirstPassLong, opt-in until timed). The H200 profile of the stream pass (2026-11-27b:
// 74% of issue slots, 44% of DRAM bandwidth, 17.6 instructions a logit) showed it bound by instruction issue,
// about half of it each thread's fixed work around its 64 logits (the row's task, the block's reduction with an
// exp at each level). RowLongStatsKernel takes chunks kLongIters times longer, as kLongIters batches of
// kStreamVecs vectors a thread (each batch's loads issued before its math, the registers of the stream pass), and
// takes a whole batch at once (WideStats::add_batch: packed maxima, one rescale, one ex2 an element); the row's
// last batch, where some vectors lie past the row, goes vector by vector. RowScaledStatsKernel<..., kLongIters>
// visits the same elements per chunk. Grid (R * S,), kChunkThreads threads, S = row_splits<T>(V, kLongVecs).
template <typename T, typename Rows, typename Tail = NoTail>
__global__ void __launch_bounds__(kChunkThreads, kStreamMinBlocks)
    RowLongStatsKernel(const T* __restrict__ logits, int V, int S, Rows rows, RowPartial* __restrict__ partials,
                       Tail tail = Tail()) {
  __shared__ __align__(16) float smem[32 * sizeof(ZStats) / sizeof(float)];  // 32 ZStats, unconstructed
  const int r = blockIdx.x / S, c = blockIdx.x % S;
  if (!rows(r).active) return;  // block-uniform
  constexpr int N = 16 / sizeof(T);
  const T* row = logits + static_cast<int64_t>(r) * V;
  // The geometry of for_each_vector_in_chunk with S * kLongIters chunks of kStreamVecs vectors: chunk c here is
  // its chunks c * kLongIters ... c * kLongIters + kLongIters - 1 (the head with the first, the tail the last).
  const auto [head, nvec] = row_middle(row, V);
  WideStats w;
  if (c == 0) {
    for (int i = threadIdx.x; i < head; i += kChunkThreads) {
      const float x[1] = {to_float(row[i])};
      w.add_vector(x, i);
    }
  }
  const uint4* vec = reinterpret_cast<const uint4*>(row + head);
  for (int it = 0; it < kLongIters; ++it) {
    const int first = (c * kLongIters + it) * kChunkThreads * kStreamVecs;  // the batch's first vector
    if (first >= nvec) break;  // block-uniform: the row ends before this batch
    const int w0 = first + threadIdx.x;
    uint4 raw[kStreamVecs];
#pragma unroll
    for (int k = 0; k < kStreamVecs; ++k) {
      const int wk = w0 + k * kChunkThreads;
      if (wk < nvec) raw[k] = __ldg(vec + wk);
    }
    if (first + kStreamVecs * kChunkThreads <= nvec) {  // block-uniform: every vector of the batch lies in the row
      w.add_batch<T>(raw, head + w0 * N, kChunkThreads * N);
    } else {
#pragma unroll
      for (int k = 0; k < kStreamVecs; ++k) {
        const int wk = w0 + k * kChunkThreads;
        if (wk < nvec) {
          float x[N];
#pragma unroll
          for (int q = 0; q < N; ++q) x[q] = to_float(reinterpret_cast<const T*>(&raw[k])[q]);
          w.add_vector(x, head + wk * N);
        }
      }
    }
  }
  if (c == S - 1) {
    for (int i = head + nvec * N + threadIdx.x; i < V; i += kChunkThreads) {
      const float x[1] = {to_float(row[i])};
      w.add_vector(x, i);
    }
  }
  const ZStats t = block_reduce_to_first(ZStats{w.z, w.zmax}, reinterpret_cast<ZStats*>(smem));
  if (threadIdx.x == 0) partials[blockIdx.x] = RowPartial{t.z, t.zmax, Lse{}, ArgMax{}};
  after_partial(tail, r, S, partials);
}

// Grid (min(R * S, kScaledMaxBlocks),), kChunkThreads threads, after RowStreamStatsKernel over the same rows:
// item (r, c) = r * S + c, blocks striding over them, adds s and g to partials[r * S + c] for scaling rows.
// ITERS: the chunk geometry of the statistics kernel before it (1: the stream pass's, kLongIters: the long pass's).
template <typename T, typename Rows, int ITERS = 1>
__global__ void __launch_bounds__(kChunkThreads)
    RowScaledStatsKernel(const T* __restrict__ logits, int V, int S, int items, Rows rows,
                         RowPartial* __restrict__ partials) {
  __shared__ __align__(16) float smem[32 * sizeof(ScaledStats) / sizeof(float)];
  // Most launches have no sampling row (greedy and BiLD verification): every block finds that out in one
  // parallel round over the rows and returns, instead of reading each of its items' row tasks in turn (the
  // H200 profile of 2026-11-27b: 13.8 us for 1,024 blocks with nothing to do, 4.5 dependent task reads each).
  int mine = 0;
  for (int r = threadIdx.x; r < items / S; r += blockDim.x) {
    const RowTask task = rows(r);
    mine |= task.active && task.scaled;
  }
  if (!__syncthreads_or(mine)) return;  // block-uniform
  for (int item = blockIdx.x; item < items; item += gridDim.x) {
    const int r = item / S, c = item % S;
    const RowTask task = rows(r);
    if (!task.active || !task.scaled) continue;  // block-uniform
    const RowPartial zp = partials[item];
    const float t = task.t;
    const float s_max = __fdiv_rn(zp.zmax.v, t);  // the chunk's max of s
    const float shift = -s_max * 1.4426950408889634f;
    const float log2e_t = 1.4426950408889634f / t;  // exp(s - s_max) as 2^(z * log2e / t - s_max * log2e)
    const float inv_t = 1.0f / t;
    float sum = 0.0f;
    ArgMax g;
    if (task.draw && s_max > -kInf) {  // the draw at the chunk's argmax: the bar every other element must pass
      g.v = s_max + gumbel(task.seed, zp.zmax.i, task.offset, task.purpose, task.position);
      g.i = zp.zmax.i;
    }
    for (int it = 0; it < ITERS; ++it) {
      for_each_in_chunk<kStreamVecs>(logits + static_cast<int64_t>(r) * V, V, S * ITERS, c * ITERS + it,
                                     [&](int i, float z) {
        if (s_max > -kInf) sum += fast_exp2(fmaf(z, log2e_t, shift));  // a -inf chunk sums nothing
        if (task.draw && !cannot_win(z, inv_t, g.v)) {  // (most elements: no division either)
          const float sv = __fdiv_rn(z, t);
          if (!(sv + kGumbelMax < g.v)) g.add(sv + gumbel(task.seed, i, task.offset, task.purpose, task.position), i);
        }
      });
    }
    Lse s;
    s.m = s_max;
    s.s = s_max > -kInf ? sum : 0.0f;
    const ScaledStats st = block_reduce_to_first(ScaledStats{s, g}, reinterpret_cast<ScaledStats*>(smem));
    if (threadIdx.x == 0) partials[item] = RowPartial{zp.z, zp.zmax, st.s, st.g};
    __syncthreads();  // smem is reused by the next item
  }
}

// What a launch's caller knows of its rows on the host (the ops' `rows` argument; kRowsUnknown when nothing): the
// kernels that serve only the kinds absent are not launched (they would each look at every row and return).
constexpr int kRowsSampled = 1;   // some row samples (temperature > 0)
constexpr int kRowsFiltered = 2;  // some row uses top-k / top-p / min-p
constexpr int kRowsAll = kRowsSampled | kRowsFiltered;
// The filtered bit is an assumption (the caller was not told, e.g. a CUDA graph recorded for any rows): the kernels
// serve filtering rows all the same, but a choice made for them (the split cut-off search) is not taken on a guess.
constexpr int kRowsFilterGuessed = 4;
constexpr int kRowsUnknown = kRowsAll | kRowsFilterGuessed;  // the ops' default

// How sample_draft and verify_draft end after their first pass, for the whole process (bild_kernels.cuda_fused_tail):
constexpr int kTailLaunches = 0;  // their row / position kernels (sampling.cuh, verify.cuh)
constexpr int kTailFused = 1;     // inside the first pass where it applies: SampleFusedTail, VerifyFusedTail
constexpr int kTailAuto = 2;      // the default: the launches until the fused tails are timed on a GPU

// Whether a launch runs its fused tail: set so, a first pass with the tail (chunked, stream or long: the launch's
// resolved kind), and rows the tail serves (the caller's hint): verify_draft's no sampling rows, sample_draft's
// neither sampling nor top-k / top-p / min-p rows (greedy rows report their token's probability over the kept set).
__host__ __device__ inline bool use_fused_tail(int setting, int rows, int first_pass, bool verify) {
  const bool pass = first_pass == kFirstPassChunked || first_pass == kFirstPassStream || first_pass == kFirstPassLong;
  return setting == kTailFused && pass && (verify ? (rows & kRowsSampled) == 0 : rows == 0);
}

// Launches the first pass `kind` over R rows of V elements: R * first_pass_splits<T>(kind, V) blocks (the
// stream and long passes: then their scaled kernel, at most kScaledMaxBlocks blocks, unless no row samples:
// `sampled` false, when the partials' s and g stay the merge identity, read by no row). A `tail` (after_partial)
// runs in the chunked, stream and long passes only, and only without sampling rows (in the stream and long passes
// it would run before the scaled kernel): use_fused_tail checks both.
template <typename T, typename Rows, typename Tail = NoTail>
void launch_first_pass(int kind, const T* logits, int R, int V, Rows rows, RowPartial* partials,
                       cudaStream_t stream, bool sampled = true, Tail tail = Tail()) {
  const int S = first_pass_splits<T>(kind, V);
  const unsigned grid = static_cast<unsigned>(static_cast<int64_t>(R) * S);
  if (kind == kFirstPassWide) {
    RowWideStatsKernel<T><<<grid, kChunkThreads, 0, stream>>>(logits, V, S, rows, partials);
  } else if (kind == kFirstPassStream || kind == kFirstPassLong) {
    const unsigned scaled_grid = grid < kScaledMaxBlocks ? grid : kScaledMaxBlocks;
    if (kind == kFirstPassStream) {
      RowStreamStatsKernel<T, Rows, Tail><<<grid, kChunkThreads, 0, stream>>>(logits, V, S, rows, partials, tail);
      if (sampled) {
        RowScaledStatsKernel<T, Rows, 1><<<scaled_grid, kChunkThreads, 0, stream>>>(
            logits, V, S, static_cast<int>(grid), rows, partials);
      }
    } else {
      RowLongStatsKernel<T, Rows, Tail><<<grid, kChunkThreads, 0, stream>>>(logits, V, S, rows, partials, tail);
      if (sampled) {
        RowScaledStatsKernel<T, Rows, kLongIters><<<scaled_grid, kChunkThreads, 0, stream>>>(
            logits, V, S, static_cast<int>(grid), rows, partials);
      }
    }
  } else {
    RowChunkStatsKernel<T, Rows, Tail><<<grid, kChunkThreads, 0, stream>>>(logits, V, S, rows, partials, tail);
  }
}

// The statistics of a whole row from its S partials, for a full warp: lane l merges chunks l, l + 32, ...
// in order, then a butterfly merges the lanes. Every merge is commutative bit for bit (fmaxf, one
// float sum, argmax ties to the lower index), so every lane, and every warp of a block, gets the same
// result; the order depends on S only. The merge identity is a default RowPartial.
// kL2: the partials were written by other blocks of the same launch (a tail): read past this SM's L1, which may
// hold an older copy of their lines.
template <bool kL2 = false>
__device__ inline RowPartial warp_merge_partials(const RowPartial* __restrict__ p, int S) {
  RowPartial r;
  for (int c = threadIdx.x & 31; c < S; c += 32) {
    RowPartial q;
    if constexpr (kL2) {
      const float4* v = reinterpret_cast<const float4*>(p + c);
      const float4 lo = __ldcg(v), hi = __ldcg(v + 1);
      memcpy(&q, &lo, sizeof(lo));
      memcpy(reinterpret_cast<char*>(&q) + sizeof(lo), &hi, sizeof(hi));
    } else {
      q = p[c];
    }
    r.z = merge(r.z, q.z);
    r.zmax = merge(r.zmax, q.zmax);
    r.s = merge(r.s, q.s);
    r.g = merge(r.g, q.g);
  }
  r.z = warp_reduce(r.z);
  r.zmax = warp_reduce(r.zmax);
  r.s = warp_reduce(r.s);
  r.g = warp_reduce(r.g);
  return r;
}

// ------------------------------------------------------------------------------------------------
// top-k / top-p / min-p without sorting (reference._filter_top_k_top_p): the cut-off search of cut_search.h, each
// pass one block-wide histogram of the bracket's keys in shared memory (integer atomics: exact, order-free sums),
// then a prefix sum over the buckets from the top and the first bucket that satisfies. Returns the search's
// end state: tau() the cut-off key (keys >= it are kept; kLowestKey when no filter is on) and
// kept_sum(s_sum) the kept set's sum of exp(s - s_max), so no further pass is needed to normalise over it.
// Every thread of the block calls it (blockDim.x divides kCutBuckets); it ends with a barrier.
// ------------------------------------------------------------------------------------------------
struct CutSmem {
  unsigned int cnt[kCutBuckets];
  unsigned long long mass[kCutBuckets];
  CutSums warp_sums[32];  // block_exclusive_scan's
  int first;  // the first satisfying bucket of the pass (kCutBuckets: none)
  CutSums first_excl, first_incl;  // the sums of the buckets above it and down to it
};

// Row b's min_p from the ops' optional [B] vector (null: none given, 0 for every row).
__device__ inline float row_min_p(const float* min_p, int b) { return min_p != nullptr ? min_p[b] : 0.0f; }

// One logit's share of a pass: its bucket's count and fixed-point mass, added to sm's histogram (most logits of a
// peaked row fall outside the bracket and cost one compare).
__device__ inline void cut_count(const CutSearch& pass, float z, float t, CutSmem& sm) {
  const float s = __fdiv_rn(z, t);
  const int j = pass.bucket(order_key(s), s);
  if (j < 0) return;
  atomicAdd(&sm.cnt[j], 1u);
  const float e = expf(s - pass.s_max);
  if (e > 0.0f) atomicAdd(&sm.mass[j], cut_fixed_mass(e));  // (a NaN logit adds nothing)
}

// Clears sm's histogram and its `first` for a pass. Every thread calls it; the caller's barrier follows.
__device__ inline void cut_clear(CutSmem& sm) {
  for (int j = threadIdx.x; j < kCutBuckets; j += blockDim.x) {
    sm.cnt[j] = 0u;
    sm.mass[j] = 0ull;
  }
  if (threadIdx.x == 0) sm.first = kCutBuckets;
}

// The close of a pass, once sm holds its whole histogram (and first = kCutBuckets) behind a barrier: a prefix sum
// over the buckets from the top, the first bucket that satisfies, and cs (every thread's copy) settled on it.
// Every thread calls it (blockDim.x divides kCutBuckets); it ends with a barrier, so sm is free again.
__device__ inline void cut_settle(CutSearch& cs, CutSmem& sm) {
  const int per = kCutBuckets / blockDim.x, first_mine = threadIdx.x * per;
  // Sums over buckets 0 .. j from the top: each thread's `per` buckets, an exclusive scan over the threads.
  CutSums mine{};
  for (int q = 0; q < per; ++q) mine = mine + CutSums{sm.cnt[first_mine + q], sm.mass[first_mine + q]};
  CutSums total;
  const CutSums before = block_exclusive_scan(mine, sm.warp_sums, &total);  // ends with a barrier
  CutSums run = before;
  for (int q = 0; q < per; ++q) {  // satisfied() only turns true going down: the first is the answer
    run = run + CutSums{sm.cnt[first_mine + q], sm.mass[first_mine + q]};
    if (cs.satisfied(first_mine + q, run.cnt, run.mass)) {
      atomicMin(&sm.first, first_mine + q);
      break;
    }
  }
  __syncthreads();
  const int j = sm.first;
  if (j < kCutBuckets && j >= first_mine && j < first_mine + per) {  // the owner of bucket j
    CutSums excl = before;
    for (int q = first_mine; q < j; ++q) excl = excl + CutSums{sm.cnt[q], sm.mass[q]};
    sm.first_excl = excl;
    sm.first_incl = excl + CutSums{sm.cnt[j], sm.mass[j]};
  }
  __syncthreads();
  if (j < kCutBuckets) {
    cs.settle(j, sm.first_excl.cnt, sm.first_excl.mass, sm.first_incl.cnt, sm.first_incl.mass);
  } else {
    cs.settle(-1, 0u, 0ull, total.cnt, total.mass);
  }
  __syncthreads();  // every thread has read sm before the next pass clears it
}

template <typename T>
__device__ CutSearch filter_cut(const T* __restrict__ row, int V, float t, float s_max, float s_sum, int top_k,
                                float top_p, float min_p, CutSmem& sm) {
  CutSearch cs;
  cs.init(s_max, s_sum, top_k, top_p, V, min_p);
  while (!cs.done()) {  // cs is the same in every thread: the loop is block-uniform
    cs.begin_pass();
    cut_clear(sm);
    __syncthreads();
    const CutSearch pass = cs;  // a copy the loop reads (by value: kept in registers)
    for_each_in_row(row, V, [&sm, pass, t](int, float z) { cut_count(pass, z, t, sm); });
    __syncthreads();
    cut_settle(cs, sm);
  }
  return cs;
}

// ------------------------------------------------------------------------------------------------
// The split cut-off search (kCutSearchSplit; kCutSearchAuto picks it per launch: use_cut_split). filter_cut gives a
// row's whole search to one block: a row of V = 128,256 took ~300 us on an H200 (bench/results/gpu_h200_2026-11-27.md),
// a latency no batch hides at small B, and a sample_draft of B rows used B of the GPU's SMs. Here each pass is one
// launch over every chunk of every searching row (row_splits<T>(V) chunks, the chunked first pass's): each block counts
// its chunk into a shared histogram as filter_cut does, adds its non-empty buckets into the row's histogram in global
// memory (integer atomics: the same sums in any order, so the same search as filter_cut's, pass for pass), and the
// row's last block to arrive settles the pass (cut_settle) and leaves the state for the next launch. The first launch
// starts each row's search from the first pass's partials. kCutMaxPasses launches always run (a CUDA graph's launches
// are fixed); a row whose search is done returns at once in every later one.
// ------------------------------------------------------------------------------------------------
constexpr int kCutSearchBlock = 0;  // filter_cut inside the row / position kernels
constexpr int kCutSearchSplit = 1;  // the passes below
constexpr int kCutSearchAuto = 2;   // the default: per launch, use_cut_split below
// Auto, as timed on an H100 (bench/results/gpu_h100_2026-11-27c.md, V = 128,256, bf16, sample_draft): with top-k /
// top-p rows the split search took 122 us against the block search's 330 at B = 1 and 229 against 347 at B = 64,
// and the same at B = 256; where no row filters, its launches only add (~10 us at B = 64). So a sample_draft launch
// of at most kAutoSplitMaxRows rows whose caller knows that some row filters (the rows hint, its filtered bit not
// guessed: a caller that knows nothing would pay for the split launches on rows that never filter) runs the split
// search; verify_draft keeps the block one until the split search is timed there.
constexpr int kAutoSplitMaxRows = 64;
inline bool use_cut_split(int setting, int64_t launch_rows, int rows_hint, bool verify) {
  if (setting == kCutSearchSplit) return true;
  return setting == kCutSearchAuto && !verify && (rows_hint & kRowsFiltered) != 0 &&
         (rows_hint & kRowsFilterGuessed) == 0 && launch_rows <= kAutoSplitMaxRows;
}
constexpr int kCutMaxPasses = 5;    // a value pass, then key passes that split at most 2^32 keys 1024-fold each

// What the split search needs of row r (a CutRows functor returns it).
struct CutRow {
  bool filtered = false;  // the row searches a cut-off (false: never read, never written)
  bool use_z = false;     // s is z itself (a greedy sample_draft row: t = 1): its statistics are the partials' z
  float t = 1.0f;
  int top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
};

// A row's histogram in global memory, summed by every chunk of a pass.
struct CutHist {
  unsigned int cnt[kCutBuckets];
  unsigned long long mass[kCutBuckets];
};

// The split search's scratch for R rows, carved from one buffer of cut_split_bytes(R, D) bytes (cut_split_carve):
// the histograms and arrival counters first (zeroed by launch_cut_split with one memset; each pass leaves them
// zero), then the states, then D records for the caller's chunked draws over the kept sets (sample_draft's).
struct CutSplit {
  CutHist* hist;           // [R]
  unsigned int* arrived;   // [R]: the blocks of the current pass that have added their buckets
  CutSearch* state;        // [R]: the search after the last pass that settled (read where the row filters)
  ArgMax* draws;           // [D] (null when D = 0)
};
inline int64_t cut_split_zeroed_bytes(int64_t R) {
  return R * static_cast<int64_t>(sizeof(CutHist) + sizeof(unsigned int));
}
inline int64_t cut_split_state_offset(int64_t R) { return (cut_split_zeroed_bytes(R) + 15) / 16 * 16; }
inline int64_t cut_split_bytes(int64_t R, int64_t D = 0) {
  return cut_split_state_offset(R) + R * static_cast<int64_t>(sizeof(CutSearch)) + D * static_cast<int64_t>(sizeof(ArgMax));
}
inline CutSplit cut_split_carve(void* base, int64_t R, int64_t D = 0) {
  char* p = static_cast<char*>(base);
  char* state = p + cut_split_state_offset(R);
  return CutSplit{reinterpret_cast<CutHist*>(p), reinterpret_cast<unsigned int*>(p + R * sizeof(CutHist)),
                  reinterpret_cast<CutSearch*>(state),
                  D > 0 ? reinterpret_cast<ArgMax*>(state + R * sizeof(CutSearch)) : nullptr};
}

// Grid (R * S,), kChunkThreads threads, S = row_splits<T>(V): pass `pass` of the search of every filtered row, block
// r * S + c counting chunk c of row r. partials: the first pass's, S_first a row (read by the first launch).
template <typename T, typename CutRows>
__global__ void __launch_bounds__(kChunkThreads)
    CutSplitPassKernel(const T* __restrict__ logits, int V, int S, CutRows rows, const RowPartial* __restrict__ partials,
                       int S_first, CutSplit split, int pass) {
  __shared__ CutSmem sm;
  __shared__ int last;
  const int r = blockIdx.x / S, c = blockIdx.x % S;
  const CutRow row = rows(r);
  if (!row.filtered) return;  // block-uniform, as everything that decides below
  CutSearch cs;
  if (pass == 0) {  // every warp merges the row's partials: the same result in every lane
    const RowPartial st = warp_merge_partials(partials + static_cast<int64_t>(r) * S_first, S_first);
    const Lse s = row.use_z ? st.z : st.s;
    cs.init(s.m, s.s, row.top_k, row.top_p, V, row.min_p);
    if (cs.done()) {  // nothing to search: the state as it starts (no pass of this row settles)
      if (c == 0 && threadIdx.x == 0) split.state[r] = cs;
      return;
    }
  } else {
    cs = split.state[r];
    if (cs.done()) return;
  }
  cs.begin_pass();
  cut_clear(sm);
  __syncthreads();
  const CutSearch counting = cs;
  const float t = row.t;
  for_each_in_chunk(logits + static_cast<int64_t>(r) * V, V, S, c,
                    [counting, t](int, float z) { cut_count(counting, z, t, sm); });
  __syncthreads();
  CutHist& h = split.hist[r];
  for (int j = threadIdx.x; j < kCutBuckets; j += blockDim.x) {
    if (sm.cnt[j] != 0u) atomicAdd(&h.cnt[j], sm.cnt[j]);
    if (sm.mass[j] != 0ull) atomicAdd(&h.mass[j], sm.mass[j]);
  }
  __threadfence();  // this block's sums are visible device-wide before it counts as arrived
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&split.arrived[r], 1u) == static_cast<unsigned int>(S - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  // The row's last block: every chunk's sums are in h. Read them (from L2: __ldcg), leave h and the counter
  // zero for the next pass, settle.
  for (int j = threadIdx.x; j < kCutBuckets; j += blockDim.x) {
    sm.cnt[j] = __ldcg(&h.cnt[j]);
    sm.mass[j] = __ldcg(&h.mass[j]);
    h.cnt[j] = 0u;
    h.mass[j] = 0ull;
  }
  if (threadIdx.x == 0) {
    sm.first = kCutBuckets;
    split.arrived[r] = 0u;
  }
  __syncthreads();
  cut_settle(cs, sm);
  if (threadIdx.x == 0) split.state[r] = cs;
}

// Launches the split search over R rows of V elements of T after the first pass (partials: S_first a row): one
// memset, then kCutMaxPasses launches of R * row_splits<T>(V) blocks. Capturable: no sync, no allocation.
template <typename T, typename CutRows>
cudaError_t launch_cut_split(const T* logits, int R, int V, CutRows rows, const RowPartial* partials, int S_first,
                             CutSplit split, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(split.hist, 0, static_cast<size_t>(cut_split_zeroed_bytes(R)), stream);
  if (err != cudaSuccess) return err;
  const int S = row_splits<T>(V);
  const unsigned grid = static_cast<unsigned>(static_cast<int64_t>(R) * S);
  for (int pass = 0; pass < kCutMaxPasses; ++pass) {
    CutSplitPassKernel<T><<<grid, kChunkThreads, 0, stream>>>(logits, V, S, rows, partials, S_first, split, pass);
  }
  return cudaGetLastError();
}

}  // namespace bild
