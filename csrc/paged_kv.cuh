// Paged KV-cache kernels and launchers: write, reserve, rollback, gather (spec: bild_kernels/reference/). No torch
// headers. Caches are [num_blocks, block_size, H, D], contiguous; slot s is row s % block_size of block
// s / block_size. Block tables [B, M] i32 hold a row's blocks first, then -1; free_blocks [N] i32 is a
// stack whose first num_free[0] entries are free.
#pragma once

#include <type_traits>

#include "common.cuh"

namespace bild {

// fp32 is the hub of every conversion, as in torch (c10::Half/BFloat16 are built from float); only
// a double destination keeps double precision.
template <typename To, typename From>
__device__ __forceinline__ To convert(From x) {
  if constexpr (std::is_same_v<To, From>) {
    return x;
  } else if constexpr (std::is_same_v<To, double>) {
    return static_cast<double>(to_float(x));
  } else if constexpr (std::is_same_v<From, double>) {
    return convert<To>(static_cast<float>(x));
  } else if constexpr (std::is_same_v<To, float>) {
    return to_float(x);
  } else if constexpr (std::is_same_v<To, __half>) {
    return __float2half_rn(to_float(x));
  } else {
    return __float2bfloat16_rn(to_float(x));
  }
}

// Grid (T,), up to 256 threads: one block per token copies its H * D key and value elements to the
// token's slot, converting to the cache dtype in registers. Padding tokens (slot -1) return at once,
// which keeps a fixed-size CUDA-graph batch correct. Source rows may be strided by token and head.
template <typename TIn, typename TOut>
__global__ void WritePagedKVKernel(const TIn* __restrict__ key, const TIn* __restrict__ value,
                                   TOut* __restrict__ key_cache, TOut* __restrict__ value_cache,
                                   const int64_t* __restrict__ slot_mapping, int H, int D, int64_t key_stride_t,
                                   int64_t key_stride_h, int64_t value_stride_t, int64_t value_stride_h) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slot_mapping[t];
  if (slot < 0) return;
  const int64_t dst = slot * H * D;
  for (int e = threadIdx.x; e < H * D; e += blockDim.x) {
    const int h = e / D, d = e % D;
    key_cache[dst + e] = convert<TOut>(key[t * key_stride_t + h * key_stride_h + d]);
    value_cache[dst + e] = convert<TOut>(value[t * value_stride_t + h * value_stride_h + d]);
  }
}

template <typename TIn, typename TOut>
cudaError_t WritePagedKV(const TIn* key, const TIn* value, TOut* key_cache, TOut* value_cache,
                         const int64_t* slot_mapping, int T, int H, int D, int64_t key_stride_t, int64_t key_stride_h,
                         int64_t value_stride_t, int64_t value_stride_h, cudaStream_t stream) {
  if (T == 0 || H * D == 0) return cudaSuccess;
  const int threads = H * D >= 256 ? 256 : ((H * D + 31) / 32) * 32;
  WritePagedKVKernel<TIn, TOut><<<T, threads, 0, stream>>>(key, value, key_cache, value_cache, slot_mapping, H, D,
                                                           key_stride_t, key_stride_h, value_stride_t,
                                                           value_stride_h);
  return cudaGetLastError();
}

// Blocks held by row b: the reference counts the non-negative entries. One warp per row, coalesced.
__device__ inline int count_blocks(const int* table_row, int M) {
  int n = 0;
  for (int j0 = 0; j0 < M; j0 += 32) {
    const int j = j0 + (threadIdx.x & 31);
    n += __popc(__ballot_sync(0xFFFFFFFFu, j < M && table_row[j] >= 0));
  }
  return n;
}

// Index of the first -1 at or after `from` (M when none): the end of what rollback frees.
__device__ inline int first_empty(const int* table_row, int M, int from) {
  for (int j0 = from; j0 < M; j0 += 32) {
    const int j = j0 + (threadIdx.x & 31);
    const unsigned empty = __ballot_sync(0xFFFFFFFFu, j < M && table_row[j] < 0);
    if (empty) return j0 + __ffs(empty) - 1;
  }
  return M;
}

