"""cpu_feature_draft_chain: a feature draft's whole greedy draft run for a batch of sequences in a single call, float32
on the CPU (the counterpart of the CUDA-graph draft loop for the engine's CPU runs); and its pieces
cpu_rms_norm and cpu_feature_input, which the executor's own CPU passes use so that both paths round alike.

A feature-draft step's kernels cost ~0.25 ms on the AMD EPYC, but as an engine extend (block bookkeeping,
metadata tensors, the executor's forward, sampling checks, the loop's host reads) it cost ~0.63 ms. The "cpu"
backend (csrc/cpu_feature_draft.cpp) runs every step of a run in C++ on the extension's layer, product and
sampling code; "ref" (`reference.cpu_feature_draft_chain_ref`) is the same loop in PyTorch ops.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from bild_kernels._backend import resolve
from bild_kernels.ops import _validate as v
from bild_kernels.ops.cpu_decoder_layer import LayerWeights, layer_args, layer_extras


class DraftChain(NamedTuple):
    tokens: list[int]  # the drafted tokens (those before the stop)
    max_probs: list[float]  # every step's confidence (max probability), the unsure step's last
    steps: int  # forwards run
    stop: str  # "max_steps", "unsure" (the last step's token was not drafted) or "not_finite"
    unsure_token: int | None  # the unsure step's token (stop "unsure"), else None


_STOPS = ("max_steps", "unsure", "not_finite")


def cpu_rms_norm(x, weight, eps: float, *, backend: str | None = None) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2, -1) + eps)) for x [..., H] float32 on the CPU, weight [H]."""
    v.tensor("x", x, dtypes=(torch.float32,), device=torch.device("cpu"))
    v.tensor("weight", weight, dtypes=(torch.float32,), ndim=1, device=x.device)
    if x.dim() < 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"x's last dimension must be the weight's {weight.shape[0]}, got {list(x.shape)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return resolve("cpu_rms_norm", x.device, backend)(x.contiguous(), weight.contiguous(), float(eps))


def _check_inputs(features, next_ids, shift, inv_std, embed, fc) -> None:
    v.tensor("features", features, dtypes=(torch.float32,), ndim=2, device=torch.device("cpu"))
    T, H = features.shape
    v.tensor("next_ids", next_ids, dtypes=(torch.int64,), ndim=1, device=features.device)
    v.shape("next_ids", next_ids, (T,))
    for name, t in (("shift", shift), ("inv_std", inv_std)):
        v.tensor(name, t, dtypes=(torch.float32,), ndim=1, device=features.device)
        v.shape(name, t, (H,))
    v.tensor("embed", embed, dtypes=(torch.float32,), ndim=2, device=features.device)
    if embed.shape[1] != H:
        raise ValueError(f"embed must be [V, {H}], got {list(embed.shape)}")
    v.in_range("next_ids", next_ids, 0, embed.shape[0] - 1)
    if not (isinstance(fc, tuple) and len(fc) == 3):
        raise TypeError("fc must be a (weight, scale or None, bias or None) tuple")


def cpu_feature_input(features, next_ids, *, shift, inv_std, embed, inv_emb_scale: float, fc: tuple,
                      backend: str | None = None) -> torch.Tensor:
    """A feature draft's layer-0 input [T, H]: fc([shift + features * inv_std, embed[next_ids] * inv_emb_scale]).

    features [T, H] float32, next_ids [T] int64 (ids of embed [V, H]), shift and inv_std [H]; fc: (weight, scale or
    None, bias or None) in any form `cpu_decoder_layer` takes (packed blocks at int16 activations)."""
    _check_inputs(features, next_ids, shift, inv_std, embed, fc)
    fn = resolve("cpu_feature_input", features.device, backend)
    return fn(features.contiguous(), next_ids.contiguous(), shift.contiguous(), inv_std.contiguous(),
              embed.contiguous(), float(inv_emb_scale), *fc)


