// Native test of the csrc/ kernels through their .cuh launchers only (no torch, no Python): each kernel
// runs on small random inputs and is compared with the CPU twins in cpu_reference.h. Token ids, counts
// and block tables must match exactly; floats within 1e-4. Registered with ctest (CMakeLists.txt).
// Exit codes: 0 pass, 1 failure, 77 skip (no GPU: after the host-side Philox check, which always runs).
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu_reference.h"
#include "paged_kv.cuh"
#include "penalties.cuh"
#include "sampling.cuh"
#include "token_bitmask.cuh"
#include "verify.cuh"

static int g_failures = 0;
#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      ++g_failures;                                         \
      if (g_failures < 20) {                                \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);    \
        std::printf(__VA_ARGS__);                           \
        std::printf("\n");                                  \
      }                                                     \
    }                                                       \
  } while (0)
#define CUDA_OK(expr) EXPECT((expr) == cudaSuccess, "%s", #expr)

template <typename T>
static std::vector<T> zeros(size_t n) { return std::vector<T>(n, T{}); }

static bool close(float a, float b) { return std::fabs(a - b) <= 1e-4f + 1e-4f * std::fabs(b); }

// A device copy of a host vector; copied back with get().
template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n;
  explicit Dev(const std::vector<T>& h) : n(h.size()) {
    CUDA_OK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
    CUDA_OK(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~Dev() { cudaFree(p); }
  std::vector<T> get() const {
    std::vector<T> h(n);
    CUDA_OK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

static void test_philox_host() {  // values from bild_kernels.reference.philox_ref / uniform_ref
  struct Case { int64_t seed; uint32_t idx; int64_t off; int purpose, pos; uint32_t x; float u; };
  const Case cases[] = {
      {0LL, 0u, 0LL, 1, 0, 0x910223A1u, 0.566438854f},
      {12345LL, 7u, 3LL, 2, 5, 0x46B9A9D4u, 0.276270449f},
      {-1LL, 99999u, 1099511627793LL, 3, 63, 0xE823BCEFu, 0.906795323f},
      {4611686018427387909LL, 1u, 0LL, 1, 0, 0x32A655A4u, 0.197850525f},
  };
  for (const Case& c : cases) {
    const uint32_t x = bild::philox_first_word(c.seed, c.idx, static_cast<uint32_t>(c.off),
                                               static_cast<uint32_t>(static_cast<uint64_t>(c.off) >> 32),
                                               (static_cast<uint32_t>(c.purpose) << 24) | c.pos);
    EXPECT(x == c.x, "philox seed %lld: %08X != %08X", static_cast<long long>(c.seed), x, c.x);
    EXPECT(bild::uniform(c.seed, c.idx, c.off, c.purpose, c.pos) == c.u, "uniform seed %lld",
           static_cast<long long>(c.seed));
  }
}

static void test_paged_kv(std::mt19937& rng) {
  const int T = 7, H = 3, D = 5, NB = 6, BS = 4, HD = H * D;
  std::vector<float> key(T * HD), value(T * HD);
  std::normal_distribution<float> normal;
  for (auto& x : key) x = normal(rng);
  for (auto& x : value) x = normal(rng);
  const std::vector<int64_t> slots = {3, -1, 0, 22, 9, -1, 17};
  std::vector<__half> kc(NB * BS * HD, __float2half(0.0f)), vc = kc;
  Dev<float> dk(key), dv(value);
  Dev<__half> dkc(kc), dvc(vc);
  Dev<int64_t> ds(slots);
  CUDA_OK(bild::WritePagedKV(dk.p, dv.p, dkc.p, dvc.p, ds.p, T, H, D, HD, D, HD, D, nullptr));
  const std::vector<__half> gk = dkc.get(), gv = dvc.get();
  for (int t = 0; t < T; ++t) {
    if (slots[t] < 0) continue;
    for (int e = 0; e < HD; ++e) {
      EXPECT(__half2float(gk[slots[t] * HD + e]) == __half2float(__float2half(key[t * HD + e])), "write key");
      EXPECT(__half2float(gv[slots[t] * HD + e]) == __half2float(__float2half(value[t * HD + e])), "write value");
    }
  }

  // reserve then rollback on 3 rows (row 1 inactive), checked against the reference's loops.
  const int B = 3, M = 4;
  std::vector<int> tables = {5, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1};
  std::vector<int> lens = {3, -1, 0}, num_new = {6, 4, 5}, free_blocks = {0, 1, 2, 3, 4, 0, 0}, num_free = {5};
  std::vector<int> want_tables = tables, want_free = free_blocks;
  int ptr = num_free[0];
  for (int b = 0; b < B; ++b) {  // reserve_paged_kv_ref
    int nblk = 0;
    for (int j = 0; j < M; ++j) nblk += tables[b * M + j] >= 0;
    const int want = lens[b] >= 0 ? (lens[b] + num_new[b] + BS - 1) / BS : nblk;
    for (int j = 0; j < want - nblk; ++j) want_tables[b * M + nblk + j] = free_blocks[--ptr];
  }
  Dev<int> dt(tables), dl(lens), dn(num_new), df(free_blocks), dnf(num_free);
  CUDA_OK(bild::ReservePagedKV(dt.p, dl.p, dn.p, df.p, dnf.p, B, M, BS, nullptr));
  EXPECT(dt.get() == want_tables, "reserve: block tables");
  EXPECT(dnf.get()[0] == ptr, "reserve: num_free %d != %d", dnf.get()[0], ptr);

  std::vector<int> rejected = {5, 2, 3}, want_lens = lens;
  for (int b = 0; b < B; ++b) {  // rollback_paged_kv_ref
    if (lens[b] < 0) continue;
    want_lens[b] = std::max(lens[b] - rejected[b], 0);
    for (int j = (want_lens[b] + BS - 1) / BS; j < M && want_tables[b * M + j] >= 0; ++j) {
      want_free[ptr++] = want_tables[b * M + j];
      want_tables[b * M + j] = -1;
    }
  }
  Dev<int> dr(rejected);
  CUDA_OK(bild::RollbackPagedKV(dt.p, dl.p, dr.p, df.p, dnf.p, B, M, static_cast<int>(free_blocks.size()), BS,
                                nullptr));
  EXPECT(dt.get() == want_tables && dl.get() == want_lens, "rollback: tables / lens");
  EXPECT(dnf.get()[0] == ptr && std::equal(want_free.begin(), want_free.begin() + ptr, df.get().begin()),
         "rollback: free stack");

  // shortfall: nothing changes but num_free = -1 - missing
  std::vector<int> big = {40, 40, 40};
  Dev<int> dbig(big);
  const std::vector<int> before = dt.get();
  CUDA_OK(bild::ReservePagedKV(dt.p, dl.p, dbig.p, df.p, dnf.p, B, M, BS, nullptr));
  EXPECT(dt.get() == before && dnf.get()[0] < 0, "reserve shortfall");

  // gather the first rows of the half caches back
  const std::vector<int> gtab = {0, 5, 2, 4, -1, -1}, glens = {6, 3};
  const int L = 6;
  Dev<int> dgt(gtab), dgl(glens);
  Dev<__half> ok(zeros<__half>(2 * L * HD)), ov(zeros<__half>(2 * L * HD));
  CUDA_OK(bild::GatherPagedKV(dkc.p, dvc.p, dgt.p, dgl.p, ok.p, ov.p, 2, 3, L, BS, HD * 2, nullptr));
  const std::vector<__half> go = ok.get();
  for (int b = 0; b < 2; ++b)
    for (int pos = 0; pos < L; ++pos)
      for (int e = 0; e < HD; ++e) {
        const float want = pos < glens[b] ? __half2float(gk[(gtab[b * 3 + pos / BS] * BS + pos % BS) * HD + e]) : 0.f;
        EXPECT(__half2float(go[(b * L + pos) * HD + e]) == want, "gather b=%d pos=%d", b, pos);
      }
}

// V = 1111 is one chunk of the first pass; V = 9001 is three (fp32: 4096 a chunk) with an odd tail.
// split: the split top-k / top-p / min-p cut-off search (CutSplitPassKernel) instead of filter_cut. greedy_only: every
// row greedy without top-k / top-p / min-p, launched with rows = 0 (the kernels for other kinds of row left out).
static void test_sample_draft(std::mt19937& rng, int V, int first_pass, bool split = false, bool greedy_only = false,
                              bool fused = false) {
  const int B = 12;
  std::vector<float> logits(B * V);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (auto& x : logits) x = std::round(normal(rng) * 4.0f) / 4.0f;  // coarse values: ties are common
  // Rows 6-11 use min-p: alone in a greedy row (0.2) and sampling rows (0.05; 1e-20, whose cut-off 46 nats below
  // the max lies under the value pass's 32: the key passes find it; 1, which keeps the ties at the max only), and
  // with top-k / top-p in a greedy and a sampling row.
  std::vector<float> temp = {0.0f, 0.7f, 1.0f, 1.3f, 0.0f, 0.9f, 0.0f, 0.8f, 1.0f, 1.0f, 0.0f, 1.1f};
  std::vector<float> top_p = {1.0f, 1.0f, 0.8f, 1.0f, 0.5f, 0.9f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 0.9f};
  std::vector<float> min_p = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.2f, 0.05f, 1e-20f, 1.0f, 0.1f, 0.3f};
  std::vector<int> top_k = {0, 0, 0, 5, 1, 50, 0, 0, 0, 0, 5, 50};
  if (greedy_only) {
    temp.assign(B, 0.0f);
    top_p.assign(B, 1.0f);
    min_p.assign(B, 0.0f);
    top_k.assign(B, 0);
  }
  const std::vector<int64_t> seed = {1, 2, 3, 4, 5, -6, 7, 8, 9, 10, 11, 12};
  const std::vector<int64_t> offset = {0, 7, 1LL << 33, 2, 0, 9, 3, 5, 1LL << 40, 6, 1, 4};
  const std::vector<float> thr = {0.1f, 0.5f, 0.0f, 1.0f, 0.2f, 0.3f, 0.4f, 0.1f, 0.2f, 0.6f, 0.3f, 0.05f};
  Dev<float> dz(logits), dt(temp), dp(top_p), dmp(min_p), dthr(thr);
  Dev<int> dk(top_k);
  Dev<int64_t> dseed(seed), doff(offset), tok(zeros<int64_t>(B));
  Dev<float> tp(zeros<float>(B)), mp(zeros<float>(B)), en(zeros<float>(B));
  bool* dfb;  // std::vector<bool> has no data(): a raw buffer
  CUDA_OK(cudaMalloc(&dfb, B));
  Dev<bild::RowPartial> part(std::vector<bild::RowPartial>(bild::sample_draft_partials<float>(B, V)));
  void* split_buf = nullptr;
  bild::CutSplit cs{};
  if (split) {
    const int64_t draws = B * bild::row_splits<float>(V);
    CUDA_OK(cudaMalloc(&split_buf, bild::cut_split_bytes(B, draws)));
    cs = bild::cut_split_carve(split_buf, B, draws);
  }
  Dev<int> counts(std::vector<int>(B, 5));  // the fused tail's counts, left nonzero on purpose: the launch clears them
  CUDA_OK(bild::SampleDraft(dz.p, B, V, {dt.p, dk.p, dp.p, dmp.p, dseed.p, doff.p, dthr.p},
                            {tok.p, tp.p, mp.p, en.p, dfb}, part.p, nullptr, first_pass, split ? &cs : nullptr,
                            greedy_only ? 0 : bild::kRowsAll, fused ? counts.p : nullptr));
  if (fused) {  // and left them at zero
    const auto left = counts.get();
    EXPECT(std::all_of(left.begin(), left.end(), [](int c) { return c == 0; }), "sample fused tail: counts left");
  }
  if (split_buf != nullptr) {
    CUDA_OK(cudaDeviceSynchronize());
    cudaFree(split_buf);
  }
  bool hfb[B];
  CUDA_OK(cudaMemcpy(hfb, dfb, B, cudaMemcpyDeviceToHost));
  cudaFree(dfb);
  const auto gtok = tok.get();
  const auto gtp = tp.get(), gmp = mp.get(), gen = en.get();
  for (int b = 0; b < B; ++b) {
    const std::vector<float> z(logits.begin() + b * V, logits.begin() + (b + 1) * V);
    const ref::Sample r = ref::sample_draft(z, temp[b], top_k[b], top_p[b], min_p[b], seed[b], offset[b], thr[b]);
    EXPECT(gtok[b] == r.token, "sample_draft (first pass %d, split %d) row %d: token %lld != %lld", first_pass, split, b,
           static_cast<long long>(gtok[b]),
           static_cast<long long>(r.token));
    EXPECT(close(gtp[b], r.token_prob) && close(gmp[b], r.max_prob) && close(gen[b], r.energy),
           "sample_draft row %d: floats %g %g %g vs %g %g %g", b, gtp[b], gmp[b], gen[b], r.token_prob, r.max_prob,
           r.energy);
    EXPECT(hfb[b] == r.fallback, "sample_draft row %d: fallback", b);
  }
}

static void test_verify_draft(std::mt19937& rng, int mode, int V, int first_pass, bool split = false,
                              bool greedy_only = false, bool fused = false) {
  const int B = 8, K = 4, K1 = K + 1;
  std::vector<float> logits(B * K1 * V), probs(B * K * V);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (auto& x : logits) x = normal(rng);
  for (int r = 0; r < B * K; ++r) {  // softmax rows for p_S
    double s = 0;
    for (int v = 0; v < V; ++v) s += probs[r * V + v] = std::exp(normal(rng));
    for (int v = 0; v < V; ++v) probs[r * V + v] = static_cast<float>(probs[r * V + v] / s);
  }
  const std::vector<int> drafted = {4, 3, 2, 1, 0, 4, 3, 2};  // (K = 4)
  std::vector<int64_t> ids(B * K);
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < K; ++j) {  // row b drafts drafted[b] tokens; half of them the argmax
      const float* z = &logits[(b * K1 + j) * V];
      ids[b * K + j] = j >= drafted[b] ? -1 : (j % 2 == 0 ? std::max_element(z, z + V) - z : (b * 37 + j) % V);
    }
  const std::vector<float> thr = {1.0f, 5.0f, 0.0f, 3.0f, 2.0f, 4.0f, 1.5f, 2.5f};
  // Rows 5-7 use min-p: alone in a sampling row, with top-k / top-p in another, and in a greedy row (no effect).
  std::vector<float> temp = {0.0f, 0.8f, 1.0f, 0.0f, 1.5f, 0.9f, 1.2f, 0.0f};
  std::vector<float> top_p = {1.0f, 0.9f, 1.0f, 1.0f, 0.7f, 1.0f, 0.95f, 1.0f};
  std::vector<float> min_p = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.1f, 0.3f, 0.3f};
  std::vector<int> top_k = {0, 0, 20, 3, 0, 0, 200, 0};
  if (greedy_only) {  // (top-k / top-p / min-p of greedy rows filters nothing in verify_draft)
    temp.assign(B, 0.0f);
  }
  const std::vector<int64_t> seed = {11, 12, 13, 14, 15, 16, 17, 18}, offset = {0, 1, 2, 3, 4, 5, 6, 7};
  Dev<int64_t> dids(ids), dseed(seed), doff(offset), oids(zeros<int64_t>(B * K1));
  Dev<float> dz(logits), dprobs(probs), dthr(thr), dt(temp), dp(top_p), dmp(min_p);
  Dev<int> dk(top_k), nacc(zeros<int>(B)), si(zeros<int>(3 * B * K1));
  Dev<float> dist(zeros<float>(B * K)), tprob(zeros<float>(B * K1)), sf(zeros<float>(2 * B * K1));
  const int n = B * K1;
  Dev<bild::RowPartial> part(std::vector<bild::RowPartial>(bild::verify_partials<float>(B, K, V)));
  Dev<bild::CutPartial> cut(std::vector<bild::CutPartial>(bild::verify_cut_partials<float>(B, V)));
  void* split_buf = nullptr;
  bild::CutSplit cs{};
  if (split) {
    CUDA_OK(cudaMalloc(&split_buf, bild::cut_split_bytes(n)));
    cs = bild::cut_split_carve(split_buf, n);
  }
  // the fused tail's counts, left nonzero on purpose: the launch clears them
  Dev<int> counts(std::vector<int>(n + B, 7));
  CUDA_OK(bild::VerifyDraft(dids.p, dz.p, dprobs.p, B, K, V, mode, {dthr.p, dt.p, dk.p, dp.p, dmp.p, dseed.p, doff.p},
                            {nacc.p, oids.p, dist.p, tprob.p},
                            {si.p, si.p + n, si.p + 2 * n, sf.p, sf.p + n, part.p, cut.p}, nullptr, first_pass,
                            split ? &cs : nullptr, greedy_only ? 0 : bild::kRowsAll, fused ? counts.p : nullptr));
  if (fused) {  // and left them at zero
    const auto left = counts.get();
    EXPECT(std::all_of(left.begin(), left.end(), [](int c) { return c == 0; }), "verify fused tail: counts left");
  }
  if (split_buf != nullptr) {
    CUDA_OK(cudaDeviceSynchronize());
    cudaFree(split_buf);
  }
  const auto gn = nacc.get();
  const auto gids = oids.get();
  const auto gd = dist.get(), gtp = tprob.get();
  for (int b = 0; b < B; ++b) {
    std::vector<std::vector<float>> z(K1), ps(K);
    for (int j = 0; j < K1; ++j) z[j].assign(&logits[(b * K1 + j) * V], &logits[(b * K1 + j + 1) * V]);
    for (int j = 0; j < K; ++j) ps[j].assign(&probs[(b * K + j) * V], &probs[(b * K + j + 1) * V]);
    const std::vector<int64_t> row(ids.begin() + b * K, ids.begin() + (b + 1) * K);
    const ref::Verify r =
        ref::verify_draft(row, z, mode, thr[b], ps, temp[b], top_k[b], top_p[b], min_p[b], seed[b], offset[b]);
    EXPECT(gn[b] == r.num_accepted, "verify mode %d (first pass %d, split %d) row %d: accepted %d != %d", mode,
           first_pass, split, b, gn[b], r.num_accepted);
    EXPECT(std::equal(r.output_ids.begin(), r.output_ids.end(), gids.begin() + b * K1), "verify mode %d row %d: ids",
           mode, b);
    for (int j = 0; j < K; ++j) EXPECT(close(gd[b * K + j], r.distances[j]), "verify distance %d %d", b, j);
    for (int j = 0; j < K1; ++j) EXPECT(close(gtp[b * K1 + j], r.target_probs[j]), "verify target prob %d %d", b, j);
  }
}

