"""Registers the PyTorch reference as the "ref" backend of every op."""
from bild_kernels import reference as R
from bild_kernels._backend import register

register("write_paged_kv", "ref", R.write_paged_kv_ref)
register("reserve_paged_kv", "ref", R.reserve_paged_kv_ref)
register("rollback_paged_kv", "ref", R.rollback_paged_kv_ref)
register("gather_paged_kv", "ref", R.gather_paged_kv_ref)
register("sample_draft", "ref", R.sample_draft_ref)
register("apply_penalties", "ref", R.apply_penalties_ref)
register("apply_token_bitmask", "ref", R.apply_token_bitmask_ref)


def _verify_draft(draft_ids, target_logits, mode, rollback_threshold, draft_probs, temperature, top_k, top_p,
                  seed, offset, min_p=None):
    return R.verify_draft_ref(draft_ids, target_logits, mode, rollback_threshold, draft_probs, temperature,
                              top_k, top_p, seed, offset, min_p)


register("verify_draft", "ref", _verify_draft)
register("cpu_linear", "ref", R.cpu_linear_ref)
register("cpu_linear_int8", "ref", R.cpu_linear_int8_ref)
register("cpu_linear_q8_0", "ref", R.cpu_linear_q8_0_ref)
register("cpu_linear_q4_1", "ref", R.cpu_linear_q4_1_ref)
register("cpu_linear_q4_1x16", "ref", R.cpu_linear_q4_1x16_ref)
register("cpu_linear_q8_0x16", "ref", R.cpu_linear_q8_0x16_ref)
register("cpu_linear_q8_0x16_stats", "ref", R.cpu_linear_q8_0x16_stats_ref)
register("cpu_decoder_layer", "ref", R.cpu_decoder_layer_ref)
register("cpu_rms_norm", "ref", R.cpu_rms_norm_ref)
register("cpu_feature_input", "ref", R.cpu_feature_input_ref)
register("cpu_feature_draft_chain", "ref", R.cpu_feature_draft_chain_ref)
