"""Layer groups of one model over one paged cache, for FREE's shallow-deep decoding.

The shallow group (layers [0, L_s)) drafts: it appends tokens like any extend, so the block manager
reserves their slots and its context length is the shallow group's committed length. The deep group
(layers [L_s, N)) lags behind: tokens that exited early have their deep-layer KV pending, and the
engine keeps, per request, the deep group's length (`Sequence.cached["deep"]`) and the residual
stream entering layer L_s of every pending token (`Sequence.hidden`). A deep pass continues those
streams through layers [L_s, N) at once (synchronized parallel decoding), writing the missing K/V
into the slots the shallow group already holds, and scores the tokens with the final norm and head.
"""
from __future__ import annotations

import torch

from bild_kernels.engine.host import to_device
from bild_kernels.engine.runner import ModelRunner
from bild_kernels.models import AttentionMetadata


class LayerGroups:
    def __init__(self, runner: ModelRunner, exit_layer: int):
        n = runner.executor.config.num_layers
        if not 1 <= exit_layer < n:
            raise ValueError(f"exit_layer must be in [1, {n - 1}] for a model of {n} layers, got {exit_layer}")
        self.runner, self.exit_layer, self.num_layers = runner, exit_layer, n

    @torch.inference_mode()
    def shallow(self, rows: list[int], tokens: list[list[int]], n_logits: list[int]):
        """Append tokens[i] to row rows[i] through the shallow layers. Returns the shallow logits of each
        row's last n_logits[i] tokens [len(rows), max(n_logits), V] (None if all are 0) and each row's
        residual stream entering layer L_s, [len(tokens[i]), hidden]."""
        r, dev = self.runner, self.runner.device
        counts = [len(t) for t in tokens]
        starts = r.blocks.context_lens_of(rows)
        slot_mapping = r.blocks.append(rows, counts)
        ctx = [s + c for s, c in zip(starts, counts)]
        qsl = [0]
        for c in counts:
            qsl.append(qsl[-1] + c)
        meta = AttentionMetadata(
            query_start_loc=to_device(qsl, torch.int32, dev),
            positions=to_device([s + j for s, c in zip(starts, counts) for j in range(c)], torch.int64, dev),
            slot_mapping=slot_mapping, block_tables=r.blocks.block_tables_of(rows),
            context_lens=to_device(ctx, torch.int32, dev), max_query_len=max(counts),
            max_context_len=max(ctx))
        K1 = max(n_logits)
        idx = [qsl[i + 1] - n + min(j, n - 1) for i, n in enumerate(n_logits) if n > 0 for j in range(K1)]
        input_ids = to_device([t for ts in tokens for t in ts], torch.int64, dev)
        logits, hidden = r.executor.forward(input_ids, meta, r.kv_caches, layers=(0, self.exit_layer),
                                            logits_indices=to_device(idx, torch.int64, dev),
                                            return_hidden=True)
        hidden = list(hidden.split(counts))
        return (r.screen_logits(rows, logits.view(len(rows), K1, -1)) if K1 > 0 else None), hidden

    @torch.inference_mode()
    def deep(self, rows: list[int], hidden: list[list[torch.Tensor]], starts: list[int],
             n_logits: list[int]) -> torch.Tensor:
        """Run the deep layers over each row's pending tokens, whose streams are hidden[i] (in order, from
        position starts[i], all already held by the shallow group). Returns the logits of each row's last
        n_logits[i] tokens as [len(rows), max(n_logits), V] (short rows repeat their last logits)."""
        r = self.runner
        x = [torch.cat(h) for h in hidden]
        counts = [h.shape[0] for h in x]
        held = r.blocks.context_lens_of(rows)
        for row, s, c, h in zip(rows, starts, counts, held):
            if s + c > h:
                raise AssertionError(f"row {row}: deep pass over positions up to {s + c}, shallow group holds {h}")
        meta = AttentionMetadata.build(counts, [s + c for s, c in zip(starts, counts)],
                                       r.blocks.block_tables_of(rows), r.block_size)
        qsl = meta.query_start_loc.tolist()
        K1 = max(n_logits)
        idx = [qsl[i + 1] - n + min(j, n - 1) for i, n in enumerate(n_logits) for j in range(K1)]
        logits = r.executor.forward(None, meta, r.kv_caches, hidden_states=torch.cat(x),
                                    layers=(self.exit_layer, self.num_layers),
                                    logits_indices=to_device(idx, torch.int64, r.device))
        return r.screen_logits(rows, logits.view(len(rows), K1, -1))