// apply_penalties in T = float / bf16 (logits rounded to T before the CPU twin sees them) at V = 1111 (rows off
// 16-byte alignment: the scalar kernel) and 4096 (the vector kernel): rows with output, prompt, repeated and drafted
// tokens, -1 pads, banned ids inside and past min_tokens, a logit bias, a neutral row and an empty history; outputs
// bit-identical.
template <typename T>
static void test_apply_penalties(std::mt19937& rng, int V) {
  const int B = 5, P = 4, L = 9, E = 3, K = P - 1;
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<T> logits(static_cast<size_t>(B) * P * V);
  std::vector<float> as_float(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) {
    logits[i] = static_cast<T>(normal(rng));
    as_float[i] = static_cast<float>(logits[i]);
  }
  as_float[7] = -ref::kInf;
  logits[7] = static_cast<T>(-ref::kInf);
  const std::vector<int64_t> token_ids = {3, 5, 5, -1, 7, 3, 9, 9, 9,     // prompt 3, 5 | output 7, 3, 9 x3
                                          1, 2, 3, 4, 5, 6, -1, -1, -1,   // all prompt
                                          -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 0, 0, 10, 10, 11, 12, 13, 14,
                                          8, 8, -1, 8, 2, 2, 2, 2, 2};
  const std::vector<int> prompt_lens = {4, 9, 0, 2, 0}, min_tokens = {6, 3, 2, 7, 0};
  const std::vector<int64_t> draft_ids = {9, 4, -1, 1, 1, 2, 5, 5, 5, 0, -1, 0, 8, 8, 8};
  const std::vector<double> rep = {1.3, 0.7, 2.0, 1.0, 1.1}, pres = {0.5, 0.0, -0.25, 0.0, 1.5},
                            freq = {0.2, 0.1, 0.0, 0.0, -0.3};
  const std::vector<int64_t> banned = {2, 9, -1, 0, -1, -1, 1, 1, 3, static_cast<int64_t>(V) - 1, 4, 8, -1, -1, -1};
  const int E2 = 2;  // a logit bias: on a penalised id, a banned one, one past the history, -1 pads, none
  const std::vector<int64_t> bias_ids = {9, 20, 2, -1, -1, -1, 0, static_cast<int64_t>(V) - 1, 8, 30};
  const std::vector<double> bias_values = {-1.5, 4.0, 2.0, 0.0, 0.0, 0.0, 0.75, -100.0, 3.25, -0.5};
  Dev<T> dz(logits), dout(std::vector<T>(logits.size()));
  Dev<int64_t> dtok(token_ids), ddraft(draft_ids), dban(banned), dbias_ids(bias_ids);
  Dev<double> dbias_values(bias_values);
  Dev<int> dpl(prompt_lens), dmin(min_tokens), scratch(std::vector<int>(B * V + B, 7));  // cleared by the launch
  Dev<double> drep(rep), dpres(pres), dfreq(freq);
  CUDA_OK(bild::ApplyPenalties<T>(dz.p, dout.p, dtok.p, dpl.p, ddraft.p, drep.p, dpres.p, dfreq.p, dmin.p, dban.p,
                                  dbias_ids.p, dbias_values.p, scratch.p, B, P, L, V, E, E2, nullptr));
  const std::vector<T> got = dout.get();
  for (int b = 0; b < B; ++b) {
    const std::vector<float> want = ref::apply_penalties(
        as_float, std::vector<int64_t>(token_ids.begin() + b * L, token_ids.begin() + (b + 1) * L), prompt_lens[b],
        std::vector<int64_t>(draft_ids.begin() + b * K, draft_ids.begin() + (b + 1) * K), rep[b], pres[b], freq[b],
        min_tokens[b], std::vector<int64_t>(banned.begin() + b * E, banned.begin() + (b + 1) * E),
        std::vector<int64_t>(bias_ids.begin() + b * E2, bias_ids.begin() + (b + 1) * E2),
        std::vector<double>(bias_values.begin() + b * E2, bias_values.begin() + (b + 1) * E2), b, P, V);
    int bad = 0;
    for (int i = 0; i < P * V; ++i) {
      const float g = static_cast<float>(got[static_cast<size_t>(b) * P * V + i]);
      const float w = static_cast<float>(static_cast<T>(want[i]));
      if (!(g == w || (std::isnan(g) && std::isnan(w)))) ++bad;
    }
    EXPECT(bad == 0, "apply_penalties (%zu-byte logits, V %d) row %d: %d of %d values differ", sizeof(T), V, b, bad,
           P * V);
  }
}

