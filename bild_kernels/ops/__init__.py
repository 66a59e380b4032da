"""Public kernel API. Each op validates its inputs, then runs on the chosen backend."""
from bild_kernels.ops.paged_kv import gather_paged_kv, reserve_paged_kv, rollback_paged_kv, write_paged_kv
from bild_kernels.ops.penalties import apply_penalties
from bild_kernels.ops.token_bitmask import apply_token_bitmask
from bild_kernels.ops.sampling import DraftSample, filtered_probs, known_row_kinds, pack_draft_probs, sample_draft
from bild_kernels.ops._validate import trusted_inputs
from bild_kernels.ops.verify import VerifyResult, verify_draft, verify_draft_cpu_trusted

__all__ = ["write_paged_kv", "reserve_paged_kv", "rollback_paged_kv", "gather_paged_kv", "sample_draft",
           "DraftSample", "filtered_probs", "known_row_kinds", "pack_draft_probs", "verify_draft", "VerifyResult",
           "trusted_inputs", "verify_draft_cpu_trusted", "apply_penalties", "apply_token_bitmask"]
