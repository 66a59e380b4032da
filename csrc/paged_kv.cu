// Torch layer of the paged KV-cache ops: check inputs, pick the current stream, launch (paged_kv.cuh).
#include <ATen/ops/empty.h>

#include "paged_kv.cuh"
#include "torch_utils.h"

namespace bild {

void write_paged_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
                    const at::Tensor& slot_mapping) {
  constexpr const char* op = "write_paged_kv";
  check_cuda(op, {{"key", &key}, {"value", &value}, {"key_cache", &key_cache}, {"value_cache", &value_cache},
                  {"slot_mapping", &slot_mapping}});
  // key, value: [T, H, D], any strides with stride(2) == 1
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), op, ": key and value must be [T, H, D] alike");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1, op, ": key/value rows must be contiguous in D");
  TORCH_CHECK(value.scalar_type() == key.scalar_type(), op, ": key and value dtypes differ");
  const int64_t T = key.size(0), H = key.size(1), D = key.size(2);
  // key_cache, value_cache: [num_blocks, block_size, H, D] contiguous, one dtype (may differ from key's)
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.size(2) == H && key_cache.size(3) == D, op,
              ": key_cache must be [num_blocks, block_size, H, D]");
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), op, ": value_cache shape differs from key_cache");
  TORCH_CHECK(value_cache.scalar_type() == key_cache.scalar_type(), op, ": cache dtypes differ");
  check_contiguous(op, "key_cache", key_cache);
  check_contiguous(op, "value_cache", value_cache);
  // slot_mapping: [T] int64, -1 = skip
  check_dtype(op, "slot_mapping", slot_mapping, at::kLong);
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == T, op, ": slot_mapping must be [T]");
  const at::Tensor slots = slot_mapping.contiguous();
  TORCH_CHECK(T < (1LL << 31) && H * D < (1LL << 31), op, ": too many tokens or elements per token");

  const c10::cuda::CUDAGuard guard(key.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floating(op, key.scalar_type(), [&](auto in) {
    dispatch_floating(op, key_cache.scalar_type(), [&](auto out) {
      using TIn = decltype(in);
      using TOut = decltype(out);
      const cudaError_t err = WritePagedKV<TIn, TOut>(
          static_cast<const TIn*>(key.const_data_ptr()), static_cast<const TIn*>(value.const_data_ptr()),
          static_cast<TOut*>(key_cache.data_ptr()), static_cast<TOut*>(value_cache.data_ptr()),
          slots.const_data_ptr<int64_t>(), T, H, D, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
          stream);
      C10_CUDA_CHECK(err);
    });
  });
}

// Shared checks of reserve/rollback: int32 contiguous tables on one CUDA device.
static void check_tables(const char* op, const at::Tensor& block_tables, const at::Tensor& context_lens,
                         const at::Tensor& counts, const at::Tensor& free_blocks, const at::Tensor& num_free,
                         int64_t block_size) {
  check_cuda(op, {{"block_tables", &block_tables}, {"context_lens", &context_lens}, {"counts", &counts},
                  {"free_blocks", &free_blocks}, {"num_free", &num_free}});
  const std::pair<const char*, const at::Tensor*> all[] = {{"block_tables", &block_tables},
                                                           {"context_lens", &context_lens},
                                                           {"num_new/num_rejected", &counts},
                                                           {"free_blocks", &free_blocks},
                                                           {"num_free", &num_free}};
  for (const auto& [name, t] : all) {
    check_dtype(op, name, *t, at::kInt);
    check_contiguous(op, name, *t);
  }
  TORCH_CHECK(block_tables.dim() == 2, op, ": block_tables must be [B, M]");  // [B, M]
  const int64_t B = block_tables.size(0);
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == B, op, ": context_lens must be [B]");  // [B]
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == B, op, ": per-row counts must be [B]");  // [B]
  TORCH_CHECK(free_blocks.dim() == 1, op, ": free_blocks must be [N]");                      // [N]
  TORCH_CHECK(num_free.numel() == 1, op, ": num_free must be [1]");                            // [1]
  TORCH_CHECK(block_size > 0, op, ": block_size must be positive, got ", block_size);
}

