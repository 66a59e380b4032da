"""A regular expression as a deterministic automaton over character classes, for constrained decoding.

`compile_regex(pattern)` parses the usual syntax (literals and escapes, `.`, classes `[a-z\\d]` and `[^...]`,
groups `(...)` / `(?:...)` / `(?P<name>...)`, `|`, and `* + ? {n} {n,} {n,m}`, lazy or not) and builds, by
Thompson's construction and the subset construction, a DFA whose transitions are indexed by *character classes*:
the code points split into the fewest intervals' unions that every character set of the pattern treats alike.
The language is what `re.fullmatch` accepts (anchors `^` / `$` only at the ends; no lookarounds, backreferences or
word boundaries: those are refused with a ValueError naming them). State 0 is the dead state; states from which no
accepting state can be reached are merged into it, so "not dead" means "still a prefix of a match".
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

MAX_CODE = 0x110000  # one past the last code point
MAX_NFA_STATES = 200_000
MAX_DFA_STATES = 20_000

_DIGIT = ((48, 57),)
_WORD = ((48, 57), (65, 90), (95, 95), (97, 122))
_SPACE = ((9, 13), (32, 32))
_ESCAPE_CHARS = {"n": 10, "t": 9, "r": 13, "f": 12, "v": 11, "0": 0, "a": 7, "e": 27}


def _norm(ranges) -> tuple:
    """Sorted, merged (lo, hi) inclusive ranges."""
    out = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _negate(ranges) -> tuple:
    out, at = [], 0
    for lo, hi in _norm(ranges):
        if lo > at:
            out.append((at, lo - 1))
        at = hi + 1
    if at < MAX_CODE:
        out.append((at, MAX_CODE - 1))
    return tuple(out)


_CLASS_ESCAPES = {"d": _DIGIT, "D": _negate(_DIGIT), "w": _WORD, "W": _negate(_WORD), "s": _SPACE,
                  "S": _negate(_SPACE)}


class _Parser:
    """Recursive descent over the pattern. AST nodes: ("set", ranges), ("cat", [nodes]), ("alt", [nodes]),
    ("rep", node, lo, hi or None)."""

    def __init__(self, pattern: str):
        self.p, self.i = pattern, 0

    def error(self, what: str) -> ValueError:
        return ValueError(f"regex {self.p!r}: {what} at position {self.i}")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def parse(self):
        if self.peek() == "^":
            self.i += 1
        node = self.alt()
        if self.i < len(self.p):
            raise self.error("unbalanced ')'")
        return node

    def alt(self):
        branches = [self.cat()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.cat())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def cat(self):
        items = []
        while self.peek() is not None and self.peek() not in "|)":
            if self.peek() == "$":
                self.i += 1
                if self.peek() is not None and self.peek() not in "|)":
                    raise self.error("'$' is supported only at the end")
                continue
            items.append(self.repeat(self.atom()))
        return ("cat", items)

    def repeat(self, node):
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.i += 1
                node = ("rep", node, 0 if c != "+" else 1, None if c != "?" else 1)
            elif c == "{" and (counted := self._counted()) is not None:
                node = ("rep", node, *counted)
            else:
                return node
            if self.peek() in ("?", "+"):  # lazy / possessive: the same language under fullmatch
                self.i += 1

    def _counted(self):
        """{n}, {n,}, {n,m} at self.i: consumes it and returns (n, m or None); None (nothing consumed) otherwise,
        where a '{' is a literal as in Python's re."""
        end = self.p.find("}", self.i)
        if end < 0:
            return None
        body = self.p[self.i + 1:end]
        parts = body.split(",")
        if len(parts) > 2 or not parts[0].isdigit() or (len(parts) == 2 and parts[1] and not parts[1].isdigit()):
            return None
        lo = int(parts[0])
        hi = lo if len(parts) == 1 else (int(parts[1]) if parts[1] else None)
        if hi is not None and hi < lo:
            raise self.error(f"repeat {{{body}}} has max < min")
        self.i = end + 1
        return lo, hi

    def atom(self):
        c = self.peek()
        if c == "(":
            self.i += 1
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?P<", self.i) or (self.p.startswith("?<", self.i)
                                                       and self.p[self.i + 2:self.i + 3] not in ("=", "!")):
                end = self.p.find(">", self.i)
                if end < 0:
                    raise self.error("unterminated group name")
                self.i = end + 1
            elif self.peek() == "?":
                raise self.error("lookarounds, flags and other (?...) groups are not supported")
            node = self.alt()
            if self.peek() != ")":
                raise self.error("missing ')'")
            self.i += 1
            return node
        if c in ("*", "+", "?"):
            raise self.error(f"nothing to repeat before {c!r}")
        if c == "{" and self._peek_counted():
            raise self.error("nothing to repeat before '{'")
        if c == "[":
            return ("set", self.char_class())
        if c == ".":
            self.i += 1
            return ("set", _negate(((10, 10),)))
        if c == "\\":
            return ("set", self.escape(in_class=False))
        self.i += 1
        return ("set", ((ord(c), ord(c)),))

    def _peek_counted(self) -> bool:
        i = self.i
        ok = self._counted() is not None
        self.i = i
        return ok

    def escape(self, in_class: bool) -> tuple:
        self.i += 1
        c = self.peek()
        if c is None:
            raise self.error("trailing backslash")
        self.i += 1
        if c in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[c]
        if c in _ESCAPE_CHARS:
            return ((_ESCAPE_CHARS[c],) * 2,)
        if c in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[c]
            digits = self.p[self.i:self.i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"\\{c} needs {n} hex digits")
            self.i += n
            cp = int(digits, 16)
            if cp >= MAX_CODE:
                raise self.error(f"code point {cp:#x} out of range")
            return ((cp, cp),)
        if c == "b" and in_class:
            return ((8, 8),)
        if c.isalnum():
            raise self.error(f"\\{c} (word boundaries, backreferences, anchors) is not supported")
        return ((ord(c), ord(c)),)

    def char_class(self) -> tuple:
        self.i += 1
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ranges, first = [], True
        while True:
            c = self.peek()
            if c is None:
                raise self.error("unterminated character class")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            if c == "\\":
                item = self.escape(in_class=True)
            else:
                self.i += 1
                item = ((ord(c), ord(c)),)
            if (len(item) == 1 and item[0][0] == item[0][1] and self.peek() == "-"
                    and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]"):
                self.i += 1  # (the '-')
                if self.peek() == "\\":
                    hi = self.escape(in_class=True)
                else:
                    hi = ((ord(self.p[self.i]),) * 2,)
                    self.i += 1
                if len(hi) != 1 or hi[0][0] != hi[0][1]:
                    raise self.error("a range must end in one character")
                if hi[0][0] < item[0][0]:
                    raise self.error("bad character range")
                item = ((item[0][0], hi[0][0]),)
            ranges.extend(item)
        ranges = _norm(ranges)
        return _negate(ranges) if negated else ranges