// apply_token_bitmask in T = float / bf16 / half / double at V = 1111 (bf16 / half rows off 16-byte alignment: the
// scalar kernel), 4096 (the vector kernel) and 40 (a row shorter than a block, 24 spare bits in its last word), with
// rows all allowed, none allowed, random, and bits set past V; R = 66000 rows of V = 40 stride over grid.y's 65535.
// Every output bit-identical: the kernel only selects.
template <typename T>
static void test_apply_token_bitmask(std::mt19937& rng, int R, int V) {
  const int W = (V + 31) / 32;
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<T> logits(static_cast<size_t>(R) * V);
  std::vector<float> as_float(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) {
    logits[i] = static_cast<T>(normal(rng));
    as_float[i] = static_cast<float>(logits[i]);
  }
  as_float[1] = -ref::kInf;  // a -inf already there, allowed or not
  logits[1] = static_cast<T>(-ref::kInf);
  std::vector<int32_t> bitmask(static_cast<size_t>(R) * W);
  for (int32_t& w : bitmask) w = static_cast<int32_t>(rng());
  for (int b = 0; b < R; ++b) {
    const size_t row = static_cast<size_t>(b) * W;
    if (b % 4 == 1) std::fill_n(bitmask.begin() + row, W, -1);  // all allowed (and every bit past V set)
    if (b % 4 == 2) std::fill_n(bitmask.begin() + row, W, 0);   // none allowed: all -inf
  }
  Dev<T> dz(logits), dout(std::vector<T>(logits.size()));
  Dev<int32_t> dmask(bitmask);
  CUDA_OK(bild::ApplyTokenBitmask<T>(dz.p, dmask.p, dout.p, R, V, nullptr));
  const std::vector<T> got = dout.get();
  int bad_rows = 0;
  for (int b = 0; b < R; ++b) {
    const std::vector<float> want = ref::apply_token_bitmask(as_float, bitmask, b, V);
    for (int t = 0; t < V; ++t) {
      const T w = static_cast<T>(want[t]);
      if (std::memcmp(&got[static_cast<size_t>(b) * V + t], &w, sizeof(T)) != 0) {
        ++bad_rows;
        break;
      }
    }
  }
  EXPECT(bad_rows == 0, "apply_token_bitmask (%zu-byte logits, R %d, V %d): %d rows differ", sizeof(T), R, V,
         bad_rows);
}

