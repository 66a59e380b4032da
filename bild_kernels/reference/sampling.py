"""Draft sampling (sample_draft) and the sampling helpers it shares with verification."""
from __future__ import annotations

import torch

from bild_kernels.reference.penalties import apply_penalties_ref
from bild_kernels.reference.philox import PURPOSE_DRAFT_SAMPLE, gumbel_ref


def _chain_penalties(logits, b, penalty_ids, penalty_rows, penalty_values, banned_ids, cols, bias=None):
    """cpu_feature_draft_chain_ref's step logits [V_head] of sequence b with its penalties (see there)."""
    plen, min_tokens, n_out = (int(x) for x in penalty_rows[b])
    hist = torch.cat([penalty_ids[b], torch.tensor(cols, dtype=torch.int64)])[None]
    mapped = int((penalty_ids[b, plen:] >= 0).sum())  # (apply_penalties_ref counts the output's ids it holds)
    vals = penalty_values[b:b + 1].to(torch.float64)
    empty = torch.empty((1, 0), dtype=torch.int64)
    bias_ids, bias_values = (empty, empty.double()) if bias is None else (bias[0][b:b + 1], bias[1][b:b + 1])
    return apply_penalties_ref(logits[None, None], hist, torch.tensor([plen]), empty, vals[:, 0], vals[:, 1],
                               vals[:, 2], torch.tensor([max(min_tokens - (n_out - mapped), 0)]), banned_ids[b:b + 1],
                               bias_ids, bias_values)[0, 0]


