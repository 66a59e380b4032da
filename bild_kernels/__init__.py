"""bild-kernels: big-little speculative decoding on fused CUDA/Triton kernels."""
from bild_kernels._backend import backends
from bild_kernels.ops import (DraftSample, VerifyResult, gather_paged_kv, reserve_paged_kv, rollback_paged_kv,
                              sample_draft, verify_draft, write_paged_kv)

__version__ = "0.1.0"
__all__ = ["backends", "write_paged_kv", "reserve_paged_kv", "rollback_paged_kv", "gather_paged_kv",
           "sample_draft", "DraftSample", "verify_draft", "VerifyResult"]