def _sets(node, out: list) -> None:
    kind = node[0]
    if kind == "set":
        out.append(node[1])
    elif kind in ("cat", "alt"):
        for n in node[1]:
            _sets(n, out)
    else:
        _sets(node[1], out)


class _Alphabet:
    """The code points split into classes: intervals between the pattern's set boundaries, grouped by which sets
    hold them."""

    def __init__(self, sets: list[tuple]):
        bounds = {0, MAX_CODE}
        for s in sets:
            for lo, hi in s:
                bounds.update((lo, hi + 1))
        self.points = np.array(sorted(bounds), dtype=np.int64)  # interval i = [points[i], points[i+1])
        n = len(self.points) - 1
        member = np.zeros((n, len(sets)), dtype=bool)
        pts = self.points.tolist()
        for j, s in enumerate(sets):
            for lo, hi in s:
                member[bisect.bisect_left(pts, lo):bisect.bisect_left(pts, hi + 1), j] = True
        _, self.interval_class = np.unique(member, axis=0, return_inverse=True)
        self.interval_class = self.interval_class.reshape(-1).astype(np.int32)
        self.num_classes = int(self.interval_class.max()) + 1
        self._set_masks = {}
        for j, s in enumerate(sets):
            self._set_masks[s] = frozenset(np.unique(self.interval_class[member[:, j]]).tolist())

    def classes_of(self, ranges: tuple) -> frozenset:
        return self._set_masks[ranges]

    def classify(self, codes: np.ndarray) -> np.ndarray:
        """Class id of each code point."""
        return self.interval_class[np.searchsorted(self.points, codes, side="right") - 1]


