// The one binding file: op schemas (namespace bild_kernels_C) and their CUDA kernels. Importing the
// Python module bild_kernels._C runs the static registrations below; the module itself is empty.
// Positional arguments are those of the reference functions in bild_kernels/reference/.
#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace bild {
// paged_kv.cu
void write_paged_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
                    const at::Tensor& slot_mapping);
void reserve_paged_kv(at::Tensor& block_tables, at::Tensor& context_lens, const at::Tensor& num_new,
                      at::Tensor& free_blocks, at::Tensor& num_free, int64_t block_size);
void rollback_paged_kv(at::Tensor& block_tables, at::Tensor& context_lens, const at::Tensor& num_rejected,
                       at::Tensor& free_blocks, at::Tensor& num_free, int64_t block_size);
std::tuple<at::Tensor, at::Tensor> gather_paged_kv(const at::Tensor& key_cache, const at::Tensor& value_cache,
                                                   const at::Tensor& block_tables, const at::Tensor& context_lens);
// penalties.cu
at::Tensor apply_penalties(const at::Tensor& logits, const at::Tensor& token_ids, const at::Tensor& prompt_lens,
                           const at::Tensor& draft_ids, const at::Tensor& repetition_penalty,
                           const at::Tensor& presence_penalty, const at::Tensor& frequency_penalty,
                           const at::Tensor& min_tokens, const at::Tensor& banned_ids, const at::Tensor& bias_ids,
                           const at::Tensor& bias_values);
// token_bitmask.cu
at::Tensor apply_token_bitmask(const at::Tensor& logits, const at::Tensor& bitmask);
// sampling.cu
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_draft(
    const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& fallback_threshold,
    const std::optional<at::Tensor>& min_p, int64_t rows);
// verify.cu
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> verify_draft(
    const at::Tensor& draft_ids, const at::Tensor& target_logits, int64_t mode, const at::Tensor& rollback_threshold,
    const std::optional<at::Tensor>& draft_probs, const at::Tensor& temperature, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& seed, const at::Tensor& offset, const std::optional<at::Tensor>& min_p,
    int64_t rows);
// sampling.cu: the first pass over V of sample_draft and verify_draft (0 chunked, 1 wide, 2 auto); none throws
int current_first_pass();
int64_t set_first_pass(int64_t kind);
int64_t resolve_first_pass_for(int64_t rows, int64_t V, int64_t elem_size, bool verify, int64_t sms);
// sampling.cu: the top-k / top-p / min-p cut-off search (0 block, 1 split, 2 auto); none throws
int current_cut_search();
int64_t set_cut_search(int64_t kind);
int64_t resolve_cut_search_for(int64_t launch_rows, int64_t rows, bool verify);
int current_fused_tail();
int64_t set_fused_tail(int64_t kind);
int64_t resolve_fused_tail_for(int64_t rows, int64_t first_pass, bool verify);
}  // namespace bild

