// cpu_feature_draft_chain: a feature draft's whole greedy draft run for a batch of sequences in one call (and its
// two pieces, cpu_rms_norm and cpu_feature_input, which the executor's own CPU passes use so that both agree bit for
// bit): the CPU counterpart of the CUDA-graph draft loop (bild_kernels.engine.iteration, draft_loop.py).
//
// Why: a feature-draft step's kernels (its one decoder layer, its fc, its 8,192-row head) cost ~0.25 ms on the
// AMD EPYC, but the same step as an engine extend (block bookkeeping, metadata tensors, the executor's forward,
// RMSNorm as five PyTorch ops, sample_draft's checks, the loop's host reads) cost ~0.63 ms: ~1.1 ms of every
// BiLD pass of ~10 ms went to the Python around ~2.7 draft steps. Here the steps run back to back in C++.
//
// Semantics (those of the engine's eager loop, reference.cpu_feature_draft_chain_ref), per sequence b: step 0
// feeds its counts[b] verified positions starts[b] .. (features and next_ids: every sequence's rows in order, the
// token after each position), each later step one position fed with the draft's own last output (before the final
// norm) and its last token. A step's layer-0 input is cpu_feature_input, then the layers (cpu_decoder_layer over
// every sequence still drafting, each sequence's slots from its run of slot_mapping in order, rotary rows
// cos/sin[position]), then the head on each sequence's last position's RMSNorm. Its token is the argmax (first
// index) of the head's logits mapped through head_vocab, its confidence the max probability (cpu_sample_draft's
// greedy row, bit for bit); a sequence stops at its first unsure step (energy: -lse > threshold, else max
// probability < threshold; its token is not drafted), at a non-finite row, or after caps[b] drafted tokens.
// Work split: the products and the attention run on torch's threads inside each kernel; the steps are sequential.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/core/List.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_ops.h"
#include "cpu_penalties.h"
#include "cpu_simd.h"  // defines BILD_X86 on x86-64

namespace bild {

// The fc and head products take int16 activations when packed, as the executor's (`_packed_linear`).
constexpr int64_t kProductBits = 16;
constexpr int64_t kLayerArgs = 14;  // cpu_decoder_layer's weights per layer (ops.cpu_decoder_layer.layer_args)
constexpr int64_t kLayerNorms = 4;  // q_norm, k_norm, attn_out_norm, mlp_out_norm (ops.cpu_decoder_layer.layer_extras)

namespace {

void check_float(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dim && t.is_contiguous(), op, ": ",
              name, " must be a contiguous float32 ", dim, "-D CPU tensor, got ", t.scalar_type(), " ", t.sizes());
}

// [T, 2H] = [shift + f * inv_std, embed[id] * inv_emb_scale] per row, then the fc product (+ bias) -> [T, H]
at::Tensor feature_input(const float* f, const int64_t* ids, int64_t T, const at::Tensor& shift,
                         const at::Tensor& inv_std, const at::Tensor& embed, float inv_emb_scale,
                         const at::Tensor& fc_w, const std::optional<at::Tensor>& fc_scale,
                         const std::optional<at::Tensor>& fc_bias) {
  const int64_t H = shift.size(0), V = embed.size(0);
  at::Tensor cat = at::empty({T, 2 * H}, shift.options());
  const float* sh = shift.data_ptr<float>();
  const float* is = inv_std.data_ptr<float>();
  const float* em = embed.data_ptr<float>();
  float* c = cat.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(0 <= ids[t] && ids[t] < V, "cpu_feature_input: next_ids[", t, "] = ", ids[t], " is outside [0, ", V,
                ")");
    for (int64_t k = 0; k < H; ++k) c[t * 2 * H + k] = std::fma(f[t * H + k], is[k], sh[k]);
    const float* e = em + ids[t] * H;
    for (int64_t k = 0; k < H; ++k) c[t * 2 * H + H + k] = e[k] * inv_emb_scale;
  }
  return project(cat, fc_w, fc_scale, fc_bias, kProductBits);
}

