"""Fake (meta) implementations: output shapes and dtypes of every op, for torch.compile tracing."""
import torch


def gather_paged_kv(key_cache, value_cache, block_tables, context_lens):
    # The dense length is data-dependent (max of context_lens).
    L = torch.library.get_ctx().new_dynamic_size()
    B = block_tables.shape[0]
    shape = (B, L, *key_cache.shape[2:])
    return key_cache.new_empty(shape), value_cache.new_empty(shape)


def sample_draft(logits, temperature, top_k, top_p, seed, offset, fallback_threshold, min_p=None, rows=7):
    B = logits.shape[0]
    f = lambda dt: logits.new_empty((B,), dtype=dt)  # noqa: E731
    return f(torch.int64), f(torch.float32), f(torch.float32), f(torch.float32), f(torch.bool)


def verify_draft(draft_ids, target_logits, mode, rollback_threshold, draft_probs, temperature, top_k, top_p, seed,
                 offset, min_p=None, rows=7):
    B, K1 = target_logits.shape[:2]
    return (target_logits.new_empty((B,), dtype=torch.int32), target_logits.new_empty((B, K1), dtype=torch.int64),
            target_logits.new_empty((B, K1 - 1), dtype=torch.float32),
            target_logits.new_empty((B, K1), dtype=torch.float32))


def apply_penalties(logits, token_ids, prompt_lens, draft_ids, repetition_penalty, presence_penalty, frequency_penalty,
                    min_tokens, banned_ids, bias_ids, bias_values):
    return logits.new_empty(logits.shape)


def apply_token_bitmask(logits, bitmask):
    return logits.new_empty(logits.shape)
