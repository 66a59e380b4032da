"""Token bitmasks on logits: structured output's allowed tokens (a grammar's mask), -inf on every other token."""
from __future__ import annotations

import torch

from bild_kernels._backend import resolve
from bild_kernels.ops import _validate as v


def apply_token_bitmask(logits, bitmask, *, backend: str | None = None) -> torch.Tensor:
    """The logits with -inf on every token the bitmask does not allow (the spec:
    `reference.apply_token_bitmask_ref`), xgrammar's layout and meaning.

    Parameters
    ----------
    logits : [..., V] float16 / bfloat16 / float32 / float64 (e.g. [B, K+1, V]: every verify position of a row).
    bitmask : [..., ceil(V / 32)] int32 with the logits' leading shape: bit t % 32 of word t // 32 (bit 0 the least
        significant, the word read as uint32) set allows token t. The bits past V in the last word are ignored.
        `reference.pack_token_bitmask` makes one from bool [..., V].
    backend : "cuda" | "triton" | "cpu" | "ref" | None (automatic).

    Returns a new tensor of the logits' shape and dtype on their device: each allowed token's logit bit for bit,
    -inf elsewhere (a row whose mask is all clear comes back all -inf: the caller's to avoid). Nothing is read back
    to the host, so the call can be captured in a CUDA graph.
    """
    dev = v.tensor("logits", logits, dtypes=v.FLOATS).device
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with a non-empty vocabulary, got {list(logits.shape)}")
    V = logits.shape[-1]
    W = (V + 31) // 32
    v.tensor("bitmask", bitmask, dtypes=(torch.int32,), device=dev)
    if tuple(bitmask.shape[:-1]) != tuple(logits.shape[:-1]) or bitmask.dim() != logits.dim():
        raise ValueError(f"bitmask must have the logits' leading shape {list(logits.shape[:-1])} (then ceil(V / 32) "
                         f"words), got {list(bitmask.shape)}")
    if bitmask.shape[-1] != W:
        raise ValueError(f"bitmask must hold ceil(V / 32) = {W} words a row for V = {V}, got {bitmask.shape[-1]}")
    fn = resolve("apply_token_bitmask", dev, backend)
    return fn(logits.contiguous(), bitmask.contiguous())
