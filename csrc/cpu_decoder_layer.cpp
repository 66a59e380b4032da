// cpu_decoder_layer: one Llama-family decoder layer over T new tokens (decode, a verify pass, a draft step),
// float32 activations on x86 CPUs with AVX2 and FMA: the executor's CPU layer for passes of up to 16 tokens
// (bild_kernels.models.llama; its reference twin is reference.cpu_decoder_layer_ref, the same steps in PyTorch).
//
// Why: at decode sizes a layer's arithmetic outside its four matrix products is tiny, but written as PyTorch
// ops it is ~30 dispatches of a few microseconds each plus the Python around them: ~0.4 ms a layer, 10-12 ms
// of a 30-layer CPU decode step whose weights stream in ~45 ms. Here the whole layer is one call: RMSNorm,
// the fused q/k/v product, RoPE, the K/V write into the paged cache (slot -1 skipped), paged attention, the
// output product and residual, RMSNorm, the fused gate/up product, SiLU(gate) * up, the down product and
// residual. The products and the attention are the extension's own kernels (cpu_linear / cpu_linear_int8,
// cpu_paged_attention), called directly.
//
// Semantics, per token row (rows are independent but for attention, which reads each sequence's cache):
//   h = in_norm * (x * rsqrt(mean(x^2) + eps)); qkv = h @ Wqkv^T (+ b); with q_norm / k_norm (Qwen3) every q and
//   k head RMS-normalised alike over its D values; q, k rotated by (cos, sin) in the rotate-half convention
//   (cos/sin [T, D] already scaled); k, v written to slot_mapping[t];
//   x1 = x + attention(q) @ Wo^T (+ b); h2 = post_norm * (x1 * rsqrt(mean(x1^2) + eps));
//   [g, u] = h2 @ Wgu^T (+ b); out = x1 + (silu(g) * u) @ Wd^T (+ b).
//   Gemma's form: attn_out_norm / mlp_out_norm RMS-normalise the attention's and the MLP's outputs before their
//   residual adds, activation 1 is gelu_tanh instead of silu (its (1 + w) norm weights come precomputed).
// Weights are float32 [N, K] (scale None), int8 with a float32 per-row scale (w ~= q * scale), or Q4_1 blocks
// (uint8 [N, K / 2] with dm [N, K / 32, 2] as the scale: cpu_linear_q4_1, the same bits as their float32 weights),
// or Q4_1 blocks packed for integer activations (uint8 [N / 16, K / 32, 4, 16, 4] with dm [N / 16, K / 32, 2, 16]:
// cpu_linear_q4_1x16), or Q8_0 blocks packed alike (int8 [N / 16, K / 32, 16, 16, 2] with a [N / 16, K / 32, 16]
// block scale: cpu_linear_q8_0x16); packed weights round the activations to int16 (activation_bits = 16) or
// int8 (8) per run of 32.
// Everything per row is computed in a fixed order that depends on nothing but the row (and, for attention,
// its sequence's cache), so a token's output is the same bits in a pass of one or of sixteen tokens.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu_ops.h"
#include "cpu_simd.h"  // reduce_lanes; defines BILD_X86 on x86-64

namespace bild {

// The product of one projection in any of the weight forms above (cpu_ops.h).
at::Tensor project(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                   const std::optional<at::Tensor>& bias, int64_t activation_bits) {
  if (!scale.has_value()) return cpu_linear(x, w, bias);
  if (w.dim() == 5) {  // packed 16 rows a register, for integer activations
    return w.scalar_type() == at::kByte ? cpu_linear_q4_1x16(x, w, *scale, bias, activation_bits)
                                        : cpu_linear_q8_0x16(x, w, *scale, bias, activation_bits);
  }
  if (w.scalar_type() != at::kByte) return cpu_linear_int8(x, w, *scale, bias);
  return cpu_linear_q4_1(x, w, *scale, bias);
}

#ifdef BILD_X86
// out[t] = w * (x[t] * (1 / sqrt(mean(x[t]^2) + eps))): the sum of squares in 8 lanes (k = j, j + 8, ...),
// reduced in reduce_lanes' fixed tree, then the tail in order.
// (shared with cpu_feature_draft.cpp: the executor's every CPU RMSNorm then rounds alike)
__attribute__((target("avx2,fma"))) void rms_norm(const float* x, const float* w, int64_t T, int64_t H, float eps,
                                                  float* out) {
  const int64_t H8 = H & ~int64_t{7};
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * H;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < H8; k += 8) {
      const __m256 v = _mm256_loadu_ps(xr + k);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = reduce_lanes(acc);
    for (int64_t k = H8; k < H; ++k) ss = std::fma(xr[k], xr[k], ss);
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
    for (int64_t k = 0; k < H; ++k) out[t * H + k] = w[k] * (xr[k] * inv);
  }
}
#endif