void check_feature_input(const char* op, const at::Tensor& features, const at::Tensor& next_ids,
                         const at::Tensor& shift, const at::Tensor& inv_std, const at::Tensor& embed) {
  check_float(op, "features", features, 2);
  const int64_t T = features.size(0), H = features.size(1);
  check_float(op, "shift", shift, 1);
  check_float(op, "inv_std", inv_std, 1);
  check_float(op, "embed", embed, 2);
  TORCH_CHECK(shift.size(0) == H && inv_std.size(0) == H && embed.size(1) == H, op,
              ": shift, inv_std and embed's rows must have the features' width ", H);
  TORCH_CHECK(next_ids.device().is_cpu() && next_ids.scalar_type() == at::kLong && next_ids.dim() == 1 &&
                  next_ids.size(0) == T && next_ids.is_contiguous(),
              op, ": next_ids must be a contiguous int64 [", T, "] CPU tensor");
}

}  // namespace

at::Tensor cpu_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(cpu_linear_supported(), "cpu_rms_norm: this CPU lacks AVX2/FMA (use the reference)");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1,
              "cpu_rms_norm: x must be a float32 CPU tensor");
  check_float("cpu_rms_norm", "weight", weight, 1);
  const int64_t H = weight.size(0);
  TORCH_CHECK(x.size(-1) == H, "cpu_rms_norm: x's last dimension ", x.size(-1), " differs from the weight's ", H);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
#ifdef BILD_X86
  if (H > 0) rms_norm(xc.data_ptr<float>(), weight.data_ptr<float>(), x.numel() / H, H, static_cast<float>(eps),
                      out.data_ptr<float>());
#endif
  return out;
}

at::Tensor cpu_feature_input(const at::Tensor& features, const at::Tensor& next_ids, const at::Tensor& shift,
                             const at::Tensor& inv_std, const at::Tensor& embed, double inv_emb_scale,
                             const at::Tensor& fc_w, const std::optional<at::Tensor>& fc_scale,
                             const std::optional<at::Tensor>& fc_bias) {
  TORCH_CHECK(cpu_linear_supported(), "cpu_feature_input: this CPU lacks AVX2/FMA (use the reference)");
  check_feature_input("cpu_feature_input", features, next_ids, shift, inv_std, embed);
  return feature_input(features.data_ptr<float>(), next_ids.data_ptr<int64_t>(), features.size(0), shift, inv_std,
                       embed, static_cast<float>(inv_emb_scale), fc_w, fc_scale, fc_bias);
}

