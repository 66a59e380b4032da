"""Registers the compiled kernels of bild_kernels._C (csrc/) as the "cuda" backend.

Importing bild_kernels._C defines the torch ops `torch.ops.bild_kernels_C.*` (schemas in
csrc/bindings.cpp, positional arguments as the reference functions). Here they get fake
implementations, so that they trace through torch.compile and record into CUDA graphs like any aten
op, and are entered in the backend table. On CPU tensors the ops raise a RuntimeError that names the
backends that do run there.
"""
from __future__ import annotations

import torch

import bild_kernels._C  # noqa: F401  (registers the torch.ops.bild_kernels_C ops)
from bild_kernels._backend import register
from bild_kernels.ops import _fake

_OPS = ("write_paged_kv", "reserve_paged_kv", "rollback_paged_kv", "gather_paged_kv", "sample_draft", "verify_draft",
        "apply_penalties", "apply_token_bitmask")


def _mutating_fake(*args) -> None:
    # The in-place ops return nothing; their fake only has to exist for tracing.
    return None


torch.library.register_fake("bild_kernels_C::gather_paged_kv")(_fake.gather_paged_kv)
torch.library.register_fake("bild_kernels_C::sample_draft")(_fake.sample_draft)
torch.library.register_fake("bild_kernels_C::verify_draft")(_fake.verify_draft)
torch.library.register_fake("bild_kernels_C::apply_penalties")(_fake.apply_penalties)
torch.library.register_fake("bild_kernels_C::apply_token_bitmask")(_fake.apply_token_bitmask)
for _op in ("write_paged_kv", "reserve_paged_kv", "rollback_paged_kv"):
    torch.library.register_fake(f"bild_kernels_C::{_op}")(_mutating_fake)

for _op in _OPS:
    register(_op, "cuda", getattr(torch.ops.bild_kernels_C, _op))