namespace {

#ifdef BILD_X86
// a[i] = silu(g[i]) * u[i] = g / (1 + e^-g) * u, 8 lanes at a time (exp8), the I mod 8 tail with std::exp.
__attribute__((target("avx2,fma"))) void silu_mul(const float* g, const float* u, float* a, int64_t I) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gv))));
    _mm256_storeu_ps(a + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
  for (; i < I; ++i) a[i] = (g[i] / (1.0f + std::exp(-g[i]))) * u[i];
}

// a = gelu_tanh(g) * u (Gemma's GeGLU): 0.5 g (1 + tanh(c (g + 0.044715 g^3))) = g * sigmoid(2 c (g + 0.044715 g^3)),
// c = sqrt(2 / pi), written as the sigmoid so that a large |g| gives g or -0 (no inf / inf).
__attribute__((target("avx2,fma"))) void gelu_tanh_mul(const float* g, const float* u, float* a, int64_t I) {
  constexpr float k2c = 2.0f * 0.7978845608028654f, cubic = 0.044715f;
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps(), vk = _mm256_set1_ps(k2c),
               vc = _mm256_set1_ps(cubic);
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 inner = _mm256_mul_ps(vk, _mm256_fmadd_ps(_mm256_mul_ps(vc, gv), _mm256_mul_ps(gv, gv), gv));
    const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, inner))));
    _mm256_storeu_ps(a + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
  for (; i < I; ++i) {
    const float inner = k2c * std::fma(cubic * g[i], g[i] * g[i], g[i]);
    a[i] = (g[i] / (1.0f + std::exp(-inner))) * u[i];
  }
}
#endif

