"""The CPU extension's products: float32, int8 and GGUF-block (Q8_0, Q4_1; packed for integer activations)
weights, and the logits' row statistics."""
from __future__ import annotations

import torch


def cpu_linear_ref(x, weight, bias=None):
    """x [M, K] @ weight[N, K].T (+ bias [N]) -> [M, N]: the specification of the CPU small-M matmul (the
    kernel sums in its own fixed order, so the two agree to float32 rounding, not bit for bit)."""
    return torch.nn.functional.linear(x, weight, bias)


def cpu_linear_int8_ref(x, qweight, scale, bias=None):
    """x [M, K] float32 @ (qweight [N, K] int8 as float).T, times scale [N] (+ bias [N]) -> [M, N]: weights
    stored as w ~= qweight * scale[:, None], the scale applied to each finished sum."""
    y = (x @ qweight.to(x.dtype).T) * scale
    return y if bias is None else y + bias


def cpu_linear_q8_0_ref(x, qweight, block_scale, bias=None):
    """x [M, K] float32 @ w.T (+ bias [N]) -> [M, N], w [N, K] = qweight [N, K] int8 times block_scale [N, K / 32],
    one scale per 32 weights of a row (a GGUF Q8_0 matrix; q * d is exact in float32)."""
    w = qweight.to(x.dtype) * block_scale.repeat_interleave(32, dim=1)
    y = x @ w.T
    return y if bias is None else y + bias


def q4_1_dequantize(qweight, dm):
    """The float32 weights [N, K] of a Q4_1 matrix: qweight [N, K / 2] uint8 (each block of 32 weights as 16 bytes,
    byte j holding weight j in its low nibble and weight j + 16 in its high one: a GGUF's layout), dm
    [N, K / 32, 2] float32 (each block's scale d and minimum m): w = d * q + m (d * q is exact in float32)."""
    N, nb = dm.shape[0], dm.shape[1]
    b = qweight.view(N, nb, 16)
    q = torch.cat([b & 15, b >> 4], -1).to(torch.float32)  # [N, nb, 32]
    return (dm[..., :1].float() * q + dm[..., 1:].float()).reshape(N, nb * 32)