// A chain step's logit bias and penalties on its head logits z [Vh] (in place, float32 as apply_penalties computes
// float32 logits):
// the sequence's history `seen0` plus its drafted columns so far; its banned columns while the output (n_out plus
// the drafts) is shorter than min_tokens. rows: (prompt_len, min_tokens, n_out); values: (repetition, presence,
// frequency).
static void penalize_step(float* z, int64_t Vh, const std::vector<SeenToken>& seen0, const std::vector<int64_t>& drafted,
                          const int64_t* rows, const double* values, const int64_t* banned, int64_t E,
                          const std::vector<LogitBias>& bias) {
  std::vector<SeenToken> seen = seen0;
  for (int64_t c : drafted) penalty_add(seen, c);
  const float r = static_cast<float>(values[0]), presence = static_cast<float>(values[1]),
              frequency = static_cast<float>(values[2]);
  for (const LogitBias& x : bias)  // the logit bias first (float32, in place: the penalties read the biased value)
    if (x.id < Vh) z[x.id] = z[x.id] + static_cast<float>(x.value);
  for (const SeenToken& s : seen)
    if (s.id < Vh) z[s.id] = penalize_logit(z[s.id], s, r, presence, frequency);
  if (rows[2] + static_cast<int64_t>(drafted.size()) < rows[1])
    for (int64_t e = 0; e < E; ++e)
      if (banned[e] >= 0 && banned[e] < Vh) z[banned[e]] = -std::numeric_limits<float>::infinity();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_feature_draft_chain(
    const at::Tensor& features, const at::Tensor& next_ids, const at::Tensor& shift, const at::Tensor& inv_std,
    const at::Tensor& embed, double inv_emb_scale, const at::Tensor& fc_w, const std::optional<at::Tensor>& fc_scale,
    const std::optional<at::Tensor>& fc_bias, const c10::List<std::optional<at::Tensor>>& layers,
    at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& norm, const at::Tensor& head_w,
    const std::optional<at::Tensor>& head_scale, const std::optional<at::Tensor>& head_bias,
    const std::optional<at::Tensor>& head_vocab, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& counts, const at::Tensor& starts,
    const at::Tensor& caps, int64_t num_heads, int64_t num_kv_heads, double scale, at::IntArrayRef sliding_windows,
    double eps, int64_t activation_bits, double fallback_threshold, bool energy,
    const c10::List<std::optional<at::Tensor>>& layer_norms, const std::optional<at::Tensor>& penalty_ids,
    const std::optional<at::Tensor>& penalty_rows,
    const std::optional<at::Tensor>& penalty_values, const std::optional<at::Tensor>& banned_ids,
    const std::optional<at::Tensor>& bias_ids, const std::optional<at::Tensor>& bias_values) {
  constexpr const char* op = "cpu_feature_draft_chain";
  TORCH_CHECK(cpu_linear_supported(), op, ": this CPU lacks AVX2/FMA (use the reference)");
  check_feature_input(op, features, next_ids, shift, inv_std, embed);
  const int64_t H = features.size(1);
  for (const at::Tensor* t : {&counts, &starts, &caps}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous() &&
                    t->size(0) == counts.size(0),
                op, ": counts, starts and caps must be contiguous int64 [B] CPU tensors of one length");
  }
  const int64_t B = counts.size(0);
  TORCH_CHECK(B >= 1, op, ": at least one sequence");
  const int64_t* cnt = counts.data_ptr<int64_t>();
  const int64_t* st0 = starts.data_ptr<int64_t>();
  const int64_t* cap = caps.data_ptr<int64_t>();
  int64_t fed = 0, slots_needed = 0, max_cap = 0, max_pos = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cnt[b] >= 1 && cap[b] >= 1 && st0[b] >= 0, op, ": sequence ", b, " has counts ", cnt[b], ", caps ",
                cap[b], " and starts ", st0[b], " (each must be >= 1, >= 1 and >= 0)");
    fed += cnt[b];
    slots_needed += cnt[b] + cap[b] - 1;
    max_cap = std::max(max_cap, cap[b]);
    max_pos = std::max(max_pos, st0[b] + cnt[b] + cap[b] - 1);
  }
  TORCH_CHECK(features.size(0) == fed, op, ": features hold ", features.size(0), " positions, counts sum to ", fed);
  const int64_t L = static_cast<int64_t>(key_caches.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(value_caches.size()) == L &&
                  static_cast<int64_t>(layers.size()) == kLayerArgs * L &&
                  static_cast<int64_t>(sliding_windows.size()) == L,
              op, ": ", L, " key caches need as many value caches and sliding windows and ", kLayerArgs * L,
              " layer weights, got ", value_caches.size(), ", ", sliding_windows.size(), " and ", layers.size());
  // Qwen3's per-head q/k norms and Gemma's output norms: none, or four a layer (cpu_decoder_layer checks them)
  TORCH_CHECK(layer_norms.empty() || static_cast<int64_t>(layer_norms.size()) == kLayerNorms * L, op,
              ": layer_norms must be empty or hold ", kLayerNorms, " a layer (", kLayerNorms * L, "), got ",
              layer_norms.size());
  check_float(op, "norm", norm, 1);
  TORCH_CHECK(norm.size(0) == H, op, ": norm must be [", H, "]");
  check_float(op, "cos", cos, 2);
  check_float(op, "sin", sin, 2);
  TORCH_CHECK(sin.sizes() == cos.sizes() && cos.size(0) >= max_pos, op,
              ": cos and sin must be [P, head_dim] tables of one shape covering positions up to ", max_pos - 1,
              ", got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == slots_needed && slot_mapping.is_contiguous(),
              op, ": slot_mapping must be a contiguous int64 [sum(counts + caps - 1) = ", slots_needed, "] tensor");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.size(0) == B,
              op, ": block_tables must be int32 [B = ", B, ", M]");
  if (head_vocab.has_value()) {
    TORCH_CHECK(head_vocab->device().is_cpu() && head_vocab->scalar_type() == at::kLong && head_vocab->dim() == 1 &&
                    head_vocab->is_contiguous(),
                op, ": head_vocab must be a contiguous int64 [V_head] CPU tensor");
  }
  // Penalties (SamplingParams): each sequence's history in the head's columns, its (prompt_len, min_tokens, n_out),
  // (repetition, presence, frequency) and banned columns; the chain's own drafts count as output at later steps.
  const bool penalize = penalty_ids.has_value();
  TORCH_CHECK(penalize == penalty_rows.has_value() && penalize == penalty_values.has_value() &&
                  penalize == banned_ids.has_value(),
              op, ": penalty_ids, penalty_rows, penalty_values and banned_ids come together");
  std::vector<std::vector<SeenToken>> seen0(penalize ? B : 0);
  std::vector<std::vector<LogitBias>> bias(B);
  std::vector<bool> penalized(B, false);
  TORCH_CHECK(bias_ids.has_value() == bias_values.has_value() && (penalize || !bias_ids.has_value()), op,
              ": bias_ids and bias_values come together, with the penalties");
  if (bias_ids.has_value()) {
    TORCH_CHECK(bias_ids->scalar_type() == at::kLong && bias_ids->dim() == 2 && bias_ids->size(0) == B &&
                    bias_ids->is_contiguous() && bias_values->scalar_type() == at::kDouble &&
                    bias_values->sizes() == bias_ids->sizes() && bias_values->is_contiguous(),
                op, ": bias_ids / bias_values must be contiguous [B, E'] int64 / float64");
    const int64_t E2 = bias_ids->size(1);
    for (int64_t b = 0; b < B; ++b)
      bias[b] = logit_biases(bias_ids->data_ptr<int64_t>() + b * E2, bias_values->data_ptr<double>() + b * E2, E2);
  }
  if (penalize) {
    const at::Tensor &pid = *penalty_ids, &prow = *penalty_rows, &pval = *penalty_values, &ban = *banned_ids;
    TORCH_CHECK(pid.scalar_type() == at::kLong && pid.dim() == 2 && pid.size(0) == B && pid.is_contiguous() &&
                    prow.scalar_type() == at::kLong && prow.dim() == 2 && prow.size(0) == B && prow.size(1) == 3 &&
                    prow.is_contiguous() && pval.scalar_type() == at::kDouble && pval.dim() == 2 &&
                    pval.size(0) == B && pval.size(1) == 3 && pval.is_contiguous() &&
                    ban.scalar_type() == at::kLong && ban.dim() == 2 && ban.size(0) == B && ban.is_contiguous(),
                op, ": penalty_ids [B, L] int64, penalty_rows [B, 3] int64, penalty_values [B, 3] float64, "
                "banned_ids [B, E] int64, contiguous");
    const int64_t* r = prow.data_ptr<int64_t>();
    const double* v = pval.data_ptr<double>();
    for (int64_t b = 0; b < B; ++b) {
      penalized[b] = v[3 * b] != 1.0 || v[3 * b + 1] != 0.0 || v[3 * b + 2] != 0.0 || r[3 * b + 1] > 0 ||
                     !bias[b].empty();
      if (penalized[b]) seen0[b] = penalty_history(pid.data_ptr<int64_t>() + b * pid.size(1), pid.size(1), r[3 * b]);
    }
  }
  std::vector<std::vector<int64_t>> chain_cols(B);  // each sequence's drafted columns so far
  std::vector<std::optional<at::Tensor>> w(layers.begin(), layers.end());
  std::vector<std::optional<at::Tensor>> ln(layer_norms.begin(), layer_norms.end());
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t j : {0, 1, 4, 7, 8, 11}) {  // input_norm, qkv, o, post_norm, gate_up, down: required
      TORCH_CHECK(w[i * kLayerArgs + j].has_value(), op, ": layer ", i, "'s weight ", j, " is missing");
    }
  }
  const auto opt = features.options();
  at::Tensor tokens = at::full({B, max_cap}, -1, opt.dtype(at::kLong));
  at::Tensor max_probs = at::zeros({B, max_cap}, opt);
  // per sequence: drafted, forwards run, stop (0 cap, 1 unsure, 2 not finite)
  at::Tensor status = at::zeros({B, 3}, opt.dtype(at::kLong));
  int64_t* tok = tokens.data_ptr<int64_t>();
  float* mp = max_probs.data_ptr<float>();
  int64_t* st = status.data_ptr<int64_t>();
