"""Prompt prefix caching: the large model's KV of prompts it has prefilled, reused by later prompts that begin alike.

A service's requests share their openings (a system prompt, a chat template, a few-shot preamble), and on a CPU a
prefill is compute-bound: ~0.8 ms a token for the default pair, most of a short request's time to first token. The
cache keeps, for recent prompts, a copy of the large model's keys and values at every prompt position (and, with a
feature draft, the large model's last hidden state there, which the draft reads, and the draft's own keys and values
of the prompt once a draft run has computed them); a new request whose prompt shares its first n tokens with a kept
one gets those n positions copied into its own blocks at admission (the draft's first n - 1) and prefills only the
rest.

Copies, not shared blocks: every block still belongs to exactly one sequence (the allocator's invariant, and the
rollback op's semantics, stay as they are), and the cache lives outside the KV pool, within its own token budget
(least recently used prompts go first). A copy is a memory move of ~46 KB a token for the default pair (30 layers,
3 KV heads of 64, float32), against ~0.8 ms of compute a token.

The positions copied hold the same values a prefill would have written (a position's keys and values depend only
on the tokens up to it), so a request gives the same tokens with or without a hit wherever the large model's
kernels compute each row independently of the others in its pass: float64 everywhere, and the CPU's packed
integer kernels; float32 / bfloat16 products elsewhere may round a row differently in a shorter pass.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class PrefixEntry:
    kv: torch.Tensor  # [layers, 2, n, H_kv, D]: the large model's keys and values at positions 0 .. n - 1
    features: torch.Tensor | None  # [n, H]: its last hidden states there (a feature draft's inputs), or None
    # a feature draft's own keys and values [layers, 2, n - 1, H_kv, D] at positions 0 .. n - 2 (position t reads
    # feature t and token t + 1: those the prompt alone decides), once a draft run has computed them; else None
    small_kv: torch.Tensor | None = None


class PrefixCache:
    """Kept prompts, by their token ids, within `max_tokens` positions in all; least recently used out first.
    Safe to call from any thread (the engine's stepping thread matches and inserts while a caller may clear)."""

    def __init__(self, max_tokens: int):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"prefix cache max_tokens must be a positive int, got {max_tokens!r}")
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[int, ...], PrefixEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.tokens = 0  # positions held
        self.queries = self.hits = self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, prompt: list[int], *, need_features: bool = False) -> tuple[PrefixEntry | None, int]:
        """The kept prompt sharing the longest prefix with `prompt`, and that prefix's length (at most
        len(prompt) - 1: the last token always runs, for its logits). (None, 0) when none shares a token.
        need_features: only entries that carry the hidden states."""
        with self._lock:
            return self._match(prompt, need_features)

    def _match(self, prompt, need_features):
        self.queries += 1
        best, best_n, cap = None, 0, len(prompt) - 1
        for key, entry in self._entries.items():
            if need_features and entry.features is None:
                continue
            n = _common_prefix(key, prompt, cap)
            if n > best_n:
                best, best_n = key, n
        if best is None:
            return None, 0
        self._entries.move_to_end(best)
        self.hits += 1
        self.hit_tokens += best_n
        return self._entries[best], best_n

    def insert(self, prompt: list[int], entry: PrefixEntry) -> None:
        """Keep `prompt`'s positions (in place of its earlier entry, if kept), evicting the least recently used
        prompts past the budget. A prompt longer than the whole budget is not kept. (A kept prompt that begins
        another stays kept beside it: a cache that a prompt's own entry can be dropped from, as `bild eval`
        drops it, then still holds the others' as they were.)"""
        n = entry.kv.shape[2]
        if n != len(prompt) or (entry.features is not None and entry.features.shape[0] != n):
            raise ValueError(f"prefix entry holds {n} positions for a prompt of {len(prompt)} tokens")
        if n > self.max_tokens:
            return
        with self._lock:
            self._insert(tuple(prompt), entry, n)

    def _insert(self, key, entry, n):
        if key in self._entries:
            self._drop(key)
        self._entries[key] = entry
        self.tokens += n
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self._entries)))

    def attach_small(self, prompt: list[int], small_kv: torch.Tensor) -> bool:
        """Add a feature draft's keys and values to `prompt`'s entry (kept as is, and without them yet); True if
        they were added."""
        with self._lock:
            entry = self._entries.get(tuple(prompt))
            if entry is None or entry.small_kv is not None or entry.features is None:
                return False
            if small_kv.shape[2] != entry.kv.shape[2] - 1:
                raise ValueError(f"a feature draft's prefix holds {small_kv.shape[2]} positions for a prompt of "
                                 f"{entry.kv.shape[2]} tokens (it should hold one fewer)")
            entry.small_kv = small_kv
            return True

    def discard(self, prompt: list[int]) -> bool:
        """Forget `prompt` if it is kept (as is); True if it was."""
        key = tuple(prompt)
        with self._lock:
            if key not in self._entries:
                return False
            self._drop(key)
            return True

    def clear(self) -> None:
        with self._lock:
            for k in list(self._entries):
                self._drop(k)

    def _drop(self, key: tuple[int, ...]) -> None:
        self.tokens -= len(key)
        del self._entries[key]


def _common_prefix(a, b, cap: int) -> int:
    n = min(len(a), len(b), cap)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
