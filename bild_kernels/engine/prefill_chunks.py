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

The same passes rebuild a preempted request's caches (`Engine(preemption="recompute")`): once re-admitted, its tokens
but the last go through (a chunk a step where prefill_chunk is set, else in one pass) before it steps on, so that it
then drafts and verifies as it would have (a feature draft fed every position's hidden state again).
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
        """Whether row s still has more than one chunk of its prompt to go through before its first pass, or (a
        preempted request, re-admitted) tokens to recompute before it steps on."""
        if policy.drafter == "shallow":  # (its layer groups catch up within the step)
            return False
        model = "small" if self._prefills_small(policy) else "large"
        if s.resumed:
            return s.cached[model] < len(s.tokens) - 1
        chunk = self.prefill_chunk
        if not chunk:
            return False
        first = s.metrics.small_steps == 0 if model == "small" else s.metrics.large_passes == 0
        return first and len(s.tokens) - s.cached[model] > chunk

    def _prefill_chunk(self, s: Sequence, policy: Policy) -> None:
        """The next chunk of row s's prompt through its model(s), keeping what its first pass would keep; of a
        preempted request, its tokens but the last (in chunks where prefill_chunk is set): the caches as its last step
        left them, the feature draft's features included, so that it then drafts and steps as it would have."""
        t0 = time.perf_counter()
        model = "small" if self._prefills_small(policy) else "large"
        start = s.cached[model]
        chunk = (min(self.prefill_chunk or len(s.tokens), len(s.tokens) - 1 - start) if s.resumed
                 else self.prefill_chunk)
        if model == "small":
            self.runners["small"].extend([s.row], [s.tokens[start:start + chunk]], [1])
            s.cached["small"] = start + chunk
        else:
            first = s.metrics.large_passes == 0  # (not a preempted request's recomputation)
            scored = s.params.prompt_logprobs is not None and first
            keeps = self._keeps_features(policy)  # a feature draft reads every verified position's hidden state
            kept = self._keeps_prompt_features(policy) and first
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
        if not s.resumed:
            s.metrics.prefill_chunks += 1
        self.time_split["verify"] += time.perf_counter() - t0
