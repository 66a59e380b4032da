// The top-k / top-p cut-off search of the CUDA sampling kernels (csrc/common.cuh, filter_cut), host and device.
// Plain C++ (no CUDA headers), so the CPU extension runs the same bucket and bracket logic on the host
// (csrc/cpu_sampling.cpp, cpu_filter_cut) and the tests check it against the reference on the CPU. The Triton
// twins (bild_kernels/triton/_sampling_common.py, filter_threshold) search the same way.
//
// What it finds (reference._filter_top_k_top_p): with s = z / t the scaled logits of a row, top-k keeps
// s >= the k-th largest, i.e. the keys up to the largest c with count(key >= c) >= k; top-p keeps the keys up
// to the largest c with mass(key >= c) >= top_p * total, mass = sum of exp(s - s_max). A token must pass both,
// so the cut-off is the largest c where either holds; both only fall as c grows. min-p keeps s >= s_max +
// log(min_p) (float sums): the keys from c_m = order_key(s_max + log(min_p)) up, the third condition "c <= c_m",
// which also only falls as c grows; the largest c where any of the three holds is the intersection's cut-off,
// and the search finds it (and the kept set's exact mass) like the other two. key = order_key(s), an int32 in the
// float order.
//
// How: a bracket [lo, hi) of keys (lo satisfies, hi does not) narrowed by passes over the row, each pass a
// histogram of the keys inside the bracket over kCutBuckets buckets (counts, and masses in fixed point so that
// the sums are exact integers, the same in any order and in every pass), bucket 0 the highest. The first
// bucket from the top whose lower bound satisfies becomes the next bracket. The first pass buckets by value,
// 1/32 nat each from s_max down to s_max - 32 (the cut-offs of real top-k / top-p settings fall there: with
// top_p = 0.9 everything below s_max - ln(V / 0.1) carries less than 1 - top_p of the mass), so one pass brings
// the bracket to 1/32 nat; later passes split the bracket's keys evenly, 1024-fold a pass. On peaked logits a
// pass touches only the few keys inside the bracket (one compare for every other logit): about three passes in
// all, where the previous search (16 pivots a pass over the whole key range) took eight full ones.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define BILD_HD __host__ __device__
#else
#define BILD_HD
#endif

namespace bild {

// int32 whose signed order is the float order (-0.0 folded onto +0.0, which compares equal), so a
// threshold on the scaled logits can be searched over integers. Every float, -inf included, has a
// key above kLowestKey.
constexpr int kLowestKey = -2147483647;
BILD_HD inline int order_key(float s) {
  int bits;
  const float folded = s == 0.0f ? 0.0f : s;
  memcpy(&bits, &folded, sizeof(bits));
  return bits ^ ((bits >> 31) & 0x7FFFFFFF);
}

// Whether a row's top-k / top-p / min-p settings may filter anything out of V tokens (a row whose s_max turns out
// not to be finite then keeps everything, which its search finds at once): the kernels' and the CPU extension's test.
BILD_HD inline bool filter_on(int top_k, float top_p, float min_p, long long V) {
  return (top_k > 0 && top_k < V) || top_p < 1.0f || min_p > 0.0f;
}

constexpr int kCutBuckets = 1024;
constexpr float kCutStep = 0.03125f;            // the value pass's bucket: 1/32 nat (exact multiples below)
constexpr double kCutMassUnit = 1099511627776.0;  // 2^40: masses exp(s - s_max) <= 1 as multiples of 2^-40; the
                                                  // ops' V < 2^24 keeps a row's sum below 2^64

// exp(s - s_max) in [0, 1] as an integer multiple of 2^-40, rounded to nearest (e * 2^40 is exact in float).
BILD_HD inline unsigned long long cut_fixed_mass(float e) {
#if defined(__CUDA_ARCH__)
  return __float2ull_rn(e * static_cast<float>(kCutMassUnit));
#else
  return static_cast<unsigned long long>(std::nearbyint(e * static_cast<float>(kCutMassUnit)));
#endif
}

struct CutSearch {
  long long lo = kLowestKey;  // keys >= lo satisfy (kLowestKey: nothing proven yet; everything is kept)
  long long hi = 0;           // keys >= hi do not
  unsigned int above_cnt = 0;       // how many keys are >= hi
  unsigned long long above_mass = 0;  // and their mass
  unsigned long long kept_mass = 0;   // the mass of the keys >= lo, once a pass proved lo (lo_found)
  bool lo_found = false;
  bool by_value = false;  // the next pass buckets by value
  bool use_k = false, use_p = false, use_m = false;
  float s_max = 0.0f;
  long long min_key = kLowestKey;  // min-p's c_m (use_m): keys below it are never kept
  unsigned int top_k = 0;
  unsigned long long target = 0;  // top_p * total in units of 2^-40
  long long width = 1;            // a key pass's bucket width
  long long bottom = 0;           // the value pass's lowest bucket bound