// Grid (1,), kTableThreads threads: the free stack is one shared resource, and serving every row in one
// block reproduces the reference's allocation order with no atomics or host round trip. Rows go in
// chunks of blockDim.x; in a chunk, warps count each row's blocks (coalesced), then thread r owns row r:
// a first sweep sums the needs to detect a shortfall (then only num_free is written), a second takes an
// exclusive prefix sum of the needs, carried across chunks, so row b pops the stack below rows 0..b-1.
__global__ void __launch_bounds__(kTableThreads)
    ReservePagedKVKernel(int* __restrict__ block_tables, const int* __restrict__ context_lens,
                         const int* __restrict__ num_new, const int* __restrict__ free_blocks,
                         int* __restrict__ num_free, int B, int M, int block_size) {
  __shared__ int held[kTableThreads];
  __shared__ int smem[32];
  const int top = num_free[0];
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  int total = 0;
  for (int sweep = 0; sweep < 2; ++sweep) {
    int carry = 0;
    for (int base = 0; base < B; base += blockDim.x) {
      for (int r = warp; r < blockDim.x && base + r < B; r += nwarps) {
        const int n = count_blocks(block_tables + static_cast<int64_t>(base + r) * M, M);
        if ((threadIdx.x & 31) == 0) held[r] = n;
      }
      __syncthreads();
      const int b = base + threadIdx.x;
      int need = 0, nblk = 0;
      if (b < B && context_lens[b] >= 0) {
        nblk = held[threadIdx.x];
        const int want = (context_lens[b] + num_new[b] + block_size - 1) / block_size;
        need = want > nblk ? want - nblk : 0;
      }
      int chunk_total;
      const int before = carry + block_exclusive_scan(need, smem, &chunk_total);  // syncs: `held` reusable
      if (sweep == 1) {
        for (int k = 0; k < need && nblk + k < M; ++k) {
          block_tables[static_cast<int64_t>(b) * M + nblk + k] = free_blocks[top - 1 - (before + k)];
        }
      }
      carry += chunk_total;
    }
    total = carry;
    if (sweep == 0 && total > top) break;
  }
  __syncthreads();  // every thread has read num_free[0]
  if (threadIdx.x == 0) num_free[0] = total > top ? -1 - (total - top) : top - total;
}

// Grid (1,), kTableThreads threads, rows in chunks as in reserve: warps find where each row's freed run
// ends (first -1 at or after the blocks the new length keeps), thread r owns row r, and an exclusive
// prefix sum of the freed counts, carried across chunks, places row b's blocks on the stack after rows
// 0..b-1, in table order, as the reference pushes them. Writes past the stack's capacity N are dropped.
__global__ void __launch_bounds__(kTableThreads)
    RollbackPagedKVKernel(int* __restrict__ block_tables, int* __restrict__ context_lens,
                          const int* __restrict__ num_rejected, int* __restrict__ free_blocks,
                          int* __restrict__ num_free, int B, int M, int N, int block_size) {
  __shared__ int run_end[kTableThreads];
  __shared__ int smem[32];
  const int ptr = num_free[0];
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  int carry = 0;
  for (int base = 0; base < B; base += blockDim.x) {
    for (int r = warp; r < blockDim.x && base + r < B; r += nwarps) {
      const int b = base + r;
      const int new_len = max(context_lens[b] - num_rejected[b], 0);
      const int keep = (new_len + block_size - 1) / block_size;
      const int end = first_empty(block_tables + static_cast<int64_t>(b) * M, M, keep);
      if ((threadIdx.x & 31) == 0) run_end[r] = end;
    }
    __syncthreads();
    const int b = base + threadIdx.x;
    int keep = 0, freed = 0, new_len = 0;
    const bool active = b < B && context_lens[b] >= 0;
    if (active) {
      new_len = max(context_lens[b] - num_rejected[b], 0);
      keep = (new_len + block_size - 1) / block_size;
      freed = run_end[threadIdx.x] > keep ? run_end[threadIdx.x] - keep : 0;
    }
    int chunk_total;
    const int before = ptr + carry + block_exclusive_scan(freed, smem, &chunk_total);  // syncs
    for (int k = 0; k < freed; ++k) {
      int* entry = block_tables + static_cast<int64_t>(b) * M + keep + k;
      if (before + k < N) free_blocks[before + k] = *entry;
      *entry = -1;
    }
    if (active) context_lens[b] = new_len;
    carry += chunk_total;
  }
  __syncthreads();  // every thread has read num_free[0]
  if (threadIdx.x == 0) num_free[0] = ptr + carry;
}

