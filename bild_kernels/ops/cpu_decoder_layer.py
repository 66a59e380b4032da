"""cpu_decoder_layer: one Llama-family decoder layer over a few new tokens in a single call, float32 on the CPU
(the executor's layer for decode steps, verify passes and draft steps of up to 16 tokens).

A decode step's arithmetic outside the four matrix products is tiny, but as PyTorch ops it is ~30
dispatches a layer plus the Python around them (~0.4 ms a layer on the AMD EPYC, ~12 ms of a 30-layer
step whose weights stream in ~45 ms). The "cpu" backend (csrc/cpu_decoder_layer.cpp) runs the whole layer
in C++ on the extension's own matmul and attention kernels; "ref" (`reference.cpu_decoder_layer_ref`) is
the same layer in PyTorch ops. Weights are float32, int8 with a float32 scale per output row, or a GGUF's Q4_1
blocks (uint8 [N, K / 2] with their (d, m) [N, K / 32, 2] as the scale; `reference.q4_1_dequantize`), or those
blocks packed for int16 activations (uint8 [N / 16, K / 32, 4, 16, 4] with dm [N / 16, K / 32, 2, 16];
`reference.q4_1x16_pack`, `cpu_linear_q4_1x16`), or Q8_0 blocks packed alike (int8 [N / 16, K / 32, 16, 16, 2]
with a block scale [N / 16, K / 32, 16]; `reference.q8_0x16_pack`, `cpu_linear_q8_0x16`); packed weights meet the
activations rounded to `activation_bits` (16 or 8) per run of 32.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from bild_kernels._backend import resolve
from bild_kernels.ops import _validate as v
from bild_kernels.ops.cpu_linear import check_activation_bits


class LayerWeights(NamedTuple):
    """One layer's weights as cpu_decoder_layer takes them: a projection is (weight, scale or None, bias or
    None), weight [N, K] float32, int8 with scale [N] float32, Q4_1 blocks uint8 [N, K / 2] with scale = dm
    [N, K / 32, 2] float32, or packed blocks (5-D: `reference.q4_1x16_pack` / `q8_0x16_pack`). q_norm / k_norm
    [head_dim] float32 (Qwen3's and Gemma's per-head RMSNorm of the queries and keys before RoPE; both or neither);
    attn_out_norm / mlp_out_norm [hidden] float32 (Gemma's norms of the attention's and the MLP's outputs)."""
    input_norm: torch.Tensor
    qkv: tuple
    o: tuple
    post_norm: torch.Tensor
    gate_up: tuple
    down: tuple
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    attn_out_norm: torch.Tensor | None = None
    mlp_out_norm: torch.Tensor | None = None


def cpu_decoder_layer(x, cos, sin, weights: LayerWeights, key_cache, value_cache, slot_mapping, query_start_loc,
                      positions, block_tables, context_lens, *, num_heads: int, num_kv_heads: int, scale: float,
                      sliding_window: int = 0, eps: float, activation_bits: int = 16, activation: str = "silu",
                      backend: str | None = None) -> torch.Tensor:
    """x [T, hidden] float32 -> the layer's output [T, hidden]; the new tokens' K/V are written into
    key_cache / value_cache [blocks, block_size, H_kv, D] at slot_mapping [T] (-1: skipped).

    cos, sin [T, D]: the tokens' rotary tables (scaled). The attention metadata are those of
    `paged_attention` (query_start_loc [B + 1], positions [T], block_tables [B, max_blocks], context_lens [B]).
    activation_bits: how packed (5-D) weights round the activations (16 or 8; see `cpu_linear_q4_1x16`).
    activation: the gated MLP's, "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU).
    backend: "cpu" (the extension), "ref", or None (the extension where it runs)."""
    v.tensor("x", x, dtypes=(torch.float32,), ndim=2)
    if x.device.type != "cpu":
        raise ValueError(f"cpu_decoder_layer runs on the CPU; x is on {x.device}")
    check_activation_bits(activation_bits)
    T, H = x.shape
    if T < 1:
        raise ValueError("x must hold at least one token")
    v.tensor("key_cache", key_cache, dtypes=(torch.float32,), ndim=4, device=x.device)
    v.tensor("value_cache", value_cache, dtypes=(torch.float32,), ndim=4, device=x.device)
    v.shape("value_cache", value_cache, tuple(key_cache.shape))
    D = key_cache.shape[3]
    if num_kv_heads != key_cache.shape[2] or num_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads}), which "
                         f"must equal key_cache.shape[2] ({key_cache.shape[2]})")
    for name, t in (("cos", cos), ("sin", sin)):
        v.tensor(name, t, dtypes=(torch.float32,), ndim=2, device=x.device)
        v.shape(name, t, (T, D))
    v.tensor("slot_mapping", slot_mapping, dtypes=(torch.int64,), ndim=1, device=x.device)
    v.shape("slot_mapping", slot_mapping, (T,))
    for name in ("input_norm", "post_norm"):
        v.tensor(name, getattr(weights, name), dtypes=(torch.float32,), ndim=1, device=x.device)
        v.shape(name, getattr(weights, name), (H,))
    if (weights.q_norm is None) != (weights.k_norm is None):
        raise ValueError("q_norm and k_norm come together (Qwen3's per-head norms): got only "
                         f"{'q_norm' if weights.k_norm is None else 'k_norm'}")
    for name, n in (("q_norm", D), ("k_norm", D), ("attn_out_norm", H), ("mlp_out_norm", H)):
        if getattr(weights, name) is not None:
            v.tensor(name, getattr(weights, name), dtypes=(torch.float32,), ndim=1, device=x.device)
            v.shape(name, getattr(weights, name), (n,))
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {tuple(ACTIVATION_CODES)}, got {activation!r}")
    qkv_n = (num_heads + 2 * num_kv_heads) * D
    gu = weights.gate_up[0]
    inter = gu.shape[0] * (16 if isinstance(gu, torch.Tensor) and gu.dim() == 5 else 1) // 2
    for name, (n, k) in (("qkv", (qkv_n, H)), ("o", (H, num_heads * D)), ("gate_up", (2 * inter, H)),
                         ("down", (H, inter))):
        w, s, b = getattr(weights, name)
        packed = s is not None and isinstance(w, torch.Tensor) and w.dim() == 5  # q4_1x16_pack / q8_0x16_pack
        q4_1 = s is not None and isinstance(w, torch.Tensor) and w.dtype == torch.uint8
        kind = "packed blocks" if packed else "Q4_1 blocks"
        if (q4_1 or packed) and k % 32:
            raise ValueError(f"{name} weight: {kind} need an input width that is a multiple of 32, got {k}")
        if packed and n % 16:
            raise ValueError(f"{name} weight: packed blocks need an output width that is a multiple of 16, got {n}")
        if packed and w.dtype == torch.int8:  # the weight's and the scale's shapes in each format
            w_shape, s_shape = (n // 16, k // 32, 16, 16, 2), (n // 16, k // 32, 16)
        elif packed:
            w_shape, s_shape = (n // 16, k // 32, 4, 16, 4), (n // 16, k // 32, 2, 16)
        elif q4_1:
            w_shape, s_shape = (n, k // 2), (n, k // 32, 2)
        else:
            w_shape, s_shape = (n, k), (n,)
        v.tensor(f"{name} weight", w, dtypes=(torch.int8, torch.uint8) if s is not None else (torch.float32,),
                 ndim=len(w_shape), device=x.device)
        v.shape(f"{name} weight", w, w_shape)
        if s is not None:
            v.tensor(f"{name} scale", s, dtypes=(torch.float32,), ndim=len(s_shape), device=x.device)
            v.shape(f"{name} scale", s, s_shape)
        if b is not None:
            v.tensor(f"{name} bias", b, dtypes=(torch.float32,), ndim=1, device=x.device)
            v.shape(f"{name} bias", b, (n,))
    fn = resolve("cpu_decoder_layer", x.device, backend)
    return fn(x.contiguous(), cos.contiguous(), sin.contiguous(), *layer_args(weights), key_cache, value_cache,
              slot_mapping.contiguous(), query_start_loc, positions, block_tables, context_lens, num_heads,
              num_kv_heads, float(scale), int(sliding_window), float(eps), int(activation_bits),
              *layer_extras(weights, activation))


ACTIVATION_CODES = {"silu": 0, "gelu_tanh": 1}  # the op's `activation`


def layer_extras(weights: LayerWeights, activation: str = "silu") -> tuple:
    """The op's trailing arguments after activation_bits, (q_norm, k_norm, attn_out_norm, mlp_out_norm, activation
    code), or () for a plain Llama layer (SwiGLU, pre-norms only): what Qwen3 and Gemma add."""
    norms = (weights.q_norm, weights.k_norm, weights.attn_out_norm, weights.mlp_out_norm)
    if all(t is None for t in norms) and activation == "silu":
        return ()
    return (*(None if t is None else t.contiguous() for t in norms), ACTIVATION_CODES[activation])


def layer_args(weights: LayerWeights) -> tuple:
    """The weights as the op's 14 positional arguments (contiguous; what Qwen3 and Gemma add: `layer_extras`)."""
    def c(t):
        return None if t is None else t.contiguous()
    out = [c(weights.input_norm)]
    for name in ("qkv", "o"):
        out += [c(t) for t in getattr(weights, name)]
    out.append(c(weights.post_norm))
    for name in ("gate_up", "down"):
        out += [c(t) for t in getattr(weights, name)]
    return tuple(out)
