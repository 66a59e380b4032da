"""Triton batched verification of drafts (spec: `bild_kernels.reference.verify_draft_ref`).

The public op `bild_kernels.ops.verify_draft` validates inputs; the launcher here only allocates the
outputs and the per-launch scratch. No host reads, so the launch can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bild_kernels import reference as R
from bild_kernels._backend import triton_interpret
from bild_kernels.triton._sampling_common import (CUT_BUCKETS, filter_threshold, gumbel, kept_pass, order_key, row_params,
                                                  row_pass, uniform)

PURPOSE_VERIFY_ACCEPT = tl.constexpr(R.PURPOSE_VERIFY_ACCEPT)
PURPOSE_VERIFY_TOKEN = tl.constexpr(R.PURPOSE_VERIFY_TOKEN)
MODE_BILD = tl.constexpr(R.MODE_BILD)
MODE_SAMPLE = tl.constexpr(R.MODE_SAMPLE)


@triton.jit
def _emit_pass(row_ptr, probs_ptr, cut, V, t, smax, kept_sum, tau, seed, offset, position,
               RESID: tl.constexpr, BLOCK_V: tl.constexpr):
    # argmax(log(w) + g) for w = q (the kept softmax) and, at a rejection in sample mode, for w = max(0, q - p_S);
    # both share the pass, and the residual wins unless it is zero everywhere.
    lanes = tl.arange(0, BLOCK_V)
    qbest = tl.full([BLOCK_V], float("-inf"), tl.float32)
    qidx = lanes
    rbest = tl.full([BLOCK_V], float("-inf"), tl.float32)
    ridx = lanes
    rmax = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + lanes
        in_row = offs < V
        s = tl.math.div_rn(tl.load(row_ptr + offs, mask=in_row, other=float("-inf")).to(tl.float32), t)
        q = tl.where((order_key(s) >= tau) & in_row, tl.exp(s - smax) / kept_sum, 0.0)
        g = gumbel(seed, offs, offset, PURPOSE_VERIFY_TOKEN, position)
        pert = tl.where(q > 0.0, tl.log(tl.where(q > 0.0, q, 1.0)), float("-inf")) + g
        upd = pert > qbest
        qbest = tl.where(upd, pert, qbest)
        qidx = tl.where(upd, offs, qidx)
        if RESID:
            ps = tl.load(probs_ptr + offs, mask=in_row & cut, other=0.0).to(tl.float32)
            r = tl.maximum(q - ps, 0.0)
            rmax = tl.maximum(rmax, r)
            pert = tl.where(r > 0.0, tl.log(tl.where(r > 0.0, r, 1.0)), float("-inf")) + g
            upd = pert > rbest
            rbest = tl.where(upd, pert, rbest)
            ridx = tl.where(upd, offs, ridx)
    qm = tl.max(qbest, 0)
    token = tl.min(tl.where(qbest == qm, qidx, 2147483647), 0)
    if RESID:
        rm = tl.max(rbest, 0)
        rtok = tl.min(tl.where(rbest == rm, ridx, 2147483647), 0)
        token = tl.where(cut & (tl.max(rmax, 0) > 0.0), rtok, token)
    return token


# Grid (B * (K+1),): one program per (row b, position j <= n_b) makes one pass over that position's V logits
# (online logsumexp, argmax; rows that sample at a filtered temperature add the top-k/top-p/min-p cut-off search) and
# writes distance, target prob and its accept verdict. Verdicts need every position of the row, so each
# program then bumps the row's arrival counter; the last of the row's n_b + 1 programs reads the verdicts,
# cuts at the first rejection c, writes the row's outputs and, for sampling rows, draws the emitted token
# in one more pass over position c (Gumbel-max over q_c or the residual max(0, q_c - p_S)).
@triton.jit
def _verify_draft_kernel(draft_ids_ptr, target_logits_ptr, draft_probs_ptr, rollback_threshold_ptr, temperature_ptr,
                         top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, offset_ptr, num_accepted_ptr, output_ids_ptr,
                         distances_ptr, target_probs_ptr, scratch_i_ptr, scratch_f_ptr, arrivals_ptr, hist_ptr, K, V,
                         MODE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    K1 = K + 1
    b = pid // K1
    j = pid % K1
    ks = tl.arange(0, BLOCK_K)
    ids = tl.load(draft_ids_ptr + b * K + ks, mask=ks < K, other=-1)  # [BLOCK_K], -1 past K
    n = tl.sum((ids >= 0).to(tl.int32), 0)
    if j > n:
        tl.store(target_probs_ptr + pid, 0.0)
        tl.store(distances_ptr + b * K + j, 0.0, mask=j < K)
    else:
        row_ptr = target_logits_ptr + pid.to(tl.int64) * V
        top_k, top_p, min_p, seed, offset, greedy, t, filtered = row_params(temperature_ptr, top_k_ptr, top_p_ptr,
                                                                            min_p_ptr, seed_ptr, offset_ptr, b, V)
        if greedy:
            zm, zidx, zs, sm, ss, _ = row_pass(row_ptr, V, t, seed, offset, j, PURPOSE_VERIFY_TOKEN, False, False,
                                               BLOCK_V)
        else:
            zm, zidx, zs, sm, ss, _ = row_pass(row_ptr, V, t, seed, offset, j, PURPOSE_VERIFY_TOKEN, True, False,
                                               BLOCK_V)
        lse = zm + tl.log(zs)
        tl.store(target_probs_ptr + pid, tl.exp(zm - lse))
        drafted = j < n
        draft = tl.load(draft_ids_ptr + b * K + j, mask=drafted, other=0).to(tl.int32)
        z_draft = tl.load(row_ptr + draft).to(tl.float32)
        dist = lse - z_draft
        tl.store(distances_ptr + b * K + j, tl.where(drafted, dist, 0.0), mask=j < K)
        # The kept set and its normaliser define q_j for sampling rows (greedy rows use the one-hot argmax).
        tau = tl.full([], -2147483647, tl.int32)
        kept_sum = ss
        if filtered & (greedy == 0):
            tau = filter_threshold(row_ptr, V, t, sm, ss, top_k, top_p, min_p,
                                   hist_ptr + pid.to(tl.int64) * 2 * CUT_BUCKETS, BLOCK_V)
            kept_sum, _ = kept_pass(row_ptr, V, t, sm, tau, seed, offset, j, PURPOSE_VERIFY_TOKEN, False, BLOCK_V)
        hit = draft == zidx
        if MODE == MODE_SAMPLE:
            ps = tl.load(draft_probs_ptr + ((b * K + j).to(tl.int64) * V + draft), mask=drafted, other=0.0)
            s_draft = tl.math.div_rn(z_draft, t)
            q_draft = tl.where(order_key(s_draft) >= tau, tl.exp(s_draft - sm) / kept_sum, 0.0)
            q_draft = tl.where(greedy, hit.to(tl.float32), q_draft)
            ok = uniform(seed, j * 0, offset, PURPOSE_VERIFY_ACCEPT, j) * ps.to(tl.float32) < q_draft
        elif MODE == MODE_BILD:
            ok = hit | (dist <= tl.load(rollback_threshold_ptr + b))
        else:
            ok = hit
        tl.store(scratch_i_ptr + pid * 3, ok.to(tl.int32))
        tl.store(scratch_i_ptr + pid * 3 + 1, zidx)
        tl.store(scratch_i_ptr + pid * 3 + 2, tau)
        tl.store(scratch_f_ptr + pid * 2, sm)
        tl.store(scratch_f_ptr + pid * 2 + 1, kept_sum)
        # acq_rel: the verdict stores above are visible to whichever program arrives last.
        if tl.atomic_add(arrivals_ptr + b, 1) == n:
            base = b * K1
            oks = tl.load(scratch_i_ptr + (base + ks) * 3, mask=ks < n, other=1, volatile=True)
            c = tl.min(tl.where((ks < n) & (oks == 0), ks, n), 0)
            pc = base + c
            if greedy:
                emitted = tl.load(scratch_i_ptr + pc * 3 + 1, volatile=True)
            else:
                tau_c = tl.load(scratch_i_ptr + pc * 3 + 2, volatile=True)
                sm_c = tl.load(scratch_f_ptr + pc * 2, volatile=True)
                kept_c = tl.load(scratch_f_ptr + pc * 2 + 1, volatile=True)
                probs_row = draft_probs_ptr + (b * K + tl.minimum(c, K - 1)).to(tl.int64) * V
                emitted = _emit_pass(target_logits_ptr + pc.to(tl.int64) * V, probs_row, c < n, V, t, sm_c, kept_c,
                                     tau_c, seed, offset, c, MODE == MODE_SAMPLE, BLOCK_V)
            out = tl.where(ks < c, ids, -1)
            out = tl.where(ks == c, emitted.to(tl.int64), out)
            tl.store(output_ids_ptr + base + ks, out.to(tl.int64), mask=ks < K1)
            tl.store(num_accepted_ptr + b, c)


def _block_v(V: int) -> tuple[int, int]:
    # (BLOCK_V, warps): the logits a program step reads, in every pass over a row.
    if triton_interpret():
        return min(triton.next_power_of_2(V), 16384), 4  # fewer NumPy steps
    return min(triton.next_power_of_2(V), 2048), 8


def verify_draft(draft_ids, target_logits, mode, rollback_threshold, draft_probs, temperature, top_k, top_p, seed,
                 offset, min_p=None):
    B, K1, V = target_logits.shape
    K = K1 - 1
    if target_logits.dtype == torch.float64:
        target_logits = target_logits.float()  # the kernels compute in fp32 whatever the input
    dev = target_logits.device
    num_accepted = torch.empty(B, dtype=torch.int32, device=dev)
    output_ids = torch.empty((B, K1), dtype=torch.int64, device=dev)
    distances = torch.empty((B, K), dtype=torch.float32, device=dev)
    target_probs = torch.empty((B, K1), dtype=torch.float32, device=dev)
    if B == 0:
        return num_accepted, output_ids, distances, target_probs
    scratch_i = torch.empty((B, K1, 3), dtype=torch.int32, device=dev)  # verdict, argmax, kept-set key per position
    scratch_f = torch.empty((B, K1, 2), dtype=torch.float32, device=dev)  # max and kept sum of scaled logits
    arrivals = torch.zeros(B, dtype=torch.int32, device=dev)
    hist = torch.empty((B * K1, 2, CUT_BUCKETS), dtype=torch.int64, device=dev)  # each position's cut-off search
    if draft_probs is None:
        draft_probs = target_logits  # never read outside sample mode
    min_p = torch.zeros(B, dtype=torch.float32, device=dev) if min_p is None else min_p
    BLOCK_V, warps = _block_v(V)
    _verify_draft_kernel[(B * K1,)](
        draft_ids.long().contiguous(), target_logits.contiguous(), draft_probs.contiguous(),
        rollback_threshold.float().contiguous(), temperature.float().contiguous(), top_k.int().contiguous(),
        top_p.float().contiguous(), min_p.float().contiguous(), seed.long().contiguous(), offset.long().contiguous(),
        num_accepted, output_ids, distances, target_probs, scratch_i, scratch_f, arrivals, hist, K, V, MODE=int(mode),
        BLOCK_K=triton.next_power_of_2(K1), BLOCK_V=BLOCK_V, num_warps=warps)
    return num_accepted, output_ids, distances, target_probs


# Serving shapes (bf16 logits, K = 8) in every mode; sample mode with fp32 draft probabilities.
def _aot_spec(mode: int, dtype: str = "bf16") -> tuple:
    sig = {"draft_ids_ptr": "*i64", "target_logits_ptr": f"*{dtype}",
           "draft_probs_ptr": "*fp32" if mode == R.MODE_SAMPLE else f"*{dtype}", "rollback_threshold_ptr": "*fp32",
           "temperature_ptr": "*fp32", "top_k_ptr": "*i32", "top_p_ptr": "*fp32", "min_p_ptr": "*fp32",
           "seed_ptr": "*i64", "offset_ptr": "*i64", "num_accepted_ptr": "*i32", "output_ids_ptr": "*i64",
           "distances_ptr": "*fp32", "target_probs_ptr": "*fp32", "scratch_i_ptr": "*i32", "scratch_f_ptr": "*fp32",
           "arrivals_ptr": "*i32", "hist_ptr": "*i64", "K": "i32", "V": "i32", "MODE": "constexpr",
           "BLOCK_K": "constexpr", "BLOCK_V": "constexpr"}
    assert list(sig) == _verify_draft_kernel.arg_names, (list(sig), _verify_draft_kernel.arg_names)
    return _verify_draft_kernel, sig, {"MODE": mode, "BLOCK_K": 16, "BLOCK_V": 2048}


AOT_SPECS = [_aot_spec(R.MODE_GREEDY), _aot_spec(R.MODE_BILD), _aot_spec(R.MODE_SAMPLE),
             _aot_spec(R.MODE_GREEDY, "fp32")]