cudaError_t inline ReservePagedKV(int* block_tables, const int* context_lens, const int* num_new,
                                  const int* free_blocks, int* num_free, int B, int M, int block_size,
                                  cudaStream_t stream) {
  ReservePagedKVKernel<<<1, kTableThreads, 0, stream>>>(block_tables, context_lens, num_new, free_blocks, num_free,
                                                        B, M, block_size);
  return cudaGetLastError();
}

cudaError_t inline RollbackPagedKV(int* block_tables, int* context_lens, const int* num_rejected, int* free_blocks,
                                   int* num_free, int B, int M, int N, int block_size, cudaStream_t stream) {
  RollbackPagedKVKernel<<<1, kTableThreads, 0, stream>>>(block_tables, context_lens, num_rejected, free_blocks,
                                                         num_free, B, M, N, block_size);
  return cudaGetLastError();
}

// Grid (L, B), 128 threads: block (pos, b) copies one token's H * D elements of key and of value from
// its slot (through row b's block table) to out[b, pos], or writes zeros past the row's length. The
// copy is dtype-blind: Unit is the widest of 16/8/4/2 bytes dividing a token's bytes.
template <typename Unit>
__global__ void GatherPagedKVKernel(const Unit* __restrict__ key_cache, const Unit* __restrict__ value_cache,
                                    const int* __restrict__ block_tables, const int* __restrict__ context_lens,
                                    Unit* __restrict__ key_out, Unit* __restrict__ value_out, int M, int block_size,
                                    int units, int L) {
  const int pos = blockIdx.x, b = blockIdx.y;
  const int64_t dst = (static_cast<int64_t>(b) * L + pos) * units;
  int blk = -1;
  if (pos < context_lens[b]) blk = block_tables[static_cast<int64_t>(b) * M + pos / block_size];
  if (blk < 0) {  // past the end (or a table that lacks the block): zeros, as the reference's mask
    for (int u = threadIdx.x; u < units; u += blockDim.x) {
      key_out[dst + u] = Unit{};
      value_out[dst + u] = Unit{};
    }
    return;
  }
  const int64_t src = (static_cast<int64_t>(blk) * block_size + pos % block_size) * units;
  for (int u = threadIdx.x; u < units; u += blockDim.x) {
    key_out[dst + u] = key_cache[src + u];
    value_out[dst + u] = value_cache[src + u];
  }
}

// key_out/value_out: [B, L, H, D] of the caches' dtype; token_bytes = H * D * element size.
inline cudaError_t GatherPagedKV(const void* key_cache, const void* value_cache, const int* block_tables,
                                 const int* context_lens, void* key_out, void* value_out, int B, int M, int L,
                                 int block_size, int64_t token_bytes, cudaStream_t stream) {
  if (B == 0 || L == 0 || token_bytes == 0) return cudaSuccess;
  const dim3 grid(L, B);
  auto launch = [&](auto unit) {
    using Unit = decltype(unit);
    const int units = static_cast<int>(token_bytes / sizeof(Unit));
    GatherPagedKVKernel<Unit><<<grid, 128, 0, stream>>>(
        static_cast<const Unit*>(key_cache), static_cast<const Unit*>(value_cache), block_tables, context_lens,
        static_cast<Unit*>(key_out), static_cast<Unit*>(value_out), M, block_size, units, L);
  };
  if (token_bytes % 16 == 0) launch(uint4{});
  else if (token_bytes % 8 == 0) launch(uint2{});
  else if (token_bytes % 4 == 0) launch(uint32_t{});
  else launch(uint16_t{});
  return cudaGetLastError();
}

}  // namespace bild
