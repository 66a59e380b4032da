"""bild-kernels: big-little speculative decoding on fused CUDA/Triton kernels."""
from bild_kernels._backend import backends, cuda_cut_search, cuda_first_pass, cuda_fused_tail
from bild_kernels.ops import (DraftSample, VerifyResult, apply_penalties, apply_token_bitmask, gather_paged_kv,
                              reserve_paged_kv, rollback_paged_kv, sample_draft, verify_draft, write_paged_kv)

__version__ = "0.1.0"

_ENGINE_NAMES = {"Engine": "engine", "SamplingParams": "params", "RequestOutput": "sequence",
                 "RequestMetrics": "sequence", "StreamChunk": "sequence", "Policy": "policies", "BiLD": "policies",
                 "Greedy": "policies", "SpeculativeSampling": "policies", "LargeOnly": "policies",
                 "SmallOnly": "policies", "Jacobi": "policies", "ShallowDeep": "policies", "NGram": "policies",
                 "BatchGenerator": "bulk", "StructuredOutputs": "params"}


def __getattr__(name):
    # The engine pulls in the model code (and transformers when loading); kernel users need neither.
    if name in _ENGINE_NAMES:
        import importlib
        return getattr(importlib.import_module(f"bild_kernels.engine.{_ENGINE_NAMES[name]}"), name)
    raise AttributeError(f"module 'bild_kernels' has no attribute {name!r}")


__all__ = ["backends", "cuda_cut_search", "cuda_first_pass", "cuda_fused_tail", "write_paged_kv", "reserve_paged_kv", "rollback_paged_kv", "gather_paged_kv",
           "sample_draft", "DraftSample", "verify_draft", "VerifyResult", "apply_penalties", "apply_token_bitmask",
           *_ENGINE_NAMES]
