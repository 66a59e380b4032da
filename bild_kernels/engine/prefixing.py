"""Prefix caching in the engine (mixed into `Engine`): which requests the cache serves, what a new request copies from
it at admission, and what a request leaves in it after its first pass and its draft's first run. The cache itself is
`bild_kernels.engine.prefix_cache`."""
from __future__ import annotations

import torch

from bild_kernels.engine.policies import Policy
from bild_kernels.engine.prefix_cache import PrefixEntry
from bild_kernels.engine.sequence import Sequence

# Engine(prefix_cache="auto")'s budget where it is on: prompt positions kept (~190 MB for the default pair's 30 layers
# of float32 keys and values, a quarter of its default KV pool; ~60 of its chat prompts)
PREFIX_CACHE_AUTO_TOKENS = 4096


class Prefixing:
    """Engine methods of prefix caching (the engine's `prefix_cache`, `runners`, `small_kind` and `_prefix_small`)."""

    def _prefix_applies(self, policy: Policy) -> bool:
        """Whether the prefix cache serves this policy's requests: every one the large model prefills, but
        shallow-deep decoding's (its layer groups cache apart) and the small model's alone."""
        return (self.prefix_cache is not None and policy.drafter != "shallow"
                and not (policy.uses_small and not policy.drafts))

    def _keeps_prompt_features(self, policy: Policy) -> bool:
        """Whether a prompt's first passes keep the large model's hidden states of its positions for the prefix cache
        (a feature draft's engine, for the feature draft of a later request that shares the prompt)."""
        return self.small_kind == "feature" and self._prefix_applies(policy)

    def _prefix_restore(self, seq: Sequence, policy: Policy) -> None:
        """At admission (the row holds nothing yet): copy the longest kept prefix of the prompt into the large
        model's cache; the first pass then prefills only the rest (of a preempted request: the rest of its tokens)."""
        if not self._prefix_applies(policy) or seq.params.prompt_logprobs is not None:  # (its prefill scores it)
            return
        keeps = self._keeps_features(policy)
        entry, n = self.prefix_cache.match(seq.tokens[:seq.prompt_len], need_features=keeps)
        if entry is None:
            return
        self.runners["large"].write_kv(seq.row, entry.kv, n)
        seq.cached["large"] = n
        first = seq.metrics.large_passes == 0  # (else a preempted request's recomputation, its prompt long kept)
        if first:
            seq.metrics.cached_prompt_tokens = n
        if entry.features is not None:
            if first:
                seq.prompt_features = [entry.features[:n]]
            m = 0  # the feature draft's own positions restored too (position t reads token t + 1: n - 1 at most)
            if keeps and entry.small_kv is not None and self._prefix_small:
                m = min(n - 1, entry.small_kv.shape[2])
                if m > 0:
                    self.runners["small"].write_kv(seq.row, entry.small_kv, m)
                    seq.cached["small"] = m
            if keeps:  # the draft is fed the restored positions' hidden states it has not seen, like computed ones
                seq.features = [entry.features[m:n].to(self.device)]

    def _prefix_store(self, seq: Sequence, policy: Policy) -> None:
        """After a request's first pass (its prompt's positions all cached and final): keep them; after the feature
        draft's first run over them, its own keys and values too."""
        if not self._prefix_applies(policy):
            return
        P = seq.prompt_len
        if (not seq.small_kept and P > 1 and seq.cached["small"] >= P - 1 and self._prefix_small
                and self._keeps_features(policy)):
            seq.small_kept = True
            self.prefix_cache.attach_small(seq.tokens[:P], self.runners["small"].read_kv(seq.row, P - 1))
        if seq.metrics.large_passes != 1:
            return
        feats, seq.prompt_features = seq.prompt_features, None
        if self.small_kind == "feature":  # every first pass of such an engine keeps them (`_target_logits`)
            feats = torch.cat(feats) if feats else None
            if feats is None or feats.shape[0] != P:  # an engine bug, not a user error
                raise RuntimeError(f"prefix cache: {0 if feats is None else feats.shape[0]} hidden states kept for "
                                   f"a prompt of {P} tokens")
        else:
            feats = None
        self.prefix_cache.insert(seq.tokens[:P], PrefixEntry(self.runners["large"].read_kv(seq.row, P), feats))
