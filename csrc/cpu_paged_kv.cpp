// reserve_paged_kv and rollback_paged_kv on CPU tensors: the block allocator's two table ops, exactly as
// their references (bild_kernels.reference.reserve_paged_kv_ref / rollback_paged_kv_ref) define them, as
// plain loops over the int32 tables. The references run the same loops in Python, one tensor element read at
// a time (~0.2 ms a call at batch 1, several calls per engine step on a CPU); here a call costs a few
// microseconds. Built into bild_kernels._cpu with cpu_linear.cpp; the "cpu" backend of these ops.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace bild {
namespace {

void check_state(const char* op, const at::Tensor& block_tables, const at::Tensor& context_lens,
                 const at::Tensor& counts, const at::Tensor& free_blocks, const at::Tensor& num_free,
                 int64_t block_size) {
  for (const at::Tensor* t : {&block_tables, &context_lens, &counts, &free_blocks, &num_free}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kInt && t->is_contiguous(), op,
                ": every tensor must be a contiguous int32 CPU tensor");
  }
  TORCH_CHECK(block_tables.dim() == 2, op, ": block_tables must be [B, M], got ", block_tables.sizes());
  const int64_t B = block_tables.size(0);
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == B && counts.dim() == 1 && counts.size(0) == B, op,
              ": context_lens and the counts must be [B=", B, "]");
  TORCH_CHECK(free_blocks.dim() == 1 && num_free.dim() == 1 && num_free.size(0) == 1, op,
              ": free_blocks must be [N] and num_free [1]");
  TORCH_CHECK(block_size > 0, op, ": block_size must be > 0, got ", block_size);
}

}  // namespace

void cpu_reserve_paged_kv(const at::Tensor& block_tables, const at::Tensor& context_lens, const at::Tensor& num_new,
                          const at::Tensor& free_blocks, const at::Tensor& num_free, int64_t block_size) {
  check_state("reserve_paged_kv", block_tables, context_lens, num_new, free_blocks, num_free, block_size);
  const int64_t B = block_tables.size(0), M = block_tables.size(1), N = free_blocks.size(0);
  int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* cl = context_lens.data_ptr<int32_t>();
  const int32_t* nn = num_new.data_ptr<int32_t>();
  const int32_t* fb = free_blocks.data_ptr<int32_t>();
  int32_t* nf = num_free.data_ptr<int32_t>();
  // First the demand (nothing changes on a shortfall), then the pops: rows in order, blocks from the top.
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    if (cl[b] < 0) continue;
    int64_t held = 0;
    for (int64_t j = 0; j < M; ++j) held += bt[b * M + j] >= 0;
    const int64_t want = (static_cast<int64_t>(cl[b]) + nn[b] + block_size - 1) / block_size;
    TORCH_CHECK(want <= M, "reserve_paged_kv: row ", b, " would need ", want, " blocks, its table holds ", M);
    total += std::max<int64_t>(want - held, 0);
  }
  const int64_t top = nf[0];
  TORCH_CHECK(0 <= top && top <= N, "reserve_paged_kv: num_free[0] = ", top, " outside [0, ", N, "]");
  if (total > top) {
    nf[0] = static_cast<int32_t>(-1 - (total - top));
    return;
  }
  int64_t ptr = top;
  for (int64_t b = 0; b < B; ++b) {
    if (cl[b] < 0) continue;
    int64_t held = 0;
    for (int64_t j = 0; j < M; ++j) held += bt[b * M + j] >= 0;
    const int64_t want = (static_cast<int64_t>(cl[b]) + nn[b] + block_size - 1) / block_size;
    for (int64_t j = held; j < want; ++j) bt[b * M + j] = fb[--ptr];
  }
  nf[0] = static_cast<int32_t>(ptr);
}

void cpu_rollback_paged_kv(const at::Tensor& block_tables, const at::Tensor& context_lens,
                           const at::Tensor& num_rejected, const at::Tensor& free_blocks, const at::Tensor& num_free,
                           int64_t block_size) {
  check_state("rollback_paged_kv", block_tables, context_lens, num_rejected, free_blocks, num_free, block_size);
  const int64_t B = block_tables.size(0), M = block_tables.size(1), N = free_blocks.size(0);
  int32_t* bt = block_tables.data_ptr<int32_t>();
  int32_t* cl = context_lens.data_ptr<int32_t>();
  const int32_t* nr = num_rejected.data_ptr<int32_t>();
  int32_t* fb = free_blocks.data_ptr<int32_t>();
  int32_t* nf = num_free.data_ptr<int32_t>();
  int64_t ptr = nf[0];
  TORCH_CHECK(0 <= ptr && ptr <= N, "rollback_paged_kv: num_free[0] = ", ptr, " outside [0, ", N, "]");
  for (int64_t b = 0; b < B; ++b) {
    if (cl[b] < 0) continue;
    const int64_t len = std::max<int64_t>(static_cast<int64_t>(cl[b]) - nr[b], 0);
    cl[b] = static_cast<int32_t>(len);
    for (int64_t j = (len + block_size - 1) / block_size; j < M; ++j) {
      const int32_t blk = bt[b * M + j];
      if (blk < 0) break;
      TORCH_CHECK(ptr < N, "rollback_paged_kv: the free stack overflows (a block returned twice?)");
      fb[ptr++] = blk;
      bt[b * M + j] = -1;
    }
  }
  nf[0] = static_cast<int32_t>(ptr);
}

}  // namespace bild

TORCH_LIBRARY_FRAGMENT(bild_kernels_cpu, m) {
  m.def("reserve_paged_kv(Tensor(a!) block_tables, Tensor(b!) context_lens, Tensor num_new, "
        "Tensor(c!) free_blocks, Tensor(d!) num_free, int block_size) -> ()");
  m.def("rollback_paged_kv(Tensor(a!) block_tables, Tensor(b!) context_lens, Tensor num_rejected, "
        "Tensor(c!) free_blocks, Tensor(d!) num_free, int block_size) -> ()");
}

TORCH_LIBRARY_IMPL(bild_kernels_cpu, CPU, m) {
  m.impl("reserve_paged_kv", &bild::cpu_reserve_paged_kv);
  m.impl("rollback_paged_kv", &bild::cpu_rollback_paged_kv);
}
