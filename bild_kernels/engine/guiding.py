"""SamplingParams.structured_outputs in the engine: each request's `Guide`, and its token masks on a pass's logits
(`ops.apply_token_bitmask`) for the verification (the large model's distribution, the one every policy keeps to)
and for the drafts (the small model's, so that it proposes what the constrained large model keeps)."""
from __future__ import annotations

import threading

import numpy as np
import torch

from bild_kernels import ops
from bild_kernels.engine.params import SamplingParams
from bild_kernels.engine.sequence import Sequence
from bild_kernels.structured import dfa
from bild_kernels.structured.guide import Guide, Vocabulary, token_texts

_VOCAB_LOCK = threading.Lock()


def make_guide(engine, params: SamplingParams, tok_lock) -> tuple[Guide | None, str | None]:
    """(the request's Guide, None), (None, None) without structured_outputs, or (None, why) when it cannot have one.
    The first request builds the engine's token texts (under the tokenizer's lock); a pattern's grammar is built
    once and cached."""
    so = params.structured_outputs
    if so is None:
        return None, None
    if engine.tokenizer is None:
        return None, "structured_outputs need the engine's tokenizer (a token's text decides what it may be)"
    with _VOCAB_LOCK:
        vocab = getattr(engine, "_structured_vocab", None)
        if vocab is None:
            with tok_lock:
                vocab = Vocabulary(token_texts(engine.tokenizer, engine.vocab_size))
            engine._structured_vocab = vocab
    pattern = so.pattern()
    grammar = vocab.grammar(pattern, lambda: dfa(pattern))
    if grammar.start == 0:
        return None, "structured_outputs: the pattern matches no text"
    ends = set(engine.eos_ids) | {t for t in params.stop if isinstance(t, int)}
    if not ends:
        return None, "structured_outputs need an end-of-sequence token (the model's config names none)"
    return Guide(grammar, ends), None


def guided(logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]]) -> torch.Tensor:
    """logits [B, P, V] of a verification pass with each guided row's masks: at position p, the state after its
    first p drafted tokens. `logits` itself when no row is guided."""
    if not any(s.guide is not None for s in seqs):
        return logits
    B, P, V = logits.shape
    bits = np.full((B, P, -(-V // 32)), -1, dtype=np.int32)
    for i, (s, d) in enumerate(zip(seqs, drafts)):
        if s.guide is not None:
            bits[i] = s.guide.masks_along(d, P)
    return ops.apply_token_bitmask(logits, torch.from_numpy(bits).to(logits.device, non_blocking=True))


def guided_drafts(logits: torch.Tensor, seqs: list[Sequence], drafted: list[list[int]],
                  head_vocab: torch.Tensor | None) -> tuple[torch.Tensor, list[bool]]:
    """A draft step's logits [n, 1, V'] masked for each guided row at the state after what it drafted so far
    (head_vocab: the ids of the V' columns when the logits score a reduced head), and per row whether any token is
    left (a row with none must stop drafting; its logits stay as they were)."""
    if not any(s.guide is not None for s in seqs):
        return logits, [True] * len(seqs)
    n, P, Vc = logits.shape
    words = -(-Vc // 32)
    bits = np.full((n, P, words), -1, dtype=np.int32)
    alive = [True] * n
    cols = None if head_vocab is None else head_vocab.cpu().numpy()
    for i, (s, d) in enumerate(zip(seqs, drafted)):
        g = s.guide
        if g is None:
            continue
        state = g.state_after(d)
        full = g.mask(state) if state else np.zeros(g.grammar.vocab.words, dtype=np.int32)
        if cols is not None:
            allowed = np.unpackbits(full.view(np.uint8), bitorder="little")[cols].astype(bool)
            packed = np.packbits(allowed, bitorder="little")
            row = np.zeros(words * 4, dtype=np.uint8)
            row[:packed.size] = packed
            full = row.view("<u4").astype(np.uint32).view(np.int32)
        alive[i] = bool(state) and bool(full.any())
        if alive[i]:  # (a row with nothing left keeps its logits: its token is dropped, and no row is all -inf)
            bits[i, :] = full
    return ops.apply_token_bitmask(logits, torch.from_numpy(bits).to(logits.device, non_blocking=True)), alive