void check_weight(const char* name, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& bias, int64_t N, int64_t K) {
  if (w.scalar_type() == at::kChar && w.dim() == 5) {  // Q8_0 blocks packed for integer activations (q8_0x16_pack)
    TORCH_CHECK(K % 32 == 0 && N % 16 == 0 && w.device().is_cpu() && w.size(0) == N / 16 && w.size(1) == K / 32 &&
                    w.size(2) == 16 && w.size(3) == 16 && w.size(4) == 2 && w.is_contiguous() && scale.has_value() &&
                    scale->dim() == 3 && scale->size(0) == N / 16 && scale->size(1) == K / 32 && scale->size(2) == 16,
                "cpu_decoder_layer: ", name, " as packed Q8_0 must be a contiguous int8 [", N / 16, ", ", K / 32,
                ", 16, 16, 2] CPU tensor with a [", N / 16, ", ", K / 32, ", 16] block scale, got ", w.sizes());
    if (bias.has_value()) {
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "cpu_decoder_layer: ", name, " bias must be [", N, "]");
    }
    return;
  }
  if (w.scalar_type() == at::kByte && w.dim() == 5) {  // Q4_1 blocks packed for integer activations (q4_1x16_pack)
    TORCH_CHECK(K % 32 == 0 && N % 16 == 0 && w.device().is_cpu() && w.size(0) == N / 16 && w.size(1) == K / 32 &&
                    w.size(2) == 4 && w.size(3) == 16 && w.size(4) == 4 && w.is_contiguous() && scale.has_value() &&
                    scale->dim() == 4 && scale->size(0) == N / 16 && scale->size(1) == K / 32 &&
                    scale->size(2) == 2 && scale->size(3) == 16,
                "cpu_decoder_layer: ", name, " as packed Q4_1 must be a contiguous uint8 [", N / 16, ", ", K / 32,
                ", 4, 16, 4] CPU tensor with a [", N / 16, ", ", K / 32, ", 2, 16] dm, got ", w.sizes());
    if (bias.has_value()) {
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "cpu_decoder_layer: ", name, " bias must be [", N, "]");
    }
    return;
  }
  if (w.scalar_type() == at::kByte) {  // Q4_1 blocks: [N, K / 2] nibbles, scale = dm [N, K / 32, 2]
    TORCH_CHECK(K % 32 == 0 && w.device().is_cpu() && w.dim() == 2 && w.size(0) == N && w.size(1) == K / 2 &&
                    w.is_contiguous() && scale.has_value() && scale->dim() == 3 && scale->size(0) == N &&
                    scale->size(1) == K / 32 && scale->size(2) == 2,
                "cpu_decoder_layer: ", name, " as Q4_1 must be a contiguous uint8 [", N, ", ", K / 2,
                "] CPU tensor with a [", N, ", ", K / 32, ", 2] dm (K a multiple of 32), got ", w.sizes());
    if (bias.has_value()) {
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "cpu_decoder_layer: ", name, " bias must be [", N, "]");
    }
    return;
  }
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.size(0) == N && w.size(1) == K && w.is_contiguous(),
              "cpu_decoder_layer: ", name, " must be a contiguous [", N, ", ", K, "] CPU tensor, got ", w.sizes());
  if (scale.has_value()) {
    TORCH_CHECK(w.scalar_type() == at::kChar, "cpu_decoder_layer: ", name, " with a scale must be int8");
  } else {
    TORCH_CHECK(w.scalar_type() == at::kFloat, "cpu_decoder_layer: ", name, " must be float32 (or int8 with a scale)");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "cpu_decoder_layer: ", name, " bias must be [", N, "]");
  }
}

void check_vector(const char* name, const at::Tensor& v, int64_t n) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == at::kFloat && v.dim() == 1 && v.size(0) == n &&
                  v.is_contiguous(),
              "cpu_decoder_layer: ", name, " must be a contiguous float32 [", n, "] CPU tensor");
}

}  // namespace

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
                             const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                             const std::optional<at::Tensor>& attn_out_norm,
                             const std::optional<at::Tensor>& mlp_out_norm, int64_t activation) {
  TORCH_CHECK(cpu_linear_supported(), "cpu_decoder_layer: this CPU lacks AVX2/FMA (use the reference)");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "cpu_decoder_layer: x must be a contiguous float32 [T, hidden] CPU tensor");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(T >= 1, "cpu_decoder_layer: x must have at least one row");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.scalar_type() == at::kFloat && key_cache.is_contiguous() &&
                  value_cache.sizes() == key_cache.sizes() && value_cache.scalar_type() == at::kFloat &&
                  value_cache.is_contiguous(),
              "cpu_decoder_layer: key_cache and value_cache must be contiguous float32 [blocks, block_size, "
              "H_kv, D] tensors of one shape");
  const int64_t D = key_cache.size(3), Hq = num_heads, Hkv = num_kv_heads;
  TORCH_CHECK(Hq >= 1 && Hkv >= 1 && Hq % Hkv == 0 && key_cache.size(2) == Hkv && D % 2 == 0,
              "cpu_decoder_layer: num_heads must be a multiple of num_kv_heads = key_cache.size(2), and the head "
              "dim even");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.dim() == 2 &&
                  cos.size(0) == T && cos.size(1) == D && sin.sizes() == cos.sizes() && cos.is_contiguous() &&
                  sin.is_contiguous(),
              "cpu_decoder_layer: cos and sin must be contiguous float32 [T, head_dim]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.size(0) == T &&
                  slot_mapping.is_contiguous(),
              "cpu_decoder_layer: slot_mapping must be a contiguous int64 [T] tensor");
  TORCH_CHECK(activation_bits == 8 || activation_bits == 16,
              "cpu_decoder_layer: activation_bits must be 8 or 16, got ", activation_bits);
  const int64_t qkv_n = (Hq + 2 * Hkv) * D;
  check_vector("input_norm", input_norm, H);
  check_vector("post_norm", post_norm, H);
  check_weight("qkv", qkv_w, qkv_scale, qkv_bias, qkv_n, H);
  check_weight("o", o_w, o_scale, o_bias, H, Hq * D);
  // gate_up's rows 2 I: its first dimension, or 16 of them a group when packed for integer activations (5-D)
  const int64_t gu_rows = gate_up_w.dim() == 5 ? gate_up_w.size(0) * 16 : gate_up_w.size(0);
  TORCH_CHECK((gate_up_w.dim() == 2 || gate_up_w.dim() == 5) && gu_rows % 2 == 0,
              "cpu_decoder_layer: gate_up must be [2 I, hidden] (or packed Q4_1 / Q8_0)");
  const int64_t I = gu_rows / 2;
  check_weight("gate_up", gate_up_w, gate_up_scale, gate_up_bias, 2 * I, H);
  check_weight("down", down_w, down_scale, down_bias, H, I);
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(),
              "cpu_decoder_layer: q_norm and k_norm come together (Qwen3's per-head norms)");
  if (q_norm.has_value()) {
    check_vector("q_norm", *q_norm, D);
    check_vector("k_norm", *k_norm, D);
  }
  if (attn_out_norm.has_value()) check_vector("attn_out_norm", *attn_out_norm, H);
  if (mlp_out_norm.has_value()) check_vector("mlp_out_norm", *mlp_out_norm, H);
  TORCH_CHECK(activation == 0 || activation == 1,
              "cpu_decoder_layer: activation must be 0 (silu) or 1 (gelu_tanh), got ", activation);
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(slots[t] >= -1 && slots[t] < num_slots, "cpu_decoder_layer: slot_mapping[", t, "] = ", slots[t],
                " is outside [-1, ", num_slots, ")");
  }
  at::Tensor out = at::empty({T, H}, x.options());
