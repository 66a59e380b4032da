"""Draft sampling: one token per row of small-model logits plus BiLD's and E-LANG's signals."""
from __future__ import annotations

from typing import NamedTuple

import torch

from bild_kernels._backend import registered, resolve
from bild_kernels.ops import _validate as v


class DraftSample(NamedTuple):
    token_ids: torch.Tensor  # [B] int64
    token_probs: torch.Tensor  # [B] f32, probability of the chosen token (after temperature/top-k/top-p)
    max_probs: torch.Tensor  # [B] f32, max softmax probability at temperature 1 (BiLD fallback signal)
    energies: torch.Tensor  # [B] f32, -T * logsumexp(z / T) (E-LANG signal)
    fallback: torch.Tensor  # [B] bool, max_probs < fallback_threshold


def sampling_params(B: int, device, temperature=None, top_k=None, top_p=None, seed=None, offset=None, min_p=None):
    """Normalise per-row sampling parameters (numbers or [B] tensors) to device tensors and check them:
    (temperature, top_k, top_p, seed, offset, min_p)."""
    temperature = v.per_row("temperature", temperature, B, torch.float32, device, 0.0)
    top_k = v.per_row("top_k", top_k, B, torch.int32, device, 0)
    top_p = v.per_row("top_p", top_p, B, torch.float32, device, 1.0)
    seed = v.per_row("seed", seed, B, torch.int64, device, 0)
    offset = v.per_row("offset", offset, B, torch.int64, device, 0)
    min_p = v.per_row("min_p", min_p, B, torch.float32, device, 0.0)
    v.in_range("temperature", temperature, 0.0)
    v.in_range("top_k", top_k, 0)
    v.in_range("top_p", top_p, 0.0, 1.0, lo_open=True)
    v.in_range("offset", offset, 0)
    v.in_range("min_p", min_p, 0.0, 1.0)
    return temperature, top_k, top_p, seed, offset, min_p


def known_row_kinds(temperature, top_k, top_p, min_p=()) -> tuple[bool, bool]:
    """What a caller holding every row's sampling parameters as numbers (lists, or host tensors) knows of its rows,
    for the ops' `sampled` / `filtered`: whether some row samples (temperature > 0) and whether some row uses top-k /
    top-p / min-p (top_k > 0, top_p < 1 or min_p > 0)."""
    values = lambda x: x.tolist() if isinstance(x, torch.Tensor) else x  # noqa: E731
    return (any(t > 0 for t in values(temperature)),
            any(k > 0 for k in values(top_k)) or any(p < 1.0 for p in values(top_p))
            or any(m > 0 for m in values(min_p)))


