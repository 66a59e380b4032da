"""Registers the Triton kernels as the "triton" backend, each wrapped as a torch custom op.

The custom ops (namespace `bild_kernels`) carry fake implementations, so the ops trace through
`torch.compile` and record into CUDA graphs like any aten op.
"""
from __future__ import annotations

import torch

from bild_kernels._backend import register
from bild_kernels.ops import _fake
from bild_kernels.triton import paged_kv as _kv
from bild_kernels.triton import sampling as _smp
from bild_kernels.triton import verify as _vfy


@torch.library.custom_op("bild_kernels::write_paged_kv_triton", mutates_args=("key_cache", "value_cache"))
def write_paged_kv_triton(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                          value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    _kv.write_paged_kv(key, value, key_cache, value_cache, slot_mapping)


_TABLE_MUTATES = ("block_tables", "context_lens", "free_blocks", "num_free")


@torch.library.custom_op("bild_kernels::reserve_paged_kv_triton", mutates_args=_TABLE_MUTATES)
def reserve_paged_kv_triton(block_tables: torch.Tensor, context_lens: torch.Tensor, num_new: torch.Tensor,
                            free_blocks: torch.Tensor, num_free: torch.Tensor, block_size: int) -> None:
    _kv.reserve_paged_kv(block_tables, context_lens, num_new, free_blocks, num_free, block_size)


@torch.library.custom_op("bild_kernels::rollback_paged_kv_triton", mutates_args=_TABLE_MUTATES)
def rollback_paged_kv_triton(block_tables: torch.Tensor, context_lens: torch.Tensor, num_rejected: torch.Tensor,
                             free_blocks: torch.Tensor, num_free: torch.Tensor, block_size: int) -> None:
    _kv.rollback_paged_kv(block_tables, context_lens, num_rejected, free_blocks, num_free, block_size)


@torch.library.custom_op("bild_kernels::gather_paged_kv_triton", mutates_args=())
def gather_paged_kv_triton(key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _kv.gather_paged_kv(key_cache, value_cache, block_tables, context_lens)


@torch.library.custom_op("bild_kernels::sample_draft_triton", mutates_args=())
def sample_draft_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                        seed: torch.Tensor, offset: torch.Tensor, fallback_threshold: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _smp.sample_draft(logits, temperature, top_k, top_p, seed, offset, fallback_threshold)


@torch.library.custom_op("bild_kernels::verify_draft_triton", mutates_args=())
def verify_draft_triton(draft_ids: torch.Tensor, target_logits: torch.Tensor, mode: int,
                        rollback_threshold: torch.Tensor, draft_probs: torch.Tensor | None,
                        temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, seed: torch.Tensor,
                        offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _vfy.verify_draft(draft_ids, target_logits, mode, rollback_threshold, draft_probs, temperature, top_k,
                             top_p, seed, offset)


gather_paged_kv_triton.register_fake(_fake.gather_paged_kv)
sample_draft_triton.register_fake(_fake.sample_draft)
verify_draft_triton.register_fake(_fake.verify_draft)

register("write_paged_kv", "triton", write_paged_kv_triton)
register("reserve_paged_kv", "triton", reserve_paged_kv_triton)
register("rollback_paged_kv", "triton", rollback_paged_kv_triton)
register("gather_paged_kv", "triton", gather_paged_kv_triton)
register("sample_draft", "triton", sample_draft_triton)
register("verify_draft", "triton", verify_draft_triton)