class _NFA:
    def __init__(self):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[frozenset, int]]] = []

    def state(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise ValueError(f"pattern too large: more than {MAX_NFA_STATES} automaton states (large counted "
                             "repeats such as {0,5000} expand into copies)")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node, alphabet: _Alphabet) -> tuple[int, int]:
        """(start, end) states of a fragment for `node`."""
        kind = node[0]
        if kind == "set":
            a, b = self.state(), self.state()
            classes = alphabet.classes_of(node[1])
            if classes:
                self.edges[a].append((classes, b))
            return a, b
        if kind == "cat":
            a = b = self.state()
            for n in node[1]:
                s, e = self.build(n, alphabet)
                self.eps[b].append(s)
                b = e
            return a, b
        if kind == "alt":
            a, b = self.state(), self.state()
            for n in node[1]:
                s, e = self.build(n, alphabet)
                self.eps[a].append(s)
                self.eps[e].append(b)
            return a, b
        _, sub, lo, hi = node
        a = b = self.state()
        for _ in range(lo):
            s, e = self.build(sub, alphabet)
            self.eps[b].append(s)
            b = e
        if hi is None:  # a star on top
            s, e = self.build(sub, alphabet)
            self.eps[b].append(s)
            self.eps[e].append(s)
            end = self.state()
            self.eps[b].append(end)
            self.eps[e].append(end)
            return a, end
        end = self.state()
        for _ in range(hi - lo):  # optional copies, each skippable to the end
            self.eps[b].append(end)
            s, e = self.build(sub, alphabet)
            self.eps[b].append(s)
            b = e
        self.eps[b].append(end)
        return a, end

    def closure(self, states) -> frozenset:
        seen, todo = set(states), list(states)
        while todo:
            for t in self.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)


@dataclass
class RegexDFA:
    """transitions [S, C + 1] int32 (column C, the padding class, keeps the state), accepting [S] bool; state 0 is
    dead, `start` the initial state; `alphabet` maps code points to classes."""

    pattern: str
    transitions: np.ndarray
    accepting: np.ndarray
    start: int
    alphabet: _Alphabet

    @property
    def pad_class(self) -> int:
        return self.transitions.shape[1] - 1

    def walk(self, state: int, text: str) -> int:
        """The state after reading `text` from `state` (0: dead)."""
        if not text:
            return state
        for c in self.alphabet.classify(np.fromiter(map(ord, text), dtype=np.int64, count=len(text))).tolist():
            state = int(self.transitions[state, c])
            if state == 0:
                return 0
        return state

    def fullmatch(self, text: str) -> bool:
        return bool(self.accepting[self.walk(self.start, text)])


def compile_regex(pattern: str) -> RegexDFA:
    """The DFA of `pattern` (see the module's docstring); ValueError for what it does not support or what is too
    large."""
    if not isinstance(pattern, str):
        raise ValueError(f"regex must be a string, got {type(pattern).__name__}")
    ast = _Parser(pattern).parse()
    sets: list[tuple] = []
    _sets(ast, sets)
    alphabet = _Alphabet(list(dict.fromkeys(sets)))
    nfa = _NFA()
    start, end = nfa.build(ast, alphabet)
    C = alphabet.num_classes
    first = nfa.closure([start])
    ids = {frozenset(): 0, first: 1}
    order = [frozenset(), first]
    rows = [[0] * C]
    i = 1
    while i < len(order):
        moves: dict[int, set] = {}
        for s in order[i]:
            for classes, t in nfa.edges[s]:
                for c in classes:
                    moves.setdefault(c, set()).add(t)
        row = [0] * C
        closed: dict[frozenset, frozenset] = {}
        for c, targets in moves.items():
            key = frozenset(targets)
            if key not in closed:
                closed[key] = nfa.closure(key)
            nxt = closed[key]
            if nxt not in ids:
                if len(order) >= MAX_DFA_STATES:
                    raise ValueError(f"regex {pattern!r} is too large: more than {MAX_DFA_STATES} automaton states")
                ids[nxt] = len(order)
                order.append(nxt)
            row[c] = ids[nxt]
        rows.append(row)
        i += 1
    trans = np.array(rows, dtype=np.int32).reshape(len(order), C)
    accepting = np.array([end in s for s in order], dtype=bool)
    # Merge every state that cannot reach acceptance into the dead state.
    live = accepting.copy()
    while True:
        grown = live | live[trans].any(axis=1)
        grown[0] = False
        if (grown == live).all():
            break
        live = grown
    trans = np.where(live[trans], trans, 0).astype(np.int32)
    trans[~live] = 0
    start_state = 1 if live[1] else 0
    trans = np.concatenate([trans, np.arange(len(order), dtype=np.int32)[:, None]], axis=1)
    return RegexDFA(pattern, trans, accepting & live, start_state, alphabet)
