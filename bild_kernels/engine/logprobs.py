"""Log-probabilities of chosen tokens and their likeliest alternatives (SamplingParams.logprobs and prompt_logprobs),
from a pass's logits, noted on the sequences: for the verification (`iteration.py`) and the chunked prefill
(`prefill_chunks.py`)."""
from __future__ import annotations

import torch

from bild_kernels.engine.sequence import Sequence

LOGPROB_CHUNK = 1 << 24  # logits a chunk of rows converts to float32 at a time (SamplingParams.logprobs)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, top: int, columns: torch.Tensor | None = None):
    """The log-softmax of `logits` [n, P, V'] at the columns `ids` [n, P] (< 0: read as column 0), and its `top`
    largest values with their token ids (`columns[j]` for column j of a reduced head), in float32 (float64 logits:
    float64) on the logits' device: (chosen [n, P], top values [n, P, top], top ids [n, P, top]). Rows go in chunks
    of LOGPROB_CHUNK logits."""
    n, P, V = logits.shape
    step = max(1, LOGPROB_CHUNK // max(P * V, 1))
    chosen, vals, idx = [], [], []
    for r in range(0, n, step):
        x = logits[r:r + step]
        x = x if x.dtype == torch.float64 else x.float()
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        chosen.append((x.gather(-1, ids[r:r + step].clamp(min=0).long().unsqueeze(-1)) - lse).squeeze(-1))
        if top:
            v, i = torch.topk(x, top, dim=-1)
            vals.append(v - lse)
            idx.append(i if columns is None else columns[i])
    if not top:
        return torch.cat(chosen), None, None
    return torch.cat(chosen), torch.cat(vals), torch.cat(idx)


def logprob_lists(logits: torch.Tensor, ids: torch.Tensor, counts: list[int], tops: list[int],
                  columns: torch.Tensor | None = None) -> list[tuple[list[float], list[list[tuple[int, float]]]]]:
    """Per row i of logits [n, P, V'] (one host read): the log-probabilities of its first counts[i] ids[i], and at
    each of those positions its tops[i] likeliest (token id, log-probability), most likely first."""
    chosen, vals, idx = token_logprobs(logits, ids, max(tops), columns)
    chosen = chosen.tolist()
    if max(tops):
        vals, idx = vals.tolist(), idx.tolist()
    return [(chosen[i][:c], [list(zip(idx[i][j][:k], vals[i][j][:k])) if k else [] for j in range(c)])
            for i, (c, k) in enumerate(zip(counts, tops))]


def note_logprobs(seqs: list[Sequence], logits: torch.Tensor, ids: torch.Tensor, counts: list[int],
                  columns: torch.Tensor | None = None) -> None:
    """Append to each sequence's logprobs those of its first counts[i] tokens ids[i] (its committed ones) under
    logits [n, P, V'] (the rows of `seqs` only, those that asked)."""
    for s, (lp, alts) in zip(seqs, logprob_lists(logits, ids, counts, [s.params.logprobs for s in seqs], columns)):
        s.logprobs += lp
        s.top_logprobs += alts


def note_prompt_logprobs(s: Sequence, logits: torch.Tensor, start: int) -> None:
    """Append to s.prompt_logprobs / s.prompt_top_logprobs the log-probabilities of the prompt tokens after positions
    start, start + 1, ... under logits [n, V] of those positions (the first entry None, at start 0)."""
    n = min(logits.shape[0], s.prompt_len - 1 - start)
    ids = torch.tensor([s.tokens[start + 1:start + 1 + n]], dtype=torch.int64, device=logits.device)
    (lp, alts), = logprob_lists(logits[None, :n], ids, [n], [s.params.prompt_logprobs])
    if start == 0:
        s.prompt_logprobs, s.prompt_top_logprobs = [None], [None]
    s.prompt_logprobs += lp
    s.prompt_top_logprobs += alts
