"""Penalties on logits (apply_penalties): a logit bias, repetition, presence, frequency, min_tokens."""
from __future__ import annotations

import torch


def apply_penalties_ref(logits, token_ids, prompt_lens, draft_ids, repetition_penalty, presence_penalty,
                        frequency_penalty, min_tokens, banned_ids, bias_ids, bias_values):
    """The large model's logits at P positions per row [B, P, V] with each row's penalties applied; a new tensor of
    the logits' dtype (computed in float32, float64 logits in float64).

    token_ids [B, L] int (-1 pads, anywhere): a row's committed tokens, the prompt's first (index < prompt_lens[b],
    [B] int), then its output. draft_ids [B, P-1] int (-1 pads): position p scores the token after the committed
    ones plus draft_ids[b, :p], so those drafted tokens count as output there. Per row ([B]): repetition_penalty
    (> 0; 1 is off), presence_penalty and frequency_penalty (0 is off), min_tokens (>= 0), and banned_ids [B, E]
    int (-1 pads; E may be 0), and a logit bias: bias_ids [B, E'] int (-1 pads; each id at most once a row) with
    bias_values [B, E'] float64. At position p of row b, with c_v the count of v in the output (and the draft before
    p) and `seen` = v in the prompt or c_v > 0, in vLLM's order (the bias, then the penalties as Hugging Face's
    RepetitionPenaltyLogitsProcessor and vLLM compute them):
        z_v = z_v + bias_values[b, j] where v = bias_ids[b, j]   (OpenAI's logit_bias)
        z_v = (z_v * r if z_v < 0 else z_v / r) where seen,     r = repetition_penalty
        z_v = z_v - frequency_penalty * c_v - presence_penalty * [c_v > 0]
        z_v = -inf for v in banned_ids[b] while n_out + p < min_tokens[b]   (n_out: the row's output tokens)
    Neutral values (1, 0, 0, 0, no bias) give back the logits' values unchanged."""
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(dt)
    B, P, V = z.shape
    dev = z.device
    if bias_ids.shape[1]:
        bias = torch.zeros((B, V), dtype=dt, device=dev).scatter_add_(
            1, bias_ids.clamp(min=0).to(torch.int64), torch.where(bias_ids >= 0, bias_values.to(dt), 0.0))
        z = z + bias[:, None, :]
    L = token_ids.shape[1]
    valid = token_ids >= 0
    is_out = valid & (torch.arange(L, device=dev)[None, :] >= prompt_lens.to(torch.int64)[:, None])
    ids = token_ids.clamp(min=0).to(torch.int64)
    counts = torch.zeros((B, V), dtype=torch.int64, device=dev).scatter_add_(1, ids, is_out.to(torch.int64))
    in_prompt = torch.zeros((B, V), dtype=torch.int64, device=dev).scatter_add_(1, ids, (valid & ~is_out).long()) > 0
    count = counts[:, None, :].repeat(1, P, 1)  # [B, P, V]
    for p in range(1, P):  # the draft before position p counts as output there
        d = draft_ids[:, p - 1].to(torch.int64)
        add = torch.zeros((B, V), dtype=torch.int64, device=dev).scatter_add_(1, d.clamp(min=0)[:, None],
                                                                             (d >= 0).long()[:, None])
        count[:, p:] += add[:, None, :]
    seen = in_prompt[:, None, :] | (count > 0)
    r = repetition_penalty.to(dt)[:, None, None]
    z = torch.where(seen, torch.where(z < 0, z * r, z / r), z)
    z = z - frequency_penalty.to(dt)[:, None, None] * count.to(dt)
    z = z - presence_penalty.to(dt)[:, None, None] * (count > 0).to(dt)
    n_out = is_out.sum(1)  # [B]
    active = (n_out[:, None] + torch.arange(P, device=dev)[None, :]) < min_tokens.to(torch.int64)[:, None]  # [B, P]
    E = banned_ids.shape[1]
    if E:
        b_ids = banned_ids.to(torch.int64)
        banned = torch.zeros((B, V), dtype=torch.int64, device=dev).scatter_add_(1, b_ids.clamp(min=0),
                                                                                (b_ids >= 0).long()) > 0
        z = z.masked_fill(active[:, :, None] & banned[:, None, :], float("-inf"))
    return z.to(logits.dtype)