#ifdef BILD_X86
  const auto i32 = opt.dtype(at::kInt), i64 = opt.dtype(at::kLong);
  const float thr = static_cast<float>(fallback_threshold);
  const int64_t* vocab = head_vocab.has_value() ? head_vocab->data_ptr<int64_t>() : nullptr;
  const int64_t M = block_tables.size(1);
  const at::Tensor tables = block_tables.contiguous();
  // per sequence: its first slot in slot_mapping, the next position it feeds, the slots it has used
  std::vector<int64_t> slot0(B), pos(B), used(B, 0), active;
  for (int64_t b = 0, o = 0; b < B; ++b) {
    slot0[b] = o;
    o += cnt[b] + cap[b] - 1;
    pos[b] = st0[b];
    active.push_back(b);
  }
  at::Tensor feed = features, ids = next_ids;  // this step's inputs, the active sequences' rows in order
  for (int64_t step = 0; !active.empty(); ++step) {
    const int64_t n = static_cast<int64_t>(active.size()), T = feed.size(0);
    at::Tensor x = feature_input(feed.data_ptr<float>(), ids.data_ptr<int64_t>(), T, shift, inv_std, embed,
                                 static_cast<float>(inv_emb_scale), fc_w, fc_scale, fc_bias);
    at::Tensor qsl = at::empty({n + 1}, i32), positions = at::empty({T}, i64), lens = at::empty({n}, i32);
    const int64_t D2 = cos.size(1);
    at::Tensor slots = at::empty({T}, i64), table = at::empty({n, M}, i32), c = at::empty({T, D2}, opt);
    at::Tensor s = at::empty({T, D2}, opt);
    int32_t* q = qsl.data_ptr<int32_t>();
    q[0] = 0;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t b = active[k], Tb = step == 0 ? cnt[b] : 1;
      q[k + 1] = static_cast<int32_t>(q[k] + Tb);
      lens.data_ptr<int32_t>()[k] = static_cast<int32_t>(pos[b] + Tb);
      std::copy(tables.data_ptr<int32_t>() + b * M, tables.data_ptr<int32_t>() + (b + 1) * M,
                table.data_ptr<int32_t>() + k * M);
      for (int64_t t = 0; t < Tb; ++t) {
        const int64_t r = q[k] + t, p = pos[b] + t;
        positions.data_ptr<int64_t>()[r] = p;
        slots.data_ptr<int64_t>()[r] = slot_mapping.data_ptr<int64_t>()[slot0[b] + used[b] + t];
        std::copy(cos.data_ptr<float>() + p * D2, cos.data_ptr<float>() + (p + 1) * D2, c.data_ptr<float>() + r * D2);
        std::copy(sin.data_ptr<float>() + p * D2, sin.data_ptr<float>() + (p + 1) * D2, s.data_ptr<float>() + r * D2);
      }
    }
    TORCH_CHECK(q[n] == T, op, ": internal: ", T, " rows fed for ", q[n], " positions");
    for (int64_t i = 0; i < L; ++i) {
      const std::optional<at::Tensor>* a = w.data() + i * kLayerArgs;
      const std::optional<at::Tensor> none;
      const std::optional<at::Tensor>* e = ln.empty() ? nullptr : ln.data() + i * kLayerNorms;
      x = cpu_decoder_layer(x, c, s, *a[0], *a[1], a[2], a[3], *a[4], a[5], a[6], *a[7], *a[8], a[9], a[10], *a[11],
                            a[12], a[13], key_caches[i], value_caches[i], slots, qsl, positions, table, lens,
                            num_heads, num_kv_heads, scale, sliding_windows[i], eps, activation_bits,
                            e ? e[0] : none, e ? e[1] : none, e ? e[2] : none, e ? e[3] : none);
    }
    // each sequence's last position: its output (the next step's feature), normed, then the head
    at::Tensor last = at::empty({n, H}, opt), h = at::empty({n, H}, opt);
    for (int64_t k = 0; k < n; ++k) {
      std::copy(x.data_ptr<float>() + (q[k + 1] - 1) * H, x.data_ptr<float>() + q[k + 1] * H,
                last.data_ptr<float>() + k * H);
    }
    rms_norm(last.data_ptr<float>(), norm.data_ptr<float>(), n, H, static_cast<float>(eps), h.data_ptr<float>());
    const at::Tensor logits = project(h, head_w, head_scale, head_bias, kProductBits).contiguous();  // [n, V_head]
    const int64_t Vh = logits.size(1);
    TORCH_CHECK(vocab == nullptr || Vh == head_vocab->size(0), op, ": the head scores ", Vh,
                " ids, head_vocab names ", head_vocab->size(0));
    std::vector<int64_t> still, keep;  // sequences that go on; their rows in `last`
    std::vector<int64_t> next_tok;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t b = active[k];
      int64_t* sb = st + b * 3;
      int64_t arg = 0;
      float prob = 0.0f, en = 0.0f;
      used[b] += step == 0 ? cnt[b] : 1;
      pos[b] += step == 0 ? cnt[b] : 1;
      if (penalize && penalized[b]) penalize_step(logits.data_ptr<float>() + k * Vh, Vh, seen0[b], chain_cols[b],
                                                  penalty_rows->data_ptr<int64_t>() + 3 * b,
                                                  penalty_values->data_ptr<double>() + 3 * b,
                                                  banned_ids->data_ptr<int64_t>() + b * banned_ids->size(1),
                                                  banned_ids->size(1), bias[b]);
      if (!greedy_row(logits.data_ptr<float>() + k * Vh, Vh, &arg, &prob, &en)) {
        sb[2] = 2;
        continue;
      }
      const int64_t id = vocab != nullptr ? vocab[arg] : arg;
      tok[b * max_cap + step] = id;
      mp[b * max_cap + step] = prob;
      sb[1] = step + 1;
      if (energy ? en > thr : prob < thr) {
        sb[2] = 1;
        continue;
      }
      sb[0] = step + 1;
      chain_cols[b].push_back(arg);
      if (step + 1 < cap[b]) {
        still.push_back(b);
        keep.push_back(k);
        next_tok.push_back(id);
      }
    }
    active = still;
    if (active.empty()) break;
    feed = at::empty({static_cast<int64_t>(keep.size()), H}, opt);
    ids = at::empty({static_cast<int64_t>(keep.size())}, i64);
    for (size_t k = 0; k < keep.size(); ++k) {
      std::copy(last.data_ptr<float>() + keep[k] * H, last.data_ptr<float>() + (keep[k] + 1) * H,
                feed.data_ptr<float>() + k * H);
      ids.data_ptr<int64_t>()[k] = next_tok[k];
    }
  }
