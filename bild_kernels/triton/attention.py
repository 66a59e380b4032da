"""Triton paged attention for a ragged batch: prefill, multi-token extend and decode in one kernel.

Work split: one program per (sequence b, tile of BLOCK_M new tokens, KV head h). The tile's rows are
(token, query head of h's group) pairs, BLOCK_M * GROUP of them padded to BLOCK_R, so grouped-query
heads share every K/V load and a one-token decode still fills a 16-row tl.dot. The program walks the
sequence's keys BLOCK_N at a time, looking each key's block up in the block table (any block size,
1 included), with an online softmax in fp32. Keys past the tile's last position are never loaded
(causal skip), nor keys before its sliding window.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bild_kernels._backend import triton_interpret


@triton.jit
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, query_start_loc_ptr, positions_ptr, block_tables_ptr,
        context_lens_ptr, scale, sliding_window,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr):
    b = tl.program_id(0)
    tile = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    if tile * BLOCK_M < q_len:
        ctx_len = tl.load(context_lens_ptr + b)
        r = tl.arange(0, BLOCK_R)
        tok = tile * BLOCK_M + r // GROUP
        head = kvh * GROUP + r % GROUP
        row_ok = (r < BLOCK_M * GROUP) & (tok < q_len)
        t = (q_start + tok).to(tl.int64)
        pos = tl.load(positions_ptr + t, mask=row_ok, other=-1)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + t[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if FP32_DOT:
            q = q.to(tl.float32)
        hi = tl.minimum(ctx_len, tl.max(pos, 0) + 1)
        first = tl.min(tl.where(row_ok, pos, 2147483647), 0)
        lo = tl.where(sliding_window > 0, tl.maximum(first - sliding_window + 1, 0), 0)
        qk_scale = scale * 1.4426950408889634  # exp2 instead of exp
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            blk = tl.load(block_tables_ptr + b * stride_bt + n // BLOCK_SIZE, mask=n_ok, other=-1)
            n_ok = n_ok & (blk >= 0)  # a -1 entry (no block) holds no key: never read before the cache
            kv_off = blk.to(tl.int64) * stride_kb + (n % BLOCK_SIZE) * stride_ks + kvh * stride_kh
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
            v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            if FP32_DOT:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            in_window = (sliding_window <= 0) | (n[None, :] > pos[:, None] - sliding_window)
            visible = n_ok[None, :] & (n[None, :] <= pos[:, None]) & in_window
            s = tl.where(visible, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no visible key yet keeps m = -inf; shift it by 0 to avoid inf - inf.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if FP32_DOT:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _tiles(max_query_len: int, group: int) -> tuple[int, int, int]:
    """(BLOCK_M tokens per tile, BLOCK_R rows, BLOCK_N keys per step) for this batch shape."""
    rows_target = 16 if max_query_len <= 1 else 64
    block_m = max(1, min(max_query_len, rows_target // group))
    block_r = max(16, triton.next_power_of_2(block_m * group))
    return block_m, block_r, 64


@torch.library.custom_op("bild_kernels::paged_attention_triton", mutates_args=())
def paged_attention_triton(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           query_start_loc: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, sliding_window: int,
                           max_query_len: int) -> torch.Tensor:
    """query [T, Hq, D]; caches [num_blocks, block_size, Hkv, D]; -> [T, Hq, D] in query's dtype."""
    T, Hq, D = query.shape
    nb, bs, Hkv, _ = key_cache.shape
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"paged_attention_triton: dtype {query.dtype} unsupported (float16/bfloat16/float32)")
    if query.stride(2) != 1 or not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("paged_attention_triton: query's last dim and the caches must be contiguous")
    out = torch.empty(T, Hq, D, dtype=query.dtype, device=query.device)
    B = block_tables.shape[0]
    if T == 0 or B == 0 or max_query_len == 0:
        return out.zero_()
    group = Hq // Hkv
    block_m, block_r, block_n = _tiles(max_query_len, group)
    block_tables = block_tables.contiguous()
    grid = (B, triton.cdiv(max_query_len, block_m), Hkv)
    _paged_attention_kernel[grid](
        query, key_cache, value_cache, out, query_start_loc, positions, block_tables, context_lens,
        float(scale), int(sliding_window), query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        BLOCK_SIZE=bs, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), GROUP=group, BLOCK_M=block_m,
        BLOCK_R=block_r, BLOCK_N=block_n, FP32_DOT=query.dtype == torch.float32 or triton_interpret(),
        num_warps=4)
    return out


@paged_attention_triton.register_fake
def _(query, key_cache, value_cache, query_start_loc, positions, block_tables, context_lens, scale, sliding_window,
      max_query_len):
    return torch.empty_like(query)


def _aot_spec(dtype: str, block_size: int, head_dim: int, group: int, max_query_len: int):
    block_m, block_r, block_n = _tiles(max_query_len, group)
    ptrs = {"q_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
            "query_start_loc_ptr": "*i32", "positions_ptr": "*i64", "block_tables_ptr": "*i32",
            "context_lens_ptr": "*i32", "scale": "fp32", "sliding_window": "i32"}
    strides = {k: "i32" for k in ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_ks",
                                  "stride_kh", "stride_bt")}
    consts = {"BLOCK_SIZE": block_size, "HEAD_DIM": head_dim, "BLOCK_D": triton.next_power_of_2(head_dim),
              "GROUP": group, "BLOCK_M": block_m, "BLOCK_R": block_r, "BLOCK_N": block_n,
              "FP32_DOT": dtype == "fp32"}
    return _paged_attention_kernel, {**ptrs, **strides, **{k: "constexpr" for k in consts}}, consts


# Decode and prefill tiles in each 16-bit dtype, the fp32 path, SmolLM2's group of 3 and block size 1.
AOT_SPECS = [
    _aot_spec("bf16", 16, 128, 4, 1),
    _aot_spec("bf16", 16, 128, 4, 512),
    _aot_spec("fp16", 16, 64, 3, 1),
    _aot_spec("fp16", 1, 64, 3, 8),
    _aot_spec("fp32", 16, 64, 1, 64),
]
