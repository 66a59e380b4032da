"""Registers the Triton kernels as the "triton" backend, each wrapped as a torch custom op.

The custom ops (namespace `bild_kernels`) carry fake implementations, so the ops trace through
`torch.compile` and record into CUDA graphs like any aten op.
"""
from __future__ import annotations

import functools
import threading

import torch

from bild_kernels._backend import register, resolve, triton_interpret
from bild_kernels.ops import _ref_impls  # noqa: F401  (the guards below fall back to these)
from bild_kernels.ops import _fake
from bild_kernels.triton import paged_kv as _kv
from bild_kernels.triton import penalties as _pen
from bild_kernels.triton import sampling as _smp
from bild_kernels.triton import token_bitmask as _tbm
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
                        seed: torch.Tensor, offset: torch.Tensor, fallback_threshold: torch.Tensor,
                        min_p: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _smp.sample_draft(logits, temperature, top_k, top_p, seed, offset, fallback_threshold, min_p)


@torch.library.custom_op("bild_kernels::verify_draft_triton", mutates_args=())
def verify_draft_triton(draft_ids: torch.Tensor, target_logits: torch.Tensor, mode: int,
                        rollback_threshold: torch.Tensor, draft_probs: torch.Tensor | None,
                        temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, seed: torch.Tensor,
                        offset: torch.Tensor, min_p: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _vfy.verify_draft(draft_ids, target_logits, mode, rollback_threshold, draft_probs, temperature, top_k,
                             top_p, seed, offset, min_p)


@torch.library.custom_op("bild_kernels::apply_penalties_triton", mutates_args=())
def apply_penalties_triton(logits: torch.Tensor, token_ids: torch.Tensor, prompt_lens: torch.Tensor,
                           draft_ids: torch.Tensor, repetition_penalty: torch.Tensor, presence_penalty: torch.Tensor,
                           frequency_penalty: torch.Tensor, min_tokens: torch.Tensor, banned_ids: torch.Tensor,
                           bias_ids: torch.Tensor, bias_values: torch.Tensor) -> torch.Tensor:
    return _pen.apply_penalties(logits, token_ids, prompt_lens, draft_ids, repetition_penalty, presence_penalty,
                                frequency_penalty, min_tokens, banned_ids, bias_ids, bias_values)


@torch.library.custom_op("bild_kernels::apply_token_bitmask_triton", mutates_args=())
def apply_token_bitmask_triton(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    return _tbm.apply_token_bitmask(logits, bitmask)


gather_paged_kv_triton.register_fake(_fake.gather_paged_kv)
sample_draft_triton.register_fake(_fake.sample_draft)
verify_draft_triton.register_fake(_fake.verify_draft)
apply_penalties_triton.register_fake(_fake.apply_penalties)
apply_token_bitmask_triton.register_fake(_fake.apply_token_bitmask)

_INTERPRETER = threading.RLock()
_DEPTH = threading.local()


def interpreter_guard(op: str, fn, ref):
    """Under TRITON_INTERPRET=1, launches of `fn` one at a time (the interpreter patches the global
    `triton.language` module for the length of a launch, so two at once break each other). A launch made
    while one is being interpreted in the same thread (a garbage-collection finalizer freeing blocks,
    say) runs `ref`, which computes the same result. Compiled Triton is left as it is."""
    if not triton_interpret():
        return fn

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        if getattr(_DEPTH, "n", 0):
            return ref(*args, **kwargs)
        with _INTERPRETER:
            _DEPTH.n = 1
            try:
                return fn(*args, **kwargs)
            finally:
                _DEPTH.n = 0
    return guarded


for _op, _fn in (("write_paged_kv", write_paged_kv_triton), ("reserve_paged_kv", reserve_paged_kv_triton),
                 ("rollback_paged_kv", rollback_paged_kv_triton), ("gather_paged_kv", gather_paged_kv_triton),
                 ("sample_draft", sample_draft_triton), ("verify_draft", verify_draft_triton),
                 ("apply_penalties", apply_penalties_triton), ("apply_token_bitmask", apply_token_bitmask_triton)):
    register(_op, "triton", interpreter_guard(_op, _fn, resolve(_op, torch.device("cpu"), "ref")))