#ifdef BILD_X86
  const float fe = static_cast<float>(eps);
  at::Tensor h = at::empty({T, H}, x.options());
  rms_norm(x.data_ptr<float>(), input_norm.data_ptr<float>(), T, H, fe, h.data_ptr<float>());
  const at::Tensor qkv = project(h, qkv_w, qkv_scale, qkv_bias, activation_bits);  // [T, (Hq + 2 Hkv) D]
  at::Tensor q = at::empty({T, Hq, D}, x.options());
  {
    const float* src = qkv.data_ptr<float>();
    const float* c = cos.data_ptr<float>();
    const float* s = sin.data_ptr<float>();
    float* qd = q.data_ptr<float>();
    float* kc = key_cache.data_ptr<float>();
    float* vc = value_cache.data_ptr<float>();
    const int64_t half = D / 2;
    const float* qn = q_norm.has_value() ? q_norm->data_ptr<float>() : nullptr;
    const float* kn = k_norm.has_value() ? k_norm->data_ptr<float>() : nullptr;
    std::vector<float> normed(qn != nullptr ? D : 0);  // a head after its RMSNorm (Qwen3), before RoPE
    for (int64_t t = 0; t < T; ++t) {
      const float* row = src + t * qkv_n;
      const float* ct = c + t * D;
      const float* st = s + t * D;
      // heads 0..Hq-1 are q (to q), Hq..Hq+Hkv-1 are k (to the cache slot); x*cos + rotate_half(x)*sin
      for (int64_t head = 0; head < Hq + Hkv; ++head) {
        float* dst;
        if (head < Hq) {
          dst = qd + (t * Hq + head) * D;
        } else if (slots[t] >= 0) {
          dst = kc + (slots[t] * Hkv + (head - Hq)) * D;
        } else {
          continue;
        }
        const float* xh = row + head * D;
        if (qn != nullptr) {
          rms_norm(xh, head < Hq ? qn : kn, 1, D, fe, normed.data());
          xh = normed.data();
        }
        for (int64_t d = 0; d < half; ++d) {
          const float a = xh[d] * ct[d];
          const float b = -xh[d + half] * st[d];
          dst[d] = a + b;
        }
        for (int64_t d = half; d < D; ++d) {
          const float a = xh[d] * ct[d];
          const float b = xh[d - half] * st[d];
          dst[d] = a + b;
        }
      }
      if (slots[t] >= 0) {
        const float* v = row + (Hq + Hkv) * D;
        std::copy(v, v + Hkv * D, vc + slots[t] * Hkv * D);
      }
    }
  }
  const at::Tensor attn = cpu_paged_attention(q, key_cache, value_cache, query_start_loc, positions, block_tables,
                                              context_lens, scale, sliding_window);  // [T, Hq, D]
  const at::Tensor o = project(attn.view({T, Hq * D}), o_w, o_scale, o_bias, activation_bits);
  at::Tensor x1 = at::empty({T, H}, x.options());
  if (attn_out_norm.has_value()) {  // Gemma: the attention's output normed before its residual add
    rms_norm(o.data_ptr<float>(), attn_out_norm->data_ptr<float>(), T, H, fe, h.data_ptr<float>());
    std::copy(h.data_ptr<float>(), h.data_ptr<float>() + T * H, o.data_ptr<float>());
  }
  {
    const float* xa = x.data_ptr<float>();
    const float* ob = o.data_ptr<float>();
    float* x1d = x1.data_ptr<float>();
    for (int64_t i = 0; i < T * H; ++i) x1d[i] = xa[i] + ob[i];
  }
  rms_norm(x1.data_ptr<float>(), post_norm.data_ptr<float>(), T, H, fe, h.data_ptr<float>());
  const at::Tensor gu = project(h, gate_up_w, gate_up_scale, gate_up_bias, activation_bits);  // [T, 2 I]: gate, then up
  at::Tensor act = at::empty({T, I}, x.options());
  {
    const float* g = gu.data_ptr<float>();
    float* a = act.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
      if (activation == 1) {
        gelu_tanh_mul(g + t * 2 * I, g + t * 2 * I + I, a + t * I, I);
      } else {
        silu_mul(g + t * 2 * I, g + t * 2 * I + I, a + t * I, I);
      }
    }
  }
  const at::Tensor down = project(act, down_w, down_scale, down_bias, activation_bits);
  if (mlp_out_norm.has_value()) {  // Gemma: the MLP's output normed before its residual add
    rms_norm(down.data_ptr<float>(), mlp_out_norm->data_ptr<float>(), T, H, fe, h.data_ptr<float>());
    std::copy(h.data_ptr<float>(), h.data_ptr<float>() + T * H, down.data_ptr<float>());
  }
  {
    const float* x1d = x1.data_ptr<float>();
    const float* dd = down.data_ptr<float>();
    float* od = out.data_ptr<float>();
    for (int64_t i = 0; i < T * H; ++i) od[i] = x1d[i] + dd[i];
  }
#endif
  return out;
}

}  // namespace bild

TORCH_LIBRARY_FRAGMENT(bild_kernels_cpu, m) {
  m.def("cpu_decoder_layer(Tensor x, Tensor cos, Tensor sin, Tensor input_norm, Tensor qkv_w, Tensor? qkv_scale, "
        "Tensor? qkv_bias, Tensor o_w, Tensor? o_scale, Tensor? o_bias, Tensor post_norm, Tensor gate_up_w, "
        "Tensor? gate_up_scale, Tensor? gate_up_bias, Tensor down_w, Tensor? down_scale, Tensor? down_bias, "
        "Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping, Tensor query_start_loc, "
        "Tensor positions, Tensor block_tables, Tensor context_lens, int num_heads, int num_kv_heads, "
        "float scale, int sliding_window, float eps, int activation_bits=16, Tensor? q_norm=None, "
        "Tensor? k_norm=None, Tensor? attn_out_norm=None, Tensor? mlp_out_norm=None, int activation=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(bild_kernels_cpu, CPU, m) { m.impl("cpu_decoder_layer", &bild::cpu_decoder_layer); }
