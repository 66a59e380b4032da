"""Registers the CPU extension (bild_kernels._cpu) as the "cpu" backend of the ops it implements, with the
fake (meta) implementations that let torch.compile trace through them."""
import torch

from bild_kernels import reference as R
from bild_kernels._backend import CPU_EXTENSION_OPS, register


@torch.library.register_fake("bild_kernels_cpu::cpu_linear")
def _cpu_linear_fake(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("bild_kernels_cpu::cpu_linear_int8")
def _cpu_linear_int8_fake(x, qweight, scale, bias):
    return x.new_empty((x.shape[0], qweight.shape[0]))


@torch.library.register_fake("bild_kernels_cpu::cpu_linear_q8_0")
def _cpu_linear_q8_0_fake(x, qweight, block_scale, bias):
    return x.new_empty((x.shape[0], qweight.shape[0]))


@torch.library.register_fake("bild_kernels_cpu::cpu_linear_q4_1")
def _cpu_linear_q4_1_fake(x, qweight, dm, bias):
    return x.new_empty((x.shape[0], qweight.shape[0]))


@torch.library.register_fake("bild_kernels_cpu::cpu_linear_q4_1x16")
def _cpu_linear_q4_1x16_fake(x, qweight, dm, bias, activation_bits=16):
    return x.new_empty((x.shape[0], qweight.shape[0] * 16))


@torch.library.register_fake("bild_kernels_cpu::cpu_linear_q8_0x16")
def _cpu_linear_q8_0x16_fake(x, qweight, block_scale, bias, activation_bits=16):
    return x.new_empty((x.shape[0], qweight.shape[0] * 16))


@torch.library.register_fake("bild_kernels_cpu::cpu_linear_q8_0x16_stats")
def _cpu_linear_q8_0x16_stats_fake(x, qweight, block_scale, bias, activation_bits=16):
    M = x.shape[0]
    return (x.new_empty((M, qweight.shape[0] * 16)), x.new_empty((M,)), x.new_empty((M,)),
            x.new_empty((M,), dtype=torch.int64), x.new_empty((M,), dtype=torch.bool))


@torch.library.register_fake("bild_kernels_cpu::paged_attention")
def _paged_attention_fake(query, key_cache, value_cache, query_start_loc, positions, block_tables, context_lens,
                          scale, sliding_window):
    return query.new_empty(query.shape)


@torch.library.register_fake("bild_kernels_cpu::cpu_decoder_layer")
def _cpu_decoder_layer_fake(x, *args):
    return x.new_empty(x.shape)


@torch.library.register_fake("bild_kernels_cpu::cpu_rms_norm")
def _cpu_rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.register_fake("bild_kernels_cpu::cpu_feature_input")
def _cpu_feature_input_fake(features, *args):
    return features.new_empty(features.shape)


@torch.library.register_fake("bild_kernels_cpu::cpu_feature_draft_chain")
def _cpu_feature_draft_chain_fake(features, next_ids, shift, inv_std, embed, inv_emb_scale, fc_w, fc_scale, fc_bias,
                                  layers, key_caches, value_caches, norm, head_w, head_scale, head_bias, head_vocab,
                                  cos, sin, slot_mapping, block_tables, counts, *args):
    # [B, max(caps)]: the width is the caps' maximum, a value: unknown while tracing
    width = torch.library.get_ctx().new_dynamic_size()
    B = counts.shape[0]
    return (features.new_empty((B, width), dtype=torch.int64), features.new_empty((B, width)),
            features.new_empty((B, 3), dtype=torch.int64))


@torch.library.register_fake("bild_kernels_cpu::apply_penalties")
def _apply_penalties_fake(logits, *args):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("bild_kernels_cpu::apply_token_bitmask")
def _apply_token_bitmask_fake(logits, bitmask):
    return logits.new_empty(logits.shape)


for _op in ("reserve_paged_kv", "rollback_paged_kv"):  # in place: their fakes return nothing
    torch.library.register_fake(f"bild_kernels_cpu::{_op}")(lambda *args: None)

for _op in CPU_EXTENSION_OPS:
    register(_op, "cpu", getattr(torch.ops.bild_kernels_cpu, _op))
if torch.ops.bild_kernels_cpu.cpu_linear_q4_1x16_supported():  # AVX-512 VNNI: else the reference alone
    register("cpu_linear_q4_1x16", "cpu", torch.ops.bild_kernels_cpu.cpu_linear_q4_1x16)
    register("cpu_linear_q8_0x16", "cpu", torch.ops.bild_kernels_cpu.cpu_linear_q8_0x16)
    register("cpu_linear_q8_0x16_stats", "cpu", torch.ops.bild_kernels_cpu.cpu_linear_q8_0x16_stats)


# sample_draft and verify_draft: csrc/cpu_sampling.cpp computes calls over finite logits, greedy and sampling rows
# with or without top-k / top-p / min-p, in every mode of verify_draft (speculative sampling's too): every step of a
# CPU engine. It reports the other calls unhandled (a row whose max is not finite, float64 logits go
# straight to the reference), and the reference computes those (the same definitions; tested against each other).
@torch.library.register_fake("bild_kernels_cpu::cpu_sample_draft")
def _cpu_sample_draft_fake(logits, temperature, top_k, top_p, seed, offset, fallback_threshold, min_p=None):
    B = logits.shape[0]
    f = logits.new_empty((B,), dtype=torch.float32)
    return (logits.new_empty((B,), dtype=torch.int64), f, f.clone(), f.clone(),
            logits.new_empty((B,), dtype=torch.bool), logits.new_empty((), dtype=torch.bool))


@torch.library.register_fake("bild_kernels_cpu::cpu_verify_draft")
def _cpu_verify_draft_fake(draft_ids, logits, mode, rollback_threshold, draft_probs, temperature, top_k, top_p, seed,
                           offset, min_p=None, row_max=None, row_lse=None, row_argmax=None):
    B, K1, _ = logits.shape
    return (logits.new_empty((B,), dtype=torch.int32), logits.new_empty((B, K1), dtype=torch.int64),
            logits.new_empty((B, K1 - 1), dtype=torch.float32), logits.new_empty((B, K1), dtype=torch.float32),
            logits.new_empty((), dtype=torch.bool))


def _as_f32(logits):
    # float16 / bfloat16 widen exactly, as the reference does; float64 keeps the reference's float64 arithmetic
    return logits if logits.dtype == torch.float32 else logits.float()


def cpu_sample_draft(logits, temperature, top_k, top_p, seed, offset, fallback_threshold, min_p=None):
    if logits.dtype != torch.float64:
        *out, handled = torch.ops.bild_kernels_cpu.cpu_sample_draft(
            _as_f32(logits).contiguous(), temperature, top_k, top_p, seed, offset, fallback_threshold, min_p)
        if handled:
            return tuple(out)
    return R.sample_draft_ref(logits, temperature, top_k, top_p, seed, offset, fallback_threshold, min_p)


def cpu_verify_draft(draft_ids, target_logits, mode, rollback_threshold, draft_probs, temperature, top_k, top_p,
                     seed, offset, min_p=None, target_stats=None):
    """target_stats: (row_max, row_lse, row_argmax) [B, K+1] of float32 target_logits, used instead of a pass over
    them (`verify_draft`'s); ignored where the reference runs."""
    if target_logits.dtype != torch.float64:
        # draft_probs read in float32, as the reference reads them against float32 logits
        probs = draft_probs.to(torch.float32).contiguous() if mode == R.MODE_SAMPLE else None
        given = target_stats if target_stats is not None and target_logits.dtype == torch.float32 else (None,) * 3
        *out, handled = torch.ops.bild_kernels_cpu.cpu_verify_draft(
            draft_ids, _as_f32(target_logits).contiguous(), mode, rollback_threshold, probs, temperature, top_k,
            top_p, seed, offset, min_p, *given)
        if handled:
            return tuple(out)
    return R.verify_draft_ref(draft_ids, target_logits, mode, rollback_threshold, draft_probs, temperature, top_k,
                              top_p, seed, offset, min_p)


register("sample_draft", "cpu", cpu_sample_draft)
register("verify_draft", "cpu", cpu_verify_draft)
