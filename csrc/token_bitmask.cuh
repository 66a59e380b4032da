// Token bitmask kernel and launcher (spec: reference.apply_token_bitmask_ref). No torch headers.
// ApplyTokenBitmaskKernel, grid (cdiv(V, threads * kBitmaskVecs * N), min(R, 65535)) of 256 threads (fewer for few
// rows); blockIdx.y strides over the R rows. A block owns kBitmaskVecs * threads 16-byte vectors of a row, N = 16 /
// sizeof(T) tokens each, thread t the vectors t, t + threads, ... (coalesced, four loads in flight). N divides 32, so
// a vector's N bits lie in one word, which the 32 / N threads sharing it read in one broadcast; each token goes out
// as read or as -inf's bits, no float arithmetic. Rows off 16-byte alignment: one token a slot instead of a vector.
#pragma once

#include "common.cuh"

namespace bild {

constexpr int kBitmaskThreads = 256;
constexpr int kBitmaskVecs = 4;  // 16-byte vectors (or single tokens, the scalar kernel: x N) a thread

// -inf's bits in each logits dtype.
template <typename T> struct NegInfBits;
template <> struct NegInfBits<__half> { static constexpr uint64_t kBits = 0xFC00u; };
template <> struct NegInfBits<__nv_bfloat16> { static constexpr uint64_t kBits = 0xFF80u; };
template <> struct NegInfBits<float> { static constexpr uint64_t kBits = 0xFF800000u; };
template <> struct NegInfBits<double> { static constexpr uint64_t kBits = 0xFFF0000000000000ull; };

// Word k (of 4) of a 16-byte vector of logits with the tokens whose bit (bits' lowest first) is clear made -inf: a
// select in registers, so that the vector is stored whole.
template <typename T>
__host__ __device__ __forceinline__ uint32_t mask_word(uint32_t z, uint32_t bits, int k) {
  if constexpr (sizeof(T) == 8) {  // token k / 2 across two words; -inf's high word 0xFFF00000, low word 0
    const uint32_t keep = 0u - ((bits >> (k / 2)) & 1u);
    return (z & keep) | (static_cast<uint32_t>(NegInfBits<T>::kBits >> (32 * (k % 2))) & ~keep);
  } else {
    constexpr int kLanes = 4 / sizeof(T), kWidth = 8 * sizeof(T);
    constexpr uint32_t kLane = kWidth == 32 ? ~0u : (1u << kWidth) - 1;
    uint32_t keep = 0, neg_inf = 0;
#pragma unroll
    for (int i = 0; i < kLanes; ++i) {
      keep |= (0u - ((bits >> (k * kLanes + i)) & 1u)) & (kLane << (i * kWidth));
      neg_inf |= static_cast<uint32_t>(NegInfBits<T>::kBits) << (i * kWidth);
    }
    return (z & keep) | (neg_inf & ~keep);
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kBitmaskThreads)
    ApplyTokenBitmaskKernel(const T* __restrict__ logits, const int* __restrict__ bitmask, T* __restrict__ out,
                            int64_t R, int V, int W) {
  using U = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
  constexpr int N = 16 / sizeof(T);
  const U neg_inf = static_cast<U>(NegInfBits<T>::kBits);
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x * kBitmaskVecs * N;  // first token
  for (int64_t r = blockIdx.y; r < R; r += gridDim.y) {
    const U* in = reinterpret_cast<const U*>(logits) + r * V;
    U* o = reinterpret_cast<U*>(out) + r * V;
    const int* words = bitmask + r * W;
    if constexpr (kVec) {  // V is a multiple of N: a vector lies wholly in the row or wholly past it
      uint4 z[kBitmaskVecs] = {};
      uint32_t bits[kBitmaskVecs] = {};
#pragma unroll
      for (int q = 0; q < kBitmaskVecs; ++q) {
        const int64_t col = chunk + (static_cast<int64_t>(q) * blockDim.x + threadIdx.x) * N;
        if (col < V) {
          z[q] = *reinterpret_cast<const uint4*>(in + col);
          bits[q] = static_cast<uint32_t>(words[col >> 5]) >> (col & 31);
        }
      }
#pragma unroll
      for (int q = 0; q < kBitmaskVecs; ++q) {
        const int64_t col = chunk + (static_cast<int64_t>(q) * blockDim.x + threadIdx.x) * N;
        if (col < V) {
          // (__stwb: the default store, which nvcc otherwise splits into four here)
          __stwb(reinterpret_cast<uint4*>(o + col),
                 make_uint4(mask_word<T>(z[q].x, bits[q], 0), mask_word<T>(z[q].y, bits[q], 1),
                            mask_word<T>(z[q].z, bits[q], 2), mask_word<T>(z[q].w, bits[q], 3)));
        }
      }
    } else {
#pragma unroll 8
      for (int q = 0; q < kBitmaskVecs * N; ++q) {
        const int64_t col = chunk + static_cast<int64_t>(q) * blockDim.x + threadIdx.x;
        if (col < V) o[col] = (static_cast<uint32_t>(words[col >> 5]) >> (col & 31)) & 1u ? in[col] : neg_inf;
      }
    }
  }
}

// logits, out [R, V] of T (any leading shape flattened to R rows); bitmask [R, ceil(V / 32)] int32: bit t % 32 of
// word t // 32 set keeps token t, clear gives -inf; the bits past V are ignored. V < 2^31 - 32.
template <typename T>
cudaError_t ApplyTokenBitmask(const T* logits, const int* bitmask, T* out, int64_t R, int V, cudaStream_t stream) {
  if (R == 0 || V == 0) return cudaSuccess;
  const int W = (V + 31) / 32;
  constexpr int N = 16 / sizeof(T);
  // Fewer threads a block where full blocks would leave SMs idle (a batch of one row): the work is a stream.
  int threads = kBitmaskThreads;
  const auto chunks = [&](int t) {
    const int64_t per_block = static_cast<int64_t>(t) * kBitmaskVecs * N;
    return (V + per_block - 1) / per_block;
  };
  while (threads > 64 && R * chunks(threads) < 264) threads /= 2;
  const dim3 grid(static_cast<unsigned>(chunks(threads)), static_cast<unsigned>(R < 65535 ? R : 65535));
  const bool vec = (static_cast<int64_t>(V) * sizeof(T)) % 16 == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (vec) {
    ApplyTokenBitmaskKernel<T, true><<<grid, threads, 0, stream>>>(logits, bitmask, out, R, V, W);
  } else {
    ApplyTokenBitmaskKernel<T, false><<<grid, threads, 0, stream>>>(logits, bitmask, out, R, V, W);
  }
  return cudaGetLastError();
}

}  // namespace bild
