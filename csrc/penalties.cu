// Torch layer of apply_penalties: check inputs, allocate the output and scratch, pick the current stream, launch
// (penalties.cuh).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <utility>

#include "penalties.cuh"
#include "torch_utils.h"

namespace bild {

at::Tensor apply_penalties(const at::Tensor& logits, const at::Tensor& token_ids, const at::Tensor& prompt_lens,
                           const at::Tensor& draft_ids, const at::Tensor& repetition_penalty,
                           const at::Tensor& presence_penalty, const at::Tensor& frequency_penalty,
                           const at::Tensor& min_tokens, const at::Tensor& banned_ids, const at::Tensor& bias_ids,
                           const at::Tensor& bias_values) {
  constexpr const char* op = "apply_penalties";
  check_cuda(op, {{"logits", &logits}, {"token_ids", &token_ids}, {"prompt_lens", &prompt_lens},
                  {"draft_ids", &draft_ids}, {"repetition_penalty", &repetition_penalty},
                  {"presence_penalty", &presence_penalty}, {"frequency_penalty", &frequency_penalty},
                  {"min_tokens", &min_tokens}, {"banned_ids", &banned_ids}, {"bias_ids", &bias_ids},
                  {"bias_values", &bias_values}});
  // logits: [B, P, V] float16 / bfloat16 / float32 / float64, contiguous
  TORCH_CHECK(logits.dim() == 3 && logits.size(1) > 0 && logits.size(2) > 0, op,
              ": logits must be [B, P, V] with P, V > 0");
  check_contiguous(op, "logits", logits);
  const int64_t B = logits.size(0), P = logits.size(1), V = logits.size(2);
  // token_ids: [B, L] int64 (-1 pads)
  check_dtype(op, "token_ids", token_ids, at::kLong);
  check_contiguous(op, "token_ids", token_ids);
  TORCH_CHECK(token_ids.dim() == 2 && token_ids.size(0) == B, op, ": token_ids must be [B, L]");
  const int64_t L = token_ids.size(1);
  // draft_ids: [B, P-1] int64 (-1 pads)
  check_dtype(op, "draft_ids", draft_ids, at::kLong);
  check_contiguous(op, "draft_ids", draft_ids);
  TORCH_CHECK(draft_ids.dim() == 2 && draft_ids.size(0) == B && draft_ids.size(1) == P - 1, op,
              ": draft_ids must be [B, P-1]");
  // banned_ids: [B, E] int64 (-1 pads)
  check_dtype(op, "banned_ids", banned_ids, at::kLong);
  check_contiguous(op, "banned_ids", banned_ids);
  TORCH_CHECK(banned_ids.dim() == 2 && banned_ids.size(0) == B, op, ": banned_ids must be [B, E]");
  // bias_ids: [B, E2] int64 (-1 pads), bias_values: [B, E2] float64
  check_dtype(op, "bias_ids", bias_ids, at::kLong);
  check_contiguous(op, "bias_ids", bias_ids);
  TORCH_CHECK(bias_ids.dim() == 2 && bias_ids.size(0) == B, op, ": bias_ids must be [B, E2]");
  check_dtype(op, "bias_values", bias_values, at::kDouble);
  check_contiguous(op, "bias_values", bias_values);
  TORCH_CHECK(bias_values.sizes() == bias_ids.sizes(), op, ": bias_values must have bias_ids' shape [B, E2]");
  // prompt_lens, min_tokens: [B] int32
  const std::pair<const char*, const at::Tensor*> lens[] = {{"prompt_lens", &prompt_lens},
                                                            {"min_tokens", &min_tokens}};
  for (const auto& [name, t] : lens) {
    check_dtype(op, name, *t, at::kInt);
    check_contiguous(op, name, *t);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, op, ": ", name, " must be [B]");
  }
  // repetition_penalty, presence_penalty, frequency_penalty: [B] float64
  const std::pair<const char*, const at::Tensor*> penalties[] = {{"repetition_penalty", &repetition_penalty},
                                                                 {"presence_penalty", &presence_penalty},
                                                                 {"frequency_penalty", &frequency_penalty}};
  for (const auto& [name, t] : penalties) {
    check_dtype(op, name, *t, at::kDouble);
    check_contiguous(op, name, *t);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, op, ": ", name, " must be [B]");
  }
  TORCH_CHECK(B <= 65535, op, ": at most 65535 rows, got ", B);
  TORCH_CHECK(V < (1LL << 31) && P < (1LL << 31) && banned_ids.size(1) < (1LL << 31) &&
                  bias_ids.size(1) < (1LL << 31), op, ": V, P, E and E2 must be below 2^31");
  TORCH_CHECK(L < kPromptBit, op, ": token_ids may hold at most 2^30 - 1 tokens a row, got ", L);

  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty_like(logits);
  if (out.numel() == 0) return out;
  at::Tensor scratch = at::empty({B * V + B}, logits.options().dtype(at::kInt));  // histograms [B, V], n_out [B]
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floating(op, logits.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    C10_CUDA_CHECK(ApplyPenalties<T>(
        static_cast<const T*>(logits.const_data_ptr()), static_cast<T*>(out.data_ptr()),
        token_ids.const_data_ptr<int64_t>(), prompt_lens.const_data_ptr<int>(), draft_ids.const_data_ptr<int64_t>(),
        repetition_penalty.const_data_ptr<double>(), presence_penalty.const_data_ptr<double>(),
        frequency_penalty.const_data_ptr<double>(), min_tokens.const_data_ptr<int>(),
        banned_ids.const_data_ptr<int64_t>(), bias_ids.const_data_ptr<int64_t>(), bias_values.const_data_ptr<double>(),
        scratch.data_ptr<int>(), B, P, L, V, banned_ids.size(1), bias_ids.size(1), stream));
  });
  return out;
}

}  // namespace bild
