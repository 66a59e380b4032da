"""Decoding policies. A policy decides (how far to draft, when to fall back, how to verify);
the engine executes. Every policy is a frozen dataclass validated on construction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


class Policy:
    """Base: no small model, nothing drafted; the large model emits one token per pass."""

    name = "policy"
    uses_small = False  # the engine needs a small model
    drafts = False  # the small model drafts runs that the large model verifies
    verify_mode = "greedy"  # bild_kernels.ops.verify_draft mode ("greedy" samples the emitted token when T > 0)
    max_draft_len = 0
    fallback_threshold = 0.0
    rollback_threshold = 0.0


def _check_draft_len(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
        raise ValueError(f"max_draft_len must be an int in [1, 64], got {n!r}")


@dataclass(frozen=True)
class LargeOnly(Policy):
    """Plain autoregressive decoding with the large model (the baseline)."""

    name = "large-only"


@dataclass(frozen=True)
class SmallOnly(Policy):
    """Plain autoregressive decoding with the small model (the other baseline)."""

    name = "small-only"
    uses_small = True


@dataclass(frozen=True)
class BiLD(Policy):
    """Big Little Decoder (Kim et al. 2023). The small model drafts until its max probability drops
    below `fallback_threshold` (that unsure token is discarded) or `max_draft_len` tokens; the large
    model then rolls back at the first drafted token whose distance -log p_L exceeds
    `rollback_threshold` and is not its own choice. rollback_threshold -> 0 with greedy decoding
    reproduces the large model's greedy output."""

    fallback_threshold: float = 0.6
    rollback_threshold: float = 5.0
    max_draft_len: int = 10
    name = "bild"
    uses_small = True
    drafts = True
    verify_mode = "bild"

    def __post_init__(self):
        f, r = self.fallback_threshold, self.rollback_threshold
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise ValueError(f"fallback_threshold must be in [0, 1], got {f!r}")
        if isinstance(r, bool) or not isinstance(r, (int, float)) or math.isnan(r) or r < 0:
            raise ValueError(f"rollback_threshold must be >= 0, got {r!r}")
        _check_draft_len(self.max_draft_len)


@dataclass(frozen=True)
class Greedy(Policy):
    """Lossless greedy speculative decoding: drafts are kept while they equal the large model's argmax."""

    max_draft_len: int = 5
    name = "greedy"
    uses_small = True
    drafts = True
    verify_mode = "greedy"

    def __post_init__(self):
        _check_draft_len(self.max_draft_len)


@dataclass(frozen=True)
class SpeculativeSampling(Policy):
    """Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023): the output follows the
    large model's distribution exactly, at any temperature."""

    max_draft_len: int = 5
    name = "speculative-sampling"
    uses_small = True
    drafts = True
    verify_mode = "sample"

    def __post_init__(self):
        _check_draft_len(self.max_draft_len)
