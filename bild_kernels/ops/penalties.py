"""Penalties on the large model's logits before verification: a logit bias, repetition, presence, frequency,
min_tokens."""
from __future__ import annotations

import torch

from bild_kernels._backend import resolve
from bild_kernels.ops import _validate as v


def _int_row(name, value, B, dev, default):
    """v.per_row for an int32 argument: a Python int or an integer [B] tensor (never a float or a bool, which
    would be truncated), each within int32 (an int64 tensor is checked unless value checks are off)."""
    if isinstance(value, float) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        kind = type(value).__name__ if isinstance(value, float) else "a bool tensor"
        raise TypeError(f"{name} must be an int or an integer [B] tensor, got {kind}")
    if isinstance(value, int) and not isinstance(value, bool) and not -2**31 <= value < 2**31:
        raise ValueError(f"{name} must fit in int32, got {value}")
    if (isinstance(value, torch.Tensor) and value.dtype == torch.int64 and value.numel()
            and not v.skip_value_checks() and bool(((value < -2**31) | (value >= 2**31)).any())):
        raise ValueError(f"{name} must fit in int32")
    return v.per_row(name, value, B, torch.int32, dev, default)


def apply_penalties(logits, token_ids, prompt_lens, draft_ids=None, *, repetition_penalty=None,
                    presence_penalty=None, frequency_penalty=None, min_tokens=None, banned_ids=None,
                    bias_ids=None, bias_values=None, backend: str | None = None) -> torch.Tensor:
    """Each row's penalties applied to the logits of its P positions (the spec: `reference.apply_penalties_ref`).

    Parameters
    ----------
    logits : [B, P, V] float16 / bfloat16 / float32 / float64; position p scores the token after the row's
        committed tokens plus draft_ids[b, :p] (what `verify_draft` takes as target_logits).
    token_ids : [B, L] int; each row's committed tokens, the prompt's first, then its output; -1 pads.
    prompt_lens : [B] int in [0, L]: how many of a row's first token_ids are its prompt.
    draft_ids : None, or [B, P-1] int (-1 pads): the drafted tokens, which count as output at later positions.
    repetition_penalty : number or [B] float > 0; 1 (the default) is off. Divides a positive logit (multiplies a
        negative one) of every token the prompt or the output holds (Hugging Face's and vLLM's rule).
    presence_penalty, frequency_penalty : number or [B] float; 0 (the default) is off. Subtracted once from the
        logit of every token the output holds / once per occurrence (OpenAI's rule).
    min_tokens : number or [B] int >= 0 (default 0): while a row's output is shorter than this (counting the
        positions before p), its banned_ids get -inf.
    banned_ids : None, or [B, E] int (-1 pads): the ids min_tokens holds back (EOS and stop ids, say).
    bias_ids, bias_values : None, or [B, E'] int (-1 pads; an id at most once a row) and [B, E'] float: added to
        those ids' logits before the penalties (OpenAI's logit_bias; vLLM's order).
    backend : "cuda" | "triton" | "ref" | None (automatic).

    Returns a new [B, P, V] tensor of the logits' dtype. The penalties travel as float64 (a float64 model's logits
    get the exact Python numbers, as Hugging Face's processors apply them); float32 logits see them rounded to float32.
    """
    dev = v.tensor("logits", logits, dtypes=v.FLOATS, ndim=3).device
    B, P, V = logits.shape
    if V == 0 or P == 0:
        raise ValueError(f"logits must have at least one position and a non-empty vocabulary, got {list(logits.shape)}")
    v.tensor("token_ids", token_ids, dtypes=v.INTS, ndim=2, device=dev)
    v.shape("token_ids", token_ids, (B, None))
    prompt_lens = _int_row("prompt_lens", prompt_lens, B, dev, 0)
    if draft_ids is None:
        draft_ids = torch.full((B, P - 1), -1, dtype=torch.int64, device=dev)
    v.tensor("draft_ids", draft_ids, dtypes=v.INTS, ndim=2, device=dev)
    v.shape("draft_ids", draft_ids, (B, P - 1))
    if banned_ids is None:
        banned_ids = torch.empty((B, 0), dtype=torch.int64, device=dev)
    v.tensor("banned_ids", banned_ids, dtypes=v.INTS, ndim=2, device=dev)
    v.shape("banned_ids", banned_ids, (B, None))
    if (bias_ids is None) != (bias_values is None):
        raise ValueError("bias_ids and bias_values come together")
    if bias_ids is None:
        bias_ids = torch.empty((B, 0), dtype=torch.int64, device=dev)
        bias_values = torch.empty((B, 0), dtype=torch.float64, device=dev)
    v.tensor("bias_ids", bias_ids, dtypes=v.INTS, ndim=2, device=dev)
    v.shape("bias_ids", bias_ids, (B, None))
    v.tensor("bias_values", bias_values, dtypes=v.FLOATS, ndim=2, device=dev)
    v.shape("bias_values", bias_values, tuple(bias_ids.shape))
    repetition_penalty = v.per_row("repetition_penalty", repetition_penalty, B, torch.float64, dev, 1.0)
    presence_penalty = v.per_row("presence_penalty", presence_penalty, B, torch.float64, dev, 0.0)
    frequency_penalty = v.per_row("frequency_penalty", frequency_penalty, B, torch.float64, dev, 0.0)
    min_tokens = _int_row("min_tokens", min_tokens, B, dev, 0)
    if not v.skip_value_checks():
        for name, ids in (("token_ids", token_ids), ("draft_ids", draft_ids), ("banned_ids", banned_ids),
                          ("bias_ids", bias_ids)):
            bad = (ids >= V) | (ids < -1)
            if ids.numel() and bool(bad.any()):
                raise ValueError(f"{name} holds {ids[bad][0].item()}, outside the vocabulary [0, {V}) (-1 pads)")
        v.in_range("prompt_lens", prompt_lens, 0, token_ids.shape[1])
        v.in_range("repetition_penalty", repetition_penalty, 0.0, lo_open=True)
        for name, t in (("repetition_penalty", repetition_penalty), ("presence_penalty", presence_penalty),
                        ("frequency_penalty", frequency_penalty)):
            if bool(torch.isinf(t).any()):
                raise ValueError(f"{name} must be finite")
        v.in_range("presence_penalty", presence_penalty)  # (NaN)
        v.in_range("frequency_penalty", frequency_penalty)
        v.in_range("min_tokens", min_tokens, 0)
        if bias_ids.shape[1]:
            srt = bias_ids.sort(dim=1).values
            if bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()):
                raise ValueError("bias_ids must hold each id at most once a row")
            if not bool(torch.isfinite(bias_values.double()).all()):
                raise ValueError("bias_values must be finite")
        if logits.dtype != torch.float64:  # what the kernels compute with: the penalties rounded to float32
            for name, t in (("repetition_penalty", repetition_penalty), ("presence_penalty", presence_penalty),
                            ("frequency_penalty", frequency_penalty)):
                if bool(torch.isinf(t.float()).any()):
                    raise ValueError(f"{name} overflows float32 (the compute dtype of {logits.dtype} logits)")
            if bias_values.numel() and bool(torch.isinf(bias_values.float()).any()):
                raise ValueError(f"bias_values overflow float32 (the compute dtype of {logits.dtype} logits)")
            if bool((repetition_penalty.float() <= 0).any()):
                raise ValueError(f"repetition_penalty rounds to 0 in float32 (the compute dtype of {logits.dtype} "
                                 "logits)")
    fn = resolve("apply_penalties", dev, backend)
    return fn(logits.contiguous(), token_ids.to(torch.int64).contiguous(), prompt_lens,
              draft_ids.to(torch.int64).contiguous(), repetition_penalty, presence_penalty, frequency_penalty,
              min_tokens, banned_ids.to(torch.int64).contiguous(), bias_ids.to(torch.int64).contiguous(),
              bias_values.to(torch.float64).contiguous())