TORCH_LIBRARY(bild_kernels_C, m) {
  m.def("write_paged_kv(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
        "Tensor slot_mapping) -> ()");
  m.def("reserve_paged_kv(Tensor(a!) block_tables, Tensor(b!) context_lens, Tensor num_new, "
        "Tensor(c!) free_blocks, Tensor(d!) num_free, int block_size) -> ()");
  m.def("rollback_paged_kv(Tensor(a!) block_tables, Tensor(b!) context_lens, Tensor num_rejected, "
        "Tensor(c!) free_blocks, Tensor(d!) num_free, int block_size) -> ()");
  m.def("gather_paged_kv(Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor context_lens) "
        "-> (Tensor, Tensor)");
  // min_p: None (off) or [B] float32 (0: off), as the reference's. rows (last, not in the
  // reference): what the caller knows of the rows, 1 some sample, 2 some use top-k / top-p / min-p, 4 the 2 is a
  // guess (7, the default: nothing known); the kernels that serve only kinds left out are not launched
  m.def("sample_draft(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor seed, Tensor offset, "
        "Tensor fallback_threshold, Tensor? min_p=None, int rows=7) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("verify_draft(Tensor draft_ids, Tensor target_logits, int mode, Tensor rollback_threshold, "
        "Tensor? draft_probs, Tensor temperature, Tensor top_k, Tensor top_p, Tensor seed, Tensor offset, "
        "Tensor? min_p=None, int rows=7) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("apply_penalties(Tensor logits, Tensor token_ids, Tensor prompt_lens, Tensor draft_ids, "
        "Tensor repetition_penalty, Tensor presence_penalty, Tensor frequency_penalty, Tensor min_tokens, "
        "Tensor banned_ids, Tensor bias_ids, Tensor bias_values) -> Tensor");
  // bitmask: [..., ceil(V / 32)] int32 (xgrammar's layout) for logits [..., V]
  m.def("apply_token_bitmask(Tensor logits, Tensor bitmask) -> Tensor");
}

// The same functions serve the CPU key only to fail with a message that names the op, the tensor and
// the backends that do run on the CPU (the dispatcher's own "no kernel for CPU" error names none).
#define BILD_REGISTER_ALL(m)                                 \
  m.impl("write_paged_kv", &bild::write_paged_kv);           \
  m.impl("reserve_paged_kv", &bild::reserve_paged_kv);       \
  m.impl("rollback_paged_kv", &bild::rollback_paged_kv);     \
  m.impl("gather_paged_kv", &bild::gather_paged_kv);         \
  m.impl("sample_draft", &bild::sample_draft);               \
  m.impl("verify_draft", &bild::verify_draft);               \
  m.impl("apply_penalties", &bild::apply_penalties);         \
  m.impl("apply_token_bitmask", &bild::apply_token_bitmask)

TORCH_LIBRARY_IMPL(bild_kernels_C, CUDA, m) { BILD_REGISTER_ALL(m); }
TORCH_LIBRARY_IMPL(bild_kernels_C, CPU, m) { BILD_REGISTER_ALL(m); }

PYBIND11_MODULE(_C, m) {
  m.def("first_pass", &bild::current_first_pass,
        "The first pass over V that sample_draft and verify_draft launch: 0 chunked (RowChunkStatsKernel), "
        "1 wide (RowWideStatsKernel), 2 auto (per launch, csrc/common.cuh resolve_first_pass; the default), 3 stream "
        "(RowStreamStatsKernel + RowScaledStatsKernel)");
  m.def("set_first_pass", &bild::set_first_pass, pybind11::arg("kind"),
        "Choose the first pass over V for the whole process (0 chunked, 1 wide, 2 auto, 3 stream); returns the previous "
        "one, or -1 for another kind (nothing changes). A CUDA graph keeps the kernel it captured.");
  m.def("cut_search", &bild::current_cut_search,
        "The top-k / top-p / min-p cut-off search sample_draft and verify_draft run: 0 block (filter_cut, one block a "
        "row), 1 split (CutSplitPassKernel: each pass over every chunk of every row), 2 auto (per launch, "
        "csrc/common.cuh use_cut_split; the default)");
  m.def("set_cut_search", &bild::set_cut_search, pybind11::arg("kind"),
        "Choose the cut-off search for the whole process (0 block, 1 split, 2 auto); returns the previous one, or -1 for "
        "another kind (nothing changes). A CUDA graph keeps the kernels it captured.");
  m.def("fused_tail", &bild::current_fused_tail,
        "How sample_draft and verify_draft end after their first pass: 0 launches (their row / position kernels), 1 "
        "fused (SampleFusedTail, VerifyFusedTail inside the chunked, stream or long first pass, where the rows allow: "
        "csrc/common.cuh use_fused_tail), 2 auto (the launches; the default)");
  m.def("set_fused_tail", &bild::set_fused_tail, pybind11::arg("kind"),
        "Choose how the two ops end for the whole process (0 launches, 1 fused, 2 auto); returns the previous one, or "
        "-1 for another kind (nothing changes). A CUDA graph keeps the kernels it captured.");
  m.def("resolve_fused_tail", &bild::resolve_fused_tail_for, pybind11::arg("rows"), pybind11::arg("first_pass"),
        pybind11::arg("verify"),
        "The tail (0 launches, 1 fused) a launch runs under the current setting, given the caller's rows hint, the "
        "launch's first pass (0 chunked, 1 wide, 3 stream, 4 long) and the op (verify: verify_draft, else "
        "sample_draft); -1 for arguments out of range");
  m.def("resolve_cut_search", &bild::resolve_cut_search_for, pybind11::arg("launch_rows"), pybind11::arg("rows"),
        pybind11::arg("verify"),
        "The cut-off search (0 block, 1 split) a launch over `launch_rows` rows runs under the current setting, given "
        "the caller's rows hint (1 some row samples, 2 some row uses top-k / top-p / min-p, 4 the 2 guessed, 7 "
        "unknown; verify: a verify_draft launch, else sample_draft); -1 for arguments out of range");
  m.def("resolve_first_pass", &bild::resolve_first_pass_for, pybind11::arg("rows"), pybind11::arg("V"),
        pybind11::arg("elem_size"), pybind11::arg("verify"), pybind11::arg("sms"),
        "The first pass (0 chunked, 1 wide, 3 stream) a launch over `rows` rows of V logits of `elem_size` bytes runs under "
        "the current setting on a GPU of `sms` multiprocessors (verify: a verify_draft launch, else sample_draft); -1 for "
        "arguments out of range");
}
