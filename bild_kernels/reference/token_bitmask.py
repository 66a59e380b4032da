"""Token bitmasks on logits (apply_token_bitmask): the allowed tokens of structured output (a grammar's mask at each
step), in xgrammar's layout: bit t % 32 of int32 word t // 32 (bit 0 the least significant, the word read as
uint32) set means token t is allowed."""
from __future__ import annotations

import torch


def _shifts(device) -> torch.Tensor:
    return torch.arange(32, dtype=torch.int32, device=device)


def unpack_token_bitmask(bitmask, V):
    """The allowed tokens of a bitmask [..., ceil(V / 32)] int32: bool [..., V] (the bits past V in the last word are
    dropped)."""
    bits = (bitmask.unsqueeze(-1) >> _shifts(bitmask.device)) & 1  # [..., W, 32]; `& 1` undoes the sign's shift-in
    return bits.flatten(-2)[..., :V].bool()


def pack_token_bitmask(allowed):
    """The bitmask of bool [..., V] allowed tokens: int32 [..., ceil(V / 32)], the bits past V in the last word clear
    (unpack_token_bitmask's inverse)."""
    V = allowed.shape[-1]
    W = (V + 31) // 32
    padded = torch.zeros((*allowed.shape[:-1], W * 32), dtype=torch.int64, device=allowed.device)
    padded[..., :V] = allowed.to(torch.int64)
    words = (padded.view(*allowed.shape[:-1], W, 32) << _shifts(allowed.device).long()).sum(-1)  # [0, 2**32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # bit 31 is the int32's sign


def apply_token_bitmask_ref(logits, bitmask):
    """logits [..., V] with -inf where bitmask [..., ceil(V / 32)] int32 (the same leading shape) does not allow the
    token: a new tensor of the logits' shape and dtype, every allowed logit its input's value. A row whose mask is all
    clear comes back all -inf."""
    return logits.masked_fill(~unpack_token_bitmask(bitmask, logits.shape[-1]), float("-inf"))
