"""A model's short extend passes (decode steps, verification passes) on fixed buffers: what a CUDA graph replays.

An eager forward of a 1B-class model issues hundreds of small kernel launches, and at batch 1 the GPU
waits on the host for each of them (measured on an H100: LargeOnly at 53 tokens/s, 19 ms a step, for a
model whose weights take ~1 ms to read). `StaticExtend` runs the same forward over fixed per-bucket
buffers, so that `capture=True` records it once per bucket as a CUDA graph and replays it:

  bucket   (B', Q): batch-size bucket B' >= the rows of the pass (1, 2, 4, ..., max_batch_size) and token
           bucket Q >= the most new tokens of one row (1, 2, 4, ..., max_tokens);
  layout   row i's new tokens sit at flat positions i*Q .. i*Q + n_i - 1. The padding after them repeats
           the row's last position and writes nothing (slot -1); padding rows have no context, so they
           attend to nothing. Logits are computed for every position and the caller's are gathered after.

Passes the buckets do not cover (prefill, a catch-up longer than max_tokens, a pass that returns hidden
states or takes input embeddings) run eagerly through the runner as before. `capture=False` runs the
identical padded forward without a graph (CPU tests, debugging a graph on a GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bild_kernels.engine.graphs import GraphRecorder, buckets
from bild_kernels.models import AttentionMetadata


@dataclass
class _Buffers:
    batch: int  # B'
    tokens: int  # Q
    # [3 * B'*Q + B'] int64, one host-to-device copy a pass: the token ids, the positions (the two the graph
    # reads), each row's context length (cast into context_lens) and the new tokens' flat indices (for slot_mapping)
    staging: torch.Tensor
    input_ids: torch.Tensor  # [B'*Q] int64, a view of staging
    positions: torch.Tensor  # [B'*Q] int64, a view of staging
    slot_mapping: torch.Tensor  # [B'*Q] int64, -1 for padding
    query_start_loc: torch.Tensor  # [B'+1] int32, i*Q (fixed)
    block_tables: torch.Tensor  # [B', M] int32
    context_lens: torch.Tensor  # [B'] int32, 0 for padding rows
    graph: object = None
    logits: torch.Tensor | None = None  # [B'*Q, V]: the graph's output (its pool), overwritten by every pass


class StaticExtend:
    """Short extend passes of one model runner on fixed per-bucket buffers, optionally as CUDA graphs."""

    def __init__(self, runner, max_batch_size: int, max_tokens: int, *, capture: bool):
        if capture and runner.device.type != "cuda":
            raise ValueError("CUDA-graph extend passes need a CUDA device")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        self.runner, self.capture = runner, capture
        self.batch_buckets, self.token_buckets = buckets(max_batch_size), buckets(max_tokens)
        self._buffers: dict[tuple[int, int], _Buffers] = {}
        self._graphs = GraphRecorder(runner.device) if capture else None

    def serves(self, counts: list[int]) -> bool:
        """Whether a pass with counts[i] new tokens per row fits a bucket."""
        return 0 < len(counts) <= self.batch_buckets[-1] and 0 < max(counts) <= self.token_buckets[-1] \
            and min(counts) > 0

    @torch.inference_mode()
    def forward(self, rows: list[int], tokens: list[list[int]], starts: list[int],
                slot_mapping: torch.Tensor) -> torch.Tensor:
        """The logits [len(rows), Q, V] of every new token (row i's first len(tokens[i]) positions are its
        own). starts[i]: tokens row i held before; slot_mapping: the runner's slots of the new tokens, rows in
        order (the blocks are already reserved)."""
        n = len(rows)
        counts = [len(t) for t in tokens]
        buf = self._get(next(b for b in self.batch_buckets if b >= n), next(q for q in self.token_buckets
                                                                              if q >= max(counts)))
        B, Q = buf.batch, buf.tokens
        ids, pos, dst = [0] * (B * Q), [0] * (B * Q), []
        for i, (toks, s) in enumerate(zip(tokens, starts)):
            base, c = i * Q, len(toks)
            ids[base:base + c] = toks
            pos[base:base + Q] = [s + min(j, c - 1) for j in range(Q)]
            dst.extend(range(base, base + c))
        ctx = [s + c for s, c in zip(starts, counts)] + [0] * (B - n)
        host = torch.tensor(ids + pos + ctx + dst, dtype=torch.int64)
        buf.staging[:len(host)].copy_(host, non_blocking=True)  # pageable: staged before the call returns
        BQ = B * Q
        buf.context_lens.copy_(buf.staging[2 * BQ:2 * BQ + B])
        if len(dst) == BQ:  # every position is a new token (no padding: at batch 1 a pass of 1, 2, 4, 8 tokens)
            buf.slot_mapping.copy_(slot_mapping)
        else:
            buf.slot_mapping.fill_(-1)
            buf.slot_mapping.index_copy_(0, buf.staging[2 * BQ + B:2 * BQ + B + len(dst)], slot_mapping)
        if n < B:  # padding rows attend to nothing
            buf.block_tables[n:].fill_(-1)
        buf.block_tables[:n].copy_(self.runner.blocks.block_tables_of(rows))
        if buf.graph is not None:
            buf.graph.replay()
        elif buf.logits is None:
            buf.logits = self._forward(buf)
        else:  # the uncaptured pass overwrites the bucket's one logits buffer, as a replay does, so that
            buf.logits.copy_(self._forward(buf))  # a caller holding logits across passes fails here too
        return buf.logits.view(B, Q, -1)[:n]

    def _forward(self, buf: _Buffers) -> torch.Tensor:
        meta = AttentionMetadata(query_start_loc=buf.query_start_loc, positions=buf.positions,
                                 slot_mapping=buf.slot_mapping, block_tables=buf.block_tables,
                                 context_lens=buf.context_lens, max_query_len=buf.tokens)
        return self.runner.executor.forward(buf.input_ids, meta, self.runner.kv_caches)

    # -- buffers and graphs -------------------------------------------------------------------------
    def _get(self, batch: int, tokens: int) -> _Buffers:
        key = (batch, tokens)
        if key not in self._buffers:
            r, T = self.runner, batch * tokens
            i64 = dict(dtype=torch.int64, device=r.device)
            i32 = dict(dtype=torch.int32, device=r.device)
            staging = torch.zeros(3 * T + batch, **i64)
            buf = _Buffers(batch, tokens, staging=staging, input_ids=staging[:T], positions=staging[T:2 * T],
                           slot_mapping=torch.full((T,), -1, **i64),
                           query_start_loc=torch.arange(batch + 1, **i32) * tokens,
                           block_tables=torch.full((batch, r.blocks.max_blocks_per_seq), -1, **i32),
                           context_lens=torch.zeros(batch, **i32))
            if self.capture:  # new buffers: every slot -1, every context empty, so recording writes nothing
                def step():
                    buf.logits = self._forward(buf)
                buf.graph = self._graphs.capture(step, f"the extend pass (bucket {batch}x{tokens})")
                if buf.graph is None:
                    buf.logits = None  # a failed capture's output is not a buffer to reuse
            self._buffers[key] = buf
        return self._buffers[key]
