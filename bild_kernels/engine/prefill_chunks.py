"""Chunked prefill (`Engine(prefill_chunk=...)`): a prompt longer than one chunk goes through its model a chunk at a
time, one chunk a step, while the rest of the running batch drafts, verifies and streams as before. A running
request then waits at most one chunk's pass a step for a newcomer, not the whole of a long prompt's.

A row whose prompt still holds more than one chunk sits out its group's draft and verification. Each step, the first
such row (in admission order) sends its next `prefill_chunk` prompt tokens through the model that will verify (the
large one; the small one for SmallOnly), keeping what that model's first pass would have kept of those positions (a
feature draft's hidden states, the prefix cache's copy of them, prompt log-probabilities); a layer draft catches up on
the same tokens in the same step. Once one chunk or less is left, the row joins the next step as any new request does:
its first verification pass takes the rest of its prompt and emits its first token. A chunk's positions attend to the
cached ones exactly as a prefix copied from the prefix cache does, so where that changes nothing but the time
(`LlamaExecutor.rows_independent`), chunking does not either; elsewhere float32 / bf16 products may round a chunked
row differently from the whole prompt's pass. ShallowDeep prefills its prompts whole (its two layer groups cache
apart).
"""
from __future__ import annotations

import time

from bild_kernels.engine.logprobs import note_prompt_logprobs
from bild_kernels.engine.policies import Policy
from bild_kernels.engine.sequence import Sequence

PREFILL_CHUNK_AUTO_TOKENS = 256


class PrefillChunks:
    """Engine methods (mixed into `Iteration`) that split long prompts' prefills over steps."""

    @staticmethod
    def _prefills_small(policy: Policy) -> bool:
        return policy.uses_small and not policy.drafts  # SmallOnly: the small model decides every token

    def _prefilling(self, s: Sequence, policy: Policy) -> bool:
        """Whether row s still has more than one chunk of its prompt to go through before its first pass."""
        chunk = self.prefill_chunk
        if not chunk or policy.drafter == "shallow":
            return False
        if self._prefills_small(policy):
            return s.metrics.small_steps == 0 and len(s.tokens) - s.cached["small"] > chunk
        return s.metrics.large_passes == 0 and len(s.tokens) - s.cached["large"] > chunk

    def _prefill_chunk(self, s: Sequence, policy: Policy) -> None:
        """The next chunk of row s's prompt through its model(s), keeping what its first pass would keep."""
        chunk, t0 = self.prefill_chunk, time.perf_counter()
        if self._prefills_small(policy):
            start = s.cached["small"]
            self.runners["small"].extend([s.row], [s.tokens[start:start + chunk]], [1])
            s.cached["small"] = start + chunk
        else:
            start = s.cached["large"]
            scored = s.params.prompt_logprobs is not None
            keeps = self._keeps_features(policy)  # a feature draft reads every verified position's hidden state
            kept = self._keeps_prompt_features(policy)
            out = self.runners["large"].extend([s.row], [s.tokens[start:start + chunk]], [chunk if scored else 1],
                                               return_hidden=keeps or kept)
            logits, hidden = out if keeps or kept else (out, None)
            if keeps:
                s.features.append(hidden[0])
            if kept:
                s.prompt_features = (s.prompt_features or []) + [hidden[0]]
            if scored:
                note_prompt_logprobs(s, logits[0], start)
            s.cached["large"] = start + chunk
            if policy.drafter == "small" and self.small_kind != "feature" and s.cached["small"] < start + chunk:
                # (a layer draft would otherwise catch up on the whole prompt at its first draft)
                self.runners["small"].extend([s.row], [s.tokens[s.cached["small"]:start + chunk]], [1])
                s.cached["small"] = start + chunk
        s.metrics.prefill_chunks += 1
        self.time_split["verify"] += time.perf_counter() - t0
