"""Philox4x32-10 and the uniform / Gumbel draws every random op takes (see the package's docstring)."""
from __future__ import annotations

import torch


# Stream identifiers (the `purpose` byte of the Philox counter).
PURPOSE_DRAFT_SAMPLE = 1  # sample_draft: Gumbel noise over the vocabulary
PURPOSE_VERIFY_ACCEPT = 2  # verify_draft(sample): the acceptance uniform of position j
PURPOSE_VERIFY_TOKEN = 3  # verify_draft: Gumbel noise of the token emitted at position j

_M32 = 0xFFFFFFFF
_PHILOX_A = 0xD2511F53
_PHILOX_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # b holds uint32 values in int64; a * b < 2**64 but may exceed int64: split b in 16-bit halves.
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _M32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi & _M32, lo


def philox_ref(seed: torch.Tensor, c0, c1, c2, c3) -> torch.Tensor:
    """Philox4x32-10; returns the first output word as int64 in [0, 2**32).

    seed: int64 tensor (any shape broadcastable with the counters); counters: int64 tensors or
    ints holding uint32 values.
    """
    seed = torch.as_tensor(seed, dtype=torch.int64)
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c = [torch.as_tensor(x, dtype=torch.int64, device=seed.device) & _M32 for x in (c0, c1, c2, c3)]
    c0, c1, c2, c3 = torch.broadcast_tensors(*c, k0)[:4]
    k0, k1 = torch.broadcast_tensors(k0, c0)[0], torch.broadcast_tensors(k1, c0)[0]
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_PHILOX_B, c2)
        hi_a, lo_a = _mulhilo(_PHILOX_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0


def uniform_ref(seed, index, offset, purpose: int, position) -> torch.Tensor:
    """Uniform float32 in (0, 1) for counter (index, offset, purpose/position), see module doc."""
    offset = torch.as_tensor(offset, dtype=torch.int64)
    position = torch.as_tensor(position, dtype=torch.int64)
    x = philox_ref(seed, index, offset & _M32, (offset >> 32) & _M32, (purpose << 24) | position)
    return uniform_of_word(x)


def uniform_of_word(x: torch.Tensor) -> torch.Tensor:
    """u = ((x >> 9) + 0.5) / 2**23 in float32 (exact) of Philox output words x (int64 tensors in [0, 2**32))."""
    return (((x >> 9).to(torch.float64) + 0.5) / 2.0**23).to(torch.float32)


def gumbel_ref(seed, index, offset, purpose: int, position) -> torch.Tensor:
    u = uniform_ref(seed, index, offset, purpose, position)
    return -torch.log(-torch.log(u))


# An upper bound of every Gumbel draw in float32: -log(-log(1 - 2**-24)) = 16.6355..., rounded up with room for
# a log that is a few ulps off (tested against the largest draw the formula can give).
GUMBEL_MAX = 16.64
