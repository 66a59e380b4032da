// SamplingParams' penalties on one row of logits, shared by the CPU kernels that apply them: apply_penalties
// (csrc/cpu_penalties.cpp) and the feature draft's native draft runs (csrc/cpu_feature_draft.cpp). The rule is
// bild_kernels.reference.apply_penalties_ref's, in its order: the logit bias, repetition, frequency, presence.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace bild {

struct SeenToken {
  int64_t id;      // a token id (or a reduced head's column)
  int64_t count;   // its occurrences in the output (and in the drafts before the position)
  bool in_prompt;
};

// The distinct ids of a row's history (prompt_len prompt ids, then output; -1 pads skipped) with their output
// counts and prompt flags, sorted by id.
inline std::vector<SeenToken> penalty_history(const int64_t* ids, int64_t L, int64_t prompt_len) {
  std::vector<std::pair<int64_t, bool>> all;  // (id, is output)
  all.reserve(L);
  for (int64_t j = 0; j < L; ++j)
    if (ids[j] >= 0) all.emplace_back(ids[j], j >= prompt_len);
  std::sort(all.begin(), all.end());
  std::vector<SeenToken> out;
  for (const auto& [id, is_out] : all) {
    if (out.empty() || out.back().id != id) out.push_back({id, 0, false});
    out.back().count += is_out ? 1 : 0;
    out.back().in_prompt |= !is_out;
  }
  return out;
}

// One more output occurrence of `id` (a drafted token), keeping `seen` sorted.
inline void penalty_add(std::vector<SeenToken>& seen, int64_t id) {
  if (id < 0) return;
  auto it = std::lower_bound(seen.begin(), seen.end(), id, [](const SeenToken& s, int64_t v) { return s.id < v; });
  if (it != seen.end() && it->id == id)
    it->count += 1;
  else
    seen.insert(it, {id, 1, false});
}

struct LogitBias {
  int64_t id;
  double value;
};

// A row's logit bias (ids -1 skipped), sorted by id.
inline std::vector<LogitBias> logit_biases(const int64_t* ids, const double* values, int64_t n) {
  std::vector<LogitBias> out;
  for (int64_t j = 0; j < n; ++j)
    if (ids[j] >= 0) out.push_back({ids[j], values[j]});
  std::sort(out.begin(), out.end(), [](const LogitBias& a, const LogitBias& b) { return a.id < b.id; });
  return out;
}

// `id`'s bias, or nullptr where it has none (its logit is left as it is: -0.0 stays -0.0).
inline const LogitBias* bias_of(const std::vector<LogitBias>& bias, int64_t id) {
  auto it = std::lower_bound(bias.begin(), bias.end(), id, [](const LogitBias& x, int64_t v) { return x.id < v; });
  return it != bias.end() && it->id == id ? &*it : nullptr;
}

// A seen token's logit after the penalties (it is in the prompt or counted: the repetition penalty applies).
template <typename acc_t>
inline acc_t penalize_logit(acc_t z, const SeenToken& s, acc_t r, acc_t presence, acc_t frequency) {
  z = z < acc_t(0) ? z * r : z / r;
  const acc_t c = static_cast<acc_t>(s.count);
  z = z - frequency * c;
  return z - presence * (s.count > 0 ? acc_t(1) : acc_t(0));
}

}  // namespace bild
