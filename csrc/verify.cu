// Torch layer of verify_draft: check inputs, allocate outputs and scratch, pick the stream, launch (verify.cuh).
#include <ATen/ops/empty.h>

#include <optional>

#include "torch_utils.h"
#include "verify.cuh"

namespace bild {

const float* check_row_params(const char* op, int64_t B, const at::Tensor& temperature, const at::Tensor& top_k,
                              const at::Tensor& top_p, const at::Tensor& seed, const at::Tensor& offset,
                              const std::optional<at::Tensor>& min_p);  // sampling.cu
int current_first_pass();  // sampling.cu
int device_sms();          // sampling.cu
const CutSplit* cut_split_scratch(int64_t R, int64_t D, const at::Tensor& like, at::Tensor& buf, CutSplit& split,
                                  int rows, bool verify);  // sampling.cu
int* fused_tail_counts(int64_t n, const at::Tensor& like, at::Tensor& buf, int rows, int first_pass,
                       bool verify);  // sampling.cu

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> verify_draft(
    const at::Tensor& draft_ids, const at::Tensor& target_logits, int64_t mode, const at::Tensor& rollback_threshold,
    const std::optional<at::Tensor>& draft_probs, const at::Tensor& temperature, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& seed, const at::Tensor& offset, const std::optional<at::Tensor>& min_p,
    int64_t rows) {
  constexpr const char* op = "verify_draft";
  TORCH_CHECK(rows >= 0 && rows <= kRowsUnknown, op, ": rows must be in [0, 7] (1: some row samples, 2: some row uses "
              "top-k / top-p / min-p, 4: the 2 is a guess), got ", rows);
  check_cuda(op, {{"target_logits", &target_logits}, {"draft_ids", &draft_ids},
                  {"rollback_threshold", &rollback_threshold}, {"temperature", &temperature}, {"top_k", &top_k},
                  {"top_p", &top_p}, {"seed", &seed}, {"offset", &offset},
                  {"min_p", min_p.has_value() ? &*min_p : &temperature}});
  TORCH_CHECK(mode == kModeGreedy || mode == kModeBild || mode == kModeSample, op,
              ": mode must be 0 (greedy), 1 (bild) or 2 (sample), got ", mode);
  // target_logits: [B, K+1, V] float16 / bfloat16 / float32 (float64 is computed in float32)
  TORCH_CHECK(target_logits.dim() == 3 && target_logits.size(1) >= 1 && target_logits.size(2) > 0, op,
              ": target_logits must be [B, K+1, V] with K >= 0, V > 0");
  const at::Tensor z =
      (target_logits.scalar_type() == at::kDouble ? target_logits.to(at::kFloat) : target_logits).contiguous();
  const int64_t B = z.size(0), K1 = z.size(1), K = K1 - 1, V = z.size(2);
  TORCH_CHECK(V < (1LL << 24) && B * K1 < (1LL << 31), op, ": V must be below 2^24 and B * (K+1) below 2^31");
  // draft_ids: [B, K] int64, each row's drafts then -1
  check_dtype(op, "draft_ids", draft_ids, at::kLong);
  TORCH_CHECK(draft_ids.dim() == 2 && draft_ids.size(0) == B && draft_ids.size(1) == K, op,
              ": draft_ids must be [B, K] = [", B, ", ", K, "], got ", draft_ids.sizes());
  const at::Tensor ids = draft_ids.contiguous();
  // rollback_threshold: [B] f32
  check_dtype(op, "rollback_threshold", rollback_threshold, at::kFloat);
  TORCH_CHECK(rollback_threshold.dim() == 1 && rollback_threshold.size(0) == B && rollback_threshold.is_contiguous(),
              op, ": rollback_threshold must be a contiguous [B] tensor");
  // temperature, top_p, min_p: [B] f32; top_k: [B] i32; seed, offset: [B] i64
  const float* min_p_ptr = check_row_params(op, B, temperature, top_k, top_p, seed, offset, min_p);
  // draft_probs: [B, K, V] any float dtype (read as f32), sample mode only
  at::Tensor probs;
  if (mode == kModeSample) {
    TORCH_CHECK(draft_probs.has_value(), op, ": mode 2 (sample) needs draft_probs [B, K, V]");
    check_cuda(op, {{"target_logits", &target_logits}, {"draft_probs", &*draft_probs}});
    TORCH_CHECK(draft_probs->dim() == 3 && draft_probs->size(0) == B && draft_probs->size(1) == K &&
                    draft_probs->size(2) == V,
                op, ": draft_probs must be [B, K, V], got ", draft_probs->sizes());
    probs = draft_probs->to(at::kFloat).contiguous();
  }

  const c10::cuda::CUDAGuard guard(z.device());
  const auto i32 = z.options().dtype(at::kInt), f32 = z.options().dtype(at::kFloat);
  at::Tensor num_accepted = at::empty({B}, i32);
  at::Tensor output_ids = at::empty({B, K1}, z.options().dtype(at::kLong));
  at::Tensor distances = at::empty({B, K}, f32), target_probs = at::empty({B, K1}, f32);
  at::Tensor scratch_i = at::empty({3, B * K1}, i32), scratch_f = at::empty({2, B * K1}, f32);  // see VerifyScratch
  const VerifyParams prm{rollback_threshold.const_data_ptr<float>(), temperature.const_data_ptr<float>(),
                         top_k.const_data_ptr<int>(),                top_p.const_data_ptr<float>(),
                         min_p_ptr,                                  seed.const_data_ptr<int64_t>(),
                         offset.const_data_ptr<int64_t>()};
  const VerifyOutputs out{num_accepted.data_ptr<int>(), output_ids.data_ptr<int64_t>(), distances.data_ptr<float>(),
                          target_probs.data_ptr<float>()};
  int* si = scratch_i.data_ptr<int>();
  float* sf = scratch_f.data_ptr<float>();
  const float* probs_ptr = probs.defined() ? probs.const_data_ptr<float>() : nullptr;
  at::Tensor split_buf;
  CutSplit split;
  const CutSplit* split_ptr = cut_split_scratch(B * K1, 0, z, split_buf, split, static_cast<int>(rows), true);
  dispatch_logits(op, z.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const int64_t n_partials = verify_partials<T>(B, K, V);
    TORCH_CHECK(n_partials < (1LL << 31), op, ": B * (K+1) * ceil(V / ", chunk_elems<T>(), ") must be below 2^31");
    const int64_t n_cut = verify_cut_partials<T>(B, V);  // RowPartial then CutPartial records, 8-byte aligned
    const int64_t words = (n_partials * static_cast<int64_t>(sizeof(RowPartial)) +
                           n_cut * static_cast<int64_t>(sizeof(CutPartial))) / 8;
    at::Tensor partials = at::empty({words}, z.options().dtype(at::kLong));
    char* base = reinterpret_cast<char*>(partials.data_ptr<int64_t>());
    const VerifyScratch scr{si, si + B * K1, si + 2 * B * K1, sf, sf + B * K1, reinterpret_cast<RowPartial*>(base),
                            reinterpret_cast<CutPartial*>(base + n_partials * sizeof(RowPartial))};
    const int first_pass = resolve_first_pass(current_first_pass(), B * (K + 1), static_cast<int>(V), sizeof(T),
                                              /*verify=*/true, device_sms());
    at::Tensor tail_buf;
    C10_CUDA_CHECK(VerifyDraft<T>(ids.const_data_ptr<int64_t>(), static_cast<const T*>(z.const_data_ptr()), probs_ptr,
                                  B, K, V, static_cast<int>(mode), prm, out, scr, c10::cuda::getCurrentCUDAStream(),
                                  first_pass, split_ptr, static_cast<int>(rows),
                                  fused_tail_counts(B * K1 + B, z, tail_buf, static_cast<int>(rows), first_pass,
                                                    true)));
  });
  return {num_accepted, output_ids, distances, target_probs};
}

}  // namespace bild