def row_kinds(V: int, given: tuple, params: tuple, sampled: bool | None, filtered: bool | None, *,
              filter_needs_sampling: bool) -> int:
    """The CUDA kernels' `rows` argument (csrc/common.cuh kRowsSampled | kRowsFiltered | kRowsFilterGuessed): whether
    some row samples (temperature > 0) and whether some row uses top-k / top-p / min-p, so that the kernels serving
    neither are not launched; 4 where the second is assumed, not known (top-k / top-p / min-p tensors the caller said
    nothing about: the kernels serve such rows all the same, but the split cut-off search is not chosen on a guess).

    given: temperature, top_k, top_p (and optionally min_p) as the caller passed them; params: the same as [B]
    tensors. sampled / filtered
    None: exact where given as numbers (or left out), else assumed True. False is a promise, checked against the
    values unless value checks are off (`trusted_inputs`, CUDA-graph capture): ValueError naming it when broken.
    filter_needs_sampling: top-k / top-p only matter on sampling rows (verify_draft)."""
    temperature, top_k, top_p = params[:3]
    min_p = params[3] if len(params) > 3 else None
    given_m = given[3] if len(given) > 3 else None
    for name, value in (("sampled", sampled), ("filtered", filtered)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool or None, got {type(value).__name__}")
    check = not v.skip_value_checks()  # a caller's False is checked (what numbers tell needs no check)
    tensor = lambda x: isinstance(x, torch.Tensor)  # noqa: E731  (else a number, or None: the default)
    if sampled is None:
        sampled = tensor(given[0]) or (given[0] or 0.0) > 0
    elif not sampled and check and bool((temperature > 0).any()):
        raise ValueError("sampled=False, but a row's temperature is > 0")
    guessed = False
    if filtered is None:
        guessed = tensor(given[1]) or tensor(given[2]) or tensor(given_m)
        filtered = (guessed or 0 < (given[1] or 0) < V or (1.0 if given[2] is None else given[2]) < 1.0
                    or (given_m or 0.0) > 0)
    elif not filtered and check:
        rows = ((top_k > 0) & (top_k < V)) | (top_p < 1.0)
        if min_p is not None:
            rows |= min_p > 0
        if filter_needs_sampling:
            rows &= temperature > 0
        if bool(rows.any()):
            raise ValueError("filtered=False, but a row uses top-k, top-p or min-p"
                             + (" with temperature > 0" if filter_needs_sampling else ""))
    return int(sampled) | 2 * int(filtered) | 4 * int(guessed)


def sample_draft(logits, *, temperature=None, top_k=None, top_p=None, seed=None, offset=None,
                 fallback_threshold=None, min_p=None, sampled: bool | None = None, filtered: bool | None = None,
                 backend: str | None = None) -> DraftSample:
    """Sample the next draft token of each row in one pass over the logits.

    Parameters
    ----------
    logits : [B, V] float16 / bfloat16 / float32 tensor of small-model logits.
    temperature : number or [B] float; 0 means greedy (argmax). Default 0.
    top_k : number or [B] int; 0 disables. top_p : number or [B] float in (0, 1]; 1 disables.
    min_p : number or [B] float in [0, 1]; keeps the tokens whose probability is at least min_p times the largest
        (after temperature); 0 (the default) disables. A token must pass top-k, top-p and min-p.
    seed, offset : number or [B] int64; the Philox key and step counter (see `bild_kernels.reference`).
    fallback_threshold : number or [B] float in [0, 1]; fallback = max_probs < it. Default 0.
    sampled, filtered : whether some row samples (temperature > 0) / uses top-k, top-p or min-p, where the caller knows
        it on the host (None: known for parameters given as numbers, else assumed): with False the CUDA backend
        launches none of the kernels that only those rows need. False is checked against the values unless value
        checks are off (`bild_kernels.ops.trusted_inputs`), where a wrong False gives wrong results for those rows.
    backend : "cuda" | "triton" | "ref" | None (automatic).
    """
    dev = v.tensor("logits", logits, dtypes=v.FLOATS, ndim=2).device
    B, V = logits.shape
    if V == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    given = (temperature, top_k, top_p, min_p)
    temperature, top_k, top_p, seed, offset, min_p = sampling_params(B, dev, temperature, top_k, top_p, seed, offset,
                                                                     min_p)
    fallback_threshold = v.per_row("fallback_threshold", fallback_threshold, B, torch.float32, dev, 0.0)
    v.in_range("fallback_threshold", fallback_threshold, 0.0, 1.0)
    rows = row_kinds(V, given, (temperature, top_k, top_p, min_p), sampled, filtered, filter_needs_sampling=False)
    fn = resolve("sample_draft", dev, backend)
    args = (logits.contiguous(), temperature, top_k, top_p, seed, offset, fallback_threshold, min_p)
    return DraftSample(*call_with_rows("sample_draft", fn, args, rows))


def call_with_rows(op: str, fn, args: tuple, rows: int):
    """Run a backend's `op`: the CUDA kernel also gets the `rows` hint (see `row_kinds`), the others take none."""
    return fn(*args, rows=rows) if fn is registered(op, "cuda") else fn(*args)


def filtered_probs(logits, temperature, top_k, top_p, min_p=None):
    """The distributions sample_draft draws from, as full rows [B, V] float32: softmax of the
    temperature-scaled, top-k/top-p/min-p-filtered logits (one-hot argmax at temperature 0). Speculative
    sampling needs them to verify the drafts."""
    from bild_kernels.reference.sampling import _filter_top_k_top_p
    z = logits.float()
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(1)
    probs = torch.softmax(_filter_top_k_top_p(z / t, top_k, top_p, min_p), dim=1)
    onehot = torch.nn.functional.one_hot(z.argmax(1), z.shape[1]).to(probs.dtype)
    return torch.where(greedy.unsqueeze(1), onehot, probs)


def pack_draft_probs(rows, K: int, V: int, like: torch.Tensor, one_hot=None) -> torch.Tensor:
    """Stack per-sequence lists of [V] probability rows into [B, K, V], zero-padded. one_hot: per sequence None, or
    the token ids of drafts that were not sampled (an n-gram lookup's): their rows are one-hot at those ids (what
    speculative sampling verifies a deterministic draft against: accepted with probability q(token))."""
    out = torch.zeros((len(rows), K, V), dtype=torch.float32, device=like.device)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.stack(r)
    hot = [(i, j, t) for i, ids in enumerate(one_hot or []) if ids for j, t in enumerate(ids)]
    if hot:
        idx = torch.tensor(hot, dtype=torch.int64).T.to(like.device, non_blocking=True)
        out[idx[0], idx[1], idx[2]] = 1.0
    return out
