// Helpers of the thin torch layer (the <op>.cu files): input checks and dtype dispatch.
// Deliberately light headers: every .cu that includes torch costs compile time, so no torch/extension.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <initializer_list>

namespace bild {

// Every tensor of an op on the CUDA device of the first; the message says what to use instead, since
// the dispatcher sends CPU calls here too (they are registered for CPU only to fail clearly).
inline void check_cuda(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  const at::Tensor& first = *tensors.begin()->second;
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t->is_cuda(), "bild_kernels_C::", op, " runs on CUDA tensors only, but ", name, " is on ",
                t->device(), "; use backend='triton' (TRITON_INTERPRET=1) or backend='ref' for CPU tensors");
    TORCH_CHECK(t->device() == first.device(), "bild_kernels_C::", op, ": ", name, " is on ", t->device(),
                " but ", tensors.begin()->first, " is on ", first.device());
  }
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, "bild_kernels_C::", op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), "bild_kernels_C::", op, ": ", name, " must be contiguous");
}

// Calls f(T{}) with T the CUDA type of a floating dtype. Logits kernels exist for the three dtypes a
// model emits; callers convert float64 to float32 first (the reference computes in fp32 too).
template <typename F>
void dispatch_logits(const char* op, at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "bild_kernels_C::", op, ": unsupported logits dtype ", st);
  }
}

// As dispatch_logits, plus float64 (KV-cache copies keep it).
template <typename F>
void dispatch_floating(const char* op, at::ScalarType st, F&& f) {
  if (st == at::kDouble) {
    f(double{});
  } else {
    dispatch_logits(op, st, f);
  }
}

}  // namespace bild