def _filter_top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                        min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude from rows of scaled logits [R, V].

    top-k keeps every token whose value is >= the k-th largest (ties at the threshold kept);
    top_k <= 0 or >= V disables it. top-p keeps the smallest set of most probable tokens whose
    probability sums to >= top_p, again with ties at the threshold kept; top_p >= 1 disables it.
    min-p (None or [R]; 0 disables it) keeps s >= s_max + log(min_p), i.e. probability >= min_p times the
    largest (as a float sum in the row's dtype, log(min_p) in float32 for float32 rows; a row whose max is
    not finite keeps everything). All apply to the same row: a token must pass each (top-p measured on the
    unfiltered row; min-p's ratio to the largest is the same before and after the others, as in Hugging Face's
    top-k, top-p, min-p order).
    """
    R, V = scaled.shape
    keep = torch.ones_like(scaled, dtype=torch.bool)
    k = top_k.long()
    use_k = (k > 0) & (k < V)
    capturing = scaled.is_cuda and torch.cuda.is_current_stream_capturing()  # no host read in a graph
    if capturing or bool(use_k.any()):
        srt = torch.sort(scaled, dim=1, descending=True).values
        kth = srt.gather(1, (k.clamp(1, V) - 1).unsqueeze(1))
        keep &= ~use_k.unsqueeze(1) | (scaled >= kth)
    use_p = top_p < 1.0
    if capturing or bool(use_p.any()):
        probs = torch.softmax(scaled, dim=1)
        sp = torch.sort(probs, dim=1, descending=True).values
        excl = torch.cumsum(sp, dim=1) - sp  # mass strictly above each sorted entry
        n_keep = (excl < top_p.unsqueeze(1)).sum(1).clamp(min=1)
        thr = sp.gather(1, (n_keep - 1).unsqueeze(1))
        keep &= ~use_p.unsqueeze(1) | (probs >= thr)
    if min_p is not None:
        smax = scaled.max(1, keepdim=True).values
        use_m = (min_p > 0).unsqueeze(1) & torch.isfinite(smax)
        if capturing or bool(use_m.any()):
            cut = smax + torch.log(min_p.float()).to(scaled.dtype).unsqueeze(1)  # -inf where min_p = 0
            keep &= ~use_m | (scaled >= cut)
    return scaled.masked_fill(~keep, float("-inf"))


def _pick(scaled_filtered, greedy, noise):
    """argmax of scaled (greedy rows) or of scaled + Gumbel noise (sampling rows); first index on ties."""
    pert = torch.where(greedy.unsqueeze(1), scaled_filtered, scaled_filtered + noise)
    return torch.argmax(pert, dim=1)


def sample_draft_ref(logits, temperature, top_k, top_p, seed, offset, fallback_threshold, min_p=None):
    """Sample one token per row of small-model logits [B, V] and report BiLD/E-LANG signals.

    temperature, top_p, fallback_threshold: [B] float32; top_k: [B] int32; seed, offset: [B] int64;
    min_p: None or [B] float32 (0: off). filter = top-k, top-p and min-p (`_filter_top_k_top_p`).
    Temperature 0 is greedy (argmax, first index on ties). Otherwise the token is
    argmax(filter(z / T) + g_v) with Gumbel noise g_v = gumbel(seed, v, offset, DRAFT_SAMPLE, 0),
    which samples softmax(filter(z / T)) exactly.

    Returns (token_ids [B] int64, token_probs [B] f32, max_probs [B] f32, energies [B] f32,
    fallback [B] bool):
      token_probs: probability of the chosen token under softmax(filter(z / T')), T' = T or 1 if T = 0
      max_probs:   max_v softmax(z)_v at temperature 1, unfiltered (BiLD's fallback signal)
      energies:    -T' * logsumexp(z / T'), unfiltered (E-LANG's signal)
      fallback:    max_probs < fallback_threshold
    """
    z = logits.float() if logits.dtype != torch.float64 else logits
    B, V = z.shape
    greedy = temperature <= 0
    if _plain_greedy(z, greedy, top_k, top_p, min_p):
        # Every row is an unfiltered argmax: z / 1 is z, so one logsumexp and one max give every output
        # with the same bits as the general path below (tested against it).
        lse = torch.logsumexp(z, dim=1)
        zmax, token = z.max(1)  # first index on ties, like argmax
        p = torch.exp(zmax - lse)
        return token, p.float(), p.float(), (-lse).float(), p < fallback_threshold.to(p.dtype)
    return _sample_draft_general(z, greedy, temperature, top_k, top_p, seed, offset, fallback_threshold, min_p)


def _all_greedy(z, greedy) -> bool:
    """True when every row is greedy, read on the host (so never while a CUDA graph is being captured)."""
    return not (z.is_cuda and torch.cuda.is_current_stream_capturing()) and bool(greedy.all())


def _plain_greedy(z, greedy, top_k, top_p, min_p=None) -> bool:
    """True when every row is greedy with no top-k / top-p / min-p filter."""
    V = z.shape[1]
    return (_all_greedy(z, greedy) and not bool(((top_k > 0) & (top_k < V)).any()) and not bool((top_p < 1.0).any())
            and (min_p is None or not bool((min_p > 0).any())))


def _sample_draft_general(z, greedy, temperature, top_k, top_p, seed, offset, fallback_threshold, min_p=None):
    B, V = z.shape
    t = torch.where(greedy, torch.ones_like(temperature), temperature).to(z.dtype).unsqueeze(1)
    scaled = z / t
    filt = _filter_top_k_top_p(scaled, top_k, top_p, min_p)
    idx = torch.arange(V, device=z.device).unsqueeze(0)
    if bool(greedy.all()):  # no row samples: its random numbers would go unused
        token = torch.argmax(filt, dim=1)
    else:
        noise = gumbel_ref(seed.unsqueeze(1), idx, offset.unsqueeze(1), PURPOSE_DRAFT_SAMPLE, 0).to(z.dtype)
        token = _pick(filt, greedy, noise)
    lse_f = torch.logsumexp(filt, dim=1)
    token_probs = torch.exp(filt.gather(1, token.unsqueeze(1)).squeeze(1) - lse_f)
    max_probs = torch.exp(z.max(1).values - torch.logsumexp(z, dim=1))
    energies = -t.squeeze(1) * torch.logsumexp(scaled, dim=1)
    fallback = max_probs < fallback_threshold.to(max_probs.dtype)
    return token, token_probs.float(), max_probs.float(), energies.float(), fallback