  // s_max: the row's largest s; s_sum: sum of exp(s - s_max) (the first pass's); V: the row's length;
  // min_p: 0 (off) or in (0, 1] (a row whose s_max is not finite keeps everything, as the reference's).
  BILD_HD void init(float s_max_, float s_sum, int top_k_, float top_p, int V, float min_p = 0.0f) {
    use_k = top_k_ > 0 && top_k_ < V;
    use_p = top_p < 1.0f;
    use_m = min_p > 0.0f && s_max_ - s_max_ == 0.0f;
    min_key = use_m ? order_key(s_max_ + logf(min_p)) : kLowestKey;
    s_max = s_max_;
    top_k = use_k ? static_cast<unsigned int>(top_k_) : 0u;
    target = use_p ? static_cast<unsigned long long>(ceil(static_cast<double>(top_p) * s_sum * kCutMassUnit)) : 0ull;
    lo = kLowestKey;
    hi = (use_k || use_p || use_m) ? static_cast<long long>(order_key(s_max_)) + 1 : kLowestKey + 1;
    above_cnt = 0;
    above_mass = kept_mass = 0;
    lo_found = false;
    by_value = s_max_ - s_max_ == 0.0f;  // finite
  }

  BILD_HD bool done() const { return hi - lo <= 1; }

  BILD_HD void begin_pass() {
    if (by_value) {
      bottom = lower(kCutBuckets - 1);
    } else {
      width = (hi - lo + kCutBuckets - 1) / kCutBuckets;
    }
  }

  // The lowest key of bucket j (bucket 0 is the highest): a value pass's buckets end at s_max - (j+1)/32
  // (the product is exact, the difference rounded once: monotone in j); a key pass's split [lo, hi) evenly.
  BILD_HD long long lower(int j) const {
    if (by_value) return order_key(s_max - static_cast<float>(j + 1) * kCutStep);
    const long long l = hi - static_cast<long long>(j + 1) * width;
    return l > lo ? l : lo;
  }
  BILD_HD long long upper(int j) const { return j == 0 ? hi : lower(j - 1); }

  // The bucket of a logit (key = order_key(s)) in this pass, or -1 when the pass does not count it: outside
  // [lo, hi), or below a value pass's range.
  BILD_HD int bucket(int key, float s) const {
    if (key >= hi || key < lo) return -1;
    if (!by_value) {  // hi - 1 - key < 2^32 and width <= 2^22: 32-bit division
      return static_cast<int>(static_cast<unsigned int>(hi - 1 - key) / static_cast<unsigned int>(width));
    }
    if (key < bottom) return -1;
    // The bucket is the first j with key >= lower(j) (lower only falls as j grows; lower(kCutBuckets - 1) =
    // bottom <= key). The arithmetic guess is it, or off by one near a boundary; where the boundaries collapse
    // (|s_max| beyond ~2^19, e.g. a tiny temperature, puts several of them on one float) a bisection finds it.
    int j = static_cast<int>((s_max - s) * (1.0f / kCutStep));  // s in [s_max - 32, s_max]
    j = j < 0 ? 0 : (j > kCutBuckets - 1 ? kCutBuckets - 1 : j);
    for (int step = 0; step < 2; ++step) {
      if (key < lower(j)) {
        if (j == kCutBuckets - 1) break;
        ++j;
      } else if (j > 0 && key >= lower(j - 1)) {
        --j;
      } else {
        return j;
      }
    }
    int a = 0, b = kCutBuckets - 1;
    while (a < b) {
      const int mid = (a + b) >> 1;
      if (key >= lower(mid)) b = mid;
      else a = mid + 1;
    }
    return a;
  }

  // Whether the lower bound of bucket j satisfies, given the counts and masses of this pass's buckets down to
  // it (inclusive).
  BILD_HD bool satisfied(int j, unsigned int cnt_incl, unsigned long long mass_incl) const {
    return (use_k && above_cnt + cnt_incl >= top_k) || (use_p && above_mass + mass_incl >= target) ||
           (use_m && lower(j) <= min_key);
  }

  // After a pass: j, the first bucket from the top that satisfies (-1: none), with the sums of the buckets
  // above it (excl) and down to it (incl); for j = -1, incl holds the sums of every bucket.
  BILD_HD void settle(int j, unsigned int cnt_excl, unsigned long long mass_excl, unsigned int cnt_incl,
                      unsigned long long mass_incl) {
    if (j < 0) {  // the cut-off lies below every bucket of this pass
      const long long new_hi = by_value ? bottom : lo;  // a key pass's buckets reach lo: lo was never proven
      above_cnt += cnt_incl;
      above_mass += mass_incl;
      hi = new_hi;
    } else {
      const long long new_lo = lower(j), new_hi = upper(j);
      kept_mass = above_mass + mass_incl;
      lo_found = true;
      above_cnt += cnt_excl;
      above_mass += mass_excl;
      lo = new_lo;
      hi = new_hi;
    }
    by_value = false;
  }

  BILD_HD int tau() const { return static_cast<int>(lo); }
  // The kept set's sum of exp(s - s_max); s_sum (everything kept) when no pass proved a cut-off.
  BILD_HD float kept_sum(float s_sum) const {
    return lo_found ? static_cast<float>(static_cast<double>(kept_mass) / kCutMassUnit) : s_sum;
  }
};

}  // namespace bild
