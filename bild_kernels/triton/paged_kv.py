"""Triton kernels of the paged KV cache: write, reserve, rollback, gather (spec: `bild_kernels.reference`).

Callers are the public ops in `bild_kernels.ops.paged_kv`, which validate inputs; the wrappers here only
pick launch shapes. Reserve and rollback run as one program over the whole batch: the free stack is a
single shared resource, and serving every row in one program makes the allocation order identical to
the reference without atomics, host round trips or a second launch (so the step can live in a CUDA graph).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Enough table entries per loop step to keep the loads in flight without blowing up the tile.
_TABLE_TILE = 8192


@triton.jit
def _count_blocks(block_tables_ptr, rows, in_b, M, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr):
    # A row's blocks come first, then -1: counting the non-negative entries gives its block count.
    nblk = tl.zeros([BLOCK_B], dtype=tl.int32)
    for c in range(0, M, BLOCK_M):
        cols = c + tl.arange(0, BLOCK_M)
        m = in_b[:, None] & (cols[None, :] < M)
        tbl = tl.load(block_tables_ptr + rows[:, None] * M + cols[None, :], mask=m, other=-1)
        nblk += tl.sum((tbl >= 0).to(tl.int32), axis=1)
    return nblk


@triton.jit
def _to_cache(x, dst_ptr, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:
        # The interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest even: round by hand
        # (bits + 0x7FFF + lsb) so that the truncating cast that follows is exact.
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dst_ptr.dtype.element_ty)


# Grid (T, cdiv(H, BLOCK_H)): one program per token and group of heads copies the token's [BLOCK_H, D]
# slice of key and of value to its slot. A slot of -1 (a padding row of a CUDA-graph batch) returns
# before loading anything. Values are cast to the cache dtype in registers (e.g. bf16 -> fp8 caches).
# Slots are int64 so caches beyond 2**31 elements address correctly.
@triton.jit
def _write_paged_kv_kernel(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
                           stride_kt, stride_kh, stride_vt, stride_vh, H, D,
                           BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t)
    if slot >= 0:
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        m = (h[:, None] < H) & (d[None, :] < D)
        t64 = t.to(tl.int64)
        k = tl.load(key_ptr + t64 * stride_kt + h[:, None] * stride_kh + d[None, :], mask=m)
        v = tl.load(value_ptr + t64 * stride_vt + h[:, None] * stride_vh + d[None, :], mask=m)
        dst = slot * (H * D) + h[:, None] * D + d[None, :]
        tl.store(key_cache_ptr + dst, _to_cache(k, key_cache_ptr, ROUND_BF16), mask=m)
        tl.store(value_cache_ptr + dst, _to_cache(v, value_cache_ptr, ROUND_BF16), mask=m)


# One program, the batch's rows as a vector of BLOCK_B lanes. Each lane counts its row's blocks, works out
# how many more it needs, and an exclusive prefix sum over the needs gives every row its stretch of the
# free stack (row 0 nearest the top). A loop over the largest need then moves one block per row per step
# from the stack into the tables. On a shortfall the loop runs zero times and only num_free is written.
@triton.jit
def _reserve_paged_kv_kernel(block_tables_ptr, context_lens_ptr, num_new_ptr, free_blocks_ptr, num_free_ptr,
                             B, M, block_size, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.arange(0, BLOCK_B)
    in_b = rows < B
    ctx = tl.load(context_lens_ptr + rows, mask=in_b, other=-1)
    new = tl.load(num_new_ptr + rows, mask=in_b, other=0)
    nblk = _count_blocks(block_tables_ptr, rows, in_b, M, BLOCK_B, BLOCK_M)
    want = (tl.maximum(ctx, 0) + new + block_size - 1) // block_size
    need = tl.where(ctx >= 0, tl.maximum(want - nblk, 0), 0)
    total = tl.sum(need, axis=0)
    top = tl.load(num_free_ptr)
    ok = total <= top
    first = top - 1 - (tl.cumsum(need, axis=0) - need)  # stack index of this row's first block
    steps = tl.where(ok, tl.max(need, axis=0), 0)
    for j in range(0, steps):
        m = j < need
        blk = tl.load(free_blocks_ptr + first - j, mask=m, other=-1)
        tl.store(block_tables_ptr + rows * M + nblk + j, blk, mask=m)
    tl.store(num_free_ptr, tl.where(ok, top - total, top - total - 1))


# One program, rows as a vector of BLOCK_B lanes. Each active lane shortens its context length, counts the
# blocks it keeps and the ones past them (reserved-but-unused blocks included); an exclusive prefix sum of
# the freed counts gives each row its stretch above the stack top, so blocks land in row order, then table
# order. A loop over the largest freed count pushes one block per row per step and clears its entry.
@triton.jit
def _rollback_paged_kv_kernel(block_tables_ptr, context_lens_ptr, num_rejected_ptr, free_blocks_ptr, num_free_ptr,
                              B, M, N, block_size, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.arange(0, BLOCK_B)
    in_b = rows < B
    ctx = tl.load(context_lens_ptr + rows, mask=in_b, other=-1)
    rej = tl.load(num_rejected_ptr + rows, mask=in_b, other=0)
    active = ctx >= 0
    new_len = tl.maximum(ctx - rej, 0)
    tl.store(context_lens_ptr + rows, new_len, mask=active)
    keep = (new_len + block_size - 1) // block_size
    nblk = _count_blocks(block_tables_ptr, rows, in_b, M, BLOCK_B, BLOCK_M)
    freed = tl.where(active, tl.maximum(nblk - keep, 0), 0)
    top = tl.load(num_free_ptr)
    first = top + tl.cumsum(freed, axis=0) - freed
    for i in range(0, tl.max(freed, axis=0)):
        m = i < freed
        entry = block_tables_ptr + rows * M + keep + i
        blk = tl.load(entry, mask=m, other=-1)
        # A stack overflow can only come from a block owned twice; never write out of bounds for it.
        tl.store(free_blocks_ptr + first + i, blk, mask=m & (first + i < N))
        tl.store(entry, tl.full([BLOCK_B], -1, tl.int32), mask=m)
    tl.store(num_free_ptr, top + tl.sum(freed, axis=0))


# Grid (cdiv(L, BLOCK_L), B, cdiv(H*D, BLOCK_HD)): one program per run of BLOCK_L positions of a row and
# chunk of the flattened head dims copies those tokens' key and value into the dense outputs, writing zeros
# past the row's length so the outputs need no separate memset. Positions go on axis 0 (no 65535 limit).
@triton.jit
def _gather_paged_kv_kernel(key_cache_ptr, value_cache_ptr, block_tables_ptr, context_lens_ptr, k_out_ptr, v_out_ptr,
                            L, M, block_size, HD, BLOCK_L: tl.constexpr, BLOCK_HD: tl.constexpr):
    b = tl.program_id(1)
    p = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs = tl.program_id(2) * BLOCK_HD + tl.arange(0, BLOCK_HD)
    in_hd = offs[None, :] < HD
    valid = p < tl.load(context_lens_ptr + b)
    blk = tl.load(block_tables_ptr + b * M + p // block_size, mask=valid, other=0)
    src = (blk.to(tl.int64) * block_size + p % block_size)[:, None] * HD + offs[None, :]
    k = tl.load(key_cache_ptr + src, mask=valid[:, None] & in_hd, other=0)
    v = tl.load(value_cache_ptr + src, mask=valid[:, None] & in_hd, other=0)
    dst = (b.to(tl.int64) * L + p)[:, None] * HD + offs[None, :]
    out = (p < L)[:, None] & in_hd
    tl.store(k_out_ptr + dst, k, mask=out)
    tl.store(v_out_ptr + dst, v, mask=out)


# --------------------------------------------------------------------------------------------------------
# Launchers (positional signatures of the reference twins)
# --------------------------------------------------------------------------------------------------------
def _inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    # Token and head strides are kernel arguments; only the head dim must be dense.
    return x if x.stride(2) == 1 else x.contiguous()


def write_paged_kv(key, value, key_cache, value_cache, slot_mapping) -> None:
    T, H, D = key.shape
    if T == 0:
        return
    key, value = _inner_contiguous(key), _inner_contiguous(value)
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_H = min(triton.next_power_of_2(H), max(1, 4096 // BLOCK_D))
    grid = (T, triton.cdiv(H, BLOCK_H))
    round_bf16 = os.environ.get("TRITON_INTERPRET") == "1" and key_cache.dtype == torch.bfloat16 != key.dtype
    _write_paged_kv_kernel[grid](key, value, key_cache, value_cache, slot_mapping.to(torch.int64),
                                 key.stride(0), key.stride(1), value.stride(0), value.stride(1), H, D,
                                 BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D, ROUND_BF16=round_bf16, num_warps=4)


def _table_blocks(B: int, M: int) -> tuple[int, int, int]:
    BLOCK_B = triton.next_power_of_2(max(B, 1))
    BLOCK_M = max(1, min(triton.next_power_of_2(max(M, 1)), _TABLE_TILE // BLOCK_B))
    return BLOCK_B, BLOCK_M, 4 if BLOCK_B <= 256 else 8


def reserve_paged_kv(block_tables, context_lens, num_new, free_blocks, num_free, block_size) -> None:
    B, M = block_tables.shape
    if B == 0:
        return
    BLOCK_B, BLOCK_M, warps = _table_blocks(B, M)
    _reserve_paged_kv_kernel[(1,)](block_tables, context_lens, num_new, free_blocks, num_free, B, M, block_size,
                                   BLOCK_B=BLOCK_B, BLOCK_M=BLOCK_M, num_warps=warps)


def rollback_paged_kv(block_tables, context_lens, num_rejected, free_blocks, num_free, block_size) -> None:
    B, M = block_tables.shape
    if B == 0:
        return
    BLOCK_B, BLOCK_M, warps = _table_blocks(B, M)
    _rollback_paged_kv_kernel[(1,)](block_tables, context_lens, num_rejected, free_blocks, num_free, B, M,
                                    free_blocks.shape[0], block_size, BLOCK_B=BLOCK_B, BLOCK_M=BLOCK_M,
                                    num_warps=warps)


def gather_paged_kv(key_cache, value_cache, block_tables, context_lens):
    B, M = block_tables.shape
    nb, bs, H, D = key_cache.shape
    L = int(context_lens.clamp(min=0).max()) if B else 0  # the one host read: it sizes the output
    k = torch.empty((B, L, H, D), dtype=key_cache.dtype, device=key_cache.device)
    v = torch.empty_like(k)
    if k.numel() == 0:
        return k, v
    BLOCK_HD = min(triton.next_power_of_2(H * D), 4096)
    BLOCK_L = min(triton.next_power_of_2(L), max(1, 4096 // BLOCK_HD))
    grid = (triton.cdiv(L, BLOCK_L), B, triton.cdiv(H * D, BLOCK_HD))
    _gather_paged_kv_kernel[grid](key_cache.contiguous(), value_cache.contiguous(), block_tables, context_lens, k, v,
                                  L, M, bs, H * D, BLOCK_L=BLOCK_L, BLOCK_HD=BLOCK_HD, num_warps=4)
    return k, v


# One representative compilation of every kernel (serving shapes: bf16, H=8, D=128, 256 rows of 256 blocks),
# for an ahead-of-time compile check: triton.compile(ASTSource(fn, signature, constexprs), target=...).
_TABLE_SIG = {"block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "counts_ptr": "*i32",
              "free_blocks_ptr": "*i32", "num_free_ptr": "*i32", "B": "i32", "M": "i32"}


def _table_sig(kernel, counts: str, with_n: bool) -> dict:
    sig = {(counts if k == "counts_ptr" else k): t for k, t in _TABLE_SIG.items()}
    if with_n:
        sig["N"] = "i32"
    sig.update(block_size="i32", BLOCK_B="constexpr", BLOCK_M="constexpr")
    assert list(sig) == kernel.arg_names, (list(sig), kernel.arg_names)
    return sig


AOT_SPECS = [
    (_write_paged_kv_kernel,
     {"key_ptr": "*bf16", "value_ptr": "*bf16", "key_cache_ptr": "*bf16", "value_cache_ptr": "*bf16",
      "slot_mapping_ptr": "*i64", "stride_kt": "i32", "stride_kh": "i32", "stride_vt": "i32", "stride_vh": "i32",
      "H": "i32", "D": "i32", "BLOCK_H": "constexpr", "BLOCK_D": "constexpr", "ROUND_BF16": "constexpr"},
     {"BLOCK_H": 8, "BLOCK_D": 128, "ROUND_BF16": False}),
    (_reserve_paged_kv_kernel, _table_sig(_reserve_paged_kv_kernel, "num_new_ptr", False),
     {"BLOCK_B": 256, "BLOCK_M": 32}),
    (_rollback_paged_kv_kernel, _table_sig(_rollback_paged_kv_kernel, "num_rejected_ptr", True),
     {"BLOCK_B": 256, "BLOCK_M": 32}),
    (_gather_paged_kv_kernel,
     {"key_cache_ptr": "*bf16", "value_cache_ptr": "*bf16", "block_tables_ptr": "*i32", "context_lens_ptr": "*i32",
      "k_out_ptr": "*bf16", "v_out_ptr": "*bf16", "L": "i32", "M": "i32", "block_size": "i32", "HD": "i32",
      "BLOCK_L": "constexpr", "BLOCK_HD": "constexpr"},
     {"BLOCK_L": 4, "BLOCK_HD": 1024}),
]
