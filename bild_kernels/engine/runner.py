"""ModelRunner: one model, its paged KV cache and block manager, and the per-step metadata.

The engine speaks in rows (a request's slot in the block tables) and token lists; the runner turns a
ragged extend (prefill, one-token decode and multi-token verification are all extends) into one
batched forward over the paged cache and hands back the logits the engine asked for.
"""
from __future__ import annotations

import math

import torch

from bild_kernels.engine.block_manager import BlockManager
from bild_kernels.engine.host import to_device
from bild_kernels.models import AttentionMetadata, load_model


def load_executor(spec, role: str, dtype: torch.dtype, device: torch.device, base=None):
    """(executor, tokenizer or None) from a model directory, a .gguf file, an in-memory HF model, or a
    draft directory that borrows `base`'s embedding and head."""
    return load_model(spec, dtype=dtype, device=device, role=role, base=base)


class ModelRunner:
    def __init__(self, executor, *, num_blocks: int, block_size: int, max_seqs: int, max_blocks_per_seq: int):
        self.executor = executor
        self.device = executor.device
        self.block_size = block_size
        self.kv_caches = executor.allocate_kv_cache(num_blocks, block_size)
        self._kv_pool = _pool_of(self.kv_caches)  # [layers, 2, slots, H_kv, D] over them all, where they share one
        self.blocks = BlockManager(num_blocks, block_size, max_seqs, max_blocks_per_seq, device=self.device)
        # Rows whose logits held a NaN or inf since the engine last asked (numeric faults), on the device.
        self._nonfinite = torch.zeros(max_seqs, dtype=torch.bool, device=self.device)
        self._stats = None  # (logits, their statistics) of the last extend whose head took them (logit_stats)
        self.static = None  # a StaticExtend for short passes (`use_static`), else every pass runs eagerly

    def use_static(self, max_batch_size: int, max_tokens: int, *, capture: bool) -> None:
        """Run passes of up to max_tokens new tokens a row on fixed buffers (CUDA graphs with capture)."""
        from bild_kernels.engine.static_extend import StaticExtend
        self.static = StaticExtend(self, max_batch_size, max_tokens, capture=capture)

    def add(self, row: int) -> None:
        self.blocks.allocate(row)

    def free(self, row: int) -> None:
        self.blocks.free(row)

    def read_kv(self, row: int, n: int) -> torch.Tensor:
        """A copy of the keys and values of `row`'s first n positions, [layers, 2, n, H_kv, D] (prefix caching)."""
        pool, slots = self.kv_pool(), self.blocks.slots_of(row, 0, n)
        if self.blocks.host_slots:  # CPU tables: a block's positions are consecutive slots, read as slices
            return torch.cat([pool[:, :, a:b] for a, b in _runs(slots.tolist())], 2)
        return pool.index_select(2, slots)

    def write_kv(self, row: int, kv: torch.Tensor, n: int) -> None:
        """Append the first n positions of `kv` (as `read_kv` gives them) to `row`, which holds nothing yet."""
        if self.blocks.context_lens_of([row])[0] != 0:
            raise ValueError(f"row {row} already holds tokens: a prefix goes into an empty row")
        if kv.shape[0] != len(self.kv_caches) or kv.shape[2] < n:
            raise ValueError(f"a prefix of {kv.shape[2]} positions over {kv.shape[0]} layers cannot fill {n} "
                             f"positions of {len(self.kv_caches)} layers")
        pool = self.kv_pool()
        slots = self.blocks.append([row], [n])
        src = kv[:, :, :n].to(self.device, pool.dtype)
        if not self.blocks.host_slots:
            pool.index_copy_(2, slots, src)
            return
        done = 0
        for a, b in _runs(slots.tolist()):
            pool[:, :, a:b].copy_(src[:, :, done:done + b - a])
            done += b - a

    @property
    def kv_movable(self) -> bool:
        """Whether this model's keys and values can be copied out and back by position (`read_kv` / `write_kv`):
        its caches are views of one tensor."""
        return self._kv_pool is not None

    def kv_pool(self) -> torch.Tensor:
        """Every layer's keys and values as one [layers, 2, slots, H_kv, D] view (what read_kv and write_kv move)."""
        if self._kv_pool is None:
            raise ValueError(f"{type(self.executor).__name__}'s KV caches are not views of one tensor "
                             "(LlamaExecutor.allocate_kv_cache): their positions cannot be copied in one go")
        return self._kv_pool

    def rollback(self, rows: list[int], counts: list[int]) -> None:
        """Drop the last counts[i] tokens of rows[i]: rejected drafts, a draft run's chained positions, positions
        the next pass fills again; so a block they emptied stays the row's where the tables are host memory
        (`BlockManager.rollback`'s keep_blocks) until that pass, or `free`, needs it."""
        self.blocks.rollback(rows, counts, keep_blocks=True)

    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks()

    def check_invariants(self) -> None:
        self.blocks.check_invariants()

    def screen_logits(self, rows: list[int], logits: torch.Tensor, stats: list | None = None) -> torch.Tensor:
        """Zero (in place) the logits [n, K1, V] of every row with a NaN or inf among them, and note the row.

        The engine ends those requests with an error after the step; zeros keep the sampling and
        verification ops of the step well defined for them meanwhile. No host sync here.
        stats: the head's [max, lse, argmax, finite] of the logits' n * K1 positions (`LlamaExecutor.head_logits`
        where it took them): when every position is finite nothing is read, and `logit_stats` hands the first
        three to the step's verification.
        """
        self._stats = None
        if stats is not None and bool(stats[3].all()):
            n, K1 = logits.shape[:2]
            self._stats = (logits, tuple(t.view(n, K1) for t in stats[:3]))
            return logits
        # on a CPU reading is free: the sum of every logit is finite exactly when none is NaN or infinite (a sum
        # that overflows, or a legitimate -inf logit, only takes the long way), and then nothing more is done. One
        # reduction of the whole tensor: ~4x faster there than the row maxima below (torch splits a reduction
        # over the last dimension of a few rows poorly), 0.1 ms of every step
        if self.device.type == "cpu" and math.isfinite(float(logits.sum())):
            return logits
        top = logits.amax(-1)  # [n, K1]: amax propagates NaN; an all -inf row is bad too
        bad = ~torch.isfinite(top).all(-1)  # [n]
        logits.masked_fill_(bad[:, None, None], 0.0)
        self.note_nonfinite(rows, bad)
        return logits

    def logit_stats(self, logits: torch.Tensor) -> tuple | None:
        """(row_max, row_lse, row_argmax) [n, K1] of `logits`, the last `extend`'s, where its head took them and
        every logit was finite (`verify_draft`'s target_stats); else None."""
        return self._stats[1] if self._stats is not None and self._stats[0] is logits else None

    def note_nonfinite(self, rows: list[int], bad: torch.Tensor) -> None:
        """Note rows[i] as faulty where bad[i] (a device bool tensor; no host sync)."""
        span = _span(rows)
        if span is not None:  # consecutive rows (one request): no index to send
            self._nonfinite[span] |= bad
            return
        idx = to_device(rows, torch.long, self.device)
        self._nonfinite.index_copy_(0, idx, self._nonfinite.index_select(0, idx) | bad)

    def take_nonfinite(self) -> list[int]:
        """The rows noted by `screen_logits` since the last call (one host read), and forget them."""
        return take_nonfinite([self])[0]

    @torch.inference_mode()
    def extend(self, rows: list[int], tokens: list[list[int]], n_logits: list[int], *, return_hidden: bool = False,
               embeds: torch.Tensor | None = None, full_vocab: bool = True):
        """Append tokens[i] to row rows[i]'s cache in one forward; return the logits of each row's
        last n_logits[i] tokens as [len(rows), max(n_logits), V] (short rows repeat their last logits).

        return_hidden: also return each row's stream after the last layer (before the final norm), a list
        of [len(tokens[i]), H] tensors. embeds [sum len(tokens[i]), H]: the layer-0 inputs to use instead
        of the tokens' embeddings (a feature draft's; `tokens` then only give the counts).
        full_vocab=False: a reduced head's logits over its own ids only (see `LlamaExecutor.forward`); the
        fixed-buffer passes do not serve it."""
        dev = self.device
        counts = [len(t) for t in tokens]
        starts = self.blocks.context_lens_of(rows)  # host mirror: cached tokens per row before this step
        slot_mapping = self.blocks.append(rows, counts)  # [T] int64, reserves blocks as needed
        K1 = max(n_logits)
        if (self.static is not None and not return_hidden and embeds is None and full_vocab
                and self.static.serves(counts)):
            full = self.static.forward(rows, tokens, starts, slot_mapping)  # [n, Q, V]: row i's tokens first
            Q = full.shape[1]
            idx = _last_positions([i * Q + c for i, c in enumerate(counts)], n_logits)
            span = _span(idx)  # one row, or rows filling their buckets: a view of the bucket's buffer
            logits = full.flatten(0, 1)[span if span is not None else to_device(idx, torch.int64, dev)]
            return self.screen_logits(rows, logits.view(len(rows), K1, -1))
        input_ids = None if embeds is not None else to_device([t for ts in tokens for t in ts], torch.int64, dev)
        positions = to_device([s + j for s, c in zip(starts, counts) for j in range(c)], torch.int64, dev)
        qsl = [0]
        for c in counts:
            qsl.append(qsl[-1] + c)
        meta = AttentionMetadata(
            query_start_loc=to_device(qsl, torch.int32, dev),
            positions=positions, slot_mapping=slot_mapping,
            block_tables=self.blocks.block_tables_of(rows),
            context_lens=to_device([s + c for s, c in zip(starts, counts)], torch.int32, dev),
            max_query_len=max(counts), max_context_len=max(s + c for s, c in zip(starts, counts)))
        last = _last_positions(qsl[1:], n_logits)
        # every token's logits, in order (a decode step, a draft step, a verify pass of one row): no gather
        indices = None if last == list(range(qsl[-1])) else to_device(last, torch.int64, dev)
        out = self.executor.forward(input_ids, meta, self.kv_caches, hidden_states=embeds, logits_indices=indices,
                                    return_hidden=return_hidden, full_vocab=full_vocab)
        flat = out[0] if return_hidden else out
        took = getattr(self.executor, "last_head_stats", None)  # (logits, stats) where the head took them
        logits = self.screen_logits(rows, flat.view(len(rows), K1, -1),
                                    took[1] if took is not None and took[0] is flat else None)
        if not return_hidden:
            return logits
        return logits, [out[1]] if len(counts) == 1 else list(out[1].split(counts))


