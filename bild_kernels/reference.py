"""PyTorch twins of every kernel: the specification.

Every Triton and CUDA kernel in this package must agree with the function here of the same stem
(`write_paged_kv` <-> `write_paged_kv_ref`). Inputs are assumed valid (the public ops in
`bild_kernels.ops` validate); math is done in float32 (float64 inputs stay float64).

Random numbers: every random op draws from one counter-based generator, Philox4x32-10, keyed by a
per-row int64 `seed` and addressed by a counter (c0, c1, c2, c3) = (index, offset_lo, offset_hi,
purpose << 24 | position). `index` runs over the vocabulary (or is 0 for a single draw), `offset`
is the per-row int64 step counter the caller advances, `purpose` separates the streams of
different ops. The first output word x gives the uniform u = ((x >> 9) + 0.5) / 2**23, exact in float32, in
[2**-24, 1 - 2**-24]: never 0 or 1, so a Gumbel draw -log(-log(u)) is finite and at most GUMBEL_MAX, which lets
a Gumbel-max kernel skip the draw of any logit that cannot beat its best so far and still return exactly this
reference's token.
Because the counter, not a hidden state, addresses every number, the op can be captured in a CUDA
graph (seed and offset are device tensors) and this reference reproduces the kernels exactly.
"""
from __future__ import annotations

import math

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


