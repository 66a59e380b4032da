"""SamplingParams.structured_outputs, allowed_token_ids and bad_words in the engine: each request's `Guide`, its
token masks on a verification pass's logits (`ops.apply_token_bitmask`: the large model's distribution, the one every
policy keeps to), and its drafts cut at the first token the pattern (or the rules) does not allow."""
from __future__ import annotations

import threading

import numpy as np
import torch

from bild_kernels import ops
from bild_kernels.engine.params import SamplingParams
from bild_kernels.engine.sequence import Drafts, Sequence
from bild_kernels.structured import THINK_TAGS, dfa
from bild_kernels.structured.guide import Guide, TokenRules, Vocabulary, token_texts

_VOCAB_LOCK = threading.Lock()


def make_guide(engine, params: SamplingParams, tok_lock) -> tuple[Guide | None, str | None]:
    """(the request's Guide, None), (None, None) without structured_outputs, allowed_token_ids or bad_words, or
    (None, why) when it cannot have one. The first structured request builds the engine's token texts (under the
    tokenizer's lock); a pattern's grammar is built once and cached."""
    if not params.guided:
        return None, None
    grammar = rules = think = None
    ends = set(engine.eos_ids) | {t for t in params.stop if isinstance(t, int)}
    so = params.structured_outputs
    if so is not None:
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
        if not ends:
            return None, "structured_outputs need an end-of-sequence token (the model's config names none)"
        if so.reasoning is not None:
            with _VOCAB_LOCK:  # (the tags' ids, once an engine, as its token texts)
                tags = getattr(engine, "_think_ids", None)
                if tags is None:
                    with tok_lock:
                        tags = [engine.tokenizer.encode(t, add_special_tokens=False) for t in THINK_TAGS]
                    engine._think_ids = tags
            if any(len(ids) != 1 for ids in tags):
                return None, (f"structured_outputs.reasoning needs {' and '.join(THINK_TAGS)} to be tokens of the "
                              f"tokenizer's own (they make {tags})")
            think = (so.reasoning, tags[0][0], tags[1][0])
    if params.allowed_token_ids is not None or params.bad_words:
        allowed = params.allowed_token_ids
        if allowed is not None and max(allowed) >= engine.vocab_size:
            return None, (f"allowed_token_ids names token id {max(allowed)}, outside the vocabulary "
                          f"[0, {engine.vocab_size})")
        bad = []
        if params.bad_words:
            if engine.tokenizer is None:
                return None, "bad_words need the engine's tokenizer (to find the words' tokens)"
            with tok_lock:
                bad = bad_word_ids(engine.tokenizer, params.bad_words)
        rules = TokenRules(engine.vocab_size, allowed, bad)
    return Guide(grammar, ends, rules, think), None


def bad_word_ids(tokenizer, words) -> list[tuple[int, ...]]:
    """Each bad word's token sequences, by vLLM's rule: the word (leading spaces stripped), and the word after a space
    where that makes another first token in as many tokens (a word inside a sentence)."""
    out = []
    for word in words:
        plain = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        found = [plain]
        if spaced and plain and spaced[0] != plain[0] and len(spaced) == len(plain):
            found.append(spaced)
        out += [ids for ids in found if ids and ids not in out]
    return out


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


def cut_drafts(seqs: list[Sequence], out: Drafts) -> Drafts:
    """Each guided row's drafts (and their distributions and confidences) cut before the first token its pattern does
    not allow: what the eager loop stops at, for the loops that run without the host."""
    for i, s in enumerate(seqs):
        if s.guide is not None and out.tokens[i]:
            keep = s.guide.allowed_prefix(out.tokens[i])
            del out.tokens[i][keep:]
            if out.probs is not None and out.probs[i]:
                del out.probs[i][keep:]
            if out.confidences is not None and out.confidences[i]:
                del out.confidences[i][keep:]
    return out
