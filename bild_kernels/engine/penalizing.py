"""SamplingParams' logit bias, penalties and min_tokens on a pass's logits (`ops.apply_penalties`), for the
verification (the large model's distribution, the one every policy keeps to) and for the drafts (the small model's,
so that it proposes what the penalised large model will keep)."""
from __future__ import annotations

import torch

from bild_kernels import ops
from bild_kernels.engine.host import to_device
from bild_kernels.engine.sequence import Sequence


def _committed(s: Sequence, columns: list[int] | None) -> torch.Tensor:
    """s.tokens as an int64 host tensor, in `columns` (-1 where an id has none), kept on the sequence and extended by
    what it committed since: a step's histories cost a copy a row, not a Python list of every token."""
    key = None if columns is None else id(columns)
    buf, n = s.penalty_history.get(key, (None, 0))
    if n > len(s.tokens) or buf is None or buf.shape[0] < len(s.tokens):
        grown = torch.empty(max(2 * len(s.tokens), 64), dtype=torch.int64)
        if buf is not None and n <= len(s.tokens):
            grown[:n] = buf[:n]
        else:
            n = 0
        buf = grown
    if n < len(s.tokens):
        new = s.tokens[n:]
        buf[n:len(s.tokens)] = torch.tensor(new if columns is None else [columns[t] for t in new], dtype=torch.int64)
        n = len(s.tokens)
    s.penalty_history[key] = (buf, n)
    return buf[:n]


def _history_inputs(seqs: list[Sequence], drafts: list[list[int]], eos_ids: set[int], columns: list[int] | None):
    """Host tensors of the rows' histories (their tokens, then `drafts`) as ids [n, L] (-1 pads; rows without
    penalties all -1), each row's banned ids [n, E] (-1 pads), its logit bias as ids [n, E'] (-1 pads) and values
    [n, E'] float64, and as a list each row's min_tokens less the output ids the columns lack (apply_penalties counts
    a row's output by the ids it is given)."""
    col = (lambda t: t) if columns is None else (lambda t: columns[t])  # noqa: E731
    asks = [s.params.penalized for s in seqs]
    L = max((len(s.tokens) + len(d) for s, d, a in zip(seqs, drafts, asks) if a), default=0)
    ids = torch.full((len(seqs), L), -1, dtype=torch.int64)
    min_tokens = [0] * len(seqs)
    for i, (s, d, a) in enumerate(zip(seqs, drafts, asks)):
        if not a:
            continue
        n = len(s.tokens)
        ids[i, :n] = _committed(s, columns)
        if d:
            ids[i, n:n + len(d)] = torch.tensor([col(t) for t in d], dtype=torch.int64)
        lacking = int((ids[i, s.prompt_len:n + len(d)] < 0).sum()) if columns is not None and s.params.min_tokens else 0
        min_tokens[i] = max(s.params.min_tokens - lacking, 0)
    banned = [sorted({col(t) for t in (set() if s.params.ignore_eos else eos_ids)
                      | {t for t in s.params.stop if isinstance(t, int)}} - {-1}) if s.params.min_tokens else []
              for s in seqs]
    E = max(len(b) for b in banned)
    banned = torch.tensor([b + [-1] * (E - len(b)) for b in banned], dtype=torch.int64).view(len(seqs), E)
    bias = [[(col(t), x) for t, x in s.params.logit_bias if col(t) >= 0] for s in seqs]
    E2 = max(len(b) for b in bias)
    bias_ids = torch.tensor([[t for t, _ in b] + [-1] * (E2 - len(b)) for b in bias], dtype=torch.int64)
    bias_values = torch.tensor([[x for _, x in b] + [0.0] * (E2 - len(b)) for b in bias], dtype=torch.float64)
    return ids, banned, bias_ids.view(len(seqs), E2), bias_values.view(len(seqs), E2), min_tokens


def penalized(logits: torch.Tensor, seqs: list[Sequence], eos_ids: set[int], draft_ids: torch.Tensor | None = None,
              columns: list[int] | None = None, drafted: list[list[int]] | None = None) -> torch.Tensor:
    """logits [n, P, V'] of the rows `seqs` with each one's penalties applied, position p counting draft_ids[:, :p]
    as output; `logits` itself when no row has any. A row's history: its tokens (the prompt's first), then
    drafted[i] (what it drafted in this run, where the logits follow those drafts).
    columns: where the logits score a reduced vocabulary (a draft's head), each token id's column (-1: none); ids
    without one cannot be penalised there, nor banned."""
    if not any(s.params.penalized for s in seqs):
        return logits
    drafted = drafted or [[] for _ in seqs]
    ids, banned, bias_ids, bias_values, min_tokens = _history_inputs(seqs, drafted, eos_ids, columns)
    dev = logits.device
    moved = lambda t: t.to(dev, non_blocking=True)  # noqa: E731
    ints = to_device([[s.prompt_len for s in seqs], min_tokens], torch.int32, dev)
    floats = to_device([[s.params.repetition_penalty for s in seqs], [s.params.presence_penalty for s in seqs],
                        [s.params.frequency_penalty for s in seqs]], torch.float64, dev)
    return ops.apply_penalties(
        logits, moved(ids), ints[0], None if draft_ids is None else moved(draft_ids), repetition_penalty=floats[0],
        presence_penalty=floats[1], frequency_penalty=floats[2], min_tokens=ints[1], banned_ids=moved(banned),
        bias_ids=moved(bias_ids), bias_values=moved(bias_values))


def chain_penalties(seqs: list[Sequence], eos_ids: set[int], columns: list[int] | None) -> tuple | None:
    """A draft run's penalties for the rows `seqs` (their committed tokens; the run adds its own drafts), over a head
    whose columns are `columns` (None: every id), as host tensors: the histories [n, L] (-1 pads), [n, 3] int64 prompt
    length, min_tokens and output length, [n, 3] float64 repetition / presence / frequency penalties, banned ids
    [n, E] and the logit bias as ids and values [n, E']; None where no row has any. What `ops.cpu_feature_draft_chain`
    takes, and (columns None) `StaticDraftLoop.run`."""
    if not any(s.params.penalized for s in seqs):
        return None
    ids, banned, bias_ids, bias_values, _ = _history_inputs(seqs, [[] for _ in seqs], eos_ids, columns)
    rows = [[s.prompt_len, s.params.min_tokens, len(s.tokens) - s.prompt_len] for s in seqs]
    values = [[s.params.repetition_penalty, s.params.presence_penalty, s.params.frequency_penalty] for s in seqs]
    return (ids, torch.tensor(rows, dtype=torch.int64), torch.tensor(values, dtype=torch.float64), banned, bias_ids,
            bias_values)


def head_columns(vocab: torch.Tensor | None, size: int) -> list[int] | None:
    """A reduced head's column of each of `size` token ids (-1: not in it), from its sorted ids; None for none."""
    if vocab is None:
        return None
    out = [-1] * size
    for j, t in enumerate(vocab.tolist()):
        out[t] = j
    return out