def _pool_of(kv_caches) -> torch.Tensor | None:
    """The layers' caches as one [layers, 2, slots, H_kv, D] view where they are views of one contiguous
    [layers, 2, blocks, block_size, H_kv, D] tensor (`LlamaExecutor.allocate_kv_cache`), else None."""
    k0 = kv_caches[0][0]
    base = k0._base
    if base is None or not base.is_contiguous() or base.dim() != 6 or base.shape[:2] != (len(kv_caches), 2):
        return None
    if any(c._base is not base or c.data_ptr() != base[i, j].data_ptr() or c.shape != base.shape[2:]
           for i, pair in enumerate(kv_caches) for j, c in enumerate(pair)):
        return None
    return base.flatten(2, 3)


def _runs(slots: list[int]) -> list[tuple[int, int]]:
    """`slots` as [start, end) runs of consecutive slots, in order."""
    runs: list[list[int]] = []
    for s in slots:
        if runs and runs[-1][1] == s:
            runs[-1][1] = s + 1
        else:
            runs.append([s, s + 1])
    return [(a, b) for a, b in runs]


def _span(xs: list[int]) -> slice | None:
    """xs as a slice where they are consecutive increasing integers (a view instead of an index sent over), else
    None."""
    return slice(xs[0], xs[0] + len(xs)) if xs and xs == list(range(xs[0], xs[0] + len(xs))) else None


