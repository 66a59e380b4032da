"""The CPU extension's fused pieces: a decoder layer, RMSNorm, a feature draft's input map and its draft chain."""
from __future__ import annotations

import math

import torch

from bild_kernels.reference.cpu_linear import (cpu_linear_int8_ref, cpu_linear_q4_1x16_ref, cpu_linear_q8_0x16_ref,
                                               cpu_linear_ref, q4_1_dequantize)
from bild_kernels.reference.paged_kv import write_paged_kv_ref
from bild_kernels.reference.sampling import _chain_penalties


def cpu_decoder_layer_ref(x, cos, sin, input_norm, qkv_w, qkv_scale, qkv_bias, o_w, o_scale, o_bias, post_norm,
                          gate_up_w, gate_up_scale, gate_up_bias, down_w, down_scale, down_bias, key_cache,
                          value_cache, slot_mapping, query_start_loc, positions, block_tables, context_lens,
                          num_heads: int, num_kv_heads: int, scale: float, sliding_window: int, eps: float,
                          activation_bits: int = 16, q_norm=None, k_norm=None, attn_out_norm=None, mlp_out_norm=None,
                          activation: int = 0, *, linear=None, linear_int8=None, attention=None):
    """One Llama-family decoder layer over T new tokens x [T, hidden] (the LlamaExecutor's layer, op for op):
    RMSNorm, the fused q/k/v product, RoPE (cos/sin [T, D], rotate-half), the K/V written to the paged cache at
    slot_mapping (slot -1 skipped), paged attention, the output product and residual, RMSNorm, the fused
    gate/up product, SiLU(gate) * up, the down product and residual. A weight with a scale is int8
    (w ~= q * scale, `cpu_linear_int8_ref`) or, when uint8, Q4_1 blocks with dm [N, K / 32, 2] as the scale
    (`q4_1_dequantize`), or 5-D: Q4_1 (uint8) or Q8_0 (int8) blocks packed 16 rows a register, their products
    against activations rounded to activation_bits (`cpu_linear_q4_1x16_ref`, `cpu_linear_q8_0x16_ref`), else
    float (`cpu_linear_ref`). q_norm / k_norm [D] (Qwen3; both or neither): every query / key head RMS-normalised
    before RoPE. Gemma's form: attn_out_norm / mlp_out_norm [hidden] RMS-normalise the attention's and the MLP's
    outputs before their residual adds, activation 1 gates with gelu_tanh instead of silu (0). Returns the new
    stream [T, hidden];
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
    if q_norm is not None:
        qk = torch.cat((norm(qk[:, :Hq], q_norm), norm(qk[:, Hq:], k_norm)), dim=1)
    half = D // 2
    qk = qk * cos[:, None] + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin[:, None]
    q, k = qk[:, :Hq], qk[:, Hq:]
    v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
    write_paged_kv_ref(k, v, key_cache, value_cache, slot_mapping)
    attn = attention(q.contiguous(), key_cache, value_cache, query_start_loc, positions, block_tables, context_lens,
                     scale, sliding_window)
    o = project(attn.reshape(T, Hq * D), o_w, o_scale, o_bias)
    x = x + (o if attn_out_norm is None else norm(o, attn_out_norm))
    gate, up = project(norm(x, post_norm), gate_up_w, gate_up_scale, gate_up_bias).chunk(2, dim=-1)
    act = torch.nn.functional.gelu(gate, approximate="tanh") if activation == 1 else torch.nn.functional.silu(gate)
    m = project(act * up, down_w, down_scale, down_bias)
    return x + (m if mlp_out_norm is None else norm(m, mlp_out_norm))


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
                                activation_bits: int, fallback_threshold: float, energy: bool, layer_norms=(),
                                penalty_ids=None, penalty_rows=None, penalty_values=None, banned_ids=None,
                                bias_ids=None, bias_values=None):
    """A feature draft's greedy draft runs of B sequences (the engine's eager loop, step for step; each sequence's
    run depends on nothing but its own inputs, so this twin runs them one after the other).

    Sequence b: step 0 feeds its counts[b] verified positions starts[b] .. starts[b] + counts[b] - 1 (its rows of
    features [sum(counts), H] and next_ids, in sequence order); each later step one position: the draft's own last
    output (before the final norm) and its last token. A step is `cpu_feature_input_ref`, the layers
    (`cpu_decoder_layer_ref`, 14 weights each in `layers`, and where `layer_norms` holds them four norms each: q_norm,
    k_norm, attn_out_norm, mlp_out_norm, SwiGLU always; K/V written at the sequence's run of counts[b] + caps[b]
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
                                          sliding_windows[i], eps, activation_bits,
                                          *(layer_norms[4 * i:4 * (i + 1)] if layer_norms else ()))
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
