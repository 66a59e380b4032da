"""Batched verification of drafted runs against one pass of the large model."""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from bild_kernels._backend import registered, resolve
from bild_kernels.ops import _validate as v
from bild_kernels.ops.sampling import call_with_rows, row_kinds, sampling_params
from bild_kernels.reference import MODES


@functools.lru_cache(maxsize=64)
def _zeros(B: int, device: torch.device) -> torch.Tensor:
    """The unused rollback thresholds of greedy and sample mode, [B] zeros: one tensor per (B, device), never
    written (no allocation and fill kernel at every call)."""
    return torch.zeros(B, dtype=torch.float32, device=device)


class VerifyResult(NamedTuple):
    num_accepted: torch.Tensor  # [B] int32, drafted tokens kept
    output_ids: torch.Tensor  # [B, K+1] int64, accepted drafts then the emitted token, -1 padded
    distances: torch.Tensor  # [B, K] f32, -log p_L(draft_j) at temperature 1 (0 on padding)
    target_probs: torch.Tensor  # [B, K+1] f32, max_v p_L(v) per position (0 past a row's draft)


def verify_draft(draft_ids, target_logits, mode: str = "greedy", *, rollback_threshold=None, draft_probs=None,
                 temperature=None, top_k=None, top_p=None, seed=None, offset=None, min_p=None,
                 sampled: bool | None = None,
                 filtered: bool | None = None, target_stats=None, backend: str | None = None) -> VerifyResult:
    """Accept a prefix of each row's draft and emit the large model's next token.

    Parameters
    ----------
    draft_ids : [B, K] int tensor; each row's drafted ids then -1 padding (K may be 0).
    target_logits : [B, K+1, V] float16 / bfloat16 / float32; position j scores the token after
        the committed prefix plus draft[:j].
    mode : "greedy" (accept while equal to the argmax), "bild" (BiLD's rollback rule with
        `rollback_threshold`), or "sample" (lossless speculative sampling with `draft_probs`).
    rollback_threshold : number or [B] float >= 0, required for "bild".
    draft_probs : [B, K, V] float, required for "sample": the distributions the drafts were drawn from.
    temperature, top_k, top_p, seed, offset, min_p : the large model's sampling parameters, per row (as in
        `sample_draft`).
    sampled, filtered : whether some row samples (temperature > 0) / samples with top-k, top-p or min-p, where the
        caller knows it on the host (as in `sample_draft`: None is known for numbers, else assumed; a False lets the
        CUDA backend skip the kernels only those rows need, checked unless value checks are off).
    target_stats : None, or (row_max, row_lse, row_argmax) [B, K+1] (float32, float32, int64) of float32
        target_logits: each position's max, logsumexp and first argmax, as an LM head that took them gives them
        (`cpu_linear_q8_0x16_stats`, every logit finite). Trusted, not checked against the logits: the "cpu"
        backend then reads only the drafted tokens' logits instead of every position's whole row; the others
        compute their own.
    backend : "cuda" | "triton" | "cpu" | "ref" | None (automatic).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    dev = v.tensor("target_logits", target_logits, dtypes=v.FLOATS, ndim=3).device
    v.tensor("draft_ids", draft_ids, dtypes=v.INTS, ndim=2, device=dev)
    B, K1, V = target_logits.shape
    if V == 0:
        raise ValueError("target_logits must have a non-empty vocabulary dimension")
    v.shape("draft_ids", draft_ids, (B, K1 - 1))
    K = K1 - 1
    if K < 0:
        raise ValueError("target_logits must have at least one position (K+1 >= 1)")
    if not v.skip_value_checks() and draft_ids.numel():
        if bool((draft_ids >= V).any()) or bool((draft_ids < -1).any()):
            bad = draft_ids[(draft_ids >= V) | (draft_ids < -1)][0].item()
            raise ValueError(f"draft_ids holds {bad}, outside the vocabulary [0, {V}) (-1 pads)")
        real = draft_ids >= 0
        if bool((real[:, 1:] & ~real[:, :-1]).any()):
            raise ValueError("draft_ids: each row must hold its drafted ids first, then only -1 padding")
    given = (temperature, top_k, top_p, min_p)
    temperature, top_k, top_p, seed, offset, min_p = sampling_params(B, dev, temperature, top_k, top_p, seed, offset,
                                                                     min_p)
    rows = row_kinds(V, given, (temperature, top_k, top_p, min_p), sampled, filtered, filter_needs_sampling=True)
    if mode == "bild":
        if rollback_threshold is None:
            raise ValueError("mode='bild' needs rollback_threshold")
        rollback_threshold = v.per_row("rollback_threshold", rollback_threshold, B, torch.float32, dev, 0.0)
        v.in_range("rollback_threshold", rollback_threshold, 0.0)
    else:  # (inside a CUDA-graph capture a fresh one: a tensor made there is not filled until the graph replays)
        rollback_threshold = (torch.zeros(B, dtype=torch.float32, device=dev) if v.capturing() else _zeros(B, dev))
    if mode == "sample":
        if draft_probs is None:
            raise ValueError("mode='sample' needs draft_probs [B, K, V]")
        v.tensor("draft_probs", draft_probs, dtypes=v.FLOATS, ndim=3, device=dev)
        v.shape("draft_probs", draft_probs, (B, K, V))
        draft_probs = draft_probs.contiguous()
    elif draft_probs is not None:
        raise ValueError(f"draft_probs is only used by mode='sample', not {mode!r}")
    if target_stats is not None:
        target_stats = _check_stats(target_stats, target_logits)
    fn = resolve("verify_draft", dev, backend)
    args = (draft_ids.to(torch.int64).contiguous(), target_logits.contiguous(), MODES[mode], rollback_threshold,
            draft_probs, temperature, top_k, top_p, seed, offset, min_p)
    if target_stats is not None and fn is registered("verify_draft", "cpu"):
        return VerifyResult(*fn(*args, target_stats=target_stats))
    return VerifyResult(*call_with_rows("verify_draft", fn, args, rows))


def verify_draft_cpu_trusted(draft_ids, target_logits, mode: str, rollback_threshold: float | None, temperature,
                             top_k, top_p, seed, offset, target_stats, min_p=None) -> VerifyResult:
    """`verify_draft` on the CPU backend for an engine's own inputs, none of them checked (the engine built them):
    draft_ids [B, K] int64 (contiguous, -1 padded), float32 target_logits [B, K+1, V] with their target_stats
    (as `verify_draft` takes them), mode "greedy" or "bild" (rollback_threshold a number for "bild"), the sampling
    parameters as [B] CPU tensors (float32, int32, float32, int64, int64; min_p float32 or None). What a CPU engine
    step calls after the large model's head took its logits' statistics: the argument checks, the backend's
    resolution and the tensors built from numbers cost ~0.1 ms there, run cold after the forward."""
    B = target_logits.shape[0]
    thr = (torch.full((B,), float(rollback_threshold), dtype=torch.float32) if mode == "bild"
           else _zeros(B, target_logits.device))
    fn = registered("verify_draft", "cpu")
    return VerifyResult(*fn(draft_ids, target_logits, MODES[mode], thr, None, temperature, top_k, top_p, seed, offset,
                            min_p, target_stats=target_stats))


def _check_stats(stats, target_logits) -> tuple:
    """verify_draft's target_stats: three [B, K+1] tensors on the logits' device, made contiguous."""
    B, K1, V = target_logits.shape
    if not isinstance(stats, (tuple, list)) or len(stats) != 3:
        raise TypeError("target_stats must be a tuple (row_max, row_lse, row_argmax)")
    if target_logits.dtype != torch.float32:
        raise ValueError(f"target_stats needs float32 target_logits, got {target_logits.dtype}")
    out = []
    for name, t, dtype in zip(("row_max", "row_lse", "row_argmax"), stats,
                              (torch.float32, torch.float32, torch.int64)):
        v.tensor(f"target_stats' {name}", t, dtypes=(dtype,), ndim=2, device=target_logits.device)
        v.shape(f"target_stats' {name}", t, (B, K1))
        out.append(t.contiguous())
    if not v.skip_value_checks() and out[2].numel() and bool(((out[2] < 0) | (out[2] >= V)).any()):
        raise ValueError(f"target_stats' row_argmax holds ids outside the vocabulary [0, {V})")
    return tuple(out)