def _last_positions(ends: list[int], n_logits: list[int]) -> list[int]:
    """Flat positions of each row's last n_logits[i] tokens, row i's tokens ending (exclusive) at ends[i];
    every row padded to max(n_logits) positions by repeating its last one (as extend returns them)."""
    K1 = max(n_logits)
    return [e - n + min(j, n - 1) for e, n in zip(ends, n_logits) for j in range(K1)]


def nonfinite_flags(runners: list[ModelRunner]) -> torch.Tensor:
    """The runners' fault flags as one [len(runners), max_seqs] bool tensor on the device (a view for one runner),
    for a caller that reads them together with other results (one host read) and then calls `forget_nonfinite`."""
    return runners[0]._nonfinite[None] if len(runners) == 1 else torch.stack([r._nonfinite for r in runners])


def forget_nonfinite(runners: list[ModelRunner], bits: list) -> list[list[int]]:
    """Each runner's faulty rows from `bits`, `nonfinite_flags(runners)` flattened and read to the host; the flags
    of the runners with any are cleared."""
    M = len(bits) // len(runners)
    rows = [[row for row in range(M) if bits[i * M + row]] for i in range(len(runners))]
    for r, mine in zip(runners, rows):
        if mine:
            r._nonfinite.zero_()
    return rows


def take_nonfinite(runners: list[ModelRunner]) -> list[list[int]]:
    """Each runner's rows noted by `screen_logits` since the last call, read in one host read (one GPU
    synchronisation for the large and the small model together), and forgotten."""
    return forget_nonfinite(runners, nonfinite_flags(runners).flatten().tolist())