# --------------------------------------------------------------------------------------------
# Paged KV cache
# --------------------------------------------------------------------------------------------
def write_paged_kv_ref(key, value, key_cache, value_cache, slot_mapping) -> None:
    """Scatter key/value [T, H, D] into caches [num_blocks, block_size, H, D] at slot_mapping [T].

    Slot s means block s // block_size, row s % block_size; slot -1 is skipped (padding).
    """
    nb, bs = key_cache.shape[:2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    key_cache.view(nb * bs, *key_cache.shape[2:])[slots] = key[keep].to(key_cache.dtype)
    value_cache.view(nb * bs, *value_cache.shape[2:])[slots] = value[keep].to(value_cache.dtype)


def reserve_paged_kv_ref(block_tables, context_lens, num_new, free_blocks, num_free, block_size) -> None:
    """Grow each row's block table so it holds context_lens[b] + num_new[b] tokens.

    block_tables: [B, M] int32, a row's allocated blocks first, then -1. free_blocks: [N] int32, a
    stack whose first num_free[0] entries are the free blocks; blocks are popped from its top
    (highest index first), rows served in order b = 0, 1, ... Rows with context_lens[b] < 0 are
    inactive and untouched. If the pool runs short, num_free[0] is set to -1 - (blocks missing)
    and nothing else changes (the caller checks num_free >= 0).
    """
    nblk = (block_tables >= 0).sum(1)
    want = torch.where(context_lens >= 0, (context_lens + num_new + block_size - 1) // block_size, nblk)
    need = (want - nblk).clamp(min=0)
    total = int(need.sum())
    top = int(num_free[0])
    if total > top:
        num_free[0] = -1 - (total - top)
        return
    ptr = top
    for b in range(block_tables.shape[0]):
        for j in range(int(need[b])):
            ptr -= 1
            block_tables[b, int(nblk[b]) + j] = free_blocks[ptr]
    num_free[0] = ptr


def rollback_paged_kv_ref(block_tables, context_lens, num_rejected, free_blocks, num_free, block_size) -> None:
    """Drop the last num_rejected[b] tokens of each row and return emptied blocks to the pool.

    context_lens[b] -= num_rejected[b] (clamped at 0); every block of the row beyond
    ceil(new_len / block_size) (reserved but unused ones included) is pushed on the free stack in
    row order, then in table order, and its table entry set to -1. No KV data moves: rejected
    slots are simply overwritten later. Rows with context_lens[b] < 0 are inactive and untouched.
    """
    ptr = int(num_free[0])
    for b in range(block_tables.shape[0]):
        if int(context_lens[b]) < 0:
            continue
        new_len = max(int(context_lens[b]) - int(num_rejected[b]), 0)
        context_lens[b] = new_len
        keep = (new_len + block_size - 1) // block_size
        for j in range(keep, block_tables.shape[1]):
            blk = int(block_tables[b, j])
            if blk < 0:
                break
            free_blocks[ptr] = blk
            ptr += 1
            block_tables[b, j] = -1
    num_free[0] = ptr


def gather_paged_kv_ref(key_cache, value_cache, block_tables, context_lens):
    """Gather each row's first context_lens[b] tokens into dense [B, L, H, D] (L = max length).

    Positions past a row's length are zero. Used by the reference attention path.
    """
    B = block_tables.shape[0]
    bs = key_cache.shape[1]
    L = int(context_lens.clamp(min=0).max()) if B else 0
    pos = torch.arange(L, device=key_cache.device)
    blk = block_tables.long().gather(1, (pos // bs).unsqueeze(0).expand(B, -1).clamp(max=block_tables.shape[1] - 1))
    valid = pos.unsqueeze(0) < context_lens.unsqueeze(1)
    slots = torch.where(valid, blk * bs + pos % bs, torch.zeros_like(blk))
    flat_k = key_cache.reshape(-1, *key_cache.shape[2:])
    flat_v = value_cache.reshape(-1, *value_cache.shape[2:])
    k = flat_k[slots] * valid[..., None, None]
    v = flat_v[slots] * valid[..., None, None]
    return k, v


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


def cpu_decoder_layer_ref(x, cos, sin, input_norm, qkv_w, qkv_scale, qkv_bias, o_w, o_scale, o_bias, post_norm,
                          gate_up_w, gate_up_scale, gate_up_bias, down_w, down_scale, down_bias, key_cache,
                          value_cache, slot_mapping, query_start_loc, positions, block_tables, context_lens,
                          num_heads: int, num_kv_heads: int, scale: float, sliding_window: int, eps: float,
                          activation_bits: int = 16, *, linear=None, linear_int8=None, attention=None):
    """One Llama-family decoder layer over T new tokens x [T, hidden] (the LlamaExecutor's layer, op for op):
    RMSNorm, the fused q/k/v product, RoPE (cos/sin [T, D], rotate-half), the K/V written to the paged cache at
    slot_mapping (slot -1 skipped), paged attention, the output product and residual, RMSNorm, the fused
    gate/up product, SiLU(gate) * up, the down product and residual. A weight with a scale is int8
    (w ~= q * scale, `cpu_linear_int8_ref`) or, when uint8, Q4_1 blocks with dm [N, K / 32, 2] as the scale
    (`q4_1_dequantize`), or 5-D: Q4_1 (uint8) or Q8_0 (int8) blocks packed 16 rows a register, their products
    against activations rounded to activation_bits (`cpu_linear_q4_1x16_ref`, `cpu_linear_q8_0x16_ref`), else
    float (`cpu_linear_ref`). Returns the new stream [T, hidden];
    the caches are written in place. linear / linear_int8 / attention: other implementations of the products
    and the attention with the references' signatures (a benchmark's "PyTorch ops on the extension's kernels")."""
    from bild_kernels.models.attention import paged_attention_ref
    linear, linear_int8 = linear or cpu_linear_ref, linear_int8 or cpu_linear_int8_ref
    attention = attention or paged_attention_ref

    def norm(v, w):
        return cpu_rms_norm_ref(v, w, eps)

    def project(v, w, s, b):
        return _project_ref(v, w, s, b, activation_bits, linear, linear_int8)

    T, D = x.shape[0], key_cache.shape[3]
    Hq, Hkv = num_heads, num_kv_heads
    qkv = project(norm(x, input_norm), qkv_w, qkv_scale, qkv_bias)
    qk = qkv[:, :(Hq + Hkv) * D].view(T, Hq + Hkv, D)
    half = D // 2
    qk = qk * cos[:, None] + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin[:, None]
    q, k = qk[:, :Hq], qk[:, Hq:]
    v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
    write_paged_kv_ref(k, v, key_cache, value_cache, slot_mapping)
    attn = attention(q.contiguous(), key_cache, value_cache, query_start_loc, positions, block_tables, context_lens,
                     scale, sliding_window)
    x = x + project(attn.reshape(T, Hq * D), o_w, o_scale, o_bias)
    gate, up = project(norm(x, post_norm), gate_up_w, gate_up_scale, gate_up_bias).chunk(2, dim=-1)
    return x + project(torch.nn.functional.silu(gate) * up, down_w, down_scale, down_bias)


def _project_ref(v, w, s, b, activation_bits: int, linear=None, linear_int8=None):
    """v @ W.T (+ b) for a projection in any of cpu_decoder_layer_ref's weight forms (w, s: see there)."""
    linear, linear_int8 = linear or cpu_linear_ref, linear_int8 or cpu_linear_int8_ref
    if s is None:
        return linear(v, w, b)
    if w.dim() == 5:  # Q4_1 / Q8_0 blocks packed for integer activations (q4_1x16_pack, q8_0x16_pack)
        ref = cpu_linear_q4_1x16_ref if w.dtype == torch.uint8 else cpu_linear_q8_0x16_ref
        return ref(v, w, s, b, activation_bits)
    if w.dtype == torch.uint8:  # Q4_1 blocks, s their [N, K / 32, 2] (d, m): the float weights they stand for
        return linear(v, q4_1_dequantize(w, s).to(v.dtype), b)
    return linear_int8(v, w, s, b)


def cpu_rms_norm_ref(x, weight, eps: float):
    """RMSNorm over the last dimension: weight * (x * rsqrt(mean(x^2) + eps)) (the executor's, float32)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def cpu_feature_input_ref(features, next_ids, shift, inv_std, embed, inv_emb_scale: float, fc_w, fc_scale, fc_bias):
    """A feature draft's layer-0 input [T, H] (models.feature_draft): fc([shift + features * inv_std,
    embed[next_ids] * inv_emb_scale]) (+ fc_bias), features [T, H] float32, next_ids [T] int64; the fc in any
    weight form of cpu_decoder_layer_ref (packed blocks meet int16 activations, as the executor's)."""
    z = torch.addcmul(shift, features, inv_std)
    e = embed[next_ids] * inv_emb_scale
    return _project_ref(torch.cat([z, e], -1), fc_w, fc_scale, fc_bias, 16)


def cpu_feature_draft_chain_ref(features, next_ids, shift, inv_std, embed, inv_emb_scale: float, fc_w, fc_scale,
                                fc_bias, layers, key_caches, value_caches, norm, head_w, head_scale, head_bias,
                                head_vocab, cos, sin, slot_mapping, block_tables, counts, starts, caps,
                                num_heads: int, num_kv_heads: int, scale: float, sliding_windows, eps: float,
                                activation_bits: int, fallback_threshold: float, energy: bool, penalty_ids=None,
                                penalty_rows=None, penalty_values=None, banned_ids=None, bias_ids=None,
                                bias_values=None):
    """A feature draft's greedy draft runs of B sequences (the engine's eager loop, step for step; each sequence's
    run depends on nothing but its own inputs, so this twin runs them one after the other).

    Sequence b: step 0 feeds its counts[b] verified positions starts[b] .. starts[b] + counts[b] - 1 (its rows of
    features [sum(counts), H] and next_ids, in sequence order); each later step one position: the draft's own last
    output (before the final norm) and its last token. A step is `cpu_feature_input_ref`, the layers
    (`cpu_decoder_layer_ref`, 14 weights each in `layers`, K/V written at the sequence's run of counts[b] + caps[b]
    - 1 slots of slot_mapping in order, rotary rows cos/sin [P, D] at the positions, its block_tables row), then the
    head (head_w / head_scale / head_bias in any weight form, packed ones at int16 activations) on the last
    position's RMSNorm. Its token: the first argmax, through head_vocab [V_head] when given; its confidence: the max
    probability at temperature 1. A run stops at the first unsure step (energy: -logsumexp > fallback_threshold,
    else max probability < fallback_threshold; its token is not drafted), at logits holding a NaN or no finite
    maximum, or after caps[b] drafted tokens.

    With penalties (SamplingParams'; all four or none): penalty_ids [B, L] int64, each sequence's tokens as the head's
    columns (-1: pads and ids it lacks), its prompt's first; penalty_rows [B, 3] int64 (prompt length, min_tokens,
    the output's length in tokens); penalty_values [B, 3] float64 (repetition, presence, frequency); banned_ids [B, E]
    int64 columns (-1 pads); optionally a logit bias, bias_ids [B, E'] int64 columns (-1 pads) with bias_values [B, E']
    float64: each step's logits go through `apply_penalties_ref` first, the run's drafted columns counting as output,
    banned_ids held back while the output and the drafts are shorter than min_tokens.

    Returns (tokens [B, max(caps)] int64: every step's token, -1 after the last step run; max_probs [B, max(caps)]
    float32: every step's confidence, 0 after; status [B, 3] int64: tokens drafted, steps run, and why the run
    stopped: 0 its cap, 1 unsure, 2 not finite)."""
    B, width = len(counts), int(max(caps))
    tokens = torch.full((B, width), -1, dtype=torch.int64)
    max_probs = torch.zeros(B, width, dtype=torch.float32)
    status = torch.zeros(B, 3, dtype=torch.int64)
    row0 = slot0 = 0
    for b in range(B):
        n0, cap = int(counts[b]), int(caps[b])
        slots = slot_mapping[slot0:slot0 + n0 + cap - 1]
        feed, ids = features[row0:row0 + n0], next_ids[row0:row0 + n0]
        pos, used, cols = int(starts[b]), 0, []  # cols: the run's drafted columns so far
        row0, slot0 = row0 + n0, slot0 + n0 + cap - 1
        for step in range(cap):
            T = feed.shape[0]
            x = cpu_feature_input_ref(feed, ids, shift, inv_std, embed, inv_emb_scale, fc_w, fc_scale, fc_bias)
            qsl = torch.tensor([0, T], dtype=torch.int32)
            positions = torch.arange(pos, pos + T)
            lens = torch.tensor([pos + T], dtype=torch.int32)
            for i in range(len(key_caches)):
                x = cpu_decoder_layer_ref(x, cos[pos:pos + T], sin[pos:pos + T], *layers[14 * i:14 * (i + 1)],
                                          key_caches[i], value_caches[i], slots[used:used + T], qsl, positions,
                                          block_tables[b:b + 1], lens, num_heads, num_kv_heads, scale,
                                          sliding_windows[i], eps, activation_bits)
            logits = _project_ref(cpu_rms_norm_ref(x[-1:], norm, eps), head_w, head_scale, head_bias, 16)[0]
            if penalty_ids is not None:
                logits = _chain_penalties(logits, b, penalty_ids, penalty_rows, penalty_values, banned_ids, cols,
                                          None if bias_ids is None else (bias_ids, bias_values))
            if bool(torch.isnan(logits).any()) or not math.isfinite(float(logits.max())):
                status[b, 2] = 2
                break
            lse = torch.logsumexp(logits, 0)
            arg = int(logits.argmax())  # the first index of the maximum
            prob = float(torch.exp(logits[arg] - lse))
            tokens[b, step] = int(head_vocab[arg]) if head_vocab is not None else arg
            max_probs[b, step] = prob
            status[b, 1] = step + 1
            if (-float(lse) > fallback_threshold) if energy else (prob < fallback_threshold):
                status[b, 2] = 1
                break
            status[b, 0] = step + 1
            cols.append(arg)
            feed, ids, pos, used = x[-1:], tokens[b, step:step + 1], pos + T, used + T
    return tokens, max_probs, status


# --------------------------------------------------------------------------------------------
# Sampling helpers shared by sample_draft and verify_draft
# --------------------------------------------------------------------------------------------
def _chain_penalties(logits, b, penalty_ids, penalty_rows, penalty_values, banned_ids, cols, bias=None):
    """cpu_feature_draft_chain_ref's step logits [V_head] of sequence b with its penalties (see there)."""
    plen, min_tokens, n_out = (int(x) for x in penalty_rows[b])
    hist = torch.cat([penalty_ids[b], torch.tensor(cols, dtype=torch.int64)])[None]
    mapped = int((penalty_ids[b, plen:] >= 0).sum())  # (apply_penalties_ref counts the output's ids it holds)
    vals = penalty_values[b:b + 1].to(torch.float64)
    empty = torch.empty((1, 0), dtype=torch.int64)
    bias_ids, bias_values = (empty, empty.double()) if bias is None else (bias[0][b:b + 1], bias[1][b:b + 1])
    return apply_penalties_ref(logits[None, None], hist, torch.tensor([plen]), empty, vals[:, 0], vals[:, 1],
                               vals[:, 2], torch.tensor([max(min_tokens - (n_out - mapped), 0)]), banned_ids[b:b + 1],
                               bias_ids, bias_values)[0, 0]


def _filter_top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k and top-p exclude from rows of scaled logits [R, V].

    top-k keeps every token whose value is >= the k-th largest (ties at the threshold kept);
    top_k <= 0 or >= V disables it. top-p keeps the smallest set of most probable tokens whose
    probability sums to >= top_p, again with ties at the threshold kept; top_p >= 1 disables it.
    Both apply to the same row: a token must pass both (top-p measured on the unfiltered row).
    """
    R, V = scaled.shape
    keep = torch.ones_like(scaled, dtype=torch.bool)
    k = top_k.long()
    use_k = (k > 0) & (k < V)
    capturing = scaled.is_cuda and torch.cuda.is_current_stream_capturing()  # no host read in a graph
    if capturing or bool(use_k.any()):
        srt = torch.sort(scaled, dim=1, descending=True).values
        kth = srt.gather(1, (k.clamp(1, V) - 1).unsqueeze(1))
        keep &= ~use_k.unsqueeze(1) | (scaled >= kth)
    use_p = top_p < 1.0
    if capturing or bool(use_p.any()):
        probs = torch.softmax(scaled, dim=1)
        sp = torch.sort(probs, dim=1, descending=True).values
        excl = torch.cumsum(sp, dim=1) - sp  # mass strictly above each sorted entry
        n_keep = (excl < top_p.unsqueeze(1)).sum(1).clamp(min=1)
        thr = sp.gather(1, (n_keep - 1).unsqueeze(1))
        keep &= ~use_p.unsqueeze(1) | (probs >= thr)
    return scaled.masked_fill(~keep, float("-inf"))


def _pick(scaled_filtered, greedy, noise):
    """argmax of scaled (greedy rows) or of scaled + Gumbel noise (sampling rows); first index on ties."""
    pert = torch.where(greedy.unsqueeze(1), scaled_filtered, scaled_filtered + noise)
    return torch.argmax(pert, dim=1)


# --------------------------------------------------------------------------------------------
# Draft sampling
# --------------------------------------------------------------------------------------------
def sample_draft_ref(logits, temperature, top_k, top_p, seed, offset, fallback_threshold):
    """Sample one token per row of small-model logits [B, V] and report BiLD/E-LANG signals.

    temperature, top_p, fallback_threshold: [B] float32; top_k: [B] int32; seed, offset: [B] int64.
    Temperature 0 is greedy (argmax, first index on ties). Otherwise the token is
    argmax(filter(z / T) + g_v) with Gumbel noise g_v = gumbel(seed, v, offset, DRAFT_SAMPLE, 0),
    which samples softmax(filter(z / T)) exactly.

    Returns (token_ids [B] int64, token_probs [B] f32, max_probs [B] f32, energies [B] f32,
    fallback [B] bool):
      token_probs: probability of the chosen token under softmax(filter(z / T')), T' = T or 1 if T = 0
      max_probs:   max_v softmax(z)_v at temperature 1, unfiltered (BiLD's fallback signal)
      energies:    -T' * logsumexp(z / T'), unfiltered (E-LANG's signal)
      fallback:    max_probs < fallback_threshold
    """
    z = logits.float() if logits.dtype != torch.float64 else logits
    B, V = z.shape
    greedy = temperature <= 0
    if _plain_greedy(z, greedy, top_k, top_p):
        # Every row is an unfiltered argmax: z / 1 is z, so one logsumexp and one max give every output
        # with the same bits as the general path below (tested against it).
        lse = torch.logsumexp(z, dim=1)
        zmax, token = z.max(1)  # first index on ties, like argmax
        p = torch.exp(zmax - lse)
        return token, p.float(), p.float(), (-lse).float(), p < fallback_threshold.to(p.dtype)
    return _sample_draft_general(z, greedy, temperature, top_k, top_p, seed, offset, fallback_threshold)


def _all_greedy(z, greedy) -> bool:
    """True when every row is greedy, read on the host (so never while a CUDA graph is being captured)."""
    return not (z.is_cuda and torch.cuda.is_current_stream_capturing()) and bool(greedy.all())


def _plain_greedy(z, greedy, top_k, top_p) -> bool:
    """True when every row is greedy with no top-k / top-p filter."""
    V = z.shape[1]
    return _all_greedy(z, greedy) and not bool(((top_k > 0) & (top_k < V)).any()) and not bool((top_p < 1.0).any())


def _sample_draft_general(z, greedy, temperature, top_k, top_p, seed, offset, fallback_threshold):
    B, V = z.shape
    t = torch.where(greedy, torch.ones_like(temperature), temperature).to(z.dtype).unsqueeze(1)
    scaled = z / t
    filt = _filter_top_k_top_p(scaled, top_k, top_p)
    idx = torch.arange(V, device=z.device).unsqueeze(0)
    if bool(greedy.all()):  # no row samples: its random numbers would go unused
        token = torch.argmax(filt, dim=1)
    else:
        noise = gumbel_ref(seed.unsqueeze(1), idx, offset.unsqueeze(1), PURPOSE_DRAFT_SAMPLE, 0).to(z.dtype)
        token = _pick(filt, greedy, noise)
    lse_f = torch.logsumexp(filt, dim=1)
    token_probs = torch.exp(filt.gather(1, token.unsqueeze(1)).squeeze(1) - lse_f)
    max_probs = torch.exp(z.max(1).values - torch.logsumexp(z, dim=1))
    energies = -t.squeeze(1) * torch.logsumexp(scaled, dim=1)
    fallback = max_probs < fallback_threshold.to(max_probs.dtype)
    return token, token_probs.float(), max_probs.float(), energies.float(), fallback


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------
MODE_GREEDY, MODE_BILD, MODE_SAMPLE = 0, 1, 2
MODES = {"greedy": MODE_GREEDY, "bild": MODE_BILD, "sample": MODE_SAMPLE}


def verify_draft_ref(draft_ids, target_logits, mode, rollback_threshold=None, draft_probs=None,
                     temperature=None, top_k=None, top_p=None, seed=None, offset=None):
    """Verify a ragged batch of drafts against the large model's logits.

    draft_ids: [B, K] int64, each row's drafted tokens then -1 padding (n_b = drafted count).
    target_logits: [B, K+1, V]; position j holds the large model's logits for the token after
        committed + draft[:j].
    mode: "greedy" | "bild" | "sample".
    rollback_threshold: [B] float32 (bild). draft_probs: [B, K, V] (sample): the small model's
        probabilities that each draft was sampled from.
    temperature, top_p: [B] f32; top_k: [B] int32; seed, offset: [B] int64 — the sampling
        parameters of the large model's tokens (all None = greedy).

    Per position j the target distribution is q_j = softmax(filter(z_j / T)) (argmax at T = 0).
    - greedy: accept draft[j] while draft[j] == argmax z_j.
    - bild:   d_j = -log softmax(z_j)[draft[j]] (temperature 1); cut at the first j with
              d_j > rollback_threshold and draft[j] != argmax z_j; accept everything before it.
    - sample: accept draft[j] while u_j * p_S(draft[j]) < q_j(draft[j]) with u_j =
              uniform(seed, 0, offset, VERIFY_ACCEPT, j); at the first rejection the emitted token
              is drawn from norm(max(0, q_j - p_S)) (if that is all zero: from q_j).
    The emitted token at position c = num_accepted (if c < n_b, the "recovered" token; else the
    "bonus" token) is argmax z_c at T = 0, else argmax(log(w) + g) over the vocabulary with
    g = gumbel(seed, v, offset, VERIFY_TOKEN, c) and w = q_c (or the residual in sample mode).

    Returns (num_accepted [B] int32, output_ids [B, K+1] int64 (-1 padded: accepted drafts, then
    the emitted token), distances [B, K] f32 (d_j; 0 on padding), target_probs [B, K+1] f32
    (max_v softmax(z_j)_v; 0 past n_b)).
    """
    mode = MODES[mode] if isinstance(mode, str) else mode
    z = target_logits.float() if target_logits.dtype != torch.float64 else target_logits
    B, K1, V = z.shape
    K = K1 - 1
    dev = z.device
    n = (draft_ids >= 0).sum(1)
    pos = torch.arange(K, device=dev)
    valid = pos.unsqueeze(0) < n.unsqueeze(1)  # [B, K]
    safe_ids = draft_ids.clamp(min=0).long()

    if temperature is None:
        temperature = torch.zeros(B, device=dev)
        top_k = torch.zeros(B, dtype=torch.int32, device=dev)
        top_p = torch.ones(B, device=dev)
        seed = torch.zeros(B, dtype=torch.int64, device=dev)
        offset = torch.zeros(B, dtype=torch.int64, device=dev)

    lse = torch.logsumexp(z, dim=2)  # [B, K+1]
    zmax, amax = z.max(2)  # [B, K+1]; first index on ties, like argmax
    target_probs = torch.exp(zmax - lse)
    target_probs = torch.where(torch.arange(K1, device=dev).unsqueeze(0) <= n.unsqueeze(1), target_probs,
                               torch.zeros_like(target_probs))
    z_draft = z[:, :K].gather(2, safe_ids.unsqueeze(2)).squeeze(2)
    distances = torch.where(valid, lse[:, :K] - z_draft, torch.zeros_like(z_draft))

    greedy = temperature <= 0
    # The target distributions q are read only to sample a token or in sample mode: all-greedy rows in
    # the other modes emit the argmax and skip building them (the same outputs; tested).
    all_greedy = _all_greedy(z, greedy)
    need_q = mode == MODE_SAMPLE or not all_greedy
    if need_q:
        t = torch.where(greedy, torch.ones_like(temperature), temperature).to(z.dtype)
        scaled = z / t[:, None, None]
        filt = _filter_top_k_top_p(scaled.reshape(B * K1, V), top_k.repeat_interleave(K1),
                                   top_p.repeat_interleave(K1)).reshape(B, K1, V)
        q = torch.softmax(filt, dim=2)
        q_greedy = torch.nn.functional.one_hot(amax, V).to(q.dtype)
        q = torch.where(greedy[:, None, None], q_greedy, q)

    if mode == MODE_GREEDY:
        ok = draft_ids[:, :K] == amax[:, :K]
    elif mode == MODE_BILD:
        ok = ~((distances > rollback_threshold.to(z.dtype).unsqueeze(1)) & (draft_ids != amax[:, :K]))
    else:
        ps = draft_probs.to(z.dtype).gather(2, safe_ids.unsqueeze(2)).squeeze(2)
        qd = q[:, :K].gather(2, safe_ids.unsqueeze(2)).squeeze(2)
        u = uniform_ref(seed.unsqueeze(1), 0, offset.unsqueeze(1), PURPOSE_VERIFY_ACCEPT, pos.unsqueeze(0))
        ok = u.to(z.dtype) * ps < qd
    ok = ok & valid
    # number accepted = length of the all-True prefix
    num_accepted = torch.cumprod(ok.long(), dim=1).sum(1) if K > 0 else torch.zeros(B, dtype=torch.long, device=dev)

    c = num_accepted
    rows = torch.arange(B, device=dev)
    if all_greedy:
        emitted = amax[rows, c]
    else:
        w = q[rows, c]  # [B, V]
        if mode == MODE_SAMPLE:
            cut = c < n
            ps_c = draft_probs.to(z.dtype)[rows, c.clamp(max=max(K - 1, 0))] if K > 0 else torch.zeros_like(w)
            resid = (w - ps_c).clamp(min=0)
            use_resid = cut & (resid.sum(1) > 0)
            w = torch.where(use_resid.unsqueeze(1), resid, w)
        g = gumbel_ref(seed.unsqueeze(1), torch.arange(V, device=dev).unsqueeze(0), offset.unsqueeze(1),
                       PURPOSE_VERIFY_TOKEN, c.unsqueeze(1)).to(z.dtype)
        emitted = torch.where(greedy, amax[rows, c], torch.argmax(torch.log(w) + g, dim=1))

    out = torch.full((B, K1), -1, dtype=torch.int64, device=dev)
    keep = torch.arange(K1, device=dev).unsqueeze(0) < c.unsqueeze(1)
    out[:, :K] = torch.where(keep[:, :K], draft_ids.long(), out[:, :K])
    out[rows, c] = emitted
    return num_accepted.int(), out, distances.float(), target_probs.float()


# --------------------------------------------------------------------------------------------
# Penalties: repetition (prompt + output), presence and frequency (output), min_tokens
# --------------------------------------------------------------------------------------------
def apply_penalties_ref(logits, token_ids, prompt_lens, draft_ids, repetition_penalty, presence_penalty,
                        frequency_penalty, min_tokens, banned_ids, bias_ids, bias_values):
    """The large model's logits at P positions per row [B, P, V] with each row's penalties applied; a new tensor of
    the logits' dtype (computed in float32, float64 logits in float64).

    token_ids [B, L] int (-1 pads, anywhere): a row's committed tokens, the prompt's first (index < prompt_lens[b],
    [B] int), then its output. draft_ids [B, P-1] int (-1 pads): position p scores the token after the committed
    ones plus draft_ids[b, :p], so those drafted tokens count as output there. Per row ([B]): repetition_penalty
    (> 0; 1 is off), presence_penalty and frequency_penalty (0 is off), min_tokens (>= 0), and banned_ids [B, E]
    int (-1 pads; E may be 0), and a logit bias: bias_ids [B, E'] int (-1 pads; each id at most once a row) with
    bias_values [B, E'] float64. At position p of row b, with c_v the count of v in the output (and the draft before
    p) and `seen` = v in the prompt or c_v > 0, in vLLM's order (the bias, then the penalties as Hugging Face's
    RepetitionPenaltyLogitsProcessor and vLLM compute them):
        z_v = z_v + bias_values[b, j] where v = bias_ids[b, j]   (OpenAI's logit_bias)
        z_v = (z_v * r if z_v < 0 else z_v / r) where seen,     r = repetition_penalty
        z_v = z_v - frequency_penalty * c_v - presence_penalty * [c_v > 0]
        z_v = -inf for v in banned_ids[b] while n_out + p < min_tokens[b]   (n_out: the row's output tokens)
    Neutral values (1, 0, 0, 0, no bias) give back the logits' values unchanged."""
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(dt)
    B, P, V = z.shape
    dev = z.device
    if bias_ids.shape[1]:
        bias = torch.zeros((B, V), dtype=dt, device=dev).scatter_add_(
            1, bias_ids.clamp(min=0).to(torch.int64), torch.where(bias_ids >= 0, bias_values.to(dt), 0.0))
        z = z + bias[:, None, :]
    L = token_ids.shape[1]
    valid = token_ids >= 0
    is_out = valid & (torch.arange(L, device=dev)[None, :] >= prompt_lens.to(torch.int64)[:, None])
    ids = token_ids.clamp(min=0).to(torch.int64)
    counts = torch.zeros((B, V), dtype=torch.int64, device=dev).scatter_add_(1, ids, is_out.to(torch.int64))
    in_prompt = torch.zeros((B, V), dtype=torch.int64, device=dev).scatter_add_(1, ids, (valid & ~is_out).long()) > 0
    count = counts[:, None, :].repeat(1, P, 1)  # [B, P, V]
    for p in range(1, P):  # the draft before position p counts as output there
        d = draft_ids[:, p - 1].to(torch.int64)
        add = torch.zeros((B, V), dtype=torch.int64, device=dev).scatter_add_(1, d.clamp(min=0)[:, None],
                                                                             (d >= 0).long()[:, None])
        count[:, p:] += add[:, None, :]
    seen = in_prompt[:, None, :] | (count > 0)
    r = repetition_penalty.to(dt)[:, None, None]
    z = torch.where(seen, torch.where(z < 0, z * r, z / r), z)
    z = z - frequency_penalty.to(dt)[:, None, None] * count.to(dt)
    z = z - presence_penalty.to(dt)[:, None, None] * (count > 0).to(dt)
    n_out = is_out.sum(1)  # [B]
    active = (n_out[:, None] + torch.arange(P, device=dev)[None, :]) < min_tokens.to(torch.int64)[:, None]  # [B, P]
    E = banned_ids.shape[1]
    if E:
        b_ids = banned_ids.to(torch.int64)
        banned = torch.zeros((B, V), dtype=torch.int64, device=dev).scatter_add_(1, b_ids.clamp(min=0),
                                                                                (b_ids >= 0).long()) > 0
        z = z.masked_fill(active[:, :, None] & banned[:, None, :], float("-inf"))
    return z.to(logits.dtype)
