"""Paged KV cache ops: write new K/V through a slot mapping, reserve and roll back blocks, gather.

Layout: key_cache / value_cache [num_blocks, block_size, num_kv_heads, head_dim]; slot s is row
s % block_size of block s // block_size. Block bookkeeping lives on the device so that a draft loop
under a CUDA graph never synchronises with the host:
  block_tables [B, M] int32   each row's blocks in order, then -1
  context_lens [B] int32      tokens held per row (-1: inactive row, untouched by every op)
  free_blocks  [N] int32      a stack; its first num_free[0] entries are the free blocks
  num_free     [1] int32      stack height (set to -1 - missing when a reserve cannot be served)
The exact semantics are those of the `*_ref` functions in `bild_kernels.reference`.
"""
from __future__ import annotations

import torch

from bild_kernels._backend import resolve
from bild_kernels.ops import _validate as v


def write_paged_kv(key, value, key_cache, value_cache, slot_mapping, *, backend: str | None = None) -> None:
    """Scatter `key`/`value` [T, H, D] into the caches at `slot_mapping` [T] (-1 rows skipped). In place."""
    dev = v.tensor("key", key, dtypes=v.FLOATS, ndim=3).device
    v.tensor("value", value, dtypes=v.FLOATS, ndim=3, device=dev)
    v.tensor("key_cache", key_cache, dtypes=v.FLOATS, ndim=4, device=dev)
    v.tensor("value_cache", value_cache, dtypes=v.FLOATS, ndim=4, device=dev)
    v.tensor("slot_mapping", slot_mapping, dtypes=v.INTS, ndim=1, device=dev)
    T, H, D = key.shape
    nb, bs = key_cache.shape[:2]
    v.shape("value", value, (T, H, D))
    v.shape("key_cache", key_cache, (None, None, H, D))
    v.shape("value_cache", value_cache, (nb, bs, H, D))
    v.shape("slot_mapping", slot_mapping, (T,))
    if value_cache.dtype != key_cache.dtype:
        raise TypeError(f"value_cache dtype {value_cache.dtype} differs from key_cache dtype {key_cache.dtype}")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("key_cache and value_cache must be contiguous")
    v.in_range("slot_mapping", slot_mapping, -1, nb * bs, hi_open=True)
    if T == 0:
        return
    fn = resolve("write_paged_kv", dev, backend)
    fn(key.contiguous(), value.contiguous(), key_cache, value_cache, slot_mapping.to(torch.int64).contiguous())


def _check_tables(block_tables, context_lens, counts, counts_name, free_blocks, num_free, block_size):
    dev = v.tensor("block_tables", block_tables, dtypes=(torch.int32,), ndim=2).device
    B = block_tables.shape[0]
    v.tensor("context_lens", context_lens, dtypes=(torch.int32,), ndim=1, device=dev)
    v.shape("context_lens", context_lens, (B,))
    v.tensor(counts_name, counts, dtypes=(torch.int32,), ndim=1, device=dev)
    v.shape(counts_name, counts, (B,))
    v.tensor("free_blocks", free_blocks, dtypes=(torch.int32,), ndim=1, device=dev)
    v.tensor("num_free", num_free, dtypes=(torch.int32,), ndim=1, device=dev)
    v.shape("num_free", num_free, (1,))
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens), (counts_name, counts),
                    ("free_blocks", free_blocks), ("num_free", num_free)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    v.in_range(counts_name, counts, 0)
    v.in_range("num_free", num_free, 0, free_blocks.shape[0])
    return dev


def reserve_paged_kv(block_tables, context_lens, num_new, free_blocks, num_free, block_size: int, *,
                     backend: str | None = None) -> None:
    """Grow every active row's table to hold context_lens + num_new tokens, popping free blocks.

    On a shortfall nothing is allocated and num_free[0] becomes -1 - (blocks missing): the caller
    reads it when it must know (the engine does, once per step, outside any graph).
    """
    dev = _check_tables(block_tables, context_lens, num_new, "num_new", free_blocks, num_free, block_size)
    if not v.skip_value_checks():
        cap = (context_lens.long() + num_new.long() + block_size - 1) // block_size
        if bool(((context_lens >= 0) & (cap > block_tables.shape[1])).any()):
            raise ValueError(f"num_new: a row would need more than block_tables.shape[1]="
                             f"{block_tables.shape[1]} blocks of {block_size} tokens")
    resolve("reserve_paged_kv", dev, backend)(block_tables, context_lens, num_new, free_blocks, num_free, block_size)


def rollback_paged_kv(block_tables, context_lens, num_rejected, free_blocks, num_free, block_size: int, *,
                      backend: str | None = None) -> None:
    """Drop the last num_rejected[b] tokens of every active row; emptied blocks return to the pool."""
    dev = _check_tables(block_tables, context_lens, num_rejected, "num_rejected", free_blocks, num_free, block_size)
    resolve("rollback_paged_kv", dev, backend)(block_tables, context_lens, num_rejected, free_blocks, num_free,
                                               block_size)


def gather_paged_kv(key_cache, value_cache, block_tables, context_lens, *, backend: str | None = None):
    """Dense copies [B, L, H, D] of each row's first context_lens[b] tokens (zeros past the end)."""
    dev = v.tensor("key_cache", key_cache, dtypes=v.FLOATS, ndim=4).device
    v.tensor("value_cache", value_cache, dtypes=v.FLOATS, ndim=4, device=dev)
    v.shape("value_cache", value_cache, tuple(key_cache.shape))
    v.tensor("block_tables", block_tables, dtypes=(torch.int32,), ndim=2, device=dev)
    v.tensor("context_lens", context_lens, dtypes=(torch.int32,), ndim=1, device=dev)
    v.shape("context_lens", context_lens, (block_tables.shape[0],))
    v.in_range("context_lens", context_lens, 0, block_tables.shape[1] * key_cache.shape[1])
    return resolve("gather_paged_kv", dev, backend)(key_cache, value_cache, block_tables.contiguous(),
                                                    context_lens.contiguous())
