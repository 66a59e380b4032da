// The CPU extension's kernels that other files of it call directly (one declaration each, here): the products
// (cpu_linear.cpp), the attention (cpu_attention.cpp), a whole decoder layer and its pieces (cpu_decoder_layer.cpp),
// a greedy row's statistics (cpu_sampling.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace bild {

bool cpu_linear_supported();  // AVX2 and FMA present
at::Tensor cpu_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
at::Tensor cpu_linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const std::optional<at::Tensor>& bias);
at::Tensor cpu_linear_q4_1(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& dm,
                           const std::optional<at::Tensor>& bias);
at::Tensor cpu_linear_q4_1x16(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& dm,
                              const std::optional<at::Tensor>& bias, int64_t activation_bits);
at::Tensor cpu_linear_q8_0x16(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& block_scale,
                              const std::optional<at::Tensor>& bias, int64_t activation_bits);
at::Tensor cpu_paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                               const at::Tensor& query_start_loc, const at::Tensor& positions,
                               const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                               int64_t sliding_window);
at::Tensor cpu_decoder_layer(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                             const at::Tensor& input_norm, const at::Tensor& qkv_w,
                             const std::optional<at::Tensor>& qkv_scale, const std::optional<at::Tensor>& qkv_bias,
                             const at::Tensor& o_w, const std::optional<at::Tensor>& o_scale,
                             const std::optional<at::Tensor>& o_bias, const at::Tensor& post_norm,
                             const at::Tensor& gate_up_w, const std::optional<at::Tensor>& gate_up_scale,
                             const std::optional<at::Tensor>& gate_up_bias, const at::Tensor& down_w,
                             const std::optional<at::Tensor>& down_scale, const std::optional<at::Tensor>& down_bias,
                             const at::Tensor& key_cache, const at::Tensor& value_cache,
                             const at::Tensor& slot_mapping, const at::Tensor& query_start_loc,
                             const at::Tensor& positions, const at::Tensor& block_tables,
                             const at::Tensor& context_lens, int64_t num_heads, int64_t num_kv_heads, double scale,
                             int64_t sliding_window, double eps, int64_t activation_bits,
                             const std::optional<at::Tensor>& q_norm = std::nullopt,
                             const std::optional<at::Tensor>& k_norm = std::nullopt,
                             const std::optional<at::Tensor>& attn_out_norm = std::nullopt,
                             const std::optional<at::Tensor>& mlp_out_norm = std::nullopt, int64_t activation = 0);

// x [M, K] @ W.T (+ bias) for a projection in any weight form cpu_decoder_layer takes (w, scale: see there).
at::Tensor project(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                   const std::optional<at::Tensor>& bias, int64_t activation_bits);

// One greedy row as cpu_sample_draft computes it (argmax, max probability, energy); false on a non-finite row.
bool greedy_row(const float* z, int64_t V, int64_t* argmax, float* max_prob, float* energy);

#if defined(__x86_64__) || defined(_M_X64)
// out[t] = w * (x[t] * (1 / sqrt(mean(x[t]^2) + eps))) for T rows of H (the executor's every CPU RMSNorm).
__attribute__((target("avx2,fma"))) void rms_norm(const float* x, const float* w, int64_t T, int64_t H, float eps,
                                                  float* out);
#endif

}  // namespace bild
