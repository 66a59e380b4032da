// apply_token_bitmask on CPU tensors: the "cpu" backend of the op (bild_kernels/ops/_cpu_impls.py), exactly its
// reference's definition (bild_kernels.reference.apply_token_bitmask_ref) without its [..., V] bool mask.
// Work split: the logits [..., V] as R rows of V, a task per run of rows (torch's threads over rows); a row is one
// pass over its ceil(V / 32) words, each word's 32 logits copied (all allowed), filled with -inf (none) or selected
// bit by bit, branchless (csrc/cpu_token_bitmask.h). It only selects, on the logits' bits: the allowed keep theirs.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "cpu_token_bitmask.h"

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace bild {

at::Tensor cpu_apply_token_bitmask(const at::Tensor& logits, const at::Tensor& bitmask) {
  // logits [..., V] float16 / bfloat16 / float32 / float64; bitmask [..., ceil(V / 32)] int32 with the logits'
  // leading shape. Both contiguous CPU tensors.
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() >= 1 && logits.size(-1) > 0 && logits.is_contiguous(),
              "cpu_apply_token_bitmask: logits must be a contiguous [..., V] CPU tensor with V > 0");
  const int64_t V = logits.size(-1), W = (V + 31) / 32;
  TORCH_CHECK(bitmask.device().is_cpu() && bitmask.scalar_type() == at::kInt && bitmask.is_contiguous() &&
                  bitmask.dim() == logits.dim() && bitmask.size(-1) == W &&
                  bitmask.sizes().slice(0, bitmask.dim() - 1).equals(logits.sizes().slice(0, logits.dim() - 1)),
              "cpu_apply_token_bitmask: bitmask must be a contiguous [..., ceil(V / 32)] int32 CPU tensor with the "
              "logits' leading shape");
  at::Tensor out = at::empty_like(logits);
  const int64_t R = logits.numel() / V;
  const int32_t* words = bitmask.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cpu_apply_token_bitmask", [&] {
    // the logits as unsigned integers of their width: the kernel only selects
    using U = std::conditional_t<sizeof(scalar_t) == 2, uint16_t,
                                 std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>>;
    const scalar_t neg_inf_value = static_cast<scalar_t>(-std::numeric_limits<float>::infinity());
    U neg_inf;
    std::memcpy(&neg_inf, &neg_inf_value, sizeof(U));
    const U* in = reinterpret_cast<const U*>(logits.data_ptr<scalar_t>());
    U* o = reinterpret_cast<U*>(out.data_ptr<scalar_t>());
    // a task of at least ~64k logits: one row of a small vocabulary is too little work to hand to a thread
    at::parallel_for(0, R, std::max<int64_t>(1, 65536 / V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) mask_row<U>(in + r * V, words + r * W, o + r * V, V, neg_inf);
    });
  });
  return out;
}

}  // namespace bild

TORCH_LIBRARY_FRAGMENT(bild_kernels_cpu, m) { m.def("apply_token_bitmask(Tensor logits, Tensor bitmask) -> Tensor"); }

TORCH_LIBRARY_IMPL(bild_kernels_cpu, CPU, m) { m.impl("apply_token_bitmask", &bild::cpu_apply_token_bitmask); }
