// Torch layer of apply_token_bitmask: check inputs, allocate the output, pick the current stream, launch
// (token_bitmask.cuh).
#include <ATen/ops/empty_like.h>

#include "token_bitmask.cuh"
#include "torch_utils.h"

namespace bild {

at::Tensor apply_token_bitmask(const at::Tensor& logits, const at::Tensor& bitmask) {
  constexpr const char* op = "apply_token_bitmask";
  check_cuda(op, {{"logits", &logits}, {"bitmask", &bitmask}});
  // logits: [..., V] float16 / bfloat16 / float32 / float64, contiguous
  TORCH_CHECK(logits.dim() >= 1 && logits.size(-1) > 0, op, ": logits must be [..., V] with V > 0");
  check_contiguous(op, "logits", logits);
  const int64_t V = logits.size(-1), W = (V + 31) / 32;
  // bitmask: [..., ceil(V / 32)] int32 with the logits' leading shape, contiguous
  check_dtype(op, "bitmask", bitmask, at::kInt);
  check_contiguous(op, "bitmask", bitmask);
  TORCH_CHECK(bitmask.dim() == logits.dim() &&
                  bitmask.sizes().slice(0, bitmask.dim() - 1).equals(logits.sizes().slice(0, logits.dim() - 1)),
              op, ": bitmask must have the logits' leading shape, got ", bitmask.sizes(), " for logits ",
              logits.sizes());
  TORCH_CHECK(bitmask.size(-1) == W, op, ": bitmask must hold ceil(V / 32) = ", W, " words a row, got ",
              bitmask.size(-1));
  TORCH_CHECK(V < (1LL << 31) - 32, op, ": V must be below 2^31 - 32, got ", V);

  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty_like(logits);
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floating(op, logits.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    C10_CUDA_CHECK(ApplyTokenBitmask<T>(static_cast<const T*>(logits.const_data_ptr()), bitmask.const_data_ptr<int>(),
                                        static_cast<T*>(out.data_ptr()), logits.numel() / V, static_cast<int>(V),
                                        stream));
  });
  return out;
}

}  // namespace bild
