// apply_penalties on CPU tensors: the "cpu" backend of the op (bild_kernels/ops/_cpu_impls.py), exactly its
// reference's definition (bild_kernels.reference.apply_penalties_ref) without its dense [B, P, V] count tensors.
// Work split: one task per row (torch's threads over rows). A row's history (prompt then output, L ids) is sorted
// once into its distinct ids with their output counts and a prompt flag; each of its P positions copies its V logits
// (memcpy: untouched logits keep their bits), then rewrites only the distinct ids (plus the drafted ids before the
// position, plus the banned ids while min_tokens holds them back): O(P * (V + L + K + E)) a row instead of the
// reference's dozen passes over [B, P, V] in PyTorch ops (~1.8 ms for one row of 3 x 49,152 on the AMD EPYC).
// Arithmetic in float32 (float64 logits: float64), the reference's order: the logit bias, repetition, frequency,
// presence.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "cpu_penalties.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace bild {

namespace {

template <typename scalar_t, typename acc_t>
void penalize_row(const scalar_t* in, scalar_t* out, int64_t P, int64_t V, const int64_t* ids, int64_t L,
                  int64_t prompt_len, const int64_t* draft, int64_t K, acc_t r, acc_t presence, acc_t frequency,
                  int64_t min_tokens, const int64_t* banned, int64_t E, const int64_t* bias_ids,
                  const double* bias_values, int64_t E2) {
  const std::vector<SeenToken> base = penalty_history(ids, L, prompt_len);
  const std::vector<LogitBias> bias = logit_biases(bias_ids, bias_values, E2);
  int64_t n_out = 0;
  for (int64_t j = prompt_len; j < L; ++j) n_out += ids[j] >= 0;
  std::vector<SeenToken> seen;
  for (int64_t p = 0; p < P; ++p) {
    const scalar_t* zin = in + p * V;
    scalar_t* zout = out + p * V;
    std::memcpy(zout, zin, sizeof(scalar_t) * V);
    seen = base;
    for (int64_t j = 0; j < std::min(p, K); ++j) penalty_add(seen, draft[j]);  // the drafts before p: output
    for (const LogitBias& x : bias)  // (the seen ones are rewritten below from the same biased value)
      zout[x.id] = static_cast<scalar_t>(static_cast<acc_t>(zin[x.id]) + static_cast<acc_t>(x.value));
    for (const SeenToken& s : seen) {
      acc_t z = static_cast<acc_t>(zin[s.id]);
      if (const LogitBias* x = bias_of(bias, s.id)) z = z + static_cast<acc_t>(x->value);
      zout[s.id] = static_cast<scalar_t>(penalize_logit(z, s, r, presence, frequency));
    }
    if (n_out + p < min_tokens)
      for (int64_t e = 0; e < E; ++e)
        if (banned[e] >= 0) zout[banned[e]] = static_cast<scalar_t>(-std::numeric_limits<acc_t>::infinity());
  }
}

}  // namespace

