"""The paged KV cache: write, reserve, roll back, gather."""
from __future__ import annotations

import torch


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
