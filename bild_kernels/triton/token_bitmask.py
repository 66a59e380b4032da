"""Triton token bitmask on logits (spec: `bild_kernels.reference.apply_token_bitmask_ref`).

The public op `bild_kernels.ops.apply_token_bitmask` validates inputs; the launcher here only allocates the output and
launches one kernel, no host reads (a CUDA graph can capture it). The kernel only selects, so it moves the logits as
integers of their width (int16 for float16 / bfloat16, int32, int64): every allowed logit keeps its bits, and no
float arithmetic is done (the interpreter's bfloat16 arithmetic is wrong; the GPU needs none).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bild_kernels.triton._sampling_common import stream_block

_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # the integer of each logits width
# -inf's bits in each logits dtype, read as the signed integer of its width (bf16 0xFF80, fp16 0xFC00, ...)
_NEG_INF = {dt: int(torch.tensor(float("-inf"), dtype=dt).view(_BITS[dt.itemsize]).item())
            for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


# Grid (R, cdiv(W, WORDS)): one program per WORDS words (32 * WORDS tokens) of one of the R rows, as a [WORDS, 32]
# tile: bit j of word w tests token 32 w + j, the tile's logits are loaded whole (coalesced, vectorised) and stored
# back with -inf's bits where the bit is clear. Tokens past V (the last word's spare bits, the tile's spare words) are
# neither read nor written.
@triton.jit
def _apply_token_bitmask_kernel(logits_ptr, bitmask_ptr, out_ptr, V, W, NEG_INF: tl.constexpr, WORDS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    w = tl.program_id(1) * WORDS + tl.arange(0, WORDS)
    words = tl.load(bitmask_ptr + row * W + w, mask=w < W, other=0)
    bit = tl.arange(0, 32)
    cols = w[:, None] * 32 + bit[None, :]  # [WORDS, 32]
    in_row = cols < V
    allowed = ((words[:, None] >> bit[None, :]) & 1) != 0  # (`& 1`: the shift of a negative word brings in ones)
    z = tl.load(logits_ptr + row * V + cols, mask=in_row, other=0)
    z = tl.where(allowed, z, tl.full([WORDS, 32], NEG_INF, out_ptr.dtype.element_ty))
    tl.store(out_ptr + row * V + cols, z, mask=in_row)


def apply_token_bitmask(logits, bitmask):
    out = torch.empty_like(logits)
    if out.numel() == 0:
        return out
    V, W = logits.shape[-1], bitmask.shape[-1]
    R = logits.numel() // V
    bits = _BITS[logits.element_size()]
    tokens, warps = stream_block(R, 32 * W)  # the penalties' rule, over the W words' 32 W tokens
    WORDS = tokens // 32
    _apply_token_bitmask_kernel[(R, triton.cdiv(W, WORDS))](logits.view(bits), bitmask, out.view(bits), V, W,
                                                           NEG_INF=_NEG_INF[logits.dtype], WORDS=WORDS,
                                                           num_warps=warps)
    return out


# One representative compilation per logits dtype (bf16 serving, fp16, fp32, fp64), for the sm_90 AOT check.
def _aot_spec(dtype: torch.dtype) -> tuple:
    ty = {2: "*i16", 4: "*i32", 8: "*i64"}[dtype.itemsize]
    sig = {"logits_ptr": ty, "bitmask_ptr": "*i32", "out_ptr": ty, "V": "i32", "W": "i32", "NEG_INF": "constexpr",
           "WORDS": "constexpr"}
    assert list(sig) == _apply_token_bitmask_kernel.arg_names, (list(sig), _apply_token_bitmask_kernel.arg_names)
    return _apply_token_bitmask_kernel, sig, {"NEG_INF": _NEG_INF[dtype], "WORDS": 64}


AOT_SPECS = [_aot_spec(torch.bfloat16), _aot_spec(torch.float16), _aot_spec(torch.float32), _aot_spec(torch.float64)]
