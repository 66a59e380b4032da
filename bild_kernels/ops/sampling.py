"""Draft sampling: one token per row of small-model logits plus BiLD's and E-LANG's signals."""
from __future__ import annotations

from typing import NamedTuple

import torch

from bild_kernels._backend import resolve
from bild_kernels.ops import _validate as v


class DraftSample(NamedTuple):
    token_ids: torch.Tensor  # [B] int64
    token_probs: torch.Tensor  # [B] f32, probability of the chosen token (after temperature/top-k/top-p)
    max_probs: torch.Tensor  # [B] f32, max softmax probability at temperature 1 (BiLD fallback signal)
    energies: torch.Tensor  # [B] f32, -T * logsumexp(z / T) (E-LANG signal)
    fallback: torch.Tensor  # [B] bool, max_probs < fallback_threshold


def sampling_params(B: int, device, temperature=None, top_k=None, top_p=None, seed=None, offset=None):
    """Normalise per-row sampling parameters (numbers or [B] tensors) to device tensors and check them."""
    temperature = v.per_row("temperature", temperature, B, torch.float32, device, 0.0)
    top_k = v.per_row("top_k", top_k, B, torch.int32, device, 0)
    top_p = v.per_row("top_p", top_p, B, torch.float32, device, 1.0)
    seed = v.per_row("seed", seed, B, torch.int64, device, 0)
    offset = v.per_row("offset", offset, B, torch.int64, device, 0)
    v.in_range("temperature", temperature, 0.0)
    v.in_range("top_k", top_k, 0)
    v.in_range("top_p", top_p, 0.0, 1.0, lo_open=True)
    v.in_range("offset", offset, 0)
    return temperature, top_k, top_p, seed, offset


def sample_draft(logits, *, temperature=None, top_k=None, top_p=None, seed=None, offset=None,
                 fallback_threshold=None, backend: str | None = None) -> DraftSample:
    """Sample the next draft token of each row in one pass over the logits.

    Parameters
    ----------
    logits : [B, V] float16 / bfloat16 / float32 tensor of small-model logits.
    temperature : number or [B] float; 0 means greedy (argmax). Default 0.
    top_k : number or [B] int; 0 disables. top_p : number or [B] float in (0, 1]; 1 disables.
    seed, offset : number or [B] int64; the Philox key and step counter (see `bild_kernels.reference`).
    fallback_threshold : number or [B] float in [0, 1]; fallback = max_probs < it. Default 0.
    backend : "cuda" | "triton" | "ref" | None (automatic).
    """
    dev = v.tensor("logits", logits, dtypes=v.FLOATS, ndim=2).device
    B, V = logits.shape
    if V == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    temperature, top_k, top_p, seed, offset = sampling_params(B, dev, temperature, top_k, top_p, seed, offset)
    fallback_threshold = v.per_row("fallback_threshold", fallback_threshold, B, torch.float32, dev, 0.0)
    v.in_range("fallback_threshold", fallback_threshold, 0.0, 1.0)
    fn = resolve("sample_draft", dev, backend)
    return DraftSample(*fn(logits.contiguous(), temperature, top_k, top_p, seed, offset, fallback_threshold))


def filtered_probs(logits, temperature, top_k, top_p):
    """The distributions sample_draft draws from, as full rows [B, V] float32: softmax of the
    temperature-scaled, top-k/top-p-filtered logits (one-hot argmax at temperature 0). Speculative
    sampling needs them to verify the drafts."""
    from bild_kernels.reference import _filter_top_k_top_p
    z = logits.float()
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(1)
    probs = torch.softmax(_filter_top_k_top_p(z / t, top_k, top_p), dim=1)
    onehot = torch.nn.functional.one_hot(z.argmax(1), z.shape[1]).to(probs.dtype)
    return torch.where(greedy.unsqueeze(1), onehot, probs)


def pack_draft_probs(rows, K: int, V: int, like: torch.Tensor) -> torch.Tensor:
    """Stack per-sequence lists of [V] probability rows into [B, K, V], zero-padded."""
    out = torch.zeros((len(rows), K, V), dtype=torch.float32, device=like.device)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.stack(r)
    return out
