// A token bitmask on one row of logits, for the CPU kernels that apply a grammar's mask: apply_token_bitmask
// (csrc/cpu_token_bitmask.cpp), and any native loop that masks its own rows. The rule is
// bild_kernels.reference.apply_token_bitmask_ref's: bit t % 32 of word t // 32 (the word read as uint32) set keeps
// token t's logit, clear makes it -inf; the bits past V in the last word are ignored.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace bild {

// out[t] = in[t] where the mask allows t, else -inf, for t < V, on the logits' bits (U: the unsigned integer of their
// width; neg_inf: -inf's bits). A word of all ones is a copy and a word of zeros a fill (a grammar's masks are mostly
// those), the rest a branchless select bit by bit (random bits would defeat a branch predictor).
template <typename U>
inline void mask_row(const U* in, const int32_t* words, U* out, int64_t V, U neg_inf) {
  for (int64_t w = 0; w * 32 < V; ++w) {
    const int64_t base = w * 32, n = std::min<int64_t>(32, V - base);
    const uint32_t bits = static_cast<uint32_t>(words[w]);
    if (bits == 0xFFFFFFFFu) {
      std::memcpy(out + base, in + base, sizeof(U) * n);
    } else if (bits == 0) {
      std::fill_n(out + base, n, neg_inf);
    } else if (n == 32) {  // (a fixed trip count: the compiler vectorises it)
      for (int i = 0; i < 32; ++i) {
        const U keep = (bits & (1u << i)) ? static_cast<U>(~U(0)) : U(0);
        out[base + i] = static_cast<U>((in[base + i] & keep) | (neg_inf & static_cast<U>(~keep)));
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const U keep = static_cast<U>(U(0) - static_cast<U>((bits >> i) & 1u));
        out[base + i] = static_cast<U>((in[base + i] & keep) | (neg_inf & static_cast<U>(~keep)));
      }
    }
  }
}

}  // namespace bild
