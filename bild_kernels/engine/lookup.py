"""N-gram lookup drafts (prompt lookup decoding): the tokens that followed the latest earlier occurrence
of a sequence's last n tokens, in its own prompt and output.

A draft that costs no model at all: where an answer quotes its prompt (a summary, an edit, a
translation's names and numbers) or repeats itself, the large model's pass over the copied run
accepts it like any other draft, and verification keeps the output exactly what it would have been.
`NGramIndex` keeps, per n, the position after the latest occurrence of every n-gram of a sequence's
tokens, updated with each pass's new tokens, so a lookup costs a few dictionary reads, not a scan.
"""
from __future__ import annotations


class NGramIndex:
    """For n in [min_n, max_n]: each n-gram of `tokens` -> the index just after its latest occurrence
    that has a token after it. `propose` matches the longest n first."""

    def __init__(self, min_n: int, max_n: int):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.sizes = list(range(max_n, min_n - 1, -1))
        self._maps: dict[int, dict[tuple, int]] = {n: {} for n in self.sizes}
        self._len, self._last = 0, None  # how many tokens are indexed, and the last of them

    def update(self, tokens: list[int]) -> None:
        """Index the n-grams ending at positions len(tokens before) - 1 .. len(tokens) - 2 (each with a
        token after it). Tokens only ever grow at the end; if they shrank (a request's last step undone),
        the index starts over."""
        seen = self._len
        if len(tokens) < seen or (seen and tokens[seen - 1] != self._last):
            self._maps = {n: {} for n in self.sizes}
            seen = 0
        for end in range(max(seen - 1, 0), len(tokens) - 1):
            for n, m in self._maps.items():
                if end + 1 >= n:
                    m[tuple(tokens[end + 1 - n:end + 1])] = end + 1
        self._len, self._last = len(tokens), (tokens[-1] if tokens else None)

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `tokens`
        (n from max_n down to min_n) seen before; [] where none matches or k <= 0."""
        if k <= 0:
            return []
        self.update(tokens)
        for n in self.sizes:
            if len(tokens) > n:
                start = self._maps[n].get(tuple(tokens[-n:]))
                if start is not None:
                    return tokens[start:start + k]
        return []