void reserve_paged_kv(at::Tensor& block_tables, at::Tensor& context_lens, const at::Tensor& num_new,
                      at::Tensor& free_blocks, at::Tensor& num_free, int64_t block_size) {
  check_tables("reserve_paged_kv", block_tables, context_lens, num_new, free_blocks, num_free, block_size);
  const c10::cuda::CUDAGuard guard(block_tables.device());
  C10_CUDA_CHECK(ReservePagedKV(block_tables.data_ptr<int>(), context_lens.const_data_ptr<int>(),
                                num_new.const_data_ptr<int>(), free_blocks.const_data_ptr<int>(),
                                num_free.data_ptr<int>(), block_tables.size(0), block_tables.size(1), block_size,
                                c10::cuda::getCurrentCUDAStream()));
}

void rollback_paged_kv(at::Tensor& block_tables, at::Tensor& context_lens, const at::Tensor& num_rejected,
                       at::Tensor& free_blocks, at::Tensor& num_free, int64_t block_size) {
  check_tables("rollback_paged_kv", block_tables, context_lens, num_rejected, free_blocks, num_free, block_size);
  const c10::cuda::CUDAGuard guard(block_tables.device());
  C10_CUDA_CHECK(RollbackPagedKV(block_tables.data_ptr<int>(), context_lens.data_ptr<int>(),
                                 num_rejected.const_data_ptr<int>(), free_blocks.data_ptr<int>(),
                                 num_free.data_ptr<int>(), block_tables.size(0), block_tables.size(1),
                                 free_blocks.size(0), block_size, c10::cuda::getCurrentCUDAStream()));
}

std::tuple<at::Tensor, at::Tensor> gather_paged_kv(const at::Tensor& key_cache, const at::Tensor& value_cache,
                                                   const at::Tensor& block_tables, const at::Tensor& context_lens) {
  constexpr const char* op = "gather_paged_kv";
  check_cuda(op, {{"key_cache", &key_cache}, {"value_cache", &value_cache}, {"block_tables", &block_tables},
                  {"context_lens", &context_lens}});
  // key_cache, value_cache: [num_blocks, block_size, H, D] contiguous, same dtype
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes(), op,
              ": caches must be [num_blocks, block_size, H, D] alike");
  TORCH_CHECK(value_cache.scalar_type() == key_cache.scalar_type(), op, ": cache dtypes differ");
  check_contiguous(op, "key_cache", key_cache);
  check_contiguous(op, "value_cache", value_cache);
  // block_tables: [B, M] int32; context_lens: [B] int32
  check_dtype(op, "block_tables", block_tables, at::kInt);
  check_dtype(op, "context_lens", context_lens, at::kInt);
  TORCH_CHECK(block_tables.dim() == 2 && context_lens.dim() == 1 && context_lens.size(0) == block_tables.size(0),
              op, ": block_tables must be [B, M] and context_lens [B]");
  const at::Tensor tables = block_tables.contiguous(), lens = context_lens.contiguous();
  const int64_t B = tables.size(0), H = key_cache.size(2), D = key_cache.size(3);
  TORCH_CHECK(B <= 65535, op, ": at most 65535 rows, got ", B);

  const c10::cuda::CUDAGuard guard(key_cache.device());
  // The dense length is data-dependent: one host read (this op is not for CUDA-graph capture).
  const int64_t L = B == 0 ? 0 : std::max<int64_t>(lens.max().item<int>(), 0);
  at::Tensor key_out = at::empty({B, L, H, D}, key_cache.options());
  at::Tensor value_out = at::empty({B, L, H, D}, value_cache.options());
  C10_CUDA_CHECK(GatherPagedKV(key_cache.const_data_ptr(), value_cache.const_data_ptr(), tables.const_data_ptr<int>(),
                               lens.const_data_ptr<int>(), key_out.data_ptr(), value_out.data_ptr(), B,
                               tables.size(1), L, key_cache.size(1), H * D * key_cache.element_size(),
                               c10::cuda::getCurrentCUDAStream()));
  return {key_out, value_out};
}

}  // namespace bild
