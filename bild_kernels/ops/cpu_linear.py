"""cpu_linear: y = x @ weight.T (+ bias) for a few rows of float32 on the CPU, the large model's verify pass;
cpu_linear_int8: the same with int8 weights and a per-row scale, any number of rows (a CPU draft model);
cpu_linear_q8_0 / cpu_linear_q4_1: a GGUF's Q8_0 / Q4_1 blocks (the default large model's head / layers), each
weight rebuilt exactly, so the same bits as cpu_linear on the float32 weights they stand for;
cpu_linear_q4_1x16 / cpu_linear_q8_0x16: those blocks repacked, against activations rounded to int16 or int8
(integer dot products); cpu_linear_q8_0x16_stats: the latter with each output row's max, logsumexp, argmax and
finite flag (an LM head's verification statistics).

A CPU decode step is memory-bound: it reads every weight once. A verify pass over k + 1 tokens should cost
the same, but library small-M matmuls may not manage it (MKL on an AMD EPYC costs about M times one row
for M = 2..3). The "cpu" backend (csrc/cpu_linear.cpp) streams each weight row once for up to 8 rows at a
time (more rows in chunks of 8, the weights then coming from cache), and gives an output row the same bits
whatever M or the row's position (batch invariance); "ref" is F.linear.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from bild_kernels._backend import resolve
from bild_kernels.ops import _validate as v

BLOCK_ROWS = 8  # rows the "cpu" backend multiplies in one pass: M * R accumulators fit the 16 AVX2 registers
# Rows up to which the "cpu" backend is the default (and the executor's choice): beyond, the product is
# compute-bound on a core and F.linear (MKL) is faster. One thread, the large model's 30 layers of projections
# on the AMD EPYC (2026-11-26): 16 rows 98 ms against 145 for F.linear, 24 rows 176 against 145.
MAX_ROWS = 16


def cpu_linear(x, weight, bias=None, *, backend: str | None = None) -> torch.Tensor:
    """x [M, K] float32, weight [N, K] float32 (contiguous), bias [N] or None -> y [M, N] float32, on the CPU.

    backend: "cpu" (the extension; needs x86-64 with AVX2 and FMA, and M >= 1), "ref" (F.linear), or None (the
    extension where it can run and 1 <= M <= MAX_ROWS, else the reference).
    """
    v.tensor("x", x, dtypes=(torch.float32,), ndim=2)
    v.tensor("weight", weight, dtypes=(torch.float32,), ndim=2, device=x.device)
    M, K = x.shape
    v.shape("weight", weight, (None, K))
    if bias is not None:
        v.tensor("bias", bias, dtypes=(torch.float32,), ndim=1, device=x.device)
        v.shape("bias", bias, (weight.shape[0],))
    if x.device.type != "cpu":
        raise ValueError(f"cpu_linear runs on the CPU; x is on {x.device}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous")
    fn = resolve("cpu_linear", x.device, backend)
    if backend is None and not 1 <= M <= MAX_ROWS:
        fn = resolve("cpu_linear", x.device, "ref")
    elif backend == "cpu" and M < 1:
        raise ValueError(f"backend 'cpu' takes at least one row, x has {M}")
    return fn(x, weight, None if bias is None else bias.contiguous())


def cpu_linear_q8_0(x, qweight, block_scale, bias=None, *, backend: str | None = None) -> torch.Tensor:
    """x [M, K] float32, qweight [N, K] int8 (contiguous), block_scale [N, K / 32] float32, bias [N] or None
    -> y [M, N] = x @ w.T (+ bias), w = qweight * block_scale (one scale per 32 weights of a row: a GGUF Q8_0
    matrix, e.g. the default large model's head). The "cpu" backend rebuilds each weight exactly in registers, so
    its output is cpu_linear's on the dequantised float32 weights, bit for bit, from a quarter of the bytes.
    K must be a multiple of 32. Any M (chunks of 8 rows).

    backend: "cpu" (the extension; x86-64 with AVX2 and FMA), "ref", or None (the extension where it runs).
    """
    v.tensor("x", x, dtypes=(torch.float32,), ndim=2)
    v.tensor("qweight", qweight, dtypes=(torch.int8,), ndim=2, device=x.device)
    N, K = qweight.shape
    v.shape("x", x, (None, K))
    if K % 32:
        raise ValueError(f"qweight's K = {K} is not a multiple of 32 (Q8_0 blocks)")
    v.tensor("block_scale", block_scale, dtypes=(torch.float32,), ndim=2, device=x.device)
    v.shape("block_scale", block_scale, (N, K // 32))
    _check_quantised("cpu_linear_q8_0", x, qweight, bias)
    fn = resolve("cpu_linear_q8_0", x.device, backend)
    return fn(x, qweight, block_scale.contiguous(), None if bias is None else bias.contiguous())


def cpu_linear_q4_1(x, qweight, dm, bias=None, *, backend: str | None = None) -> torch.Tensor:
    """x [M, K] float32, qweight [N, K / 2] uint8 (contiguous), dm [N, K / 32, 2] float32, bias [N] or None
    -> y [M, N] = x @ w.T (+ bias), w = d * q + m: a GGUF Q4_1 matrix (e.g. the default large model's layers),
    each block of 32 weights of a row as 16 bytes whose low nibbles are its first 16 weights and high nibbles the
    next 16, with its scale d and minimum m in dm (`reference.q4_1_dequantize` is the definition). The "cpu"
    backend rebuilds each weight exactly in registers, so its output is cpu_linear's on the dequantised float32
    weights, bit for bit, from 0.75 bytes a weight instead of 4. K must be a multiple of 32. Any M.

    backend: "cpu" (the extension; x86-64 with AVX2 and FMA), "ref", or None (the extension where it runs).
    """
    v.tensor("x", x, dtypes=(torch.float32,), ndim=2)
    M, K = x.shape
    if K % 32:
        raise ValueError(f"x's K = {K} is not a multiple of 32 (Q4_1 blocks)")
    v.tensor("qweight", qweight, dtypes=(torch.uint8,), ndim=2, device=x.device)
    v.shape("qweight", qweight, (None, K // 2))
    N = qweight.shape[0]
    v.tensor("dm", dm, dtypes=(torch.float32,), ndim=3, device=x.device)
    v.shape("dm", dm, (N, K // 32, 2))
    _check_quantised("cpu_linear_q4_1", x, qweight, bias)
    fn = resolve("cpu_linear_q4_1", x.device, backend)
    return fn(x, qweight, dm.contiguous(), None if bias is None else bias.contiguous())


def cpu_linear_q4_1x16(x, qweight, dm, bias=None, *, activation_bits: int = 16,
                       backend: str | None = None) -> torch.Tensor:
    """x [M, K] float32, qweight [N / 16, K / 32, 4, 16, 4] uint8 and dm [N / 16, K / 32, 2, 16] float32 (Q4_1
    blocks repacked by `reference.q4_1x16_pack`), bias [N] or None -> y [M, N] = x @ w.T (+ bias) with the
    activations rounded to int16 per run of 32 (scale amax / 32767: each rounding at most 2^-16 of the run's
    largest |x|), each block's product exact in integers (AVX-512 VNNI `vpdpwssd`, 16 output rows a register).
    `reference.cpu_linear_q4_1x16_ref` is the definition; against cpu_linear_q4_1 (float activations) the
    outputs differ by that rounding (~3e-5 of their size). Any M; a row's output does not depend on the others.
    activation_bits=8: the activations rounded to int8 instead (scale amax / 127, as llama.cpp rounds them for
    these blocks; ~1e-2 of the outputs' size), each block's product in `vpdpbusd` (four products a lane against
    two): ~20% faster at 4 rows on the AMD EPYC, where int16 is bound by the instructions from 3 rows.

    backend: "cpu" (the extension, where the CPU has AVX-512 F/VL/BW and VNNI:
    torch.ops.bild_kernels_cpu.cpu_linear_q4_1x16_supported()), "ref", or None (the extension where it runs).
    """
    _check_x16("cpu_linear_q4_1x16", x, qweight, torch.uint8, (4, 16, 4), dm, "dm", (2, 16), bias, activation_bits)
    fn = resolve("cpu_linear_q4_1x16", x.device, backend)
    return fn(x, qweight, dm.contiguous(), None if bias is None else bias.contiguous(), activation_bits)


def cpu_linear_q8_0x16(x, qweight, block_scale, bias=None, *, activation_bits: int = 16,
                       backend: str | None = None) -> torch.Tensor:
    """x [M, K] float32, qweight [N / 16, K / 32, 16, 16, 2] int8 and block_scale [N / 16, K / 32, 16] float32 (Q8_0
    blocks repacked by `reference.q8_0x16_pack`), bias [N] or None -> y [M, N] = x @ w.T (+ bias), w = q * d, with
    the activations rounded to int16 per run of 32 as in `cpu_linear_q4_1x16` (`reference.cpu_linear_q8_0x16_ref`
    is the definition); activation_bits=8 rounds them to int8 as there. backend: "cpu" (where the CPU has AVX-512
    VNNI), "ref", or None."""
    _check_x16("cpu_linear_q8_0x16", x, qweight, torch.int8, (16, 16, 2), block_scale, "block_scale", (16,), bias,
               activation_bits)
    fn = resolve("cpu_linear_q8_0x16", x.device, backend)
    return fn(x, qweight, block_scale.contiguous(), None if bias is None else bias.contiguous(), activation_bits)


class LinearStats(NamedTuple):
    y: torch.Tensor  # [M, N] float32, cpu_linear_q8_0x16's product
    row_max: torch.Tensor  # [M] float32
    row_lse: torch.Tensor  # [M] float32, logsumexp of the row
    row_argmax: torch.Tensor  # [M] int64, first index of the max
    finite: torch.Tensor  # [M] bool: every y of the row finite (else the three above are 0)


def cpu_linear_q8_0x16_stats(x, qweight, block_scale, bias=None, *, activation_bits: int = 16,
                             backend: str | None = None) -> LinearStats:
    """`cpu_linear_q8_0x16` (the same y, bit for bit) and each output row's max, logsumexp, first argmax and whether
    all of it is finite: what a verification and a non-finite screen read from an LM head's logits, taken while the
    head's product still has them in cache (the "cpu" backend: segment by segment, each by the thread that wrote
    it; `reference.cpu_linear_q8_0x16_stats_ref` is the definition, float32 rounding apart for the logsumexp)."""
    _check_x16("cpu_linear_q8_0x16_stats", x, qweight, torch.int8, (16, 16, 2), block_scale, "block_scale", (16,),
               bias, activation_bits)
    fn = resolve("cpu_linear_q8_0x16_stats", x.device, backend)
    return LinearStats(*fn(x, qweight, block_scale.contiguous(), None if bias is None else bias.contiguous(),
                           activation_bits))


def cpu_linear_int8(x, qweight, scale, bias=None, *, backend: str | None = None) -> torch.Tensor:
    """x [M, K] float32, qweight [N, K] int8 (contiguous), scale [N] float32, bias [N] or None
    -> y [M, N] = (x @ qweight.T) * scale (+ bias), float32, on the CPU. Any M (the "cpu" backend works in
    chunks of 8 rows, so each row's result is the same bits whatever M).

    backend: "cpu" (the extension; x86-64 with AVX2 and FMA), "ref", or None (the extension where it runs).
    """
    v.tensor("x", x, dtypes=(torch.float32,), ndim=2)
    v.tensor("qweight", qweight, dtypes=(torch.int8,), ndim=2, device=x.device)
    N, K = qweight.shape
    v.shape("x", x, (None, K))
    v.tensor("scale", scale, dtypes=(torch.float32,), ndim=1, device=x.device)
    v.shape("scale", scale, (N,))
    _check_quantised("cpu_linear_int8", x, qweight, bias)
    fn = resolve("cpu_linear_int8", x.device, backend)
    return fn(x, qweight, scale.contiguous(), None if bias is None else bias.contiguous())


def _check_x16(op: str, x, qweight, wdtype, winner: tuple, scale, sname: str, sinner: tuple, bias,
               activation_bits) -> None:
    """The checks the integer-activation ops share: x float32 [M, K] (K a multiple of 32) on the CPU, qweight
    `wdtype` [N / 16, K / 32, *winner] contiguous, scale float32 [N / 16, K / 32, *sinner], bias [N] or None,
    activation_bits 8 or 16."""
    check_activation_bits(activation_bits)
    v.tensor("x", x, dtypes=(torch.float32,), ndim=2)
    K = x.shape[1]
    if K % 32:
        raise ValueError(f"x's K = {K} is not a multiple of 32 (the blocks' width)")
    v.tensor("qweight", qweight, dtypes=(wdtype,), ndim=2 + len(winner), device=x.device)
    v.shape("qweight", qweight, (None, K // 32, *winner))
    G = qweight.shape[0]
    v.tensor(sname, scale, dtypes=(torch.float32,), ndim=2 + len(sinner), device=x.device)
    v.shape(sname, scale, (G, K // 32, *sinner))
    if bias is not None:
        v.tensor("bias", bias, dtypes=(torch.float32,), ndim=1, device=x.device)
        v.shape("bias", bias, (16 * G,))
    if x.device.type != "cpu":
        raise ValueError(f"{op} runs on the CPU; x is on {x.device}")
    if not qweight.is_contiguous():
        raise ValueError("qweight must be contiguous")


def check_activation_bits(activation_bits) -> None:
    """activation_bits must be 8 or 16 (an int, not a bool)."""
    if isinstance(activation_bits, bool) or activation_bits not in (8, 16):
        raise ValueError(f"activation_bits must be 8 or 16, got {activation_bits!r}")


def _check_quantised(op: str, x, qweight, bias) -> None:
    """The checks an int8-weight op shares: bias [N] float32 on x's device, x on the CPU, qweight contiguous."""
    if bias is not None:
        v.tensor("bias", bias, dtypes=(torch.float32,), ndim=1, device=x.device)
        v.shape("bias", bias, (qweight.shape[0],))
    if x.device.type != "cpu":
        raise ValueError(f"{op} runs on the CPU; x is on {x.device}")
    if not qweight.is_contiguous():
        raise ValueError("qweight must be contiguous")
