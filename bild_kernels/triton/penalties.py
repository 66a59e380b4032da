"""Triton penalties on the large model's logits (spec: `bild_kernels.reference.apply_penalties_ref`).

The public op `bild_kernels.ops.apply_penalties` validates inputs; the launcher here only allocates the output and
one zeroed scratch buffer (each row's token histogram) and launches two kernels. No host reads: every penalty and
length is read on the device, so the launch can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bild_kernels._backend import triton_interpret
from bild_kernels.triton._sampling_common import stream_block

# A histogram entry is the token's count in the row's output (bits 0-29: L < 2**30) with bit 30 set where the
# prompt holds it: one int32 per (row, token) to zero, fill and read.
PROMPT_BIT = tl.constexpr(1 << 30)


# Grid (cdiv(L, BLOCK_L), B): one program per run of BLOCK_L of a row's committed tokens. Each output token adds one
# to its histogram entry (atomically: a token may repeat within and across programs), each prompt token ORs in
# PROMPT_BIT, and the program adds its output-token count to the row's n_out (what min_tokens is measured against).
# -1 pads are skipped wherever they stand.
@triton.jit
def _penalty_counts_kernel(token_ids_ptr, prompt_lens_ptr, hist_ptr, n_out_ptr, L, V, BLOCK_L: tl.constexpr):
    b = tl.program_id(1)
    j = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    ids = tl.load(token_ids_ptr + b.to(tl.int64) * L + j, mask=j < L, other=-1)
    valid = ids >= 0
    is_out = valid & (j >= tl.load(prompt_lens_ptr + b))
    entry = hist_ptr + b.to(tl.int64) * V + tl.where(valid, ids, 0)
    tl.atomic_add(entry, tl.full([BLOCK_L], 1, tl.int32), mask=is_out)
    tl.atomic_or(entry, tl.full([BLOCK_L], PROMPT_BIT, tl.int32), mask=valid & ~is_out)
    tl.atomic_add(n_out_ptr + b, tl.sum(is_out.to(tl.int32), axis=0))


@triton.jit
def _to_logits(z, out_ptr, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:
        # The interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest even: round by hand (bits +
        # 0x7FFF + lsb) so that the truncating cast that follows is exact (-inf and NaN keep their bits).
        bits = z.to(tl.uint32, bitcast=True)
        z = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return z.to(out_ptr.dtype.element_ty)


# Grid (cdiv(V, BLOCK_V), B): one program per BLOCK_V tokens of a row serves all P positions of the row, so the
# histogram block (counts and prompt flags), the row's penalties, its logit bias (the sum over its E2 entries of
# those whose id is the column's: one at most) and its banned mask (BLOCK_V columns against the E banned ids) are
# read once and kept in registers. Position p first adds drafted token p-1 to the counts (the draft before p counts
# as output there), then reads its logits block, applies the reference's rule in order (the logit bias, repetition,
# frequency, presence, min_tokens' -inf) in float32 (F64: float64) and stores it in the logits' dtype.
@triton.jit
def _apply_penalties_kernel(logits_ptr, out_ptr, hist_ptr, n_out_ptr, draft_ids_ptr, repetition_penalty_ptr,
                            presence_penalty_ptr, frequency_penalty_ptr, min_tokens_ptr, banned_ids_ptr, bias_ids_ptr,
                            bias_values_ptr, P, V, E, E2, BLOCK_V: tl.constexpr, F64: tl.constexpr,
                            ROUND_BF16: tl.constexpr):
    b = tl.program_id(1)
    b64 = b.to(tl.int64)
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < V
    h = tl.load(hist_ptr + b64 * V + cols, mask=in_row, other=0)
    count = h & (PROMPT_BIT - 1)
    in_prompt = (h & PROMPT_BIT) != 0
    banned = tl.zeros([BLOCK_V], tl.int1)
    for e in range(0, E):  # -1 pads match no column
        banned = banned | (cols == tl.load(banned_ids_ptr + b64 * E + e))
    if F64:
        r = tl.load(repetition_penalty_ptr + b)
        presence = tl.load(presence_penalty_ptr + b)
        frequency = tl.load(frequency_penalty_ptr + b)
    else:
        r = tl.load(repetition_penalty_ptr + b).to(tl.float32)
        presence = tl.load(presence_penalty_ptr + b).to(tl.float32)
        frequency = tl.load(frequency_penalty_ptr + b).to(tl.float32)
    bias = tl.zeros([BLOCK_V], tl.float64 if F64 else tl.float32)  # the row's logit bias on these columns
    for e in range(0, E2):  # -1 pads match no column; an id appears at most once a row
        x = tl.load(bias_values_ptr + b64 * E2 + e)
        bias += tl.where(cols == tl.load(bias_ids_ptr + b64 * E2 + e), x if F64 else x.to(tl.float32), 0.0)
    n_out = tl.load(n_out_ptr + b)
    min_tokens = tl.load(min_tokens_ptr + b)
    for p in range(0, P):
        drafted = tl.load(draft_ids_ptr + b64 * (P - 1) + p - 1, mask=p > 0, other=-1)
        count += (cols == drafted).to(tl.int32)
        offs = (b64 * P + p) * V + cols
        z = tl.load(logits_ptr + offs, mask=in_row, other=0.0).to(tl.float64 if F64 else tl.float32)
        if E2 > 0:  # (+0 on the other columns, as the reference: -0.0 becomes +0.0 there; no bias, no change)
            z = z + bias
        if F64:
            quotient = z / r  # float64 division rounds correctly; float32's `/` is approximate on the GPU
        else:
            quotient = tl.math.div_rn(z, r)
        seen = in_prompt | (count > 0)
        z = tl.where(seen, tl.where(z < 0, z * r, quotient), z)
        z = z - frequency * count.to(z.dtype)
        z = z - presence * (count > 0).to(z.dtype)
        z = tl.where(banned & (n_out + p < min_tokens), float("-inf"), z)
        tl.store(out_ptr + offs, _to_logits(z, out_ptr, ROUND_BF16), mask=in_row)


def apply_penalties(logits, token_ids, prompt_lens, draft_ids, repetition_penalty, presence_penalty,
                    frequency_penalty, min_tokens, banned_ids, bias_ids, bias_values):
    B, P, V = logits.shape
    L, E, E2 = token_ids.shape[1], banned_ids.shape[1], bias_ids.shape[1]
    out = torch.empty_like(logits)
    if out.numel() == 0:
        return out
    dev = logits.device
    scratch = torch.zeros(B * V + B, dtype=torch.int32, device=dev)  # the histograms [B, V], then n_out [B]
    hist, n_out = scratch[:B * V], scratch[B * V:]
    if L:
        BLOCK_L = min(triton.next_power_of_2(L), 1024)
        _penalty_counts_kernel[(triton.cdiv(L, BLOCK_L), B)](token_ids, prompt_lens, hist, n_out, L, V,
                                                             BLOCK_L=BLOCK_L, num_warps=4)
    BLOCK_V, warps = stream_block(B, V)
    round_bf16 = triton_interpret() and logits.dtype == torch.bfloat16
    _apply_penalties_kernel[(triton.cdiv(V, BLOCK_V), B)](
        logits, out, hist, n_out, draft_ids, repetition_penalty, presence_penalty, frequency_penalty, min_tokens,
        banned_ids, bias_ids, bias_values, P, V, E, E2, BLOCK_V=BLOCK_V, F64=logits.dtype == torch.float64,
        ROUND_BF16=round_bf16, num_warps=warps, enable_fp_fusion=False)
    return out


# One representative compilation per kernel and logits dtype (bf16 serving, fp16, fp32, fp64), for the sm_90 AOT check.
def _aot_counts() -> tuple:
    sig = {"token_ids_ptr": "*i64", "prompt_lens_ptr": "*i32", "hist_ptr": "*i32", "n_out_ptr": "*i32", "L": "i32",
           "V": "i32", "BLOCK_L": "constexpr"}
    assert list(sig) == _penalty_counts_kernel.arg_names, (list(sig), _penalty_counts_kernel.arg_names)
    return _penalty_counts_kernel, sig, {"BLOCK_L": 1024}


def _aot_apply(dtype: str) -> tuple:
    sig = {"logits_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "hist_ptr": "*i32", "n_out_ptr": "*i32",
           "draft_ids_ptr": "*i64", "repetition_penalty_ptr": "*fp64", "presence_penalty_ptr": "*fp64",
           "frequency_penalty_ptr": "*fp64", "min_tokens_ptr": "*i32", "banned_ids_ptr": "*i64",
           "bias_ids_ptr": "*i64", "bias_values_ptr": "*fp64", "P": "i32", "V": "i32", "E": "i32", "E2": "i32",
           "BLOCK_V": "constexpr", "F64": "constexpr", "ROUND_BF16": "constexpr"}
    assert list(sig) == _apply_penalties_kernel.arg_names, (list(sig), _apply_penalties_kernel.arg_names)
    return _apply_penalties_kernel, sig, {"BLOCK_V": 2048, "F64": dtype == "fp64", "ROUND_BF16": False}


AOT_SPECS = [_aot_counts(), _aot_apply("bf16"), _aot_apply("fp16"), _aot_apply("fp32"), _aot_apply("fp64")]