def q4_1_quantize(w):
    """Q4_1 blocks (qweight [N, K / 2] uint8, dm [N, K / 32, 2] float32) near w [N, K] (K a multiple of 32), as
    llama.cpp makes them: per block of 32, m = its minimum, d = (maximum - minimum) / 15, both rounded to fp16,
    q = round((w - m) / d) in 0..15. q4_1_dequantize gives the weights they stand for."""
    N, K = w.shape
    b = w.float().reshape(N, K // 32, 32)
    lo, hi = b.amin(2), b.amax(2)
    d = ((hi - lo) / 15).clamp(min=1e-6).half().float()
    m = lo.half().float()
    nib = torch.round((b - m[..., None]) / d[..., None]).clamp(0, 15).to(torch.uint8)
    return (nib[..., :16] | (nib[..., 16:] << 4)).reshape(N, K // 2).contiguous(), torch.stack([d, m], -1).contiguous()


def cpu_linear_q4_1_ref(x, qweight, dm, bias=None):
    """x [M, K] @ w.T (+ bias [N]) -> [M, N], w = q4_1_dequantize(qweight, dm) (a GGUF Q4_1 matrix)."""
    y = x @ q4_1_dequantize(qweight, dm).to(x.dtype).T
    return y if bias is None else y + bias


def q4_1x16_pack(qweight, dm):
    """Q4_1 blocks (qweight [N, K / 2] uint8, dm [N, K / 32, 2] float32; N a multiple of 16) repacked for
    `cpu_linear_q4_1x16`: 16 output rows side by side. packed [N / 16, K / 32, 4, 16, 4] uint8: for rows g and
    block b, entry [t, n] is a 32-bit word of 8 nibbles, nibble s (bits 4s..4s+3) = q[16g + n, 8t + 2s] and
    nibble s + 4 = q[16g + n, 8t + 2s + 1] (q the block's 32 values in order, little-endian bytes); dm16
    [N / 16, K / 32, 2, 16] float32: d and m of the 16 rows. The same weights (q4_1x16_unpack)."""
    N, nb = dm.shape[0], dm.shape[1]
    if N % 16:
        raise ValueError(f"q4_1x16_pack: N must be a multiple of 16, got {N}")
    b = qweight.view(N, nb, 16).to(torch.int64)
    q = torch.cat([b & 15, b >> 4], -1).view(N // 16, 16, nb, 4, 4, 2)  # [g, n, b, t, s, e]: k = 8t + 2s + e
    nib = q.permute(0, 2, 3, 1, 5, 4).reshape(N // 16, nb, 4, 16, 8)  # nibble p = 4e + s
    word = (nib << (4 * torch.arange(8))).sum(-1)  # [g, b, t, n] < 2^32
    packed = torch.stack([(word >> (8 * i)) & 255 for i in range(4)], -1).to(torch.uint8)
    return packed.contiguous(), dm.view(N // 16, 16, nb, 2).permute(0, 2, 3, 1).contiguous()


def q4_1x16_unpack(packed, dm16):
    """The inverse of q4_1x16_pack: (qweight [N, K / 2] uint8, dm [N, K / 32, 2] float32)."""
    G, nb = packed.shape[0], packed.shape[1]
    word = sum(packed[..., i].to(torch.int64) << (8 * i) for i in range(4))  # [g, b, t, n]
    nib = (word[..., None] >> (4 * torch.arange(8))) & 15  # [g, b, t, n, p]
    q = nib.view(G, nb, 4, 16, 2, 4).permute(0, 3, 1, 2, 5, 4).reshape(G * 16, nb, 32)  # [g, n, b, t, s, e]
    qweight = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8).reshape(G * 16, nb * 16)
    return qweight.contiguous(), dm16.permute(0, 3, 1, 2).reshape(G * 16, nb, 2).contiguous()


def q4_1x16_quantize_rows(x, activation_bits: int = 16):
    """The activations as cpu_linear_q4_1x16 rounds them: x [M, K] float32 (K a multiple of 32) -> xq [M, K]
    int16 = round-half-even(x * (32767 / amax)) per run of 32 (0 where amax = 0), dx [M, K / 32] = amax / 32767,
    sx [M, K / 32] = the run's float sum (the kernel sums in another order: within rounding).
    activation_bits=8: int8 with 127 for 32767 (clamped to [-127, 127])."""
    if activation_bits not in (8, 16):
        raise ValueError(f"activation_bits must be 8 or 16, got {activation_bits!r}")
    top = 32767.0 if activation_bits == 16 else 127.0
    M, K = x.shape
    b = x.float().reshape(M, K // 32, 32)
    amax = b.abs().amax(-1)
    inv = torch.where(amax > 0, torch.tensor(top) / amax, torch.zeros_like(amax))
    xq = torch.round(b * inv[..., None]).clamp(-top - (activation_bits == 16), top)
    xq = xq.to(torch.int16 if activation_bits == 16 else torch.int8).reshape(M, K)
    return xq, amax / top, b.sum(-1)


def _x16_linear(x, q, d, m=None, bias=None, activation_bits=16):
    """What both integer-activation kernels compute, in float64: q [N, nb, 32] integer weights, d (and m) [N, nb]
    their scales (and minimums); x rounded by q4_1x16_quantize_rows(x, activation_bits); per block b the exact
    integer isum = sum(q * xq), then y = sum_b d * dx * isum (+ m * sx) -> [M, N] float32 (+ bias)."""
    nb = q.shape[1]
    xq, dx, sx = q4_1x16_quantize_rows(x, activation_bits)
    isum = torch.einsum("mbk,nbk->mnb", xq.view(-1, nb, 32).to(torch.int64), q.to(torch.int64))  # exact
    y = isum.double() * (d[None].double() * dx[:, None, :].double())
    if m is not None:
        y = y + m[None].double() * sx[:, None, :].double()
    y = y.sum(-1).float()
    return y if bias is None else y + bias


def cpu_linear_q4_1x16_ref(x, packed, dm16, bias=None, activation_bits=16):
    """x [M, K] @ w.T (+ bias [N]) -> [M, N] float32 as `cpu_linear_q4_1x16` computes it: w the Q4_1 weights of
    (packed, dm16) (q4_1x16_pack), x rounded to int16 (or int8) per run of 32 (q4_1x16_quantize_rows); per block
    b the exact integer sum(q * xq), then y = sum_b d * dx * isum + m * sx (in float64 here: the kernel's
    float32 sums agree within rounding)."""
    qweight, dm = q4_1x16_unpack(packed, dm16)
    N, nb = dm.shape[0], dm.shape[1]
    b = qweight.view(N, nb, 16)
    q = torch.cat([b & 15, b >> 4], -1)  # [N, nb, 32]
    return _x16_linear(x, q, dm[..., 0], dm[..., 1], bias, activation_bits)


def q8_0x16_pack(qweight, block_scale):
    """Q8_0 blocks (qweight [N, K] int8, block_scale [N, K / 32] float32; N a multiple of 16) repacked for
    `cpu_linear_q8_0x16`: packed [N / 16, K / 32, 16, 16, 2] int8 with [g, b, p, n, e] = q[16g + n, 32b + 2p + e],
    d16 [N / 16, K / 32, 16] float32 with [g, b, n] = d[16g + n, b]."""
    N, K = qweight.shape
    if N % 16:
        raise ValueError(f"q8_0x16_pack: N must be a multiple of 16, got {N}")
    packed = qweight.view(N // 16, 16, K // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous()
    return packed, block_scale.view(N // 16, 16, K // 32).permute(0, 2, 1).contiguous()


def cpu_linear_q8_0x16_ref(x, packed, d16, bias=None, activation_bits=16):
    """x [M, K] @ w.T (+ bias [N]) -> [M, N] float32 as `cpu_linear_q8_0x16` computes it: w = q * d of the Q8_0
    blocks (packed, d16) (q8_0x16_pack), x rounded to int16 (or int8) per run of 32 (q4_1x16_quantize_rows); per
    block the exact integer sum(q * xq), then y = sum_b d * dx * isum (float64 here)."""
    G, nb = packed.shape[0], packed.shape[1]
    q = packed.permute(0, 3, 1, 2, 4).reshape(G * 16, nb, 32)  # [N, nb, 32]
    return _x16_linear(x, q, d16.permute(0, 2, 1).reshape(G * 16, nb), bias=bias, activation_bits=activation_bits)


def logit_row_stats_ref(y):
    """Each row's statistics of logits y [M, N] float32, as `cpu_linear_q8_0x16_stats` returns them beside y: max [M],
    logsumexp [M], first argmax [M] int64, finite [M] bool (every logit of the row finite; where not, the other
    three are 0)."""
    finite = torch.isfinite(y).all(-1)
    z = torch.where(finite[:, None], y, torch.zeros_like(y))
    return z.amax(-1), torch.logsumexp(z.double(), -1).float() * finite, z.argmax(-1) * finite, finite


def cpu_linear_q8_0x16_stats_ref(x, packed, d16, bias=None, activation_bits=16):
    """`cpu_linear_q8_0x16_ref`'s y and its rows' statistics (`logit_row_stats_ref`): (y, max, lse, argmax, finite)."""
    y = cpu_linear_q8_0x16_ref(x, packed, d16, bias, activation_bits)
    return (y, *logit_row_stats_ref(y))