#endif
  return {tokens, max_probs, status};
}

}  // namespace bild

TORCH_LIBRARY_FRAGMENT(bild_kernels_cpu, m) {
  m.def("cpu_rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("cpu_feature_input(Tensor features, Tensor next_ids, Tensor shift, Tensor inv_std, Tensor embed, "
        "float inv_emb_scale, Tensor fc_w, Tensor? fc_scale, Tensor? fc_bias) -> Tensor");
  m.def("cpu_feature_draft_chain(Tensor features, Tensor next_ids, Tensor shift, Tensor inv_std, Tensor embed, "
        "float inv_emb_scale, Tensor fc_w, Tensor? fc_scale, Tensor? fc_bias, Tensor?[] layers, "
        "Tensor(a!)[] key_caches, Tensor(b!)[] value_caches, Tensor norm, Tensor head_w, Tensor? head_scale, "
        "Tensor? head_bias, Tensor? head_vocab, Tensor cos, Tensor sin, Tensor slot_mapping, Tensor block_tables, "
        "Tensor counts, Tensor starts, Tensor caps, int num_heads, int num_kv_heads, float scale, "
        "int[] sliding_windows, float eps, int activation_bits, float fallback_threshold, bool energy, "
        "Tensor?[] layer_norms, "
        "Tensor? penalty_ids=None, Tensor? penalty_rows=None, Tensor? penalty_values=None, Tensor? banned_ids=None, "
        "Tensor? bias_ids=None, Tensor? bias_values=None) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bild_kernels_cpu, CPU, m) {
  m.impl("cpu_rms_norm", &bild::cpu_rms_norm);
  m.impl("cpu_feature_input", &bild::cpu_feature_input);
  m.impl("cpu_feature_draft_chain", &bild::cpu_feature_draft_chain);
}
