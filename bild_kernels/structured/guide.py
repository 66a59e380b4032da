"""Which tokens keep a request's output on its pattern: the regex's DFA walked over every token's text at once.

A `Vocabulary` holds each token's text as code points (once per tokenizer), sorted longest first. A `Grammar`
(one per pattern, cached) classifies them by its DFA's character classes and answers, for a DFA state, the bitmask
of tokens whose whole text keeps the state alive: `ops.apply_token_bitmask`'s input, computed by walking all tokens
one character position at a time (numpy: a gather per position over the tokens still that long), then cached.
A `Guide` is one request's cursor on a grammar: its state after the committed output, advanced token by token.

A token's text is what it adds to the text after another token (`decode([a, t])` less `decode([a])`), so
SentencePiece's leading spaces count. Tokens whose text is empty, not whole characters (a piece of a multi-byte
character: U+FFFD), or special are never allowed inside the pattern; the end-of-sequence ids (and the request's stop
ids) are allowed exactly where the pattern may end. Where no token can continue a pattern that cannot end yet (its
next character is in no token), the end-of-sequence ids are allowed, so the request ends instead of stalling.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

from bild_kernels.reference.token_bitmask import pack_token_bitmask
from bild_kernels.structured.regex import RegexDFA

CACHE_SIZE = 32  # grammars kept per vocabulary


def token_texts(tokenizer, vocab_size: int) -> list[str | None]:
    """Each token id's text as it reads after another token; None where it cannot be part of a pattern."""
    n = min(len(tokenizer), vocab_size)
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"]
    anchor = anchor[-1:] if anchor else [0]
    base = tokenizer.decode(anchor)
    pairs = tokenizer.batch_decode([anchor + [t] for t in range(n)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, tok in added.items() if getattr(tok, "special", False)}
    out: list[str | None] = []
    for t, text in enumerate(pairs):
        s = text[len(base):] if text.startswith(base) else None
        out.append(None if t in special or not s or "\ufffd" in s else s)
    return out + [None] * (vocab_size - n)


class Vocabulary:
    """Token texts as code points [V, L] (longest first; -1 pads), for every grammar over one tokenizer."""

    def __init__(self, texts: list[str | None]):
        self.size = len(texts)
        self.words = -(-self.size // 32)
        lengths = np.array([len(s) if s else 0 for s in texts], dtype=np.int64)
        self.order = np.argsort(-lengths, kind="stable")  # longest first
        self.lengths = lengths[self.order]
        L = int(self.lengths[0]) if self.size else 0
        codes = np.full((self.size, max(L, 1)), -1, dtype=np.int32)
        for row, t in enumerate(self.order.tolist()):
            s = texts[t]
            if s:
                codes[row, :len(s)] = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32)
        self.codes = codes
        self.valid = self.lengths > 0
        self.rank = np.empty(self.size, dtype=np.int64)  # token id -> its row
        self.rank[self.order] = np.arange(self.size)
        # active[j]: how many rows are longer than j (they come first)
        self.active = np.searchsorted(-self.lengths, -np.arange(L + 1), side="left").tolist()
        self.grammars: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def grammar(self, key, build) -> "Grammar":
        """The cached grammar for `key`, made by build() -> RegexDFA on a miss."""
        with self.lock:
            g = self.grammars.get(key)
            if g is not None:
                self.grammars.move_to_end(key)
                return g
        g = Grammar(build(), self)  # (outside the lock: a large pattern takes a while)
        with self.lock:
            self.grammars[key] = g
            while len(self.grammars) > CACHE_SIZE:
                self.grammars.popitem(last=False)
        return g


class Grammar:
    """A DFA over one vocabulary: per-state token bitmasks (cached) and per-token steps."""

    def __init__(self, dfa: RegexDFA, vocab: Vocabulary):
        self.dfa, self.vocab = dfa, vocab
        pad = dfa.pad_class
        classes = dfa.alphabet.classify(np.maximum(vocab.codes, 0).astype(np.int64))
        dtype = np.uint8 if pad < 255 else np.int32
        self.classes = np.where(vocab.codes >= 0, classes, pad).astype(dtype)  # [V, L]
        self._masks: dict[int, tuple[np.ndarray, bool]] = {}
        self.lock = threading.Lock()

    @property
    def start(self) -> int:
        return self.dfa.start

    def accepting(self, state: int) -> bool:
        return bool(self.dfa.accepting[state])

    def step(self, state: int, token: int) -> int:
        """The state after token's text (0: dead; also for a token that is never allowed)."""
        v = self.vocab
        if not 0 <= token < v.size or state == 0:
            return 0
        row = int(v.rank[token])
        n = int(v.lengths[row])
        if n == 0:
            return 0
        trans = self.dfa.transitions
        for c in self.classes[row, :n].tolist():
            state = int(trans[state, c])
            if state == 0:
                return 0
        return state

    def allowed(self, state: int) -> tuple[np.ndarray, bool]:
        """(int32 bitmask [ceil(V / 32)] of the tokens whose text keeps `state` alive, whether any does)."""
        with self.lock:
            hit = self._masks.get(state)
        if hit is not None:
            return hit
        v = self.vocab
        cur = np.full(v.size, state, dtype=np.int32)
        trans = self.dfa.transitions
        for j in range(self.classes.shape[1]):
            n = v.active[j]
            if n == 0:
                break
            cur[:n] = trans[cur[:n], self.classes[:n, j]]
        alive = (cur != 0) & v.valid
        allowed = np.zeros(v.size, dtype=bool)
        allowed[v.order] = alive
        out = (pack_token_bitmask(torch.from_numpy(allowed)).numpy(), bool(alive.any()))
        with self.lock:
            self._masks[state] = out
        return out


class TokenRules:
    """SamplingParams' allowed_token_ids and bad words as rules over token ids (vLLM's): only the allowed ids (all when
    None), and never the last token of a bad word's token sequence where the output's last tokens are the rest of it.
    Where the bad words would leave nothing allowed, they give way (the allowed ids stay)."""

    def __init__(self, size: int, allowed=None, bad=()):
        self.size = size
        ok = np.zeros(size, dtype=bool)
        if allowed is None:
            ok[:] = True
        else:
            ok[[t for t in allowed if 0 <= t < size]] = True
        self.allowed = _pack(ok)
        self.banned: dict[tuple[int, ...], list[int]] = {}  # the tokens before -> the last tokens banned after them
        for seq in bad:
            if seq and 0 <= seq[-1] < size:
                self.banned.setdefault(tuple(seq[:-1]), []).append(seq[-1])
        self.depth = max((len(k) for k in self.banned), default=0)  # output tokens a state keeps
        self.lengths = sorted({len(k) for k in self.banned})
        base = ok.copy()
        base[self.banned.get((), [])] = False
        self.base = _pack(base) if base.any() else self.allowed

    @property
    def start(self) -> tuple[int, ...]:
        return ()

    def step(self, tail: tuple[int, ...], token: int) -> tuple[int, ...]:
        return (tail + (token,))[-self.depth:] if self.depth else ()

    def mask(self, tail: tuple[int, ...]) -> np.ndarray:
        bits = self.base
        for n in self.lengths:
            last = self.banned.get(tail[len(tail) - n:]) if 0 < n <= len(tail) else None
            if last:
                bits = bits.copy()
                for t in last:
                    bits[t // 32] &= ~_bit(t)
        return bits if bits.any() else self.allowed


# A reasoning reply's phases under its grammar (Guide's `think`): "start" (it may open a <think> or begin its answer),
# "think" (free until its </think>), "answer" (held to the grammar).
START, THINK, ANSWER = 0, 1, 2


class Guide:
    """One request's position in its grammar and its token rules (either may be None): the state after its committed
    output tokens. With `think` = (mode, open id, close id), a reasoning model's thinking goes free of the grammar
    (the token rules still hold) and the grammar holds its answer after the close id: mode "deepseek_r1" thinks from
    the first token (its template opened the <think>), "qwen3" thinks only where the reply opens with the open id and
    otherwise holds its first token to the grammar (thinking turned off)."""

    def __init__(self, grammar: Grammar | None, end_ids: set[int], rules: TokenRules | None = None,
                 think: tuple[str, int, int] | None = None):
        if grammar is None and rules is None:
            raise ValueError("a Guide needs a grammar or token rules")
        self.grammar, self.rules, self.think = grammar, rules, think if grammar is not None else None
        size = grammar.vocab.size if grammar is not None else rules.size
        self.words = -(-size // 32)
        self.end_ids = sorted(t for t in end_ids if 0 <= t < size)
        phase = ANSWER if self.think is None else THINK if self.think[0] == "deepseek_r1" else START
        self.free = np.full(self.words, -1, dtype=np.int32) if self.think is not None else None  # (thinking's mask)
        self.state = (grammar.start if grammar is not None else 1, rules.start if rules is not None else (), phase)

    def copy(self) -> "Guide":
        """A new cursor on the same grammar and rules, at their start."""
        return Guide(self.grammar, set(self.end_ids), self.rules, self.think)

    def _step(self, state: tuple, token: int) -> tuple:
        g, tail, phase = state
        tail = self.rules.step(tail, token) if self.rules is not None else tail
        if phase == THINK:
            return g, tail, ANSWER if token == self.think[2] else THINK
        if phase == START and token == self.think[1]:
            return g, tail, THINK
        return self.grammar.step(g, token) if self.grammar is not None else g, tail, ANSWER

    def advance(self, tokens: list[int]) -> None:
        for t in tokens:
            if t in self.end_ids:
                return
            self.state = self._step(self.state, t)

    def mask(self, state: tuple) -> np.ndarray:
        """The bitmask of the tokens allowed in `state`: those that keep the grammar alive and pass the rules, and the
        end ids where the pattern may end (or where nothing can continue it)."""
        g, tail, phase = state
        bits, may_end = None, False
        if phase == THINK:  # (free, the end ids included)
            bits = self.free
        elif self.grammar is not None:
            bits, alive = self.grammar.allowed(g)
            may_end = self.grammar.accepting(g) or not alive
            if phase == START:  # (or it opens its thinking)
                bits = bits.copy()
                bits[self.think[1] // 32] |= _bit(self.think[1])
        if self.rules is not None:
            rule = self.rules.mask(tail)
            bits = rule if bits is None else bits & rule
            may_end = phase == THINK or may_end or (self.grammar is not None and not bits.any())
        if self.end_ids and may_end:
            bits = bits.copy()
            for t in self.end_ids:
                bits[t // 32] |= _bit(t)
        return bits

    def _walk(self, draft: list[int]) -> tuple[list[np.ndarray], int]:
        """(the masks at the output's state and after each of `draft`'s first tokens the pattern allows, how many it
        allows in a row): one mask more than tokens allowed, unless the last allowed one ends the text (an end id)."""
        masks, state = [], self.state
        for n, t in enumerate(draft):
            masks.append(self.mask(state))
            if not _is_set(masks[-1], t):
                return masks, n
            if t in self.end_ids:
                return masks, n + 1
            state = self._step(state, t)  # (alive: the mask allowed it)
        masks.append(self.mask(state))
        return masks, len(draft)

    def masks_along(self, draft: list[int], positions: int) -> np.ndarray:
        """int32 [positions, W]: the masks at the guide's state and after each prefix of `draft` (positions past
        the draft, and past a draft token the pattern does not allow, are left all set: the verification cuts
        before them)."""
        out = np.full((positions, self.words), -1, dtype=np.int32)
        masks = self._walk(draft)[0][:positions]
        out[:len(masks)] = masks
        return out

    def allowed_prefix(self, draft: list[int]) -> int:
        """How many of `draft`'s first tokens the pattern allows in a row after the output."""
        return self._walk(draft)[1]


def _bit(t: int) -> np.int32:
    """Token t's bit in its int32 word of a token bitmask."""
    return np.uint32(1 << (t % 32)).view(np.int32)


def _pack(ok: np.ndarray) -> np.ndarray:
    return pack_token_bitmask(torch.from_numpy(ok)).numpy()


def _is_set(bits: np.ndarray, t: int) -> bool:
    return bool((int(bits[t // 32]) >> (t % 32)) & 1)