int main() {
  test_philox_host();
  int devices = 0;
  const cudaError_t err = cudaGetDeviceCount(&devices);
  if (err != cudaSuccess || devices == 0) {
    std::printf("host Philox check: %s; GPU tests skipped: no CUDA device (%s)\n",
                g_failures ? "FAILED" : "passed", err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    return g_failures ? 1 : 77;
  }
  std::mt19937 rng(1234);
  test_paged_kv(rng);
  for (int V : {1111, 4096}) {
    test_apply_penalties<float>(rng, V);
    test_apply_penalties<__nv_bfloat16>(rng, V);
  }
  for (int V : {1111, 4096, 40}) {
    test_apply_token_bitmask<float>(rng, 7, V);
    test_apply_token_bitmask<__nv_bfloat16>(rng, 7, V);
    test_apply_token_bitmask<__half>(rng, 7, V);
    test_apply_token_bitmask<double>(rng, 7, V);
  }
  test_apply_token_bitmask<__nv_bfloat16>(rng, 66000, 40);
  // V = 70001 is several chunks of the wide first pass too (fp32: 16384 a chunk; stream: 8192).
  for (int first_pass : {bild::kFirstPassChunked, bild::kFirstPassWide, bild::kFirstPassStream, bild::kFirstPassLong}) {
    for (int V : {1111, 9001, 70001}) test_sample_draft(rng, V, first_pass);
    for (int V : {333, 9001, 70001})
      for (int mode : {bild::kModeGreedy, bild::kModeBild, bild::kModeSample})
        test_verify_draft(rng, mode, V, first_pass);
  }
  // Greedy rows launched with rows = 0: no scaled statistics, top-k / top-p / min-p or sampled-token kernels.
  for (int first_pass : {bild::kFirstPassChunked, bild::kFirstPassStream}) {
    for (int V : {1111, 70001}) test_sample_draft(rng, V, first_pass, /*split=*/false, /*greedy_only=*/true);
    for (int V : {333, 70001})
      for (int mode : {bild::kModeGreedy, bild::kModeBild, bild::kModeSample})
        test_verify_draft(rng, mode, V, first_pass, /*split=*/true, /*greedy_only=*/true);
  }
  // The fused tails (SampleFusedTail, VerifyFusedTail: merge and finish inside the first pass) of greedy rows after
  // the chunked, stream and long passes; 70001 is several chunks a row, 333 one.
  for (int first_pass : {bild::kFirstPassChunked, bild::kFirstPassStream, bild::kFirstPassLong}) {
    for (int V : {333, 9001, 70001}) test_sample_draft(rng, V, first_pass, false, /*greedy_only=*/true, /*fused=*/true);
    for (int V : {333, 9001, 70001})
      for (int mode : {bild::kModeGreedy, bild::kModeBild, bild::kModeSample})
        test_verify_draft(rng, mode, V, first_pass, /*split=*/false, /*greedy_only=*/true, /*fused=*/true);
  }
  // The split cut-off search, after the default first pass of each op and after the chunked one.
  for (int first_pass : {bild::kFirstPassChunked, bild::kFirstPassStream}) {
    for (int V : {1111, 9001, 70001}) test_sample_draft(rng, V, first_pass, /*split=*/true);
    for (int V : {333, 9001, 70001})
      for (int mode : {bild::kModeGreedy, bild::kModeBild, bild::kModeSample})
        test_verify_draft(rng, mode, V, first_pass, /*split=*/true);
  }
  CUDA_OK(cudaDeviceSynchronize());
  std::printf("%s (%d failures)\n", g_failures ? "FAILED" : "all native kernel tests passed", g_failures);
  return g_failures ? 1 : 0;
}
