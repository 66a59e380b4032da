"""PyTorch twins of every kernel: the specification (one module a family of ops, all of it here).

Every Triton and CUDA kernel in this package must agree with the function here of the same stem
(`write_paged_kv` <-> `write_paged_kv_ref`). Inputs are assumed valid (the public ops in
`bild_kernels.ops` validate); math is done in float32 (float64 inputs stay float64).

Random numbers: every random op draws from one counter-based generator, Philox4x32-10, keyed by a
per-row int64 `seed` and addressed by a counter (c0, c1, c2, c3) = (index, offset_lo, offset_hi,
purpose << 24 | position). `index` runs over the vocabulary (or is 0 for a single draw), `offset`
is the per-row int64 step counter the caller advances, `purpose` separates the streams of
different ops. The first output word x gives the uniform u = ((x >> 9) + 0.5) / 2**23, exact in float32, in
[2**-24, 1 - 2**-24]: never 0 or 1, so a Gumbel draw -log(-log(u)) is finite and at most GUMBEL_MAX, which lets
a Gumbel-max kernel skip the draw of any logit that cannot beat its best so far and still return exactly this
reference's token.
Because the counter, not a hidden state, addresses every number, the op can be captured in a CUDA
graph (seed and offset are device tensors) and this reference reproduces the kernels exactly.
"""
from bild_kernels.reference.philox import (
    GUMBEL_MAX, PURPOSE_DRAFT_SAMPLE, PURPOSE_VERIFY_ACCEPT, PURPOSE_VERIFY_TOKEN, gumbel_ref, philox_ref,
    uniform_of_word, uniform_ref)
from bild_kernels.reference.paged_kv import (
    gather_paged_kv_ref, reserve_paged_kv_ref, rollback_paged_kv_ref, write_paged_kv_ref)
from bild_kernels.reference.cpu_linear import (
    cpu_linear_int8_ref, cpu_linear_q4_1_ref, cpu_linear_q4_1x16_ref, cpu_linear_q8_0_ref, cpu_linear_q8_0x16_ref,
    cpu_linear_q8_0x16_stats_ref, cpu_linear_ref, logit_row_stats_ref, q4_1_dequantize, q4_1_quantize, q4_1x16_pack,
    q4_1x16_quantize_rows, q4_1x16_unpack, q8_0x16_pack)
from bild_kernels.reference.cpu_layers import (
    cpu_decoder_layer_ref, cpu_feature_draft_chain_ref, cpu_feature_input_ref, cpu_rms_norm_ref)
from bild_kernels.reference.sampling import sample_draft_ref
from bild_kernels.reference.verify import MODES, MODE_BILD, MODE_GREEDY, MODE_SAMPLE, verify_draft_ref
from bild_kernels.reference.penalties import apply_penalties_ref
from bild_kernels.reference.token_bitmask import apply_token_bitmask_ref, pack_token_bitmask, unpack_token_bitmask

__all__ = [
    'GUMBEL_MAX', 'PURPOSE_DRAFT_SAMPLE', 'PURPOSE_VERIFY_ACCEPT', 'PURPOSE_VERIFY_TOKEN', 'gumbel_ref', 'philox_ref',
    'uniform_of_word', 'uniform_ref', 'gather_paged_kv_ref', 'reserve_paged_kv_ref', 'rollback_paged_kv_ref',
    'write_paged_kv_ref', 'cpu_linear_int8_ref', 'cpu_linear_q4_1_ref', 'cpu_linear_q4_1x16_ref',
    'cpu_linear_q8_0_ref', 'cpu_linear_q8_0x16_ref', 'cpu_linear_q8_0x16_stats_ref', 'cpu_linear_ref',
    'logit_row_stats_ref', 'q4_1_dequantize', 'q4_1_quantize', 'q4_1x16_pack', 'q4_1x16_quantize_rows',
    'q4_1x16_unpack', 'q8_0x16_pack', 'cpu_decoder_layer_ref', 'cpu_feature_draft_chain_ref', 'cpu_feature_input_ref',
    'cpu_rms_norm_ref', 'sample_draft_ref', 'MODES', 'MODE_BILD', 'MODE_GREEDY', 'MODE_SAMPLE',
    'verify_draft_ref', 'apply_penalties_ref', 'apply_token_bitmask_ref', 'pack_token_bitmask', 'unpack_token_bitmask']
