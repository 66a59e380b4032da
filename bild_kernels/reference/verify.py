"""Verification of a drafted run (verify_draft): greedy, BiLD and speculative sampling."""
from __future__ import annotations

import torch

from bild_kernels.reference.philox import PURPOSE_VERIFY_ACCEPT, PURPOSE_VERIFY_TOKEN, gumbel_ref, uniform_ref
from bild_kernels.reference.sampling import _all_greedy, _filter_top_k_top_p


MODE_GREEDY, MODE_BILD, MODE_SAMPLE = 0, 1, 2
MODES = {"greedy": MODE_GREEDY, "bild": MODE_BILD, "sample": MODE_SAMPLE}


def verify_draft_ref(draft_ids, target_logits, mode, rollback_threshold=None, draft_probs=None,
                     temperature=None, top_k=None, top_p=None, seed=None, offset=None, min_p=None):
    """Verify a ragged batch of drafts against the large model's logits.

    draft_ids: [B, K] int64, each row's drafted tokens then -1 padding (n_b = drafted count).
    target_logits: [B, K+1, V]; position j holds the large model's logits for the token after
        committed + draft[:j].
    mode: "greedy" | "bild" | "sample".
    rollback_threshold: [B] float32 (bild). draft_probs: [B, K, V] (sample): the small model's
        probabilities that each draft was sampled from.
    temperature, top_p: [B] f32; top_k: [B] int32; seed, offset: [B] int64; min_p: None or [B] f32
        (0: off) — the sampling parameters of the large model's tokens (all None = greedy).

    Per position j the target distribution is q_j = softmax(filter(z_j / T)) (argmax at T = 0), filter =
    top-k, top-p and min-p (`_filter_top_k_top_p`).
    - greedy: accept draft[j] while draft[j] == argmax z_j.
    - bild:   d_j = -log softmax(z_j)[draft[j]] (temperature 1); cut at the first j with
              d_j > rollback_threshold and draft[j] != argmax z_j; accept everything before it.
    - sample: accept draft[j] while u_j * p_S(draft[j]) < q_j(draft[j]) with u_j =
              uniform(seed, 0, offset, VERIFY_ACCEPT, j); at the first rejection the emitted token
              is drawn from norm(max(0, q_j - p_S)) (if that is all zero: from q_j).
    The emitted token at position c = num_accepted (if c < n_b, the "recovered" token; else the
    "bonus" token) is argmax z_c at T = 0, else argmax(log(w) + g) over the vocabulary with
    g = gumbel(seed, v, offset, VERIFY_TOKEN, c) and w = q_c (or the residual in sample mode).

    Returns (num_accepted [B] int32, output_ids [B, K+1] int64 (-1 padded: accepted drafts, then
    the emitted token), distances [B, K] f32 (d_j; 0 on padding), target_probs [B, K+1] f32
    (max_v softmax(z_j)_v; 0 past n_b)).
    """
    mode = MODES[mode] if isinstance(mode, str) else mode
    z = target_logits.float() if target_logits.dtype != torch.float64 else target_logits
    B, K1, V = z.shape
    K = K1 - 1
    dev = z.device
    n = (draft_ids >= 0).sum(1)
    pos = torch.arange(K, device=dev)
    valid = pos.unsqueeze(0) < n.unsqueeze(1)  # [B, K]
    safe_ids = draft_ids.clamp(min=0).long()

    if temperature is None:
        temperature = torch.zeros(B, device=dev)
        top_k = torch.zeros(B, dtype=torch.int32, device=dev)
        top_p = torch.ones(B, device=dev)
        seed = torch.zeros(B, dtype=torch.int64, device=dev)
        offset = torch.zeros(B, dtype=torch.int64, device=dev)

    lse = torch.logsumexp(z, dim=2)  # [B, K+1]
    zmax, amax = z.max(2)  # [B, K+1]; first index on ties, like argmax
    target_probs = torch.exp(zmax - lse)
    target_probs = torch.where(torch.arange(K1, device=dev).unsqueeze(0) <= n.unsqueeze(1), target_probs,
                               torch.zeros_like(target_probs))
    z_draft = z[:, :K].gather(2, safe_ids.unsqueeze(2)).squeeze(2)
    distances = torch.where(valid, lse[:, :K] - z_draft, torch.zeros_like(z_draft))

    greedy = temperature <= 0
    # The target distributions q are read only to sample a token or in sample mode: all-greedy rows in
    # the other modes emit the argmax and skip building them (the same outputs; tested).
    all_greedy = _all_greedy(z, greedy)
    need_q = mode == MODE_SAMPLE or not all_greedy
    if need_q:
        t = torch.where(greedy, torch.ones_like(temperature), temperature).to(z.dtype)
        scaled = z / t[:, None, None]
        filt = _filter_top_k_top_p(scaled.reshape(B * K1, V), top_k.repeat_interleave(K1),
                                   top_p.repeat_interleave(K1),
                                   None if min_p is None else min_p.repeat_interleave(K1)).reshape(B, K1, V)
        q = torch.softmax(filt, dim=2)
        q_greedy = torch.nn.functional.one_hot(amax, V).to(q.dtype)
        q = torch.where(greedy[:, None, None], q_greedy, q)

    if mode == MODE_GREEDY:
        ok = draft_ids[:, :K] == amax[:, :K]
    elif mode == MODE_BILD:
        ok = ~((distances > rollback_threshold.to(z.dtype).unsqueeze(1)) & (draft_ids != amax[:, :K]))
    else:
        ps = draft_probs.to(z.dtype).gather(2, safe_ids.unsqueeze(2)).squeeze(2)
        qd = q[:, :K].gather(2, safe_ids.unsqueeze(2)).squeeze(2)
        u = uniform_ref(seed.unsqueeze(1), 0, offset.unsqueeze(1), PURPOSE_VERIFY_ACCEPT, pos.unsqueeze(0))
        ok = u.to(z.dtype) * ps < qd
    ok = ok & valid
    # number accepted = length of the all-True prefix
    num_accepted = torch.cumprod(ok.long(), dim=1).sum(1) if K > 0 else torch.zeros(B, dtype=torch.long, device=dev)

    c = num_accepted
    rows = torch.arange(B, device=dev)
    if all_greedy:
        emitted = amax[rows, c]
    else:
        w = q[rows, c]  # [B, V]
        if mode == MODE_SAMPLE:
            cut = c < n
            ps_c = draft_probs.to(z.dtype)[rows, c.clamp(max=max(K - 1, 0))] if K > 0 else torch.zeros_like(w)
            resid = (w - ps_c).clamp(min=0)
            use_resid = cut & (resid.sum(1) > 0)
            w = torch.where(use_resid.unsqueeze(1), resid, w)
        g = gumbel_ref(seed.unsqueeze(1), torch.arange(V, device=dev).unsqueeze(0), offset.unsqueeze(1),
                       PURPOSE_VERIFY_TOKEN, c.unsqueeze(1)).to(z.dtype)
        emitted = torch.where(greedy, amax[rows, c], torch.argmax(torch.log(w) + g, dim=1))

    out = torch.full((B, K1), -1, dtype=torch.int64, device=dev)
    keep = torch.arange(K1, device=dev).unsqueeze(0) < c.unsqueeze(1)
    out[:, :K] = torch.where(keep[:, :K], draft_ids.long(), out[:, :K])
    out[rows, c] = emitted
    return num_accepted.int(), out, distances.float(), target_probs.float()