at::Tensor cpu_apply_penalties(const at::Tensor& logits, const at::Tensor& token_ids, const at::Tensor& prompt_lens,
                               const at::Tensor& draft_ids, const at::Tensor& repetition_penalty,
                               const at::Tensor& presence_penalty, const at::Tensor& frequency_penalty,
                               const at::Tensor& min_tokens, const at::Tensor& banned_ids,
                               const at::Tensor& bias_ids, const at::Tensor& bias_values) {
  // logits [B, P, V] float16 / bfloat16 / float32 / float64; token_ids [B, L] int64; prompt_lens [B] int32;
  // draft_ids [B, P-1] int64; repetition / presence / frequency_penalty [B] float64; min_tokens [B] int32;
  // banned_ids [B, E] int64. All contiguous CPU tensors; ids already checked against V by the Python op.
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 3 && logits.is_contiguous(),
              "cpu_apply_penalties: logits must be a contiguous [B, P, V] CPU tensor");
  const int64_t B = logits.size(0), P = logits.size(1), V = logits.size(2);
  TORCH_CHECK(token_ids.scalar_type() == at::kLong && token_ids.dim() == 2 && token_ids.size(0) == B &&
                  token_ids.is_contiguous(), "cpu_apply_penalties: token_ids must be contiguous [B, L] int64");
  TORCH_CHECK(draft_ids.scalar_type() == at::kLong && draft_ids.dim() == 2 && draft_ids.size(0) == B &&
                  draft_ids.size(1) == P - 1 && draft_ids.is_contiguous(),
              "cpu_apply_penalties: draft_ids must be contiguous [B, P-1] int64");
  TORCH_CHECK(banned_ids.scalar_type() == at::kLong && banned_ids.dim() == 2 && banned_ids.size(0) == B &&
                  banned_ids.is_contiguous(), "cpu_apply_penalties: banned_ids must be contiguous [B, E] int64");
  TORCH_CHECK(prompt_lens.scalar_type() == at::kInt && min_tokens.scalar_type() == at::kInt &&
                  prompt_lens.numel() == B && min_tokens.numel() == B,
              "cpu_apply_penalties: prompt_lens and min_tokens must be [B] int32");
  TORCH_CHECK(bias_ids.scalar_type() == at::kLong && bias_ids.dim() == 2 && bias_ids.size(0) == B &&
                  bias_ids.is_contiguous() && bias_values.scalar_type() == at::kDouble &&
                  bias_values.sizes() == bias_ids.sizes() && bias_values.is_contiguous(),
              "cpu_apply_penalties: bias_ids / bias_values must be contiguous [B, E'] int64 / float64");
  for (const at::Tensor* t : {&repetition_penalty, &presence_penalty, &frequency_penalty})
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->numel() == B && t->is_contiguous(),
                "cpu_apply_penalties: the penalties must be [B] float64");
  at::Tensor out = at::empty_like(logits);
  const int64_t L = token_ids.size(1), K = P - 1, E = banned_ids.size(1), E2 = bias_ids.size(1);
  const int64_t* bids = bias_ids.data_ptr<int64_t>();
  const double* bvals = bias_values.data_ptr<double>();
  const int64_t* ids = token_ids.data_ptr<int64_t>();
  const int64_t* draft = draft_ids.data_ptr<int64_t>();
  const int64_t* banned = banned_ids.data_ptr<int64_t>();
  const int32_t* plen = prompt_lens.data_ptr<int32_t>();
  const int32_t* mint = min_tokens.data_ptr<int32_t>();
  const double* rep = repetition_penalty.data_ptr<double>();
  const double* pres = presence_penalty.data_ptr<double>();
  const double* freq = frequency_penalty.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cpu_apply_penalties", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* in = logits.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        penalize_row<scalar_t, acc_t>(in + b * P * V, o + b * P * V, P, V, ids + b * L, L, plen[b], draft + b * K,
                                      K, static_cast<acc_t>(rep[b]), static_cast<acc_t>(pres[b]),
                                      static_cast<acc_t>(freq[b]), mint[b], banned + b * E, E, bids + b * E2,
                                      bvals + b * E2, E2);
    });
  });
  return out;
}

}  // namespace bild

TORCH_LIBRARY_FRAGMENT(bild_kernels_cpu, m) {
  m.def("apply_penalties(Tensor logits, Tensor token_ids, Tensor prompt_lens, Tensor draft_ids, "
        "Tensor repetition_penalty, Tensor presence_penalty, Tensor frequency_penalty, Tensor min_tokens, "
        "Tensor banned_ids, Tensor bias_ids, Tensor bias_values) -> Tensor");
}

TORCH_LIBRARY_IMPL(bild_kernels_cpu, CPU, m) { m.impl("apply_penalties", &bild::cpu_apply_penalties); }