def cpu_feature_draft_chain(features, next_ids, *, counts, starts, caps, shift, inv_std, embed,
                            inv_emb_scale: float, fc: tuple, layers: list[LayerWeights], key_caches: list,
                            value_caches: list, norm, head: tuple, head_vocab=None, cos, sin, slot_mapping,
                            block_tables, num_heads: int, num_kv_heads: int, scale: float, sliding_windows: list[int],
                            eps: float, activation_bits: int = 16, fallback_threshold: float, energy: bool = False,
                            penalties: tuple | None = None, backend: str | None = None) -> list[DraftChain]:
    """Draft up to caps[b] tokens greedily for each of B sequences with a feature draft, every step of all of them
    in one batched forward (see `reference.cpu_feature_draft_chain_ref` for the exact loop).

    features [sum(counts), H] float32 and next_ids [sum(counts)] int64: each sequence's verified positions
    starts[b] .. starts[b] + counts[b] - 1 not yet fed (the large model's features, the token after each), in
    sequence order. counts, starts, caps: B ints. layers: each layer's `LayerWeights` (SwiGLU; per-head q/k norms and
    output norms where they are set), with its key and value caches
    [blocks, block_size, H_kv, D]. head: (weight, scale, bias) like fc; head_vocab [V_head] int64: the ids it scores
    (None: all). cos, sin [P, D]: rotary rows by position (P >= every starts[b] + counts[b] + caps[b] - 1).
    slot_mapping [sum(counts + caps - 1)] int64: each sequence's run of the cache slots of its step 0's positions,
    then of each later step's. block_tables [B, M] int32. fallback_threshold: a step is unsure when its max
    probability is below it (energy: when its energy -logsumexp is above it); an unsure step's token is not drafted
    and ends that sequence's run. The K/V of every position fed are written; the caller drops the chained ones.
    penalties: None, or (penalty_ids [B, L] int64, penalty_rows [B, 3] int64, penalty_values [B, 3] float64,
    banned_ids [B, E] int64, bias_ids [B, E'] int64, bias_values [B, E'] float64): SamplingParams' logit bias and
    penalties on every step's head logits (the reference's docstring)."""
    _check_inputs(features, next_ids, shift, inv_std, embed, fc)
    per_seq = {}
    for name, vals, lo in (("counts", counts, 1), ("starts", starts, 0), ("caps", caps, 1)):
        vals = vals.tolist() if isinstance(vals, torch.Tensor) else list(vals)
        if not vals or any(isinstance(x, bool) or not isinstance(x, int) or x < lo for x in vals):
            raise ValueError(f"{name} must be a non-empty list of ints >= {lo}, got {vals!r}")
        per_seq[name] = vals
    counts, starts, caps = per_seq["counts"], per_seq["starts"], per_seq["caps"]
    B = len(counts)
    if not len(starts) == len(caps) == B:
        raise ValueError(f"counts ({B}), starts ({len(starts)}) and caps ({len(caps)}) must have one entry a sequence")
    if features.shape[0] != sum(counts):
        raise ValueError(f"features hold {features.shape[0]} positions, counts sum to {sum(counts)}")
    if not (energy or 0.0 <= fallback_threshold <= 1.0):
        raise ValueError(f"fallback_threshold (a probability) must be in [0, 1], got {fallback_threshold}")
    if not (len(layers) == len(key_caches) == len(value_caches) == len(sliding_windows) >= 1):
        raise ValueError(f"layers ({len(layers)}), key_caches ({len(key_caches)}), value_caches "
                         f"({len(value_caches)}) and sliding_windows ({len(sliding_windows)}) must match, >= 1")
    top = max(s + n + c - 1 for s, n, c in zip(starts, counts, caps))
    for name, t in (("cos", cos), ("sin", sin)):
        v.tensor(name, t, dtypes=(torch.float32,), ndim=2, device=features.device)
        if t.shape[0] < top:
            raise ValueError(f"{name} must cover positions up to {top - 1}, has {t.shape[0]} rows")
    v.tensor("slot_mapping", slot_mapping, dtypes=(torch.int64,), ndim=1, device=features.device)
    v.shape("slot_mapping", slot_mapping, (sum(n + c - 1 for n, c in zip(counts, caps)),))
    v.tensor("block_tables", block_tables, dtypes=(torch.int32,), ndim=2, device=features.device)
    if block_tables.shape[0] != B:
        raise ValueError(f"block_tables must hold one row a sequence [{B}, M], got {list(block_tables.shape)}")
    v.tensor("norm", norm, dtypes=(torch.float32,), ndim=1, device=features.device)
    v.shape("norm", norm, (features.shape[1],))
    if head_vocab is not None:
        v.tensor("head_vocab", head_vocab, dtypes=(torch.int64,), ndim=1, device=features.device)
    if not (isinstance(head, tuple) and len(head) == 3):
        raise TypeError("head must be a (weight, scale or None, bias or None) tuple")
    if penalties is not None:
        names = ("penalty_ids", "penalty_rows", "penalty_values", "banned_ids", "bias_ids", "bias_values")
        if not (isinstance(penalties, tuple) and len(penalties) == 6):
            raise TypeError(f"penalties must be None or a tuple of six tensors {names}")
        for name, t, dt, width in zip(names, penalties, (torch.int64, torch.int64, torch.float64, torch.int64,
                                                          torch.int64, torch.float64), (None, 3, 3, None, None, None)):
            v.tensor(name, t, dtypes=(dt,), ndim=2, device=features.device)
            v.shape(name, t, (B, width))
        v.shape("bias_values", penalties[5], tuple(penalties[4].shape))
        penalties = tuple(t.contiguous() for t in penalties)
    fn = resolve("cpu_feature_draft_chain", features.device, backend)
    flat = [a for w in layers for a in layer_args(w)]
    extras = [layer_extras(w) for w in layers]  # Qwen3's q/k norms (a feature draft's layer is Llama's or Qwen's)
    if any(e and e[4] != 0 for e in extras):
        raise ValueError("cpu_feature_draft_chain runs SwiGLU layers; a layer asks for another activation")
    norms = chain_layer_norms(extras)
    i64 = dict(dtype=torch.int64)
    out = fn(features.contiguous(), next_ids.contiguous(), shift.contiguous(), inv_std.contiguous(),
             embed.contiguous(), float(inv_emb_scale), *fc, flat, list(key_caches), list(value_caches),
             norm.contiguous(), *head, head_vocab, cos.contiguous(), sin.contiguous(), slot_mapping.contiguous(),
             block_tables.contiguous(), torch.tensor(counts, **i64), torch.tensor(starts, **i64),
             torch.tensor(caps, **i64), num_heads, num_kv_heads, float(scale), [int(w) for w in sliding_windows],
             float(eps), int(activation_bits), float(fallback_threshold), bool(energy), norms,
             *(penalties or (None,) * 6))
    return chain_result(*out)


def chain_layer_norms(extras: list[tuple]) -> list:
    """The op's layer_norms from each layer's `layer_extras` (() or (q_norm, k_norm, attn_out_norm, mlp_out_norm,
    activation)): none where no layer has any, else four a layer."""
    if not any(extras):
        return []
    return [t for e in extras for t in (e[:4] if e else (None,) * 4)]


def chain_result(tokens, probs, status) -> list[DraftChain]:
    """The op's (tokens [B, W], max_probs [B, W], status [B, 3]) as one DraftChain a sequence (three host reads)."""
    out = []
    for ids, ps, (drafted, steps, stop) in zip(tokens.tolist(), probs.tolist(), status.tolist()):
        out.append(DraftChain(ids[:drafted], ps[:steps], steps, _STOPS[stop], ids[drafted] if stop == 1 else None))
    return out
