"""SamplingParams.logits_processors (vLLM's): the user's functions on the large model's logits at every position a
verification pass scores, with the output so far and the drafts before that position as its history, after the
penalties and the structured outputs' masks. Every policy then verifies against the processed distribution, as it does
against the penalised one. A processor that raises, or hands back something that is not a logits row, fails its own
request (`Sequence.fault`), and the other requests of the batch go on."""
from __future__ import annotations

import inspect

import torch

from bild_kernels.engine.sequence import Sequence


def arity(fn) -> int:
    """How many arguments a logits processor takes: 2 (output ids, logits) or 3 (prompt ids, output ids, logits);
    a ValueError naming it otherwise."""
    if not callable(fn):
        raise ValueError(f"logits_processors must be callables, got {fn!r}")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2  # (a builtin without a signature: called as the common two-argument kind)
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 2
    n = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)
    if n not in (2, 3):
        raise ValueError(f"a logits processor takes (output_ids, logits) or (prompt_ids, output_ids, logits); "
                         f"{getattr(fn, '__name__', fn)!r} takes {n} arguments")
    return n


def processed(logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]]) -> torch.Tensor:
    """logits [B, P, V] with each processing row's positions 0 .. len(draft) replaced by its processors' output (a
    new tensor where any row has processors; `logits` itself otherwise)."""
    rows = [i for i, s in enumerate(seqs) if s.params.logits_processors and s.fault is None]
    if not rows:
        return logits
    out = logits.clone()
    for i in rows:
        s, d = seqs[i], drafts[i]
        prompt, output = s.tokens[:s.prompt_len], s.output_ids
        try:
            fns = [(fn, arity(fn) == 3) for fn in s.params.logits_processors]  # (once a row, not once a position)
            for p in range(len(d) + 1):
                history = output + d[:p]
                row = out[i, p]
                for fn, with_prompt in fns:
                    got = fn(prompt, history, row) if with_prompt else fn(history, row)
                    if not isinstance(got, torch.Tensor) or got.shape != row.shape:
                        raise ValueError(f"returned {type(got).__name__} "
                                         f"{tuple(got.shape) if isinstance(got, torch.Tensor) else ''}, not a "
                                         f"logits row of shape {tuple(row.shape)}")
                    row = got
                out[i, p] = row
        except Exception as e:  # the user's code: this request fails alone
            s.fault = f"a logits processor failed: {type(e).__name__}: {e}"
            out[i] = logits[i]
    return out
