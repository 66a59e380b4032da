// Torch layer of sample_draft: check inputs, allocate outputs, pick the current stream, launch (sampling.cuh).
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>

#include <atomic>

#include "sampling.cuh"
#include "torch_utils.h"

namespace bild {

// Which first pass sample_draft and verify_draft launch (kFirstPassChunked, kFirstPassWide, kFirstPassAuto,
// kFirstPassStream or kFirstPassLong),
// for the whole process; bild_kernels._C.set_first_pass(kind) sets it (CUDA graphs keep the kernel of their
// capture).
static std::atomic<int> g_first_pass{kFirstPassAuto};

int current_first_pass() { return g_first_pass.load(std::memory_order_relaxed); }

// Returns the previous setting, or -1 (and changes nothing) for a kind that is none of the five: no C++
// exception crosses this pybind11 binding (one thrown here crashed the process on an H200 machine whose
// extension was built with another compiler than torch; the Python wrapper raises instead).
int64_t set_first_pass(int64_t kind) {
  if (kind != kFirstPassChunked && kind != kFirstPassWide && kind != kFirstPassAuto && kind != kFirstPassStream &&
      kind != kFirstPassLong) {
    return -1;
  }
  return g_first_pass.exchange(static_cast<int>(kind));
}

// Which top-k / top-p / min-p cut-off search (kCutSearchBlock, kCutSearchSplit or kCutSearchAuto: common.cuh) the two
// ops run, for the whole process; bild_kernels._C.set_cut_search(kind) sets it. Auto decides per launch
// (use_cut_split).
static std::atomic<int> g_cut_search{kCutSearchAuto};

int current_cut_search() { return g_cut_search.load(std::memory_order_relaxed); }

// Returns the previous setting, or -1 (and changes nothing) for a kind that is none of the three.
int64_t set_cut_search(int64_t kind) {
  if (kind != kCutSearchBlock && kind != kCutSearchSplit && kind != kCutSearchAuto) return -1;
  return g_cut_search.exchange(static_cast<int>(kind));
}

// The split search's scratch for R rows and D draws (`buf` keeps it alive) where the current setting runs it for
// this launch (rows: the caller's hint; verify: a verify_draft launch), else nullptr.
const CutSplit* cut_split_scratch(int64_t R, int64_t D, const at::Tensor& like, at::Tensor& buf, CutSplit& split,
                                  int rows, bool verify) {
  if (!use_cut_split(current_cut_search(), R, rows, verify)) return nullptr;
  buf = at::empty({cut_split_bytes(R, D)}, like.options().dtype(at::kByte));
  split = cut_split_carve(buf.data_ptr(), R, D);
  return &split;
}

int64_t resolve_cut_search_for(int64_t launch_rows, int64_t rows, bool verify) {
  if (launch_rows < 0 || rows < 0 || rows > kRowsUnknown) return -1;
  return use_cut_split(current_cut_search(), launch_rows, static_cast<int>(rows), verify) ? kCutSearchSplit
                                                                                          : kCutSearchBlock;
}

// How the two ops end after their first pass (kTailLaunches, kTailFused or kTailAuto: common.cuh), for the whole
// process; bild_kernels._C.set_fused_tail(kind) sets it. Auto is the launches until the fused tails are timed.
static std::atomic<int> g_fused_tail{kTailAuto};

int current_fused_tail() { return g_fused_tail.load(std::memory_order_relaxed); }

// Returns the previous setting, or -1 (and changes nothing) for a kind that is none of the three.
int64_t set_fused_tail(int64_t kind) {
  if (kind != kTailLaunches && kind != kTailFused && kind != kTailAuto) return -1;
  return g_fused_tail.exchange(static_cast<int>(kind));
}

// The fused tail's n counts (`buf` keeps them alive) where the current setting runs it for this launch (rows: the
// caller's hint; first_pass: the launch's resolved kind; verify: a verify_draft launch), else nullptr.
int* fused_tail_counts(int64_t n, const at::Tensor& like, at::Tensor& buf, int rows, int first_pass, bool verify) {
  if (!use_fused_tail(current_fused_tail(), rows, first_pass, verify)) return nullptr;
  buf = at::empty({n}, like.options().dtype(at::kInt));
  return buf.data_ptr<int>();
}

int64_t resolve_fused_tail_for(int64_t rows, int64_t first_pass, bool verify) {
  if (rows < 0 || rows > kRowsUnknown || first_pass < kFirstPassChunked || first_pass > kFirstPassLong ||
      first_pass == kFirstPassAuto) {
    return -1;
  }
  return use_fused_tail(current_fused_tail(), static_cast<int>(rows), static_cast<int>(first_pass), verify)
             ? kTailFused
             : kTailLaunches;
}

int device_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

int64_t resolve_first_pass_for(int64_t rows, int64_t V, int64_t elem_size, bool verify, int64_t sms) {
  if (rows < 0 || V <= 0 || V >= (1LL << 31) || (elem_size != 2 && elem_size != 4) || sms <= 0) return -1;
  return resolve_first_pass(current_first_pass(), rows, static_cast<int>(V), static_cast<int>(elem_size),
                            verify, static_cast<int>(sms));
}

// The per-row parameter vectors of sample_draft and verify_draft: [B] each, of the reference's dtypes.
// min_p may be absent (off): the kernels then read a null pointer as 0 for every row.
const float* check_row_params(const char* op, int64_t B, const at::Tensor& temperature, const at::Tensor& top_k,
                              const at::Tensor& top_p, const at::Tensor& seed, const at::Tensor& offset,
                              const std::optional<at::Tensor>& min_p) {
  const at::Tensor& mp = min_p.has_value() ? *min_p : temperature;  // (temperature: checked as itself twice)
  const std::pair<const char*, const at::Tensor*> params[] = {{"temperature", &temperature}, {"top_k", &top_k},
                                                              {"top_p", &top_p},             {"seed", &seed},
                                                              {"offset", &offset},           {"min_p", &mp}};
  for (const auto& [name, t] : params) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, "bild_kernels_C::", op, ": ", name, " must be [B] = [", B,
                "], got ", t->sizes());
    check_contiguous(op, name, *t);
  }
  check_dtype(op, "temperature", temperature, at::kFloat);
  check_dtype(op, "top_k", top_k, at::kInt);
  check_dtype(op, "top_p", top_p, at::kFloat);
  check_dtype(op, "seed", seed, at::kLong);
  check_dtype(op, "offset", offset, at::kLong);
  check_dtype(op, "min_p", mp, at::kFloat);
  return min_p.has_value() ? min_p->const_data_ptr<float>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_draft(
    const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& fallback_threshold,
    const std::optional<at::Tensor>& min_p, int64_t rows) {
  constexpr const char* op = "sample_draft";
  TORCH_CHECK(rows >= 0 && rows <= kRowsUnknown, op, ": rows must be in [0, 7] (1: some row samples, 2: some row uses "
              "top-k / top-p / min-p, 4: the 2 is a guess), got ", rows);
  check_cuda(op, {{"logits", &logits}, {"temperature", &temperature}, {"top_k", &top_k}, {"top_p", &top_p},
                  {"seed", &seed}, {"offset", &offset}, {"fallback_threshold", &fallback_threshold},
                  {"min_p", min_p.has_value() ? &*min_p : &temperature}});
  // logits: [B, V] float16 / bfloat16 / float32 (float64 is computed in float32, as the Triton backend)
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, op, ": logits must be [B, V] with V > 0");
  const at::Tensor z = (logits.scalar_type() == at::kDouble ? logits.to(at::kFloat) : logits).contiguous();
  const int64_t B = z.size(0), V = z.size(1);
  TORCH_CHECK(V < (1LL << 24), op, ": V must be below 2^24, got ", V);
  // temperature, top_p, min_p: [B] f32; top_k: [B] i32; seed, offset: [B] i64
  const float* min_p_ptr = check_row_params(op, B, temperature, top_k, top_p, seed, offset, min_p);
  // fallback_threshold: [B] f32
  check_dtype(op, "fallback_threshold", fallback_threshold, at::kFloat);
  TORCH_CHECK(fallback_threshold.dim() == 1 && fallback_threshold.size(0) == B && fallback_threshold.is_contiguous(),
              op, ": fallback_threshold must be a contiguous [B] tensor");

  const c10::cuda::CUDAGuard guard(z.device());
  const auto f32 = z.options().dtype(at::kFloat);
  at::Tensor token_ids = at::empty({B}, z.options().dtype(at::kLong));
  at::Tensor token_probs = at::empty({B}, f32), max_probs = at::empty({B}, f32), energies = at::empty({B}, f32);
  at::Tensor fallback = at::empty({B}, z.options().dtype(at::kBool));
  const SampleDraftParams prm{temperature.const_data_ptr<float>(), top_k.const_data_ptr<int>(),
                              top_p.const_data_ptr<float>(),       min_p_ptr,
                              seed.const_data_ptr<int64_t>(),      offset.const_data_ptr<int64_t>(),
                              fallback_threshold.const_data_ptr<float>()};
  const SampleDraftOutputs out{token_ids.data_ptr<int64_t>(), token_probs.data_ptr<float>(),
                               max_probs.data_ptr<float>(), energies.data_ptr<float>(), fallback.data_ptr<bool>()};
  at::Tensor split_buf;
  CutSplit split;
  // (draws: the chunks of float32 rows, the most of any dtype)
  const CutSplit* split_ptr = cut_split_scratch(B, B * row_splits<float>(static_cast<int>(V)), z, split_buf, split,
                                                static_cast<int>(rows), false);
  dispatch_logits(op, z.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const int64_t n_partials = sample_draft_partials<T>(B, V);
    TORCH_CHECK(n_partials < (1LL << 31), op, ": B * ceil(V / ", chunk_elems<T>(), ") must be below 2^31");
    at::Tensor partials = at::empty({n_partials * static_cast<int64_t>(sizeof(RowPartial) / sizeof(float))}, f32);
    const int first_pass =
        resolve_first_pass(current_first_pass(), B, static_cast<int>(V), sizeof(T), false, device_sms());
    at::Tensor tail_buf;
    C10_CUDA_CHECK(SampleDraft<T>(static_cast<const T*>(z.const_data_ptr()), B, V, prm, out,
                                  reinterpret_cast<RowPartial*>(partials.data_ptr<float>()),
                                  c10::cuda::getCurrentCUDAStream(), first_pass, split_ptr, static_cast<int>(rows),
                                  fused_tail_counts(B, z, tail_buf, static_cast<int>(rows), first_pass, false)));
  });
  return {token_ids, token_probs, max_probs, energies, fallback};
}

}  // namespace bild
