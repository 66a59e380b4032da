"""Triton draft sampling (spec: `bild_kernels.reference.sample_draft_ref`).

The public op `bild_kernels.ops.sample_draft` validates inputs; the launcher here only allocates the
outputs and picks the launch shape. No host reads: seed, offset and every sampling parameter are read
on the device, so the launch can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bild_kernels._backend import triton_interpret
from bild_kernels import reference as R
from bild_kernels.triton._sampling_common import CUT_BUCKETS, filter_threshold, kept_pass, row_params, row_pass

PURPOSE_DRAFT_SAMPLE = tl.constexpr(R.PURPOSE_DRAFT_SAMPLE)


# Grid (B,): one program per row walks its V logits in BLOCK_V chunks. Rows without top-k/top-p make ONE
# pass: online logsumexp at temperature 1 (max_probs) and at T (energies), running argmax (greedy rows) or
# running Gumbel-max (sampling rows); the softmax never reaches global memory. Rows that enable top-k/top-p
# add the cut-off search (a few histogram passes) and one pass that samples over the kept set.
# Greedy rows compile to a loop without scaling or Philox, sampling rows to one with both.
@triton.jit
def _sample_draft_kernel(logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, offset_ptr,
                         fallback_threshold_ptr, token_ids_ptr, token_probs_ptr, max_probs_ptr, energies_ptr,
                         fallback_ptr, hist_ptr, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * V
    top_k, top_p, min_p, seed, offset, greedy, t, filtered = row_params(temperature_ptr, top_k_ptr, top_p_ptr,
                                                                        min_p_ptr, seed_ptr, offset_ptr, row, V)
    if greedy:
        zm, zidx, zs, sm, ss, gidx = row_pass(row_ptr, V, t, seed, offset, 0, PURPOSE_DRAFT_SAMPLE, False, False,
                                              BLOCK_V)
        token = zidx
    elif filtered:
        zm, zidx, zs, sm, ss, gidx = row_pass(row_ptr, V, t, seed, offset, 0, PURPOSE_DRAFT_SAMPLE, True, False,
                                              BLOCK_V)
        token = gidx  # replaced below by the draw over the kept set
    else:
        zm, zidx, zs, sm, ss, gidx = row_pass(row_ptr, V, t, seed, offset, 0, PURPOSE_DRAFT_SAMPLE, True, True,
                                              BLOCK_V)
        token = gidx
    kept_sum = ss
    if filtered:
        tau = filter_threshold(row_ptr, V, t, sm, ss, top_k, top_p, min_p,
                               hist_ptr + row.to(tl.int64) * 2 * CUT_BUCKETS, BLOCK_V)
        if greedy:
            kept_sum, _ = kept_pass(row_ptr, V, t, sm, tau, seed, offset, 0, PURPOSE_DRAFT_SAMPLE, False, BLOCK_V)
        else:
            kept_sum, token = kept_pass(row_ptr, V, t, sm, tau, seed, offset, 0, PURPOSE_DRAFT_SAMPLE, True,
                                        BLOCK_V)
    s_token = tl.math.div_rn(tl.load(row_ptr + token).to(tl.float32), t)
    max_prob = tl.exp(zm - (zm + tl.log(zs)))
    tl.store(token_ids_ptr + row, token.to(tl.int64))
    tl.store(token_probs_ptr + row, tl.exp(s_token - (sm + tl.log(kept_sum))))
    tl.store(max_probs_ptr + row, max_prob)
    tl.store(energies_ptr + row, -t * (sm + tl.log(ss)))
    tl.store(fallback_ptr + row, max_prob < tl.load(fallback_threshold_ptr + row))


def _block_v(V: int) -> tuple[int, int]:
    # (BLOCK_V, warps): the logits a program step reads, in every pass over a row.
    if triton_interpret():
        # The interpreter runs each chunk as NumPy calls: wide chunks mean fewer Python steps.
        return min(triton.next_power_of_2(V), 16384), 4
    # One program per row and often few rows: wide programs keep more loads in flight per SM.
    return min(triton.next_power_of_2(V), 4096), 16


def sample_draft(logits, temperature, top_k, top_p, seed, offset, fallback_threshold, min_p=None):
    B, V = logits.shape
    if logits.dtype == torch.float64:
        logits = logits.float()  # the kernels compute in fp32 whatever the input
    dev = logits.device
    token_ids = torch.empty(B, dtype=torch.int64, device=dev)
    token_probs = torch.empty(B, dtype=torch.float32, device=dev)
    max_probs = torch.empty(B, dtype=torch.float32, device=dev)
    energies = torch.empty(B, dtype=torch.float32, device=dev)
    fallback = torch.empty(B, dtype=torch.bool, device=dev)
    if B == 0:
        return token_ids, token_probs, max_probs, energies, fallback
    BLOCK_V, warps = _block_v(V)
    hist = torch.empty((B, 2, CUT_BUCKETS), dtype=torch.int64, device=dev)  # each row's cut-off search histogram
    min_p = torch.zeros(B, dtype=torch.float32, device=dev) if min_p is None else min_p
    _sample_draft_kernel[(B,)](logits.contiguous(), temperature.float().contiguous(), top_k.int().contiguous(),
                               top_p.float().contiguous(), min_p.float().contiguous(), seed.long().contiguous(),
                               offset.long().contiguous(), fallback_threshold.float().contiguous(), token_ids,
                               token_probs, max_probs, energies, fallback, hist, V, BLOCK_V=BLOCK_V, num_warps=warps)
    return token_ids, token_probs, max_probs, energies, fallback


# One representative compilation per logits dtype (bf16 serving, fp16, fp32), for the sm_90 AOT check.
def _aot_spec(dtype: str) -> tuple:
    sig = {"logits_ptr": f"*{dtype}", "temperature_ptr": "*fp32", "top_k_ptr": "*i32", "top_p_ptr": "*fp32",
           "min_p_ptr": "*fp32", "seed_ptr": "*i64", "offset_ptr": "*i64", "fallback_threshold_ptr": "*fp32",
           "token_ids_ptr": "*i64", "token_probs_ptr": "*fp32", "max_probs_ptr": "*fp32", "energies_ptr": "*fp32",
           "fallback_ptr": "*i1", "hist_ptr": "*i64", "V": "i32", "BLOCK_V": "constexpr"}
    assert list(sig) == _sample_draft_kernel.arg_names, (list(sig), _sample_draft_kernel.arg_names)
    return _sample_draft_kernel, sig, {"BLOCK_V": 4096}


AOT_SPECS = [_aot_spec("bf16"), _aot_spec("fp16"), _aot_spec("fp32")]
